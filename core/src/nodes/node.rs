//! A node as the coordinator sees it: the persisted record plus observed liveness.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::time::Instant;
use serde::{Deserialize, Serialize};

/// The display states' words and order are the protocol's; which one a node is in is decided
/// here ([`Node::display_state`]).
pub use vigil_proto::NodeState;
use vigil_proto::v1;

use crate::health::{Condition, NodeHealth};

/// How many history entries each node keeps (in memory and in the store).
pub const MAX_EVENTS: usize = 100;

/// Observed: is the node's agent talking to us?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Availability {
    Ready,
    Unreachable,
    Lost,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Ready => "Ready",
            Availability::Unreachable => "Unreachable",
            Availability::Lost => "Lost",
        }
    }
}

/// Who cordoned a node: the health policy, a person, or the recovery hold (after the store
/// was recovered, every node waits for an operator's review; see `recovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CordonSource {
    Auto,
    Operator,
    Recovery,
}

impl CordonSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CordonSource::Auto => "auto",
            CordonSource::Operator => "operator",
            CordonSource::Recovery => "recovery",
        }
    }
}

/// What a heartbeat that says GPU health is unchanged (`Heartbeat.gpu_health_unchanged`) is
/// read against: the full samples of the same session, which every agent sends first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleBase {
    /// No full samples yet this session (or no session).
    Missing,
    /// As `Missing`, and a compact heartbeat came anyway: reported once, not again.
    MissingReported,
    /// `last_samples` are this session's full samples (with telemetry merged in since).
    Held,
}

/// Intent: the node takes no new work, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cordon {
    pub reason: String,
    pub source: CordonSource,
    pub since_unix_ms: u64,
}

/// One GPU of a node's inventory, as last registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    pub memory_total_bytes: u64,
    #[serde(default)]
    pub serial: String,
}

/// One entry of a node's history: a fault seen, a cordon, a diagnostic run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    pub at_unix_ms: u64,
    /// xid, gpu-lost, condition, cordon, uncordon, diagnostics, registered, identity-conflict,
    /// identity-changed, identity-forgotten
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub gpu_index: Option<u32>,
}

/// The result of the node's last diagnostic run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagnosticsRecord {
    pub passed: bool,
    pub summary: String,
    pub output: String,
    pub duration_ms: u64,
    pub command: String,
    pub finished_at_unix_ms: u64,
}

/// What survives a coordinator restart: identity, inventory and the cordon.
/// Availability is observed afresh after a restart, never trusted from disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub hostname: String,
    /// Where the node's workers are reached (MASTER_ADDR when it is rank 0):
    /// the address its agent connects from.
    #[serde(default)]
    pub address: String,
    pub agent_version: String,
    pub simulated: bool,
    pub gpus: Vec<GpuRecord>,
    pub cordon: Option<Cordon>,
    pub first_registered_unix_ms: u64,
    pub last_registered_unix_ms: u64,
    #[serde(default)]
    pub last_diagnostics: Option<DiagnosticsRecord>,
    /// A burn-in the node must pass before it is schedulable (`Validating`).
    #[serde(default)]
    pub burn_in: Option<crate::burn_in::BurnIn>,
    /// The remediation ladder's marks, steps, pending step and needs-repair verdict.
    #[serde(default)]
    pub remediation: Option<Box<crate::remediation::Ladder>>,
    /// The host this name is bound to (its machine-id): another host claiming the name while
    /// this one lives is refused (see `identity`). Empty: not bound yet (a record from before
    /// binding, an agent too old to send one, or an operator's `node forget`).
    #[serde(default)]
    pub machine_id: String,
    /// The bound host's boot id at its last registration (a new one: it rebooted).
    #[serde(default)]
    pub boot_id: String,
    /// The fabric ports that were up at the node's last registration that read its fabric
    /// (docs/fabric.md): one of them found down at a later registration is a fault, as a GPU
    /// missing from the inventory is. Empty: no fabric known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fabric_ports: Vec<crate::fabric::RequiredPort>,
}

/// The node in the engine's memory. Cheap to clone (snapshots clone every
/// node ten times a second): the parts that are large or rarely change are
/// shared, and copied only when changed (`Arc::make_mut`).
#[derive(Debug, Clone)]
pub struct Node {
    pub record: Arc<NodeRecord>,
    pub availability: Availability,
    pub availability_since_unix_ms: u64,
    /// Last message from the agent, or when this coordinator started for a
    /// node loaded from the store: silence is measured from here.
    pub silent_since: Instant,
    /// Whether the agent has spoken to this coordinator process at all.
    pub heard_since_start: bool,
    /// The live agent session, if any; messages of any other session are stale.
    pub session: Option<u64>,
    /// The GPU samples as last judged: a full heartbeat's, or the session's last full ones
    /// with a compact heartbeat's telemetry merged in.
    pub last_samples: Arc<Vec<v1::GpuSample>>,
    /// Whether `last_samples` are this session's, so that a compact heartbeat can be read.
    pub sample_base: SampleBase,
    /// The fabric ports as last read (registration or heartbeat); empty when none is known.
    pub last_fabric: Arc<Vec<v1::FabricPort>>,
    pub workers: Arc<Vec<v1::WorkerInfo>>,
    /// What the health policy remembers; rebuilt from samples after a restart.
    pub health: NodeHealth,
    /// The condition last reported (and logged) for this node.
    pub condition: Condition,
    /// Newest last, at most [`MAX_EVENTS`].
    pub events: Arc<VecDeque<NodeEvent>>,
    /// Machine-ids refused this node's name, and when their conflict was last put in its
    /// history (see `identity`: rate-limited). Not persisted.
    pub identity_conflicts: BTreeMap<String, Instant>,
}

impl Node {
    /// A node known from the store whose agent has not spoken since start-up.
    pub fn from_record(mut record: NodeRecord, now: Instant, wall_ms: u64) -> Self {
        if let Some(ladder) = record.remediation.as_mut() {
            ladder.restore(now);
        }
        Self {
            record: Arc::new(record),
            availability: Availability::Unreachable,
            availability_since_unix_ms: wall_ms,
            silent_since: now,
            heard_since_start: false,
            session: None,
            last_samples: Arc::default(),
            sample_base: SampleBase::Missing,
            last_fabric: Arc::default(),
            workers: Arc::default(),
            health: NodeHealth::default(),
            condition: Condition::Healthy,
            events: Arc::default(),
            identity_conflicts: BTreeMap::new(),
        }
    }

    pub fn push_event(&mut self, event: NodeEvent) {
        let events = Arc::make_mut(&mut self.events);
        if events.len() >= MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    pub fn cordoned(&self) -> bool {
        self.record.cordon.is_some()
    }

    /// The one word an operator reads first.
    pub fn display_state(&self) -> NodeState {
        match (self.availability, self.cordoned()) {
            (Availability::Lost, _) => NodeState::Lost,
            (Availability::Unreachable, _) => NodeState::Unreachable,
            (Availability::Ready, true) if self.record.burn_in.is_some() => NodeState::Validating,
            (Availability::Ready, true) => NodeState::Cordoned,
            (Availability::Ready, false) if self.condition != Condition::Healthy => {
                NodeState::Degraded
            }
            (Availability::Ready, false) => NodeState::Ready,
        }
    }

    pub fn gpus_total(&self) -> u32 {
        u32::try_from(self.record.gpus.len()).unwrap_or(u32::MAX)
    }

    /// GPUs that can do work: those of a reachable node that the health
    /// policy does not judge Unhealthy.
    pub fn gpus_healthy(&self) -> u32 {
        if self.availability != Availability::Ready {
            return 0;
        }
        let healthy = self
            .record
            .gpus
            .iter()
            .filter(|g| self.health.gpu_worst(g.index) != Condition::Unhealthy)
            .count();
        u32::try_from(healthy).unwrap_or(u32::MAX)
    }
}
