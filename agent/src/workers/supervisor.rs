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

use super::assigned::Assigned;
use super::confine;
use super::progress::Progress;
use super::record::{self, Record};
use super::spawn::{self, Launched, Paths, ShimSettings};
use super::worker::{Exit, Proc, Shim, StopOrder, Task, log_tail};
use super::{ALREADY_GONE_REASON, Key, ORPHAN_REASON, Request, WorkersConfig};
use crate::checkpoint::Watcher;
use crate::events::EventSink;
use crate::lease::Lease;
use crate::shim::LeaseFile;
use crate::{error_chain, unix_ms};

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
                () = sleep_until(expiry), if expiry.is_some() => self.fence(),
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

    async fn launch(&mut self, start: StartWorker) {
        let key = Key {
            job_id: start.job_id.clone(),
            attempt: start.attempt,
        };
        let paths = Paths::new(
            &self.config.state_dir,
            &key.job_id,
            key.attempt,
            start.node_rank,
        );
        let confined = match self.config.confine.check(&start, confine::agent_uid()) {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("refused: {e}");
                warn!(job_id = %key.job_id, attempt = key.attempt, %reason, "worker not started: outside this node's limits");
                return self.emit(exited(&key, false, reason, None));
            }
        };
        let layout = match spawn::validate(&start) {
            Ok(layout) => layout,
            Err(e) => return self.cannot_start(&key, &e, &paths),
        };
        let grace = match start.stop_grace_ms {
            0 => self.config.stop_grace,
            ms => Duration::from_millis(ms),
        };
        // The new shim must find the lease this start came with.
        self.write_lease(true);
        let settings = ShimSettings {
            program: self.config.shim_program.clone(),
            lease_file: self.lease_file(),
            lease_stop_grace: self.config.lease_stop_grace,
            stop_grace: grace,
        };
        let starting = match spawn::spawn(&start, &paths, &confined, &settings).await {
            Ok(starting) => starting,
            Err(e) => return self.cannot_start(&key, &e, &paths),
        };
        // Recorded before its answer: an agent that dies now leaves a shim the next one finds.
        self.starting = Some(Record {
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            node_rank: start.node_rank,
            pid: 0,
            pgid: 0,
            log_path: paths.log.clone(),
            started_at_unix_ms: unix_ms(),
            start_time: None,
            shim_pid: Some(starting.shim_pid),
            shim_start_time: i32::try_from(starting.shim_pid)
                .ok()
                .and_then(super::group::read_stat)
                .map(|s| s.start_time),
            checkpoint_dir: layout.and(confined.checkpoint_dir.clone()),
            checkpoint_layout: layout.map(|l| l.to_string()),
            stop_grace_ms: Some(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)),
        });
        self.persist();
        let answer = starting.handshake().await;
        let provisional = self.starting.take();
        let Launched { shim, running } = match answer {
            Ok(launched) => launched,
            Err(e) => {
                self.persist();
                return self.cannot_start(&key, &e, &paths);
            }
        };
        let stat = |pid: u32| {
            i32::try_from(pid)
                .ok()
                .and_then(super::group::read_stat)
                .map(|s| s.start_time)
        };
        let Some(provisional) = provisional else {
            return;
        };
        let record = Record {
            pid: running.worker_pid,
            pgid: running.pgid,
            start_time: stat(running.worker_pid),
            shim_pid: Some(running.shim_pid),
            shim_start_time: provisional.shim_start_time.or(stat(running.shim_pid)),
            ..provisional
        };
        let watcher = layout.and_then(|l| Some(Watcher::new(confined.checkpoint_dir.clone()?, l)));
        info!(
            job_id = %key.job_id,
            attempt = key.attempt,
            rank = start.node_rank,
            pid = running.worker_pid,
            shim_pid = running.shim_pid,
            log = %paths.log.display(),
            "started worker of job {} attempt {} rank {} pid {} under shim pid {}",
            key.job_id, key.attempt, start.node_rank, running.worker_pid, running.shim_pid
        );
        let proc = Proc::Shim(Box::new(Shim {
            pid: running.shim_pid,
            start_time: record.shim_start_time,
            dir: paths.dir.clone(),
            child: Some(shim),
        }));
        self.add(record, paths.progress, proc, watcher, grace);
        self.persist();
        let event = self.workers.get(&key).map(|e| started(&e.record));
        if let Some(event) = event {
            self.emit(event);
        }
    }

    fn cannot_start(&self, key: &Key, e: &spawn::SpawnError, paths: &Paths) {
        let reason = error_chain(e);
        warn!(job_id = %key.job_id, attempt = key.attempt, %reason, "cannot start worker");
        let log = paths.log.exists().then_some(paths.log.as_path());
        self.emit(exited(key, false, reason, log));
    }

    fn lease_file(&self) -> PathBuf {
        self.config.state_dir.join(crate::shim::LEASE_FILE)
    }

    /// Tells the shims how long the lease runs: on every renewal (at most every
    /// [`LEASE_WRITE_EVERY`] unless `now`), and before a shim starts.
    fn write_lease(&mut self, now: bool) {
        let Some(lease) = self.lease else { return };
        let at = Instant::now();
        if !now
            && self
                .lease_written
                .is_some_and(|w| at < w + LEASE_WRITE_EVERY)
        {
            return;
        }
        let file = LeaseFile::from_now(
            lease.deadline().saturating_duration_since(at),
            lease.duration(),
        );
        match crate::shim::write_json(&self.lease_file(), &file, false) {
            Ok(()) => {
                self.lease_written = Some(at);
                self.lease_write_failed = false;
            }
            Err(e) => {
                self.sink.metrics().lease_file_errors.inc();
                if !self.lease_write_failed {
                    error!(
                        path = %self.lease_file().display(),
                        error = %e,
                        "cannot renew the lease for the shims: they will stop their workers when the last lease they read runs out"
                    );
                }
                self.lease_write_failed = true;
            }
        }
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

    /// Takes over the workers an earlier agent left running (see the module doc of [`super`]):
    /// re-adopts each one whose shim still runs, reports each that ended meanwhile, and stops
    /// the orphans of an agent from before shims.
    fn adopt(&mut self) {
        let records = match record::load(&self.config.state_dir) {
            Ok(records) => records,
            Err(e) => {
                let path = record::path(&self.config.state_dir);
                error!(
                    path = %path.display(),
                    error = %e,
                    "cannot read the worker record; workers of an earlier agent may still be running (their shims stop them when the lease runs out)"
                );
                return;
            }
        };
        for r in records {
            let key = Key {
                job_id: r.job_id.clone(),
                attempt: r.attempt,
            };
            let paths = Paths::new(&self.config.state_dir, &r.job_id, r.attempt, r.node_rank);
            if let Some(shim_pid) = r.shim_pid {
                let shim = Shim {
                    pid: shim_pid,
                    start_time: r.shim_start_time,
                    dir: paths.dir.clone(),
                    child: None,
                };
                let mut r = r;
                let cut_short = shim.alive() && r.pid == 0 && !fill_in_started(&mut r, &shim);
                if cut_short {
                    // Its start was cut short by the agent's end: no one ever learned of it.
                    warn!(job_id = %key.job_id, attempt = key.attempt, shim_pid, "a shim still starting when the agent ended never said its worker runs; stopping it");
                    shim.signal(nix::sys::signal::Signal::SIGKILL);
                    for _ in 0..100 {
                        if !shim.alive() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                if !cut_short && shim.alive() {
                    info!(
                        job_id = %key.job_id,
                        attempt = key.attempt,
                        pid = r.pid,
                        shim_pid,
                        "re-adopted worker of job {} attempt {} (pid {}) from its shim (pid {shim_pid}): it keeps running",
                        key.job_id, key.attempt, r.pid
                    );
                    let watcher = r
                        .checkpoint_dir
                        .clone()
                        .zip(r.checkpoint_layout.as_deref().and_then(|l| l.parse().ok()))
                        .map(|(dir, layout)| Watcher::new(dir, layout));
                    let grace = r
                        .stop_grace_ms
                        .map_or(self.config.stop_grace, Duration::from_millis);
                    self.add(
                        r,
                        paths.progress,
                        Proc::Shim(Box::new(shim)),
                        watcher,
                        grace,
                    );
                    self.sink.metrics().count_adopted("running");
                    continue;
                }
                // Its shim ended while no agent ran; the guard took any straggler with it.
                super::group::signal_group(r.pgid, nix::sys::signal::Signal::SIGKILL);
                let ended = shim.ended(None);
                let (stopped, reason) = match ended.stopped {
                    _ if cut_short => (
                        true,
                        format!(
                            "the agent ended while starting it: its shim (pid {shim_pid}) never \
                             said the worker runs; stopped it"
                        ),
                    ),
                    Some(reason) => (true, format!("while the agent was down: {reason}")),
                    None => (
                        false,
                        format!(
                            "while the agent was down: {}",
                            ended.note.unwrap_or_else(|| super::worker::describe_exit(
                                ended.exit_code,
                                ended.signal
                            ))
                        ),
                    ),
                };
                info!(job_id = %key.job_id, attempt = key.attempt, pid = r.pid, "worker of an earlier agent ended {reason}");
                let mut event = exited(&key, stopped, reason, Some(&r.log_path));
                if let Some(Kind::WorkerExited(report)) = &mut event.kind {
                    report.exit_code = ended.exit_code;
                    report.signal = ended.signal;
                }
                self.emit(event);
                self.sink.metrics().count_adopted("ended");
                continue;
            }
            if !r.still_running() {
                info!(job_id = %key.job_id, attempt = key.attempt, pid = r.pid, "worker recorded by an earlier agent is already gone");
                let reason =
                    "agent restarted; the worker had already exited (status unknown)".to_owned();
                self.emit(exited(&key, false, reason, Some(&r.log_path)));
                self.sink.metrics().count_adopted("ended");
                continue;
            }
            self.sink.metrics().count_adopted("orphan");
            let grace = self.config.stop_grace;
            self.add(r, paths.progress, Proc::Orphan, None, grace);
            self.order_stop(&key, ORPHAN_REASON, None);
        }
        self.persist();
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

/// A record made while its shim was starting has no worker yet: takes the worker's pids from the
/// shim's status, which the shim writes before it answers (waiting a little for a shim that is
/// just starting); false when they never come.
fn fill_in_started(r: &mut Record, shim: &Shim) -> bool {
    let path = shim.dir.join(crate::shim::STATUS_FILE);
    for _ in 0..50 {
        if let Ok(Some(status)) = crate::shim::read_json::<crate::shim::Status>(&path)
            && status.running.shim_pid == shim.pid
        {
            r.pid = status.running.worker_pid;
            r.pgid = status.running.pgid;
            r.start_time = i32::try_from(r.pid)
                .ok()
                .and_then(super::group::read_stat)
                .map(|s| s.start_time);
            return true;
        }
        if !shim.alive() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
