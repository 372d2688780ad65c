//! The `status` screen's model: coordinator, node counts per state, GPUs, cordoned and degraded nodes.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use vigil_proto::{NodeState, v1};

use super::ha::Ha;
use super::node::NodeSummary;
use super::recovery::Recovery;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CoordinatorInfo {
    /// The URL clusterctl used, not one the server reports.
    pub url: String,
    pub version: String,
    pub started_at_unix_ms: u64,
    pub uptime_ms: u64,
    pub listen_addr: String,
    /// Plaintext (insecure = true): nobody is authenticated.
    pub insecure: bool,
    /// Who the coordinator says you are: `alice (admin)`, `anonymous (insecure)`.
    pub caller: String,
}

/// Node counts per state: the known states always, in the protocol's order
/// (`NodeState::ALL`), zeros included; any state a newer coordinator adds follows them.
#[derive(Debug, Clone, PartialEq)]
pub struct StateCounts(pub Vec<(String, u32)>);

impl StateCounts {
    fn from_proto(counts: Vec<v1::StateCount>) -> Self {
        let mut out: Vec<(String, u32)> =
            NodeState::ALL.iter().map(|s| (s.to_string(), 0)).collect();
        for c in counts {
            match out.iter_mut().find(|(state, _)| *state == c.state) {
                Some(entry) => entry.1 += c.count,
                None => out.push((c.state, c.count)),
            }
        }
        Self(out)
    }
}

impl Serialize for StateCounts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (state, count) in &self.0 {
            map.serialize_entry(state, count)?;
        }
        map.end()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub coordinator: CoordinatorInfo,
    /// High availability as the answering coordinator sees it; `null` from a coordinator
    /// that does not report it (older ones).
    pub ha: Option<Ha>,
    pub nodes_total: u32,
    pub nodes_by_state: StateCounts,
    pub gpus_healthy: u32,
    pub gpus_total: u32,
    pub nodes_simulated: u32,
    pub cordoned: Vec<NodeSummary>,
    /// Nodes whose condition is Degraded or Unhealthy and that are not cordoned.
    pub degraded: Vec<NodeSummary>,
    /// The recovery hold, when the coordinator was started from a damaged store
    /// (`--recover`); `null` otherwise.
    pub recovery: Option<Recovery>,
}

impl Status {
    pub fn from_proto(s: v1::StatusResponse, url: &str) -> Self {
        Self {
            coordinator: CoordinatorInfo {
                url: url.to_string(),
                version: s.coordinator_version,
                started_at_unix_ms: s.started_at_unix_ms,
                uptime_ms: s.uptime_ms,
                listen_addr: s.listen_addr,
                insecure: s.insecure,
                caller: s.caller,
            },
            ha: s.ha.map(Ha::from),
            nodes_total: s.nodes_total,
            nodes_by_state: StateCounts::from_proto(s.nodes_by_state),
            gpus_healthy: s.gpus_healthy,
            gpus_total: s.gpus_total,
            nodes_simulated: s.nodes_simulated,
            cordoned: s.cordoned.into_iter().map(NodeSummary::from).collect(),
            degraded: s.degraded.into_iter().map(NodeSummary::from).collect(),
            recovery: s.recovery.map(Recovery::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_counts_every_state_in_order_with_zeros() {
        let status = Status::from_proto(
            v1::StatusResponse {
                coordinator_version: "0.1.0".into(),
                nodes_by_state: vec![
                    v1::StateCount {
                        state: "Cordoned".into(),
                        count: 1,
                    },
                    v1::StateCount {
                        state: "Ready".into(),
                        count: 2,
                    },
                    v1::StateCount {
                        state: "Quarantined".into(),
                        count: 4,
                    },
                ],
                nodes_total: 7,
                ..Default::default()
            },
            "http://127.0.0.1:7770",
        );
        let text = serde_json::to_string(&status.nodes_by_state).expect("serializes");
        assert_eq!(
            text,
            r#"{"Ready":2,"Degraded":0,"Validating":0,"Cordoned":1,"Unreachable":0,"Lost":0,"Quarantined":4}"#
        );
        let value = serde_json::to_value(&status).expect("serializes");
        assert_eq!(value["coordinator"]["url"], json!("http://127.0.0.1:7770"));
        assert_eq!(value["coordinator"]["version"], json!("0.1.0"));
        assert_eq!(value["cordoned"], json!([]));
        assert_eq!(value["degraded"], json!([]));
    }
}
