//! Operators' requests (cordon, drain, submit, cancel, restart, clear a lemon, diagnose, read a
//! log): each is stepped and committed alone, after the agent messages queued before it, and
//! answered once durable. A refusal changes nothing; a failed commit undoes the request whole.

use tracing::{info, warn};
use vigil_core::{Answer, AuditSubject, Ignored, Input};

use super::commit::Urgency;
use super::{Engine, Event};
use crate::error::ControlError;
use crate::state::Effect;
use crate::store::StoreError;

impl Engine {
    /// An operator's request: step it, commit it alone, answer once it is durable.
    pub(super) async fn request(&mut self, request: Event) {
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
            Event::ConfirmRecovery { actor, reply } => {
                let input = Input::ConfirmRecovery { by: actor.clone() };
                let answer = self.apply_request(input).await.and_then(|_| {
                    self.state.recovery.clone().ok_or_else(|| {
                        ControlError::InvalidArgument("the recovery hold is gone".into())
                    })
                });
                self.audit(AuditSubject::Cluster, &actor, "recovery confirm", &answer)
                    .await;
                reply.send(answer).ok();
            }
            Event::ForgetNode { node, actor, reply } => {
                let input = Input::ForgetNode {
                    node: node.clone(),
                    by: actor.clone(),
                };
                let answer = self
                    .apply_request(input)
                    .await
                    .and_then(|_| self.node(&node));
                self.audit(AuditSubject::Node(node), &actor, "node forget", &answer)
                    .await;
                reply.send(answer).ok();
            }
            Event::ResetBreaker { actor, reply } => {
                let input = Input::ResetBreaker { by: actor.clone() };
                let answer = self
                    .apply_request(input)
                    .await
                    .map(|_| self.state.breaker.clone());
                self.audit(AuditSubject::Cluster, &actor, "breaker reset", &answer)
                    .await;
                reply.send(answer).ok();
            }
            // Agent messages and the Slurm adapter's records never reach here (`turn` batches
            // them).
            Event::Register { .. }
            | Event::Heartbeat { .. }
            | Event::AgentEvent { .. }
            | Event::Disconnected { .. }
            | Event::Flag { .. }
            | Event::Slurm { .. }
            | Event::SlurmJobs { .. }
            | Event::SlurmRequeued { .. } => {}
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
        // has nothing else pending but history waiting for a commit (`commit`): that history
        // goes out with this request's writes, and is lost with them if the store fails.
        if let Err(e) = self
            .commit_effects_with(&effects, Urgency::Everything)
            .await
        {
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
        if let Err(e) = self.commit_and_act_with(effects, Urgency::Everything).await {
            warn!(subject = %shown, error = %e, "could not store the audit record yet");
        }
        // Operator calls are rare: make the record visible to `clusterctl events` at once.
        self.publish();
    }
}

/// The refusal among a step's effects, as the caller's error.
pub(super) fn refusal(effect: &Effect) -> Option<ControlError> {
    match effect {
        Effect::Refused(e) => Some(ControlError::State(e.clone())),
        Effect::Ignored {
            reason,
            why: Ignored::StaleSession,
        } => Some(ControlError::InvalidArgument(reason.clone())),
        _ => None,
    }
}
