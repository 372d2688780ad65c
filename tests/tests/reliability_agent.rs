//! Fault injection across real hosts, part 4: the agent itself fails or is replaced. Every worker
//! runs under a per-attempt shim that outlives its agent (agent/src/shim): an agent restarted
//! within the lease re-adopts its workers and nothing restarts; an agent that stays dead has its
//! workers fenced by their shims when the lease runs out, before the coordinator relaunches the
//! job elsewhere; a dead shim takes its worker with it. Rows 8 and 15 to 17 of
//! docs/reliability.md (scripts/reliability.sh).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use vigil_tests::jobs::{attempt, spec_in, state, workers_running};
use vigil_tests::netns::NetCluster;
use vigil_tests::report::Row;
use vigil_tests::scenario::{
    Resume, check_fenced, check_resume, known_checkpoint, node_of_rank, only_attempt_runs,
    restarts, running, running_attempts, settle,
};
use vigil_tests::{FAST_LIVENESS, LONG, now, wait_for};

/// Liveness with room for an agent to start again on a loaded 2-core machine: the lease (5 s)
/// is what a restarted agent must beat; `lost_after` (6 s) is longer, as always.
const RESTART_LIVENESS: &str = r#"
[liveness]
heartbeat_interval = "200ms"
unreachable_after = "1s"
lost_after = "6s"
agent_lease = "5s"
"#;

/// The progress step node rank `rank` reports.
fn step(job: &Value, rank: usize) -> u64 {
    job["workers"][rank]["progress_step"].as_u64().unwrap_or(0)
}

/// The log of the worker of node rank `rank` of attempt 1 on host `node`.
fn worker_log(c: &NetCluster, node: &str, id: &str, rank: usize) -> PathBuf {
    c.dir
        .path()
        .join(format!("agent-{node}-state/jobs/{id}/1/rank{rank}.log"))
}

fn agent_log(c: &NetCluster, node: &str) -> String {
    std::fs::read_to_string(c.dir.path().join(format!("agent-{node}.log"))).unwrap_or_default()
}

/// Waits until every worker of the job reports a step past what it reported in `before`.
fn progress_past(c: &NetCluster, id: &str, before: &Value, ranks: usize) -> Result<Value> {
    c.wait_job(id, "every worker makes progress", |j| {
        (0..ranks).all(|r| step(j, r) > step(before, r) + 5)
    })
}

#[test]
fn an_agent_killed_and_restarted_within_the_lease_re_adopts_its_worker() -> Result<()> {
    let Some(mut c) = NetCluster::builder(RESTART_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 0, "", "")?)?;
    let job = running(&c, &id, 2)?;
    // The checkpoint writer: its checkpoints must go on being reported, too.
    let node = node_of_rank(&job, 0)?;
    let (trainers, shims) = (c.trainers(&node)?, c.shims(&node)?);
    ensure!(
        trainers.len() == 1 && shims.len() == 1,
        "{trainers:?} {shims:?}"
    );
    let log = worker_log(&c, &node, &id, 0);
    let log_before = std::fs::metadata(&log)?.len();
    let t0 = now();
    c.kill9_agent(&node)?;
    ensure!(
        c.trainers(&node)? == trainers,
        "the worker outlives its agent"
    );
    c.start_agent(&node)?;
    let before = c.job(&id)?;
    let job = progress_past(&c, &id, &before, 2)?;
    let back = t0.elapsed();
    settle(Duration::from_secs(2));
    let job2 = c.job(&id)?;
    ensure!(
        attempt(&job2) == 1 && restarts(&job2) == 0,
        "nothing restarted: {job2}\n--- agent log:\n{}",
        agent_log(&c, &node)
    );
    ensure!(c.trainers(&node)? == trainers, "the same worker process");
    ensure!(c.shims(&node)? == shims, "the same shim");
    ensure!(step(&job2, 0) > step(&job, 0), "progress goes on");
    let log_after = std::fs::metadata(&log)?.len();
    ensure!(log_after > log_before, "the worker's log goes on");
    let job3 = c.wait_job(&id, "a checkpoint reported after the restart", |j| {
        known_checkpoint(j) > known_checkpoint(&job2)
    })?;
    ensure!(attempt(&job3) == 1 && restarts(&job3) == 0);
    ensure!(
        agent_log(&c, &node).contains("re-adopted worker of job"),
        "the new agent says it re-adopted the worker"
    );
    Row {
        order: 8,
        scenario: "agent restarted while its workers run".into(),
        fault: "kill -9 of the agent of node rank 0 (not its workers), then start it again (lease 5 s)".into(),
        restarts: 0,
        lost_steps: Some(0),
        outcome: format!(
            "the new agent re-adopted the checkpoint writer's worker from its shim and reported it at registration: same attempt, same worker and shim processes; progress, log and checkpoint reports continue (progress reported again {:.2} s after the kill)",
            back.as_secs_f64()
        ),
        ..Row::default()
    }
    .record()
}

#[test]
fn an_agent_killed_for_good_has_its_worker_fenced_by_the_shim_before_the_relaunch() -> Result<()> {
    let Some(mut c) = NetCluster::builder(FAST_LIVENESS).hosts(3).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 1, "", "")?)?;
    let job = running(&c, &id, 2)?;
    // The checkpoint writer: were it left running, two attempts would write one directory.
    let victim = node_of_rank(&job, 0)?;
    ensure!(c.trainers(&victim)?.len() == 1);
    let known = known_checkpoint(&job);
    let t0 = now();
    c.kill9_agent(&victim)?;
    wait_for("the shim fences its worker (lease 2 s)", LONG, || {
        Ok((c.trainers(&victim)?.is_empty() && c.shims(&victim)?.is_empty()).then_some(()))
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
        "fenced ({fenced:?}) before the node was Lost ({detection:?}) and the job relaunched"
    );
    let status = c
        .dir
        .path()
        .join(format!("agent-{victim}-state/jobs/{id}/1/shim-status.json"));
    let status = std::fs::read_to_string(&status).context("the shim's status")?;
    ensure!(
        status.contains("lease expired: no live agent renewed it"),
        "{status}"
    );
    settle(Duration::from_secs(2));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 2 && restarts(&job) == 1,
        "one restart: {job}"
    );
    only_attempt_runs(&c, 2, 2)?;
    check_fenced(&c, &job, 2)?;
    let lost = check_resume(&c, &job, 2, Resume::AtLeast(known))?;
    Row {
        order: 15,
        scenario: "agent dies and stays dead".into(),
        fault: "kill -9 of the agent of node rank 0 (the checkpoint writer), not restarted".into(),
        detection: Some(detection),
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: format!(
            "with no agent left, the worker's shim stopped it when the lease ran out ({:.1} s after the kill), before the node was Lost; job relaunched once on the spare; no checkpoint of attempt 1 completed after attempt 2 started",
            fenced.as_secs_f64()
        ),
    }
    .record()
}

#[test]
fn a_rolling_upgrade_of_every_agent_restarts_nothing() -> Result<()> {
    let Some(mut c) = NetCluster::builder(RESTART_LIVENESS).hosts(3).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 3, 0, "", "")?)?;
    let job = running(&c, &id, 3)?;
    let nodes: Vec<String> = (0..3)
        .map(|r| node_of_rank(&job, r))
        .collect::<Result<_>>()?;
    let trainers: Vec<Vec<u32>> = nodes.iter().map(|n| c.trainers(n)).collect::<Result<_>>()?;
    let t0 = now();
    // Twice: from the build's binary to an installed one, then that one replaced in place
    // while the agents and shims started from it still run (the old inode stays theirs).
    for round in 0..2 {
        c.install_agent_binary()?;
        for node in &nodes {
            let before = c.job(&id)?;
            c.terminate_agent(node)?;
            c.start_agent(node)?;
            c.wait_node(node, "the upgraded agent Ready", |n| {
                n["availability"] == "Ready"
            })?;
            progress_past(&c, &id, &before, 3)
                .with_context(|| format!("round {round}, after {node}"))?;
        }
    }
    let took = t0.elapsed();
    settle(Duration::from_secs(2));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 1 && restarts(&job) == 0,
        "nothing restarted: {job}"
    );
    for (node, before) in nodes.iter().zip(&trainers) {
        ensure!(
            &c.trainers(node)? == before,
            "the same worker on {node} throughout"
        );
        let log = agent_log(&c, node);
        ensure!(
            log.matches("re-adopted worker of job").count() == 2,
            "{node}'s agent re-adopted its worker at each of its two restarts"
        );
    }
    Row {
        order: 16,
        scenario: "rolling upgrade of every agent".into(),
        fault: "each agent of a running 3-node job in turn: binary replaced, SIGTERM, started again; twice".into(),
        restarts: 0,
        lost_steps: Some(0),
        outcome: format!(
            "6 agent restarts in {:.1} s, each waiting for its node to be Ready and every worker to progress: nothing restarted, same worker processes throughout",
            took.as_secs_f64()
        ),
        ..Row::default()
    }
    .record()
}

#[test]
fn a_killed_shim_takes_its_worker_down_and_the_job_restarts_once() -> Result<()> {
    let Some(c) = NetCluster::builder(FAST_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 0, "", "")?)?;
    let job = running(&c, &id, 2)?;
    let node = node_of_rank(&job, 1)?;
    let shims = c.shims(&node)?;
    let trainers = c.trainers(&node)?;
    ensure!(shims.len() == 1 && trainers.len() == 1);
    let t0 = now();
    vigil_tests::netns::signal(shims[0], "KILL")?;
    // That very process: attempt 2 may start on the same node at once.
    wait_for("the guard kills the worker", LONG, || {
        Ok((!c.trainers(&node)?.contains(&trainers[0])).then_some(()))
    })?;
    let gone = t0.elapsed();
    let job = c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let recovery = t0.elapsed();
    let reason = job["attempts"][0]["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains("its shim (pid") && reason.contains("guard killed the worker"),
        "{reason}"
    );
    settle(Duration::from_secs(2));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 2 && restarts(&job) == 1,
        "one restart: {job}"
    );
    only_attempt_runs(&c, 2, 2)?;
    let lost = check_resume(&c, &job, 2, Resume::Newest)?;
    Row {
        order: 17,
        scenario: "a worker's shim dies".into(),
        fault: "kill -9 of the shim of node rank 1's worker".into(),
        detection: Some(gone),
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: "the shim's guard killed the worker's process group at once; the agent reported the worker failed (\"its shim died\"); the job restarted once from the newest checkpoint".into(),
    }
    .record()
}

#[test]
fn a_job_cancelled_while_an_agent_is_down_is_stopped_by_the_returning_agent() -> Result<()> {
    let Some(mut c) = NetCluster::builder(RESTART_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 0, "", "")?)?;
    let job = running(&c, &id, 2)?;
    let node = node_of_rank(&job, 1)?;
    ensure!(c.trainers(&node)?.len() == 1);
    let t0 = now();
    c.kill9_agent(&node)?;
    let out = c.ctl(&["job", "cancel", &id])?;
    ensure!(out.code == Some(0), "cancel: {out:?}");
    c.start_agent(&node)?;
    // The new agent re-adopts the worker and reports it; the coordinator, which no longer wants
    // it, stops it — well before the lease would have.
    wait_for("the re-adopted worker stopped", LONG, || {
        Ok(c.trainers(&node)?.is_empty().then_some(()))
    })?;
    let stopped = t0.elapsed();
    let job = c.wait_job(&id, "job Cancelled", |j| state(j) == "Cancelled")?;
    let status = c
        .dir
        .path()
        .join(format!("agent-{node}-state/jobs/{id}/1/shim-status.json"));
    let status = std::fs::read_to_string(&status).context("the shim's status")?;
    ensure!(
        !status.contains("lease expired"),
        "stopped on the coordinator's order, not by the lease: {status}"
    );
    ensure!(
        agent_log(&c, &node).contains("re-adopted worker of job"),
        "the new agent re-adopted the worker first"
    );
    ensure!(restarts(&job) == 0, "{job}");
    ensure!(running_attempts(&c)?.is_empty(), "nothing runs");
    Row {
        order: 18,
        scenario: "job cancelled while one of its agents is down".into(),
        fault: "kill -9 of the agent of node rank 1, `clusterctl job cancel`, then the agent started again (lease 5 s)".into(),
        restarts: 0,
        outcome: format!(
            "the returning agent re-adopted the worker and reported it; the coordinator, which no longer wanted it, had it stopped {:.1} s after the kill, on its order rather than by the lease; job Cancelled, nothing left running",
            stopped.as_secs_f64()
        ),
        ..Row::default()
    }
    .record()
}
