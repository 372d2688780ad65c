//! The `vigil-agent` binary as an operator meets it: exit codes and messages.
//!
//! The NVML tests run on hosts with and without an NVIDIA driver; each outcome
//! is checked against what the agent says ran, and a hang fails.

use std::io::BufRead;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vigil-agent");

/// How long the agent gets to start, exit or stop: generous for a loaded machine.
const DEADLINE: Duration = Duration::from_secs(10);

/// Waits up to [`DEADLINE`] for `child` to exit; after that kills it and fails naming `what`.
fn wait_exit(child: &mut Child, what: &str) -> std::io::Result<ExitStatus> {
    for _ in 0..200 {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Err(std::io::Error::other(format!(
        "{what}: still running after {DEADLINE:?} (killed)"
    )))
}

/// The agent with `args`, plaintext allowed, logging at info.
fn agent_command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("--insecure").args(args).env("RUST_LOG", "info");
    command
}

/// The agent started with `args`, its stderr piped (see [`stderr_lines`]).
fn agent(args: &[&str]) -> std::io::Result<Child> {
    agent_command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
}

/// The agent's stderr, line by line, read on a thread so a chatty agent never
/// blocks on a full pipe; the channel closes when the agent closes stderr.
fn stderr_lines(child: &mut Child) -> std::io::Result<Receiver<String>> {
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| std::io::Error::other("no stderr pipe"))?;
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(lines)
}

/// How a started agent went within [`DEADLINE`].
enum Start {
    /// It logged "vigil-agent started" and is still running.
    Running,
    /// It closed stderr (exited) without starting.
    Exited(ExitStatus),
}

/// Reads `lines` into `log` until the agent logs that it started or exits. A
/// hang (neither within [`DEADLINE`]) kills it and fails with the log so far.
fn started_or_exited(
    child: &mut Child,
    lines: &Receiver<String>,
    log: &mut Vec<String>,
) -> std::io::Result<Start> {
    let start = tokio::time::Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let started = line.contains("vigil-agent started");
                log.push(line);
                if started {
                    return Ok(Start::Running);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Ok(Start::Exited(wait_exit(child, "agent that closed stderr")?));
            }
            Err(RecvTimeoutError::Timeout) => {
                child.kill()?;
                child.wait()?;
                return Err(std::io::Error::other(format!(
                    "hang: the agent neither exited nor logged \"vigil-agent started\" within \
                     {DEADLINE:?} (killed); log:\n{}",
                    log.join("\n")
                )));
            }
        }
    }
}

/// Without NVML the agent must refuse to start and point at the sim backend; with
/// it (a GPU host) it must start on NVML, not on simulated GPUs, and stop cleanly.
#[test]
fn nvml_backend_fails_naming_the_sim_backend_or_runs_on_nvml() -> std::io::Result<()> {
    let state = tempfile::tempdir()?;
    let state_dir = state.path().join("state");
    let mut child = agent(&[
        "--gpu-backend",
        "nvml",
        "--node-name",
        "cli-test",
        "--state-dir",
        &state_dir.to_string_lossy(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--coordinator",
        "http://127.0.0.1:9",
    ])?;
    let lines = stderr_lines(&mut child)?;
    let mut log = Vec::new();
    match started_or_exited(&mut child, &lines, &mut log)? {
        Start::Exited(status) => {
            let stderr = log.join("\n");
            assert!(
                !status.success(),
                "exited {status} without starting: {stderr}"
            );
            assert!(stderr.contains("NVML not available"), "stderr: {stderr}");
            assert!(stderr.contains("--gpu-backend sim"), "stderr: {stderr}");
        }
        Start::Running => {
            // NVML loaded: the log must say so, and nothing may be simulated. Stopped
            // first, so a failed check leaves no agent behind.
            let status = stop(&mut child)?;
            log.extend(lines.iter());
            let text = log.join("\n");
            assert_eq!(status.code(), Some(0), "log: {text}");
            let started = log
                .iter()
                .find(|l| l.contains("vigil-agent started"))
                .map_or("", String::as_str);
            assert!(
                started.contains("gpu_backend=\"nvml\""),
                "started, but not on NVML: {text}"
            );
            assert!(
                text.contains("GPU inventory read through NVML")
                    || text.contains("NVML found no GPUs"),
                "started without reading the NVML inventory: {text}"
            );
            assert!(!text.contains("SIMULATED"), "log: {text}");
        }
    }
    Ok(())
}

/// SIGTERM, then the exit status within [`DEADLINE`]; a hang fails.
fn stop(child: &mut Child) -> std::io::Result<ExitStatus> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success(), "kill -TERM failed");
    wait_exit(child, "agent after SIGTERM")
}

#[test]
fn unknown_config_key_exits_64_naming_the_key() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "node_name = \"n1\"\nheartbeat_every = \"1s\"\n")?;
    let out = output_briefly(&mut agent_command(&["--config", &path.to_string_lossy()]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("heartbeat_every"), "stderr: {stderr}");
    Ok(())
}

#[test]
fn invalid_flag_exits_64_naming_the_field() -> std::io::Result<()> {
    let out = output_briefly(&mut agent_command(&["--node-name", "no spaces allowed"]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("node_name"), "stderr: {stderr}");
    Ok(())
}

#[test]
fn sigterm_stops_the_agent_cleanly() -> std::io::Result<()> {
    let state = tempfile::tempdir()?;
    let mut child = agent(&[
        "--gpu-backend=sim",
        "--sim-gpus=2",
        "--node-name=sig-test",
        &format!("--state-dir={}", state.path().join("s").display()),
        "--metrics-listen=127.0.0.1:0",
        "--coordinator=http://127.0.0.1:9",
    ])?;
    let lines = stderr_lines(&mut child)?;
    let mut log = Vec::new();
    if let Start::Exited(status) = started_or_exited(&mut child, &lines, &mut log)? {
        panic!("exited {status} instead of starting: {}", log.join("\n"));
    }
    let status = stop(&mut child)?;
    log.extend(lines.iter());
    let log = log.join("\n");
    assert_eq!(status.code(), Some(0), "log: {log}");
    assert!(log.contains("SIMULATED"), "log: {log}");
    assert!(log.contains("gpu_backend=\"simulated\""), "log: {log}");
    assert!(log.contains("shutting down"), "log: {log}");
    assert!(state.path().join("s").is_dir(), "state dir is created");
    Ok(())
}

#[test]
fn check_gpus_with_the_sim_backend_prints_a_simulated_report() -> std::io::Result<()> {
    let out = output_briefly(
        Command::new(BIN)
            .args(["--check-gpus", "--gpu-backend", "sim", "--sim-gpus", "2"])
            .args(["--node-name", "check-node"]),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stdout.contains("SIMULATED"), "stdout: {stdout}");
    assert!(stdout.contains("GPU 1: "), "stdout: {stdout}");
    assert!(
        stdout.contains("ecc_uncorrected_volatile"),
        "stdout: {stdout}"
    );

    let out = output_briefly(
        Command::new(BIN)
            .args(["--check-gpus", "--json", "--gpu-backend", "sim"])
            .args(["--sim-gpus", "2", "--node-name", "check-node"]),
    )?;
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| std::io::Error::other(format!("--json output is not JSON: {e}")))?;
    assert_eq!(json["simulated"], serde_json::Value::Bool(true));
    assert_eq!(json["backend"], "simulated");
    assert_eq!(json["gpus"].as_array().map(Vec::len), Some(2));
    Ok(())
}

/// Without NVML `--check-gpus` exits 69 naming the library; with it (a GPU host)
/// it exits 0 with a report of the real backend: its label and the driver's facts.
#[test]
fn check_gpus_with_nvml_exits_69_naming_the_library_or_reports_the_driver() -> std::io::Result<()> {
    let out = output_briefly(Command::new(BIN).args([
        "--check-gpus",
        "--gpu-backend",
        "nvml",
        "--node-name",
        "n1",
    ]))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    if out.status.success() {
        // NVML loaded: the report must be NVML's, not the simulator's.
        assert_eq!(
            stdout.lines().next(),
            Some("backend: nvml"),
            "stdout: {stdout}"
        );
        assert!(!stdout.contains("SIMULATED"), "stdout: {stdout}");
        for fact in ["driver_version: ", "nvml_version: ", "gpus: "] {
            assert!(stdout.contains(fact), "no {fact:?} in stdout: {stdout}");
        }
        return Ok(());
    }
    assert_eq!(out.status.code(), Some(69), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("libnvidia-ml.so.1"), "stderr: {stderr}");
    assert!(last.contains("--gpu-backend sim"), "stderr: {stderr}");
    Ok(())
}

/// `command`'s output once it exits; a hang (past [`DEADLINE`]) kills it and fails.
fn output_briefly(command: &mut Command) -> std::io::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_exit(&mut child, "vigil-agent --check-gpus")?;
    let joined = |h: std::thread::JoinHandle<Vec<u8>>| {
        h.join()
            .map_err(|_| std::io::Error::other("pipe reader panicked"))
    };
    Ok(Output {
        status,
        stdout: joined(stdout)?,
        stderr: joined(stderr)?,
    })
}

#[test]
fn help_gives_the_fault_file_line_format_with_an_example() -> std::io::Result<()> {
    let out = output_briefly(Command::new(BIN).arg("--help"))?;
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    let flag = help
        .split("--sim-fault-file <FILE>")
        .nth(1)
        .and_then(|rest| rest.split("\n      --").next())
        .unwrap_or_else(|| panic!("no --sim-fault-file in --help: {help}"));
    let flag = flag.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "`gpu=N KEY[=VALUE] ...`",
        "e.g. `gpu=3 xid=79`",
        "`#` starts a comment",
        "`gpu=N ok`",
        "docs/configuration.md",
    ] {
        assert!(
            flag.contains(needle),
            "--sim-fault-file help lacks {needle:?}: {flag}"
        );
    }
    Ok(())
}
