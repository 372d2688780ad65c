//! The remediation ladder on the cluster (see `remediation` for the policy): a rule's match
//! fires a step, the step waits for the node to drain, goes to the agent and is re-sent until
//! answered or out of budget, and its result leads to burn-in or to needs-repair.

use std::sync::Arc;

use vigil_proto::v1;

use crate::commands::Sent;
use crate::kinds::CordonRule;
use crate::node::{Availability, Node, NodeEvent, NodeRecord};
use crate::remediation::{
    Fired, MAX_EVENT_OUTPUT, NEEDS_REPAIR, NeedsRepair, Pending, Rule, Step, bounded,
};
use crate::state::{ClusterState, Effect, Now, StateError, record};

/// How a step the agent was asked to run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Failed,
    NoAnswer,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::NoAnswer => "no_answer",
        }
    }
}

impl ClusterState {
    /// The XIDs among `effects` that a rule matches: remember them, and fire the steps they call
    /// for.
    pub fn remediation_react(&mut self, effects: &[Effect], now: Now) -> Vec<Effect> {
        let matched: Vec<(String, u32, Rule)> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Xid { node, gpu, xid, .. } => self
                    .remediation
                    .rule_for(*xid)
                    .map(|r| (node.clone(), *gpu, r.clone())),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for (node, gpu, rule) in matched {
            out.extend(self.remediation_matched(&node, &rule, gpu, now));
        }
        out
    }

    fn remediation_matched(&mut self, name: &str, rule: &Rule, gpu: u32, now: Now) -> Vec<Effect> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Vec::new();
        };
        let r = Arc::make_mut(&mut node.record);
        let ladder = r.remediation.get_or_insert_with(Box::default);
        let Fired::Step {
            step,
            number,
            of,
            count,
        } = ladder.matched(rule, gpu, now)
        else {
            return vec![Effect::Persist(r.clone())];
        };
        let why = format!("after {} (step {number} of {of})", rule.describe(count));
        if step == Step::NeedsRepair {
            return self.enter_needs_repair(
                name,
                rule.xid,
                gpu,
                &format!("XID {} on GPU {gpu} {why}", rule.xid),
                now,
            );
        }
        let what = match step {
            Step::GpuReset => format!("GPU reset of GPU {gpu} on {name}"),
            _ => format!("{} of {name}", step.as_str()),
        };
        let reason = format!("{what} {why}");
        ladder.last_id = ladder.last_id.saturating_add(1);
        ladder.take(rule.xid, step, gpu, "pending", now);
        ladder.pending = Some(Pending {
            id: ladder.last_id,
            step,
            gpu,
            xid: rule.xid,
            reason: reason.clone(),
            requested_at_ms: now.wall_ms,
            sent_at_ms: None,
            first_sent: None,
            sent: None,
            issued: false,
        });
        let mut effects = vec![
            Effect::Persist(r.clone()),
            record(
                node,
                event(
                    format!("{reason}: waiting for the node to drain"),
                    Some(gpu),
                    now,
                ),
            ),
        ];
        // A burn-in in flight (after the previous step) must not make the node schedulable
        // while this step waits: the step's cordon replaces the burn-in's.
        let burning_in = node.record.burn_in.is_some();
        if burning_in {
            Arc::make_mut(&mut node.record).burn_in = None;
        }
        if node.record.cordon.is_none() || burning_in {
            effects.extend(self.auto_cordon(
                name,
                format!("remediation: {reason}"),
                CordonRule::Remediation,
                now,
            ));
        }
        let Some(node) = self.nodes.get_mut(name) else {
            return effects;
        };
        if node.record.cordon.is_none() {
            // The breaker held the cordon: a node that may take work is never remediated.
            let r = Arc::make_mut(&mut node.record);
            if let Some(ladder) = r.remediation.as_mut() {
                ladder.pending = None;
                ladder.outcome("held");
            }
            effects.push(Effect::Persist(r.clone()));
            let line = format!("{reason}: not taken, the cordon breaker holds the node's cordon");
            effects.push(record(node, event(line, Some(gpu), now)));
        }
        effects
    }

    /// Send each pending step whose node holds no job and runs no worker (re-sent with backoff
    /// until answered; the agent runs a step id once).
    pub fn remediation_commands(&mut self, now: Now) -> Vec<Effect> {
        let mut effects = Vec::new();
        let jobs = &self.jobs;
        let held = |name: &str| {
            jobs.values().any(|j| {
                j.phase.holds_nodes()
                    && (j.placement.iter().any(|n| n == name) || j.spares.iter().any(|n| n == name))
            })
        };
        for (name, node) in self.nodes.iter_mut() {
            let Some(p) = pending(&node.record) else {
                continue;
            };
            let Some(session) = node
                .session
                .filter(|_| node.availability == Availability::Ready)
            else {
                continue;
            };
            if p.issued
                || !node.workers.is_empty()
                || held(name)
                || !Sent::due(p.sent, session, now.mono)
            {
                continue;
            }
            let r = Arc::make_mut(&mut node.record);
            let Some(p) = pending_mut(r) else {
                continue;
            };
            p.sent = Some(Sent::next(p.sent, session, now.mono));
            let Some(action) = p.step.action() else {
                continue;
            };
            let kind = v1::command::Kind::Remediate(v1::Remediate {
                step_id: p.id,
                action: action as i32,
                gpu_index: p.gpu,
                reason: p.reason.clone(),
            });
            if p.sent_at_ms.is_none() {
                p.sent_at_ms = Some(now.wall_ms);
                p.first_sent = Some(now.mono);
                let line = format!("{}: the node is drained; sent to its agent", p.reason);
                let gpu = p.gpu;
                effects.push(Effect::Persist(r.clone()));
                effects.push(record(node, event(line, Some(gpu), now)));
            }
            effects.push(Effect::Command {
                node: name.clone(),
                kind,
            });
        }
        effects
    }

    /// Fail the steps whose agent has not answered within `remediation.answer_timeout`.
    pub fn remediation_tick(&mut self, now: Now) -> Vec<Effect> {
        let budget = self.remediation.answer_timeout;
        let mut expired = Vec::new();
        for (name, node) in self.nodes.iter_mut() {
            let Some(p) = pending(&node.record) else {
                continue;
            };
            match (p.sent_at_ms, p.first_sent) {
                (Some(_), Some(first)) if now.mono.saturating_duration_since(first) > budget => {
                    expired.push((name.clone(), p.id, p.issued));
                }
                // Loaded from the store: time it from now.
                (Some(_), None) => {
                    let r = Arc::make_mut(&mut node.record);
                    if let Some(p) = pending_mut(r) {
                        p.first_sent = Some(now.mono);
                    }
                }
                _ => {}
            }
        }
        let mut effects = Vec::new();
        for (name, id, issued) in expired {
            let output = if issued {
                format!(
                    "the reboot was issued but the node did not re-register within remediation.answer_timeout ({})",
                    humantime::format_duration(budget)
                )
            } else {
                format!(
                    "no answer within remediation.answer_timeout ({}): the agent may be too old to know the command, or stuck",
                    humantime::format_duration(budget)
                )
            };
            effects.extend(self.finish_step(&name, id, Outcome::NoAnswer, &output, "", now));
        }
        effects
    }

    /// The agent's answer to a step (a stale or repeated one changes nothing). A reboot's ok
    /// only says it was issued: the step ends when the node re-registers.
    pub fn remediation_result(
        &mut self,
        name: &str,
        result: &v1::RemediationResult,
        now: Now,
    ) -> Vec<Effect> {
        if result.ok
            && let Some(node) = self.nodes.get_mut(name)
            && let Some(p) = pending(&node.record)
            && p.id == result.step_id
            && p.step == Step::Reboot
        {
            if p.issued {
                return Vec::new();
            }
            let r = Arc::make_mut(&mut node.record);
            let Some(p) = pending_mut(r) else {
                return Vec::new();
            };
            p.issued = true;
            // The node has `answer_timeout` from now to come back.
            p.first_sent = Some(now.mono);
            let line = format!(
                "{}: {}; waiting for the node to re-register",
                p.reason,
                bounded(result.output.trim(), MAX_EVENT_OUTPUT)
            );
            let gpu = p.gpu;
            let persist = Effect::Persist(r.clone());
            return vec![persist, record(node, event(line, Some(gpu), now))];
        }
        let outcome = if result.ok {
            Outcome::Ok
        } else {
            Outcome::Failed
        };
        self.finish_step(
            name,
            result.step_id,
            outcome,
            &result.output,
            &result.command,
            now,
        )
    }

    /// A node registered: if a reboot was sent to it, it rebooted (its answer may have died with
    /// the connection), and the reboot must never be sent again.
    pub fn remediation_registered(&mut self, name: &str, now: Now) -> Vec<Effect> {
        let id = self
            .nodes
            .get(name)
            .and_then(|n| pending(&n.record))
            .filter(|p| p.step == Step::Reboot && p.sent_at_ms.is_some())
            .map(|p| p.id);
        match id {
            Some(id) => self.finish_step(
                name,
                id,
                Outcome::Ok,
                "the node re-registered after the reboot was issued",
                "",
                now,
            ),
            None => Vec::new(),
        }
    }

    fn finish_step(
        &mut self,
        name: &str,
        id: u64,
        outcome: Outcome,
        output: &str,
        command: &str,
        now: Now,
    ) -> Vec<Effect> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Vec::new();
        };
        let current = pending(&node.record).is_some_and(|p| p.id == id);
        if !current {
            return Vec::new();
        }
        let r = Arc::make_mut(&mut node.record);
        let Some(ladder) = r.remediation.as_mut() else {
            return Vec::new();
        };
        let Some(p) = ladder.pending.take() else {
            return Vec::new();
        };
        ladder.outcome(outcome.as_str());
        let ran = if command.is_empty() {
            String::new()
        } else {
            format!(" ({command})")
        };
        let output = bounded(output.trim(), MAX_EVENT_OUTPUT);
        let message = format!("{}: {}{ran}: {output}", p.reason, outcome.as_str());
        let mut effects = vec![
            Effect::Persist(r.clone()),
            record(node, event(message.clone(), Some(p.gpu), now)),
            Effect::Remediation {
                node: name.to_owned(),
                step: p.step,
                outcome: outcome.as_str(),
                message,
            },
        ];
        if outcome == Outcome::Ok {
            // The step addressed the evidence; the burn-in decides whether the node is fit.
            node.health.clear_events();
            effects.extend(self.start_burn_in(name, "remediation", now));
            effects.extend(self.rejudge(name, now));
        } else {
            let evidence = format!("{} {}: {output}", p.reason, outcome.as_str());
            effects.extend(self.enter_needs_repair(name, p.xid, p.gpu, &evidence, now));
        }
        effects
    }

    /// The terminal state: cordon `name` (through the breaker) with the evidence and the steps
    /// tried, until an operator forces an uncordon.
    fn enter_needs_repair(
        &mut self,
        name: &str,
        xid: u32,
        gpu: u32,
        evidence: &str,
        now: Now,
    ) -> Vec<Effect> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Vec::new();
        };
        let r = Arc::make_mut(&mut node.record);
        let ladder = r.remediation.get_or_insert_with(Box::default);
        let tried = ladder.tried();
        let evidence = format!("{evidence}; steps tried: {tried}");
        ladder.take(xid, Step::NeedsRepair, gpu, "cordoned", now);
        ladder.pending = None;
        ladder.needs_repair = Some(NeedsRepair {
            since_unix_ms: now.wall_ms,
            evidence: evidence.clone(),
        });
        // A burn-in in flight must not lift it.
        r.burn_in = None;
        let reason = format!(
            "{NEEDS_REPAIR}: {evidence} (only an operator clears it: clusterctl uncordon {name} --force)"
        );
        let mut effects = vec![record(
            node,
            event(format!("{NEEDS_REPAIR}: {evidence}"), Some(gpu), now),
        )];
        effects.extend(self.auto_cordon(name, reason, CordonRule::Remediation, now));
        let Some(node) = self.nodes.get_mut(name) else {
            return effects;
        };
        let cordoned = node
            .record
            .cordon
            .as_ref()
            .is_some_and(|c| c.reason.starts_with(NEEDS_REPAIR));
        let outcome = if cordoned { "cordoned" } else { "held" };
        let r = Arc::make_mut(&mut node.record);
        if let Some(ladder) = r.remediation.as_mut() {
            ladder.outcome(outcome);
        }
        effects.push(Effect::Persist(r.clone()));
        effects.push(Effect::Remediation {
            node: name.to_owned(),
            step: Step::NeedsRepair,
            outcome,
            message: format!("{name} {NEEDS_REPAIR}: {evidence}"),
        });
        effects
    }
}

impl ClusterState {
    /// For `uncordon`: a node that needs repair is refused unless forced, whatever its
    /// diagnostics.
    pub(crate) fn refuse_needs_repair(&self, name: &str, force: bool) -> Result<(), StateError> {
        let needs_repair = self
            .nodes
            .get(name)
            .and_then(|n| n.record.remediation.as_ref())
            .and_then(|l| l.needs_repair.as_ref());
        match needs_repair {
            Some(n) if !force => Err(StateError::NeedsRepair {
                node: name.to_owned(),
                evidence: n.evidence.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// A forced uncordon of a node that needs repair: the operator says the hardware is repaired,
/// so the ladder starts afresh. Whether it needed repair.
pub(crate) fn forget_needs_repair(node: &mut Node) -> bool {
    let needed = node
        .record
        .remediation
        .as_ref()
        .is_some_and(|l| l.needs_repair.is_some());
    if needed {
        Arc::make_mut(&mut node.record).remediation = None;
    }
    needed
}

fn pending(record: &NodeRecord) -> Option<&Pending> {
    record.remediation.as_ref().and_then(|l| l.pending.as_ref())
}

fn pending_mut(record: &mut NodeRecord) -> Option<&mut Pending> {
    record.remediation.as_mut().and_then(|l| l.pending.as_mut())
}

fn event(message: String, gpu_index: Option<u32>, now: Now) -> NodeEvent {
    NodeEvent {
        at_unix_ms: now.wall_ms,
        kind: crate::remediation::EVENT_KIND.into(),
        message,
        gpu_index,
    }
}
