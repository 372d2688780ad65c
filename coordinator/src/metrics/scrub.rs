//! Prometheus metrics of the state store's scrub (`store::scrub`).

use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::store::scrub::Pass;

#[derive(Default)]
pub struct ScrubMetrics {
    pub records: Counter,
    pub passes: Counter,
    /// Records that failed their checksum in the last pass (0 after a clean one).
    pub damaged: Gauge,
    pub last_pass: Gauge<f64, AtomicU64>,
}

impl ScrubMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_store_scrub_records",
            "Records of the state store the background scrub has checked against their checksum",
            self.records.clone(),
        );
        registry.register(
            "vigil_store_scrub_passes",
            "Complete scrub passes over the state store",
            self.passes.clone(),
        );
        registry.register(
            "vigil_store_scrub_damaged_records",
            "Records that failed their checksum (or could not be read) in the last scrub pass; \
             anything above 0 means the store's disk is returning altered data",
            self.damaged.clone(),
        );
        registry.register_with_unit(
            "vigil_store_scrub_last_pass_timestamp",
            "When the last scrub pass ended (unix time); 0 before the first",
            Unit::Seconds,
            self.last_pass.clone(),
        );
    }

    pub fn observe(&self, pass: &Pass) {
        self.records.inc_by(pass.records);
        self.passes.inc();
        self.damaged
            .set(i64::try_from(pass.bad.len()).unwrap_or(i64::MAX));
        self.last_pass
            .set(super::unix_ms(SystemTime::now()) as f64 / 1000.0);
    }
}
