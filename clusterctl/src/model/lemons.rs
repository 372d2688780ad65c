//! Lemon hosts and GPUs (`nodes --lemons`, `uncordon --clear-lemon`): failures on record per
//! host and per GPU serial, and which are blocklisted.

use serde::Serialize;
use vigil_proto::v1;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lemon {
    /// host or gpu.
    pub kind: String,
    /// Node name (host) or serial / UUID (GPU).
    pub id: String,
    /// The node it was last seen on.
    pub node: String,
    /// Failures within the window, since the last clear.
    pub failures: u32,
    pub failures_total: u32,
    /// Recent failures by kind, e.g. `unhealthy x2, node_lost x1`.
    pub kinds: String,
    pub last_failure_unix_ms: u64,
    pub last_detail: String,
    /// `null` unless blocklisted.
    pub blocklisted_at_unix_ms: Option<u64>,
    pub cleared_at_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LemonList {
    pub lemons: Vec<Lemon>,
    /// Failures within `window_ms` that make a lemon; 0: detection off.
    pub max_failures: u32,
    pub window_ms: u64,
}

impl From<v1::ListLemonsResponse> for LemonList {
    fn from(r: v1::ListLemonsResponse) -> Self {
        Self {
            lemons: r
                .lemons
                .into_iter()
                .map(|l| Lemon {
                    kind: l.kind,
                    id: l.id,
                    node: l.node,
                    failures: l.failures,
                    failures_total: l.failures_total,
                    kinds: l.kinds,
                    last_failure_unix_ms: l.last_failure_unix_ms,
                    last_detail: l.last_detail,
                    blocklisted_at_unix_ms: l.blocklisted_at_unix_ms,
                    cleared_at_unix_ms: l.cleared_at_unix_ms,
                })
                .collect(),
            max_failures: r.max_failures,
            window_ms: r.window_ms,
        }
    }
}
