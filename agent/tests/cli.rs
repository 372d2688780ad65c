//! The `vigil-agent` binary as an operator meets it: exit codes and messages.

use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vigil-agent");

/// Waits up to ~10 s; `None` (after killing it) if the agent is still running.
fn wait_briefly(mut child: Child) -> std::io::Result<Option<Output>> {
    for _ in 0..200 {
        if child.try_wait()?.is_some() {
            return child.wait_with_output().map(Some);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(None)
}

fn agent(args: &[&str]) -> std::io::Result<Child> {
    Command::new(BIN)
        .arg("--insecure")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

#[test]
fn nvml_backend_without_a_driver_fails_naming_the_sim_backend() -> std::io::Result<()> {
    let state = tempfile::tempdir()?;
    let state_dir = state.path().join("state");
    let child = agent(&[
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
    let Some(out) = wait_briefly(child)? else {
        eprintln!("NVML loaded on this host: the agent ran, nothing to check");
        return Ok(());
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("NVML not available"), "stderr: {stderr}");
    assert!(stderr.contains("--gpu-backend sim"), "stderr: {stderr}");
    Ok(())
}

#[test]
fn unknown_config_key_exits_64_naming_the_key() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "node_name = \"n1\"\nheartbeat_every = \"1s\"\n")?;
    let out = agent(&["--config", &path.to_string_lossy()])?.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("heartbeat_every"), "stderr: {stderr}");
    Ok(())
}

#[test]
fn invalid_flag_exits_64_naming_the_field() -> std::io::Result<()> {
    let out = agent(&["--node-name", "no spaces allowed"])?.wait_with_output()?;
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
    let mut log = Vec::new();
    while !log
        .iter()
        .any(|l: &String| l.contains("vigil-agent started"))
    {
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => log.push(line),
            Err(e) => {
                child.kill()?;
                return Err(std::io::Error::other(format!(
                    "agent never started ({e}): {log:?}"
                )));
            }
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let Some(out) = wait_briefly(child)? else {
        return Err(std::io::Error::other("agent ignored SIGTERM"));
    };
    log.extend(lines.iter());
    let log = log.join("\n");
    assert_eq!(out.status.code(), Some(0), "log: {log}");
    assert!(log.contains("SIMULATED"), "log: {log}");
    assert!(log.contains("shutting down"), "log: {log}");
    assert!(state.path().join("s").is_dir(), "state dir is created");
    Ok(())
}

#[test]
fn check_gpus_with_the_sim_backend_prints_a_simulated_report() -> std::io::Result<()> {
    let out = Command::new(BIN)
        .args(["--check-gpus", "--gpu-backend", "sim", "--sim-gpus", "2"])
        .args(["--node-name", "check-node"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stdout.contains("SIMULATED"), "stdout: {stdout}");
    assert!(stdout.contains("GPU 1: "), "stdout: {stdout}");
    assert!(
        stdout.contains("ecc_uncorrected_volatile"),
        "stdout: {stdout}"
    );

    let out = Command::new(BIN)
        .args([
            "--check-gpus",
            "--json",
            "--gpu-backend",
            "sim",
            "--sim-gpus",
            "2",
        ])
        .args(["--node-name", "check-node"])
        .output()?;
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| std::io::Error::other(format!("--json output is not JSON: {e}")))?;
    assert_eq!(json["simulated"], serde_json::Value::Bool(true));
    assert_eq!(json["gpus"].as_array().map(Vec::len), Some(2));
    Ok(())
}

#[test]
fn check_gpus_without_a_driver_exits_69_naming_the_library() -> std::io::Result<()> {
    let out = Command::new(BIN)
        .args(["--check-gpus", "--gpu-backend", "nvml", "--node-name", "n1"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!("NVML loaded on this host: nothing to check");
        return Ok(());
    }
    assert_eq!(out.status.code(), Some(69), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("libnvidia-ml.so.1"), "stderr: {stderr}");
    assert!(last.contains("--gpu-backend sim"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    Ok(())
}
