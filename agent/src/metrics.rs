//! Prometheus metrics and the `/metrics` + `/healthz` HTTP endpoint.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Handles to every agent metric; clones share the same counters.
#[derive(Clone)]
pub struct Metrics {
    pub connected: Gauge,
    pub heartbeats_sent: Counter,
    pub reconnects: Counter,
    pub registrations: Counter,
    registry: Arc<Registry>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

impl Metrics {
    /// `backend` is fixed for the process lifetime, so the GPU gauge is set once here.
    pub fn new(backend: &str, gpus: usize) -> Self {
        let mut registry = Registry::default();
        let connected = Gauge::default();
        registry.register(
            "vigil_agent_connected",
            "1 while a session with the coordinator is registered, else 0",
            connected.clone(),
        );
        let heartbeats_sent = Counter::default();
        registry.register(
            "vigil_agent_heartbeats_sent",
            "Heartbeats sent to the coordinator",
            heartbeats_sent.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "vigil_agent_reconnects",
            "Reconnection attempts after a failed or lost session",
            reconnects.clone(),
        );
        let registrations = Counter::default();
        registry.register(
            "vigil_agent_registrations",
            "Registrations the coordinator accepted",
            registrations.clone(),
        );
        let gpus_family = Family::<BackendLabels, Gauge>::default();
        gpus_family
            .get_or_create(&BackendLabels {
                backend: backend.to_owned(),
            })
            .set(i64::try_from(gpus).unwrap_or(i64::MAX));
        registry.register(
            "vigil_agent_gpus",
            "GPUs in this node's inventory, by backend (simulated GPUs are labelled so)",
            gpus_family,
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register("vigil_agent_build_info", "Agent build, always 1", build);
        Self {
            connected,
            heartbeats_sent,
            reconnects,
            registrations,
            registry: Arc::new(registry),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error would only mean a malformed metric.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Serves until `shutdown` resolves; the listener is bound by the caller so port 0 works in tests.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(metrics): State<Metrics>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_its_prometheus_name() {
        let m = Metrics::new("simulated", 8);
        m.connected.set(1);
        m.heartbeats_sent.inc();
        let text = m.encode();
        for line in [
            "vigil_agent_connected 1",
            "vigil_agent_heartbeats_sent_total 1",
            "vigil_agent_reconnects_total 0",
            "vigil_agent_registrations_total 0",
            "vigil_agent_gpus{backend=\"simulated\"} 8",
            &format!(
                "vigil_agent_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }
}
