//! The `ha` object of `status`: the store, who leads, the coordinators and the etcd members.

use serde::Serialize;
use vigil_proto::v1;

/// What the answering coordinator knows of high availability; `status` carries it only when
/// the coordinator reports it (older coordinators do not).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ha {
    /// `sqlite` (one coordinator, embedded store; `sled` from coordinators before it) or `etcd` (highly available).
    pub store: String,
    /// The coordinator that answered, and its role: `leader` or `standby`.
    pub coordinator: String,
    pub role: String,
    /// The leader's name and gRPC URL; `null` while no coordinator leads.
    pub leader: Option<String>,
    pub leader_url: Option<String>,
    /// The leadership term (the fencing token agents check); 0 on a single coordinator.
    pub term: u64,
    /// When the leader took over; `null` when unknown.
    pub leader_since_unix_ms: Option<u64>,
    /// Whether etcd can commit a write; without quorum no coordinator decides anything.
    pub quorum: bool,
    /// Why etcd looks unhealthy, in one line; `null` when healthy.
    pub etcd_error: Option<String>,
    /// Leadership changes the answering coordinator has seen since it started.
    pub leader_changes: u64,
    pub coordinators: Vec<HaCoordinator>,
    pub etcd: Vec<EtcdMember>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HaCoordinator {
    pub name: String,
    pub url: String,
    /// `leader` or `standby`.
    pub role: String,
    pub version: String,
    pub started_at_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EtcdMember {
    pub endpoint: String,
    pub healthy: bool,
    /// This member is etcd's own raft leader.
    pub is_leader: bool,
    /// `null` when the member did not answer.
    pub version: Option<String>,
    pub db_size_bytes: Option<u64>,
    pub raft_term: Option<u64>,
    /// Why it is unhealthy; `null` when healthy.
    pub error: Option<String>,
}

fn non_empty(s: String) -> Option<String> {
    (!s.trim().is_empty()).then_some(s)
}

impl Ha {
    pub fn is_etcd(&self) -> bool {
        self.store == "etcd"
    }
}

impl From<v1::HaStatus> for Ha {
    fn from(h: v1::HaStatus) -> Self {
        let leader = non_empty(h.leader);
        Self {
            store: h.store,
            coordinator: h.coordinator,
            role: h.role,
            leader_url: non_empty(h.leader_url),
            leader_since_unix_ms: (leader.is_some() && h.leader_since_unix_ms > 0)
                .then_some(h.leader_since_unix_ms),
            leader,
            term: h.term,
            quorum: h.quorum,
            etcd_error: non_empty(h.etcd_error),
            leader_changes: h.leader_changes,
            coordinators: h
                .coordinators
                .into_iter()
                .map(|c| HaCoordinator {
                    name: c.name,
                    url: c.url,
                    role: if c.leader { "leader" } else { "standby" }.to_string(),
                    version: c.version,
                    started_at_unix_ms: c.started_at_unix_ms,
                })
                .collect(),
            etcd: h
                .etcd
                .into_iter()
                .map(|m| {
                    // An unhealthy member's zeros are "did not answer", not values.
                    let answered = m.healthy || m.raft_term > 0;
                    EtcdMember {
                        endpoint: m.endpoint,
                        healthy: m.healthy,
                        is_leader: m.is_leader,
                        version: non_empty(m.version),
                        db_size_bytes: answered.then_some(m.db_size_bytes),
                        raft_term: answered.then_some(m.raft_term),
                        error: non_empty(m.error),
                    }
                })
                .collect(),
        }
    }
}
