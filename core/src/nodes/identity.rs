//! One node name, one host, pure: the coordinator binds a node name to the machine-id of the
//! first host that registers it, refuses the name to any other host while the bound one lives
//! (a cloned image, a node certificate copied to a second host), and rebinds it to a host that
//! really replaced the old one (the old one is Lost), which is then burned in.
//!
//! Without this, two hosts with one name took the name from each other at every reconnect:
//! the node's inventory flapped between their GPUs, and the "missing" GPUs cordoned it.

use std::sync::Arc;
use std::time::Duration;

use crate::liveness;
use crate::node::{Availability, Node, NodeEvent};
use crate::state::{ClusterState, Effect, Now, Registration, StateError, record};
use crate::time::Instant;

/// One `identity-conflict` event per conflicting machine-id per this long: a refused agent
/// retries every 30 s, and the node's history must not fill with its retries.
pub const CONFLICT_EVENT_EVERY: Duration = Duration::from_secs(600);
/// How long a refused agent waits before it registers again (sent in `Rejected`): a host with
/// a duplicate name will not become right by retrying fast.
pub const CONFLICT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// At most this many conflicting machine-ids are remembered per node for the rate limit.
const MAX_REMEMBERED: usize = 16;

/// Who the registering host is, as its agent reports it. Empty fields: an agent that predates
/// host identity; such a registration neither binds the name nor is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostIdentity {
    /// `/etc/machine-id` (stable across reboots and reinstalls of the agent).
    pub machine_id: String,
    /// `/proc/sys/kernel/random/boot_id` (new at every boot).
    pub boot_id: String,
}

/// What a registration's host identity means for its node's name.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The name is this host's (bound to it, not bound yet, or the agent sends no identity).
    Accepted,
    /// The bound host is Lost and another took the name: it is rebound, from `old`.
    Replaced { old: String },
    /// The bound host lives; nothing about the node changes. The effects say so.
    Refused(Vec<Effect>),
}

/// Whether a host with machine-id `claimant` is the one the name is bound to (`bound`): an
/// empty id on either side (an agent that predates them, a name not bound yet) binds nothing
/// and is refused nothing.
pub(crate) fn same_host(bound: &str, claimant: &str) -> bool {
    claimant.is_empty() || bound.is_empty() || claimant == bound
}

impl ClusterState {
    /// Judge `reg`'s claim to its node's name (before anything about the node changes).
    pub(crate) fn claim(&mut self, reg: &Registration, now: Now) -> Claim {
        let Some(node) = self.nodes.get_mut(&reg.node) else {
            return Claim::Accepted;
        };
        let claimant = &reg.identity.machine_id;
        let bound = &node.record.machine_id;
        if same_host(bound, claimant) {
            return Claim::Accepted;
        }
        let availability = liveness::availability(
            node.silent_since,
            node.session.is_some(),
            now.mono,
            &self.liveness,
        );
        if availability == Availability::Lost {
            return Claim::Replaced { old: bound.clone() };
        }
        let message = conflict_message(node, reg, now, self.liveness.lost_after);
        let mut effects = Vec::new();
        if conflict_event_due(node, claimant, now.mono) {
            let event = NodeEvent {
                at_unix_ms: now.wall_ms,
                kind: "identity-conflict".into(),
                message: message.clone(),
                gpu_index: None,
            };
            effects.push(record(node, event));
        }
        effects.push(Effect::IdentityConflict {
            node: reg.node.clone(),
            session: reg.session,
            message,
        });
        Claim::Refused(effects)
    }

    /// An operator drops `name`'s binding: the next host to register it (any host) binds it.
    pub fn forget_identity(
        &mut self,
        name: &str,
        by: &str,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownNode(name.to_owned()))?;
        if node.record.machine_id.is_empty() {
            return Ok(Vec::new());
        }
        let r = Arc::make_mut(&mut node.record);
        let old = std::mem::take(&mut r.machine_id);
        r.boot_id.clear();
        node.identity_conflicts.clear();
        let event = NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: "identity-forgotten".into(),
            message: format!(
                "{by} forgot this name's host (machine-id {}): the next host to register it \
                 binds it",
                short(&old)
            ),
            gpu_index: None,
        };
        let persist = Effect::Persist((*node.record).clone());
        Ok(vec![persist, record(node, event)])
    }
}

/// The `identity-changed` event of a node rebound from `old` to the host of `reg`.
pub(crate) fn changed_event(old: &str, reg: &Registration, now: Now) -> NodeEvent {
    NodeEvent {
        at_unix_ms: now.wall_ms,
        kind: "identity-changed".into(),
        message: format!(
            "host replaced: machine-id {} -> {} (host {} at {}); the old host was Lost, so the \
             name is rebound and the new host is burned in before it takes work",
            short(old),
            short(&reg.identity.machine_id),
            reg.hostname,
            reg.address
        ),
        gpu_index: None,
    }
}

/// Whether a conflict with `claimant` goes into the node's history now (and note that it did).
fn conflict_event_due(node: &mut Node, claimant: &str, now: Instant) -> bool {
    let seen = &mut node.identity_conflicts;
    let recent = |at: &Instant| now.saturating_duration_since(*at) < CONFLICT_EVENT_EVERY;
    if seen.get(claimant).is_some_and(recent) {
        return false;
    }
    seen.retain(|_, at| recent(at));
    if seen.len() >= MAX_REMEMBERED {
        return false;
    }
    seen.insert(claimant.to_owned(), now);
    true
}

fn conflict_message(node: &Node, reg: &Registration, now: Now, lost_after: Duration) -> String {
    let r = &node.record;
    let holder = format!(
        "{} (machine-id {}, host {})",
        r.address,
        short(&r.machine_id),
        r.hostname
    );
    let claimant = format!(
        "this host is {} (machine-id {})",
        reg.hostname,
        short(&reg.identity.machine_id)
    );
    if node.session.is_some() {
        format!(
            "node \"{}\" is already connected from {holder}; {claimant}: give it its own node \
             name",
            r.name
        )
    } else {
        let silent = now.mono.saturating_duration_since(node.silent_since);
        format!(
            "node \"{}\" belongs to the host at {holder}, heard {}s ago; {claimant}: give it its \
             own node name (if that host was replaced, the name is rebound once it has been \
             silent for {}s, or at once after `clusterctl node forget {}`)",
            r.name,
            silent.as_secs(),
            lost_after.as_secs(),
            r.name
        )
    }
}

/// The first 8 characters of a machine-id: enough to tell hosts apart in a message.
pub fn short(id: &str) -> String {
    match id.char_indices().nth(8) {
        Some((end, _)) => format!("{}…", &id[..end]),
        None => id.to_owned(),
    }
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
