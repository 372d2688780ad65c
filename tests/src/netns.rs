//! Clusters of network namespaces for fault-injection tests: one namespace per
//! host, a bridge between them, the real binaries inside, and everything the
//! test created (namespaces, veths, bridge, tmpfs, processes) removed on drop.
//!
//! Layout of one cluster (names carry the test process id and a counter, so
//! tests run in parallel; interface names live inside the cluster's own
//! namespaces, so they never collide):
//! - `vgl<pid>x<n>-hub`: the bridge `br0`; one veth end per host (`vc`, `v0`, `v1`, ...).
//! - `vgl<pid>x<n>-co`: the coordinator on `10.77.0.1:7770` (and the optional
//!   fault proxy on `:7771`); clusterctl runs here too, on loopback, so a
//!   partition never hides the coordinator from the test.
//! - `vgl<pid>x<n>-n<i>`: agent `node-<i>` at `10.77.0.<10+i>` and its workers.
//!
//! The temp dir (`dir`) is the cluster's shared file system: every namespace
//! sees the same mounts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{CtlOutput, LONG, bin, wait_for, write_file};

/// The one line a test prints when it cannot build namespaces.
pub const SKIP_LINE: &str = "skipping: network namespaces need root and iproute2";
/// Set to `1` (CI does) to turn that skip into a failure.
pub const REQUIRE_ENV: &str = "VIGIL_REQUIRE_NETNS";

const SUBNET: &str = "10.77.0";
const GRPC_PORT: u16 = 7770;
const PROXY_PORT: u16 = 7771;
/// Agents in tests retry fast, so reconnects do not dominate test time.
const AGENT_CONFIG: &str = "[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n";

static NEXT: AtomicUsize = AtomicUsize::new(0);

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
        // Straight to the stream: the test harness captures println! of passing tests.
        let _ = writeln!(std::io::stderr(), "{SKIP_LINE}");
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
fn sweep_stale() {
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

fn kill_all_in(ns: &str) {
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
    fn spawn(ns: &str, program: &Path, args: &[String], log: PathBuf) -> Result<Self> {
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
    fn first_line(&mut self) -> Result<String> {
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

/// One host: a namespace, an address, its agent.
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: String,
    hub_if: String,
    pub agent: Option<NsProcess>,
    pub fault_file: PathBuf,
}

/// How to build a [`NetCluster`].
pub struct Builder {
    config: String,
    hosts: usize,
    proxy: bool,
    state_tmpfs_kib: Option<u64>,
}

impl Builder {
    pub fn hosts(mut self, n: usize) -> Self {
        self.hosts = n;
        self
    }

    /// Agents reach the coordinator through the fault proxy (see [`crate::proxy`]).
    pub fn proxy(mut self) -> Self {
        self.proxy = true;
        self
    }

    /// The coordinator's data dir is a tmpfs of this size, to fill up.
    pub fn state_tmpfs_kib(mut self, kib: u64) -> Self {
        self.state_tmpfs_kib = Some(kib);
        self
    }

    /// Build the namespaces, start everything, wait until every node is
    /// Ready. `None` when namespaces are not available here (see [`available`]).
    pub fn start(self) -> Result<Option<NetCluster>> {
        if !available()? {
            return Ok(None);
        }
        sweep_stale();
        let t0 = crate::now();
        let prefix = format!(
            "vgl{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = NetCluster {
            dir: tempfile::tempdir()?,
            namespaces: Vec::new(),
            hub: format!("{prefix}-hub"),
            coord_ns: format!("{prefix}-co"),
            hosts: Vec::new(),
            coordinator: None,
            proxy: None,
            tmpfs: None,
            config: self.config,
            agent_url: String::new(),
        };
        c.add_ns(&c.hub.clone())?;
        ip(&["-n", &c.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &c.hub, "link", "set", "br0", "up"])?;
        c.plug(&c.coord_ns.clone(), "vc", &format!("{SUBNET}.1"))?;
        for i in 0..self.hosts {
            let ns = format!("{prefix}-n{i}");
            let addr = format!("{SUBNET}.{}", 10 + i);
            c.plug(&ns, &format!("v{i}"), &addr)?;
            let name = format!("node-{i}");
            c.hosts.push(Host {
                fault_file: write_file(c.dir.path(), &format!("agent-{name}.faults"), "")?,
                name,
                ns,
                ip: addr,
                hub_if: format!("v{i}"),
                agent: None,
            });
        }
        if let Some(kib) = self.state_tmpfs_kib {
            // The data dir goes inside the tmpfs, the filler beside it.
            let dir = c.dir.path().join("state-disk");
            std::fs::create_dir_all(&dir)?;
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
                .arg(&dir)
                .status()?;
            if !status.success() {
                bail!("cannot mount a tmpfs on {}", dir.display());
            }
            c.tmpfs = Some(dir);
        }
        let port = if self.proxy {
            let ctl = write_file(c.dir.path(), "proxy.ctl", "")?;
            let args = vec![
                format!("0.0.0.0:{PROXY_PORT}"),
                format!("127.0.0.1:{GRPC_PORT}"),
                ctl.display().to_string(),
            ];
            let log = c.dir.path().join("proxy.log");
            let mut p = NsProcess::spawn(&c.coord_ns, &bin("vigil-netproxy")?, &args, log)?;
            p.first_line()?;
            c.proxy = Some(p);
            PROXY_PORT
        } else {
            GRPC_PORT
        };
        c.agent_url = format!("http://{SUBNET}.1:{port}");
        c.start_coordinator()?;
        for i in 0..c.hosts.len() {
            let name = c.hosts[i].name.clone();
            c.start_agent(&name)?;
        }
        let n = c.hosts.len();
        wait_for("every node Ready", LONG, || c.all_ready(n))?;
        println!("netns cluster of {n} hosts ready in {:?}", t0.elapsed());
        Ok(Some(c))
    }
}

/// A coordinator and agents on separate network namespaces.
pub struct NetCluster {
    /// The shared file system of the cluster (job workdirs, checkpoints, logs).
    pub dir: tempfile::TempDir,
    namespaces: Vec<String>,
    hub: String,
    coord_ns: String,
    pub hosts: Vec<Host>,
    pub coordinator: Option<NsProcess>,
    proxy: Option<NsProcess>,
    tmpfs: Option<PathBuf>,
    config: String,
    agent_url: String,
}

impl NetCluster {
    /// A cluster whose coordinator runs with `config` (TOML).
    pub fn builder(config: &str) -> Builder {
        Builder {
            config: config.to_owned(),
            hosts: 2,
            proxy: false,
            state_tmpfs_kib: None,
        }
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A namespace joined to the bridge by a veth (`hub_if` on the bridge side, `eth0` inside).
    fn plug(&mut self, ns: &str, hub_if: &str, addr: &str) -> Result<()> {
        self.add_ns(ns)?;
        let hub = self.hub.clone();
        ip(&[
            "-n", &hub, "link", "add", hub_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", &hub, "link", "set", hub_if, "master", "br0"])?;
        ip(&["-n", &hub, "link", "set", hub_if, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        match &self.tmpfs {
            Some(disk) => disk.join("coordinator-data"),
            None => self.dir.path().join("coordinator-data"),
        }
    }

    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name}"))
    }

    fn host_mut(&mut self, name: &str) -> Result<&mut Host> {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name}"))
    }

    /// Start (or restart, on the same data dir) the coordinator.
    pub fn start_coordinator(&mut self) -> Result<()> {
        let config = write_file(self.dir.path(), "coordinator.toml", &self.config)?;
        let args = vec![
            "--config".into(),
            config.display().to_string(),
            "--listen".into(),
            format!("0.0.0.0:{GRPC_PORT}"),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
        ];
        let log = self.dir.path().join("coordinator.log");
        let mut p = NsProcess::spawn(&self.coord_ns, &bin("vigil-coordinator")?, &args, log)?;
        p.first_line()?;
        self.coordinator = Some(p);
        Ok(())
    }

    fn coordinator_pid(&self) -> Result<u32> {
        Ok(self
            .coordinator
            .as_ref()
            .context("coordinator not running")?
            .pid())
    }

    pub fn kill9_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill9();
        }
    }

    pub fn pause_coordinator(&self) -> Result<()> {
        signal(self.coordinator_pid()?, "STOP")
    }

    pub fn resume_coordinator(&self) -> Result<()> {
        signal(self.coordinator_pid()?, "CONT")
    }

    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// Start the agent of host `name` (again, after a kill: same state dir).
    pub fn start_agent(&mut self, name: &str) -> Result<()> {
        let dir = self.dir.path().to_owned();
        let config = write_file(&dir, &format!("agent-{name}.toml"), AGENT_CONFIG)?;
        let url = self.agent_url.clone();
        let host = self.host_mut(name)?;
        let args: Vec<String> = [
            "--config",
            &config.display().to_string(),
            "--coordinator",
            &url,
            "--node-name",
            name,
            "--gpu-backend",
            "sim",
            "--sim-gpus",
            "8",
            "--metrics-listen",
            "127.0.0.1:0",
            "--state-dir",
            &dir.join(format!("agent-{name}-state"))
                .display()
                .to_string(),
            "--sim-fault-file",
            &host.fault_file.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        let log = dir.join(format!("agent-{name}.log"));
        let ns = host.ns.clone();
        let mut p = NsProcess::spawn(&ns, &bin("vigil-agent")?, &args, log)?;
        // The agent prints nothing on stdout; let it go.
        p.child.stdout.take();
        host.agent = Some(p);
        Ok(())
    }

    /// `kill -9` the agent only: its workers, in their own process groups, live on.
    pub fn kill9_agent(&mut self, name: &str) -> Result<()> {
        if let Some(mut a) = self.host_mut(name)?.agent.take() {
            a.kill9();
        }
        Ok(())
    }

    /// The host dies: every process in its namespace (agent and workers) is `kill -9`ed.
    pub fn kill_host(&mut self, name: &str) -> Result<()> {
        let host = self.host_mut(name)?;
        let ns = host.ns.clone();
        if let Some(a) = host.agent.as_ref() {
            let _ = signal(a.pid(), "KILL");
        }
        kill_all_in(&ns);
        if let Some(mut a) = self.host_mut(name)?.agent.take() {
            a.kill9();
        }
        Ok(())
    }

    /// Cut host `name` off the network (its bridge port goes down); processes keep running.
    pub fn cut(&self, name: &str) -> Result<()> {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &self.host(name)?.hub_if,
            "down",
        ])?;
        Ok(())
    }

    /// Undo [`cut`](Self::cut).
    pub fn heal(&self, name: &str) -> Result<()> {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &self.host(name)?.hub_if,
            "up",
        ])?;
        Ok(())
    }

    /// Pids and command lines of the processes in host `name`'s namespace.
    pub fn processes(&self, name: &str) -> Result<Vec<(u32, String)>> {
        Ok(pids_in(&self.host(name)?.ns)
            .into_iter()
            .map(|p| (p, cmdline(p)))
            .filter(|(_, c)| !c.is_empty())
            .collect())
    }

    /// Pids of fake-trainer workers running on host `name`.
    pub fn trainers(&self, name: &str) -> Result<Vec<u32>> {
        Ok(self
            .processes(name)?
            .into_iter()
            .filter(|(_, c)| c.contains("fake-trainer"))
            .map(|(p, _)| p)
            .collect())
    }

    /// Replace the fault proxy's settings (see [`crate::proxy`] for the lines).
    pub fn set_proxy(&self, settings: &str) -> Result<()> {
        let path = self.dir.path().join("proxy.ctl");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, settings)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Fill the coordinator's tmpfs data dir: one file takes every free byte.
    pub fn fill_state_dir(&self) -> Result<u64> {
        let dir = self.tmpfs.as_ref().context("no state tmpfs")?;
        let mut f = std::fs::File::create(dir.join("filler"))?;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(written)
    }

    /// Give the space back.
    pub fn free_state_dir(&self) -> Result<()> {
        let dir = self.tmpfs.as_ref().context("no state tmpfs")?;
        std::fs::remove_file(dir.join("filler"))?;
        Ok(())
    }

    /// Inject simulated GPU faults on host `name` (one per line; see the agent's `--sim-fault-file`).
    pub fn set_faults(&self, name: &str, lines: &str) -> Result<()> {
        let path = &self.host(name)?.fault_file;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, lines)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Run clusterctl in the coordinator's namespace, over loopback.
    pub fn ctl(&self, args: &[&str]) -> Result<CtlOutput> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.coord_ns])
            .arg(bin("clusterctl")?)
            .arg("--coordinator")
            .arg(format!("http://127.0.0.1:{GRPC_PORT}"))
            .args(args)
            .env_remove("VIGIL_COORDINATOR")
            .output()
            .context("cannot run clusterctl")?;
        Ok(CtlOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `clusterctl -o json nodes`, keyed by node name.
    pub fn nodes(&self) -> Result<BTreeMap<String, Value>> {
        let v = self.ctl(&["-o", "json", "nodes"])?.json()?;
        let list = v["nodes"].as_array().context("no \"nodes\" array")?;
        Ok(list
            .iter()
            .filter_map(|n| Some((n["name"].as_str()?.to_owned(), n.clone())))
            .collect())
    }

    pub fn node(&self, name: &str) -> Result<Value> {
        self.nodes()?
            .remove(name)
            .with_context(|| format!("node {name} not listed"))
    }

    fn all_ready(&self, count: usize) -> Result<Option<()>> {
        let nodes = self.nodes()?;
        let ok = nodes.len() == count && nodes.values().all(|n| n["availability"] == "Ready");
        Ok(ok.then_some(()))
    }

    /// Submit a job spec (TOML text); returns the job id.
    pub fn submit(&self, spec: &str) -> Result<String> {
        let path = write_file(self.dir.path(), "job.toml", spec)?;
        let v = self
            .ctl(&["-o", "json", "job", "submit", &path.to_string_lossy()])?
            .json()?;
        v["job"]["id"]
            .as_str()
            .map(str::to_owned)
            .context("no job id in the answer")
    }

    /// `clusterctl -o json job show ID`.
    pub fn job(&self, id: &str) -> Result<Value> {
        self.ctl(&["-o", "json", "job", "show", id])?.json()
    }

    /// Wait until the job's detail satisfies `cond`; returns that detail.
    pub fn wait_job(&self, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
        wait_for(what, LONG, || {
            let job = self.job(id)?;
            Ok(cond(&job).then_some(job))
        })
    }

    /// Wait until node `name`'s summary satisfies `cond`.
    pub fn wait_node(&self, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Result<()> {
        wait_for(what, LONG, || Ok(cond(&self.node(name)?).then_some(())))
    }
}

impl Drop for NetCluster {
    /// Processes first (a namespace lives as long as one of its processes),
    /// then the tmpfs, then the namespaces (taking their veths and the bridge along).
    fn drop(&mut self) {
        self.coordinator.take();
        self.proxy.take();
        for h in &mut self.hosts {
            h.agent.take();
        }
        for ns in &self.namespaces {
            kill_all_in(ns);
        }
        if let Some(dir) = &self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(dir).status();
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                let _ = writeln!(std::io::stderr(), "cleanup: {e:#}");
            }
        }
    }
}
