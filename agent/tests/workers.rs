//! Job workers against a fake coordinator that sends StartWorker/StopWorkers
//! (`common::workers`): real `sh` processes under real shims, their progress in heartbeats,
//! stops, fencing, the lease, checkpoints, confinement.

mod common;

use std::path::{Path, PathBuf};

use common::workers::*;
use common::{TestResult, root_or_skip, skip_root_test};
use vigil_agent::workers::{ALREADY_GONE_REASON, group_alive};
use vigil_proto::v1::CheckpointSeen;
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::command::Kind as CommandKind;

#[tokio::test]
async fn worker_starts_reports_progress_and_stops_with_its_whole_group() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let mut h = Harness::start(&state, NORMAL).await?;
    h.start_worker(sh("job-a", 1, tmp.path(), TRAINER)).await?;
    let started = h.started("job-a", 1).await?;
    assert!(started.pid > 0);
    let log = state.join("jobs/job-a/1/rank0.log");
    assert_eq!(PathBuf::from(&started.log_path), log);
    let hb = h
        .heartbeat(|hb| hb.workers.iter().any(|w| w.progress_step == Some(5)))
        .await?;
    let w = &hb.workers[0];
    assert_eq!(
        (w.job_id.as_str(), w.attempt, w.pid),
        ("job-a", 1, started.pid)
    );
    assert!(w.progress_at_unix_ms >= w.started_at_unix_ms);
    assert!(group_alive(pgid(&started)));

    h.stop_workers("job-a", 1, "job cancelled").await?;
    let exited = h.exited("job-a", 1).await?;
    assert!(exited.stopped);
    assert_eq!(exited.reason, "job cancelled");
    assert_eq!(exited.log_path, started.log_path);
    assert!(exited.log_tail.contains("job-a"), "{:?}", exited.log_tail);
    assert!(
        !group_alive(pgid(&started)),
        "the sleep child died with its shell"
    );
    let text = std::fs::read_to_string(&log)?;
    assert!(text.starts_with("==> vigil-agent "), "{text}");
    assert!(text.contains("VIGIL_PROGRESS_FILE"), "{text}");
    h.heartbeat(|hb| hb.workers.is_empty()).await?;

    // Asking again is answered, so the coordinator can confirm the node is clean.
    h.stop_workers("job-a", 1, "job cancelled").await?;
    let again = h.exited("job-a", 1).await?;
    assert!(again.stopped);
    assert_eq!(again.reason, ALREADY_GONE_REASON);
    h.stop().await
}

#[tokio::test]
async fn worker_exit_code_is_reported() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    h.start_worker(sh("job-b", 4, tmp.path(), "echo failing >&2; exit 3"))
        .await?;
    h.started("job-b", 4).await?;
    let exited = h.exited("job-b", 4).await?;
    assert_eq!(exited.exit_code, Some(3));
    assert_eq!(exited.signal, None);
    assert!(!exited.stopped);
    assert_eq!(exited.reason, "exited with code 3");
    assert!(
        exited.log_tail.ends_with("failing\n"),
        "{:?}",
        exited.log_tail
    );
    h.stop().await
}

#[tokio::test]
async fn bad_starts_are_reported_with_their_reason() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    let missing = tmp.path().join("no-such-dir");
    h.start_worker(sh("job-c", 1, &missing, "true")).await?;
    let exited = h.exited("job-c", 1).await?;
    assert!(!exited.stopped);
    assert!(
        exited.reason.contains(&missing.display().to_string()),
        "{}",
        exited.reason
    );
    let mut start = sh("job-c", 2, tmp.path(), "");
    start.command = vec!["/no/such/program".into()];
    h.start_worker(start).await?;
    let exited = h.exited("job-c", 2).await?;
    assert_eq!(exited.exit_code, None);
    assert!(
        exited.reason.starts_with("cannot start /no/such/program: "),
        "{}",
        exited.reason
    );
    h.stop().await
}

#[tokio::test]
async fn a_newer_attempt_starts_only_after_the_older_one_is_dead() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    h.start_worker(sh("job-d", 1, tmp.path(), TRAINER)).await?;
    let first = h.started("job-d", 1).await?;
    h.start_worker(sh("job-d", 2, tmp.path(), TRAINER)).await?;
    let is_d = |k: &Kind| match k {
        Kind::WorkerExited(e) => e.job_id == "job-d",
        Kind::WorkerStarted(s) => s.job_id == "job-d",
        _ => false,
    };
    let Kind::WorkerExited(old) = h.event(is_d).await? else {
        return Err("attempt 2 started before attempt 1 was reported dead".into());
    };
    assert_eq!(old.attempt, 1);
    assert!(old.stopped);
    assert!(
        old.reason.contains("superseded by attempt 2"),
        "{}",
        old.reason
    );
    assert!(!group_alive(pgid(&first)));
    let second = h.started("job-d", 2).await?;

    h.start_worker(sh("job-d", 1, tmp.path(), TRAINER)).await?;
    let refused = h.exited("job-d", 1).await?;
    assert!(refused.stopped);
    assert!(
        refused.reason.contains("older than attempt 2"),
        "{}",
        refused.reason
    );

    h.stop_workers("job-d", 2, "done").await?;
    h.exited("job-d", 2).await?;
    assert!(!group_alive(pgid(&second)));
    h.stop().await
}

#[tokio::test]
async fn lease_expiry_stops_workers() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let silent = Options {
        lease_ms: 600,
        ack: false,
        ..NORMAL
    };
    let mut h = Harness::start(&tmp.path().join("state"), silent).await?;
    h.start_worker(sh("job-e", 1, tmp.path(), TRAINER)).await?;
    let started = h.started("job-e", 1).await?;
    let exited = h.exited("job-e", 1).await?;
    assert!(exited.stopped);
    assert!(
        exited.reason.starts_with("lease expired"),
        "{}",
        exited.reason
    );
    assert!(!group_alive(pgid(&started)));
    h.stop().await
}

#[tokio::test]
async fn agent_shutdown_stops_its_workers() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    h.start_worker(sh("job-g", 1, tmp.path(), TRAINER)).await?;
    let started = h.started("job-g", 1).await?;
    h.stop().await?;
    assert!(!group_alive(pgid(&started)));
    Ok(())
}

#[tokio::test]
async fn rank_0_reports_each_new_complete_checkpoint() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(ckpt.join("step_9"))?;
    std::fs::write(ckpt.join("step_9/COMPLETE"), "9\n")?;
    std::fs::create_dir_all(ckpt.join("step_10"))?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    let mut start = sh("job-h", 1, tmp.path(), "sleep 30");
    start.checkpoint_dir = ckpt.display().to_string();
    start.checkpoint_layout = "marker".into();
    h.start_worker(start).await?;
    let seen = |k: &Kind| matches!(k, Kind::Checkpoint(_));
    let Kind::Checkpoint(first) = h.event(seen).await? else {
        return Err("not a checkpoint".into());
    };
    let expect = |dir: &str, step| CheckpointSeen {
        job_id: "job-h".into(),
        attempt: 1,
        path: ckpt.join(dir).display().to_string(),
        step: Some(step),
        save_ms: None,
        completed_at_unix_ms: None,
    };
    let first = CheckpointSeen {
        save_ms: None,
        completed_at_unix_ms: None,
        ..first
    };
    assert_eq!(first, expect("step_9", 9), "step_10 is not complete yet");
    std::fs::write(ckpt.join("step_10/COMPLETE"), "10\n")?;
    let Kind::Checkpoint(second) = h.event(seen).await? else {
        return Err("not a checkpoint".into());
    };
    assert!(second.save_ms.is_some(), "the save is timed: {second:?}");
    let second = CheckpointSeen {
        save_ms: None,
        completed_at_unix_ms: None,
        ..second
    };
    assert_eq!(second, expect("step_10", 10));
    h.stop().await
}

#[tokio::test]
async fn starts_outside_the_allowed_roots_or_of_a_stale_attempt_are_refused() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    // The harness allows only the test's temp dir.
    h.start_worker(sh("job-r", 1, Path::new("/"), "true"))
        .await?;
    let exited = h.exited("job-r", 1).await?;
    assert!(
        exited.reason.starts_with("refused: workdir")
            && exited.reason.contains("workers.allowed_roots"),
        "{}",
        exited.reason
    );
    let mut escape = sh("job-r", 2, tmp.path(), "true");
    escape.node_rank = 0;
    escape.checkpoint_dir = "/etc".into();
    escape.checkpoint_layout = "marker".into();
    h.start_worker(escape).await?;
    let exited = h.exited("job-r", 2).await?;
    assert!(
        exited.reason.contains("checkpoint_dir"),
        "{}",
        exited.reason
    );

    // Attempt 3 runs and exits; the same attempt sent again is stale, as is an older one.
    h.start_worker(sh("job-r", 3, tmp.path(), "exit 0")).await?;
    assert_eq!(h.exited("job-r", 3).await?.exit_code, Some(0));
    h.start_worker(sh("job-r", 3, tmp.path(), "true")).await?;
    let exited = h.exited("job-r", 3).await?;
    assert!(exited.reason.contains("stale"), "{}", exited.reason);
    h.start_worker(sh("job-r", 1, tmp.path(), "true")).await?;
    let exited = h.exited("job-r", 1).await?;
    assert!(exited.reason.contains("stale"), "{}", exited.reason);
    // A stop of a job this node never ran stops nothing and still completes.
    h.stop_workers("never-here", 1, "test").await?;
    assert_eq!(h.exited("never-here", 1).await?.reason, ALREADY_GONE_REASON);
    h.stop().await
}

#[tokio::test]
async fn workers_run_as_the_configured_user() -> TestResult {
    const TEST: &str = "workers_run_as_the_configured_user";
    // Switching users needs root; without it the unit tests cover the refusal.
    if !root_or_skip(TEST)? {
        return Ok(());
    }
    let Some(nobody) = nix::unistd::User::from_name("nobody")? else {
        skip_root_test(TEST, "no user \"nobody\" to run workers as")?;
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    // The worker (nobody) must be able to enter its workdir and reach its progress file.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let as_nobody = Options {
        run_as: Some("nobody"),
        ..NORMAL
    };
    let mut h = Harness::start(&tmp.path().join("state"), as_nobody).await?;
    // The groups first: the test reads them once the progress (the uid) shows.
    let script = "id -G > $VIGIL_PROGRESS_FILE.groups; id -u > $VIGIL_PROGRESS_FILE; sleep 30";
    h.start_worker(sh("job-u", 1, tmp.path(), script)).await?;
    h.started("job-u", 1).await?;
    let uid = u64::from(nobody.uid.as_raw());
    h.heartbeat(|hb| {
        hb.workers
            .iter()
            .any(|w| w.job_id == "job-u" && w.progress_step == Some(uid))
    })
    .await?;
    let groups = tmp.path().join("state/jobs/job-u/1/run/progress.groups");
    let groups = std::fs::read_to_string(groups)?;
    assert_eq!(
        groups.split_whitespace().collect::<Vec<_>>(),
        vec![nobody.gid.as_raw().to_string()],
        "only the user's own group: the agent's supplementary groups are cleared"
    );
    h.stop_workers("job-u", 1, "test over").await?;
    h.exited("job-u", 1).await?;
    h.stop().await
}

#[tokio::test]
async fn a_verifying_scan_re_sent_while_it_runs_is_run_once() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(ckpt.join("step_000100"))?;
    std::fs::write(ckpt.join("step_000100/model.bin"), "weights")?;
    std::fs::write(ckpt.join("step_000100/COMPLETE"), "ok\n")?;
    let runs = tmp.path().join("runs");
    let scan = vigil_proto::v1::ScanCheckpoints {
        job_id: "job-v".into(),
        attempt: 2,
        checkpoint_dir: ckpt.display().to_string(),
        checkpoint_layout: "marker".into(),
        verify_command: vec![
            "sh".into(),
            "-c".into(),
            format!("echo run >> {}; sleep 1", runs.display()),
        ],
        verify_timeout_ms: 30_000,
        workdir: tmp.path().display().to_string(),
        env: Default::default(),
        world_size: 0,
    };
    // The coordinator re-sends an unanswered scan (1 s, 2 s, ...): here at once.
    h.command(CommandKind::ScanCheckpoints(scan.clone()))
        .await?;
    h.command(CommandKind::ScanCheckpoints(scan)).await?;
    let answer = match h.event(|k| matches!(k, Kind::CheckpointScan(_))).await? {
        Kind::CheckpointScan(a) => a,
        _ => return Err("not a scan".into()),
    };
    assert_eq!(
        answer.newest.and_then(|n| n.step),
        Some(100),
        "{}",
        answer.error
    );
    assert!(answer.rejected.is_empty());
    // Long enough for a second verification (1 s) to have started and written its line.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(std::fs::read_to_string(&runs)?, "run\n", "verified once");
    h.stop().await
}
