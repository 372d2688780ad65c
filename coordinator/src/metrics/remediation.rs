//! Prometheus metrics of the remediation ladder (`vigil_core::remediation`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// gpu_reset, reboot, needs_repair.
    pub action: &'static str,
    /// ok, failed, no_answer (agent steps); cordoned, held (needs_repair).
    pub outcome: &'static str,
}

#[derive(Default)]
pub struct RemediationMetrics {
    pub steps: Family<StepLabels, Counter>,
}

impl RemediationMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_remediations",
            "Steps of the remediation ladder that ended, by action (gpu_reset, reboot, \
             needs_repair) and outcome (ok, failed, no_answer; cordoned or held for needs_repair)",
            self.steps.clone(),
        );
    }

    pub fn count(&self, action: &'static str, outcome: &'static str) {
        self.steps
            .get_or_create(&StepLabels { action, outcome })
            .inc();
    }
}
