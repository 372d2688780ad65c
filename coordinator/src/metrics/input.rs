//! Metrics of refused and suspicious input: rejected, throttled and ignored agent messages,
//! refused job specs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::ReasonLabel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

/// Every `reason` of `vigil_agent_messages_rejected_total` (each exists from the start at 0).
pub const REJECT_REASONS: [&str; 9] = [
    "oversized",
    "malformed",
    "invalid_register",
    "wrong_identity",
    "invalid_heartbeat",
    "invalid_event",
    "register_twice",
    "not_registered",
    "register_timeout",
];

/// Every `reason` of `vigil_agent_reports_ignored_total`.
pub const IGNORE_REASONS: [&str; 3] = ["unknown_job", "not_assigned", "stale_attempt"];

#[derive(Default)]
pub struct InputMetrics {
    rejected: Family<ReasonLabel, Counter>,
    throttled: Family<NodeLabel, Counter>,
    ignored: Family<ReasonLabel, Counter>,
    specs_rejected: Counter,
}

impl InputMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_agent_messages_rejected",
            "Agent messages refused at the boundary (too large, undecodable, or over a limit), by reason",
            self.rejected.clone(),
        );
        registry.register(
            "vigil_agent_messages_throttled",
            "Agent messages that had to wait for their stream's rate limit, by node",
            self.throttled.clone(),
        );
        registry.register(
            "vigil_agent_reports_ignored",
            "Agent reports about work not assigned to that node (unknown job, another node's, a stale attempt), by reason",
            self.ignored.clone(),
        );
        registry.register(
            "vigil_job_specs_rejected",
            "Job specs refused on submit (invalid, or over a limit)",
            self.specs_rejected.clone(),
        );
        for reason in REJECT_REASONS {
            self.reject(reason, 0);
        }
        for reason in IGNORE_REASONS {
            self.ignore(reason, 0);
        }
    }

    fn reject(&self, reason: &str, n: u64) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }

    pub fn rejected(&self, reason: &str) {
        self.reject(reason, 1);
    }

    pub fn throttled(&self, node: &str) {
        self.throttled
            .get_or_create(&NodeLabel {
                node: node.to_owned(),
            })
            .inc();
    }

    fn ignore(&self, reason: &str, n: u64) {
        self.ignored
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }

    pub fn ignored(&self, reason: &str) {
        self.ignore(reason, 1);
    }

    pub fn spec_rejected(&self) {
        self.specs_rejected.inc();
    }
}
