//! One turn of the engine: inputs through `vigil_core::step`, one commit, then the effects.
//!
//! Agent messages (registrations, heartbeats, events, disconnects) are taken in batches: every
//! message queued when the turn starts is stepped, acks and the answers to registrations that
//! changed nothing stored go out (receipts, not promises of durability), the batch is committed
//! once, and only then are new or changed nodes answered and commands and other effects sent. An operator's request commits on its
//! own, after the agent messages queued before it, and is answered once its change is durable.
//!
//! Registrations and acks tell each agent the store's mark (its id and commit count); a
//! registering agent sends back the highest mark it was told. A mark of this store beyond the
//! store's own last commit means the data dir was replaced by an older copy of itself: before
//! anything of the turn is stepped or committed, that registration is refused and the turn
//! ends the engine with [`StoreError::Damaged`] (docs/protocol.md, "Store marks").

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};
use vigil_core::Input;
use vigil_proto::v1;

use super::requests::refusal;
use super::{Engine, Event, SessionTx, millis};
use crate::error::ControlError;
use crate::node::DiagnosticsRecord;
use crate::state::{Effect, Registration};
use crate::store::{StoreError, StoreMark};
use vigil_core::Ignored;

/// A registration waiting for its turn's commit before it is answered.
struct Joining {
    node: String,
    session: u64,
    tx: SessionTx,
    /// Whether its node's record changed (a new node, new GPUs, ...): then the answer waits
    /// for that record to be committed. A node coming back unchanged needs nothing stored, and
    /// is answered even while the store cannot commit, so its lease (and its jobs) hold.
    changed: bool,
    /// Why the core refused it (another live host holds the name): answered `Rejected`.
    refused: Option<String>,
}

/// What a batch of agent messages owes once it is committed.
#[derive(Default)]
struct Batch {
    effects: Vec<Effect>,
    joining: Vec<Joining>,
    /// (session, seq) of each message to acknowledge.
    acks: Vec<(u64, u64)>,
    diagnostics: Vec<(
        oneshot::Sender<Result<DiagnosticsRecord, ControlError>>,
        DiagnosticsRecord,
    )>,
}

impl Engine {
    /// Step every event of `events` in order; commit each run of agent messages once. An error
    /// (a rolled-back store) ends the engine; nothing of the turn was stepped or committed.
    pub(super) async fn turn(&mut self, events: Vec<Event>) -> Result<(), StoreError> {
        for event in &events {
            if let Event::Register {
                reg,
                told: Some(told),
                tx,
            } = event
            {
                self.witnessed(&reg.node, told, tx)?;
            }
        }
        let mut batch = Batch::default();
        for event in events {
            match event {
                Event::Register { reg, told: _, tx } => self.register(reg, tx, &mut batch),
                Event::Heartbeat {
                    node,
                    session,
                    seq,
                    heartbeat,
                } => self.heartbeat(node, session, seq, heartbeat, &mut batch),
                Event::AgentEvent {
                    node,
                    session,
                    seq,
                    event,
                } => self.agent_event(node, session, seq, event, &mut batch),
                Event::Disconnected { node, session } => {
                    self.pending.session_ended(session);
                    if self.sessions.remove(&session).is_some() {
                        debug!(node = %node, session, "agent session ended");
                    }
                    let input = Input::Disconnected { node, session };
                    batch.effects.extend(self.step(input));
                }
                Event::Flag {
                    node,
                    session,
                    kind,
                    message,
                } => {
                    let input = Input::Flag {
                        node,
                        session,
                        kind: kind.to_owned(),
                        message,
                    };
                    let effects = self.step(input);
                    batch.effects.extend(effects);
                }
                Event::Slurm { node, message } => {
                    let effects = self.step(Input::Slurm { node, message });
                    batch.effects.extend(effects);
                }
                Event::SlurmJobs { jobs, complete } => {
                    let effects = self.step(Input::SlurmJobs { jobs, complete });
                    batch.effects.extend(effects);
                }
                Event::SlurmRequeued { job, node, reason } => {
                    let effects = self.step(Input::SlurmRequeued { job, node, reason });
                    batch.effects.extend(effects);
                }
                request => {
                    self.close(std::mem::take(&mut batch)).await;
                    self.request(request).await;
                }
            }
        }
        self.close(batch).await;
        Ok(())
    }

    /// Checks the store mark a registering agent was told against the store's own: a mark of
    /// this store beyond its last commit is a rollback. Then the registration is refused,
    /// nothing staged is kept, and the engine must stop: the error says so.
    fn witnessed(&self, node: &str, told: &StoreMark, tx: &SessionTx) -> Result<(), StoreError> {
        let Some(mark) = self.store.mark() else {
            return Ok(());
        };
        if !mark.is_behind(told, self.store.opened_seq()) {
            return Ok(());
        }
        self.metrics.store_rollbacks.inc();
        self.metrics.rejected_registrations.inc();
        let path = self.store.path().to_owned();
        error!(
            node = %node,
            store_id = %mark.store_id,
            store_seq = mark.seq,
            agent_seq = told.seq,
            data_dir = %path.display(),
            "state store rolled back: it holds commit {} of store {}, but agent {node} was told \
             of commit {}; the data dir was replaced by an older copy. Registration refused; the \
             coordinator stops, committing nothing more",
            mark.seq,
            mark.store_id,
            told.seq
        );
        let rejected = v1::coordinator_message::Body::Rejected(v1::Rejected {
            retry_after_ms: 0,
            reason: format!(
                "the coordinator's state store was rolled back: it holds commit {} of store {}, \
                 but this agent was told of commit {}; the coordinator stops until an operator \
                 restores its data dir from a backup or recovers it",
                mark.seq, mark.store_id, told.seq
            ),
        });
        tx.try_send(Ok(v1::CoordinatorMessage {
            body: Some(rejected),
            term: self.term(),
        }))
        .ok();
        self.store.discard();
        Err(StoreError::Damaged {
            path,
            what: format!(
                "it holds commit {} of store {}, but agent {node} was told of commit {}: the \
                 data dir was replaced by an older copy (a rollback)",
                mark.seq, mark.store_id, told.seq
            ),
        })
    }

    pub(super) fn step(&mut self, input: Input) -> Vec<Effect> {
        vigil_core::step(&mut self.state, input, self.clock.now())
    }

    /// An agent's `Register` arrived (`Contact`): when the core allows it (the node is known,
    /// of this host, not `Lost`, and this session not registered yet), renew its lease now with
    /// a `LeaseRenewed`, so that waiting behind the queue does not run its lease out. Stepped in
    /// this task like every `Lost` verdict, so the two never cross; nothing to commit (silence
    /// is not stored: a restarted coordinator counts it from its own start).
    pub(super) fn contact(&mut self, c: super::Contact) {
        if c.tx.is_closed() {
            return;
        }
        let effects = self.step(Input::Contact {
            node: c.node,
            session: c.session,
            machine_id: c.machine_id,
        });
        if !effects
            .iter()
            .any(|e| matches!(e, Effect::LeaseRenewal { .. }))
        {
            return;
        }
        let renewed = v1::coordinator_message::Body::LeaseRenewed(v1::LeaseRenewed {
            lease_ms: millis(self.state.liveness.agent_lease),
        });
        let sent = c.tx.try_send(Ok(v1::CoordinatorMessage {
            body: Some(renewed),
            term: self.term(),
        }));
        if sent.is_ok() {
            self.metrics.early_lease_renewals.inc();
        }
    }

    fn register(&mut self, reg: Registration, tx: SessionTx, batch: &mut Batch) {
        let (node, session) = (reg.node.clone(), reg.session);
        // The agent gave up waiting (its stream is gone): registering it now
        // would only cost time that agents still waiting need.
        if tx.is_closed() {
            debug!(node = %node, session, "registration dropped: its session already ended");
            return;
        }
        let effects = self.step(Input::Register(reg));
        let changed = effects
            .iter()
            .any(|e| matches!(e, Effect::Persist(r) if r.name == node));
        let refused = effects.iter().find_map(|e| match e {
            Effect::IdentityConflict {
                session: s,
                message,
                ..
            } if *s == session => Some(message.clone()),
            _ => None,
        });
        batch.effects.extend(effects);
        batch.joining.push(Joining {
            node,
            session,
            tx,
            changed,
            refused,
        });
    }

    fn heartbeat(
        &mut self,
        node: String,
        session: u64,
        seq: u64,
        heartbeat: v1::Heartbeat,
        batch: &mut Batch,
    ) {
        self.metrics
            .heartbeat_received(heartbeat.gpu_health_unchanged);
        if heartbeat.sent_at_unix_ms > 0 {
            // A metric across two hosts' wall clocks; it decides nothing.
            let lag = self
                .clock
                .now()
                .wall_ms
                .saturating_sub(heartbeat.sent_at_unix_ms);
            self.metrics.heartbeat_lag.observe(lag as f64 / 1000.0);
        }
        let effects = self.step(Input::Heartbeat {
            node,
            session,
            heartbeat,
        });
        self.agent_effects(effects, session, seq, batch);
    }

    fn agent_event(
        &mut self,
        node: String,
        session: u64,
        seq: u64,
        event: v1::AgentEvent,
        batch: &mut Batch,
    ) {
        let effects = match event.kind {
            Some(v1::agent_event::Kind::Diagnostics(d)) => {
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
                let reply = self.pending.diagnostics_reply(&node, session, d.command_id);
                if reply.is_none() {
                    debug!(node = %node, command_id = d.command_id, "diagnostics result no operator waits for (a triage's, a burn-in's, or late); recording it");
                }
                let effects = self.step(Input::Diagnostics {
                    node,
                    session,
                    record: record.clone(),
                });
                if let Some(reply) = reply {
                    match effects.iter().find_map(refusal) {
                        Some(e) => {
                            reply.send(Err(e)).ok();
                        }
                        None => batch.diagnostics.push((reply, record)),
                    }
                }
                effects
            }
            Some(v1::agent_event::Kind::LogData(d)) => {
                self.pending.log_data(session, &d);
                self.step(Input::Heard { node, session })
            }
            _ => self.step(Input::AgentEvent {
                node,
                session,
                event,
            }),
        };
        self.agent_effects(effects, session, seq, batch);
    }

    /// Effects of an agent's message: ignored (a superseded session) ends that session;
    /// otherwise the message is acknowledged once the batch is committed.
    fn agent_effects(&mut self, effects: Vec<Effect>, session: u64, seq: u64, batch: &mut Batch) {
        let stale = |e: &Effect| {
            matches!(
                e,
                Effect::Ignored {
                    why: Ignored::StaleSession,
                    ..
                }
            )
        };
        if effects.iter().any(stale) {
            self.sessions.remove(&session);
        } else {
            batch.acks.push((session, seq));
        }
        batch.effects.extend(effects);
        self.dirty = true;
    }

    /// Answer and acknowledge a batch of agent messages, commit it, then carry it out.
    ///
    /// Receipts go out before the commit: acks, and the answers to registrations that changed
    /// nothing stored. They promise receipt, not durability (docs/protocol.md), and they renew
    /// the agents' leases, so a slow disk (a commit waits for its fsync) must not hold them:
    /// in a reconnect storm every registration would otherwise wait for a commit, and agents
    /// that give up waiting come back as new handshakes. A new or changed node's answer, and
    /// every effect of the batch, still wait for the commit.
    async fn close(&mut self, batch: Batch) {
        let Batch {
            effects,
            joining,
            acks,
            diagnostics,
        } = batch;
        if effects.is_empty() && joining.is_empty() && acks.is_empty() && diagnostics.is_empty() {
            return;
        }
        // Sessions that end before they began: their registrations are undone by a step.
        let mut gone = Vec::new();
        let mut changed = Vec::new();
        for j in joining {
            if let Some(reason) = &j.refused {
                // Never live: nothing to undo.
                self.refuse_claim(&j, reason);
            } else if j.changed {
                changed.push(j);
            } else if !self.open_session(&j) {
                gone.push(Input::Disconnected {
                    node: j.node,
                    session: j.session,
                });
            }
        }
        // Acks renew the agents' leases, also when the commit fails: a store that cannot
        // commit must not stop running jobs.
        self.send_acks(&acks);
        let committed = self.commit_effects(&effects).await;
        for j in changed {
            let answered = match &committed {
                Err(e) => {
                    self.refuse_registration(&j, e);
                    false
                }
                Ok(()) => self.open_session(&j),
            };
            if !answered {
                gone.push(Input::Disconnected {
                    node: j.node,
                    session: j.session,
                });
            }
        }
        match committed {
            Ok(()) => {
                for effect in effects {
                    self.act(effect);
                }
                for (reply, record) in diagnostics {
                    reply.send(Ok(record)).ok();
                }
            }
            Err(e) => {
                self.hold(effects);
                for (reply, _) in diagnostics {
                    let e = StoreError::Io {
                        path: self.store.path().to_owned(),
                        message: e.to_string(),
                    };
                    reply.send(Err(ControlError::Store(e))).ok();
                }
            }
        }
        for input in gone {
            let effects = self.step(input);
            // Held, like the rest, while the store cannot commit.
            self.commit_and_act(effects).await.ok();
        }
        // Readers see it with the next tick (100 ms): publishing here would
        // copy every node once per registration, quadratic in a reconnect storm.
        self.dirty = true;
    }

    /// Tell an agent its registration could not be saved; it retries with backoff.
    fn refuse_registration(&self, j: &Joining, e: &StoreError) {
        self.metrics.rejected_registrations.inc();
        warn!(node = %j.node, error = %e, "registration refused: could not commit it");
        let rejected = v1::coordinator_message::Body::Rejected(v1::Rejected {
            retry_after_ms: 0,
            reason: format!("coordinator could not save the registration: {e}"),
        });
        j.tx.try_send(Ok(v1::CoordinatorMessage {
            body: Some(rejected),
            term: self.term(),
        }))
        .ok();
    }

    /// Tell an agent another host holds its node name; it waits before it tries again.
    fn refuse_claim(&self, j: &Joining, reason: &str) {
        let rejected = v1::coordinator_message::Body::Rejected(v1::Rejected {
            reason: reason.to_owned(),
            retry_after_ms: millis(vigil_core::identity::CONFLICT_RETRY_AFTER),
        });
        j.tx.try_send(Ok(v1::CoordinatorMessage {
            body: Some(rejected),
            term: self.term(),
        }))
        .ok();
    }

    /// Answer a registration; whether its session is live.
    fn open_session(&mut self, j: &Joining) -> bool {
        self.metrics.registrations.inc();
        let liveness = &self.state.liveness;
        let mark = self.told_mark();
        let registered = v1::Registered {
            heartbeat_interval_ms: millis(liveness.heartbeat_interval),
            lease_ms: millis(liveness.agent_lease),
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            session_id: j.session,
            coordinator_name: self.store.leadership().name().to_owned(),
            store_id: mark.store_id,
            store_seq: mark.seq,
            accepts_gpu_health_unchanged: true,
        };
        let msg = v1::CoordinatorMessage {
            body: Some(v1::coordinator_message::Body::Registered(registered)),
            term: self.term(),
        };
        // A coordinator whose leadership lapsed answers nobody: the agent moves on.
        let live = self.leads() && j.tx.try_send(Ok(msg)).is_ok();
        if live {
            self.sessions.insert(j.session, j.tx.clone());
        }
        live
    }

    /// Acknowledge committed messages; each ack also renews the agent's lease.
    fn send_acks(&self, acks: &[(u64, u64)]) {
        if !self.leads() || acks.is_empty() {
            return;
        }
        // The last durable mark: this turn's commit, or the last one that worked.
        let mark = self.told_mark();
        for &(session, seq) in acks {
            if let Some(tx) = self.sessions.get(&session) {
                let ack = v1::Ack {
                    seq,
                    store_id: mark.store_id.clone(),
                    store_seq: mark.seq,
                };
                let ack = v1::CoordinatorMessage {
                    body: Some(v1::coordinator_message::Body::Ack(ack)),
                    term: self.term(),
                };
                // A full queue means the agent is not reading; its lease
                // runs out and it reconnects. Never block the engine on it.
                tx.try_send(Ok(ack)).ok();
            }
        }
    }
}
