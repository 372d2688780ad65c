//! The system side of namespace clusters: whether they can be built here,
//! `ip` and `kill` as commands, and processes started inside a namespace.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::LONG;

/// The one line a test prints when it cannot build namespaces.
pub const SKIP_LINE: &str = "skipping: network namespaces need root and iproute2";
/// Set to `1` (CI does) to turn that skip into a failure.
pub const REQUIRE_ENV: &str = "VIGIL_REQUIRE_NETNS";

/// Whether this machine can build namespace clusters: root and `ip`. When
/// not, prints [`SKIP_LINE`] once (past the test harness's capture) and
/// returns false, or fails when [`REQUIRE_ENV`] is `1`.
pub fn available() -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid_root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    let has_ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if euid_root && has_ip {
        return Ok(true);
    }
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        bail!("{REQUIRE_ENV}=1 but {SKIP_LINE} (root: {euid_root}, ip: {has_ip})");
    }
    static SAID: OnceLock<()> = OnceLock::new();
    SAID.get_or_init(|| {
        // Straight to the stream: libtest captures println!/eprintln! of passing
        // tests, so a plain `cargo test` would not show that this one did nothing.
        let _ = writeln!(std::io::stderr().lock(), "{SKIP_LINE}");
    });
    Ok(false)
}

/// Run `ip ARGS`; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Process ids in namespace `ns`.
pub fn pids_in(ns: &str) -> Vec<u32> {
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The command line of `pid`, arguments joined by spaces ("" once it is gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Send `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to `pid`, a process this test started.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// Namespaces left by test processes that died without cleaning up (SIGKILLed runs).
pub(super) fn sweep_stale() {
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("vgl")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

pub(super) fn kill_all_in(ns: &str) {
    for _ in 0..50 {
        let pids = pids_in(ns);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = signal(pid, "KILL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process started inside a namespace (`ip netns exec` execs it, so the
/// child's pid is the program's own).
pub struct NsProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl NsProcess {
    pub(super) fn spawn(ns: &str, program: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {} in {ns}", program.display()))?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill9(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for the first stdout line (a daemon's "serving" line).
    pub(super) fn first_line(&mut self) -> Result<String> {
        let stdout = self.child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let n = reader.read_line(&mut line);
            tx.send(n.map(|_| line)).ok();
            // Keep draining so the daemon never blocks on a full pipe.
            std::io::copy(&mut reader, &mut std::io::sink()).ok();
        });
        match rx.recv_timeout(LONG) {
            Ok(Ok(line)) if !line.is_empty() => Ok(line),
            _ => {
                self.kill9();
                bail!("no serving line; log:\n{}", self.log_text())
            }
        }
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = signal(self.pid(), "CONT");
        self.kill9();
    }
}
