//! A registration, pure: the host's claim to the node name (`identity`), the GPU inventory
//! it brings (GPUs gone since the last one are lost; new GPUs in their place, or added, are an
//! `inventory-changed` event and a burn-in), then liveness, health and the node's workers.

use std::sync::Arc;

use super::transitions::{hear_from, judge};
use crate::fabric::{down_since_last_registration, up_ports};
use crate::health::NodeHealth;
use crate::identity::{self, Claim};
use crate::node::{Availability, GpuRecord, Node, NodeEvent, NodeRecord};
use crate::state::{ClusterState, Effect, Now, Registration, record};

impl ClusterState {
    pub fn register(&mut self, reg: Registration, now: Now) -> Vec<Effect> {
        let replaced = match self.claim(&reg, now) {
            Claim::Accepted => None,
            Claim::Replaced { old } => Some(old),
            Claim::Refused(effects) => return effects,
        };
        let mut effects = Vec::new();
        let is_new = !self.nodes.contains_key(&reg.node);
        let known = self.nodes.len() + usize::from(is_new);
        let node = self.nodes.entry(reg.node.clone()).or_insert_with(|| {
            let record = NodeRecord {
                name: reg.node.clone(),
                hostname: String::new(),
                address: String::new(),
                agent_version: String::new(),
                simulated: reg.simulated,
                gpus: Vec::new(),
                cordon: None,
                first_registered_unix_ms: now.wall_ms,
                last_registered_unix_ms: now.wall_ms,
                last_diagnostics: None,
                burn_in: None,
                remediation: None,
                machine_id: String::new(),
                boot_id: String::new(),
                fabric_ports: Vec::new(),
            };
            Node::from_record(record, now.mono, now.wall_ms)
        });
        if let Some(old) = &replaced {
            // Another host: the old one's GPUs and findings are not this one's.
            node.health = NodeHealth::default();
            let r = Arc::make_mut(&mut node.record);
            r.gpus.clear();
            r.fabric_ports.clear();
            effects.push(record(node, identity::changed_event(old, &reg, now)));
        }
        // GPUs registered before and absent now are as good as lost (a restarted agent must
        // not make a dead GPU vanish from the books), unless a new GPU took their place.
        let inventory = InventoryChange::between(&node.record.gpus, &reg.gpus);
        for gone in &inventory.lost {
            node.health.on_gpu_lost(gone.index, &gone.uuid, now.wall_ms);
        }
        // The same for fabric ports, when this registration read the fabric.
        if !reg.fabric.is_empty() {
            for message in down_since_last_registration(&node.record.fabric_ports, &reg.fabric) {
                node.health
                    .on_fabric_port_down_at_registration(message, now.wall_ms);
            }
        }
        let swapped = !is_new && replaced.is_none() && inventory.changed();
        if swapped {
            effects.push(record(node, inventory.event(now)));
        }
        let before = (*node.record).clone();
        let r = Arc::make_mut(&mut node.record);
        r.hostname = reg.hostname;
        r.address = reg.address;
        r.agent_version = reg.agent_version;
        r.simulated = reg.simulated;
        r.gpus = reg.gpus;
        if !reg.fabric.is_empty() {
            r.fabric_ports = up_ports(&reg.fabric);
        }
        if !reg.identity.machine_id.is_empty() {
            r.machine_id = reg.identity.machine_id;
            r.boot_id = reg.identity.boot_id;
        }
        r.last_registered_unix_ms = now.wall_ms;
        // A reconnect storm re-registers every node: write only what changed
        // (the time of the last registration alone is not worth a write).
        let changed = NodeRecord {
            last_registered_unix_ms: r.last_registered_unix_ms,
            ..before
        } != *r;
        if is_new || changed {
            effects.push(Effect::Persist(r.clone()));
        }
        if let Some(old) = node.session.filter(|s| *s != reg.session) {
            effects.push(Effect::CloseSession {
                node: reg.node.clone(),
                session: old,
            });
        }
        node.session = Some(reg.session);
        node.workers = Arc::new(reg.workers);
        node.last_samples = Arc::default();
        node.sample_base = crate::node::SampleBase::Missing;
        node.health.sample_findings.clear();
        node.health
            .fabric
            .register(&reg.fabric, now.mono_ms(), &self.health.fabric);
        node.health.counters.register();
        node.last_fabric = Arc::new(reg.fabric);
        let backend = if reg.simulated { "SIMULATED" } else { "NVML" };
        effects.push(record(
            node,
            NodeEvent {
                at_unix_ms: now.wall_ms,
                kind: "registered".into(),
                message: format!(
                    "agent {} registered from {} with {} GPUs ({backend})",
                    node.record.agent_version,
                    node.record.hostname,
                    node.record.gpus.len()
                ),
                gpu_index: None,
            },
        ));
        if is_new {
            node.availability = Availability::Ready;
            node.silent_since = now.mono;
            node.heard_since_start = true;
            effects.push(Effect::Availability {
                node: reg.node,
                from: None,
                to: Availability::Ready,
                why: "first registration",
            });
        } else {
            hear_from(node, now, "registered", &mut effects);
        }
        effects.extend(judge(node, &mut self.breaker, known, now, &self.health));
        let reported = node.workers.clone();
        let name = node.record.name.clone();
        if replaced.is_some() {
            effects.extend(self.start_burn_in(&name, "identity-changed", now));
        } else if swapped && !node.cordoned() {
            // A node already cordoned (an operator's repair, a lemon) stays so: its uncordon
            // decides, and may burn it in (`burn_in.on_uncordon`).
            effects.extend(self.start_burn_in(&name, "inventory-changed", now));
        }
        effects.extend(self.reconcile_node(&name, &reported, now));
        // An accepted registration ends a reboot the remediation ladder sent (a refused claim,
        // another host's, returned above: it says nothing about this node).
        effects.extend(self.remediation_registered(&name, now));
        effects
    }
}

/// How a node's GPU inventory changed between two registrations of the same host. GPUs are
/// matched by UUID, not index: when a GPU falls off the bus, NVML numbers the rest again.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct InventoryChange {
    /// Registered before, absent now, and no new GPU holds their index: a fault.
    pub lost: Vec<GpuRecord>,
    /// Registered before, absent now, with a new GPU at their index: swapped out.
    pub replaced: Vec<GpuRecord>,
    /// New UUIDs (a swapped-in GPU, or one more).
    pub added: Vec<GpuRecord>,
}

impl InventoryChange {
    pub(crate) fn between(before: &[GpuRecord], now: &[GpuRecord]) -> Self {
        let known = |uuid: &str, list: &[GpuRecord]| list.iter().any(|g| g.uuid == uuid);
        let added: Vec<GpuRecord> = now
            .iter()
            .filter(|g| !g.uuid.is_empty() && !known(&g.uuid, before))
            .cloned()
            .collect();
        let (replaced, lost) = before
            .iter()
            .filter(|old| !old.uuid.is_empty() && !known(&old.uuid, now))
            .cloned()
            .partition(|old| added.iter().any(|g| g.index == old.index));
        Self {
            lost,
            replaced,
            added,
        }
    }

    /// New hardware: worth an event and a burn-in (a GPU that is only missing is a fault).
    pub(crate) fn changed(&self) -> bool {
        !self.added.is_empty()
    }

    pub(crate) fn event(&self, now: Now) -> NodeEvent {
        let list = |gpus: &[GpuRecord]| {
            gpus.iter()
                .map(|g| {
                    format!(
                        "GPU {} ({}, serial {})",
                        g.index,
                        g.uuid,
                        or_none(&g.serial)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut message = format!("GPU inventory changed: new {}", list(&self.added));
        if !self.replaced.is_empty() {
            message.push_str(&format!("; replacing {}", list(&self.replaced)));
        }
        if !self.lost.is_empty() {
            message.push_str(&format!("; missing {}", list(&self.lost)));
        }
        message.push_str("; burned in before it takes work");
        NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: "inventory-changed".into(),
            message,
            gpu_index: None,
        }
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "none" } else { s }
}

#[cfg(test)]
#[path = "register_tests.rs"]
mod tests;
