//! Drain's answer, and the records `events` and `job logs` stream (one JSON object per line).

use serde::Serialize;
use vigil_proto::v1;

use super::node::NodeSummary;

/// What `clusterctl drain NAME` prints: the node after its cordon, and the jobs restarted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainResult {
    pub node: NodeSummary,
    /// Jobs whose current attempt ran on the node and that restart elsewhere from their last
    /// complete checkpoint.
    pub jobs_restarted: Vec<String>,
}

impl DrainResult {
    /// Maps a `Drain` answer; `name` fills the summary if a server ever omits it.
    pub fn from_proto(d: v1::DrainResponse, name: &str) -> Self {
        let node = d.node.unwrap_or_else(|| v1::NodeSummary {
            name: name.to_string(),
            ..Default::default()
        });
        Self {
            node: node.into(),
            jobs_restarted: d.jobs_restarted,
        }
    }
}

/// One node or job event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterEvent {
    pub at_unix_ms: u64,
    /// Node kinds: registered, xid, gpu-lost, condition, cordon, uncordon, diagnostics. Job
    /// kinds: submitted, started, failed, stopped, checkpoint, succeeded, cancelled, pending,
    /// worker-exited.
    pub kind: String,
    /// The node it concerns; empty for job events without one.
    pub node: String,
    /// The job it concerns; empty for node events.
    pub job: String,
    pub message: String,
}

impl From<v1::ClusterEvent> for ClusterEvent {
    fn from(e: v1::ClusterEvent) -> Self {
        Self {
            at_unix_ms: e.at_unix_ms,
            kind: e.kind,
            node: e.node,
            job: e.job,
            message: e.message,
        }
    }
}

/// A piece of one worker's log, as written (it may end mid-line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogChunk {
    pub node: String,
    pub node_rank: u32,
    pub attempt: u64,
    pub data: String,
}

impl From<v1::LogChunk> for LogChunk {
    fn from(c: v1::LogChunk) -> Self {
        Self {
            node: c.node,
            node_rank: c.node_rank,
            attempt: c.attempt,
            data: c.data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures;
    use serde_json::json;

    #[test]
    fn streamed_records_have_the_documented_shapes() {
        let event = ClusterEvent::from(v1::ClusterEvent {
            at_unix_ms: 5,
            kind: "cordon".into(),
            node: "gpu-003".into(),
            job: String::new(),
            message: "cordoned by operator: bad fan".into(),
        });
        assert_eq!(
            serde_json::to_value(&event).expect("serializes"),
            json!({"at_unix_ms": 5, "kind": "cordon", "node": "gpu-003", "job": "", "message": "cordoned by operator: bad fan"})
        );
        let chunk = LogChunk::from(v1::LogChunk {
            node: "gpu-001".into(),
            node_rank: 0,
            attempt: 2,
            data: "step 1\n".into(),
        });
        assert_eq!(
            serde_json::to_value(&chunk).expect("serializes"),
            json!({"node": "gpu-001", "node_rank": 0, "attempt": 2, "data": "step 1\n"})
        );
    }

    #[test]
    fn drain_json_is_the_node_and_the_restarted_jobs() {
        let result = DrainResult::from_proto(
            v1::DrainResponse {
                node: Some(fixtures::cordoned_sim_node()),
                jobs_restarted: vec!["j-1".into()],
            },
            "gpu-003",
        );
        let value = serde_json::to_value(&result).expect("serializes");
        assert_eq!(value["node"]["name"], json!("gpu-003"));
        assert_eq!(value["jobs_restarted"], json!(["j-1"]));
        let bare = DrainResult::from_proto(v1::DrainResponse::default(), "n9");
        assert_eq!(bare.node.name, "n9");
    }
}
