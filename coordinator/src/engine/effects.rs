//! Carrying out the core's effects: commands to agents, log lines, metrics, the event bus.
//! Called only after the turn that produced them committed.

use tracing::{debug, error, info, warn};
use vigil_proto::v1;

use super::Engine;
use crate::health::Condition;
use crate::node::{Availability, CordonSource};
use crate::state::Effect;
use vigil_core::Ignored;
use vigil_core::input::assigned::Unassigned;

impl Engine {
    pub(super) fn act(&mut self, effect: Effect) {
        match effect {
            // A lease renewal is sent where the contact is stepped (`Engine::contact`).
            Effect::Persist(_)
            | Effect::Refused(_)
            | Effect::Answer(_)
            | Effect::LeaseRenewal { .. } => {}
            Effect::Ignored {
                reason,
                why: Ignored::StaleSession,
            } => {
                self.metrics.stale_messages.inc();
                debug!(%reason, "ignored agent message");
            }
            Effect::Ignored {
                reason,
                why: Ignored::Unassigned(why),
            } => {
                self.metrics.input.ignored(why.as_str());
                if why == Unassigned::StaleAttempt {
                    debug!(reason = why.as_str(), "ignored a report: {reason}");
                } else {
                    warn!(
                        reason = why.as_str(),
                        "ignored an agent report about work not assigned to its node: {reason}"
                    );
                }
            }
            Effect::Ignored {
                reason,
                why: Ignored::GpuTelemetryWithoutSamples,
            } => {
                warn!("kept the node's GPU state: {reason}");
            }
            Effect::IdentityConflict {
                node,
                session,
                message,
            } => {
                self.metrics.security.identity_conflicts.inc();
                self.metrics.rejected_registrations.inc();
                warn!(node = %node, session, "registration refused: {message}");
            }
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
                self.metrics
                    .count_cordon(cordon.source.as_str(), rule.as_str());
                let latency_ms = observed_at_ms.map(|t| self.clock.now().wall_ms.saturating_sub(t));
                if let Some(ms) = latency_ms {
                    self.metrics.fault_to_cordon.observe(ms as f64 / 1000.0);
                }
                warn!(node = %node, reason = %cordon.reason, source = cordon.source.as_str(), rule = rule.as_str(), fault_to_cordon_ms = ?latency_ms, "cordoned node {node}: {}", cordon.reason);
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
                    .count_restart(kind.as_str(), lost_ms, fault_to_relaunch_ms);
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
            Effect::PersistRecovery(hold) => {
                self.dirty = true;
                let held_nodes = self
                    .state
                    .nodes
                    .values()
                    .filter(|n| {
                        n.record
                            .cordon
                            .as_ref()
                            .is_some_and(|c| c.source == CordonSource::Recovery)
                    })
                    .count();
                let message = match &hold.confirmed_by {
                    Some(by) => {
                        info!(
                            confirmed_by = %by,
                            since_unix_ms = hold.since_unix_ms,
                            nodes_held = held_nodes,
                            "recovery hold confirmed by {by}: jobs may be scheduled again; {held_nodes} node(s) stay cordoned until each is uncordoned"
                        );
                        format!("recovery hold confirmed by {by}: jobs may be scheduled again")
                    }
                    None => {
                        error!(
                            damage = %hold.damage,
                            lost = hold.lost.len(),
                            lost_nodes = ?hold.lost_nodes,
                            lost_jobs = ?hold.lost_jobs,
                            damaged_copy = %hold.damaged_copy,
                            nodes_held = held_nodes,
                            "started from a recovered state store: {} record(s) lost; {held_nodes} node(s) cordoned for review and no job starts until an operator runs clusterctl recovery confirm",
                            hold.lost.len()
                        );
                        format!(
                            "state store recovered, {} record(s) lost: nodes cordoned for review, jobs held until clusterctl recovery confirm",
                            hold.lost.len()
                        )
                    }
                };
                self.bus
                    .send(v1::ClusterEvent {
                        at_unix_ms: hold.confirmed_at_unix_ms.unwrap_or(hold.since_unix_ms),
                        kind: vigil_core::recovery::EVENT_KIND.to_owned(),
                        node: String::new(),
                        job: String::new(),
                        message,
                    })
                    .ok();
            }
            Effect::PersistBreaker(_) => self.dirty = true,
            Effect::PersistEvidence {
                job,
                attempt,
                evidence,
            } => {
                debug!(job = %job, attempt, node = %evidence.node, bytes = evidence.approx_bytes(), "stored a node's hang evidence");
            }
            Effect::DropEvidence {
                job,
                attempt,
                nodes,
            } => {
                info!(job = %job, attempt, nodes = nodes.len(), "deleted hang evidence past evidence.keep_attempts");
            }
            Effect::PersistSlurmJobs(ledger) => {
                self.slurm_jobs = std::sync::Arc::new(*ledger);
                self.dirty = true;
            }
            Effect::CordonHeld {
                node,
                rule,
                evidence,
            } => {
                self.metrics.cordon_breaker.held.inc();
                warn!(node = %node, rule = rule.as_str(), evidence = %evidence, "cordon of {node} held: the cordon breaker is open");
            }
            Effect::BreakerLog { message, warn } => {
                if warn {
                    warn!("{message}");
                } else {
                    info!("{message}");
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
            Effect::Remediation {
                node,
                step,
                outcome,
                message,
            } => {
                self.metrics.remediation.count(step.as_str(), outcome);
                if matches!(outcome, "ok") {
                    info!(node = %node, action = step.as_str(), outcome, "{message}");
                } else {
                    warn!(node = %node, action = step.as_str(), outcome, "{message}");
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

    /// Hand a command to the node's live session. Returns the session and the
    /// command's id, or `None` when the node is not connected (or its queue is full).
    ///
    /// Nothing goes out once leadership has lapsed (HA): not even before the
    /// keepalive task notices, since the deadline is checked here, per message.
    pub(super) fn try_command(
        &mut self,
        node: &str,
        kind: v1::command::Kind,
    ) -> Option<(u64, u64)> {
        let id = self.pending.next_id();
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
    pub(super) fn send_command(&mut self, node: &str, kind: v1::command::Kind) {
        match self.try_command(node, kind) {
            Some((_, id)) => debug!(node = %node, command_id = id, "command sent"),
            None => {
                debug!(node = %node, "command not delivered now: node not connected (sent again once due)")
            }
        }
    }
}
