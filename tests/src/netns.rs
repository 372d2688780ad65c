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
//!
//! Faults: [`NetCluster::cut`] / [`NetCluster::heal`] a host's link,
//! [`NetCluster::kill_host`], [`NetCluster::kill9_agent`], pause and resume
//! or `kill -9` the coordinator, latency / stalls / resets through the fault
//! proxy ([`crate::proxy`], [`Builder::proxy`]), and a tmpfs data dir to fill
//! ([`Builder::state_tmpfs_kib`]). `netns/sys.rs` holds the `ip`/`kill` plumbing,
//! `netns/control.rs` the clusterctl side.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail, ensure};

use crate::{LONG, bin, wait_for, write_file};

mod control;
mod fabric;
mod sys;

pub use fabric::FABRIC_SUBNET;
pub use sys::{NsProcess, REQUIRE_ENV, SKIP_LINE, available, cmdline, ip, pids_in, signal};
use sys::{kill_all_in, sweep_stale};

const SUBNET: &str = "10.77.0";
const GRPC_PORT: u16 = 7770;
const PROXY_PORT: u16 = 7771;
/// Agents in tests retry fast, so reconnects do not dominate test time.
const AGENT_CONFIG: &str = "[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n";

static NEXT: AtomicUsize = AtomicUsize::new(0);

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
            agent_bin: None,
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
    /// The vigil-agent that [`NetCluster::start_agent`] runs: the build's, or a copy that
    /// [`NetCluster::install_agent_binary`] put (and replaces) in the cluster's dir.
    agent_bin: Option<PathBuf>,
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
        // Plaintext inside the test's own namespaces: these scenarios break the network,
        // not the transport (tests/tests/security.rs covers mutual TLS).
        let args = vec![
            "--insecure".into(),
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
        // Workers run as root here (the test's own user) and work under the shared dir.
        let config = write_file(
            &dir,
            &format!("agent-{name}.toml"),
            &format!(
                "{AGENT_CONFIG}\n[workers]\nrun_as = \"root\"\nallowed_roots = [{:?}]\n",
                dir.display().to_string()
            ),
        )?;
        let url = self.agent_url.clone();
        let program = match &self.agent_bin {
            Some(path) => path.clone(),
            None => bin("vigil-agent")?,
        };
        let host = self.host_mut(name)?;
        let state_dir = dir.join(format!("agent-{name}-state"));
        let machine_id = crate::process::test_machine_id(&state_dir);
        let args: Vec<String> = [
            "--insecure",
            "--config",
            &config.display().to_string(),
            "--coordinator",
            &url,
            "--node-name",
            name,
            "--gpu-backend",
            "sim",
            "--machine-id",
            &machine_id,
            "--sim-gpus",
            "8",
            "--metrics-listen",
            "127.0.0.1:0",
            "--state-dir",
            &state_dir.display().to_string(),
            "--sim-fault-file",
            &host.fault_file.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        let log = dir.join(format!("agent-{name}.log"));
        let ns = host.ns.clone();
        let mut p = NsProcess::spawn(&ns, &program, &args, log)?;
        // The agent prints nothing on stdout; let it go.
        p.child.stdout.take();
        host.agent = Some(p);
        Ok(())
    }

    /// Installs the build's vigil-agent as `<dir>/bin/vigil-agent` as a package upgrade does:
    /// a new file renamed over the old one, so running agents and shims keep the old inode.
    /// Agents started from now on run it.
    pub fn install_agent_binary(&mut self) -> Result<PathBuf> {
        let dir = self.dir.path().join("bin");
        std::fs::create_dir_all(&dir)?;
        let target = dir.join("vigil-agent");
        let tmp = dir.join(".vigil-agent.new");
        std::fs::copy(bin("vigil-agent")?, &tmp)?;
        std::fs::rename(&tmp, &target)?;
        self.agent_bin = Some(target.clone());
        Ok(target)
    }

    /// SIGTERM to the agent of `name`, and wait until it exited (as `systemctl stop` does).
    pub fn terminate_agent(&mut self, name: &str) -> Result<()> {
        let Some(mut agent) = self.host_mut(name)?.agent.take() else {
            return Ok(());
        };
        signal(agent.pid(), "TERM")?;
        let exited = wait_for("the agent to exit after SIGTERM", LONG, || {
            Ok(agent.child.try_wait()?)
        })?;
        ensure!(exited.success(), "agent {name} exited with {exited}");
        Ok(())
    }

    /// The pids of the per-attempt shims on host `name`.
    pub fn shims(&self, name: &str) -> Result<Vec<u32>> {
        self.pids_where(name, |c| c.starts_with("vigil-agent shim "))
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
        self.pids_where(name, |c| c.contains("fake-trainer"))
    }

    /// Pids of the processes on host `name` whose command line `matches`.
    fn pids_where(&self, name: &str, matches: impl Fn(&str) -> bool) -> Result<Vec<u32>> {
        Ok(self
            .processes(name)?
            .into_iter()
            .filter(|(_, c)| matches(c))
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
