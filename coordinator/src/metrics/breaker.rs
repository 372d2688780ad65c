//! Prometheus metrics of the cordon circuit breaker (`vigil_core::breaker`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use vigil_core::breaker::Breaker;

#[derive(Default)]
pub struct BreakerMetrics {
    /// 1 while open (`VigilCordonBreakerOpen` fires on it).
    pub open: Gauge,
    /// Automatic cordons held, ever (one per node and hold).
    pub held: Counter,
    pub held_nodes: Gauge,
}

impl BreakerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_cordon_breaker_open",
            "1 while the cordon circuit breaker is open: automatic cordons are held until an \
             operator runs clusterctl breaker reset",
            self.open.clone(),
        );
        registry.register(
            "vigil_cordon_breaker_held",
            "Automatic cordons the open cordon breaker held instead of applying",
            self.held.clone(),
        );
        registry.register(
            "vigil_cordon_breaker_held_nodes",
            "Nodes whose automatic cordon the cordon breaker holds now",
            self.held_nodes.clone(),
        );
    }

    pub fn observe(&self, breaker: &Breaker) {
        self.open.set(i64::from(breaker.is_open()));
        self.held_nodes
            .set(i64::try_from(breaker.held.len()).unwrap_or(i64::MAX));
    }
}
