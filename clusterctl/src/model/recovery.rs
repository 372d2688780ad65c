//! The recovery hold (`recovery`, and `status`'s `recovery` object): after the coordinator
//! started from what was still valid in a damaged state store (`vigil-coordinator --recover`).

use serde::Serialize;
use vigil_proto::v1;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recovery {
    /// When the recovered coordinator began the hold.
    pub since_unix_ms: u64,
    /// Why the store was damaged.
    pub damage: String,
    /// One line per record that could not be kept.
    pub lost: Vec<String>,
    pub lost_nodes: Vec<String>,
    pub lost_jobs: Vec<String>,
    /// Where the damaged files were kept; `null` when the coordinator did not say.
    pub damaged_copy: Option<String>,
    /// Whether an operator confirmed it: until then no job starts.
    pub confirmed: bool,
    /// Who confirmed it and when; `null` while unconfirmed.
    pub confirmed_by: Option<String>,
    pub confirmed_at_unix_ms: Option<u64>,
    /// Nodes still cordoned by the hold (source `recovery`), waiting for review.
    pub nodes_held: Vec<String>,
    /// Jobs waiting for the confirmation.
    pub jobs_held: u32,
}

impl From<v1::RecoveryHold> for Recovery {
    fn from(h: v1::RecoveryHold) -> Self {
        let confirmed_by = (!h.confirmed_by.is_empty()).then_some(h.confirmed_by);
        Self {
            since_unix_ms: h.since_unix_ms,
            damage: h.damage,
            lost: h.lost,
            lost_nodes: h.lost_nodes,
            lost_jobs: h.lost_jobs,
            damaged_copy: (!h.damaged_copy.is_empty()).then_some(h.damaged_copy),
            confirmed: confirmed_by.is_some(),
            confirmed_by,
            confirmed_at_unix_ms: h.confirmed_at_unix_ms,
            nodes_held: h.nodes_held,
            jobs_held: h.jobs_held,
        }
    }
}

/// `clusterctl recovery` and `recovery confirm`: the hold, `null` when the store was never
/// recovered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoveryView {
    pub recovery: Option<Recovery>,
}

impl From<v1::RecoveryResponse> for RecoveryView {
    fn from(r: v1::RecoveryResponse) -> Self {
        Self {
            recovery: r.hold.map(Recovery::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unconfirmed_hold_reads_as_nulls_and_the_empty_one_as_null() {
        let view = RecoveryView::from(v1::RecoveryResponse {
            hold: Some(v1::RecoveryHold {
                since_unix_ms: 5,
                damage: "checksum mismatch".into(),
                lost: vec!["nodes/n7: checksum mismatch".into()],
                lost_nodes: vec!["n7".into()],
                nodes_held: vec!["n0".into()],
                jobs_held: 1,
                ..Default::default()
            }),
        });
        assert_eq!(
            serde_json::to_value(&view).expect("serializes"),
            json!({"recovery": {
                "since_unix_ms": 5,
                "damage": "checksum mismatch",
                "lost": ["nodes/n7: checksum mismatch"],
                "lost_nodes": ["n7"],
                "lost_jobs": [],
                "damaged_copy": null,
                "confirmed": false,
                "confirmed_by": null,
                "confirmed_at_unix_ms": null,
                "nodes_held": ["n0"],
                "jobs_held": 1,
            }})
        );
        let none = RecoveryView::from(v1::RecoveryResponse { hold: None });
        assert_eq!(
            serde_json::to_value(&none).expect("serializes"),
            json!({"recovery": null})
        );
    }
}
