//! A real Slurm on one host for the Slurm tests (tests/tests/slurm.rs): `munged` with its own
//! key and socket, `slurmctld`, and three `slurmd` (`n1`..`n3`, one per `NodeName`, each on its
//! own port: Debian's build has multiple-slurmd support), all from a `slurm.conf` written into
//! a temp dir, on loopback ports the OS picked; every job cancelled and every daemon killed on
//! drop.
//!
//! Where Slurm cannot run (not installed, not root), the tests print [`SKIP_LINE`] and pass;
//! `.ci/run` sets `VIGIL_REQUIRE_SLURM=1`, which turns that skip into a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::etcd::free_port;
use crate::{LONG, wait_for};

pub const REQUIRE_ENV: &str = "VIGIL_REQUIRE_SLURM";
pub const SKIP_LINE: &str = "SKIP: Slurm cannot run here (needs root and Debian's slurm-wlm and munge: apt-get install slurm-wlm munge); the Slurm tests need a real slurmctld and slurmd";

/// The Slurm node names of the test cluster.
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// Whether the test can run; `false` after printing the skip line. Panics instead of skipping
/// when [`REQUIRE_ENV`] is set.
pub fn available() -> bool {
    let found = [
        "munged",
        "slurmctld",
        "slurmd",
        "sbatch",
        "scontrol",
        "squeue",
        "sinfo",
    ]
    .iter()
    .all(|b| which(b).is_some());
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if found && root {
        return true;
    }
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but Slurm cannot run: {SKIP_LINE}");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{SKIP_LINE}");
    false
}

/// `program` on PATH or in /usr/sbin (where Debian puts the daemons).
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

pub struct SlurmCluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    daemons: Vec<(String, Child)>,
}

impl SlurmCluster {
    /// Starts munged, slurmctld and the three slurmd under `dir`; returns once `sinfo` shows
    /// every node idle.
    pub fn start(dir: &Path) -> Result<Self> {
        let dir = dir.join("slurm");
        for sub in ["state", "log", "spool"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let key = dir.join("munge.key");
        std::fs::write(&key, fastrand_key())?;
        set_mode(&key, 0o400)?;
        let socket = dir.join("munge.sock");
        let mut cluster = Self {
            conf: dir.join("slurm.conf"),
            dir: dir.clone(),
            daemons: Vec::new(),
        };
        cluster.spawn(
            "munged",
            Command::new(which("munged").context("munged not found")?)
                .args(["--foreground", "--force"])
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--pid-file={}", dir.join("munged.pid").display()))
                .arg(format!(
                    "--log-file={}",
                    dir.join("log/munged.log").display()
                ))
                .arg(format!("--seed-file={}", dir.join("munged.seed").display())),
        )?;
        wait_for("munged's socket", LONG, || {
            Ok(socket.exists().then_some(()))
        })?;
        std::fs::write(&cluster.conf, slurm_conf(&dir, &socket)?)?;
        let ctld = Command::new(which("slurmctld").context("slurmctld not found")?)
            .args(["-D", "-i", "-f"])
            .arg(&cluster.conf)
            .env("SLURM_CONF", &cluster.conf)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .context("starting slurmctld")?;
        cluster.daemons.push(("slurmctld".into(), ctld));
        for node in NODES {
            std::fs::create_dir_all(dir.join("spool").join(node))?;
            cluster.spawn(
                &format!("slurmd {node}"),
                Command::new(which("slurmd").context("slurmd not found")?)
                    .args(["-D", "-N", node, "-f"])
                    .arg(&cluster.conf),
            )?;
        }
        wait_for("every slurmd idle in sinfo", LONG, || {
            let out = cluster.run("sinfo", &["--noheader", "--Node", "--format=%N %T"])?;
            let idle = out.lines().filter(|l| l.ends_with(" idle")).count();
            Ok((idle == NODES.len()).then_some(()))
        })
        .with_context(|| cluster.logs())?;
        Ok(cluster)
    }

    fn spawn(&mut self, name: &str, command: &mut Command) -> Result<()> {
        let child = command
            .env("SLURM_CONF", &self.conf)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.daemons.push((name.to_owned(), child));
        Ok(())
    }

    /// A Slurm client command (`sbatch`, `scontrol`, ...) against this cluster; its stdout, or
    /// an error with its stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.output(program, args)?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        Command::new(program)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .with_context(|| format!("cannot run {program}"))
    }

    /// `scontrol show node NAME`'s `State=` and `Reason=` (reason without Slurm's
    /// `[user@time]` suffix; empty when none).
    pub fn node_state(&self, node: &str) -> Result<(String, String)> {
        let out = self.run(
            "sinfo",
            &["--noheader", "--Node", "--nodes", node, "--format=%T|%E"],
        )?;
        let line = out.lines().next().context("sinfo printed nothing")?;
        let (state, reason) = line.split_once('|').context("sinfo line without |")?;
        let reason = if reason.trim() == "none" {
            ""
        } else {
            reason.trim()
        };
        Ok((state.trim().to_owned(), reason.to_owned()))
    }

    /// `squeue`'s state and (expanded) nodes of job `id`; `None` once it left the queue.
    pub fn job(&self, id: &str) -> Result<Option<(String, Vec<String>)>> {
        let out = self.run("squeue", &["--noheader", "--jobs", id, "--format=%T|%N"])?;
        let Some(line) = out.lines().next() else {
            return Ok(None);
        };
        let (state, nodes) = line.split_once('|').context("squeue line without |")?;
        let nodes = if nodes.trim().is_empty() {
            Vec::new()
        } else {
            self.run("scontrol", &["show", "hostnames", nodes.trim()])?
                .lines()
                .map(str::to_owned)
                .collect()
        };
        Ok(Some((state.trim().to_owned(), nodes)))
    }

    /// The daemons' log files, for a failure message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("log")) {
            for entry in entries.flatten() {
                let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = body.lines().rev().take(15).collect();
                text.push_str(&format!("--- {}\n", entry.path().display()));
                for line in tail.iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        // Cancel every job first, so no job script outlives the test (slurmstepd kills it).
        let _ = self.output("scancel", &["--full", "--user=root"]);
        let _ = wait_for("the queue to empty", Duration::from_secs(20), || {
            Ok(self
                .run("squeue", &["--noheader"])?
                .trim()
                .is_empty()
                .then_some(()))
        });
        for (_, child) in self.daemons.iter_mut().rev() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// munge's key: 1 KiB of random bytes (it refuses a short one).
fn fastrand_key() -> Vec<u8> {
    (0..1024).map(|_| fastrand::u8(..)).collect()
}

/// The test cluster's slurm.conf: everything under `dir`, every port picked by the OS,
/// process tracking without cgroups, and a requeued job held the way Slurm holds it.
fn slurm_conf(dir: &Path, munge_socket: &Path) -> Result<String> {
    let d = dir.display();
    let mut conf = format!(
        "ClusterName=vigiltest\n\
         SlurmctldHost=localhost(127.0.0.1)\n\
         SlurmctldPort={ctld}\n\
         SlurmdPort={slurmd}\n\
         SlurmUser=root\n\
         SlurmdUser=root\n\
         AuthType=auth/munge\n\
         AuthInfo=socket={socket}\n\
         CredType=cred/munge\n\
         StateSaveLocation={d}/state\n\
         SlurmdSpoolDir={d}/spool/%n\n\
         SlurmctldPidFile={d}/slurmctld.pid\n\
         SlurmdPidFile={d}/slurmd-%n.pid\n\
         SlurmctldLogFile={d}/log/slurmctld.log\n\
         SlurmdLogFile={d}/log/slurmd-%n.log\n\
         ProctrackType=proctrack/pgid\n\
         TaskPlugin=task/none\n\
         JobAcctGatherType=jobacct_gather/none\n\
         AccountingStorageType=accounting_storage/none\n\
         JobCompType=jobcomp/none\n\
         MpiDefault=none\n\
         SwitchType=switch/none\n\
         SchedulerType=sched/builtin\n\
         SelectType=select/linear\n\
         ReturnToService=2\n\
         SlurmctldTimeout=30\n\
         SlurmdTimeout=60\n\
         InactiveLimit=0\n\
         MinJobAge=300\n\
         KillWait=2\n\
         Waittime=0\n",
        ctld = free_port()?,
        slurmd = free_port()?,
        socket = munge_socket.display(),
    );
    for node in NODES {
        conf.push_str(&format!(
            "NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={} CPUs=1 \
             RealMemory=100 State=UNKNOWN\n",
            free_port()?
        ));
    }
    conf.push_str("PartitionName=main Nodes=n[1-3] Default=YES MaxTime=INFINITE State=UP\n");
    Ok(conf)
}
