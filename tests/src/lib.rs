//! Harness for end-to-end tests: starts the real vigil binaries as separate
//! processes on ephemeral loopback ports, with temp data dirs, and kills them
//! (SIGKILL) when a test ends; `netns` builds clusters of network namespaces
//! for the fault-injection suite (tests/tests/reliability*.rs).
//!
//! ```no_run
//! let cluster = vigil_tests::Cluster::start(vigil_tests::FAST_LIVENESS, 2)?;
//! vigil_tests::wait_for("both nodes Ready", vigil_tests::LONG, || cluster.all("Ready", 2))?;
//! # Ok::<(), anyhow::Error>(())
//! ```

// Layout: `process` (binaries as child processes), `jobs` (job specs and
// readers), `faketime` (one process's wall clock, stepped), `netns`
// (clusters of network namespaces) with `proxy` (the TCP fault proxy),
// `scenario` (what reliability scenarios check) and `report` (their rows for
// docs/reliability.md), `slurm` (a real slurmctld and three slurmd on one host).
pub mod etcd;
pub mod faketime;
pub mod jobs;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod report;
pub mod scenario;
pub mod slurm;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::time::Instant;

pub use process::{Agent, Coordinator, Env, bin};

/// Deadline for anything that should take a second or two: generous, since a
/// loaded 2-core CI machine can be slow; tests measure and report real times.
pub const LONG: Duration = Duration::from_secs(60);

/// Liveness settings that keep end-to-end tests short.
pub const FAST_LIVENESS: &str = r#"
[liveness]
heartbeat_interval = "200ms"
unreachable_after = "1s"
lost_after = "3s"
agent_lease = "2s"
"#;

/// The monotonic clock of the test process (outside a paused runtime,
/// tokio's `Instant` is the real clock).
pub fn now() -> Instant {
    Instant::now()
}

/// Poll `cond` every 50 ms until it is true or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = now();
    let mut last_err = None;
    loop {
        match cond() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Output of one clusterctl run.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for CtlOutput {
    fn from(out: std::process::Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl CtlOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn json(&self) -> Result<Value> {
        if !self.success() {
            bail!(
                "clusterctl failed ({:?}): {}",
                self.code,
                self.stderr.trim()
            );
        }
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("clusterctl printed non-JSON: {}", self.stdout))
    }
}

/// Run clusterctl against `url`.
pub fn clusterctl(url: &str, args: &[&str]) -> Result<CtlOutput> {
    let mut command = std::process::Command::new(bin("clusterctl")?);
    // A plaintext test cluster; an https:// one gets --ca/--cert/--key in `args`.
    if url.starts_with("http://") {
        command.arg("--insecure");
    }
    let out = command
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .env_remove("VIGIL_COORDINATOR")
        .output()
        .context("cannot run clusterctl")?;
    Ok(out.into())
}

/// `clusterctl -o json nodes`, keyed by node name.
pub fn nodes(url: &str) -> Result<std::collections::BTreeMap<String, Value>> {
    let v = clusterctl(url, &["-o", "json", "nodes"])?.json()?;
    let list = v["nodes"]
        .as_array()
        .context("nodes JSON has no \"nodes\" array")?;
    Ok(list
        .iter()
        .filter_map(|n| Some((n["name"].as_str()?.to_owned(), n.clone())))
        .collect())
}

/// A coordinator and N simulated agents (`node-0`, `node-1`, ...), all real processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub coordinator: Coordinator,
    pub agents: Vec<Agent>,
    config: String,
    /// Added to the coordinator's environment, at every (re)start.
    coordinator_env: Vec<(OsString, OsString)>,
}

impl Cluster {
    pub fn start(coordinator_config: &str, agents: usize) -> Result<Self> {
        Self::start_env(coordinator_config, agents, &[])
    }

    /// [`Cluster::start`] with `coordinator_env` added to the coordinator's environment.
    pub fn start_env(
        coordinator_config: &str,
        agents: usize,
        coordinator_env: &Env,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let coordinator =
            Coordinator::start_env(dir.path(), coordinator_config, None, coordinator_env)?;
        let mut cluster = Self {
            dir,
            coordinator,
            agents: Vec::new(),
            config: coordinator_config.to_owned(),
            coordinator_env: coordinator_env.to_vec(),
        };
        for i in 0..agents {
            cluster.add_agent(&format!("node-{i}"))?;
        }
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    pub fn add_agent(&mut self, name: &str) -> Result<()> {
        let agent = Agent::start(self.dir.path(), &self.url(), name, 8)?;
        self.agents.push(agent);
        Ok(())
    }

    /// Add an agent whose config file also holds `extra` (top-level keys).
    pub fn add_agent_with(&mut self, name: &str, extra: &str) -> Result<()> {
        let agent = Agent::start_with(self.dir.path(), &self.url(), name, 8, extra)?;
        self.agents.push(agent);
        Ok(())
    }

    /// Add an agent with `env` added to its environment.
    pub fn add_agent_env(&mut self, name: &str, env: &Env) -> Result<()> {
        let agent = Agent::start_env(self.dir.path(), &self.url(), name, 8, "", env)?;
        self.agents.push(agent);
        Ok(())
    }

    pub fn agent(&self, name: &str) -> Result<&Agent> {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .with_context(|| format!("no agent {name}"))
    }

    /// One node's summary from `clusterctl -o json nodes`.
    pub fn node(&self, name: &str) -> Result<Value> {
        nodes(&self.url())?
            .remove(name)
            .with_context(|| format!("node {name} not listed"))
    }

    pub fn agent_mut(&mut self, name: &str) -> Option<&mut Agent> {
        self.agents.iter_mut().find(|a| a.name == name)
    }

    /// `kill -9` the coordinator, then start a new one on the same data dir and port.
    pub fn restart_coordinator(&mut self) -> Result<()> {
        self.coordinator.kill9();
        let addr: SocketAddr = self.coordinator.grpc;
        self.coordinator = Coordinator::start_env(
            self.dir.path(),
            &self.config,
            Some(addr),
            &self.coordinator_env,
        )?;
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator-data")
    }

    /// Every node listed is in `availability`.
    pub fn all(&self, availability: &str, count: usize) -> Result<Option<()>> {
        let nodes = nodes(&self.url())?;
        let ok = nodes.len() == count && nodes.values().all(|n| n["availability"] == availability);
        Ok(ok.then_some(()))
    }
}

impl Cluster {
    /// Submit a job spec (TOML text); returns the job id.
    pub fn submit(&self, spec: &str) -> Result<String> {
        let path = write_file(self.dir.path(), "job.toml", spec)?;
        let path = path.to_string_lossy().into_owned();
        let v = clusterctl(&self.url(), &["-o", "json", "job", "submit", &path])?.json()?;
        v["job"]["id"]
            .as_str()
            .map(str::to_owned)
            .context("no job id in the answer")
    }

    /// `clusterctl -o json job show ID`.
    pub fn job(&self, id: &str) -> Result<Value> {
        clusterctl(&self.url(), &["-o", "json", "job", "show", id])?.json()
    }

    /// Wait until the job's detail satisfies `cond`; returns that detail.
    pub fn wait_job(&self, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
        wait_for(what, LONG, || {
            let job = self.job(id)?;
            Ok(cond(&job).then_some(job))
        })
    }
}

/// Write `text` to `dir/name` and return the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// A minimal HTTP/1.0 GET (status line, headers and body), enough for /metrics and /healthz.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of one sample line (`name{labels} value`) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
