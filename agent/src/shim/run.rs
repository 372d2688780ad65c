//! The shim process itself (`vigil-agent shim`): start the worker, watch the lease and the
//! agent's stop orders, record the exit.

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info, warn};

use super::{
    EXIT_USAGE, ExitRecord, Handshake, LeaseState, Running, STATUS_FILE, STOP_FILE, Spec,
    StopRequest, lease_state, read_json, write_json,
};
use crate::workers::group;

/// How often the shim reads the lease and looks for a stop order whose signal it missed.
pub const POLL: Duration = Duration::from_millis(100);
/// After the worker's leader is gone, how long the rest of its group may take to vanish.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// `vigil-agent shim`: reads its [`Spec`] from standard input, answers one [`Handshake`] line
/// on standard output, then supervises the worker until it is gone.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        error!(error = %e, "cannot read the spec on standard input");
        return ExitCode::from(EXIT_USAGE);
    }
    let spec: Spec = match serde_json::from_str(&input) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!(
                "vigil-agent shim: this is the agent's own per-attempt supervisor, started by \
                 vigil-agent with a JSON spec on standard input; that input is not one: {e}"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            answer(&Handshake::Failed {
                error: format!("the shim cannot start its runtime: {e}"),
            });
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(shim(spec))
}

async fn shim(spec: Spec) -> ExitCode {
    let span = tracing::info_span!("shim", job_id = %spec.job_id, attempt = spec.attempt);
    let _enter = span.enter();
    // Before the worker exists: from here on, SIGTERM is a stop order and SIGINT/SIGHUP (a
    // terminal going away) change nothing.
    let (Ok(mut term), Ok(_int), Ok(_hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        answer(&Handshake::Failed {
            error: "the shim cannot install its signal handlers".to_owned(),
        });
        return ExitCode::FAILURE;
    };
    let (mut worker, running, lifeline) = match start(&spec) {
        Ok(started) => started,
        Err(error) => {
            warn!(%error, "worker not started");
            answer(&Handshake::Failed { error });
            return ExitCode::FAILURE;
        }
    };
    let status_path = spec.dir.join(STATUS_FILE);
    let mut status = super::Status {
        running,
        exit: None,
    };
    if let Err(e) = write_json(&status_path, &status, true) {
        // The agent that started us still knows the pids; a restarted one finds no status and
        // treats the worker's end as unknown.
        warn!(path = %status_path.display(), error = %e, "cannot record the running worker");
    }
    info!(
        worker_pid = running.worker_pid,
        pgid = running.pgid,
        "started worker of job {} attempt {} rank {} pid {}",
        spec.job_id,
        spec.attempt,
        spec.node_rank,
        running.worker_pid
    );
    let (exit_status, stopped) = if answer(&Handshake::Running(running)) {
        supervise(&spec, &mut worker, running.pgid, &mut term).await
    } else {
        // Nobody learned of the worker: a new agent would start this attempt again. Stop it.
        let reason = "the agent that started the worker was gone before it learned of it";
        warn!("{reason}; stopping the worker");
        group::signal_group(running.pgid, Signal::SIGKILL);
        (worker.wait().await.ok(), Some(reason.to_owned()))
    };
    // Stragglers of a leader that exited, and the guard: the whole group goes.
    group::signal_group(running.pgid, Signal::SIGKILL);
    if !group::wait_gone(running.pgid, REAP_TIMEOUT).await {
        warn!(
            pgid = running.pgid,
            "process group still has live members after SIGKILL"
        );
    }
    let record = ExitRecord {
        exit_code: exit_status.and_then(|s| s.code()),
        signal: exit_status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        stopped: stopped.is_some(),
        reason: stopped.unwrap_or_default(),
        at_unix_ms: crate::unix_ms(),
    };
    info!(
        exit_code = record.exit_code,
        signal = record.signal,
        stopped = record.stopped,
        "worker gone: {}",
        if record.stopped {
            record.reason.clone()
        } else {
            crate::workers::describe(exit_status)
        }
    );
    status.exit = Some(record);
    if let Err(e) = write_json(&status_path, &status, true) {
        error!(path = %status_path.display(), error = %e, "cannot record the worker's exit");
    }
    // Only now: the guard is dead already, and the agent may read the status.
    drop(lifeline);
    ExitCode::SUCCESS
}

/// Starts the guard, then the worker in the guard's process group. Returns the worker, what
/// the agent needs of it, and the shim's end of the guard's pipe (dropping it kills the group).
fn start(spec: &Spec) -> Result<(Child, Running, OwnedFd), String> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| "empty command: the job spec's command must name a program".to_owned())?;
    let (guard_end, lifeline) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| format!("the shim cannot make the guard's pipe: {e}"))?;
    let guard = std::process::Command::new("/proc/self/exe")
        .arg("shim-guard")
        .stdin(Stdio::from(guard_end))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("the shim cannot start its guard: {e}"))?;
    let pgid = i32::try_from(guard.id()).unwrap_or(i32::MAX);
    // The guard is reaped by whoever reaps the shim's orphans once the group is killed; its
    // handle is not needed (std's Child does not kill on drop).
    drop(guard);
    let log = |path: &Path| {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open the worker's log {}: {e}", path.display()))
    };
    let stdout = log(&spec.log)?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| format!("cannot open the worker's log {}: {e}", spec.log.display()))?;
    let mut command = Command::new(program);
    if let Some(id) = &spec.identity {
        // std clears the supplementary groups (setgroups(0)) before setuid.
        command
            .uid(id.uid)
            .gid(id.gid)
            .env("HOME", &id.home)
            .env("USER", &id.name)
            .env("LOGNAME", &id.name);
    }
    let spawned = command
        .args(args)
        .current_dir(&spec.workdir)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(pgid)
        .spawn();
    let worker = match spawned {
        Ok(worker) => worker,
        Err(source) => {
            if let Ok(mut log) = log(&spec.log) {
                let _ = writeln!(log, "==> vigil-agent: cannot start {program}: {source}");
            }
            group::signal_group(pgid, Signal::SIGKILL);
            return Err(format!("cannot start {program}: {source}"));
        }
    };
    let worker_pid = worker.id().unwrap_or(0);
    Ok((
        worker,
        Running {
            shim_pid: std::process::id(),
            worker_pid,
            pgid,
        },
        lifeline,
    ))
}

/// The shim's stop in progress: why, and when SIGKILL follows.
#[derive(Default)]
struct Stopping {
    reason: Option<String>,
    kill_at: Option<Instant>,
}

impl Stopping {
    /// SIGTERM to the group on the first order; every order may bring SIGKILL closer.
    fn order(&mut self, spec: &Spec, pgid: i32, request: StopRequest) {
        if self.reason.is_none() {
            info!(
                grace_ms = request.grace_ms,
                "stopping worker of job {} attempt {}: {}",
                spec.job_id,
                spec.attempt,
                request.reason
            );
            group::signal_group(pgid, Signal::SIGTERM);
            self.reason = Some(request.reason);
        }
        let at = Instant::now() + Duration::from_millis(request.grace_ms);
        self.kill_at = Some(self.kill_at.map_or(at, |k| k.min(at)));
    }
}

/// Runs until the worker's leader exits; returns its status and, when the shim stopped it, why.
async fn supervise(
    spec: &Spec,
    worker: &mut Child,
    pgid: i32,
    term: &mut tokio::signal::unix::Signal,
) -> (Option<ExitStatus>, Option<String>) {
    let mut stopping = Stopping::default();
    let mut fenced = false;
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop_path = spec.dir.join(STOP_FILE);
    loop {
        tokio::select! {
            status = worker.wait() => return (status.ok(), stopping.reason),
            _ = term.recv() => {
                let request = read_json::<StopRequest>(&stop_path).ok().flatten().unwrap_or(StopRequest {
                    reason: "the shim was sent SIGTERM".to_owned(),
                    grace_ms: spec.stop_grace_ms,
                });
                stopping.order(spec, pgid, request);
            }
            _ = ticker.tick() => {
                if stopping.reason.is_none()
                    && let Ok(Some(request)) = read_json::<StopRequest>(&stop_path)
                {
                    stopping.order(spec, pgid, request);
                }
                if !fenced && let LeaseState::Expired(reason) = lease_state(&spec.lease_file) {
                    fenced = true;
                    warn!("{reason}");
                    let grace_ms = spec.lease_stop_grace_ms.min(spec.stop_grace_ms);
                    stopping.order(spec, pgid, StopRequest { reason, grace_ms });
                }
            }
            () = crate::sleep_until(stopping.kill_at), if stopping.kill_at.is_some() => {
                warn!(pgid, "worker did not exit within its stop grace; sending SIGKILL to its process group");
                group::signal_group(pgid, Signal::SIGKILL);
                stopping.kill_at = None;
            }
        }
    }
}

/// The handshake line; false when it could not be written (the agent is gone).
fn answer(handshake: &Handshake) -> bool {
    let Ok(line) = serde_json::to_string(handshake) else {
        return false;
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}
