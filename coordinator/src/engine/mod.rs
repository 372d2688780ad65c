//! The engine: the one task that owns cluster state and the store.
//!
//! gRPC handlers hold an [`EngineHandle`] and send [`Event`]s. The engine turns each into a
//! core [`Input`](vigil_core::Input) and hands it to `vigil_core::step` (time to
//! `vigil_core::tick`), which decides everything; the engine only carries decisions out. A
//! turn stages every change its inputs made, commits them once (group commit: one SQLite transaction
//! or one etcd transaction for every queued agent message it took), and only then carries out
//! the effects: replies, commands, log lines, metrics. Readers get an `Arc<Snapshot>` through
//! a watch channel.
//!
//! Layout:
//! - `mod.rs`: the events, the handle, the engine and its loop.
//! - `turn`: one turn: agent messages, batched, through `step`, one commit per batch.
//! - `requests`: operators' requests, each committed alone and answered once durable.
//! - `commit`: stage, commit, and what happens when a commit fails (nothing is carried out;
//!   the batch stays staged and is retried every tick).
//! - `effects`: carrying out the core's effects (commands, logs, metrics, the event bus).
//! - `pending`: requests that wait for an agent's answer (diagnostics, log reads).

mod commit;
mod effects;
mod pending;
mod requests;
mod turn;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::Status;
use tracing::{error, info, warn};
use vigil_proto::v1;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::ControlError;
use crate::job::Job;
use crate::lemons::{Ledger, LemonRecord};
use crate::metrics::Metrics;
use crate::node::{DiagnosticsRecord, Node};
use crate::state::{ClusterState, Effect, Now, Registration};
use crate::store::{RecoveryReport, Store, StoreError, StoreMark};
use vigil_core::breaker::{self, Breaker};
use vigil_core::recovery::{Recovered, RecoveryHold};
use vigil_core::slurm::jobs::{self as slurm_jobs, Ledger as SlurmLedger};

/// The store's name of the recovery hold (a cluster-wide record).
pub const RECOVERY_HOLD: &str = "recovery";

/// How often the engine applies the passage of time and republishes state.
const TICK: Duration = Duration::from_millis(100);
/// A tick this late means the engine itself did not run (see `ClusterState::forgive_stall`).
const STALL: Duration = Duration::from_secs(1);
/// Ticks between attempts to reopen a store that failed a write (a full disk).
const RECOVER_STORE_EVERY: u64 = 10;
/// Events queued for the engine before handlers wait (backpressure).
const EVENT_QUEUE: usize = 8192;
/// Agent messages one turn takes from the queue at most (one commit for all of them).
const MAX_BATCH: usize = 1024;
/// An engine behind its queue by more than this is logged (and exported all the time).
const BEHIND_WARN: Duration = Duration::from_secs(1);
/// Events kept for slow `clusterctl events --follow` readers.
const EVENT_BUS: usize = 1024;
/// Time-driven changes are published every this many ticks.
const PUBLISH_EVERY: u64 = 3;
/// The store's size is read every this many ticks.
const STORE_SIZE_EVERY: u64 = 50;

/// The sending half of an agent session's outgoing stream. The engine holds
/// the only sender: dropping it ends the session's stream.
pub type SessionTx = mpsc::Sender<Result<v1::CoordinatorMessage, Status>>;

pub enum Event {
    Register {
        reg: Registration,
        /// The highest store mark the agent was told (`Register.last_store_id`/`_seq`);
        /// `None` when it was told none.
        told: Option<StoreMark>,
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
    /// An operator confirms the recovery hold: jobs may be scheduled again.
    ConfirmRecovery {
        actor: String,
        reply: oneshot::Sender<Result<RecoveryHold, ControlError>>,
    },
    /// An admin drops a node name's host binding (see `vigil_core::identity`).
    ForgetNode {
        node: String,
        /// Who asked, for the audit trail.
        actor: String,
        reply: oneshot::Sender<Result<Node, ControlError>>,
    },
    /// An admin closes the cordon breaker; the answer is the breaker after the reset.
    ResetBreaker {
        actor: String,
        reply: oneshot::Sender<Result<Breaker, ControlError>>,
    },
    /// The Slurm adapter carried a decision out on `node`: put it in the node's history.
    Slurm {
        node: String,
        message: String,
    },
    /// The Slurm adapter's `squeue` listing of a round, with vigil's node names.
    SlurmJobs {
        jobs: Vec<vigil_core::slurm::SlurmJob>,
        complete: bool,
    },
    /// The Slurm adapter requeued Slurm job `job` for a fault on vigil node `node`.
    SlurmRequeued {
        job: String,
        node: String,
        reason: String,
    },
}

/// What readers see: every node, as of `at`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub jobs: Vec<Job>,
    pub lemons: Ledger,
    /// The recovery hold, if the store was ever recovered (`--recover`).
    pub recovery: Option<RecoveryHold>,
    /// The cordon breaker, with the nodes it holds.
    pub breaker: Breaker,
    /// vigil's records of Slurm jobs (`[slurm]`); shared, copied only when it changes.
    pub slurm_jobs: Arc<SlurmLedger>,
    pub at: Instant,
}

impl Snapshot {
    /// `node`'s cordon the breaker holds, if it holds one.
    pub fn held(&self, node: &str) -> Option<&breaker::Held> {
        self.breaker.held.get(node)
    }
}

/// An agent's stream was accepted and its `Register` read (`Input::Contact`): the engine may
/// renew its lease at once, ahead of the queue its registration waits in.
pub struct Contact {
    pub node: String,
    pub session: u64,
    pub machine_id: String,
    pub tx: SessionTx,
}

/// Cloneable handle on the engine, for gRPC handlers.
#[derive(Clone)]
pub struct EngineHandle {
    events: mpsc::Sender<Event>,
    /// Read before `events`: a contact must not wait behind the queue it is there to outrun.
    contacts: mpsc::Sender<Contact>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Every node and job event as it happens (the engine holds the sender).
    bus: broadcast::Sender<v1::ClusterEvent>,
    /// The engine's clock, so readers measure ages on the same monotonic scale.
    clock: Clock,
    /// Reads hung attempts' evidence from the store, beside the engine (`job show`).
    evidence: crate::store::EvidenceReader,
}

impl EngineHandle {
    /// Hands the engine a contact, if its queue has room (none: the registration renews the
    /// lease, later, as without contacts).
    pub fn contact(&self, contact: Contact) {
        self.contacts.try_send(contact).ok();
    }

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

    /// Every stored record of `job`'s hang evidence, as (attempt, evidence).
    pub async fn evidence(
        &self,
        job: &str,
    ) -> Result<Vec<(u64, vigil_core::jobs::evidence::NodeEvidence)>, StoreError> {
        self.evidence.of_job(job).await
    }

    /// Every snapshot the engine publishes from now on (the Slurm adapter wakes on them).
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
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
    contacts: mpsc::Receiver<Contact>,
    dirty: bool,
    pending: pending::Pending,
    /// Called on every tick of the loop: proof that the engine itself, not
    /// just the process, is alive (systemd's watchdog is fed from here).
    on_tick: Option<Box<dyn FnMut() + Send>>,
    bus: broadcast::Sender<v1::ClusterEvent>,
    ticks: u64,
    /// When the last tick ran: a much longer gap means this process was stalled.
    last_tick: vigil_core::Instant,
    /// The last moment the engine found its queue empty: every agent message received
    /// before it has been stepped. Silence is judged as of then, not of now.
    heard_until: vigil_core::Instant,
    /// Whether the engine is behind by more than [`BEHIND_WARN`] (logged when it changes).
    behind_warned: bool,
    /// The only clock decisions are given (monotonic deadlines, wall-clock records).
    clock: Clock,
    /// Effects of turns whose commit failed: carried out once the store recovered.
    held: Vec<Effect>,
    /// Set when a commit failed (why): nothing is committed until `recover_store` has
    /// written the whole state again.
    store_failed: Option<String>,
    /// Since when history entries have been staged but not committed (see `commit`): they
    /// wait for a commit that something else needs, or for `HISTORY_DELAY`.
    history_waiting_since: Option<Instant>,
    /// The beginning of a recovery hold (`--recover`), stepped in `new`: committed and carried
    /// out by [`Engine::commit_recovery_hold`] before anything is served.
    begun: Vec<Effect>,
    /// The ledger of Slurm jobs as last stored: what snapshots share.
    slurm_jobs: Arc<SlurmLedger>,
}

impl Engine {
    /// The fencing token on every message to agents.
    fn term(&self) -> u64 {
        self.store.leadership().term()
    }

    /// Whether this coordinator may still act: always for a single coordinator; with etcd, while its lease holds.
    fn leads(&self) -> bool {
        self.store.leadership().is_valid()
    }

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
        let (contacts_tx, contacts) = mpsc::channel(EVENT_QUEUE);
        let (bus, _) = broadcast::channel(EVENT_BUS);
        let mut state = state.with_jobs(store.load_jobs()?);
        state.lemons = Ledger::new(config.lemons, store.load_lemons()?);
        state.triage = config.triage;
        state.burn_in = config.burn_in.clone();
        state.remediation = config.remediation.clone();
        state.stragglers = config.stragglers;
        state.evidence = config.evidence;
        state.recovery = store.load_cluster::<RecoveryHold>(RECOVERY_HOLD)?;
        state.breaker.cfg = config.cordon_breaker;
        if let Some(stored) = store.load_cluster::<Breaker>(breaker::RECORD)? {
            state.breaker.restore(stored, clock.now());
        }
        if let Some(open) = &state.breaker.open {
            warn!(
                since_unix_ms = open.since_unix_ms,
                held = state.breaker.held.len(),
                "cordon breaker still open: automatic cordons are held until clusterctl breaker reset"
            );
        }
        let keep = config
            .slurm
            .as_ref()
            .map_or(slurm_jobs::DEFAULT_KEEP_FINISHED, |s| s.keep_finished_jobs);
        state.restore_slurm_jobs(store.load_cluster(slurm_jobs::RECORD)?, keep);
        let slurm_ledger = Arc::new(state.slurm_jobs.clone());
        state.rearm_clocks(clock.now());
        if let Some(hold) = state.recovery.as_ref().filter(|h| h.holds_jobs()) {
            warn!(
                since_unix_ms = hold.since_unix_ms,
                lost = hold.lost.len(),
                "recovery hold still in force: no job starts until an operator runs clusterctl recovery confirm"
            );
        }
        let begun = match store.recovered() {
            Some(report) => begin_recovery(&mut state, report, store.path(), clock.now()),
            None => Vec::new(),
        };
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot {
            nodes: state.nodes.values().cloned().collect(),
            jobs: state.jobs.values().cloned().collect(),
            lemons: state.lemons.clone(),
            recovery: state.recovery.clone(),
            breaker: state.breaker.clone(),
            slurm_jobs: slurm_ledger.clone(),
            at: Instant::now(),
        }));
        metrics.observe_recovery(state.recovery.as_ref());
        metrics.cordon_breaker.observe(&state.breaker);
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
            contacts,
            dirty: false,
            pending: pending::Pending::default(),
            on_tick: None,
            bus: bus.clone(),
            ticks: 0,
            last_tick: clock.now().mono,
            heard_until: clock.now().mono,
            behind_warned: false,
            clock,
            held: Vec::new(),
            store_failed: None,
            history_waiting_since: None,
            begun,
            slurm_jobs: slurm_ledger,
        };
        let handle = EngineHandle {
            events: events_tx,
            contacts: contacts_tx,
            snapshot: snapshot_rx,
            bus,
            clock,
            evidence: engine.store.evidence_reader(),
        };
        Ok((engine, handle))
    }

    /// Call `f` on every tick of the engine loop (every 100 ms).
    pub fn on_tick(mut self, f: Box<dyn FnMut() + Send>) -> Self {
        self.on_tick = Some(f);
        self
    }

    /// Commit the recovery hold that `new` began (after a `--recover` open), then carry it out
    /// (log lines, metrics). Call it before serving; without a hold it does nothing. An error
    /// means the hold is not durable: the coordinator must not serve.
    pub async fn commit_recovery_hold(&mut self) -> Result<(), StoreError> {
        let effects = std::mem::take(&mut self.begun);
        if effects.is_empty() {
            return Ok(());
        }
        self.commit_and_act(effects).await?;
        self.publish();
        Ok(())
    }

    /// Run until `stop` turns true or every handle is gone; flush on the way out.
    ///
    /// Ends early, with [`StoreError::Damaged`] and without committing anything more, when a
    /// registering agent shows that the store was rolled back (see `turn::Engine::witnessed`):
    /// every session is closed and the process exits 65.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), StoreError> {
        // A caller that did not commit the recovery hold first: nothing is stepped before it.
        if let Err(e) = self.commit_recovery_hold().await {
            error!(error = %e, "the recovery hold is not durable yet; it is written with the whole state once the store recovers");
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.last_tick = self.clock.now().mono;
        loop {
            tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                Some(contact) = self.contacts.recv() => self.contact(contact),
                event = self.events.recv() => match event {
                    Some(event) => {
                        let mut batch = vec![event];
                        while batch.len() < MAX_BATCH {
                            match self.events.try_recv() {
                                Ok(more) => batch.push(more),
                                Err(_) => {
                                    // Empty: everything received until now is in hand.
                                    self.heard_until = self.clock.now().mono;
                                    break;
                                }
                            }
                        }
                        if let Err(e) = self.turn(batch).await {
                            self.sessions.clear();
                            return Err(e);
                        }
                        // Under a steady flood of agent messages the tick below never wins
                        // the select: run it here once due, or liveness, commands, deferred
                        // history and readers' snapshots would stall until the flood ends.
                        let since = self.clock.now().mono.saturating_duration_since(self.last_tick);
                        if since >= TICK {
                            self.on_tick_turn().await;
                            tick.reset();
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    // The queue was empty (events come first in this select).
                    self.heard_until = self.clock.now().mono;
                    self.on_tick_turn().await;
                }
            }
        }
        self.sessions.clear();
        match self.store.flush().await {
            Ok(()) => info!("engine stopped; state store flushed"),
            Err(e) => warn!(error = %e, "engine stopped; final flush failed"),
        }
        Ok(())
    }

    /// The store's mark as agents are told it: empty and 0 where the store keeps none.
    fn told_mark(&self) -> StoreMark {
        self.store.mark().unwrap_or_default()
    }

    /// The passage of time: the core's `tick`, expiring requests, housekeeping.
    async fn on_tick_turn(&mut self) {
        let t = self.clock.now();
        let gap = t.mono.saturating_duration_since(self.last_tick);
        self.last_tick = t.mono;
        let mut effects = Vec::new();
        if gap > STALL {
            // SIGSTOP, a paused VM, a blocked disk: the silence was ours, not the agents'.
            warn!(
                stalled_ms = gap.as_millis(),
                "engine was stalled; not counting the stall as agent silence or lack of progress"
            );
            let gap = gap.saturating_sub(TICK);
            effects.extend(vigil_core::step(
                &mut self.state,
                vigil_core::Input::Stalled { gap },
                t,
            ));
        }
        let behind = t.mono.saturating_duration_since(self.heard_until);
        self.observe_behind(behind);
        effects.extend(vigil_core::tick_heard_until(
            &mut self.state,
            t,
            self.heard_until,
        ));
        self.commit_and_act(effects).await.ok();
        self.pending.expire(Instant::now());
        if self.store_failed.is_some() && self.ticks.is_multiple_of(RECOVER_STORE_EVERY) {
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

    /// Exports how far behind its queue the engine is; logs when that passes [`BEHIND_WARN`]
    /// and when it is back.
    fn observe_behind(&mut self, behind: Duration) {
        self.metrics.engine_behind.set(behind.as_secs_f64());
        let over = behind > BEHIND_WARN;
        if over != self.behind_warned {
            self.behind_warned = over;
            if over {
                warn!(
                    behind_ms = u64::try_from(behind.as_millis()).unwrap_or(u64::MAX),
                    queued = self.events.len(),
                    "engine is behind its queue; judging agents' silence as of when it last \
                     had every message in hand, so its own backlog marks no agent unreachable \
                     or lost"
                );
            } else {
                info!("engine caught up with its queue");
            }
        }
    }

    fn publish(&mut self) {
        self.dirty = false;
        self.metrics.observe_nodes(self.state.nodes.values());
        self.metrics.observe_jobs(
            self.state.jobs.values(),
            &self.state.slurm_jobs,
            self.clock.now().wall_ms,
        );
        self.metrics.observe_recovery(self.state.recovery.as_ref());
        self.metrics.cordon_breaker.observe(&self.state.breaker);
        let snapshot = Snapshot {
            nodes: self.state.nodes.values().cloned().collect(),
            jobs: self.state.jobs.values().cloned().collect(),
            lemons: self.state.lemons.clone(),
            recovery: self.state.recovery.clone(),
            breaker: self.state.breaker.clone(),
            slurm_jobs: self.slurm_jobs.clone(),
            at: Instant::now(),
        };
        self.snapshot.send_replace(Arc::new(snapshot));
    }
}

/// Begin the recovery hold on a state loaded from a store opened with `--recover`: one error
/// line per lost record, then the core's decision (every node cordoned for review, jobs held);
/// its effects, to commit before anything is served.
fn begin_recovery(
    state: &mut ClusterState,
    report: RecoveryReport,
    data_dir: &std::path::Path,
    now: Now,
) -> Vec<Effect> {
    for line in &report.lost {
        error!(data_dir = %data_dir.display(), record = %line, "record lost in store recovery: {line}");
    }
    let input = vigil_core::Input::BeginRecovery(Recovered {
        damage: report.damage,
        lost: report.lost,
        lost_nodes: report.lost_nodes,
        lost_jobs: report.lost_jobs,
        damaged_copy: report.damaged_copy.display().to_string(),
    });
    vigil_core::step(state, input, now)
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
