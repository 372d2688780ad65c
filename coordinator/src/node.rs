//! A node as the coordinator sees it: the persisted record plus observed liveness.

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use vigil_proto::v1;

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

/// Who cordoned a node: the health policy or a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CordonSource {
    Auto,
    Operator,
}

impl CordonSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CordonSource::Auto => "auto",
            CordonSource::Operator => "operator",
        }
    }
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

/// What survives a coordinator restart: identity, inventory and the cordon.
/// Availability is observed afresh after a restart, never trusted from disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub hostname: String,
    pub agent_version: String,
    pub simulated: bool,
    pub gpus: Vec<GpuRecord>,
    pub cordon: Option<Cordon>,
    pub first_registered_unix_ms: u64,
    pub last_registered_unix_ms: u64,
}

/// The node in the engine's memory.
#[derive(Debug, Clone)]
pub struct Node {
    pub record: NodeRecord,
    pub availability: Availability,
    pub availability_since_unix_ms: u64,
    /// Last message from the agent, or when this coordinator started for a
    /// node loaded from the store: silence is measured from here.
    pub silent_since: Instant,
    /// Whether the agent has spoken to this coordinator process at all.
    pub heard_since_start: bool,
    /// The live agent session, if any; messages of any other session are stale.
    pub session: Option<u64>,
    pub last_samples: Vec<v1::GpuSample>,
    pub workers: Vec<v1::WorkerInfo>,
}

impl Node {
    /// A node known from the store whose agent has not spoken since start-up.
    pub fn from_record(record: NodeRecord, now: Instant, wall_ms: u64) -> Self {
        Self {
            record,
            availability: Availability::Unreachable,
            availability_since_unix_ms: wall_ms,
            silent_since: now,
            heard_since_start: false,
            session: None,
            last_samples: Vec::new(),
            workers: Vec::new(),
        }
    }

    pub fn cordoned(&self) -> bool {
        self.record.cordon.is_some()
    }

    /// The one word an operator reads first.
    pub fn display_state(&self) -> &'static str {
        match (self.availability, self.cordoned()) {
            (Availability::Lost, _) => "Lost",
            (Availability::Unreachable, _) => "Unreachable",
            (Availability::Ready, true) => "Cordoned",
            (Availability::Ready, false) => "Ready",
        }
    }

    pub fn gpus_total(&self) -> u32 {
        u32::try_from(self.record.gpus.len()).unwrap_or(u32::MAX)
    }

    /// GPUs that can do work: those of a reachable node. The GPU-health
    /// policy refines this per GPU.
    pub fn gpus_healthy(&self) -> u32 {
        if self.availability == Availability::Ready {
            self.gpus_total()
        } else {
            0
        }
    }
}

/// Operator-facing states, in the order `clusterctl status` lists them.
pub const DISPLAY_STATES: [&str; 5] = ["Ready", "Degraded", "Cordoned", "Unreachable", "Lost"];
