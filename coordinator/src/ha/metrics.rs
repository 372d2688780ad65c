//! Prometheus metrics of leadership and the state store: `vigil_leader`,
//! `vigil_leader_changes_total`, the term, etcd's health, and store latency.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// 1 ms to 5 s: an etcd commit on a healthy cluster takes a few ms.
const STORE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabel {
    pub backend: String,
    pub op: String,
}

pub struct HaMetrics {
    pub leader: Gauge,
    pub leader_changes: Counter,
    pub term: Gauge,
    pub etcd_quorum: Gauge,
    pub etcd_members_healthy: Gauge,
    pub store_latency: Family<StoreOpLabel, Histogram>,
}

impl Default for HaMetrics {
    fn default() -> Self {
        Self {
            leader: Gauge::default(),
            leader_changes: Counter::default(),
            term: Gauge::default(),
            etcd_quorum: Gauge::default(),
            etcd_members_healthy: Gauge::default(),
            store_latency: Family::new_with_constructor(|| Histogram::new(STORE_BUCKETS)),
        }
    }
}

impl HaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_leader",
            "1 while this coordinator leads (always 1 for a single coordinator), 0 while \
             it stands by",
            self.leader.clone(),
        );
        registry.register(
            "vigil_leader_changes",
            "Leadership changes this coordinator has seen (a new leader, or a new term), since it \
             started",
            self.leader_changes.clone(),
        );
        registry.register(
            "vigil_leader_term",
            "The current leadership term (the fencing token on every command to agents); 0 for a single coordinator",
            self.term.clone(),
        );
        registry.register(
            "vigil_etcd_quorum",
            "1 while etcd commits writes (a linearizable read succeeds), 0 without quorum; 1 for a single coordinator",
            self.etcd_quorum.clone(),
        );
        registry.register(
            "vigil_etcd_members_healthy",
            "etcd members answering their status request without errors",
            self.etcd_members_healthy.clone(),
        );
        registry.register(
            "vigil_store_latency_seconds",
            "Time to make staged state changes durable (op=flush) and to read the whole state \
             (op=load), by backend (sqlite, etcd)",
            self.store_latency.clone(),
        );
    }

    /// Creates the `flush` series of `backend` (at 0), so that it is exported before the first
    /// write: dashboards and alerts see the histogram from the start.
    pub fn with_backend(&self, backend: &str) {
        let _created = self.store_latency.get_or_create(&StoreOpLabel {
            backend: backend.to_owned(),
            op: "flush".to_owned(),
        });
    }

    pub fn observe(&self, backend: &str, op: &str, seconds: f64) {
        self.store_latency
            .get_or_create(&StoreOpLabel {
                backend: backend.to_owned(),
                op: op.to_owned(),
            })
            .observe(seconds);
    }
}
