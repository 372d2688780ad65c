//! Both daemons speak systemd's notify protocol (`Type=notify`): `READY=1`
//! only once they serve, the coordinator's engine loop feeds the watchdog,
//! SIGHUP re-reads the config without ever stopping the daemon, and SIGTERM
//! says `STOPPING=1`. The test plays systemd: it binds the `NOTIFY_SOCKET`.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use vigil_tests::{Coordinator, LONG, bin, now, wait_for, write_file};

/// Deadline for a notification that should come within a second or two.
const SOON: Duration = Duration::from_secs(30);

/// The service manager's end of `NOTIFY_SOCKET`.
struct NotifySocket {
    path: PathBuf,
    socket: UnixDatagram,
    /// Every notification received so far, for failure messages.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Result<Self> {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).context("cannot bind the notify socket")?;
        Ok(Self {
            path,
            socket,
            seen: Vec::new(),
        })
    }

    /// The next notification, or `None` after `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Option<String>> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(text.clone());
                Ok(Some(text))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The first notification holding the line `line`, within `timeout`.
    fn wait_for(&mut self, line: &str, timeout: Duration) -> Result<String> {
        let start = now();
        while let Some(left) = timeout.checked_sub(start.elapsed()) {
            if let Some(text) = self.recv(left)?
                && text.lines().any(|l| l == line)
            {
                return Ok(text);
            }
        }
        bail!("no {line} within {timeout:?}; received: {:?}", self.seen)
    }
}

/// The value of `KEY=` in a notification.
fn field<'a>(notification: &'a str, key: &str) -> Option<&'a str> {
    notification
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// A daemon under test, SIGKILLed if the test ends before it exits.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{name} failed: {status}");
        }
        Ok(())
    }

    fn alive(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    fn wait_exit(&mut self) -> Result<ExitStatus> {
        wait_for("the daemon to exit", LONG, || Ok(self.child.try_wait()?))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// `binary args...` with `NOTIFY_SOCKET` (and `extra_env`) set, stdout piped, stderr to a log.
fn start(
    dir: &Path,
    binary: &str,
    args: &[&str],
    notify: &NotifySocket,
    extra_env: &[(&str, &str)],
) -> Result<Daemon> {
    let log = dir.join(format!("{binary}.log"));
    let stderr = std::fs::File::create(&log)?;
    let mut cmd = Command::new(bin(binary)?);
    // Plaintext on loopback: these tests are about the service manager, not the transport.
    cmd.arg("--insecure")
        .args(args)
        .env("NOTIFY_SOCKET", &notify.path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {binary}"))?;
    Ok(Daemon { child, log })
}

/// The coordinator's first stdout line (`... serving grpc=ADDR metrics=ADDR ...`), parsed.
fn serving_addrs(daemon: &mut Daemon) -> Result<(SocketAddr, SocketAddr)> {
    let stdout = daemon.child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = |key: &str| -> Result<SocketAddr> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .with_context(|| format!("no {key} in {line:?}"))?
            .parse()
            .context("bad address")
    };
    Ok((addr("grpc=")?, addr("metrics=")?))
}

fn connects(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok()
}

#[test]
fn coordinator_is_ready_once_serving_feeds_the_watchdog_reloads_and_stops() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut notify = NotifySocket::bind(dir.path())?;
    let config = write_file(dir.path(), "coordinator.toml", "")?;
    let config = config.to_string_lossy().into_owned();
    let data = dir.path().join("data");
    let data = data.to_string_lossy().into_owned();
    // WATCHDOG_PID unset: sd-notify then takes WATCHDOG_USEC as meant for this process.
    let mut coordinator = start(
        dir.path(),
        "vigil-coordinator",
        &[
            "--config",
            &config,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
        ],
        &notify,
        &[("WATCHDOG_USEC", "1000000")],
    )?;

    let ready = notify.wait_for("READY=1", SOON)?;
    let (grpc, metrics) = serving_addrs(&mut coordinator)?;
    assert!(connects(grpc), "gRPC port {grpc} accepts once READY=1 came");
    assert!(connects(metrics), "metrics port {metrics} accepts too");
    assert_eq!(
        field(&ready, "STATUS"),
        Some(format!("serving on {grpc}; 0 nodes known").as_str()),
        "{ready:?}"
    );

    let start_feeding = now();
    let mut fed = 0;
    while let Some(left) = Duration::from_secs(5).checked_sub(start_feeding.elapsed()) {
        if notify
            .recv(left)?
            .is_some_and(|n| n.lines().any(|l| l == "WATCHDOG=1"))
        {
            fed += 1;
        }
    }
    assert!(
        fed >= 3,
        "a 1 s watchdog is fed every 0.5 s: {fed} WATCHDOG=1 in 5 s; log:\n{}",
        coordinator.log_text()
    );

    // A changed file: re-read, reported, not applied; the coordinator serves on.
    write_file(
        dir.path(),
        "coordinator.toml",
        "[liveness]\nlost_after = \"20s\"\n",
    )?;
    coordinator.signal("HUP")?;
    notify.wait_for("RELOADING=1", SOON)?;
    let reloaded = notify.wait_for("READY=1", SOON)?;
    let status = field(&reloaded, "STATUS").unwrap_or_default();
    assert!(status.contains("liveness changed"), "{reloaded:?}");
    wait_for("the SIGHUP log line", SOON, || {
        Ok(coordinator
            .log_text()
            .contains("re-read and valid; changes to liveness need a restart")
            .then_some(()))
    })?;

    // An invalid file: the error names the key; the coordinator keeps running.
    write_file(
        dir.path(),
        "coordinator.toml",
        "[liveness]\nlost_after = \"ten seconds\"\n",
    )?;
    coordinator.signal("HUP")?;
    let kept = notify.wait_for("READY=1", SOON)?;
    assert!(
        field(&kept, "STATUS").is_some_and(|s| s.contains("invalid")),
        "{kept:?}"
    );
    wait_for("the invalid-config log line", SOON, || {
        Ok(coordinator.log_text().contains("lost_after").then_some(()))
    })?;
    assert!(coordinator.alive()?, "an invalid file never stops it");
    assert!(connects(grpc), "still serving after a bad reload");

    coordinator.signal("TERM")?;
    notify.wait_for("STOPPING=1", SOON)?;
    let status = coordinator.wait_exit()?;
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    Ok(())
}

#[test]
fn agent_is_ready_without_a_coordinator_and_says_stopping() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut notify = NotifySocket::bind(dir.path())?;
    let state = dir.path().join("state");
    let state = state.to_string_lossy().into_owned();
    // Nothing listens on port 1: the agent retries, but it is ready regardless.
    let mut agent = start(
        dir.path(),
        "vigil-agent",
        &[
            "--gpu-backend",
            "sim",
            "--sim-gpus",
            "4",
            "--coordinator",
            "http://127.0.0.1:1",
            "--node-name",
            "notify-node",
            "--state-dir",
            &state,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &notify,
        &[],
    )?;
    let ready = notify.wait_for("READY=1", SOON)?;
    let status = field(&ready, "STATUS").context("READY=1 comes with a STATUS")?;
    assert!(
        status.starts_with("4 GPUs (simulated); metrics on "),
        "{status}"
    );
    let metrics: SocketAddr = status
        .split_whitespace()
        .find_map(|w| w.strip_suffix(';')?.parse().ok())
        .context("no metrics address in the status")?;
    assert!(
        connects(metrics),
        "metrics port {metrics} accepts at READY=1"
    );
    assert!(
        status.ends_with("connecting to http://127.0.0.1:1"),
        "{status}"
    );

    agent.signal("TERM")?;
    notify.wait_for("STOPPING=1", SOON)?;
    let exit = agent.wait_exit()?;
    assert!(exit.success(), "clean exit after SIGTERM: {exit}");
    Ok(())
}

#[test]
fn agent_status_follows_its_registration() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut coordinator = Coordinator::start(dir.path(), "", None)?;
    let url = coordinator.url();
    let mut notify = NotifySocket::bind(dir.path())?;
    let state = dir.path().join("state");
    let state = state.to_string_lossy().into_owned();
    let config = write_file(
        dir.path(),
        "agent.toml",
        "[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n",
    )?;
    let config = config.to_string_lossy().into_owned();
    let _agent = start(
        dir.path(),
        "vigil-agent",
        &[
            "--config",
            &config,
            "--gpu-backend",
            "sim",
            "--coordinator",
            &url,
            "--node-name",
            "notify-node",
            "--state-dir",
            &state,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &notify,
        &[],
    )?;
    notify.wait_for("READY=1", SOON)?;
    notify.wait_for(&format!("STATUS=registered with {url}"), SOON)?;
    coordinator.kill9();
    notify.wait_for(
        &format!("STATUS=coordinator {url} unreachable, retrying"),
        SOON,
    )?;
    Ok(())
}
