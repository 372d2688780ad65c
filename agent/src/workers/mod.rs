//! The workers this agent runs: one process group per (job, attempt) on this node.
//!
//! A single supervisor task ([`supervisor`]) owns the table of workers; the
//! session holds a cloneable [`Workers`] handle that sends it requests. Each
//! worker has its own task ([`worker`]) that owns the process, polls its
//! progress, and reports once its whole group is dead.
//!
//! Fencing, the rule every decision here serves: two attempts of one job never
//! run at once. So a newer attempt starts only after the older one's group is
//! dead; an older attempt is refused; and when the lease runs out (no word
//! from the coordinator for `lease_ms`, whether or not a session is up) every
//! worker is stopped, because by then the coordinator may relaunch the job
//! elsewhere.
//!
//! Agent restarts: every worker runs under its own per-attempt shim ([`crate::shim`]), which
//! outlives the agent, holds the fence (it stops the worker once no agent renewed the lease in
//! `<state_dir>/lease.json` in time) and records the worker's exit. Running workers are recorded
//! in `<state_dir>/workers.json` ([`record`]) with their shims. A restarted agent re-adopts
//! every worker whose shim still runs (same attempt, same processes; progress, logs and
//! checkpoint reports continue) and reports it at registration, so the coordinator adopts it
//! instead of restarting the job; a worker that ended while no agent ran is reported with the
//! exit its shim recorded. Workers recorded without a shim (by an agent from before shims) are
//! stopped as orphans (SIGTERM, grace, SIGKILL) and reported with `WorkerExited { stopped:
//! true, reason: "agent restarted; stopped the orphaned worker" }`.
//!
//! Confinement ([`confine`]): workers run as `workers.run_as` (never as root unless configured
//! so), in a workdir and with a checkpoint dir under `workers.allowed_roots`; commands for
//! work this agent was never given (a stop of an unknown job, a start of an attempt that is
//! older than, or the same as, one it already ran) are refused and logged.

mod assigned;
pub mod confine;
pub(crate) mod group;
pub mod logs;
mod preflight;
mod progress;
mod record;
mod resume_scan;
mod spawn;
mod supervisor;
mod verify;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use vigil_proto::v1::{
    AgentEvent, LogData, ReadLog, RunPreflight, ScanCheckpoints, StartWorker, StopWorkers,
    WorkerInfo,
};

pub use group::group_alive;
pub use progress::{Progress, parse_step};
pub use record::{FILE_NAME as RECORD_FILE, Record};
pub use spawn::{PROGRESS_FILE_VAR, Paths, SpawnError};
pub use worker::describe;

use crate::events::EventSink;
use crate::lease::Lease;

/// The reason sent when the agent stops the workers an agent from before shims left behind.
pub const ORPHAN_REASON: &str = "agent restarted; stopped the orphaned worker";
/// The answer to a `StopWorkers` for a job with nothing on this node.
pub const ALREADY_GONE_REASON: &str = "no such worker (already gone)";

/// A worker's identity on this node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub job_id: String,
    pub attempt: u64,
}

/// How the supervisor stops workers.
#[derive(Debug, Clone)]
pub struct WorkersConfig {
    pub state_dir: PathBuf,
    /// SIGTERM-to-SIGKILL time when neither `StartWorker` nor `StopWorkers` sets one.
    pub stop_grace: Duration,
    /// Cap on that time when the lease ran out: the coordinator relaunches the
    /// job once `lost_after` passes, so the old attempt must be dead by then.
    pub lease_stop_grace: Duration,
    /// Who workers run as and where they may work (`[workers]`).
    pub confine: confine::Confinement,
    /// The program started as each attempt's shim (with `shim` as its first argument): this
    /// agent's own binary, `/proc/self/exe`, except in tests of the library.
    pub shim_program: PathBuf,
}

/// Requests to the supervisor; the reply channels are the callers'.
enum Request {
    Start(StartWorker),
    Stop(StopWorkers),
    Lease(Lease),
    List(oneshot::Sender<Vec<WorkerInfo>>),
    Shutdown {
        keep: bool,
        done: oneshot::Sender<()>,
    },
}

/// The handle every session holds; clones talk to the same supervisor.
#[derive(Clone)]
pub struct Workers {
    /// The supervisor task holds the receiver.
    tx: mpsc::UnboundedSender<Request>,
    state_dir: PathBuf,
    sink: EventSink,
    /// Where checkpoint scans may look (`ScanCheckpoints`).
    confine: std::sync::Arc<confine::Confinement>,
    /// The checkpoint scans under way (their tasks remove themselves).
    scanning: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<Key>>>,
    /// The preflight rounds run or running here (their tasks record their results).
    preflights: preflight::Shared,
}

impl Workers {
    /// Starts the supervisor, which first stops the workers an earlier agent left running.
    pub fn start(config: WorkersConfig, sink: EventSink) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let state_dir = config.state_dir.clone();
        let confine = std::sync::Arc::new(config.confine.clone());
        supervisor::spawn(config, sink.clone(), rx);
        Self {
            tx,
            state_dir,
            sink,
            confine,
            scanning: Default::default(),
            preflights: Default::default(),
        }
    }

    /// Run this node's part of a preflight round; the answer goes back as a `PreflightResult`
    /// event. Each round runs once: a repeat while it runs is ignored, one after it ended is
    /// answered with the same result (the coordinator re-sends until answered).
    pub fn run_preflight(&self, cmd: RunPreflight) {
        let key = preflight::key(&cmd);
        let seen = self
            .preflights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen(&key);
        let sink = self.sink.clone();
        let emit = move |result| {
            sink.emit(AgentEvent {
                at_unix_ms: crate::unix_ms(),
                kind: Some(vigil_proto::v1::agent_event::Kind::PreflightResult(result)),
            });
        };
        match seen {
            preflight::Seen::Running => {
                tracing::debug!(job_id = %key.0, attempt = key.1, round = key.2, "preflight already under way");
            }
            preflight::Seen::Done(result) => emit(result),
            preflight::Seen::Run => {
                let confine = std::sync::Arc::clone(&self.confine);
                let runs = std::sync::Arc::clone(&self.preflights);
                tokio::spawn(async move {
                    let result = preflight::run(confine, cmd).await;
                    runs.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .finished(&key, result.clone());
                    emit(result);
                });
            }
        }
    }

    /// Scan a job's checkpoint directory before its relaunch; the answer goes back as a
    /// `CheckpointScan` event. The coordinator re-sends the command until answered, and with a
    /// verify_command a scan may take minutes: a scan of a (job, attempt) already under way is
    /// not started twice.
    pub fn scan_checkpoints(&self, scan: ScanCheckpoints) {
        let key = Key {
            job_id: scan.job_id.clone(),
            attempt: scan.attempt,
        };
        {
            let mut scanning = self.scanning.lock().unwrap_or_else(|e| e.into_inner());
            if !scanning.insert(key.clone()) {
                tracing::debug!(job_id = %key.job_id, attempt = key.attempt, "checkpoint scan already under way");
                return;
            }
        }
        let confine = std::sync::Arc::clone(&self.confine);
        let scanning = std::sync::Arc::clone(&self.scanning);
        let sink = self.sink.clone();
        tokio::spawn(async move {
            let answer = resume_scan::run(confine, scan).await;
            scanning
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            sink.emit(AgentEvent {
                at_unix_ms: crate::unix_ms(),
                kind: Some(vigil_proto::v1::agent_event::Kind::CheckpointScan(answer)),
            });
        });
    }

    /// Read part of a worker log (for `clusterctl job logs`); the answer
    /// goes back as a `LogData` event carrying `command_id`.
    pub fn read_log(&self, command_id: u64, read: ReadLog) {
        let state_dir = self.state_dir.clone();
        let sink = self.sink.clone();
        tokio::spawn(async move {
            let data =
                tokio::task::spawn_blocking(move || logs::read(&state_dir, command_id, &read))
                    .await
                    .unwrap_or(LogData {
                        command_id,
                        ..LogData::default()
                    });
            sink.emit(AgentEvent {
                at_unix_ms: crate::unix_ms(),
                kind: Some(vigil_proto::v1::agent_event::Kind::LogData(data)),
            });
        });
    }

    /// Starts a worker (after stopping older attempts of its job); the outcome
    /// comes back as `WorkerStarted` or `WorkerExited` events.
    pub fn start_worker(&self, start: StartWorker) {
        let _ = self.tx.send(Request::Start(start));
    }

    /// Stops the job's workers up to `stop.attempt`; each is reported by `WorkerExited`.
    pub fn stop_workers(&self, stop: StopWorkers) {
        let _ = self.tx.send(Request::Stop(stop));
    }

    /// The coordinator spoke: workers may run until `lease` runs out.
    pub fn renew_lease(&self, lease: Lease) {
        let _ = self.tx.send(Request::Lease(lease));
    }

    /// Every worker process alive on this node, with its progress; for Register and heartbeats.
    pub async fn list(&self) -> Vec<WorkerInfo> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Request::List(reply)).is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Stops every worker and waits until all are dead; with `keep`, leaves them running.
    pub async fn shutdown(&self, keep: bool) {
        let (done, finished) = oneshot::channel();
        if self.tx.send(Request::Shutdown { keep, done }).is_ok() {
            let _ = finished.await;
        }
    }
}
