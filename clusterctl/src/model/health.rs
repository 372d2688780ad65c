//! Health as the coordinator judges it: per-GPU conditions, the node's event history, diagnostics.

use serde::Serialize;
use vigil_proto::v1;

use super::enums::Condition;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuHealth {
    pub index: u32,
    pub condition: Condition,
    /// One line per rule that made the condition what it is.
    pub reasons: Vec<String>,
}

impl From<v1::GpuHealth> for GpuHealth {
    fn from(h: v1::GpuHealth) -> Self {
        Self {
            index: h.index,
            condition: h.condition.into(),
            reasons: h.reasons,
        }
    }
}

/// One entry of a node's history: a fault seen, a cordon, a diagnostic run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeEvent {
    pub at_unix_ms: u64,
    /// `xid`, `gpu-lost`, `condition`, `cordon`, `uncordon`, `diagnostics`, `registered`, ...
    pub kind: String,
    pub message: String,
    pub gpu_index: Option<u32>,
}

impl From<v1::NodeEvent> for NodeEvent {
    fn from(e: v1::NodeEvent) -> Self {
        Self {
            at_unix_ms: e.at_unix_ms,
            kind: e.kind,
            message: e.message,
            gpu_index: e.gpu_index,
        }
    }
}

/// The result of one diagnostic run on a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostics {
    pub passed: bool,
    /// One line: what failed, or "all checks passed".
    pub summary: String,
    /// What the diagnostic printed (the agent truncates it to 64 KiB).
    pub output: String,
    pub duration_ms: u64,
    /// What ran: "builtin NVML self-check" or the configured command line.
    pub command: String,
    pub finished_at_unix_ms: u64,
}

impl From<v1::DiagnosticsRecord> for Diagnostics {
    fn from(d: v1::DiagnosticsRecord) -> Self {
        Self {
            passed: d.passed,
            summary: d.summary,
            output: d.output,
            duration_ms: d.duration_ms,
            command: d.command,
            finished_at_unix_ms: d.finished_at_unix_ms,
        }
    }
}

/// What `clusterctl diagnose NAME` prints: the node's name, then the record's fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiagnoseResult {
    pub node: String,
    #[serde(flatten)]
    pub diagnostics: Diagnostics,
}

impl DiagnoseResult {
    /// Maps a `Diagnose` answer; `name` fills in if a server leaves the node out.
    pub fn from_proto(d: v1::DiagnosticsRecord, name: &str) -> Self {
        let node = if d.node.is_empty() {
            name.to_string()
        } else {
            d.node.clone()
        };
        Self {
            node,
            diagnostics: d.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diagnose_json_names_the_node_then_the_record() {
        let result = DiagnoseResult::from_proto(
            v1::DiagnosticsRecord {
                node: String::new(),
                passed: false,
                summary: "gpu 3: bandwidth test failed".into(),
                output: "line 1\nline 2\n".into(),
                duration_ms: 12_345,
                command: "dcgmi diag -r 1".into(),
                finished_at_unix_ms: 1_700_000_000_000,
            },
            "gpu-003",
        );
        assert_eq!(
            serde_json::to_value(&result).expect("serializes"),
            json!({
                "node": "gpu-003",
                "passed": false,
                "summary": "gpu 3: bandwidth test failed",
                "output": "line 1\nline 2\n",
                "duration_ms": 12_345,
                "command": "dcgmi diag -r 1",
                "finished_at_unix_ms": 1_700_000_000_000_u64,
            })
        );
    }

    #[test]
    fn events_without_a_gpu_have_a_null_index() {
        let event = NodeEvent::from(v1::NodeEvent {
            at_unix_ms: 5,
            kind: "cordon".into(),
            message: "cordoned automatically".into(),
            gpu_index: None,
        });
        assert_eq!(
            serde_json::to_value(&event).expect("serializes"),
            json!({"at_unix_ms": 5, "kind": "cordon", "message": "cordoned automatically", "gpu_index": null})
        );
    }
}
