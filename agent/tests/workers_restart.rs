//! Agent restarts against a fake coordinator (`common::workers`): workers kept running by their
//! shims and re-adopted, exits recorded while no agent ran, the shims' own fence, a killed shim,
//! records of an agent from before shims, a shim recorded mid-start.

mod common;

use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::time::Duration;

use common::TestResult;
use common::workers::*;
use vigil_agent::workers::{ORPHAN_REASON, group_alive};

#[tokio::test]
async fn a_restarted_agent_re_adopts_the_worker_its_shim_kept_running() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let keep = Options {
        keep_workers_on_shutdown: true,
        ..NORMAL
    };
    let script = "i=0; while true; do i=$((i+1)); echo $i > $VIGIL_PROGRESS_FILE; echo step $i; sleep 0.1; done";
    let mut first = Harness::start(&state, keep).await?;
    first
        .start_worker(sh("job-f", 7, tmp.path(), script))
        .await?;
    let started = first.started("job-f", 7).await?;
    let shim = shim_pid(&state, "job-f")?;
    assert_ne!(shim, started.pid, "the worker runs under its own shim");
    first.stop().await?;
    assert!(
        group_alive(pgid(&started)),
        "kept running over the agent's exit"
    );

    let mut second = Harness::start(&state, NORMAL).await?;
    // Reported at once (registration's heartbeat), same pid, and its progress goes on.
    let hb = second
        .heartbeat(|hb| hb.workers.iter().any(|w| w.job_id == "job-f"))
        .await?;
    let step = hb.workers[0].progress_step.unwrap_or(0);
    assert_eq!((hb.workers[0].attempt, hb.workers[0].pid), (7, started.pid));
    second
        .heartbeat(|hb| hb.workers.iter().any(|w| w.progress_step > Some(step + 2)))
        .await?;
    assert_eq!(shim_pid(&state, "job-f")?, shim, "the same shim");
    let metrics = second.agent.metrics().await?;
    assert!(
        metrics.contains("vigil_agent_workers_adopted_total{outcome=\"running\"} 1"),
        "{metrics}"
    );

    second.stop_workers("job-f", 7, "job cancelled").await?;
    let exited = second.exited("job-f", 7).await?;
    assert!(exited.stopped);
    assert_eq!(exited.reason, "job cancelled");
    assert!(exited.log_tail.contains("step "), "{:?}", exited.log_tail);
    assert!(!group_alive(pgid(&started)));
    let status = std::fs::read_to_string(state.join("jobs/job-f/7/shim-status.json"))?;
    assert!(status.contains("job cancelled"), "{status}");
    second.stop().await
}

#[tokio::test]
async fn a_worker_that_ends_while_no_agent_runs_is_reported_with_its_exit_code() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let keep = Options {
        keep_workers_on_shutdown: true,
        ..NORMAL
    };
    let mut first = Harness::start(&state, keep).await?;
    first
        .start_worker(sh("job-x", 2, tmp.path(), "sleep 0.5; echo bye; exit 3"))
        .await?;
    first.started("job-x", 2).await?;
    first.stop().await?;
    let status = state.join("jobs/job-x/2/shim-status.json");
    until("the shim records the exit", || {
        std::fs::read_to_string(&status).is_ok_and(|s| s.contains("\"exit_code\": 3"))
    })
    .await?;
    let mut second = Harness::start(&state, NORMAL).await?;
    let exited = second.exited("job-x", 2).await?;
    assert!(!exited.stopped);
    assert_eq!(exited.exit_code, Some(3));
    assert_eq!(
        exited.reason,
        "while the agent was down: exited with code 3"
    );
    assert!(exited.log_tail.contains("bye"), "{:?}", exited.log_tail);
    second.stop().await
}

#[tokio::test]
async fn with_no_agent_the_shim_stops_its_worker_when_the_lease_runs_out() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let short = Options {
        lease_ms: 1_500,
        keep_workers_on_shutdown: true,
        ..NORMAL
    };
    let mut first = Harness::start(&state, short).await?;
    first
        .start_worker(sh("job-l", 1, tmp.path(), TRAINER))
        .await?;
    let started = first.started("job-l", 1).await?;
    let group = pgid(&started);
    first.stop().await?;
    assert!(group_alive(group), "alive inside the lease");
    until("the shim fences its worker", || !group_alive(group)).await?;
    // The group is gone a moment before the shim has written why: wait for the record.
    let status = state.join("jobs/job-l/1/shim-status.json");
    until("the shim records the lease expiry", || {
        std::fs::read_to_string(&status)
            .is_ok_and(|s| s.contains("lease expired: no live agent renewed it"))
    })
    .await?;

    let mut second = Harness::start(&state, NORMAL).await?;
    let exited = second.exited("job-l", 1).await?;
    assert!(exited.stopped);
    assert!(
        exited
            .reason
            .starts_with("while the agent was down: lease expired"),
        "{}",
        exited.reason
    );
    second.stop().await
}

#[tokio::test]
async fn a_killed_shim_takes_its_worker_with_it() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let mut h = Harness::start(&state, NORMAL).await?;
    h.start_worker(sh("job-k", 1, tmp.path(), TRAINER)).await?;
    let started = h.started("job-k", 1).await?;
    let group = pgid(&started);
    let shim = shim_pid(&state, "job-k")?;
    std::process::Command::new("kill")
        .args(["-KILL", &shim.to_string()])
        .status()?;
    let exited = h.exited("job-k", 1).await?;
    assert!(
        !exited.stopped,
        "a failure, not a stop the coordinator asked for"
    );
    assert!(
        exited.reason.starts_with(&format!(
            "its shim (pid {shim}) died (killed by signal 9 (SIGKILL))"
        )) && exited
            .reason
            .ends_with("the shim's guard killed the worker"),
        "{}",
        exited.reason
    );
    until("the guard kills the group", || !group_alive(group)).await?;
    h.stop().await
}

#[tokio::test]
async fn workers_of_an_agent_from_before_shims_are_stopped_as_orphans() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state)?;
    let orphan = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()?;
    let pid = orphan.id();
    let start_time = stat_field(pid, 19).ok_or("no start time")?;
    std::fs::write(
        state.join("workers.json"),
        format!(
            r#"{{"workers":[{{"job_id":"job-o","attempt":1,"node_rank":0,"pid":{pid},"pgid":{pid},
                "log_path":"{}","started_at_unix_ms":1,"start_time":{start_time}}}]}}"#,
            state.join("jobs/job-o/1/rank0.log").display()
        ),
    )?;
    let mut h = Harness::start(&state, NORMAL).await?;
    let exited = h.exited("job-o", 1).await?;
    assert!(exited.stopped);
    assert_eq!(exited.reason, ORPHAN_REASON);
    let metrics = h.agent.metrics().await?;
    assert!(
        metrics.contains("vigil_agent_workers_adopted_total{outcome=\"orphan\"} 1"),
        "{metrics}"
    );
    let mut orphan = orphan;
    let _ = orphan.wait();
    assert!(!group_alive(i32::try_from(pid)?));
    h.stop().await
}

#[tokio::test]
async fn a_shim_recorded_while_starting_is_adopted_from_its_status() -> TestResult {
    use std::io::{BufRead as _, Write as _};
    use vigil_agent::shim::{Handshake, LEASE_FILE, LeaseFile, Spec, write_json};
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let dir = state.join("jobs/job-p/1");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("rank0.log");
    std::fs::write(&log, "")?;
    write_json(
        &state.join(LEASE_FILE),
        &LeaseFile::from_now(Duration::from_secs(600), Duration::from_secs(600)),
        false,
    )?;
    // What an agent that died between starting a shim and hearing its answer leaves behind: a
    // running shim, and a record of it without a worker pid.
    let spec = Spec {
        job_id: "job-p".into(),
        attempt: 1,
        node_rank: 0,
        command: vec!["sleep".into(), "60".into()],
        workdir: tmp.path().to_owned(),
        env: Default::default(),
        identity: None,
        log: log.clone(),
        dir: dir.clone(),
        lease_file: state.join(LEASE_FILE),
        lease_stop_grace_ms: 500,
        stop_grace_ms: 1_000,
    };
    let mut shim = std::process::Command::new(env!("CARGO_BIN_EXE_vigil-agent"))
        .args(["shim", "job-p", "1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    let mut stdin = shim.stdin.take().ok_or("stdin")?;
    stdin.write_all(&serde_json::to_vec(&spec)?)?;
    drop(stdin);
    let mut line = String::new();
    std::io::BufReader::new(shim.stdout.take().ok_or("stdout")?).read_line(&mut line)?;
    let Handshake::Running(running) = serde_json::from_str(&line)? else {
        return Err(format!("not running: {line}").into());
    };
    std::fs::write(
        state.join("workers.json"),
        format!(
            r#"{{"workers":[{{"job_id":"job-p","attempt":1,"node_rank":0,"pid":0,"pgid":0,
                "log_path":"{}","started_at_unix_ms":1,"shim_pid":{},"stop_grace_ms":1000}}]}}"#,
            log.display(),
            shim.id()
        ),
    )?;
    let mut h = Harness::start(&state, NORMAL).await?;
    h.heartbeat(|hb| {
        hb.workers
            .iter()
            .any(|w| w.job_id == "job-p" && w.pid == running.worker_pid)
    })
    .await?;
    h.stop_workers("job-p", 1, "job cancelled").await?;
    let exited = h.exited("job-p", 1).await?;
    assert!(exited.stopped);
    assert_eq!(exited.reason, "job cancelled");
    let _ = shim.wait();
    assert!(!group_alive(running.pgid));
    h.stop().await
}

#[tokio::test]
async fn a_shim_that_never_answered_is_stopped_and_its_worker_reported_gone() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(state.join("jobs/job-q/1"))?;
    // A process that stands for a shim stuck before its answer: it never writes a status.
    let mut stuck = std::process::Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()?;
    let pid = stuck.id();
    std::fs::write(
        state.join("workers.json"),
        format!(
            r#"{{"workers":[{{"job_id":"job-q","attempt":1,"node_rank":0,"pid":0,"pgid":0,
                "log_path":"{}","started_at_unix_ms":1,"shim_pid":{pid}}}]}}"#,
            state.join("jobs/job-q/1/rank0.log").display()
        ),
    )?;
    let mut h = Harness::start(&state, NORMAL).await?;
    let exited = h.exited("job-q", 1).await?;
    assert!(
        exited.stopped,
        "stopped by the agent's side: not the job's failure"
    );
    assert_eq!(
        exited.reason,
        format!(
            "the agent ended while starting it: its shim (pid {pid}) never said the worker runs; stopped it"
        )
    );
    assert!(
        stuck.wait()?.signal() == Some(9),
        "the stuck shim was killed"
    );
    h.stop().await
}
