//! Fault injection across real hosts, part 1: hosts and links fail. Each
//! scenario runs the real binaries in network namespaces (vigil_tests::netns)
//! with the fake trainer, breaks something, and checks what was lost (only the
//! steps since the last complete checkpoint), what was restarted (only what
//! had to be) and how long detection and recovery took; the measurements go
//! to docs/reliability.md (scripts/reliability.sh).

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use vigil_tests::jobs::{attempt, attempts, spec_in, workers_running};
use vigil_tests::netns::NetCluster;
use vigil_tests::report::Row;
use vigil_tests::scenario::{
    Resume, attempt_nodes, availability_log, check_fenced, check_resume, checkpoints,
    known_checkpoint, node_of_rank, only_attempt_runs, restarts, running, settle, unreported,
};
use vigil_tests::{FAST_LIVENESS, LONG, now, wait_for};

#[test]
fn host_dies_node_is_lost_and_the_job_moves_to_the_spare() -> Result<()> {
    let Some(mut c) = NetCluster::builder(FAST_LIVENESS).hosts(3).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 1, "", "")?)?;
    let job = running(&c, &id, 2)?;
    let (victim, survivor) = (node_of_rank(&job, 1)?, node_of_rank(&job, 0)?);
    let t0 = now();
    c.kill_host(&victim)?;
    c.wait_node(&victim, "victim Lost", |n| n["availability"] == "Lost")?;
    let detection = t0.elapsed();
    c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let recovery = t0.elapsed();
    settle(Duration::from_secs(2));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 2 && restarts(&job) == 1,
        "one restart: {job}"
    );
    let nodes = attempt_nodes(&job, 2)?;
    ensure!(
        nodes.contains(&survivor) && !nodes.contains(&victim),
        "{nodes:?}"
    );
    let lost = check_resume(&c, &job, 2, Resume::Newest)?;
    ensure!(c.node(&survivor)?["cordon"].is_null(), "survivor untouched");
    Row {
        order: 1,
        scenario: "host dies".into(),
        fault: "kill -9 of a host's agent and workers (rank 1)".into(),
        detection: Some(detection),
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: "node Lost after `lost_after`; job relaunched on the spare from the newest complete checkpoint; the surviving node kept its place".into(),
    }
    .record()
}

#[test]
fn long_partition_relaunches_elsewhere_and_the_isolated_workers_are_fenced() -> Result<()> {
    let Some(c) = NetCluster::builder(FAST_LIVENESS).hosts(3).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 1, "", "")?)?;
    let job = running(&c, &id, 2)?;
    let victim = node_of_rank(&job, 1)?;
    ensure!(c.trainers(&victim)?.len() == 1, "one worker on the victim");
    let t0 = now();
    c.cut(&victim)?;
    // The lease (2 s) fences the isolated workers before the node is Lost (3 s).
    wait_for("isolated workers stopped by the lease", LONG, || {
        Ok(c.trainers(&victim)?.is_empty().then_some(()))
    })?;
    let fenced = t0.elapsed();
    c.wait_node(&victim, "victim Lost", |n| n["availability"] == "Lost")?;
    let detection = t0.elapsed();
    c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let recovery = t0.elapsed();
    ensure!(
        fenced < detection,
        "workers fenced ({fenced:?}) before Lost ({detection:?})"
    );
    settle(Duration::from_secs(2));
    c.heal(&victim)?;
    c.wait_node(&victim, "healed node Ready", |n| {
        n["availability"] == "Ready"
    })?;
    settle(Duration::from_secs(2));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 2 && restarts(&job) == 1,
        "one restart: {job}"
    );
    ensure!(!attempt_nodes(&job, 2)?.contains(&victim));
    only_attempt_runs(&c, 2, 2)?;
    check_fenced(&c, &job, 2)?;
    let lost = check_resume(&c, &job, 2, Resume::Newest)?;
    Row {
        order: 2,
        scenario: "long partition (one agent, > `lost_after`)".into(),
        fault: "bridge port of rank 1 down for ~7 s, then up".into(),
        detection: Some(detection),
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: format!(
            "isolated workers stopped by their agent's lease after {:.1} s, before `Lost`; after the heal only attempt 2 runs and no checkpoint of attempt 1 completed after attempt 2 started",
            fenced.as_secs_f64()
        ),
    }
    .record()
}

/// The fast settings with room for a partition the cluster should ride out: past
/// `unreachable_after` (1 s), well inside the lease (5 s) and `lost_after` (6 s).
/// FAST_LIVENESS's 2 s lease leaves none: a 1.5 s cut restarted the job there,
/// because TCP's retransmission backoff held the first heartbeat after the heal
/// until 2.25 s after the cut (the run that showed it), past the lease.
const PARTITION_LIVENESS: &str = r#"
[liveness]
heartbeat_interval = "200ms"
unreachable_after = "1s"
lost_after = "6s"
agent_lease = "5s"
"#;

/// Longer than `unreachable_after`, so the coordinator notices; far shorter
/// than the lease and `lost_after` of [`PARTITION_LIVENESS`].
const SHORT_CUT: Duration = Duration::from_secs(2);

#[test]
fn short_partition_makes_the_node_unreachable_not_lost_and_restarts_nothing() -> Result<()> {
    let Some(c) = NetCluster::builder(PARTITION_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    // The cut and TCP's retransmission backoff after it can outlast the job's 3 s hang_timeout:
    // silence from an Unreachable node is not counted as a hang.
    let id = c.submit(&spec_in(c.dir.path(), 2, 0, "", "")?)?;
    let job = running(&c, &id, 2)?;
    let victim = node_of_rank(&job, 1)?;
    let before = c.trainers(&victim)?;
    let logged = availability_log(&c, &victim).len();
    c.cut(&victim)?;
    settle(SHORT_CUT);
    c.heal(&victim)?;
    c.wait_node(&victim, "healed node Ready", |n| {
        n["availability"] == "Ready"
    })?;
    settle(Duration::from_secs(3));
    let moved: Vec<String> = availability_log(&c, &victim).split_off(logged);
    // Without Unreachable the cut went unnoticed, and "not Lost" would prove nothing.
    ensure!(
        moved.iter().any(|a| a == "Unreachable"),
        "the coordinator never marked {victim} Unreachable during a {SHORT_CUT:?} cut: {moved:?}"
    );
    ensure!(
        !moved.iter().any(|a| a == "Lost"),
        "{victim} was falsely Lost: {moved:?}"
    );
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 1 && restarts(&job) == 0,
        "nothing restarted: {job}\n--- coordinator log:\n{}\n--- agent {victim} log:\n{}",
        c.coordinator_log(),
        std::fs::read_to_string(c.dir.path().join(format!("agent-{victim}.log")))
            .unwrap_or_default()
    );
    ensure!(c.trainers(&victim)? == before, "the same worker process");
    let step = |j: &Value| j["workers"][1]["progress_step"].as_u64().unwrap_or(0);
    let s1 = step(&job);
    let job = c.wait_job(&id, "progress continues", |j| step(j) > s1)?;
    ensure!(workers_running(&job, 2));
    Row {
        order: 3,
        scenario: "short partition (> `unreachable_after`, < the lease and `lost_after`)".into(),
        fault: format!(
            "bridge port of rank 1 down for {:.1} s (`unreachable_after` 1 s, lease 5 s, `lost_after` 6 s; the job's `hang_timeout` 3 s)",
            SHORT_CUT.as_secs_f64()
        ),
        outcome: format!(
            "node went {}, never Lost; nothing restarted: same attempt, same worker processes, progress continues",
            moved.join(" -> ")
        ),
        ..Row::default()
    }
    .record()
}

#[test]
fn partition_of_the_checkpoint_writer_stops_its_checkpoints_after_the_lease() -> Result<()> {
    let Some(c) = NetCluster::builder(FAST_LIVENESS).hosts(3).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 1, "", "")?)?;
    let job = running(&c, &id, 2)?;
    let writer = node_of_rank(&job, 0)?;
    let known = known_checkpoint(&job);
    let t0 = now();
    c.cut(&writer)?;
    wait_for("isolated writer stopped by the lease", LONG, || {
        Ok(c.trainers(&writer)?.is_empty().then_some(()))
    })?;
    let fenced = t0.elapsed();
    c.wait_node(&writer, "writer Lost", |n| n["availability"] == "Lost")?;
    let detection = t0.elapsed();
    c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let recovery = t0.elapsed();
    // Leave it isolated a while: an unfenced writer would keep checkpointing.
    settle(Duration::from_secs(2));
    let job = c.job(&id)?;
    check_fenced(&c, &job, 2)?;
    // The relaunch's scan finds what the cut-off writer completed and never reported.
    let lost = check_resume(&c, &job, 2, Resume::Newest)?;
    ensure!(
        unreported(&c, &job, 2)? == 0,
        "a newer complete checkpoint was left behind"
    );
    let resumed = attempts(&job)[1]["resumed_from_step"].as_u64().unwrap_or(0);
    let unknown = checkpoints(&c.dir.path().join("ckpt"))?
        .iter()
        .filter(|k| k.step > known && k.step <= resumed && k.completed_at_ms.is_some())
        .count();
    ensure!(attempt(&job) == 2 && restarts(&job) == 1, "{job}");
    c.heal(&writer)?;
    Row {
        order: 7,
        scenario: "partition isolates node rank 0 (the checkpoint writer)".into(),
        fault: "bridge port of rank 0 down".into(),
        detection: Some(detection),
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: format!(
            "writer stopped by its lease after {:.1} s; no checkpoint of attempt 1 completed after attempt 2 started; the relaunch's scan found the newest complete checkpoint on disk (step {resumed}) and attempt 2 resumed from it: {unknown} of the checkpoints newer than the last one reported were saved while cut off (a checkpoint every 0.4 s here)",
            fenced.as_secs_f64()
        ),
    }
    .record()
}
