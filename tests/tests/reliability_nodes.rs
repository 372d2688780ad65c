//! Fault injection across real hosts, part 3: bad nodes and bad checkpoints
//! (correlated failures, a bad replacement, no healthy node left, a partial
//! newest checkpoint). See tests/tests/reliability.rs for the method.

use std::time::Duration;

use anyhow::{Result, ensure};
use vigil_tests::jobs::{attempt, spec_in, state, workers_running};
use vigil_tests::netns::NetCluster;
use vigil_tests::report::Row;
use vigil_tests::scenario::{
    Resume, attempt_nodes, check_resume, node_of_rank, only_attempt_runs, restarts, running,
    running_attempts, settle, unix_ms, unreported,
};
use vigil_tests::{FAST_LIVENESS, now};

const XID_79: &str = "gpu=3 xid=79\n";

#[test]
fn two_nodes_failing_within_a_second_cause_one_restart() -> Result<()> {
    let Some(mut c) = NetCluster::builder(FAST_LIVENESS).hosts(4).start()? else {
        return Ok(());
    };
    // A 1 s backoff gathers failures that arrive together into one restart.
    let spec = spec_in(c.dir.path(), 2, 2, "", "")?.replace("backoff = \"0s\"", "backoff = \"1s\"");
    let id = c.submit(&spec)?;
    let job = running(&c, &id, 2)?;
    let (a, b) = (node_of_rank(&job, 0)?, node_of_rank(&job, 1)?);
    let t0 = now();
    c.kill_host(&a)?;
    settle(Duration::from_millis(500));
    c.kill_host(&b)?;
    c.wait_job(&id, "attempt 1 failed", |j| {
        j["job"]["attempt"].as_u64() >= Some(2)
    })?;
    let detection = t0.elapsed();
    c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let recovery = t0.elapsed();
    settle(Duration::from_secs(3));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 2 && restarts(&job) == 1,
        "one restart: {job}"
    );
    let nodes = attempt_nodes(&job, 2)?;
    ensure!(!nodes.contains(&a) && !nodes.contains(&b), "{nodes:?}");
    // The relaunch scans the checkpoint directory: a save in the writer's last moment that its
    // agent never reported is found too.
    let lost = check_resume(&c, &job, 2, Resume::Newest)?;
    ensure!(
        unreported(&c, &job, 2)? == 0,
        "a newer complete checkpoint was left behind"
    );
    Row {
        order: 9,
        scenario: "two nodes of one job fail within a second".into(),
        fault: "kill -9 of both hosts of a 2-node job, 0.5 s apart".into(),
        detection: Some(detection),
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: "one restart, on the two spares; the checkpoint writer died too; it resumed from the newest complete checkpoint on disk, found by the relaunch's scan (reported or not)".into(),
    }
    .record()
}

#[test]
fn a_bad_replacement_is_cordoned_too_and_the_job_takes_the_next_node() -> Result<()> {
    // Two automatic cordons of four nodes within seconds: past the cordon breaker's default cap
    // (one node in a cluster this small), which tests/tests/breaker.rs covers; not here.
    let config = format!("{FAST_LIVENESS}\n[cordon_breaker]\nmax_fraction = 1.0\n");
    let Some(c) = NetCluster::builder(&config).hosts(4).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 1, "", "")?)?;
    let job = running(&c, &id, 2)?;
    let first = node_of_rank(&job, 1)?;
    c.set_faults(&first, XID_79)?;
    let job = c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let replacement = attempt_nodes(&job, 2)?
        .into_iter()
        .find(|n| !attempt_nodes(&job, 1).unwrap_or_default().contains(n))
        .ok_or_else(|| anyhow::anyhow!("no replacement node: {job}"))?;
    let t0 = now();
    c.set_faults(&replacement, XID_79)?;
    c.wait_node(&replacement, "replacement cordoned", |n| {
        n["cordon"]["reason"].is_string()
    })?;
    let detection = t0.elapsed();
    c.wait_job(&id, "attempt 3 running", |j| {
        attempt(j) == 3 && workers_running(j, 2)
    })?;
    let recovery = t0.elapsed();
    settle(Duration::from_secs(3));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 3 && restarts(&job) == 2,
        "no restart storm: {job}"
    );
    let nodes = attempt_nodes(&job, 3)?;
    ensure!(
        !nodes.contains(&first) && !nodes.contains(&replacement),
        "{nodes:?}"
    );
    for n in &nodes {
        ensure!(c.node(n)?["cordon"].is_null(), "{n} is healthy");
    }
    only_attempt_runs(&c, 3, 2)?;
    let lost = check_resume(&c, &job, 3, Resume::Newest)?;
    Row {
        order: 10,
        scenario: "the replacement node is bad too".into(),
        fault: "XID 79 on rank 1, then XID 79 on the spare that replaced it as soon as it runs"
            .into(),
        detection: Some(detection),
        recovery: Some(recovery),
        restarts: 2,
        lost_steps: Some(lost),
        outcome: "both bad nodes cordoned; attempt 3 on the next healthy node; no further restarts"
            .into(),
    }
    .record()
}

#[test]
fn with_no_healthy_node_the_job_waits_pending_and_resumes_on_uncordon() -> Result<()> {
    let Some(c) = NetCluster::builder(FAST_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 0, "", "")?)?;
    let job = running(&c, &id, 2)?;
    let victim = node_of_rank(&job, 1)?;
    let t0 = now();
    c.set_faults(&victim, XID_79)?;
    let job = c.wait_job(&id, "Pending", |j| state(j) == "Pending")?;
    let detection = t0.elapsed();
    let reason = job["job"]["reason"].as_str().unwrap_or("").to_owned();
    ensure!(
        reason.contains("waiting for 2 eligible nodes") && reason.contains("1 available"),
        "{reason}"
    );
    ensure!(
        running_attempts(&c)?.is_empty(),
        "nothing runs while Pending"
    );
    settle(Duration::from_secs(2));
    ensure!(state(&c.job(&id)?) == "Pending");
    c.set_faults(&victim, "gpu=3 clear\n")?;
    let out = c.ctl(&["uncordon", &victim, "--force"])?;
    ensure!(out.success(), "{}", out.stderr);
    let t1 = now();
    c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let recovery = t1.elapsed();
    let job = c.job(&id)?;
    ensure!(restarts(&job) == 1, "{job}");
    let lost = check_resume(&c, &job, 2, Resume::Newest)?;
    Row {
        order: 11,
        scenario: "no healthy node left".into(),
        fault: "XID 79 on one node of a 2-node job in a 2-node cluster; later `uncordon --force`".into(),
        detection: Some(detection),
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: format!(
            "job `Pending`: \"{reason}\"; resumed from its checkpoint once the node was uncordoned (recovery measured from the uncordon)"
        ),
    }
    .record()
}

#[test]
fn a_partial_newest_checkpoint_is_skipped_for_the_previous_complete_one() -> Result<()> {
    let Some(c) = NetCluster::builder(FAST_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(
        c.dir.path(),
        2,
        0,
        ", FAKE_PARTIAL_AT_STEP = \"75\"",
        "",
    )?)?;
    let job = c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let running_at = unix_ms();
    let partial = c.dir.path().join("ckpt/step_00000075");
    ensure!(partial.join("model.bin").exists() && !partial.join("COMPLETE").exists());
    // The fault's time: when the trainer wrote the partial checkpoint, just before it crashed.
    let fault_at = std::fs::metadata(partial.join("model.bin"))?
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let fault_at = u64::try_from(fault_at)?;
    let failed_at = job["attempts"][0]["ended_at_unix_ms"].as_u64().unwrap_or(0);
    ensure!(job["attempts"][1]["resumed_from_step"] == 70, "{job}");
    let lost = check_resume(&c, &job, 2, Resume::Newest)?;
    settle(Duration::from_secs(1));
    ensure!(attempt(&c.job(&id)?) == 2);
    Row {
        order: 12,
        scenario: "newest checkpoint partial".into(),
        fault: "rank 0 writes checkpoint 75 without its COMPLETE marker and crashes".into(),
        detection: Some(Duration::from_millis(failed_at.saturating_sub(fault_at))),
        recovery: Some(Duration::from_millis(running_at.saturating_sub(fault_at))),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: "attempt 2 resumed from step 70, the previous complete checkpoint; the trainer never refused its resume path (exit 3)".into(),
    }
    .record()
}
