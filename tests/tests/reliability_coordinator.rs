//! Fault injection across real hosts, part 2: the coordinator and the
//! network to it fail (kill -9 mid-recovery, SIGSTOP, a slow and stalling
//! network, a full state dir). See tests/tests/reliability.rs for the method.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use vigil_tests::jobs::{attempt, spec_in, state, workers_running};
use vigil_tests::netns::NetCluster;
use vigil_tests::report::Row;
use vigil_tests::scenario::{
    Resume, availability_log, check_resume, known_checkpoint, only_attempt_runs, restarts, running,
    running_attempts, settle, unix_ms,
};
use vigil_tests::{FAST_LIVENESS, LONG, now, wait_for};

fn progress(job: &Value) -> u64 {
    job["job"]["progress_step"].as_u64().unwrap_or(0)
}

#[test]
fn full_state_dir_refuses_new_work_keeps_running_jobs_and_recovers() -> Result<()> {
    let Some(mut c) = NetCluster::builder(FAST_LIVENESS)
        .hosts(2)
        .state_tmpfs_kib(64 * 1024)
        .start()?
    else {
        return Ok(());
    };
    let one = spec_in(c.dir.path(), 1, 0, "", "")?;
    let id = c.submit(&one)?;
    let job = running(&c, &id, 1)?;
    let pid = job["workers"][0]["pid"].as_u64().context("pid")?;
    let filled = c.fill_state_dir()?;
    println!("filled the state dir with {filled} bytes");
    let t0 = now();
    let path = vigil_tests::write_file(c.dir.path(), "second.toml", &one)?;
    // The store's own files may still have room in pages already allocated: a change that
    // fits there is really saved, and rightly accepted. Submit jobs that cannot be placed
    // while the first one runs (both nodes: they wait Pending, holding nothing) until one
    // cannot be saved: that one must be refused.
    let unplaceable = spec_in(c.dir.path(), 2, 0, "", "")?;
    let filler = vigil_tests::write_file(c.dir.path(), "filler.toml", &unplaceable)?;
    let mut accepted = 0;
    let refused = loop {
        let out = c.ctl(&["job", "submit", &filler.to_string_lossy()])?;
        if !out.success() {
            break out;
        }
        accepted += 1;
        ensure!(
            accepted < 200,
            "200 jobs saved on a full disk: {}",
            out.stdout
        );
    };
    let refusal = t0.elapsed();
    println!(
        "submit on a full disk: refused after {accepted} saved in the slack; code {:?}\n{}{}",
        refused.code, refused.stdout, refused.stderr
    );
    ensure!(
        refused.stderr.contains("no space left"),
        "a new job is refused on a full disk, saying why: {}",
        refused.stderr
    );
    let again = c.ctl(&["job", "submit", &path.to_string_lossy()])?;
    ensure!(
        !again.success(),
        "and so is the next one, until space returns"
    );
    let s0 = progress(&c.job(&id)?);
    // Longer than the lease and lost_after: heartbeats, acks and progress must not need the disk.
    settle(Duration::from_secs(6));
    for (name, n) in c.nodes()? {
        ensure!(n["availability"] == "Ready", "{name} stays Ready: {n}");
    }
    let job = c.wait_job(&id, "the running job keeps progressing", |j| {
        progress(j) > s0 + 100
    })?;
    ensure!(
        attempt(&job) == 1 && job["workers"][0]["pid"].as_u64() == Some(pid),
        "{job}"
    );
    c.free_state_dir()?;
    let t1 = now();
    let id2 = wait_for("a new job accepted once space returns", LONG, || {
        let out = c.ctl(&["-o", "json", "job", "submit", &path.to_string_lossy()])?;
        out.success().then(|| out.json()).transpose()
    })?;
    let recovered = t1.elapsed();
    let id2 = id2["job"]["id"].as_str().context("id")?.to_owned();
    c.wait_job(&id2, "second job running", |j| workers_running(j, 1))?;
    let job = c.job(&id)?;
    ensure!(attempt(&job) == 1 && restarts(&job) == 0, "{job}");
    ensure!(state(&job) == "Running");
    // What was kept only in memory while the disk was full is on disk again.
    c.kill9_coordinator();
    c.start_coordinator()?;
    for j in [&id, &id2] {
        let job = c.wait_job(j, "running after a restart", |j| workers_running(j, 1))?;
        ensure!(attempt(&job) == 1, "{job}");
    }
    let why = refused.stderr.trim();
    let why = why
        .split_once("): ")
        .map_or(why, |(_, w)| w)
        .replace(&c.data_dir().display().to_string(), "DATA_DIR");
    Row {
        order: 14,
        scenario: "coordinator state dir full".into(),
        fault: "the tmpfs holding the coordinator's data dir filled to the last byte, later freed".into(),
        detection: Some(refusal),
        recovery: Some(recovered),
        outcome: format!(
            "new job refused (gRPC ResourceExhausted): \"{why}\"; the running job kept its worker and progress; new jobs accepted again once space returned (the store is reopened and the state written again); both jobs survive a kill -9 after that"
        ),
        ..Row::default()
    }
    .record()
}

/// A job whose rank-R worker of attempt A crashes when `dir/ctl-R-A` says `crash`.
fn controllable(c: &NetCluster, nodes: u32, backoff: &str) -> Result<String> {
    let control = c.dir.path().join("ctl-{rank}-{attempt}");
    let env = format!(", FAKE_CONTROL_FILE = \"{}\"", control.display());
    Ok(spec_in(c.dir.path(), nodes, 0, &env, "")?
        .replace("backoff = \"0s\"", &format!("backoff = \"{backoff}\"")))
}

fn pids(job: &Value) -> Vec<u64> {
    job["workers"]
        .as_array()
        .map(|w| w.iter().filter_map(|w| w["pid"].as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn coordinator_killed_between_stop_and_relaunch_recovers_exactly_once() -> Result<()> {
    let Some(mut c) = NetCluster::builder(FAST_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    // A 4 s backoff holds the job in Restarting, workers stopped, long enough to kill -9 there.
    let id = c.submit(&controllable(&c, 2, "4s")?)?;
    running(&c, &id, 2)?;
    let t0 = now();
    let fault_ms = unix_ms();
    vigil_tests::write_file(c.dir.path(), "ctl-1-1", "crash")?;
    let job = c.wait_job(&id, "attempt 1 stopped on every node", |j| {
        state(j) == "Restarting"
            && j["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["kind"] == "stopped"))
    })?;
    let detection = job["attempts"][0]["ended_at_unix_ms"]
        .as_u64()
        .map(|t| Duration::from_millis(t.saturating_sub(fault_ms)));
    ensure!(running_attempts(&c)?.is_empty(), "every worker stopped");
    c.kill9_coordinator();
    c.start_coordinator()?;
    c.wait_job(&id, "attempt 2 running", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let recovery = t0.elapsed();
    settle(Duration::from_secs(5));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 2
            && restarts(&job) == 1
            && job["attempts"].as_array().map(Vec::len) == Some(2),
        "recovered exactly once: {job}"
    );
    only_attempt_runs(&c, 2, 2)?;
    let lost = check_resume(&c, &job, 2, Resume::Newest)?;
    Row {
        order: 4,
        scenario: "coordinator kill -9 mid-recovery".into(),
        fault: "worker crash, then kill -9 of the coordinator after the stop, during a 4 s restart backoff; restarted at once".into(),
        detection,
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: "the restarted coordinator finished the recovery once: attempt 2 only, two workers, from the newest checkpoint (recovery includes the 4 s backoff)".into(),
    }
    .record()
}

#[test]
fn coordinator_paused_shorter_than_the_lease_restarts_nothing() -> Result<()> {
    let Some(c) = NetCluster::builder(FAST_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    let id = c.submit(&spec_in(c.dir.path(), 2, 0, "", "")?)?;
    let before = pids(&running(&c, &id, 2)?);
    c.pause_coordinator()?;
    settle(Duration::from_millis(1000));
    c.resume_coordinator()?;
    settle(Duration::from_secs(3));
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 1 && restarts(&job) == 0 && workers_running(&job, 2),
        "{job}"
    );
    ensure!(pids(&job) == before, "the same workers");
    let s = progress(&job);
    c.wait_job(&id, "progress continues", |j| progress(j) > s)?;
    Row {
        order: 5,
        scenario: "coordinator paused (SIGSTOP) shorter than the lease".into(),
        fault: "SIGSTOP of the coordinator for 1 s (lease 2 s), then SIGCONT".into(),
        outcome: "nothing restarted: same attempt, same worker processes, progress continues"
            .into(),
        ..Row::default()
    }
    .record()
}

#[test]
fn coordinator_paused_past_the_lease_fences_every_job_and_resumes_each_once() -> Result<()> {
    let Some(c) = NetCluster::builder(FAST_LIVENESS).hosts(2).start()? else {
        return Ok(());
    };
    let jobs = [
        c.submit(&spec_in(c.dir.path(), 1, 0, "", "")?)?,
        c.submit(&spec_in(&c.dir.path().join("second"), 1, 0, "", "")?)?,
    ];
    let mut known = Vec::new();
    for id in &jobs {
        known.push(known_checkpoint(&running(&c, id, 1)?));
    }
    let t0 = now();
    c.pause_coordinator()?;
    let fenced = wait_for("every agent stops its workers by itself", LONG, || {
        Ok(running_attempts(&c)?.is_empty().then(|| t0.elapsed()))
    });
    // Resume whatever happened, so a failure leaves no stopped process behind.
    let pause = Duration::from_secs(4).saturating_sub(t0.elapsed());
    settle(pause);
    c.resume_coordinator()?;
    let resumed = now();
    let fenced = fenced?;
    for id in &jobs {
        c.wait_job(id, "attempt 2 running", |j| {
            attempt(j) == 2 && workers_running(j, 1)
        })
        .with_context(|| {
            format!(
                "job {:?}\ncoordinator log:\n{}\nagent node-1 log:\n{}",
                c.job(id).map(|j| j.to_string()),
                c.coordinator_log(),
                std::fs::read_to_string(c.dir.path().join("agent-node-1.log")).unwrap_or_default()
            )
        })?;
    }
    let recovery = resumed.elapsed();
    settle(Duration::from_secs(3));
    let mut lost = 0;
    for id in &jobs {
        let job = c.job(id)?;
        ensure!(
            attempt(&job) == 2 && restarts(&job) == 1,
            "resumed once: {job}"
        );
        if id == &jobs[0] {
            lost = check_resume(&c, &job, 2, Resume::AtLeast(known[0]))?;
        }
    }
    ensure!(running_attempts(&c)?.len() == 2);
    Row {
        order: 6,
        scenario: "coordinator paused (SIGSTOP) longer than the lease".into(),
        fault: "SIGSTOP of the coordinator for 4 s (lease 2 s, `lost_after` 3 s), then SIGCONT; two 1-node jobs".into(),
        detection: Some(fenced),
        recovery: Some(recovery),
        restarts: 1,
        lost_steps: Some(lost),
        outcome: "every agent stopped its workers when its lease ran out (detection column); after SIGCONT each job restarted exactly once from its checkpoint (recovery measured from SIGCONT)".into(),
    }
    .record()
}

/// Past the default `unreachable_after` (3 s), so every node goes Unreachable in
/// each stall, yet inside the default lease (8 s) and `lost_after` (10 s).
const STALL: Duration = Duration::from_secs(5);
const STALLS: usize = 3;

#[test]
fn latency_and_stalls_on_every_connection_cause_no_false_lost_and_no_restart() -> Result<()> {
    // The default liveness settings (heartbeat 1 s, unreachable 3 s, lost 10 s, lease 8 s).
    let Some(c) = NetCluster::builder("").hosts(2).proxy().start()? else {
        return Ok(());
    };
    c.set_proxy("latency_ms=200\n")?;
    // Each stall outlasts the job's 3 s hang_timeout: silence from an Unreachable node is not
    // counted as a hang (it was, before: every stall restarted the job).
    let id = c.submit(&spec_in(c.dir.path(), 2, 0, "", "")?)?;
    let before = pids(&running(&c, &id, 2)?);
    let names: Vec<String> = c.nodes()?.into_keys().collect();
    let logged: Vec<usize> = names
        .iter()
        .map(|n| availability_log(&c, n).len())
        .collect();
    let mut not_ready = 0;
    let mut polled = BTreeSet::new();
    for _ in 0..STALLS {
        for (settings, d) in [
            ("latency_ms=200\nstall=1\n", STALL),
            ("latency_ms=200\n", Duration::from_secs(2)),
        ] {
            c.set_proxy(settings)?;
            let t = now();
            while t.elapsed() < d {
                for n in c.nodes()?.values() {
                    let a = n["availability"].as_str().unwrap_or("?").to_owned();
                    if a != "Ready" {
                        not_ready += 1;
                    }
                    polled.insert(a);
                }
                settle(Duration::from_millis(100));
            }
        }
    }
    settle(Duration::from_secs(2));
    // The coordinator's own account, which a poll between two states can miss.
    let mut unreachable = 0;
    for (name, logged) in names.iter().zip(logged) {
        let moved = availability_log(&c, name).split_off(logged);
        ensure!(
            !moved.iter().any(|a| a == "Lost"),
            "{name} was falsely Lost: {moved:?}"
        );
        // Unnoticed stalls would make "not Lost" prove nothing.
        let times = moved.iter().filter(|a| *a == "Unreachable").count();
        ensure!(
            times >= STALLS,
            "{name} went Unreachable {times} times in {STALLS} stalls of {STALL:?}: {moved:?}"
        );
        unreachable += times;
    }
    ensure!(
        !polled.contains("Lost"),
        "a poll saw a node Lost: {polled:?}"
    );
    let job = c.job(&id)?;
    ensure!(
        attempt(&job) == 1 && restarts(&job) == 0 && workers_running(&job, 2),
        "{job}"
    );
    ensure!(pids(&job) == before, "the same workers");
    Row {
        order: 13,
        scenario: format!(
            "200 ms latency and {} s stalls on every agent's connection",
            STALL.as_secs()
        ),
        fault: format!(
            "fault proxy between agents and coordinator: +200 ms each way, {STALLS} stalls of {} s (past `unreachable_after` 3 s, inside the 8 s lease and `lost_after` 10 s); default liveness settings; the job's `hang_timeout` 3 s, shorter than each stall",
            STALL.as_secs()
        ),
        outcome: format!(
            "every node Unreachable in each stall ({unreachable} transitions in the coordinator's log), never Lost; nothing restarted, same workers; polls that saw a node not Ready: {not_ready}"
        ),
        ..Row::default()
    }
    .record()
}
