//! The engine: the one task that owns cluster state and the store.
//!
//! gRPC handlers hold an [`EngineHandle`] and send [`Event`]s; the engine
//! applies each through the pure transitions of `state`, persists (and
//! flushes) what they ask for, and only then acts: replies, stream messages,
//! log lines, metrics. Readers get an `Arc<Snapshot>` through a watch channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::Status;
use tracing::{debug, info, warn};
use vigil_proto::v1;

use crate::audit::Subject;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::ControlError;
use crate::health::Condition;
use crate::job::Job;
use crate::lemons::{Ledger, LemonRecord};
use crate::metrics::Metrics;
use crate::node::{Availability, CordonSource, DiagnosticsRecord, Node};
use crate::state::{ClusterState, Effect, Now, Registration};
use crate::store::{Store, StoreError};

/// How often the engine applies the passage of time and republishes state.
const TICK: Duration = Duration::from_millis(100);
/// A tick this late means the engine itself did not run (see `ClusterState::forgive_stall`).
const STALL: Duration = Duration::from_secs(1);
/// Ticks between attempts to reopen a store that failed a write (a full disk).
const RECOVER_STORE_EVERY: u64 = 10;
/// Events queued for the engine before handlers wait (backpressure).
const EVENT_QUEUE: usize = 8192;

/// The sending half of an agent session's outgoing stream. The engine holds
/// the only sender: dropping it ends the session's stream.
pub type SessionTx = mpsc::Sender<Result<v1::CoordinatorMessage, Status>>;

pub enum Event {
    Register {
        reg: Registration,
        tx: SessionTx,
    },
    Heartbeat {
        node: String,
        session: u64,
        seq: u64,
        heartbeat: v1::Heartbeat,
    },
    AgentEvent {
        node: String,
        session: u64,
        seq: u64,
        event: v1::AgentEvent,
    },
    Disconnected {
        node: String,
        session: u64,
    },
    /// The agent service flagged a session (e.g. throttled): record it on the node.
    Flag {
        node: String,
        session: u64,
        kind: &'static str,
        message: String,
    },
    Cordon {
        node: String,
        reason: String,
        /// Who asked, for the audit trail.
        actor: String,
        reply: oneshot::Sender<Result<Node, ControlError>>,
    },
    Uncordon {
        node: String,
        force: bool,
        /// Who asked, for the audit trail.
        actor: String,
        reply: oneshot::Sender<Result<Node, ControlError>>,
    },
    Diagnose {
        node: String,
        timeout: Duration,
        /// Who asked, for the audit trail.
        actor: String,
        reply: oneshot::Sender<Result<DiagnosticsRecord, ControlError>>,
    },
    Drain {
        node: String,
        reason: String,
        /// Who asked, for the audit trail.
        actor: String,
        reply: oneshot::Sender<Result<(Node, Vec<String>), ControlError>>,
    },
    /// Read part of a worker log through the node's agent.
    ReadLog {
        node: String,
        read: v1::ReadLog,
        reply: oneshot::Sender<Result<v1::LogData, ControlError>>,
    },
    SubmitJob {
        spec_toml: String,
        source: String,
        actor: String,
        reply: oneshot::Sender<Result<Job, ControlError>>,
    },
    CancelJob {
        id: String,
        actor: String,
        reply: oneshot::Sender<Result<Job, ControlError>>,
    },
    RestartJob {
        id: String,
        from_step: Option<u64>,
        env: std::collections::BTreeMap<String, String>,
        actor: String,
        reply: oneshot::Sender<Result<Job, ControlError>>,
    },
    /// An operator clears a host or GPU from the lemon list.
    ClearLemon {
        subject: String,
        actor: String,
        reply: oneshot::Sender<Result<Vec<LemonRecord>, ControlError>>,
    },
}

/// A diagnostic run the engine waits for.
struct PendingDiagnostics {
    node: String,
    session: u64,
    deadline: Instant,
    timeout: Duration,
    reply: oneshot::Sender<Result<DiagnosticsRecord, ControlError>>,
}

/// A log read the engine waits for.
struct PendingLog {
    session: u64,
    node: String,
    deadline: Instant,
    reply: oneshot::Sender<Result<v1::LogData, ControlError>>,
}

/// How long an agent gets to answer a log read.
const LOG_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Events kept for slow `clusterctl events --follow` readers.
const EVENT_BUS: usize = 1024;
/// Time-driven changes are published every this many ticks.
const PUBLISH_EVERY: u64 = 3;
/// The store's size is read every this many ticks.
const STORE_SIZE_EVERY: u64 = 50;

/// Extra time an agent gets past the diagnostic's own timeout to report it.
const DIAGNOSTICS_GRACE: Duration = Duration::from_secs(5);

/// What readers see: every node, as of `at`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub jobs: Vec<Job>,
    pub lemons: Ledger,
    pub at: Instant,
}

/// Cloneable handle on the engine, for gRPC handlers.
#[derive(Clone)]
pub struct EngineHandle {
    events: mpsc::Sender<Event>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Every node and job event as it happens (the engine holds the sender).
    bus: broadcast::Sender<v1::ClusterEvent>,
    /// The engine's clock, so readers measure ages on the same monotonic scale.
    clock: Clock,
}

impl EngineHandle {
    pub async fn send(&self, event: Event) -> Result<(), ControlError> {
        self.events
            .send(event)
            .await
            .map_err(|_| ControlError::ShuttingDown)
    }

    /// New cluster events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<v1::ClusterEvent> {
        self.bus.subscribe()
    }

    /// The present on the engine's clock.
    pub fn now(&self) -> Now {
        self.clock.now()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Ask the engine something and wait for its answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ControlError>>) -> Event,
    ) -> Result<T, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }
}

pub struct Engine {
    state: ClusterState,
    store: Store,
    sessions: HashMap<u64, SessionTx>,
    metrics: Arc<Metrics>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    events: mpsc::Receiver<Event>,
    dirty: bool,
    pending: HashMap<u64, PendingDiagnostics>,
    next_command: u64,
    /// Called on every tick of the loop: proof that the engine itself, not
    /// just the process, is alive (systemd's watchdog is fed from here).
    on_tick: Option<Box<dyn FnMut() + Send>>,
    bus: broadcast::Sender<v1::ClusterEvent>,
    log_reads: HashMap<u64, PendingLog>,
    ticks: u64,
    /// When the last tick ran: a much longer gap means this process was stalled.
    last_tick: vigil_core::time::Instant,
    /// The only clock decisions are given (monotonic deadlines, wall-clock records).
    clock: Clock,
}

impl Engine {
    /// The fencing token on every message to agents.
    fn term(&self) -> u64 {
        self.store.leadership().term()
    }

    /// Whether this coordinator may still act: always on sled; with etcd, while its lease holds.
    fn leads(&self) -> bool {
        self.store.leadership().is_valid()
    }
}

impl Engine {
    /// Load state from the store; the engine starts when [`Engine::run`] is awaited.
    pub fn new(
        store: Store,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, EngineHandle), StoreError> {
        let clock = Clock::start();
        let records = store.load_nodes()?;
        let events = store.load_events()?;
        let state = ClusterState::load(
            records,
            events,
            config.liveness,
            config.health.clone(),
            clock.now(),
        );
        info!(
            nodes = state.nodes.len(),
            cordoned = state.nodes.values().filter(|n| n.cordoned()).count(),
            data_dir = %store.path().display(),
            "loaded cluster state; nodes are Unreachable until their agents reconnect"
        );
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (bus, _) = broadcast::channel(EVENT_BUS);
        let mut state = state.with_jobs(store.load_jobs()?);
        state.lemons = Ledger::new(config.lemons, store.load_lemons()?);
        state.triage = config.triage;
        state.burn_in = config.burn_in.clone();
        state.stragglers = config.stragglers;
        state.rearm_clocks(clock.now());
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot {
            nodes: state.nodes.values().cloned().collect(),
            jobs: state.jobs.values().cloned().collect(),
            lemons: state.lemons.clone(),
            at: Instant::now(),
        }));
        metrics.observe_nodes(state.nodes.values());
        for n in state.nodes.values() {
            metrics.observe_condition(&n.record.name, n.condition);
        }
        let engine = Self {
            state,
            store,
            sessions: HashMap::new(),
            metrics,
            snapshot,
            events,
            dirty: false,
            pending: HashMap::new(),
            next_command: 1,
            on_tick: None,
            bus: bus.clone(),
            log_reads: HashMap::new(),
            ticks: 0,
            last_tick: clock.now().mono,
            clock,
        };
        let handle = EngineHandle {
            events: events_tx,
            snapshot: snapshot_rx,
            bus,
            clock,
        };
        Ok((engine, handle))
    }

    /// Call `f` on every tick of the engine loop (every 100 ms).
    pub fn on_tick(mut self, f: Box<dyn FnMut() + Send>) -> Self {
        self.on_tick = Some(f);
        self
    }

    /// Run until `stop` turns true or every handle is gone; flush on the way out.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.last_tick = self.clock.now().mono;
        loop {
            tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                event = self.events.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
                _ = tick.tick() => {
                    let t = self.clock.now();
                    let gap = t.mono.saturating_duration_since(self.last_tick);
                    self.last_tick = t.mono;
                    if gap > STALL {
                        // SIGSTOP, a paused VM, a blocked disk: the silence was ours, not the agents'.
                        warn!(stalled_ms = gap.as_millis(), "engine was stalled; not counting the stall as agent silence or lack of progress");
                        self.state.forgive_stall(gap.saturating_sub(TICK), t);
                    }
                    let mut effects = self.state.tick(t);
                    effects.extend(self.state.jobs_tick(t));
                    effects.extend(self.state.burn_in_tick(t));
                    self.apply(effects).await.ok();
                    self.expire_diagnostics();
                    self.expire_log_reads();
                    if self.ticks.is_multiple_of(RECOVER_STORE_EVERY) {
                        self.recover_store().await;
                    }
                    self.ticks += 1;
                    self.metrics
                        .engine_queue_depth
                        .set(i64::try_from(self.events.len()).unwrap_or(i64::MAX));
                    if self.ticks % STORE_SIZE_EVERY == 1
                        && let Ok(bytes) = self.store.size_on_disk()
                    {
                        self.metrics
                            .store_size_bytes
                            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    }
                    // Readers (clusterctl, metrics) see changes within 300 ms;
                    // operators' own changes are published at once.
                    if self.dirty && self.ticks.is_multiple_of(PUBLISH_EVERY) {
                        self.publish();
                    }
                    self.metrics.engine_alive(self.clock.now().wall_ms);
                    if let Some(f) = self.on_tick.as_mut() {
                        f();
                    }
                }
            }
        }
        self.sessions.clear();
        match self.store.flush().await {
            Ok(()) => info!("engine stopped; state store flushed"),
            Err(e) => warn!(error = %e, "engine stopped; final flush failed"),
        }
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Register { reg, tx } => self.register(reg, tx).await,
            Event::Heartbeat {
                node,
                session,
                seq,
                heartbeat,
            } => {
                self.metrics.heartbeats.inc();
                let reports = heartbeat.workers.iter();
                let reports = reports.map(|w| (w.job_id.as_str(), w.attempt, "heartbeat"));
                crate::assigned::note(&self.state.jobs, &self.metrics, &node, reports);
                if heartbeat.sent_at_unix_ms > 0 {
                    let lag = self
                        .clock
                        .now()
                        .wall_ms
                        .saturating_sub(heartbeat.sent_at_unix_ms);
                    self.metrics.heartbeat_lag.observe(lag as f64 / 1000.0);
                }
                let result = self
                    .state
                    .heartbeat(&node, session, heartbeat, self.clock.now());
                self.after_agent_message(result, session, seq).await;
            }
            Event::AgentEvent {
                node,
                session,
                seq,
                event,
            } => {
                let report = crate::assigned::subject(&event);
                crate::assigned::note(&self.state.jobs, &self.metrics, &node, report);
                let result = match &event.kind {
                    Some(v1::agent_event::Kind::Diagnostics(d)) => {
                        self.diagnostics_result(&node, session, d).await;
                        self.state.heard(&node, session, self.clock.now())
                    }
                    Some(v1::agent_event::Kind::LogData(d)) => {
                        if let Some(p) = self.log_reads.remove(&d.command_id) {
                            if p.session == session {
                                p.reply.send(Ok(d.clone())).ok();
                            } else {
                                self.log_reads.insert(d.command_id, p);
                            }
                        }
                        self.state.heard(&node, session, self.clock.now())
                    }
                    _ => self
                        .state
                        .agent_event(&node, session, &event, self.clock.now()),
                };
                self.after_agent_message(result, session, seq).await;
            }
            Event::Disconnected { node, session } => {
                for (_, p) in take_where(&mut self.pending, |p| p.session == session) {
                    p.reply.send(Err(ControlError::NotConnected(p.node))).ok();
                }
                for (_, p) in take_where(&mut self.log_reads, |p| p.session == session) {
                    p.reply.send(Err(ControlError::NotConnected(p.node))).ok();
                }
                let effects = self.state.disconnected(&node, session, self.clock.now());
                if self.sessions.remove(&session).is_some() {
                    debug!(node = %node, session, "agent session ended");
                }
                self.apply(effects).await.ok();
                self.dirty = true;
            }
            Event::Flag {
                node,
                session,
                kind,
                message,
            } => {
                if let Ok(effects) =
                    self.state
                        .flag(&node, session, kind, message, self.clock.now())
                {
                    self.apply(effects).await.ok();
                    self.dirty = true;
                }
            }
            Event::Cordon {
                node,
                reason,
                actor,
                reply,
            } => {
                let backup = self.state.nodes.get(&node).cloned();
                let what = format!("cordon ({reason})");
                let result =
                    self.state
                        .cordon(&node, reason, CordonSource::Operator, self.clock.now());
                let answer = self.commit(&node, backup, result).await;
                self.audit(Subject::Node(&node), &actor, &what, &answer)
                    .await;
                reply.send(answer).ok();
            }
            Event::Uncordon {
                node,
                force,
                actor,
                reply,
            } => {
                let backup = self.state.nodes.get(&node).cloned();
                let result = self.state.uncordon(&node, force, self.clock.now());
                let answer = self.commit(&node, backup, result).await;
                let what = if force {
                    "uncordon --force"
                } else {
                    "uncordon"
                };
                self.audit(Subject::Node(&node), &actor, what, &answer)
                    .await;
                reply.send(answer).ok();
            }
            Event::Diagnose {
                node,
                timeout,
                actor,
                reply,
            } => {
                let started: Result<(), &str> = Ok(());
                self.audit(Subject::Node(&node), &actor, "diagnose", &started)
                    .await;
                self.start_diagnostics(node, timeout, reply);
            }
            Event::Drain {
                node,
                reason,
                actor,
                reply,
            } => {
                let what = format!("drain ({reason})");
                let backup = self.state.nodes.get(&node).cloned();
                let answer = match self.state.drain_node(&node, &reason, self.clock.now()) {
                    Ok((jobs, effects)) => match self.apply(effects).await {
                        Ok(()) => {
                            self.publish();
                            info!(node = %node, jobs = ?jobs, "drained node {node}: {reason}");
                            self.state
                                .nodes
                                .get(&node)
                                .cloned()
                                .map(|n| (n, jobs))
                                .ok_or_else(|| {
                                    ControlError::State(crate::state::StateError::UnknownNode(
                                        node.clone(),
                                    ))
                                })
                        }
                        Err(e) => {
                            self.restore(&node, backup);
                            Err(e.into())
                        }
                    },
                    Err(e) => Err(e.into()),
                };
                self.audit(Subject::Node(&node), &actor, &what, &answer)
                    .await;
                reply.send(answer).ok();
            }
            Event::ReadLog { node, read, reply } => self.start_log_read(node, read, reply),
            Event::SubmitJob {
                spec_toml,
                source,
                actor,
                reply,
            } => {
                let answer = match self.state.submit_job(&spec_toml, &source, self.clock.now()) {
                    Ok((id, effects)) => match self.apply(effects).await {
                        Ok(()) => {
                            self.publish();
                            self.state.jobs.get(&id).cloned().ok_or(ControlError::State(
                                crate::state::StateError::UnknownJob(id),
                            ))
                        }
                        Err(e) => {
                            self.state.jobs.remove(&id);
                            Err(e.into())
                        }
                    },
                    Err(e) => {
                        if matches!(e, crate::state::StateError::InvalidSpec(_)) {
                            self.metrics.input.spec_rejected();
                            info!(error = %e, "job spec refused");
                        }
                        Err(e.into())
                    }
                };
                if let Ok(job) = &answer {
                    info!(job = %job.id, name = %job.spec.name, nodes = job.spec.nodes, state = job.phase_name(), actor = %actor, "job {} submitted by {actor}", job.id);
                    let id = job.id.clone();
                    let what = format!("submit (from {source})");
                    self.audit(Subject::Job(&id), &actor, &what, &answer).await;
                }
                reply.send(answer).ok();
            }
            Event::CancelJob { id, actor, reply } => {
                let answer = match self.state.cancel_job(&id, self.clock.now()) {
                    Ok(effects) => match self.apply(effects).await {
                        Ok(()) => {
                            self.publish();
                            self.state.jobs.get(&id).cloned().ok_or(ControlError::State(
                                crate::state::StateError::UnknownJob(id.clone()),
                            ))
                        }
                        Err(e) => Err(e.into()),
                    },
                    Err(e) => Err(e.into()),
                };
                self.audit(Subject::Job(&id), &actor, "cancel", &answer)
                    .await;
                reply.send(answer).ok();
            }
            Event::RestartJob {
                id,
                from_step,
                env,
                actor,
                reply,
            } => {
                let what = match from_step {
                    Some(step) => format!("restart from checkpoint step {step} (env {env:?})"),
                    None => format!("restart (env {env:?})"),
                };
                let answer = match self
                    .state
                    .restart_job(&id, from_step, env, self.clock.now())
                {
                    Ok(effects) => match self.apply(effects).await {
                        Ok(()) => {
                            self.publish();
                            self.state.jobs.get(&id).cloned().ok_or(ControlError::State(
                                crate::state::StateError::UnknownJob(id.clone()),
                            ))
                        }
                        Err(e) => Err(e.into()),
                    },
                    Err(e) => Err(e.into()),
                };
                self.audit(Subject::Job(&id), &actor, &what, &answer).await;
                reply.send(answer).ok();
            }
            Event::ClearLemon {
                subject,
                actor,
                reply,
            } => {
                let answer = match self.state.clear_lemon(&subject, self.clock.now()) {
                    Ok((cleared, effects)) => match self.apply(effects).await {
                        Ok(()) => {
                            self.publish();
                            Ok(cleared)
                        }
                        Err(e) => Err(e.into()),
                    },
                    Err(e) => Err(e.into()),
                };
                // Recorded on the node the subject names, if it names one.
                let node = subject.strip_prefix("host/").unwrap_or(&subject).to_owned();
                let what = format!("clear lemon {subject}");
                self.audit(Subject::Node(&node), &actor, &what, &answer)
                    .await;
                reply.send(answer).ok();
            }
        }
    }

    /// Records an operator's call on `subject` in its history, with who and how it ended.
    async fn audit<T, E: std::fmt::Display>(
        &mut self,
        subject: Subject<'_>,
        actor: &str,
        what: &str,
        answer: &Result<T, E>,
    ) {
        let outcome = crate::audit::outcome(answer);
        info!(%subject, actor = %actor, "{what} on {subject} by {actor}: {outcome}");
        let effects = self
            .state
            .audit(subject, actor, what, &outcome, self.clock.now());
        if let Err(e) = self.apply(effects).await {
            warn!(%subject, error = %e, "could not store the audit record");
        }
        // Operator calls are rare: make the record visible to `clusterctl events` at once.
        self.publish();
    }

    fn start_log_read(
        &mut self,
        node: String,
        read: v1::ReadLog,
        reply: oneshot::Sender<Result<v1::LogData, ControlError>>,
    ) {
        let Some((session, id)) = self.try_command(&node, v1::command::Kind::ReadLog(read)) else {
            reply.send(Err(ControlError::NotConnected(node))).ok();
            return;
        };
        self.log_reads.insert(
            id,
            PendingLog {
                session,
                node,
                deadline: Instant::now() + LOG_READ_TIMEOUT,
                reply,
            },
        );
    }

    fn expire_log_reads(&mut self) {
        let now = Instant::now();
        for (_, p) in take_where(&mut self.log_reads, |p| p.deadline <= now) {
            p.reply.send(Err(ControlError::NotConnected(p.node))).ok();
        }
    }

    /// Hand a command to the node's live session. Returns the session and the
    /// command's id, or `None` when the node is not connected (or its queue is full).
    ///
    /// Nothing goes out once leadership has lapsed (HA): not even before the
    /// keepalive task notices, since the deadline is checked here, per message.
    fn try_command(&mut self, node: &str, kind: v1::command::Kind) -> Option<(u64, u64)> {
        let id = self.next_command;
        self.next_command += 1;
        let session = self.state.nodes.get(node).and_then(|n| n.session)?;
        let tx = self.sessions.get(&session)?;
        if !self.leads() {
            return None;
        }
        let msg = v1::CoordinatorMessage {
            body: Some(v1::coordinator_message::Body::Command(v1::Command {
                id,
                kind: Some(kind),
            })),
            term: self.term(),
        };
        tx.try_send(Ok(msg)).ok().map(|()| (session, id))
    }

    /// Send a command to a node's agent; an unreachable node misses it, and
    /// the job logic copes (it waits for the node to come back or be Lost).
    fn send_command(&mut self, node: &str, kind: v1::command::Kind) {
        match self.try_command(node, kind) {
            Some((_, id)) => debug!(node = %node, command_id = id, "command sent"),
            None => warn!(node = %node, "command not delivered: node not connected"),
        }
    }

    fn start_diagnostics(
        &mut self,
        node: String,
        timeout: Duration,
        reply: oneshot::Sender<Result<DiagnosticsRecord, ControlError>>,
    ) {
        if !self.state.nodes.contains_key(&node) {
            reply
                .send(Err(crate::state::StateError::UnknownNode(node).into()))
                .ok();
            return;
        }
        let run = v1::command::Kind::RunDiagnostics(v1::RunDiagnostics {
            timeout_ms: millis(timeout),
            command: Vec::new(),
        });
        let Some((session, id)) = self.try_command(&node, run) else {
            reply.send(Err(ControlError::NotConnected(node))).ok();
            return;
        };
        info!(node = %node, command_id = id, timeout_s = timeout.as_secs(), "asked agent to run diagnostics");
        self.pending.insert(
            id,
            PendingDiagnostics {
                node,
                session,
                deadline: Instant::now() + timeout + DIAGNOSTICS_GRACE,
                timeout,
                reply,
            },
        );
    }

    async fn diagnostics_result(&mut self, node: &str, session: u64, d: &v1::DiagnosticsResult) {
        let Some(pending) = self.pending.remove(&d.command_id) else {
            info!(node = %node, command_id = d.command_id, "diagnostics result no operator waits for (a triage's, or late); recording it");
            return self.keep_diagnostics(node, d, None).await;
        };
        if pending.node != node || pending.session != session {
            warn!(node = %node, command_id = d.command_id, "diagnostics result from the wrong session; ignored");
            self.pending.insert(d.command_id, pending);
            return;
        }
        self.keep_diagnostics(node, d, Some(pending.reply)).await;
    }

    async fn keep_diagnostics(
        &mut self,
        node: &str,
        d: &v1::DiagnosticsResult,
        reply: Option<oneshot::Sender<Result<DiagnosticsRecord, ControlError>>>,
    ) {
        let record = DiagnosticsRecord {
            passed: d.passed,
            summary: d.summary.clone(),
            output: d.output.clone(),
            duration_ms: d.duration_ms,
            command: d.command.clone(),
            finished_at_unix_ms: self.clock.now().wall_ms,
        };
        self.metrics.count_diagnostics(d.passed);
        let verdict = if d.passed { "passed" } else { "FAILED" };
        info!(node = %node, passed = d.passed, command = %d.command, "diagnostics {verdict} on {node}: {}", d.summary);
        let backup = self.state.nodes.get(node).cloned();
        let result = self.state.record_diagnostics(node, record.clone());
        let answer = self.commit(node, backup, result).await.map(|_| record);
        if let Some(reply) = reply {
            reply.send(answer).ok();
        }
        let mut triage = self
            .state
            .triage_result(node, d.passed, &d.summary, self.clock.now());
        triage.extend(
            self.state
                .burn_in_result(node, d.passed, &d.summary, self.clock.now()),
        );
        if !triage.is_empty() && self.apply(triage).await.is_ok() {
            self.publish();
        }
    }

    fn expire_diagnostics(&mut self) {
        let now = Instant::now();
        for (id, p) in take_where(&mut self.pending, |p| p.deadline <= now) {
            warn!(node = %p.node, command_id = id, "diagnostics not reported in time");
            let secs = p.timeout.as_secs();
            p.reply
                .send(Err(ControlError::DiagnosticsTimeout { node: p.node, secs }))
                .ok();
        }
    }

    async fn register(&mut self, reg: Registration, tx: SessionTx) {
        let (node, session) = (reg.node.clone(), reg.session);
        // The agent gave up waiting (its stream is gone): registering it now
        // would only cost time that agents still waiting need.
        if tx.is_closed() {
            debug!(node = %node, session, "registration dropped: its session already ended");
            return;
        }
        let backup = self.state.nodes.get(&node).cloned();
        let effects = self.state.register(reg, self.clock.now());
        // Persist now, act once the session is live: reconciling can send this
        // very node commands (stop a stale worker, start a pending job).
        let effects = match self.persist(effects).await {
            Ok(effects) => effects,
            Err(e) => {
                self.restore(&node, backup);
                self.metrics.rejected_registrations.inc();
                warn!(node = %node, error = %e, "registration refused: could not save it");
                let rejected = v1::coordinator_message::Body::Rejected(v1::Rejected {
                    reason: format!("coordinator could not save the registration: {e}"),
                });
                tx.try_send(Ok(v1::CoordinatorMessage {
                    body: Some(rejected),
                    term: self.term(),
                }))
                .ok();
                return;
            }
        };
        self.metrics.registrations.inc();
        let liveness = &self.state.liveness;
        let registered = v1::Registered {
            heartbeat_interval_ms: millis(liveness.heartbeat_interval),
            lease_ms: millis(liveness.agent_lease),
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            session_id: session,
            coordinator_name: self.store.leadership().name().to_owned(),
        };
        let msg = v1::CoordinatorMessage {
            body: Some(v1::coordinator_message::Body::Registered(registered)),
            term: self.term(),
        };
        // A coordinator whose leadership lapsed answers nobody: the agent moves on.
        let live = self.leads() && tx.try_send(Ok(msg)).is_ok();
        if live {
            self.sessions.insert(session, tx);
        }
        for effect in effects {
            self.act(effect);
        }
        if !live {
            let effects = self.state.disconnected(&node, session, self.clock.now());
            self.apply(effects).await.ok();
        }
        // Readers see it with the next tick (100 ms): publishing here would
        // copy every node once per registration, quadratic in a reconnect storm.
        self.dirty = true;
    }

    async fn after_agent_message(
        &mut self,
        result: Result<Vec<Effect>, crate::state::StateError>,
        session: u64,
        seq: u64,
    ) {
        match result {
            Ok(effects) => {
                self.apply(effects).await.ok();
                self.dirty = true;
                if let Some(tx) = self.sessions.get(&session).filter(|_| self.leads()) {
                    let ack = v1::CoordinatorMessage {
                        body: Some(v1::coordinator_message::Body::Ack(v1::Ack { seq })),
                        term: self.term(),
                    };
                    // A full queue means the agent is not reading; its lease
                    // runs out and it reconnects. Never block the engine on it.
                    tx.try_send(Ok(ack)).ok();
                }
            }
            Err(e) => {
                self.metrics.stale_messages.inc();
                debug!(error = %e, "ignored agent message");
                self.sessions.remove(&session);
            }
        }
    }

    /// Persist a control change; on failure put the node back as it was.
    async fn commit(
        &mut self,
        node: &str,
        backup: Option<Node>,
        result: Result<Vec<Effect>, crate::state::StateError>,
    ) -> Result<Node, ControlError> {
        let effects = result?;
        if let Err(e) = self.apply(effects).await {
            self.restore(node, backup);
            return Err(e.into());
        }
        self.publish();
        self.state
            .nodes
            .get(node)
            .cloned()
            .ok_or_else(|| crate::state::StateError::UnknownNode(node.to_owned()).into())
    }

    fn restore(&mut self, node: &str, backup: Option<Node>) {
        match backup {
            Some(n) => self.state.nodes.insert(node.to_owned(), n),
            None => self.state.nodes.remove(node),
        };
    }

    /// Let jobs react to node changes, persist first (and flush), then act
    /// on the rest, in order.
    async fn apply(&mut self, effects: Vec<Effect>) -> Result<(), StoreError> {
        for effect in self.persist(effects).await? {
            self.act(effect);
        }
        Ok(())
    }

    /// The first half of [`Self::apply`]: let jobs react, write and flush;
    /// returns the effects to act on.
    async fn persist(&mut self, mut effects: Vec<Effect>) -> Result<Vec<Effect>, StoreError> {
        if !effects.is_empty() {
            let more = self.state.react(&effects, self.clock.now());
            effects.extend(more);
            let lemons = self.state.lemon_react(&effects, self.clock.now());
            effects.extend(lemons);
            let burn_in = self.state.burn_in_react(&effects, self.clock.now());
            effects.extend(burn_in);
        }
        let mut wrote = false;
        for effect in &effects {
            match effect {
                Effect::Persist(record) => {
                    self.store.put_node(record)?;
                    wrote = true;
                }
                Effect::Stage(record) => self.store.put_node(record)?,
                Effect::Record { node, event } => self.store.put_event(node, event)?,
                Effect::PersistJob(job) => {
                    self.store.put_job(job)?;
                    wrote = true;
                }
                Effect::PersistLemon(record) => {
                    self.store.put_lemon(record)?;
                    wrote = true;
                }
                _ => {}
            }
        }
        if wrote {
            let started = Instant::now();
            let flushed = self.store.flush().await;
            let took = started.elapsed().as_secs_f64();
            self.metrics.ha.observe(self.store.backend(), "flush", took);
            flushed.inspect_err(|e| {
                warn!(error = %e, "state store flush failed; change not acknowledged");
            })?;
        }
        Ok(effects)
    }

    /// Reopen the store after a failed write, once that works (space came
    /// back), and write the whole state again: changes made while it failed
    /// were never flushed.
    async fn recover_store(&mut self) {
        match self.store.recover() {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => {
                debug!(error = %e, "state store still cannot be reopened");
                return;
            }
        }
        let mut effects: Vec<Effect> = self
            .state
            .nodes
            .values()
            .map(|n| Effect::Persist((*n.record).clone()))
            .collect();
        effects.extend(
            self.state
                .jobs
                .values()
                .map(|j| Effect::PersistJob(Box::new(j.clone()))),
        );
        match self.persist(effects).await {
            Ok(_) => info!(
                nodes = self.state.nodes.len(),
                jobs = self.state.jobs.len(),
                "state store reopened after a write error; state written again"
            ),
            Err(e) => warn!(error = %e, "state store reopened but cannot be written yet"),
        }
    }

    fn act(&mut self, effect: Effect) {
        match effect {
            Effect::Persist(_) | Effect::Stage(_) => {}
            Effect::CloseSession { node, session } => {
                self.sessions.remove(&session);
                info!(node = %node, session, "closed superseded agent session: the node registered again");
            }
            Effect::Availability {
                node,
                from,
                to,
                why,
            } => {
                self.metrics.count_transition(to);
                if from.is_none() {
                    self.metrics.observe_condition(&node, Condition::Healthy);
                }
                self.dirty = true;
                let from = from.map_or("new", Availability::as_str);
                match to {
                    Availability::Ready => {
                        info!(node = %node, from, to = to.as_str(), why, "node is Ready")
                    }
                    Availability::Unreachable => {
                        warn!(node = %node, from, to = to.as_str(), why, "node is Unreachable")
                    }
                    Availability::Lost => {
                        warn!(node = %node, from, to = to.as_str(), why, "node is Lost")
                    }
                }
            }
            Effect::Cordoned {
                node,
                cordon,
                rule,
                observed_at_ms,
            } => {
                self.metrics.count_cordon(cordon.source.as_str(), rule);
                let latency_ms = observed_at_ms.map(|t| self.clock.now().wall_ms.saturating_sub(t));
                if let Some(ms) = latency_ms {
                    self.metrics.fault_to_cordon.observe(ms as f64 / 1000.0);
                }
                warn!(node = %node, reason = %cordon.reason, source = cordon.source.as_str(), rule, fault_to_cordon_ms = ?latency_ms, "cordoned node {node}: {}", cordon.reason);
            }
            Effect::Uncordoned { node, previous } => {
                self.metrics.uncordons.inc();
                info!(node = %node, previous_reason = %previous.reason, "uncordoned node {node}");
            }
            Effect::Record { node, event } => {
                self.dirty = true;
                self.bus
                    .send(v1::ClusterEvent {
                        at_unix_ms: event.at_unix_ms,
                        kind: event.kind,
                        node,
                        job: String::new(),
                        message: event.message,
                    })
                    .ok();
            }
            Effect::PersistJob(job) => {
                self.dirty = true;
                let news = self
                    .state
                    .jobs
                    .get_mut(&job.id)
                    .map(|j| std::mem::take(&mut j.unannounced))
                    .unwrap_or_default();
                for e in news {
                    self.bus
                        .send(v1::ClusterEvent {
                            at_unix_ms: e.at_ms,
                            kind: e.kind,
                            node: String::new(),
                            job: job.id.clone(),
                            message: e.message,
                        })
                        .ok();
                }
            }
            Effect::Restarted {
                job,
                kind,
                lost_ms,
                fault_to_relaunch_ms,
            } => {
                self.metrics
                    .count_restart(&kind, lost_ms, fault_to_relaunch_ms);
                info!(job = %job, kind = %kind, lost_ms, fault_to_relaunch_ms, "job {job} relaunched after a {kind} failure");
            }
            Effect::Command { node, kind } => self.send_command(&node, kind),
            Effect::PersistLemon(r) => {
                self.dirty = true;
                let recent = r
                    .recent(self.clock.now().wall_ms, &self.state.lemons.cfg)
                    .count();
                let last = r.incidents.last();
                let lemon_now =
                    r.blocklisted_at_ms.is_some() && r.blocklisted_at_ms == last.map(|i| i.at_ms);
                match (
                    r.cleared_at_ms.filter(|_| r.blocklisted_at_ms.is_none()),
                    lemon_now,
                ) {
                    (Some(_), _) if last.is_none_or(|i| Some(i.at_ms) <= r.cleared_at_ms) => {
                        info!(subject = %r.key(), node = %r.node, "lemon entry {} cleared by an operator", r.key())
                    }
                    (_, true) => {
                        warn!(subject = %r.key(), node = %r.node, failures = recent, kinds = %r.kinds(self.clock.now().wall_ms, &self.state.lemons.cfg), "{} is a lemon: {recent} failures within the window; blocklisted", r.key())
                    }
                    _ => {
                        info!(subject = %r.key(), node = %r.node, failures = recent, kind = last.map_or("", |i| i.kind.as_str()), "failure charged to {}", r.key())
                    }
                }
            }
            Effect::JobLog { job, message, warn } => {
                if warn {
                    warn!(job = %job, "job {job}: {message}");
                } else {
                    info!(job = %job, "job {job}: {message}");
                }
            }
            Effect::Condition {
                node,
                from,
                to,
                reasons,
            } => {
                self.dirty = true;
                self.metrics.observe_condition(&node, to);
                let why = reasons.first().map_or("", String::as_str);
                match to {
                    Condition::Healthy => {
                        info!(node = %node, from = from.as_str(), to = to.as_str(), "node {node} is Healthy again")
                    }
                    _ => {
                        warn!(node = %node, from = from.as_str(), to = to.as_str(), reasons = ?reasons, "node {node} is {}: {why}", to.as_str())
                    }
                }
            }
            Effect::Xid {
                node,
                gpu,
                xid,
                class,
            } => {
                self.metrics.count_xid(xid);
                warn!(node = %node, gpu, xid, class = ?class, "{} on GPU {gpu} of {node}", crate::xid::label(xid));
            }
        }
    }

    fn publish(&mut self) {
        self.dirty = false;
        self.metrics.observe_nodes(self.state.nodes.values());
        self.metrics
            .observe_jobs(self.state.jobs.values(), self.clock.now().wall_ms);
        let snapshot = Snapshot {
            nodes: self.state.nodes.values().cloned().collect(),
            jobs: self.state.jobs.values().cloned().collect(),
            lemons: self.state.lemons.clone(),
            at: Instant::now(),
        };
        self.snapshot.send_replace(Arc::new(snapshot));
    }
}

/// Remove and return the entries of `map` that `pred` selects.
fn take_where<P>(map: &mut HashMap<u64, P>, pred: impl Fn(&P) -> bool) -> Vec<(u64, P)> {
    let ids: Vec<u64> = map
        .iter()
        .filter(|(_, p)| pred(p))
        .map(|(id, _)| *id)
        .collect();
    ids.into_iter()
        .filter_map(|id| map.remove(&id).map(|p| (id, p)))
        .collect()
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
