//! One turn of the engine: inputs through `vigil_core::step`, one commit, then the effects.
//!
//! Agent messages (registrations, heartbeats, events, disconnects) are taken in batches: every
//! message queued when the turn starts is stepped, the batch is committed once, and only then
//! are registrations answered, acks and commands sent. An operator's request commits on its
//! own, after the agent messages queued before it, and is answered once its change is durable.

use tokio::sync::oneshot;
use tracing::{debug, info, warn};
use vigil_core::{Answer, AuditSubject, Input};
use vigil_proto::v1;

use super::{Engine, Event, SessionTx, millis};
use crate::error::ControlError;
use crate::node::DiagnosticsRecord;
use crate::state::{Effect, Registration};
use crate::store::StoreError;
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
    /// Step every event of `events` in order; commit each run of agent messages once.
    pub(super) async fn turn(&mut self, events: Vec<Event>) {
        let mut batch = Batch::default();
        for event in events {
            match event {
                Event::Register { reg, tx } => self.register(reg, tx, &mut batch),
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
                request => {
                    self.close(std::mem::take(&mut batch)).await;
                    self.request(request).await;
                }
            }
        }
        self.close(batch).await;
    }

    fn step(&mut self, input: Input) -> Vec<Effect> {
        vigil_core::step(&mut self.state, input, self.clock.now())
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
        batch.effects.extend(effects);
        batch.joining.push(Joining {
            node,
            session,
            tx,
            changed,
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
        self.metrics.heartbeats.inc();
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

    /// Commit a batch of agent messages, then answer, acknowledge and carry it out.
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
        if let Err(e) = self.commit_effects(&effects).await {
            self.hold(effects);
            let (unchanged, joining): (Vec<Joining>, Vec<Joining>) =
                joining.into_iter().partition(|j| !j.changed);
            for j in unchanged {
                if !self.open_session(&j) {
                    let closed = self.step(Input::Disconnected {
                        node: j.node,
                        session: j.session,
                    });
                    self.hold(closed);
                }
            }
            for j in joining {
                self.metrics.rejected_registrations.inc();
                warn!(node = %j.node, error = %e, "registration refused: could not commit it");
                let rejected = v1::coordinator_message::Body::Rejected(v1::Rejected {
                    reason: format!("coordinator could not save the registration: {e}"),
                });
                j.tx.try_send(Ok(v1::CoordinatorMessage {
                    body: Some(rejected),
                    term: self.term(),
                }))
                .ok();
                let closed = self.step(Input::Disconnected {
                    node: j.node,
                    session: j.session,
                });
                self.hold(closed);
            }
            for (reply, _) in diagnostics {
                let e = StoreError::Io {
                    path: self.store.path().to_owned(),
                    message: e.to_string(),
                };
                reply.send(Err(ControlError::Store(e))).ok();
            }
            // Acks renew the agents' leases: a store that cannot commit must not stop
            // running jobs. They promise receipt, not durability (docs/protocol.md).
            self.send_acks(&acks);
            return;
        }
        let mut gone = Vec::new();
        for j in joining {
            if !self.open_session(&j) {
                gone.push(Input::Disconnected {
                    node: j.node,
                    session: j.session,
                });
            }
        }
        self.send_acks(&acks);
        for effect in effects {
            self.act(effect);
        }
        for (reply, record) in diagnostics {
            reply.send(Ok(record)).ok();
        }
        for input in gone {
            let effects = self.step(input);
            self.commit_and_act(effects).await.ok();
        }
        // Readers see it with the next tick (100 ms): publishing here would
        // copy every node once per registration, quadratic in a reconnect storm.
        self.dirty = true;
    }

    /// Answer a committed registration; whether its session is live.
    fn open_session(&mut self, j: &Joining) -> bool {
        self.metrics.registrations.inc();
        let liveness = &self.state.liveness;
        let registered = v1::Registered {
            heartbeat_interval_ms: millis(liveness.heartbeat_interval),
            lease_ms: millis(liveness.agent_lease),
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            session_id: j.session,
            coordinator_name: self.store.leadership().name().to_owned(),
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
        if !self.leads() {
            return;
        }
        for &(session, seq) in acks {
            if let Some(tx) = self.sessions.get(&session) {
                let ack = v1::CoordinatorMessage {
                    body: Some(v1::coordinator_message::Body::Ack(v1::Ack { seq })),
                    term: self.term(),
                };
                // A full queue means the agent is not reading; its lease
                // runs out and it reconnects. Never block the engine on it.
                tx.try_send(Ok(ack)).ok();
            }
        }
    }

    /// An operator's request: step it, commit it alone, answer once it is durable.
    async fn request(&mut self, request: Event) {
        match request {
            Event::Cordon {
                node,
                reason,
                actor,
                reply,
            } => {
                let what = format!("cordon ({reason})");
                let answer = self
                    .apply_request(Input::Cordon {
                        node: node.clone(),
                        reason,
                    })
                    .await
                    .and_then(|_| self.node(&node));
                self.audit(AuditSubject::Node(node), &actor, &what, &answer)
                    .await;
                reply.send(answer).ok();
            }
            Event::Uncordon {
                node,
                force,
                actor,
                reply,
            } => {
                let answer = self
                    .apply_request(Input::Uncordon {
                        node: node.clone(),
                        force,
                    })
                    .await
                    .and_then(|_| self.node(&node));
                let what = if force {
                    "uncordon --force"
                } else {
                    "uncordon"
                };
                self.audit(AuditSubject::Node(node), &actor, what, &answer)
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
                self.audit(
                    AuditSubject::Node(node.clone()),
                    &actor,
                    "diagnose",
                    &started,
                )
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
                let input = Input::Drain {
                    node: node.clone(),
                    reason: reason.clone(),
                };
                let answer = self.apply_request(input).await.and_then(|answers| {
                    let jobs = answers
                        .into_iter()
                        .find_map(|a| match a {
                            Answer::Drained { jobs } => Some(jobs),
                            _ => None,
                        })
                        .unwrap_or_default();
                    info!(node = %node, jobs = ?jobs, "drained node {node}: {reason}");
                    self.node(&node).map(|n| (n, jobs))
                });
                self.audit(AuditSubject::Node(node), &actor, &what, &answer)
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
                let input = Input::SubmitJob {
                    spec_toml,
                    source: source.clone(),
                };
                let answer = match self.apply_request(input).await {
                    Ok(answers) => answers
                        .into_iter()
                        .find_map(|a| match a {
                            Answer::Submitted { id } => Some(id),
                            _ => None,
                        })
                        .ok_or_else(|| {
                            ControlError::InvalidArgument("the job was not accepted".into())
                        })
                        .and_then(|id| self.job(&id)),
                    Err(e) => {
                        if matches!(
                            e,
                            ControlError::State(crate::state::StateError::InvalidSpec(_))
                        ) {
                            self.metrics.input.spec_rejected();
                            info!(error = %e, "job spec refused");
                        }
                        Err(e)
                    }
                };
                if let Ok(job) = &answer {
                    info!(job = %job.id, name = %job.spec.name, nodes = job.spec.nodes, state = job.phase_name(), actor = %actor, "job {} submitted by {actor}", job.id);
                    let what = format!("submit (from {source})");
                    self.audit(AuditSubject::Job(job.id.clone()), &actor, &what, &answer)
                        .await;
                }
                reply.send(answer).ok();
            }
            Event::CancelJob { id, actor, reply } => {
                let answer = self
                    .apply_request(Input::CancelJob { id: id.clone() })
                    .await
                    .and_then(|_| self.job(&id));
                self.audit(AuditSubject::Job(id), &actor, "cancel", &answer)
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
                let input = Input::RestartJob {
                    id: id.clone(),
                    from_step,
                    env,
                };
                let answer = self.apply_request(input).await.and_then(|_| self.job(&id));
                self.audit(AuditSubject::Job(id), &actor, &what, &answer)
                    .await;
                reply.send(answer).ok();
            }
            Event::ClearLemon {
                subject,
                actor,
                reply,
            } => {
                let input = Input::ClearLemon {
                    subject: subject.clone(),
                };
                let answer = self.apply_request(input).await.map(|answers| {
                    answers
                        .into_iter()
                        .find_map(|a| match a {
                            Answer::LemonsCleared(cleared) => Some(cleared),
                            _ => None,
                        })
                        .unwrap_or_default()
                });
                // Recorded on the node the subject names, if it names one.
                let node = subject.strip_prefix("host/").unwrap_or(&subject).to_owned();
                let what = format!("clear lemon {subject}");
                self.audit(AuditSubject::Node(node), &actor, &what, &answer)
                    .await;
                reply.send(answer).ok();
            }
            // Agent messages never reach here (`turn` batches them).
            Event::Register { .. }
            | Event::Heartbeat { .. }
            | Event::AgentEvent { .. }
            | Event::Disconnected { .. }
            | Event::Flag { .. } => {}
        }
    }

    /// Step an operator's input and commit it alone; answer once it is durable. A refusal
    /// changes nothing; neither does a failed commit: the whole state is put back as it was
    /// (operators' requests are rare, the copy is affordable), the operator is told, and the
    /// store's recovery writes the state as it is, without the refused change.
    async fn apply_request(&mut self, input: Input) -> Result<Vec<Answer>, ControlError> {
        if let Some(why) = &self.store_failed {
            return Err(ControlError::Store(StoreError::Io {
                path: self.store.path().to_owned(),
                message: format!("no change is accepted until the store recovers from: {why}"),
            }));
        }
        let before = self.state.clone();
        let effects = self.step(input);
        if let Some(e) = effects.iter().find_map(refusal) {
            self.state = before;
            return Err(e);
        }
        let answers = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Answer(a) => Some(a.clone()),
                _ => None,
            })
            .collect();
        // A request stages only on a healthy store (a failed one refused it above), which
        // has nothing else pending: what is staged now is this request's alone, undone with it.
        if let Err(e) = self.commit_effects(&effects).await {
            self.store.discard();
            self.state = before;
            return Err(ControlError::Store(e));
        }
        for effect in effects {
            self.act(effect);
        }
        self.publish();
        Ok(answers)
    }

    fn node(&self, name: &str) -> Result<crate::node::Node, ControlError> {
        self.state.nodes.get(name).cloned().ok_or_else(|| {
            ControlError::State(crate::state::StateError::UnknownNode(name.to_owned()))
        })
    }

    fn job(&self, id: &str) -> Result<crate::job::Job, ControlError> {
        self.state
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| ControlError::State(crate::state::StateError::UnknownJob(id.to_owned())))
    }

    /// Records an operator's call on `subject` in its history, with who and how it ended.
    async fn audit<T, E: std::fmt::Display>(
        &mut self,
        subject: AuditSubject,
        actor: &str,
        what: &str,
        answer: &Result<T, E>,
    ) {
        let outcome = crate::audit::outcome(answer);
        let shown = subject.as_subject().to_string();
        info!(subject = %shown, actor = %actor, "{what} on {shown} by {actor}: {outcome}");
        let effects = self.step(Input::Audit {
            subject,
            actor: actor.to_owned(),
            what: what.to_owned(),
            outcome,
        });
        if let Err(e) = self.commit_and_act(effects).await {
            warn!(subject = %shown, error = %e, "could not store the audit record yet");
        }
        // Operator calls are rare: make the record visible to `clusterctl events` at once.
        self.publish();
    }
}

/// The refusal among a step's effects, as the caller's error.
fn refusal(effect: &Effect) -> Option<ControlError> {
    match effect {
        Effect::Refused(e) => Some(ControlError::State(e.clone())),
        Effect::Ignored {
            reason,
            why: Ignored::StaleSession,
        } => Some(ControlError::InvalidArgument(reason.clone())),
        _ => None,
    }
}
