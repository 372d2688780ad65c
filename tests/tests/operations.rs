//! Daily operations end to end: drain, job logs through the agents, and
//! `events --follow` streaming as things happen.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use vigil_tests::jobs::{attempt, attempts, spec, start, workers_running};
use vigil_tests::{LONG, bin, clusterctl, wait_for};

#[test]
fn drain_moves_the_job_elsewhere_from_its_checkpoint_and_blames_no_one() -> Result<()> {
    let cluster = start(3)?;
    let id = cluster.submit(&spec(&cluster, 2, 0, "", "")?)?;
    let job = cluster.wait_job(&id, "running with a checkpoint", |j| {
        workers_running(j, 2) && j["job"]["last_checkpoint_step"].as_u64().is_some()
    })?;
    let node = job["job"]["assigned_nodes"][1]
        .as_str()
        .context("rank 1")?
        .to_owned();
    let out = clusterctl(
        &cluster.url(),
        &["-o", "json", "drain", &node, "--reason", "kernel upgrade"],
    )?
    .json()?;
    assert_eq!(out["jobs_restarted"][0], id.as_str(), "{out}");
    assert_eq!(out["node"]["scheduling"], "Cordoned");
    let job = cluster.wait_job(&id, "attempt 2 running elsewhere", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let all = attempts(&job);
    let nodes: Vec<&str> = all[1]["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(!nodes.contains(&node.as_str()), "{nodes:?}");
    assert_eq!(all[0]["culprit_node"], "", "a drain blames no node");
    assert!(
        all[1]["resumed_from_step"].as_u64().is_some(),
        "resumed from its checkpoint: {}",
        all[1]
    );
    let text = clusterctl(&cluster.url(), &["drain", &node])?;
    assert!(text.success(), "{}", text.stderr);
    assert!(text.stdout.contains("no jobs"), "{}", text.stdout);
    Ok(())
}

#[test]
fn job_logs_come_from_every_node_through_the_agents() -> Result<()> {
    let cluster = start(2)?;
    let id = cluster.submit(&spec(&cluster, 2, 0, "", "")?)?;
    cluster.wait_job(&id, "running", |j| workers_running(j, 2))?;
    let out = wait_for("log lines from both ranks", LONG, || {
        let out = clusterctl(&cluster.url(), &["job", "logs", &id])?;
        let both = out.stdout.contains("[node-0 rank 0]") && out.stdout.contains("[node-1 rank 1]");
        Ok((out.success() && both && out.stdout.contains("fresh start")).then_some(out))
    })?;
    assert!(
        out.stdout.contains("VIGIL_JOB_ID") || out.stdout.contains(&id),
        "{}",
        out.stdout
    );
    let one = clusterctl(&cluster.url(), &["job", "logs", &id, "--node", "node-1"])?;
    assert!(one.success(), "{}", one.stderr);
    assert!(!one.stdout.contains("rank 0]"), "{}", one.stdout);
    let bad = clusterctl(&cluster.url(), &["job", "logs", &id, "--node", "nope"])?;
    assert!(
        !bad.success() && bad.stderr.contains("nope"),
        "{}",
        bad.stderr
    );
    Ok(())
}

#[test]
fn events_follow_streams_a_cordon_as_it_happens() -> Result<()> {
    let cluster = start(1)?;
    let mut child = Command::new(bin("clusterctl")?)
        .args([
            "--insecure",
            "--coordinator",
            &cluster.url(),
            "-o",
            "json",
            "events",
            "--follow",
            "--node",
            "node-0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The backlog first: the node's registration.
    let first = rx.recv_timeout(LONG).context("no backlog")?;
    let first: Value = serde_json::from_str(&first)?;
    assert_eq!(first["node"], "node-0");
    std::thread::sleep(Duration::from_millis(300));
    let out = clusterctl(
        &cluster.url(),
        &["cordon", "node-0", "--reason", "streamed"],
    )?;
    assert!(out.success(), "{}", out.stderr);
    let seen = wait_for("the cordon on the stream", LONG, || {
        Ok(rx.try_recv().ok().filter(|l| l.contains("streamed")))
    })?;
    let v: Value = serde_json::from_str(&seen)?;
    assert_eq!(
        (v["kind"].as_str(), v["node"].as_str()),
        (Some("cordon"), Some("node-0"))
    );
    child.kill().ok();
    child.wait().ok();
    Ok(())
}
