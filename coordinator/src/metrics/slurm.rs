//! Prometheus metrics of the Slurm adapter (`[slurm]`, `crate::slurm`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
    pub result: &'static str,
}

/// The actions the adapter knows, as they are labelled.
pub const ACTIONS: [&str; 4] = ["drain", "resume", "requeue", "release"];

#[derive(Default)]
pub struct SlurmMetrics {
    pub actions: Family<ActionLabel, Counter>,
    pub read_errors: Counter,
}

impl SlurmMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_slurm_actions",
            "scontrol actions the Slurm adapter ran ([slurm]), by action (drain, resume, requeue, \
             release: the requeue hold lifted) and result (ok, error)",
            self.actions.clone(),
        );
        registry.register(
            "vigil_slurm_read_errors",
            "Rounds of the Slurm adapter that could not read Slurm (sinfo or squeue failed or \
             timed out): nothing was drained or resumed in them",
            self.read_errors.clone(),
        );
        // Every series from the start, so a rate() sees the first action.
        for action in ACTIONS {
            for result in ["ok", "error"] {
                let _ = self.actions.get_or_create(&ActionLabel { action, result });
            }
        }
    }

    pub fn count(&self, action: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.actions
            .get_or_create(&ActionLabel { action, result })
            .inc();
    }
}
