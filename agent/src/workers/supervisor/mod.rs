//! The supervisor task: the one owner of this node's worker table.
//!
//! It decides (start, refuse, supersede, stop, fence on lease expiry), keeps
//! `workers.json` current, and turns every outcome into exactly one
//! `WorkerStarted` / `WorkerExited` event. Processes are handled by the
//! per-worker tasks in [`super::worker`], so nothing here waits on a process.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, error, info, warn};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{
    AgentEvent, StartWorker, StopWorkers, WorkerExited, WorkerInfo, WorkerStarted,
};

mod adopt;
mod launch;

use super::assigned::Assigned;
use super::progress::Progress;
use super::record::{self, Record};
use super::worker::{Exit, Proc, StopOrder, Task, log_tail};
use super::{ALREADY_GONE_REASON, Key, Request, WorkersConfig};
use crate::checkpoint::Watcher;
use crate::events::EventSink;
use crate::lease::Lease;
use crate::unix_ms;

/// The supervisor's view of one live worker; its task holds the process.
struct Entry {
    record: Record,
    progress: watch::Receiver<Progress>,
    /// The worker task holds the receiver.
    stop: mpsc::UnboundedSender<StopOrder>,
    /// From `StartWorker.stop_grace_ms`, or the configured default.
    grace: Duration,
}

struct Supervisor {
    config: WorkersConfig,
    sink: EventSink,
    workers: BTreeMap<Key, Entry>,
    /// Starts waiting for an older attempt of their job to die, by job id.
    pending: HashMap<String, StartWorker>,
    /// Worker tasks hold the senders.
    exits_tx: mpsc::UnboundedSender<Exit>,
    lease: Option<Lease>,
    /// The lease deadline already acted on, so one expiry stops workers once.
    fenced: Option<Instant>,
    /// Set while shutting down; answered once the last worker is dead.
    shutdown: Option<oneshot::Sender<()>>,
    /// Work this node was given: commands about anything else are refused.
    assigned: Assigned,
    /// When the lease file was last written, and whether the last write failed (logged once).
    lease_written: Option<Instant>,
    lease_write_failed: bool,
    /// The shim of the worker being started, recorded before it answers.
    starting: Option<Record>,
}

/// The most often the lease file is rewritten: a shim may see a deadline this much older than
/// the agent's, and so stops its worker that much early, never late.
pub const LEASE_WRITE_EVERY: Duration = Duration::from_millis(100);

pub(super) fn spawn(config: WorkersConfig, sink: EventSink, rx: mpsc::UnboundedReceiver<Request>) {
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        config,
        sink,
        workers: BTreeMap::new(),
        pending: HashMap::new(),
        exits_tx,
        lease: None,
        fenced: None,
        shutdown: None,
        assigned: Assigned::default(),
        lease_written: None,
        lease_write_failed: false,
        starting: None,
    };
    sup.adopt();
    tokio::spawn(sup.run(rx, exits_rx).in_current_span());
}

impl Supervisor {
    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Request>,
        mut exits: mpsc::UnboundedReceiver<Exit>,
    ) {
        loop {
            let expiry = self.unfenced_deadline();
            tokio::select! {
                // A renewal already queued must beat an expiry that fires at the same time.
                biased;
                request = requests.recv() => match request {
                    Some(Request::Shutdown { keep, done }) => {
                        if self.begin_shutdown(keep, done) {
                            return;
                        }
                    }
                    Some(request) => self.handle(request).await,
                    // Every handle is gone: the agent is over; leave processes as they are.
                    None => return,
                },
                Some(exit) = exits.recv() => {
                    self.exited(exit).await;
                    if self.workers.is_empty() && self.shutdown.is_some() {
                        if let Some(done) = self.shutdown.take() {
                            let _ = done.send(());
                        }
                        return;
                    }
                }
                () = crate::sleep_until(expiry), if expiry.is_some() => self.fence(),
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Start(start) => self.start(start).await,
            Request::Stop(stop) => self.stop(stop),
            Request::Lease(lease) => {
                self.lease = Some(lease);
                self.write_lease(false);
            }
            Request::List(reply) => {
                let _ = reply.send(self.list());
            }
            Request::Shutdown { .. } => {}
        }
    }

    /// The lease deadline to act on: only while something runs, once per deadline.
    fn unfenced_deadline(&self) -> Option<Instant> {
        let deadline = self.lease?.deadline();
        let idle = self.workers.is_empty() && self.pending.is_empty();
        (!idle && self.fenced != Some(deadline)).then_some(deadline)
    }

    async fn start(&mut self, start: StartWorker) {
        let key = Key {
            job_id: start.job_id.clone(),
            attempt: start.attempt,
        };
        if self.shutdown.is_some() {
            return self.refuse(&key, "refused: the agent is shutting down".to_owned());
        }
        let newest = self
            .workers
            .keys()
            .filter(|k| k.job_id == key.job_id)
            .map(|k| k.attempt)
            .chain(self.pending.get(&key.job_id).map(|p| p.attempt))
            .max();
        if let Some(newest) = newest.filter(|&n| n > key.attempt) {
            let reason = format!(
                "refused: attempt {} of job {} is older than attempt {newest} already on this node",
                key.attempt, key.job_id
            );
            return self.refuse(&key, reason);
        }
        if let Some(entry) = self.workers.get(&key) {
            info!(job_id = %key.job_id, attempt = key.attempt, "worker already running; start repeated");
            let event = started(&entry.record);
            return self.emit(event);
        }
        let pending_same = self
            .pending
            .get(&key.job_id)
            .is_some_and(|p| p.attempt == key.attempt);
        if let Some(ran) = self.assigned.newest(&key.job_id)
            && (ran > key.attempt || (ran == key.attempt && !pending_same))
        {
            let reason = format!(
                "refused: attempt {} of job {} is stale: this node already ran attempt {ran}; a restart needs a new attempt",
                key.attempt, key.job_id
            );
            return self.refuse(&key, reason);
        }
        self.assigned.note(&key);
        if let Some(older) = self.pending.remove(&key.job_id) {
            if older.attempt == key.attempt {
                self.pending.insert(key.job_id, older);
                return;
            }
            let reason = format!("superseded by attempt {} before it started", key.attempt);
            self.refuse(
                &Key {
                    job_id: older.job_id,
                    attempt: older.attempt,
                },
                reason,
            );
        }
        let older: Vec<Key> = self
            .workers
            .keys()
            .filter(|k| k.job_id == key.job_id)
            .cloned()
            .collect();
        if older.is_empty() {
            return self.launch(start).await;
        }
        let reason = format!("superseded by attempt {} of the same job", key.attempt);
        for k in older {
            self.order_stop(&k, &reason, None);
        }
        info!(
            job_id = %key.job_id,
            attempt = key.attempt,
            "start waits until the older attempt's process group is dead"
        );
        self.pending.insert(key.job_id, start);
    }

    /// Registers a worker and starts its task.
    fn add(
        &mut self,
        record: Record,
        progress_path: PathBuf,
        proc: Proc,
        checkpoints: Option<Watcher>,
        grace: Duration,
    ) {
        let key = Key {
            job_id: record.job_id.clone(),
            attempt: record.attempt,
        };
        self.assigned.note(&key);
        let (stop_tx, stops) = mpsc::unbounded_channel();
        let (progress_tx, progress) = watch::channel(Progress::new(record.started_at_unix_ms));
        Task {
            key: key.clone(),
            pgid: record.pgid,
            log_path: record.log_path.clone(),
            progress_path,
            proc,
            stops,
            progress: progress_tx,
            exits: self.exits_tx.clone(),
            checkpoints,
            sink: self.sink.clone(),
        }
        .spawn();
        self.workers.insert(
            key,
            Entry {
                record,
                progress,
                stop: stop_tx,
                grace,
            },
        );
    }

    fn stop(&mut self, stop: StopWorkers) {
        let reason = if stop.reason.is_empty() {
            "stopped by the coordinator".to_owned()
        } else {
            stop.reason.clone()
        };
        let grace = (stop.grace_ms > 0).then(|| Duration::from_millis(stop.grace_ms));
        let mut matched = false;
        if let Some(p) = self.pending.remove(&stop.job_id) {
            if p.attempt <= stop.attempt {
                matched = true;
                self.refuse(
                    &Key {
                        job_id: p.job_id,
                        attempt: p.attempt,
                    },
                    reason.clone(),
                );
            } else {
                self.pending.insert(stop.job_id.clone(), p);
            }
        }
        let keys: Vec<Key> = self
            .workers
            .keys()
            .filter(|k| k.job_id == stop.job_id && k.attempt <= stop.attempt)
            .cloned()
            .collect();
        for key in keys {
            matched = true;
            self.order_stop(&key, &reason, grace);
        }
        if !matched {
            let key = Key {
                job_id: stop.job_id,
                attempt: stop.attempt,
            };
            if self.assigned.newest(&key.job_id).is_some() {
                info!(job_id = %key.job_id, attempt = key.attempt, "stop for a worker that is not here: already gone");
            } else {
                // Nothing is done; the answer still lets the coordinator's stop complete.
                warn!(
                    job_id = %key.job_id,
                    attempt = key.attempt,
                    "refused a stop for a job this node was never given (since the agent started): nothing stopped"
                );
            }
            self.emit(exited(&key, true, ALREADY_GONE_REASON.to_owned(), None));
        }
    }

    /// Sends the worker's task a stop order; `grace` overrides the worker's own.
    fn order_stop(&self, key: &Key, reason: &str, grace: Option<Duration>) {
        let Some(entry) = self.workers.get(key) else {
            return;
        };
        let grace = grace.unwrap_or(entry.grace);
        info!(
            job_id = %key.job_id,
            attempt = key.attempt,
            pid = entry.record.pid,
            grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            "stopping worker of job {} attempt {}: {reason}",
            key.job_id, key.attempt
        );
        let _ = entry.stop.send(StopOrder {
            reason: reason.to_owned(),
            grace,
        });
    }

    /// The lease ran out: stop everything, fast, so no two attempts ever overlap.
    fn fence(&mut self) {
        let Some(lease) = self.lease else { return };
        self.fenced = Some(lease.deadline());
        let silent = lease.silent_for(Instant::now());
        let reason = format!(
            "lease expired: no word from the coordinator for {}s; stopping workers so that no two attempts run at once",
            silent.as_secs_f64().round()
        );
        warn!(workers = self.workers.len(), "{reason}");
        self.stop_all(&reason, Some(self.config.lease_stop_grace));
    }

    fn stop_all(&mut self, reason: &str, cap: Option<Duration>) {
        let pending: Vec<StartWorker> = self.pending.drain().map(|(_, p)| p).collect();
        for p in pending {
            self.refuse(
                &Key {
                    job_id: p.job_id,
                    attempt: p.attempt,
                },
                reason.to_owned(),
            );
        }
        let keys: Vec<(Key, Duration)> = self
            .workers
            .iter()
            .map(|(k, e)| (k.clone(), e.grace))
            .collect();
        for (key, grace) in keys {
            let grace = cap.map_or(grace, |c| grace.min(c));
            self.order_stop(&key, reason, Some(grace));
        }
    }

    /// Returns true when the supervisor is done.
    fn begin_shutdown(&mut self, keep: bool, done: oneshot::Sender<()>) -> bool {
        if keep && !self.workers.is_empty() {
            warn!(
                workers = self.workers.len(),
                "keep_workers_on_shutdown is set: leaving workers running under their shims; an agent started within the lease re-adopts them, and otherwise the shims stop them when the lease runs out"
            );
            let _ = done.send(());
            return true;
        }
        if !self.workers.is_empty() {
            info!(
                workers = self.workers.len(),
                "stopping workers before the agent exits"
            );
        }
        self.stop_all("agent shutting down", None);
        if self.workers.is_empty() {
            let _ = done.send(());
            return true;
        }
        self.shutdown = Some(done);
        false
    }

    async fn exited(&mut self, exit: Exit) {
        if self.workers.remove(&exit.key).is_none() {
            return;
        }
        self.persist();
        let r = &exit.report;
        info!(
            job_id = %r.job_id,
            attempt = r.attempt,
            exit_code = r.exit_code,
            signal = r.signal,
            stopped = r.stopped,
            "worker of job {} attempt {} is gone: {}",
            r.job_id, r.attempt, r.reason
        );
        let job_id = exit.key.job_id.clone();
        self.emit(AgentEvent {
            at_unix_ms: unix_ms(),
            kind: Some(Kind::WorkerExited(exit.report)),
        });
        let older_alive = |sup: &Self, attempt: u64| {
            sup.workers
                .keys()
                .any(|k| k.job_id == job_id && k.attempt < attempt)
        };
        if let Some(next) = self.pending.remove(&job_id) {
            if older_alive(self, next.attempt) {
                self.pending.insert(job_id, next);
            } else {
                self.launch(next).await;
            }
        }
    }

    fn list(&self) -> Vec<WorkerInfo> {
        self.workers
            .values()
            .map(|e| {
                let progress = *e.progress.borrow();
                WorkerInfo {
                    job_id: e.record.job_id.clone(),
                    attempt: e.record.attempt,
                    node_rank: e.record.node_rank,
                    pid: e.record.pid,
                    progress_step: progress.step,
                    progress_at_unix_ms: progress.at_unix_ms,
                    started_at_unix_ms: e.record.started_at_unix_ms,
                    loss: progress.metrics.loss,
                    grad_norm: progress.metrics.grad_norm,
                    loss_scale: progress.metrics.loss_scale,
                }
            })
            .collect()
    }

    fn refuse(&self, key: &Key, reason: String) {
        warn!(job_id = %key.job_id, attempt = key.attempt, %reason, "worker not started");
        self.emit(exited(key, true, reason, None));
    }

    fn persist(&self) {
        let records: Vec<Record> = self
            .workers
            .values()
            .map(|e| e.record.clone())
            .chain(self.starting.clone())
            .collect();
        if let Err(e) = record::save(&self.config.state_dir, &records) {
            error!(
                path = %record::path(&self.config.state_dir).display(),
                error = %e,
                "cannot record running workers; a restarted agent may not find them"
            );
        }
    }

    fn emit(&self, event: AgentEvent) {
        self.sink.emit(event);
    }
}

fn started(r: &Record) -> AgentEvent {
    AgentEvent {
        at_unix_ms: unix_ms(),
        kind: Some(Kind::WorkerStarted(WorkerStarted {
            job_id: r.job_id.clone(),
            attempt: r.attempt,
            pid: r.pid,
            log_path: r.log_path.display().to_string(),
        })),
    }
}

/// A worker that ended without a process to report on (refused, failed to start, already gone).
fn exited(key: &Key, stopped: bool, reason: String, log: Option<&Path>) -> AgentEvent {
    AgentEvent {
        at_unix_ms: unix_ms(),
        kind: Some(Kind::WorkerExited(WorkerExited {
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            exit_code: None,
            signal: None,
            stopped,
            reason,
            log_path: log.map(|l| l.display().to_string()).unwrap_or_default(),
            log_tail: log.map(log_tail).unwrap_or_default(),
        })),
    }
}
