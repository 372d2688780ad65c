//! The engine: the one task that owns cluster state and the store.
//!
//! gRPC handlers hold an [`EngineHandle`] and send [`Event`]s; the engine
//! applies each through the pure transitions of `state`, persists (and
//! flushes) what they ask for, and only then acts: replies, stream messages,
//! log lines, metrics. Readers get an `Arc<Snapshot>` through a watch channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::Status;
use tracing::{debug, info, warn};
use vigil_proto::v1;

use crate::config::LivenessConfig;
use crate::error::ControlError;
use crate::metrics::{Metrics, unix_ms};
use crate::node::{Availability, CordonSource, Node};
use crate::state::{ClusterState, Effect, Now, Registration};
use crate::store::{Store, StoreError};

/// How often the engine applies the passage of time and republishes state.
const TICK: Duration = Duration::from_millis(100);
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
    Cordon {
        node: String,
        reason: String,
        reply: oneshot::Sender<Result<Node, ControlError>>,
    },
    Uncordon {
        node: String,
        reply: oneshot::Sender<Result<Node, ControlError>>,
    },
}

/// What readers see: every node, as of `at`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub at: Instant,
}

/// Cloneable handle on the engine, for gRPC handlers.
#[derive(Clone)]
pub struct EngineHandle {
    events: mpsc::Sender<Event>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl EngineHandle {
    pub async fn send(&self, event: Event) -> Result<(), ControlError> {
        self.events
            .send(event)
            .await
            .map_err(|_| ControlError::ShuttingDown)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Ask the engine something and wait for its answer.
    pub async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Node, ControlError>>) -> Event,
    ) -> Result<Node, ControlError> {
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
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        wall_ms: unix_ms(SystemTime::now()),
    }
}

impl Engine {
    /// Load state from the store; the engine starts when [`Engine::run`] is awaited.
    pub fn new(
        store: Store,
        liveness: LivenessConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, EngineHandle), StoreError> {
        let records = store.load_nodes()?;
        let state = ClusterState::load(records, liveness, now());
        info!(
            nodes = state.nodes.len(),
            cordoned = state.nodes.values().filter(|n| n.cordoned()).count(),
            data_dir = %store.path().display(),
            "loaded cluster state; nodes are Unreachable until their agents reconnect"
        );
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot {
            nodes: state.nodes.values().cloned().collect(),
            at: Instant::now(),
        }));
        metrics.observe_nodes(state.nodes.values());
        let engine = Self {
            state,
            store,
            sessions: HashMap::new(),
            metrics,
            snapshot,
            events,
            dirty: false,
        };
        let handle = EngineHandle {
            events: events_tx,
            snapshot: snapshot_rx,
        };
        Ok((engine, handle))
    }

    /// Run until `stop` turns true or every handle is gone; flush on the way out.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                event = self.events.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
                _ = tick.tick() => {
                    let effects = self.state.tick(now());
                    self.apply(effects).await.ok();
                    if self.dirty {
                        self.publish();
                    }
                    self.metrics.engine_alive(now().wall_ms);
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
                let result = self.state.heartbeat(&node, session, heartbeat, now());
                self.after_agent_message(result, session, seq).await;
            }
            Event::AgentEvent {
                node,
                session,
                seq,
                event,
            } => {
                info!(node = %node, event = ?event.kind, "agent reported an event");
                let result = self.state.heard(&node, session, now());
                self.after_agent_message(result, session, seq).await;
            }
            Event::Disconnected { node, session } => {
                let effects = self.state.disconnected(&node, session, now());
                if self.sessions.remove(&session).is_some() {
                    debug!(node = %node, session, "agent session ended");
                }
                self.apply(effects).await.ok();
                self.dirty = true;
            }
            Event::Cordon {
                node,
                reason,
                reply,
            } => {
                let backup = self.state.nodes.get(&node).cloned();
                let result = self
                    .state
                    .cordon(&node, reason, CordonSource::Operator, now());
                let answer = self.commit(&node, backup, result).await;
                reply.send(answer).ok();
            }
            Event::Uncordon { node, reply } => {
                let backup = self.state.nodes.get(&node).cloned();
                let result = self.state.uncordon(&node);
                let answer = self.commit(&node, backup, result).await;
                reply.send(answer).ok();
            }
        }
    }

    async fn register(&mut self, reg: Registration, tx: SessionTx) {
        let (node, session) = (reg.node.clone(), reg.session);
        let backup = self.state.nodes.get(&node).cloned();
        let effects = self.state.register(reg, now());
        if let Err(e) = self.apply(effects).await {
            self.restore(&node, backup);
            self.metrics.rejected_registrations.inc();
            warn!(node = %node, error = %e, "registration refused: could not save it");
            let rejected = v1::coordinator_message::Body::Rejected(v1::Rejected {
                reason: format!("coordinator could not save the registration: {e}"),
            });
            tx.try_send(Ok(v1::CoordinatorMessage {
                body: Some(rejected),
            }))
            .ok();
            return;
        }
        self.metrics.registrations.inc();
        let liveness = &self.state.liveness;
        let registered = v1::Registered {
            heartbeat_interval_ms: millis(liveness.heartbeat_interval),
            lease_ms: millis(liveness.agent_lease),
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            session_id: session,
        };
        let msg = v1::CoordinatorMessage {
            body: Some(v1::coordinator_message::Body::Registered(registered)),
        };
        if tx.try_send(Ok(msg)).is_ok() {
            self.sessions.insert(session, tx);
        } else {
            let effects = self.state.disconnected(&node, session, now());
            self.apply(effects).await.ok();
        }
        self.publish();
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
                if let Some(tx) = self.sessions.get(&session) {
                    let ack = v1::CoordinatorMessage {
                        body: Some(v1::coordinator_message::Body::Ack(v1::Ack { seq })),
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

    /// Persist first (and flush), then act on the rest, in order.
    async fn apply(&mut self, effects: Vec<Effect>) -> Result<(), StoreError> {
        let mut wrote = false;
        for effect in &effects {
            if let Effect::Persist(record) = effect {
                self.store.put_node(record)?;
                wrote = true;
            }
        }
        if wrote {
            self.store.flush().await.inspect_err(|e| {
                warn!(error = %e, "state store flush failed; change not acknowledged");
            })?;
        }
        for effect in effects {
            self.act(effect);
        }
        Ok(())
    }

    fn act(&mut self, effect: Effect) {
        match effect {
            Effect::Persist(_) => {}
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
            Effect::Cordoned { node, cordon } => {
                self.metrics.cordons.inc();
                info!(node = %node, reason = %cordon.reason, source = cordon.source.as_str(), "cordoned node {node}: {}", cordon.reason);
            }
            Effect::Uncordoned { node, previous } => {
                self.metrics.uncordons.inc();
                info!(node = %node, previous_reason = %previous.reason, "uncordoned node {node}");
            }
        }
    }

    fn publish(&mut self) {
        self.dirty = false;
        self.metrics.observe_nodes(self.state.nodes.values());
        let snapshot = Snapshot {
            nodes: self.state.nodes.values().cloned().collect(),
            at: Instant::now(),
        };
        self.snapshot.send_replace(Arc::new(snapshot));
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
