//! A real etcd cluster on loopback for the HA tests: Debian's `etcd` binary,
//! one process per member, each with its own data dir under the test's temp
//! dir, killed on drop.
//!
//! Where `etcd` is not installed (a developer's laptop), the HA tests print
//! [`SKIP_LINE`] and pass; `.ci/run` sets `VIGIL_REQUIRE_ETCD=1`, which turns
//! that skip into a failure, so CI never goes green without running them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{LONG, wait_for};

pub const REQUIRE_ENV: &str = "VIGIL_REQUIRE_ETCD";
pub const SKIP_LINE: &str = "SKIP: etcd is not installed (Debian: apt-get install etcd-server); the HA tests need a real etcd cluster";

/// Whether the test can run; `false` after printing the skip line. Panics
/// instead of skipping when [`REQUIRE_ENV`] is set.
pub fn available() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but etcd is not installed: {SKIP_LINE}");
    }
    // Straight to the stream: libtest captures println!/eprintln! of passing
    // tests, so a plain `cargo test` would not show that this one did nothing.
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{SKIP_LINE}");
    false
}

/// A free loopback port (the OS picks one; there is a small window in which
/// another process could take it).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The files of etcd's client port with TLS: its CA (which signs the
/// certificates clients must present) and the members' server certificate.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// Plain HTTP `/health` (and `/metrics`), whatever the client port speaks.
    pub metrics_port: u16,
    scheme: &'static str,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    tls: Option<ServerTls>,
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until the cluster has a leader.
    pub fn start(dir: &Path, n: usize) -> Result<Self> {
        Self::start_with(dir, n, None)
    }

    /// As [`Self::start`], with `https` client ports that require a client
    /// certificate signed by `tls.ca` (etcd's `--client-cert-auth`); peers
    /// talk plain HTTP among themselves.
    pub fn start_tls(dir: &Path, n: usize, tls: ServerTls) -> Result<Self> {
        Self::start_with(dir, n, Some(tls))
    }

    /// Ports come from [`free_port`], and another process may take one before etcd binds it
    /// (parallel tests open ports all the time): a member that exits at start is such a
    /// collision, and the whole cluster is started again on fresh ports and data dirs.
    fn start_with(dir: &Path, n: usize, tls: Option<ServerTls>) -> Result<Self> {
        let mut tries = 0;
        loop {
            tries += 1;
            let attempt_dir = dir.join(format!("etcd-try{tries}"));
            std::fs::create_dir_all(&attempt_dir)?;
            match Self::start_once(&attempt_dir, n, tls.clone()) {
                Ok(cluster) => return Ok(cluster),
                Err(e) if tries < 3 && format!("{e:#}").contains("exited at start") => {
                    eprintln!("etcd test cluster: {e:#}; starting again on other ports");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_once(dir: &Path, n: usize, tls: Option<ServerTls>) -> Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("etcd-{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                metrics_port: free_port()?,
                scheme,
                data_dir: dir.join(format!("etcd-{i}.data")),
                log: dir.join(format!("etcd-{i}.log")),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            tls,
        };
        for i in 0..n {
            cluster.start_member(i)?;
        }
        // On failure the cluster is dropped, and its members killed, before a retry.
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// The endpoints as a TOML array: `["http://127.0.0.1:1", ...]`.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// (Re)starts member `i` on its data dir: a restarted member rejoins.
    pub fn start_member(&mut self, i: usize) -> Result<()> {
        let (initial_cluster, tls) = (&self.initial_cluster, &self.tls);
        let m = self.members.get_mut(i).context("no such member")?;
        if m.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let client = m.endpoint();
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let mut command = Command::new("etcd");
        if let Some(tls) = tls {
            command
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
        }
        let child = command
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "vigil-test",
                "--listen-metrics-urls",
                &metrics,
                // etcd's defaults: 100 ms heartbeats, 1 s election timeout.
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start etcd")?;
        m.child = Some(child);
        Ok(())
    }

    /// `kill -9` member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(m) = self.members.get_mut(i)
            && let Some(mut child) = m.child.take()
        {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Waits until every running member reports healthy (it has a leader); a member that has
    /// exited is an error at once ("exited at start", with its log).
    pub fn wait_healthy(&mut self) -> Result<()> {
        for m in self.members.iter_mut().filter(|m| m.running()) {
            let addr = format!("127.0.0.1:{}", m.metrics_port).parse()?;
            let (name, log) = (m.name.clone(), m.log.clone());
            wait_for(&format!("etcd member {name} healthy"), LONG, || {
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    bail!(
                        "etcd member {name} exited at start ({status}); its log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                Ok(crate::http_get(addr, "/health")
                    .ok()
                    .filter(|body| body.contains("\"health\":\"true\""))
                    .map(|_| ()))
            })?;
        }
        Ok(())
    }

    pub fn log_text(&self, i: usize) -> String {
        self.members
            .get(i)
            .and_then(|m| std::fs::read_to_string(&m.log).ok())
            .unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// The `ha` object of `clusterctl -o json status`, asked of `urls`.
pub fn ha_status(urls: &str) -> Result<serde_json::Value> {
    Ok(crate::clusterctl(urls, &["-o", "json", "status"])?.json()?["ha"].clone())
}

/// The leading coordinator's name in an `ha` object; "" when none leads.
pub fn leader_name(ha: &serde_json::Value) -> String {
    ha["leader"].as_str().unwrap_or("").to_owned()
}

/// Sends `sig` (e.g. "STOP", "CONT") to `pid`.
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// A short pause, for polling loops.
pub fn tick() {
    std::thread::sleep(Duration::from_millis(100));
}
