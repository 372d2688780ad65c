//! The cordon circuit breaker (`breaker status`, `breaker reset`) and a node's held cordon.

use serde::Serialize;
use vigil_proto::v1;

/// An automatic cordon the open breaker held: the node is not cordoned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldCordon {
    pub node: String,
    /// The rule that would have cordoned it (`xid`, `triage`, `repeat_offender`, ...).
    pub rule: String,
    /// The reason the cordon would have had.
    pub evidence: String,
    pub since_unix_ms: u64,
    /// The line in the node's history: `cordon held: breaker open (...): EVIDENCE`.
    pub message: String,
}

impl From<v1::HeldCordon> for HeldCordon {
    fn from(h: v1::HeldCordon) -> Self {
        Self {
            node: h.node,
            rule: h.rule,
            evidence: h.evidence,
            since_unix_ms: h.since_unix_ms,
            message: h.message,
        }
    }
}

/// An automatic cordon counted in the breaker's window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CountedCordon {
    pub node: String,
    pub at_unix_ms: u64,
}

/// `clusterctl breaker status` and `breaker reset`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Breaker {
    /// `open` (automatic cordons are held) or `closed`.
    pub state: &'static str,
    pub open: bool,
    /// When it opened and why; `null` while closed.
    pub opened_at_unix_ms: Option<u64>,
    pub opened_why: Option<String>,
    /// max(1, min(max_nodes, floor(max_fraction × nodes_known))).
    pub cap: u32,
    pub max_fraction: f64,
    pub max_nodes: u32,
    pub nodes_known: u32,
    pub window_ms: u64,
    /// The automatic cordons in the window, oldest first.
    pub cordons: Vec<CountedCordon>,
    pub held: Vec<HeldCordon>,
    /// The last reset: who and when; `null` if never.
    pub last_reset_by: Option<String>,
    pub last_reset_at_unix_ms: Option<u64>,
}

impl From<v1::BreakerStatus> for Breaker {
    fn from(b: v1::BreakerStatus) -> Self {
        Self {
            state: if b.open { "open" } else { "closed" },
            open: b.open,
            opened_at_unix_ms: b.opened_at_unix_ms,
            opened_why: (!b.opened_why.is_empty()).then_some(b.opened_why),
            cap: b.cap,
            max_fraction: b.max_fraction,
            max_nodes: b.max_nodes,
            nodes_known: b.nodes_known,
            window_ms: b.window_ms,
            cordons: b
                .cordons
                .into_iter()
                .map(|c| CountedCordon {
                    node: c.node,
                    at_unix_ms: c.at_unix_ms,
                })
                .collect(),
            held: b.held.into_iter().map(HeldCordon::from).collect(),
            last_reset_by: (!b.last_reset_by.is_empty()).then_some(b.last_reset_by),
            last_reset_at_unix_ms: b.last_reset_at_unix_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_json_names_every_field_and_nulls_what_is_absent() {
        let open = Breaker::from(v1::BreakerStatus {
            open: true,
            opened_at_unix_ms: Some(7),
            opened_why: "cordon breaker opened: ...".into(),
            cap: 2,
            max_fraction: 0.25,
            max_nodes: 50,
            nodes_known: 8,
            window_ms: 600_000,
            cordons: vec![v1::BreakerCordon {
                node: "n0".into(),
                at_unix_ms: 5,
            }],
            held: vec![v1::HeldCordon {
                node: "n2".into(),
                rule: "xid".into(),
                evidence: "XID 79 on GPU 0".into(),
                since_unix_ms: 7,
                message: "cordon held: breaker open (2 automatic cordons in the last 10m, cap 2): XID 79 on GPU 0".into(),
            }],
            ..Default::default()
        });
        assert_eq!(
            serde_json::to_value(&open).expect("serializes"),
            json!({
                "state": "open",
                "open": true,
                "opened_at_unix_ms": 7,
                "opened_why": "cordon breaker opened: ...",
                "cap": 2,
                "max_fraction": 0.25,
                "max_nodes": 50,
                "nodes_known": 8,
                "window_ms": 600000,
                "cordons": [{"node": "n0", "at_unix_ms": 5}],
                "held": [{
                    "node": "n2",
                    "rule": "xid",
                    "evidence": "XID 79 on GPU 0",
                    "since_unix_ms": 7,
                    "message": "cordon held: breaker open (2 automatic cordons in the last 10m, cap 2): XID 79 on GPU 0",
                }],
                "last_reset_by": null,
                "last_reset_at_unix_ms": null,
            })
        );
        let closed = Breaker::from(v1::BreakerStatus::default());
        assert_eq!(closed.state, "closed");
        assert_eq!(closed.opened_why, None);
    }
}
