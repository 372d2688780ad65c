//! Cluster state and the pure transitions on it: (state, input, now) -> effects.
//!
//! Nothing here reads a clock, touches the store or a socket. The engine feeds
//! inputs, persists the `Persist` effects (flushed) and only then acts on the rest.

use std::collections::BTreeMap;

use tokio::time::Instant;
use vigil_proto::v1;

use crate::config::LivenessConfig;
use crate::liveness;
use crate::node::{Availability, Cordon, CordonSource, GpuRecord, Node, NodeRecord};

/// The moment an input is handled: monotonic for deadlines, wall clock for records.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall_ms: u64,
}

/// A validated registration of one agent session.
#[derive(Debug, Clone)]
pub struct Registration {
    pub session: u64,
    pub node: String,
    pub hostname: String,
    pub agent_version: String,
    pub simulated: bool,
    pub gpus: Vec<GpuRecord>,
    pub workers: Vec<v1::WorkerInfo>,
}

/// What the engine must do after a transition, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write this record and flush it before acting on anything that follows.
    Persist(NodeRecord),
    /// A newer session of the same node replaced this one: end its stream.
    CloseSession {
        node: String,
        session: u64,
    },
    /// A node's availability changed; the engine logs it and counts it.
    Availability {
        node: String,
        from: Option<Availability>,
        to: Availability,
        why: &'static str,
    },
    /// A node's cordon changed.
    Cordoned {
        node: String,
        cordon: Cordon,
    },
    Uncordoned {
        node: String,
        previous: Cordon,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("node \"{0}\" not found (clusterctl nodes lists known nodes)")]
    UnknownNode(String),
    #[error("message from a superseded session {session} of node \"{node}\"")]
    StaleSession { node: String, session: u64 },
}

#[derive(Debug, Clone)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, Node>,
    pub liveness: LivenessConfig,
}

impl ClusterState {
    /// State after a (re)start: every stored node is `Unreachable` until its
    /// agent reconnects, and `Lost` if it has not within `lost_after`.
    pub fn load(records: Vec<NodeRecord>, liveness: LivenessConfig, now: Now) -> Self {
        let nodes = records
            .into_iter()
            .map(|r| (r.name.clone(), Node::from_record(r, now.mono, now.wall_ms)))
            .collect();
        Self { nodes, liveness }
    }

    pub fn register(&mut self, reg: Registration, now: Now) -> Vec<Effect> {
        let mut effects = Vec::new();
        let is_new = !self.nodes.contains_key(&reg.node);
        let node = self.nodes.entry(reg.node.clone()).or_insert_with(|| {
            let record = NodeRecord {
                name: reg.node.clone(),
                hostname: String::new(),
                agent_version: String::new(),
                simulated: reg.simulated,
                gpus: Vec::new(),
                cordon: None,
                first_registered_unix_ms: now.wall_ms,
                last_registered_unix_ms: now.wall_ms,
            };
            Node::from_record(record, now.mono, now.wall_ms)
        });
        let record = &mut node.record;
        record.hostname = reg.hostname;
        record.agent_version = reg.agent_version;
        record.simulated = reg.simulated;
        record.gpus = reg.gpus;
        record.last_registered_unix_ms = now.wall_ms;
        effects.push(Effect::Persist(record.clone()));
        if let Some(old) = node.session.filter(|s| *s != reg.session) {
            effects.push(Effect::CloseSession {
                node: reg.node.clone(),
                session: old,
            });
        }
        node.session = Some(reg.session);
        node.workers = reg.workers;
        node.last_samples.clear();
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
        effects
    }

    pub fn heartbeat(
        &mut self,
        node_name: &str,
        session: u64,
        hb: v1::Heartbeat,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let node = self.live_session(node_name, session)?;
        node.last_samples = hb.gpus;
        node.workers = hb.workers;
        let mut effects = Vec::new();
        hear_from(node, now, "heartbeat resumed", &mut effects);
        Ok(effects)
    }

    /// Any other message of a live session also proves the agent alive.
    pub fn heard(
        &mut self,
        node_name: &str,
        session: u64,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let node = self.live_session(node_name, session)?;
        let mut effects = Vec::new();
        hear_from(node, now, "agent spoke again", &mut effects);
        Ok(effects)
    }

    pub fn disconnected(&mut self, node_name: &str, session: u64, now: Now) -> Vec<Effect> {
        let cfg = self.liveness;
        let Ok(node) = self.live_session(node_name, session) else {
            return Vec::new();
        };
        node.session = None;
        let mut effects = Vec::new();
        reevaluate(node, now, &cfg, "agent stream closed", &mut effects);
        effects
    }

    /// Apply the passage of time: silent nodes become Unreachable, then Lost.
    pub fn tick(&mut self, now: Now) -> Vec<Effect> {
        let mut effects = Vec::new();
        for node in self.nodes.values_mut() {
            reevaluate(node, now, &self.liveness, "no heartbeat", &mut effects);
        }
        effects
    }

    pub fn cordon(
        &mut self,
        name: &str,
        reason: String,
        source: CordonSource,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let node = self.node_mut(name)?;
        let since_unix_ms = node
            .record
            .cordon
            .as_ref()
            .map_or(now.wall_ms, |c| c.since_unix_ms);
        let cordon = Cordon {
            reason,
            source,
            since_unix_ms,
        };
        if node.record.cordon.as_ref() == Some(&cordon) {
            return Ok(Vec::new());
        }
        node.record.cordon = Some(cordon.clone());
        Ok(vec![
            Effect::Persist(node.record.clone()),
            Effect::Cordoned {
                node: name.to_owned(),
                cordon,
            },
        ])
    }

    pub fn uncordon(&mut self, name: &str) -> Result<Vec<Effect>, StateError> {
        let node = self.node_mut(name)?;
        let Some(previous) = node.record.cordon.take() else {
            return Ok(Vec::new());
        };
        Ok(vec![
            Effect::Persist(node.record.clone()),
            Effect::Uncordoned {
                node: name.to_owned(),
                previous,
            },
        ])
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut Node, StateError> {
        self.nodes
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownNode(name.to_owned()))
    }

    fn live_session(&mut self, name: &str, session: u64) -> Result<&mut Node, StateError> {
        let node = self.node_mut(name)?;
        if node.session != Some(session) {
            return Err(StateError::StaleSession {
                node: name.to_owned(),
                session,
            });
        }
        Ok(node)
    }
}

/// The agent just spoke: restart its silence clock and, if it was not Ready, say so.
fn hear_from(node: &mut Node, now: Now, why: &'static str, effects: &mut Vec<Effect>) {
    node.silent_since = now.mono;
    node.heard_since_start = true;
    if node.availability != Availability::Ready {
        let from = node.availability;
        node.availability = Availability::Ready;
        node.availability_since_unix_ms = now.wall_ms;
        effects.push(Effect::Availability {
            node: node.record.name.clone(),
            from: Some(from),
            to: Availability::Ready,
            why,
        });
    }
}

fn reevaluate(
    node: &mut Node,
    now: Now,
    cfg: &LivenessConfig,
    why: &'static str,
    effects: &mut Vec<Effect>,
) {
    let to = liveness::availability(node.silent_since, node.session.is_some(), now.mono, cfg);
    if to != node.availability {
        let from = node.availability;
        node.availability = to;
        node.availability_since_unix_ms = now.wall_ms;
        effects.push(Effect::Availability {
            node: node.record.name.clone(),
            from: Some(from),
            to,
            why,
        });
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
