//! The per-attempt shim on its own (`vigil-agent shim`, agent/src/shim): real processes, no agent.
//! The spec goes on its standard input, the handshake comes back on its standard output, and the
//! lease, stop and status files are the whole of its contract with the agent.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use vigil_agent::shim::{
    ExitRecord, Handshake, LEASE_FILE, LeaseFile, STATUS_FILE, STOP_FILE, Spec, Status,
    StopRequest, read_json, write_json,
};
use vigil_agent::workers::group_alive;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn spec(dir: &Path, script: &str) -> Spec {
    let attempt = dir.join("jobs/job-s/1");
    std::fs::create_dir_all(&attempt).ok();
    let log = attempt.join("rank0.log");
    std::fs::write(&log, "").ok();
    Spec {
        job_id: "job-s".into(),
        attempt: 1,
        node_rank: 0,
        command: vec!["sh".into(), "-c".into(), script.into()],
        workdir: dir.to_owned(),
        env: BTreeMap::from([("SHIM_TEST".to_owned(), "yes".to_owned())]),
        identity: None,
        log,
        dir: attempt,
        lease_file: dir.join(LEASE_FILE),
        lease_stop_grace_ms: 500,
        stop_grace_ms: 2_000,
    }
}

/// Starts a shim, hands it `spec`, and returns it with its handshake.
fn start(spec: &Spec) -> Result<(Child, Handshake), Box<dyn std::error::Error>> {
    let mut shim = Command::new(env!("CARGO_BIN_EXE_vigil-agent"))
        .args(["shim", &spec.job_id, &spec.attempt.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(spec.dir.join("shim.log"))?)
        .process_group(0)
        .spawn()?;
    let mut stdin = shim.stdin.take().ok_or("stdin")?;
    stdin.write_all(&serde_json::to_vec(spec)?)?;
    drop(stdin);
    let mut line = String::new();
    BufReader::new(shim.stdout.take().ok_or("stdout")?).read_line(&mut line)?;
    Ok((shim, serde_json::from_str(&line)?))
}

fn running(h: &Handshake) -> Result<vigil_agent::shim::Running, String> {
    match h {
        Handshake::Running(r) => Ok(*r),
        Handshake::Failed { error } => Err(format!("the worker did not start: {error}")),
    }
}

/// The exit the shim recorded, once it has exited (generous deadline).
fn exit_of(shim: &mut Child, dir: &Path) -> Result<ExitRecord, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while shim.try_wait()?.is_none() {
        if Instant::now() > deadline {
            shim.kill()?;
            return Err("the shim did not exit".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status: Status = read_json(&dir.join(STATUS_FILE))?.ok_or("no status")?;
    status.exit.ok_or_else(|| "no exit recorded".into())
}

fn lease(dir: &Path, remaining: Duration) -> std::io::Result<()> {
    write_json(
        &dir.join(LEASE_FILE),
        &LeaseFile::from_now(remaining, remaining),
        false,
    )
}

#[test]
fn the_worker_runs_in_the_guards_group_and_its_exit_code_is_recorded() -> TestResult {
    let tmp = tempfile::tempdir()?;
    lease(tmp.path(), Duration::from_secs(600))?;
    let spec = spec(tmp.path(), "echo $SHIM_TEST; sleep 0.3; exit 7");
    let (mut shim, hello) = start(&spec)?;
    let r = running(&hello)?;
    assert_ne!(
        r.pgid,
        i32::try_from(r.worker_pid)?,
        "the guard leads the group"
    );
    assert_ne!(
        r.pgid,
        i32::try_from(shim.id())?,
        "the shim is outside the group"
    );
    let exit = exit_of(&mut shim, &spec.dir)?;
    assert_eq!((exit.exit_code, exit.stopped), (Some(7), false));
    assert!(!group_alive(r.pgid), "the guard went with the group");
    assert!(std::fs::read_to_string(&spec.log)?.contains("yes"));
    Ok(())
}

#[test]
fn a_stop_order_is_carried_out_with_its_reason_and_grace() -> TestResult {
    let tmp = tempfile::tempdir()?;
    lease(tmp.path(), Duration::from_secs(600))?;
    // Ignores SIGTERM: only the SIGKILL after the grace ends it.
    let spec = spec(tmp.path(), "trap '' TERM; while true; do sleep 0.1; done");
    let (mut shim, hello) = start(&spec)?;
    let r = running(&hello)?;
    write_json(
        &spec.dir.join(STOP_FILE),
        &StopRequest {
            reason: "superseded by attempt 2".into(),
            grace_ms: 300,
        },
        false,
    )?;
    let t0 = Instant::now();
    Command::new("kill")
        .args(["-TERM", &shim.id().to_string()])
        .status()?;
    let exit = exit_of(&mut shim, &spec.dir)?;
    assert!(exit.stopped);
    assert_eq!(exit.reason, "superseded by attempt 2");
    assert_eq!(exit.signal, Some(9), "killed after the grace");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(!group_alive(r.pgid));
    Ok(())
}

#[test]
fn the_shim_stops_its_worker_when_no_one_renews_the_lease() -> TestResult {
    let tmp = tempfile::tempdir()?;
    lease(tmp.path(), Duration::from_millis(800))?;
    let spec = spec(tmp.path(), "sleep 60");
    let t0 = Instant::now();
    let (mut shim, hello) = start(&spec)?;
    let r = running(&hello)?;
    let exit = exit_of(&mut shim, &spec.dir)?;
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "not before the deadline"
    );
    assert!(exit.stopped);
    assert!(
        exit.reason
            .starts_with("lease expired: no live agent renewed it"),
        "{}",
        exit.reason
    );
    assert!(!group_alive(r.pgid));
    Ok(())
}

#[test]
fn a_renewed_lease_keeps_the_worker_running() -> TestResult {
    let tmp = tempfile::tempdir()?;
    lease(tmp.path(), Duration::from_millis(600))?;
    let spec = spec(tmp.path(), "sleep 60");
    let (mut shim, hello) = start(&spec)?;
    let r = running(&hello)?;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        lease(tmp.path(), Duration::from_millis(600))?;
    }
    assert!(
        shim.try_wait()?.is_none() && group_alive(r.pgid),
        "2 s on a 0.6 s lease"
    );
    shim.kill()?;
    shim.wait()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while group_alive(r.pgid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !group_alive(r.pgid),
        "the guard took the group down with the shim"
    );
    Ok(())
}

#[test]
fn a_shim_whose_agent_is_gone_before_the_handshake_stops_its_worker() -> TestResult {
    let tmp = tempfile::tempdir()?;
    lease(tmp.path(), Duration::from_secs(600))?;
    let spec = spec(tmp.path(), "sleep 60");
    let mut shim = Command::new(env!("CARGO_BIN_EXE_vigil-agent"))
        .args(["shim", "job-s", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    // The agent's end of the answer pipe is gone before the shim answers.
    drop(shim.stdout.take());
    let mut stdin = shim.stdin.take().ok_or("stdin")?;
    stdin.write_all(&serde_json::to_vec(&spec)?)?;
    drop(stdin);
    let exit = exit_of(&mut shim, &spec.dir)?;
    assert!(exit.stopped);
    assert_eq!(
        exit.reason,
        "the agent that started the worker was gone before it learned of it"
    );
    Ok(())
}

#[test]
fn a_worker_that_cannot_start_is_answered_with_why() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut spec = spec(tmp.path(), "");
    spec.command = vec!["/no/such/trainer".into()];
    let (mut shim, hello) = start(&spec)?;
    let Handshake::Failed { error } = hello else {
        return Err("a missing program cannot run".into());
    };
    assert!(
        error.starts_with("cannot start /no/such/trainer"),
        "{error}"
    );
    assert!(!shim.wait()?.success());
    Ok(())
}

#[test]
fn input_that_is_no_spec_is_refused_with_a_clear_message() -> TestResult {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil-agent"))
        .arg("shim")
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("the agent's own per-attempt supervisor"),
        "{text}"
    );
    Ok(())
}
