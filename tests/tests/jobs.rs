//! Jobs end to end: real coordinator and agents, the fake trainer as the
//! workload, faults injected; what was lost, what was restarted, how fast.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use vigil_tests::jobs::{attempt, attempts, spec, start, state, workers_running};
use vigil_tests::scenario::{Checkpoint, checkpoints, unix_ms};
use vigil_tests::{LONG, bin, clusterctl, now, wait_for};

fn node_of_rank(job: &Value, rank: usize) -> Result<String> {
    job["job"]["assigned_nodes"][rank]
        .as_str()
        .map(str::to_owned)
        .context("no assigned node")
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_crashed_worker_restarts_the_gang_from_the_last_complete_checkpoint() -> Result<()> {
    let cluster = start(2)?;
    let id = cluster.submit(&spec(&cluster, 2, 0, ", FAKE_CRASH_AT_STEP = \"75\"", "")?)?;
    let job = cluster.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let a = attempts(&job);
    assert_eq!(a[0]["outcome"], "failed");
    assert!(
        a[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("exited with code 1"),
        "{}",
        a[0]
    );
    assert_eq!(
        a[1]["nodes"], a[0]["nodes"],
        "the same gang, restarted whole"
    );
    assert_eq!(
        a[1]["resumed_from_step"], 70,
        "resumed from the last complete checkpoint: {}",
        a[1]
    );
    assert!(
        a[1]["resumed_from"]
            .as_str()
            .unwrap_or("")
            .ends_with("step_00000070"),
        "{}",
        a[1]
    );
    let steps: Vec<u64> = job["workers"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|w| w["progress_step"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        steps.iter().all(|s| *s > 70),
        "workers continue after step 70: {steps:?}"
    );
    assert_eq!(job["job"]["restarts"], 1);
    Ok(())
}

#[test]
fn xid_79_cordons_the_node_and_the_job_moves_to_the_spare() -> Result<()> {
    let cluster = start(3)?;
    let id = cluster.submit(&spec(&cluster, 2, 1, "", "")?)?;
    let job = cluster.wait_job(&id, "attempt 1 running with a checkpoint", |j| {
        workers_running(j, 2) && j["job"]["last_checkpoint_step"].as_u64().is_some()
    })?;
    let victim = node_of_rank(&job, 1)?;
    let survivor = node_of_rank(&job, 0)?;
    let spare = job["spare_nodes"][0]
        .as_str()
        .context("a spare")?
        .to_owned();

    let injected = now();
    cluster.agent(&victim)?.set_faults("gpu=3 xid=79\n")?;
    wait_for("victim cordoned", LONG, || {
        Ok(cluster.node(&victim)?["cordon"]["reason"]
            .as_str()
            .map(str::to_owned))
    })?;
    let cordoned = injected.elapsed();
    let job = cluster.wait_job(&id, "attempt 2 running on the spare", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let relaunched = injected.elapsed();
    println!(
        "xid 79 -> cordon seen {cordoned:?}, -> attempt 2 running on the spare {relaunched:?}"
    );

    let all = attempts(&job);
    let nodes: Vec<&str> = all[1]["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        nodes.contains(&spare.as_str()) && nodes.contains(&survivor.as_str()),
        "{nodes:?}"
    );
    assert!(!nodes.contains(&victim.as_str()));
    assert_eq!(attempts(&job)[0]["culprit_node"], victim.as_str());
    assert_eq!(
        cluster.node(&survivor)?["cordon"],
        Value::Null,
        "a gang mate is not cordoned"
    );
    assert!(
        cluster.node(&victim)?["cordon"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("XID 79")
    );
    assert!(relaunched < Duration::from_secs(30), "{relaunched:?}");
    Ok(())
}

#[test]
fn a_partial_newest_checkpoint_is_never_resumed_from() -> Result<()> {
    let cluster = start(1)?;
    let id = cluster.submit(&spec(
        &cluster,
        1,
        0,
        ", FAKE_PARTIAL_AT_STEP = \"75\"",
        "",
    )?)?;
    let job = cluster.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 1)
    })?;
    let partial = cluster.dir.path().join("ckpt/step_00000075");
    assert!(
        partial.exists() && !partial.join("COMPLETE").exists(),
        "the fake trainer left a partial checkpoint"
    );
    assert_eq!(
        attempts(&job)[1]["resumed_from_step"],
        70,
        "{}",
        attempts(&job)[1]
    );
    Ok(())
}

#[test]
fn a_hang_restarts_the_job_after_hang_timeout() -> Result<()> {
    let cluster = start(1)?;
    let id = cluster.submit(&spec(&cluster, 1, 0, ", FAKE_HANG_AT_STEP = \"30\"", "")?)?;
    let job = cluster.wait_job(&id, "attempt 2 after the hang", |j| attempt(j) == 2)?;
    let reason = attempts(&job)[0]["reason"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(reason.contains("no progress"), "{reason}");
    assert!(reason.contains("hung"), "{reason}");
    Ok(())
}

#[test]
fn max_restarts_exhausted_fails_the_job_with_the_reason() -> Result<()> {
    let cluster = start(1)?;
    let text = spec(&cluster, 1, 0, "", "")?
        .replace(
            &format!("command = [\"{}\"]", bin("fake-trainer")?.display()),
            "command = [\"sh\", \"-c\", \"exit 3\"]",
        )
        .replace("max_restarts = 3", "max_restarts = 2");
    let id = cluster.submit(&text)?;
    let job = cluster.wait_job(&id, "job Failed", |j| state(j) == "Failed")?;
    let reason = job["job"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("gave up after 2 restarts"), "{reason}");
    assert!(reason.contains("exited with code 3"), "{reason}");
    assert_eq!(attempt(&job), 3);
    Ok(())
}

#[test]
fn a_program_that_crashes_at_the_same_step_ends_as_a_crash_loop() -> Result<()> {
    let cluster = start(2)?;
    let text = spec(
        &cluster,
        2,
        0,
        ", FAKE_CRASH_AT_STEP = \"5\", FAKE_CRASH_ATTEMPT = \"any\"",
        "",
    )?
    .replace("max_restarts = 3", "max_restarts = 10");
    let id = cluster.submit(&text)?;
    let job = cluster.wait_job(&id, "job Failed", |j| state(j) == "Failed")?;
    let reason = job["job"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with(
            "crash loop: attempts 1, 2, 3 failed the same way, worker exited with code 1"
        ),
        "{reason}"
    );
    assert!(reason.contains("with no hardware culprit"), "{reason}");
    assert!(
        reason.contains("fake-trainer: crashing at step 5 (FAKE_CRASH_AT_STEP)"),
        "the last output is quoted: {reason}"
    );
    assert_eq!(
        attempt(&job),
        3,
        "no fourth attempt although max_restarts = 10"
    );
    for a in attempts(&job) {
        assert_eq!(a["exit_code"], 1, "{a}");
        assert_eq!(a["crash_loop"], "counts: worker exited with code 1", "{a}");
        assert!(
            a["triage"].as_object().is_some_and(|t| t.len() == 2),
            "each crash was triaged first and no node failed: {a}"
        );
    }
    let shown = clusterctl(&cluster.url(), &["job", "show", &id])?;
    assert!(shown.success(), "{shown:?}");
    assert!(
        shown
            .stdout
            .contains("LAST OUTPUT of the worker that failed attempt 3"),
        "{}",
        shown.stdout
    );
    assert!(
        shown.stdout.contains("  fake-trainer: crashing at step 5"),
        "{}",
        shown.stdout
    );
    for (name, node) in vigil_tests::nodes(&cluster.url())? {
        assert!(node["cordon"].is_null(), "{name} is not cordoned: {node}");
    }
    Ok(())
}

#[test]
fn a_checkpoint_completed_by_a_writer_cut_off_from_the_coordinator_is_found_at_relaunch()
-> Result<()> {
    let cluster = start(3)?;
    let id = cluster.submit(&spec(&cluster, 2, 1, "", "")?)?;
    let job = cluster.wait_job(&id, "attempt 1 running with a checkpoint", |j| {
        workers_running(j, 2) && j["job"]["last_checkpoint_step"].as_u64().is_some()
    })?;
    let writer = node_of_rank(&job, 0)?;
    let agent = cluster.agent(&writer)?.child.id().to_string();
    // The writer's agent stalls: the coordinator hears nothing more from that node, while the
    // worker's shim keeps it training (and checkpointing) until the lease runs out.
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &agent])
        .status()?;
    anyhow::ensure!(stop.success(), "kill -STOP {agent}");
    let resumed = (|| -> Result<Value> {
        std::thread::sleep(Duration::from_millis(300));
        let known = cluster.job(&id)?["job"]["last_checkpoint_step"]
            .as_u64()
            .unwrap_or(0);
        let job = cluster.wait_job(&id, "attempt 2 running", |j| {
            attempt(j) == 2 && workers_running(j, 2)
        })?;
        let on_disk = checkpoints(&cluster.dir.path().join("ckpt"))?;
        let newest = on_disk
            .iter()
            .filter(|c| c.completed_at_ms.is_some() && c.attempt == Some(1))
            .map(|c| c.step)
            .max()
            .unwrap_or(0);
        anyhow::ensure!(
            newest > known,
            "the cut-off writer completed no checkpoint past step {known}: {on_disk:?}"
        );
        assert_eq!(
            attempts(&job)[1]["resumed_from_step"],
            newest,
            "resumed from the newest complete checkpoint on disk, not the {known} last reported: {}",
            attempts(&job)[1]
        );
        let found = job["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["message"].as_str())
            .any(|m| m.contains(&format!("(step {newest}) that no agent had reported")));
        assert!(found, "the job's history says so: {}", job["events"]);
        Ok(job)
    })();
    let resume = std::process::Command::new("kill")
        .args(["-CONT", &agent])
        .status();
    let job = resumed?;
    anyhow::ensure!(resume?.success(), "kill -CONT {agent}");
    assert!(
        !job["job"]["assigned_nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n == writer.as_str()),
        "attempt 2 runs without the silent node: {}",
        job["job"]
    );
    Ok(())
}

#[test]
fn a_coordinator_restart_within_the_lease_restarts_nothing() -> Result<()> {
    let mut cluster = start(2)?;
    let id = cluster.submit(&spec(&cluster, 2, 0, "", "")?)?;
    let before = cluster.wait_job(&id, "running", |j| workers_running(j, 2))?;
    let pids: Vec<u64> = before["workers"]
        .as_array()
        .map(|w| w.iter().filter_map(|w| w["pid"].as_u64()).collect())
        .unwrap_or_default();
    cluster.restart_coordinator()?;
    wait_for("agents back", LONG, || cluster.all("Ready", 2))?;
    std::thread::sleep(Duration::from_secs(3));
    let job = cluster.job(&id)?;
    assert_eq!((state(&job), attempt(&job)), ("Running", 1), "{job}");
    let after: Vec<u64> = job["workers"]
        .as_array()
        .map(|w| w.iter().filter_map(|w| w["pid"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(after, pids, "the same processes, adopted");
    assert!(pids.iter().all(|p| pid_alive(*p)));
    Ok(())
}

#[test]
fn a_coordinator_down_past_the_lease_stops_workers_and_resumes_once() -> Result<()> {
    let mut cluster = start(1)?;
    let id = cluster.submit(&spec(&cluster, 1, 0, "", "")?)?;
    let before = cluster.wait_job(&id, "running with a checkpoint", |j| {
        workers_running(j, 1)
            && j["job"]["last_checkpoint_step"]
                .as_u64()
                .is_some_and(|s| s >= 20)
    })?;
    let pid = before["workers"][0]["pid"].as_u64().context("pid")?;
    cluster.coordinator.kill9();
    wait_for(
        "the agent to stop its worker when its lease (2s) expires",
        LONG,
        || Ok((!pid_alive(pid)).then_some(())),
    )?;
    cluster.restart_coordinator()?;
    let job = cluster.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 1)
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let job2 = cluster.job(&id)?;
    assert_eq!(attempt(&job2), 2, "resumed once: {job2}");
    let resumed = attempts(&job)[1]["resumed_from_step"]
        .as_u64()
        .context("resumed from a checkpoint")?;
    assert!(resumed >= 20, "{resumed}");
    Ok(())
}

#[test]
fn cancel_stops_every_worker_on_every_node() -> Result<()> {
    let cluster = start(2)?;
    let id = cluster.submit(&spec(&cluster, 2, 0, "", "")?)?;
    let job = cluster.wait_job(&id, "running", |j| workers_running(j, 2))?;
    let pids: Vec<u64> = job["workers"]
        .as_array()
        .map(|w| w.iter().filter_map(|w| w["pid"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(pids.len(), 2);
    let out = clusterctl(&cluster.url(), &["job", "cancel", &id])?;
    assert!(out.success(), "{}", out.stderr);
    cluster.wait_job(&id, "Cancelled", |j| state(j) == "Cancelled")?;
    for pid in pids {
        assert!(!pid_alive(pid), "worker {pid} still alive after cancel");
    }
    Ok(())
}

#[test]
fn invalid_job_specs_are_refused_naming_the_field() -> Result<()> {
    let cluster = start(1)?;
    let good = spec(&cluster, 1, 0, "", "")?;
    for (bad, needle) in [
        (good.replace("nodes = 1", "nodes = 0"), "nodes = 0"),
        (good.replace("nodes = 1", "nodes = 5"), "only 1 node"),
        (
            good.replace("layout = \"marker\"", "layout = \"tarball\""),
            "checkpoint.layout",
        ),
        (format!("{good}\nfoo = 1\n"), "foo"),
    ] {
        let path = vigil_tests::write_file(cluster.dir.path(), "bad.toml", &bad)?;
        let out = clusterctl(&cluster.url(), &["job", "submit", &path.to_string_lossy()])?;
        assert!(!out.success());
        assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
    }
    let out = clusterctl(&cluster.url(), &["job", "submit", "/no/such/job.toml"])?;
    assert!(
        !out.success() && out.stderr.contains("/no/such/job.toml"),
        "{}",
        out.stderr
    );
    let out = clusterctl(&cluster.url(), &["job", "show", "nope-1"])?;
    assert!(
        !out.success() && out.stderr.contains("not found"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// Regression: the commands a registration itself causes (here: the start of
/// a job that waited for this node) were acted on before the new session was
/// live, so they were dropped and the worker never started.
#[test]
fn a_job_waiting_for_a_node_starts_when_that_node_registers() -> Result<()> {
    let mut cluster = start(2)?;
    let id = cluster.submit(&spec(&cluster, 2, 0, "", "")?)?;
    cluster.wait_job(&id, "running", |j| workers_running(j, 2))?;
    cluster
        .agent_mut("node-1")
        .context("node-1")?
        .terminate(LONG)?;
    cluster.wait_job(&id, "Pending without node-1", |j| state(j) == "Pending")?;
    let agent = vigil_tests::Agent::start(cluster.dir.path(), &cluster.url(), "node-1", 8)?;
    cluster.agents.retain(|a| a.name != "node-1");
    cluster.agents.push(agent);
    let job = cluster.wait_job(&id, "attempt 2 running", |j| workers_running(j, 2))?;
    assert_eq!(attempt(&job), 2, "started at once, not after a hang: {job}");
    Ok(())
}

/// A one-node job checkpointing every 150 steps (6 s), crashed by writing `crash` to
/// `<dir>/control-<attempt>`.
fn slow_checkpoints_spec(cluster: &vigil_tests::Cluster) -> Result<String> {
    let control = cluster.dir.path().join("control-{attempt}");
    Ok(spec(
        cluster,
        1,
        0,
        &format!(", FAKE_CONTROL_FILE = \"{}\"", control.display()),
        "",
    )?
    .replace("FAKE_CKPT_EVERY = \"10\"", "FAKE_CKPT_EVERY = \"150\""))
}

/// The two newest complete checkpoints in `ckpt` (the previous one, the newest), once there are two.
fn newest_two_complete(ckpt: &Path) -> Result<Option<(Checkpoint, Checkpoint)>> {
    let complete: Vec<Checkpoint> = checkpoints(ckpt)?
        .into_iter()
        .filter(|c| c.completed_at_ms.is_some())
        .collect();
    Ok(match complete.as_slice() {
        [.., prev, newest] => Some((prev.clone(), newest.clone())),
        _ => None,
    })
}

#[test]
fn a_checkpoint_whose_data_is_newer_than_its_marker_is_not_resumed_from() -> Result<()> {
    let cluster = start(1)?;
    // Time for the newest to age past MARKER_SKEW (2 s) before the next one.
    let text = slow_checkpoints_spec(&cluster)?;
    let id = cluster.submit(&text)?;
    let ckpt = cluster.dir.path().join("ckpt");
    // Two complete checkpoints, the newest 2.5 s old: a trainer reusing its directory (a
    // rollback rewriting it) writes new data under the old marker, then crashes mid-save.
    let (tampered, previous) = wait_for("two checkpoints, the newest 2.5 s old", LONG, || {
        let Some((prev, newest)) = newest_two_complete(&ckpt)? else {
            return Ok(None);
        };
        let age = unix_ms().saturating_sub(newest.completed_at_ms.unwrap_or(u64::MAX));
        if age < 2_500 {
            return Ok(None);
        }
        std::fs::write(newest.path.join("model.bin"), "half-rewritten weights\n")?;
        std::fs::write(cluster.dir.path().join("control-1"), "crash")?;
        Ok(Some((newest.step, prev.step)))
    })?;
    let job = cluster.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 1)
    })?;
    assert_eq!(
        attempts(&job)[1]["resumed_from_step"],
        previous,
        "not from step {tampered}, whose data is newer than its marker: {}",
        attempts(&job)[1]
    );
    Ok(())
}

#[test]
fn a_checkpoint_that_fails_verify_command_is_marked_bad_and_the_previous_one_resumed() -> Result<()>
{
    let cluster = start(1)?;
    // The verify script fails a checkpoint with a `<path>.bad` file beside it (beside, not in
    // it: a file newer than its marker would make it incomplete, never verified). None
    // completes between the marking and the crash.
    let verify = r#"verify_command = ["sh", "-c", "test ! -e \"$VIGIL_CHECKPOINT.bad\" || { echo \"corrupt: $1\"; exit 3; }", "verify"]"#;
    let text = slow_checkpoints_spec(&cluster)?.replace(
        "layout = \"marker\"\n",
        &format!("layout = \"marker\"\n{verify}\nverify_timeout = \"30s\"\n"),
    );
    let id = cluster.submit(&text)?;
    let ckpt = cluster.dir.path().join("ckpt");
    let (bad, previous) = wait_for("two checkpoints, the newest just completed", LONG, || {
        let Some((prev, newest)) = newest_two_complete(&ckpt)? else {
            return Ok(None);
        };
        let age = unix_ms().saturating_sub(newest.completed_at_ms.unwrap_or(0));
        if age > 3_000 {
            return Ok(None);
        }
        let mut marked = newest.path.clone().into_os_string();
        marked.push(".bad");
        std::fs::write(&marked, "")?;
        std::fs::write(cluster.dir.path().join("control-1"), "crash")?;
        Ok(Some((newest, prev.step)))
    })?;
    let job = cluster.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 1)
    })?;
    assert_eq!(
        attempts(&job)[1]["resumed_from_step"],
        previous,
        "not from step {}, which failed verify_command: {}",
        bad.step,
        attempts(&job)[1]
    );
    let events: Vec<&str> = job["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str())
        .collect();
    let path = bad.path.display().to_string();
    let marked_bad = events.iter().any(|m| {
        m.starts_with(&format!(
            "checkpoint {path} (step {}) failed verify_command",
            bad.step
        )) && m.contains("(exited with code 3)")
            && m.contains(&format!("output: corrupt: {path}"))
    });
    assert!(
        marked_bad,
        "a checkpoint-bad event quotes the output: {events:#?}"
    );
    Ok(())
}
