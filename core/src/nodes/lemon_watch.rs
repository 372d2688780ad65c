//! The cluster's side of the lemon ledger, pure: which node changes are
//! failures to charge (a node judged Unhealthy, with its faulty GPUs; a node
//! Lost), cordoning a node that is or holds a lemon (also when it rejoins),
//! and an operator's clear.

use crate::health::Condition;
use crate::lemons::{self, Failure, LemonRecord};
use crate::node::Availability;
use crate::state::{ClusterState, Effect, Now, StateError};

impl ClusterState {
    /// Charge the failures among `effects` and cordon the lemons they make;
    /// a node that (re)joins holding a lemon is cordoned too.
    pub fn lemon_react(&mut self, effects: &[Effect], now: Now) -> Vec<Effect> {
        let mut out = Vec::new();
        for e in effects {
            let (node, kind, detail) = match e {
                Effect::Condition {
                    node,
                    to: Condition::Unhealthy,
                    reasons,
                    ..
                } => (
                    node,
                    "unhealthy",
                    reasons.first().cloned().unwrap_or_default(),
                ),
                // Only a node seen alive since this coordinator started: one
                // that stays down across coordinator restarts is charged once.
                Effect::Availability {
                    node,
                    to: Availability::Lost,
                    ..
                } if self.nodes.get(node).is_some_and(|n| n.heard_since_start) => {
                    (node, "node_lost", "no heartbeat past lost_after".to_owned())
                }
                Effect::Cordoned {
                    node,
                    rule: crate::kinds::CordonRule::Triage,
                    cordon,
                    ..
                } => (node, "triage_failed", cordon.reason.clone()),
                Effect::Availability {
                    node,
                    to: Availability::Ready,
                    ..
                } => {
                    out.extend(self.enforce_blocklist(node, now));
                    continue;
                }
                _ => continue,
            };
            let Some(n) = self.nodes.get(node) else {
                continue;
            };
            let gpus = if kind == "unhealthy" {
                n.record
                    .gpus
                    .iter()
                    .filter(|g| n.health.gpu_worst(g.index) == Condition::Unhealthy)
                    .map(|g| (g.index, lemons::gpu_identity(&g.serial, &g.uuid)))
                    .collect()
            } else {
                Vec::new()
            };
            let failure = Failure {
                node,
                kind,
                detail: &detail,
                gpus,
            };
            let (changed, newly) = self.lemons.charge(&failure, now.wall_ms);
            out.extend(
                changed
                    .into_iter()
                    .map(|r| Effect::PersistLemon(Box::new(r))),
            );
            if !newly.is_empty() {
                out.extend(self.enforce_blocklist(node, now));
            }
        }
        out
    }

    /// Cordon `node` with reason `repeat-offender` if it is or holds a lemon.
    fn enforce_blocklist(&mut self, node: &str, now: Now) -> Vec<Effect> {
        let Some(why) = self
            .nodes
            .get(node)
            .and_then(|n| self.lemons.blocks(&n.record))
        else {
            return Vec::new();
        };
        let already = self
            .nodes
            .get(node)
            .and_then(|n| n.record.cordon.as_ref())
            .is_some_and(|c| c.reason == why);
        if already {
            return Vec::new();
        }
        self.auto_cordon(node, why, crate::kinds::CordonRule::RepeatOffender, now)
    }

    /// An operator clears `subject`: a node name (its host and every GPU it
    /// holds), `host/NAME`, `gpu/SERIAL` or a bare serial / UUID. The node
    /// stays cordoned; `uncordon` is then allowed.
    pub fn clear_lemon(
        &mut self,
        subject: &str,
        now: Now,
    ) -> Result<(Vec<LemonRecord>, Vec<Effect>), StateError> {
        let cleared = match self.nodes.get(subject) {
            Some(n) => self.lemons.clear_node(&n.record, now.wall_ms),
            None => self.lemons.clear(subject, now.wall_ms),
        };
        if cleared.is_empty() && !self.nodes.contains_key(subject) {
            return Err(StateError::UnknownLemon(subject.to_owned()));
        }
        let effects = cleared
            .iter()
            .map(|r| Effect::PersistLemon(Box::new(r.clone())))
            .collect();
        Ok((cleared, effects))
    }
}
