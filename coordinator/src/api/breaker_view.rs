//! The cordon breaker as clusterctl sees it (`breaker status`, and a node's held cordon).

use vigil_proto::v1;

use vigil_core::breaker::{Breaker, Held};

/// A node's held cordon, for `nodes` and `node`.
pub fn held(node: &str, h: &Held) -> v1::HeldCordon {
    v1::HeldCordon {
        node: node.to_owned(),
        rule: h.rule.clone(),
        evidence: h.evidence.clone(),
        since_unix_ms: h.since_unix_ms,
        message: h.message.clone(),
    }
}

/// The breaker, its cap with `known` nodes, what it counted and what it holds.
pub fn status(b: &Breaker, known: usize) -> v1::BreakerStatus {
    let cfg = &b.cfg;
    v1::BreakerStatus {
        open: b.is_open(),
        opened_at_unix_ms: b.open.as_ref().map(|o| o.since_unix_ms),
        opened_why: b.open.as_ref().map(|o| o.why.clone()).unwrap_or_default(),
        cap: u32::try_from(cfg.cap(known)).unwrap_or(u32::MAX),
        max_fraction: cfg.max_fraction,
        max_nodes: cfg.max_nodes,
        nodes_known: u32::try_from(known).unwrap_or(u32::MAX),
        window_ms: u64::try_from(cfg.window.as_millis()).unwrap_or(u64::MAX),
        cordons: b
            .window
            .iter()
            .map(|c| v1::BreakerCordon {
                node: c.node.clone(),
                at_unix_ms: c.at_unix_ms,
            })
            .collect(),
        held: b.held.iter().map(|(n, h)| held(n, h)).collect(),
        last_reset_by: b
            .last_reset
            .as_ref()
            .map(|r| r.by.clone())
            .unwrap_or_default(),
        last_reset_at_unix_ms: b.last_reset.as_ref().map(|r| r.at_unix_ms),
    }
}
