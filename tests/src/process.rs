//! The vigil binaries as child processes: built once per test process,
//! started on ephemeral loopback ports, SIGKILLed when dropped.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::{LONG, write_file};

/// Path of a workspace binary, building the binaries first (once per test
/// process) so end-to-end tests never run stale code.
///
/// Inside [`using`], the binaries it names come from another release's directory instead.
pub fn bin(name: &str) -> Result<PathBuf> {
    if let Some(path) = OVERRIDES.with_borrow(|o| o.iter().rev().find(|(n, _)| n == name).cloned())
    {
        return Ok(path.1);
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_binaries().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(dir.join(name))
}

thread_local! {
    static OVERRIDES: RefCell<Vec<(String, PathBuf)>> = const { RefCell::new(Vec::new()) };
}

/// While the returned guard lives, this thread's [`bin`] gives `names` from `dir` (another
/// release's binaries: the version-skew tests, tests/tests/compat.rs).
pub fn using(dir: &Path, names: &[&str]) -> Using {
    OVERRIDES.with_borrow_mut(|o| {
        o.extend(names.iter().map(|n| ((*n).to_owned(), dir.join(n))));
    });
    Using(names.len())
}

/// Ends a [`using`] when dropped.
#[must_use = "the binaries are overridden only while this guard lives"]
pub struct Using(usize);

impl Drop for Using {
    fn drop(&mut self) {
        OVERRIDES.with_borrow_mut(|o| o.truncate(o.len().saturating_sub(self.0)));
    }
}

fn build_binaries() -> Result<PathBuf> {
    // This test binary lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?
        .to_owned();
    let target_dir = profile_dir
        .parent()
        .context("cannot locate the target directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "--bins",
        "-p",
        "vigil-coordinator",
        "-p",
        "vigil-agent",
        "-p",
        "clusterctl",
    ])
    .arg("--target-dir")
    .arg(target_dir)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("cannot run cargo to build the vigil binaries")?;
    if !status.success() {
        bail!("building the vigil binaries failed: {status}");
    }
    Ok(profile_dir)
}

/// Variables added to a child's environment, on top of the test's own (which it inherits):
/// e.g. libfaketime preloaded into that one process ([`crate::faketime::FakeWallClock::env`]).
pub type Env = [(OsString, OsString)];

/// A running vigil-coordinator.
pub struct Coordinator {
    pub child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Coordinator {
    /// Start on `listen` (default an ephemeral loopback port) with data dir
    /// `dir/coordinator-data`; returns once it prints its serving line.
    pub fn start(dir: &Path, config: &str, listen: Option<SocketAddr>) -> Result<Self> {
        Self::start_env(dir, config, listen, &[])
    }

    /// [`Coordinator::start`] with `env` added to its environment.
    pub fn start_env(
        dir: &Path,
        config: &str,
        listen: Option<SocketAddr>,
        env: &Env,
    ) -> Result<Self> {
        Self::start_args(dir, config, listen, env, &[])
    }

    /// [`Coordinator::start_env`] with `args` added to its command line (`--recover`).
    pub fn start_args(
        dir: &Path,
        config: &str,
        listen: Option<SocketAddr>,
        env: &Env,
        args: &[&str],
    ) -> Result<Self> {
        let config_path = write_file(dir, "coordinator.toml", config)?;
        let log = dir.join("coordinator.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let listen = listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut command = Command::new(crate::bin("vigil-coordinator")?);
        // Plaintext unless the test configured mutual TLS.
        if !config.contains("[tls]") {
            command.arg("--insecure");
        }
        let mut child = command
            .arg("--config")
            .arg(&config_path)
            .args([
                "--listen",
                &listen,
                "--metrics-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.join("coordinator-data"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("cannot start vigil-coordinator")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let n = BufReader::new(stdout).read_line(&mut line);
            tx.send(n.map(|_| line)).ok();
        });
        let line = match rx.recv_timeout(LONG) {
            Ok(Ok(line)) if !line.is_empty() => line,
            _ => {
                child.kill().ok();
                let status = child.wait().ok();
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("vigil-coordinator did not start ({status:?}); log:\n{log_text}");
            }
        };
        let field = |key: &str| -> Result<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .context(format!("no {key} in {line:?}"))?
                .parse()
                .context("bad address")
        };
        Ok(Self {
            grpc: field("grpc=")?,
            metrics: field("metrics=")?,
            child,
            log,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn kill9(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }

    /// A clean stop, as systemd does it: SIGTERM, then wait for the exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        crate::wait_for("coordinator to exit after SIGTERM", LONG, || {
            Ok(self.child.try_wait()?)
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running vigil-agent with simulated GPUs.
pub struct Agent {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// The agent's `--sim-fault-file`: what it holds is what the simulated GPUs suffer.
    pub fault_file: PathBuf,
}

/// The machine-id of a test agent whose state lives in `state_dir`: its own, as if it ran on a
/// host of its own (the agents of a test all run on this machine, which has one machine-id).
pub fn test_machine_id(state_dir: &Path) -> String {
    // FNV-1a: stable across runs and Rust versions, unlike `DefaultHasher`.
    let hash = state_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("test-{hash:016x}")
}

/// Agents in tests retry fast, so reconnects do not dominate test time; their jobs run as the
/// user running the tests (root in CI, said explicitly) under the test's own directory.
fn agent_config(dir: &Path) -> Result<String> {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .context("cannot run id -un")?;
    let user = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || user.is_empty() {
        bail!("id -un failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(format!(
        "[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n\
         [workers]\nrun_as = \"{user}\"\nallowed_roots = [\"{}\"]\n",
        dir.display()
    ))
}

impl Agent {
    pub fn start(dir: &Path, url: &str, name: &str, gpus: u32) -> Result<Self> {
        Self::start_with(dir, url, name, gpus, "")
    }

    /// [`Agent::start`] with `extra` before its config (top-level keys, or a `[tls]` section for
    /// an `https://` coordinator; an `http://` one gets `--insecure`).
    pub fn start_with(dir: &Path, url: &str, name: &str, gpus: u32, extra: &str) -> Result<Self> {
        Self::start_env(dir, url, name, gpus, extra, &[])
    }

    /// [`Agent::start_with`] with `env` added to its environment (its workers inherit it).
    ///
    /// Every agent a test starts runs on this one machine, so each gets a machine-id of its own
    /// ([`test_machine_id`] of its state dir, kept across restarts: the same host coming back),
    /// unless `extra` has an `[identity]` section (a test that wants two agents to be one host).
    pub fn start_env(
        dir: &Path,
        url: &str,
        name: &str,
        gpus: u32,
        extra: &str,
        env: &Env,
    ) -> Result<Self> {
        let config = write_file(
            dir,
            &format!("agent-{name}.toml"),
            // Stopped agents stop their workers here: a test's teardown must leave nothing running.
            &format!(
                "keep_workers_on_shutdown = false\n{extra}\n{}",
                agent_config(dir)?
            ),
        )?;
        let log = dir.join(format!("agent-{name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let fault_file = write_file(dir, &format!("agent-{name}.faults"), "")?;
        let mut command = Command::new(crate::bin("vigil-agent")?);
        if url.starts_with("http://") {
            command.arg("--insecure");
        }
        if !extra.contains("[identity]") {
            let state_dir = dir.join(format!("agent-{name}-state"));
            command.args(["--machine-id", &test_machine_id(&state_dir)]);
        }
        let child = command
            .arg("--config")
            .arg(&config)
            .args([
                "--coordinator",
                url,
                "--node-name",
                name,
                "--gpu-backend",
                "sim",
            ])
            .args([
                "--sim-gpus",
                &gpus.to_string(),
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--state-dir")
            .arg(dir.join(format!("agent-{name}-state")))
            .arg("--sim-fault-file")
            .arg(&fault_file)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot start vigil-agent")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            fault_file,
        })
    }

    /// Replace the simulated faults with `lines` (one fault per line).
    pub fn set_faults(&self, lines: &str) -> Result<()> {
        // Write then rename, so the agent never reads a half-written file.
        let tmp = self.fault_file.with_extension("tmp");
        std::fs::write(&tmp, lines)?;
        std::fs::rename(&tmp, &self.fault_file)?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }

    /// Send SIGTERM and wait up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        crate::wait_for("agent to exit after SIGTERM", timeout, || {
            Ok(self.child.try_wait()?)
        })
    }
}

impl Drop for Agent {
    /// Stop gracefully, so the agent stops its workers (their own process
    /// groups would outlive a SIGKILLed agent); SIGKILL if it takes too long.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate(Duration::from_secs(10));
        }
        self.kill9();
    }
}
