//! Fabric health end to end: each agent reads a fake sysfs tree of its own (`sysfs_root`), the
//! test flips a port's `state` or bumps its counters there, and the coordinator cordons (or
//! marks Degraded) the node and says which port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;
use vigil_agent::fabric::fake::FakeSysfs;
use vigil_tests::jobs::{attempt, attempts, spec, workers_running};
use vigil_tests::{Cluster, FAST_LIVENESS, LONG, bin, http_get, metric, now, wait_for};

/// A cluster of `nodes` agents, each host with two 400 Gb/s InfiniBand ports (`mlx5_0/1`,
/// `mlx5_1/1`) and a RoCE interface (`eth0`), every port up; the fake trees in node order.
fn fabric_cluster(nodes: usize) -> Result<(Cluster, Vec<FakeSysfs>)> {
    let mut cluster = Cluster::start(FAST_LIVENESS, 0)?;
    let mut trees = Vec::new();
    for i in 0..nodes {
        let root: PathBuf = cluster.dir.path().join(format!("sysfs-node-{i}"));
        let fake = FakeSysfs::new(&root);
        fake.add_ib_port("mlx5_0", 1, 400)?;
        fake.add_ib_port("mlx5_1", 1, 400)?;
        fake.add_netdev("eth0", 100_000, true)?;
        cluster.add_agent_with(
            &format!("node-{i}"),
            &format!("sysfs_root = \"{}\"", root.display()),
        )?;
        trees.push(fake);
    }
    wait_for("agents Ready", LONG, || cluster.all("Ready", nodes))?;
    Ok((cluster, trees))
}

fn node_index(name: &str) -> Result<usize> {
    name.trim_start_matches("node-")
        .parse()
        .with_context(|| format!("not a test node name: {name}"))
}

fn cordon_reason(cluster: &Cluster, node: &str) -> Result<Option<String>> {
    Ok(cluster.node(node)?["cordon"]["reason"]
        .as_str()
        .map(str::to_owned))
}

#[test]
fn a_port_going_down_on_a_jobs_node_cordons_it_and_relaunches_the_job() -> Result<()> {
    let (cluster, trees) = fabric_cluster(3)?;
    let id = cluster.submit(&spec(&cluster, 2, 1, "", "")?)?;
    let job = cluster.wait_job(&id, "attempt 1 running with a checkpoint", |j| {
        workers_running(j, 2) && j["job"]["last_checkpoint_step"].as_u64().is_some()
    })?;
    let victim = job["job"]["assigned_nodes"][1]
        .as_str()
        .context("rank 1's node")?
        .to_owned();
    let tree = &trees[node_index(&victim)?];

    let injected = now();
    tree.set_ib_state("mlx5_1", 1, "1: DOWN", "3: Disabled")?;
    tree.bump_ib_counter("mlx5_1", 1, "link_downed", 1)?;
    let reason = wait_for("victim cordoned", LONG, || cordon_reason(&cluster, &victim))?;
    let cordoned = injected.elapsed();
    assert_eq!(reason, "port mlx5_1/1 is DOWN (was ACTIVE, 400 Gb/sec)");
    let node = cluster.node(&victim)?;
    assert_eq!(node["cordon"]["source"], "auto");
    assert_eq!(node["condition"], "Unhealthy");
    let detail =
        vigil_tests::clusterctl(&cluster.url(), &["-o", "json", "node", &victim])?.json()?;
    let ports = detail["fabric"].as_array().context("fabric ports")?;
    let down: Vec<&Value> = ports.iter().filter(|p| p["state"] == "DOWN").collect();
    assert_eq!(down.len(), 1, "{ports:?}");
    assert_eq!(
        (&down[0]["device"], &down[0]["port"]),
        (&Value::from("mlx5_1"), &Value::from(1))
    );
    assert_eq!(ports.len(), 3, "two InfiniBand ports and eth0: {ports:?}");

    let job = cluster.wait_job(&id, "attempt 2 running without the victim", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    println!(
        "port down -> cordon seen {cordoned:?}, -> attempt 2 running {:?}",
        injected.elapsed()
    );
    let all = attempts(&job);
    assert_eq!(all[0]["culprit_node"], victim.as_str());
    assert!(
        all[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("port mlx5_1/1 is DOWN"),
        "{}",
        all[0]
    );
    let nodes: Vec<&str> = all[1]["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(!nodes.contains(&victim.as_str()), "{nodes:?}");
    Ok(())
}

#[test]
fn a_flapping_port_marks_the_node_degraded_then_cordons_it_past_the_threshold() -> Result<()> {
    let (cluster, trees) = fabric_cluster(2)?;
    // Two link-downs the port recovered from: it is up, but it flaps.
    trees[0].bump_ib_counter("mlx5_0", 1, "link_downed", 2)?;
    wait_for("node-0 Degraded", LONG, || {
        let node = cluster.node("node-0")?;
        Ok((node["state"] == "Degraded").then_some(()))
    })?;
    let node = cluster.node("node-0")?;
    assert_eq!(node["condition"], "Degraded");
    assert_eq!(node["cordon"], Value::Null, "Degraded stays schedulable");
    assert_eq!(cluster.node("node-1")?["state"], "Ready");
    let detail = vigil_tests::clusterctl(&cluster.url(), &["-o", "json", "node", "node-0"])?;
    let text = detail.stdout.clone();
    assert!(
        text.contains("port mlx5_0/1 flapped 2 times within 1h"),
        "{text}"
    );

    // Carrier changes on the RoCE interface count too; past 5 within the window: cordoned.
    trees[0].bump_carrier_changes("eth0", 6)?;
    let reason = wait_for("node-0 cordoned", LONG, || {
        cordon_reason(&cluster, "node-0")
    })?;
    assert_eq!(
        reason,
        "interface eth0 flapped 6 times within 1h (link down, error recovery or carrier change)"
    );
    Ok(())
}

/// The agent's metrics address, from its start-up log line.
#[test]
fn a_port_that_went_down_while_the_agent_was_away_cordons_the_node_when_it_returns() -> Result<()> {
    let (mut cluster, trees) = fabric_cluster(1)?;
    // The host goes away (its agent killed), the coordinator restarts too, and the cable is
    // pulled meanwhile: the node must not come back healthy without the port.
    cluster.agent_mut("node-0").context("node-0")?.kill9();
    trees[0].set_ib_state("mlx5_0", 1, "1: DOWN", "3: Disabled")?;
    cluster.restart_coordinator()?;
    let root = cluster.dir.path().join("sysfs-node-0");
    cluster.add_agent_with("node-0", &format!("sysfs_root = \"{}\"", root.display()))?;
    let reason = wait_for("node-0 cordoned at registration", LONG, || {
        cordon_reason(&cluster, "node-0")
    })?;
    assert_eq!(
        reason,
        "port mlx5_0/1 is DOWN at registration (was ACTIVE, 400 Gb/sec when the node last \
         registered)"
    );
    assert_eq!(cluster.node("node-0")?["condition"], "Unhealthy");
    Ok(())
}

fn agent_metrics(cluster: &Cluster, node: &str) -> Result<SocketAddr> {
    let log = cluster.agent(node)?.log_text();
    let at = log
        .find("metrics=")
        .context("no metrics address logged yet")?;
    let addr: String = log[at + "metrics=".len()..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    Ok(addr.parse()?)
}

#[test]
fn the_agent_exports_the_fabric_as_node_exporter_names_it() -> Result<()> {
    let (cluster, trees) = fabric_cluster(1)?;
    trees[0].bump_ib_counter("mlx5_0", 1, "symbol_error", 7)?;
    let addr = wait_for("agent metrics address", LONG, || {
        Ok(agent_metrics(&cluster, "node-0").ok())
    })?;
    let series = "node_infiniband_symbol_error_total{device=\"mlx5_0\",port=\"1\"}";
    let value = wait_for("symbol errors exported", LONG, || {
        let text = http_get(addr, "/metrics")?;
        Ok(metric(&text, series).filter(|v| *v == 7.0))
    })?;
    assert_eq!(value, 7.0);
    let text = http_get(addr, "/metrics")?;
    for series in [
        "node_infiniband_state_id{device=\"mlx5_1\",port=\"1\"}",
        "node_infiniband_rate_bytes_per_second{device=\"mlx5_0\",port=\"1\"}",
        "node_network_carrier_changes_total{device=\"eth0\"}",
        "node_network_up{device=\"eth0\"}",
    ] {
        assert!(metric(&text, series).is_some(), "no {series} in:\n{text}");
    }
    Ok(())
}

#[test]
fn check_fabric_prints_what_it_reads_from_the_tree() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fake = FakeSysfs::new(dir.path());
    fake.add_ib_port("mlx5_0", 1, 200)?;
    fake.set_ib_state("mlx5_0", 1, "1: DOWN", "2: Polling")?;
    fake.add_netdev("eno1", 1_000, false)?;
    let out = Command::new(bin("vigil-agent")?)
        .args(["--check-fabric", "--json", "--sysfs-root"])
        .arg(dir.path())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let ports = report["ports"].as_array().context("ports")?;
    assert_eq!(ports.len(), 1, "eno1 is not RoCE-capable: {report}");
    assert_eq!(ports[0]["state"], "DOWN");
    assert_eq!(ports[0]["phys_state"], "Polling");
    assert_eq!(ports[0]["rate_mbps"], 200_000);
    assert_eq!(ports[0]["link_downed"], 0);
    let text = Command::new(bin("vigil-agent")?)
        .args(["--check-fabric", "--sysfs-root"])
        .arg(dir.path())
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("port mlx5_0/1\n  state            DOWN"),
        "{text}"
    );
    Ok(())
}

/// How many nodes' evidence `job show` returns for attempt 1.
fn first_attempts_evidence(job: &serde_json::Value) -> usize {
    attempts(job)
        .first()
        .and_then(|a| a["evidence"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn a_hung_jobs_failure_shows_each_workers_captured_state_and_the_fabric_it_points_at() -> Result<()>
{
    let (cluster, trees) = fabric_cluster(2)?;
    let id = cluster.submit(&spec(&cluster, 2, 0, ", FAKE_HANG_AT_STEP = \"30\"", "")?)?;
    cluster.wait_job(&id, "attempt 1 running", |j| workers_running(j, 2))?;
    // While the ranks wait on each other, node-1's port flaps once (Degraded, not cordoned:
    // the attempt fails as a hang, and the evidence points at node-1).
    trees[1].bump_ib_counter("mlx5_0", 1, "link_downed", 1)?;
    let job = cluster.wait_job(&id, "attempt 1's evidence from both nodes", |j| {
        first_attempts_evidence(j) == 2
    })?;
    let a = &attempts(&job)[0];
    assert!(a["reason"].as_str().unwrap_or("").contains("hung"), "{a}");
    for e in a["evidence"].as_array().context("evidence")? {
        assert_eq!(e["error"], "", "{e}");
        let processes = e["processes"].as_array().context("processes")?;
        assert!(!processes.is_empty(), "{e}");
        for p in processes {
            assert!(p["pid"].as_u64().unwrap_or(0) > 0, "{p}");
            assert!(!p["state"].as_str().unwrap_or("").is_empty(), "{p}");
            assert!(!p["kernel_stack"].as_str().unwrap_or("").is_empty(), "{p}");
        }
        assert!(!e["log_tail"].as_str().unwrap_or("").is_empty(), "{e}");
    }
    let node1 = &a["evidence"][1];
    assert_eq!(node1["node"], "node-1");
    assert_eq!(node1["fabric"][0]["port"], "mlx5_0/1");
    assert_eq!(node1["fabric"][0]["link_downed"], 1);
    assert_eq!(a["evidence"][0]["fabric"], serde_json::json!([]));
    assert_eq!(
        a["suspect"],
        "node-1: port mlx5_0/1 flapped 1 times during the attempt"
    );
    let shown = vigil_tests::clusterctl(&cluster.url(), &["job", "show", &id])?;
    assert!(
        shown.stdout.contains("HANG EVIDENCE of attempt 1")
            && shown.stdout.contains("points at node-1"),
        "{}",
        shown.stdout
    );
    // Each node's evidence is a record of its own, not part of the job's: no job record in the
    // store embeds it (the previous release's `"evidence":[...]` in an attempt), and a restarted
    // coordinator, which never loads evidence, reads it back on demand.
    let mut cluster = cluster;
    cluster.restart_coordinator()?;
    let job = cluster.wait_job(&id, "attempt 1's evidence read back after a restart", |j| {
        first_attempts_evidence(j) == 2
    })?;
    assert_eq!(attempts(&job)[0]["evidence"][1]["node"], "node-1");
    for name in ["state.sqlite", "state.sqlite-wal"] {
        let Ok(bytes) = std::fs::read(cluster.data_dir().join(name)) else {
            continue;
        };
        let embedded = bytes.windows(12).any(|w| w == b"\"evidence\":[");
        assert!(
            !embedded,
            "{name} holds a job record with its evidence inside"
        );
    }
    Ok(())
}
