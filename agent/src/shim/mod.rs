//! The per-attempt shim: a small supervisor that outlives the agent (`vigil-agent shim`).
//!
//! Each attempt's worker runs under its own shim, started by the agent from its own binary
//! (`/proc/self/exe`, so a binary replaced by an upgrade is no obstacle). The shim:
//! - starts the worker and owns it: the worker is the shim's child, so the shim knows its exit
//!   status and writes it durably to `<attempt dir>/shim-status.json` before it exits;
//! - **holds the fence**: it stops the worker when no live agent has renewed the lease in
//!   `<state_dir>/lease.json` before its deadline (a `CLOCK_BOOTTIME` instant, so a step of the
//!   wall clock changes nothing), whether or not any agent is running;
//! - stops the worker when the agent asks (`shim-stop.json`, then SIGTERM to the shim):
//!   SIGTERM to the worker's process group, SIGKILL after the grace;
//! - takes the worker with it when it dies itself: the worker's process group also holds a
//!   guard (`vigil-agent shim-guard`, see [`guard`]) that reads a pipe only the shim can write;
//!   when the shim is gone, for any reason, the pipe ends and the guard kills the group.
//!
//! An agent that restarts finds each shim through `workers.json`, re-adopts the worker (same
//! attempt, same processes) and reports it at registration, so nothing restarts.
//!
//! The files here are the contract between the agent and its shims, across versions: fields
//! are only ever added, with defaults.

pub mod guard;
mod run;

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use run::main;

/// The lease the agent renews for its shims, in `<state_dir>`.
pub const LEASE_FILE: &str = "lease.json";
/// In the attempt dir: written by the shim, last with the worker's exit.
pub const STATUS_FILE: &str = "shim-status.json";
/// In the attempt dir: written by the agent to stop the worker, before it signals the shim.
pub const STOP_FILE: &str = "shim-stop.json";
/// In the attempt dir: the shim's own log (its stderr).
pub const LOG_FILE: &str = "shim.log";
/// The longest the agent waits for a new shim to say whether its worker started.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the agent tells a new shim, as JSON on its standard input (never on disk: the
/// environment may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub job_id: String,
    pub attempt: u64,
    pub node_rank: u32,
    /// Program and arguments, run without a shell.
    pub command: Vec<String>,
    pub workdir: PathBuf,
    /// Added to the shim's own environment (the agent's, less systemd's notification variables).
    pub env: BTreeMap<String, String>,
    /// Who the worker runs as; `None`: the shim's own user.
    pub identity: Option<Identity>,
    /// The worker's log: stdout and stderr are appended to it.
    pub log: PathBuf,
    /// The attempt dir, holding the status and stop files.
    pub dir: PathBuf,
    /// `<state_dir>/lease.json`.
    pub lease_file: PathBuf,
    /// SIGTERM-to-SIGKILL time when the shim stops the worker by itself (lease expired).
    pub lease_stop_grace_ms: u64,
    /// SIGTERM-to-SIGKILL time when a stop names none.
    pub stop_grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The shim's one line on its standard output, once the worker started (or could not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handshake {
    Running(Running),
    Failed { error: String },
}

/// A running worker, as its shim saw it start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub shim_pid: u32,
    pub worker_pid: u32,
    /// The worker's process group (led by the guard).
    pub pgid: i32,
}

/// `shim-status.json`: written once the worker runs, and again with its exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub running: Running,
    #[serde(default)]
    pub exit: Option<ExitRecord>,
}

/// How the worker ended, as its shim saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// True when the shim stopped it (asked by the agent, or the lease ran out).
    pub stopped: bool,
    /// Why it stopped; empty when it ended by itself.
    pub reason: String,
    pub at_unix_ms: u64,
}

/// `shim-stop.json`: the agent's stop order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRequest {
    pub reason: String,
    pub grace_ms: u64,
}

/// `lease.json`: until when the shims may let their workers run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFile {
    /// `/proc/sys/kernel/random/boot_id`: a deadline from another boot has passed.
    pub boot_id: String,
    /// `CLOCK_BOOTTIME`, in milliseconds: counts on through a suspend, never steps.
    pub deadline_boottime_ms: u64,
    pub lease_ms: u64,
    /// The agent that renewed it last.
    pub agent_pid: u32,
}

/// What the lease file says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// No agent has written one yet: nothing to enforce.
    Unset,
    Valid,
    /// Why the workers must stop.
    Expired(String),
}

impl LeaseFile {
    /// A lease that runs for `remaining` from now, renewed by this process.
    pub fn from_now(remaining: Duration, lease: Duration) -> Self {
        Self {
            boot_id: boot_id(),
            deadline_boottime_ms: boottime_ms()
                .saturating_add(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX)),
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
            agent_pid: std::process::id(),
        }
    }

    /// Judged at `now_ms` (`CLOCK_BOOTTIME`) on boot `boot`.
    pub fn state(&self, boot: &str, now_ms: u64) -> LeaseState {
        if self.boot_id != boot {
            return LeaseState::Expired(
                "the lease was renewed before this host rebooted; stopping the worker".to_owned(),
            );
        }
        if now_ms < self.deadline_boottime_ms {
            return LeaseState::Valid;
        }
        let silent_ms =
            now_ms.saturating_sub(self.deadline_boottime_ms.saturating_sub(self.lease_ms));
        LeaseState::Expired(format!(
            "lease expired: no live agent renewed it for {:.1}s (agent pid {} renewed it last); \
             stopping the worker so that no two attempts run at once",
            Duration::from_millis(silent_ms).as_secs_f64(),
            self.agent_pid
        ))
    }
}

/// Reads the lease file; a missing one is [`LeaseState::Unset`], an unreadable one expired.
pub fn lease_state(path: &Path) -> LeaseState {
    match std::fs::read(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => LeaseState::Unset,
        Err(e) => LeaseState::Expired(format!(
            "cannot read the lease {}: {e}; stopping the worker",
            path.display()
        )),
        Ok(bytes) => match serde_json::from_slice::<LeaseFile>(&bytes) {
            Ok(lease) => lease.state(&boot_id(), boottime_ms()),
            Err(e) => LeaseState::Expired(format!(
                "the lease {} is damaged ({e}); stopping the worker",
                path.display()
            )),
        },
    }
}

/// Milliseconds of `CLOCK_BOOTTIME`: the same clock in every process on the host.
pub fn boottime_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
        secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
    })
}

/// This boot's id; empty where the kernel does not say.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, so a reader sees the
/// old text or the new, never half; with `durable`, fsyncs the file before the rename.
pub fn write_json<T: Serialize>(path: &Path, value: &T, durable: bool) -> io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&text)?;
    if durable {
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads JSON from `path`; `None` when the file does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display()))),
    }
}

/// The exit code of `vigil-agent shim-guard` and `vigil-agent shim` used wrongly.
pub const EXIT_USAGE: u8 = 64;

/// `vigil-agent shim-guard`: see [`guard`].
pub fn guard_main() -> ExitCode {
    guard::main()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(deadline: u64) -> LeaseFile {
        LeaseFile {
            boot_id: "boot-a".into(),
            deadline_boottime_ms: deadline,
            lease_ms: 8_000,
            agent_pid: 42,
        }
    }

    #[test]
    fn a_lease_holds_until_its_deadline_on_the_same_boot() {
        assert_eq!(lease(10_000).state("boot-a", 9_999), LeaseState::Valid);
        let LeaseState::Expired(why) = lease(10_000).state("boot-a", 10_000) else {
            panic!("expired at the deadline");
        };
        assert!(why.contains("no live agent renewed it for 8.0s"), "{why}");
        assert!(why.contains("agent pid 42"), "{why}");
        assert!(matches!(
            lease(u64::MAX).state("boot-b", 0),
            LeaseState::Expired(why) if why.contains("rebooted")
        ));
    }

    #[test]
    fn the_lease_file_is_unset_when_missing_and_expired_when_damaged() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join(LEASE_FILE);
        assert_eq!(lease_state(&path), LeaseState::Unset);
        write_json(
            &path,
            &LeaseFile::from_now(Duration::from_secs(60), Duration::from_secs(60)),
            false,
        )?;
        assert_eq!(lease_state(&path), LeaseState::Valid);
        write_json(
            &path,
            &LeaseFile::from_now(Duration::ZERO, Duration::from_secs(8)),
            false,
        )?;
        assert!(matches!(lease_state(&path), LeaseState::Expired(_)));
        std::fs::write(&path, "{ not json")?;
        assert!(matches!(lease_state(&path), LeaseState::Expired(why) if why.contains("damaged")));
        Ok(())
    }

    #[test]
    fn boottime_moves_forward_and_the_boot_has_an_id() {
        let a = boottime_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert!(boottime_ms() >= a + 5);
        assert!(!boot_id().is_empty());
    }

    #[test]
    fn json_files_round_trip_and_a_missing_one_is_none() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join(STOP_FILE);
        assert_eq!(read_json::<StopRequest>(&path)?, None);
        let stop = StopRequest {
            reason: "superseded".into(),
            grace_ms: 500,
        };
        write_json(&path, &stop, true)?;
        assert_eq!(read_json::<StopRequest>(&path)?, Some(stop));
        std::fs::write(&path, "{")?;
        assert!(read_json::<StopRequest>(&path).is_err());
        Ok(())
    }
}
