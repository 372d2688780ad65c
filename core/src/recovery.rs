//! The recovery hold, pure: what the cluster does after `vigil-coordinator --recover` started it
//! from what was still valid in a damaged state store.
//!
//! Records were lost, so what the coordinator believes about nodes and jobs may be wrong (a
//! cordon that is gone, a job it no longer knows). Until an operator has looked:
//! - every known node is cordoned (source `recovery`), and so is a node that registers for the
//!   first time while the hold is unconfirmed (its record may be one of those lost); a node named
//!   among the lost records is cordoned whenever it comes back, with an event saying so. A node
//!   already cordoned keeps its cordon (that one already needs an operator, or a check, to lift);
//! - the scheduler starts no job: Pending and restartable jobs wait, their reason saying why
//!   ([`JOBS_HELD`]). Running jobs are left alone: the hold kills nothing.
//!
//! An operator confirms (`clusterctl recovery confirm`, [`crate::Input::ConfirmRecovery`]): jobs may
//! be scheduled again. The node cordons stay until each node is uncordoned (an operator looked at
//! it); a recovery cordon is lifted like an operator's. The hold is kept (persisted, confirmed)
//! so that `clusterctl status` still says the cluster was recovered, and by whom it was confirmed.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::kinds::CordonRule;
use crate::node::{Availability, CordonSource, NodeEvent};
use crate::state::{ClusterState, Effect, Now, StateError, record};

/// Why a job that could start does not while the hold is unconfirmed (its `reason`).
pub const JOBS_HELD: &str = "the coordinator was recovered from a damaged store: an operator must \
                             confirm (clusterctl recovery confirm)";

/// The kind of the node events the hold records.
pub const EVENT_KIND: &str = "recovery";

/// The hold, as persisted (a cluster-wide record) and shown by `clusterctl recovery`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryHold {
    /// When the recovered coordinator began it.
    pub since_unix_ms: u64,
    /// Why the store was damaged, as the refusal to start said it.
    pub damage: String,
    /// One line per record that could not be kept.
    pub lost: Vec<String>,
    /// Nodes whose records were lost: each is cordoned when its agent registers again.
    #[serde(default)]
    pub lost_nodes: Vec<String>,
    /// Jobs whose records were lost (the coordinator knows nothing else of them).
    #[serde(default)]
    pub lost_jobs: Vec<String>,
    /// Where the damaged files were kept, for a post-mortem.
    #[serde(default)]
    pub damaged_copy: String,
    /// Who confirmed it (`alice (admin)`); `None` while jobs are held.
    #[serde(default)]
    pub confirmed_by: Option<String>,
    #[serde(default)]
    pub confirmed_at_unix_ms: Option<u64>,
}

impl RecoveryHold {
    /// Whether an operator has confirmed it.
    pub fn confirmed(&self) -> bool {
        self.confirmed_by.is_some()
    }

    /// Whether the scheduler must start no job (unconfirmed).
    pub fn holds_jobs(&self) -> bool {
        !self.confirmed()
    }
}

/// What a `--recover` open of the store lost, as the core is told it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    pub damage: String,
    pub lost: Vec<String>,
    pub lost_nodes: Vec<String>,
    pub lost_jobs: Vec<String>,
    pub damaged_copy: String,
}

/// `2026-12-05T09:20:08Z`.
pub fn format_time(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// The reason of a recovery cordon on `node`: what the operator does next.
pub fn cordon_reason(node: &str, since_unix_ms: u64) -> String {
    format!(
        "state store recovered at {}: review this node (clusterctl node {node}), then \
         clusterctl uncordon {node}",
        format_time(since_unix_ms)
    )
}

impl ClusterState {
    /// Whether the scheduler must start no job now.
    pub fn jobs_held(&self) -> bool {
        self.recovery.as_ref().is_some_and(RecoveryHold::holds_jobs)
    }

    /// Begin the hold after a `--recover` start: store it, cordon every known node not already
    /// cordoned, and mark the known nodes whose records were lost. A hold that was still
    /// unconfirmed is folded into the new one (its lost records are listed first): nothing an
    /// operator has not confirmed is forgotten.
    pub fn begin_recovery(&mut self, report: Recovered, now: Now) -> Vec<Effect> {
        let mut hold = RecoveryHold {
            since_unix_ms: now.wall_ms,
            damage: report.damage,
            lost: report.lost,
            lost_nodes: report.lost_nodes,
            lost_jobs: report.lost_jobs,
            damaged_copy: report.damaged_copy,
            confirmed_by: None,
            confirmed_at_unix_ms: None,
        };
        if let Some(old) = self.recovery.take().filter(RecoveryHold::holds_jobs) {
            hold.since_unix_ms = old.since_unix_ms;
            hold.damage = format!("{}; then: {}", old.damage, hold.damage);
            hold.lost = merged(old.lost, hold.lost);
            hold.lost_nodes = merged(old.lost_nodes, hold.lost_nodes);
            hold.lost_jobs = merged(old.lost_jobs, hold.lost_jobs);
        }
        let mut effects = vec![Effect::PersistRecovery(Box::new(hold.clone()))];
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            if hold.lost_nodes.contains(&name) {
                effects.extend(self.record_lost(&name, &hold, now));
            }
            effects.extend(self.recovery_cordon(&name, &hold, now));
        }
        self.recovery = Some(hold);
        effects
    }

    /// An operator confirms the hold: jobs may be scheduled again (the node cordons stay).
    pub fn confirm_recovery(&mut self, by: &str, now: Now) -> Result<Vec<Effect>, StateError> {
        let Some(hold) = self.recovery.as_mut() else {
            return Err(StateError::NoRecoveryHold(
                "this coordinator has not been recovered from a damaged store (it was not \
                 started with --recover on one); nothing is held"
                    .into(),
            ));
        };
        if let (Some(who), Some(at)) = (&hold.confirmed_by, hold.confirmed_at_unix_ms) {
            return Err(StateError::NoRecoveryHold(format!(
                "the recovery of {} was already confirmed by {who} at {}",
                format_time(hold.since_unix_ms),
                format_time(at)
            )));
        }
        hold.confirmed_by = Some(by.to_owned());
        hold.confirmed_at_unix_ms = Some(now.wall_ms);
        Ok(vec![Effect::PersistRecovery(Box::new(hold.clone()))])
    }

    /// Admission after a registration: a node that registers for the first time is cordoned
    /// while the hold is unconfirmed, and always when its record was among those lost.
    pub fn recovery_react(&mut self, effects: &[Effect], now: Now) -> Vec<Effect> {
        let Some(hold) = self.recovery.clone() else {
            return Vec::new();
        };
        let joined: Vec<String> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Availability {
                    node,
                    from: None,
                    to: Availability::Ready,
                    ..
                } => Some(node.clone()),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for name in joined {
            let lost = hold.lost_nodes.contains(&name);
            if lost {
                out.extend(self.record_lost(&name, &hold, now));
            }
            if lost || hold.holds_jobs() {
                out.extend(self.recovery_cordon(&name, &hold, now));
            }
        }
        out
    }

    /// Cordon `name` for review, unless it is cordoned already.
    fn recovery_cordon(&mut self, name: &str, hold: &RecoveryHold, now: Now) -> Vec<Effect> {
        if self.nodes.get(name).is_none_or(|n| n.cordoned()) {
            return Vec::new();
        }
        let reason = cordon_reason(name, hold.since_unix_ms);
        let mut effects = self
            .cordon(name, reason, CordonSource::Recovery, now)
            .unwrap_or_default();
        for e in &mut effects {
            if let Effect::Cordoned { rule, .. } = e {
                *rule = CordonRule::Recovery;
            }
        }
        effects
    }

    /// Say in `name`'s history that its record was lost.
    fn record_lost(&mut self, name: &str, hold: &RecoveryHold, now: Now) -> Vec<Effect> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Vec::new();
        };
        let event = NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: EVENT_KIND.into(),
            message: format!(
                "record lost in store recovery at {}: what was known of this node (its cordon, \
                 diagnostics, burn-in) is gone; it is known again from its registration",
                format_time(hold.since_unix_ms)
            ),
            gpu_index: None,
        };
        vec![record(node, event)]
    }
}

/// `old` then what `new` adds to it.
fn merged(mut old: Vec<String>, new: Vec<String>) -> Vec<String> {
    for line in new {
        if !old.contains(&line) {
            old.push(line);
        }
    }
    old
}

#[cfg(test)]
#[path = "recovery_tests.rs"]
mod tests;
