//! Goodput of one job (`job show`, `job report`): where its wall time went.
//!
//! `productive_ms + lost_ms = wall_ms`; `lost_ms` is the sum of the six lost phases; the
//! timeline's segments cover the wall time exactly once.

use serde::Serialize;
use vigil_proto::v1;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureCost {
    /// The attempt that ended.
    pub attempt: u64,
    /// crash, hang, node_lost, node_unhealthy, worker_gone, drain, cancelled.
    pub kind: String,
    pub reason: String,
    pub culprit_node: String,
    pub fault_at_unix_ms: u64,
    pub detection_ms: u64,
    pub teardown_ms: u64,
    pub waiting_ms: u64,
    pub startup_ms: u64,
    pub recomputation_ms: u64,
    /// Steps done after the checkpoint the next attempt resumed from.
    pub steps_lost: Option<u64>,
}

impl FailureCost {
    pub fn total_ms(&self) -> u64 {
        self.detection_ms
            + self.teardown_ms
            + self.waiting_ms
            + self.startup_ms
            + self.recomputation_ms
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineSegment {
    /// queued, startup, recomputation, productive, detection, teardown, waiting.
    pub phase: String,
    pub from_unix_ms: u64,
    pub to_unix_ms: u64,
    pub attempt: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Goodput {
    pub wall_ms: u64,
    pub productive_ms: u64,
    pub lost_ms: u64,
    /// Effective training time ratio: productive / wall.
    pub ettr: f64,
    pub queued_ms: u64,
    pub detection_ms: u64,
    pub teardown_ms: u64,
    pub waiting_ms: u64,
    pub startup_ms: u64,
    pub recomputation_ms: u64,
    pub failures: Vec<FailureCost>,
    pub timeline: Vec<TimelineSegment>,
    /// Running time per failure (operator drains and cancels excluded); null before one.
    pub mtbf_ms: Option<u64>,
    pub checkpoint_save_ms: Option<u64>,
    pub checkpoint_interval_ms: Option<u64>,
    /// Young: sqrt(2 x checkpoint_save_ms x mtbf_ms); null until both are known.
    pub suggested_checkpoint_interval_ms: Option<u64>,
}

impl From<v1::Goodput> for Goodput {
    fn from(g: v1::Goodput) -> Self {
        Self {
            wall_ms: g.wall_ms,
            productive_ms: g.productive_ms,
            lost_ms: g.lost_ms,
            ettr: g.ettr,
            queued_ms: g.queued_ms,
            detection_ms: g.detection_ms,
            teardown_ms: g.teardown_ms,
            waiting_ms: g.waiting_ms,
            startup_ms: g.startup_ms,
            recomputation_ms: g.recomputation_ms,
            failures: g
                .failures
                .into_iter()
                .map(|f| FailureCost {
                    attempt: f.attempt,
                    kind: f.kind,
                    reason: f.reason,
                    culprit_node: f.culprit_node,
                    fault_at_unix_ms: f.fault_at_unix_ms,
                    detection_ms: f.detection_ms,
                    teardown_ms: f.teardown_ms,
                    waiting_ms: f.waiting_ms,
                    startup_ms: f.startup_ms,
                    recomputation_ms: f.recomputation_ms,
                    steps_lost: f.steps_lost,
                })
                .collect(),
            timeline: g
                .timeline
                .into_iter()
                .map(|s| TimelineSegment {
                    phase: s.phase,
                    from_unix_ms: s.from_unix_ms,
                    to_unix_ms: s.to_unix_ms,
                    attempt: s.attempt,
                })
                .collect(),
            mtbf_ms: g.mtbf_ms,
            checkpoint_save_ms: g.checkpoint_save_ms,
            checkpoint_interval_ms: g.checkpoint_interval_ms,
            suggested_checkpoint_interval_ms: g.suggested_checkpoint_interval_ms,
        }
    }
}
