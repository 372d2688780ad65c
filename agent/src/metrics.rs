//! Prometheus metrics and the `/metrics` + `/healthz` HTTP endpoint.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{AgentEvent, GpuInfo, GpuSample};

use crate::fabric_metrics::FabricCollector;
use crate::gpu::GpuProbe;
use crate::gpu_metrics::GpuCollector;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const SCRAPE_SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Handles to every agent metric; clones share the same counters.
#[derive(Clone)]
pub struct Metrics {
    pub connected: Gauge,
    pub heartbeats_sent: Counter,
    pub reconnects: Counter,
    pub registrations: Counter,
    /// The highest coordinator term (leadership) this agent has seen.
    pub coordinator_term: Gauge,
    /// Registrations at a higher term than the one followed before.
    pub leader_changes: Counter,
    /// Coordinator messages ignored for carrying a term below the highest seen.
    pub stale_term_messages: Counter,
    /// The commit count of the highest coordinator store mark kept (`store_mark`).
    pub coordinator_store_seq: Gauge,
    xid_errors: Family<XidLabels, Counter>,
    gpu_lost: Counter,
    diagnostics: Family<ResultLabels, Counter>,
    workers_adopted: Family<OutcomeLabels, Counter>,
    /// Failed writes of the lease file the workers' shims enforce.
    pub lease_file_errors: Counter,
    gpus: Arc<GpuCollector>,
    fabric: Arc<FabricCollector>,
    registry: Arc<Registry>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XidLabels {
    gpu: String,
    xid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// What a starting agent did with a worker an earlier agent recorded.
pub const ADOPTED_OUTCOMES: [&str; 3] = ["running", "ended", "orphan"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

impl Metrics {
    /// `backend` is fixed for the process lifetime, so the GPU gauge is set once here;
    /// `inventory` (at start-up) and `hostname` label the per-GPU gauges.
    pub fn new(backend: &str, inventory: &[GpuInfo], hostname: &str) -> Self {
        let gpus = inventory.len();
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
        let coordinator_term = Gauge::default();
        registry.register(
            "vigil_agent_coordinator_term",
            "Highest leadership term of a coordinator this agent has seen (0: single coordinator)",
            coordinator_term.clone(),
        );
        let leader_changes = Counter::default();
        registry.register(
            "vigil_agent_leader_changes",
            "Registrations with a coordinator at a higher term than the one followed before",
            leader_changes.clone(),
        );
        let stale_term_messages = Counter::default();
        registry.register(
            "vigil_agent_stale_term_messages",
            "Coordinator messages ignored because their term is below the highest seen (a deposed leader)",
            stale_term_messages.clone(),
        );
        let coordinator_store_seq = Gauge::default();
        registry.register(
            "vigil_agent_coordinator_store_seq",
            "Commits of the coordinator's store, as of the highest mark this agent was told (0: none)",
            coordinator_store_seq.clone(),
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
        let xid_errors = Family::<XidLabels, Counter>::default();
        registry.register(
            "vigil_agent_xid_errors",
            "XID errors seen, by GPU index and XID code",
            xid_errors.clone(),
        );
        let gpu_lost = Counter::default();
        registry.register(
            "vigil_agent_gpu_lost",
            "GPUs of the inventory that fell off the bus or disappeared",
            gpu_lost.clone(),
        );
        let diagnostics = Family::<ResultLabels, Counter>::default();
        for result in ["pass", "fail"] {
            let _ = diagnostics.get_or_create(&ResultLabels { result });
        }
        registry.register(
            "vigil_agent_diagnostics",
            "Diagnostics run on the coordinator's request, by result",
            diagnostics.clone(),
        );
        let workers_adopted = Family::<OutcomeLabels, Counter>::default();
        for outcome in ADOPTED_OUTCOMES {
            let _ = workers_adopted.get_or_create(&OutcomeLabels { outcome });
        }
        registry.register(
            "vigil_agent_workers_adopted",
            "Workers recorded by an earlier agent, at this agent's start, by outcome: running \
             (re-adopted from its shim), ended (while no agent ran), orphan (no shim: stopped)",
            workers_adopted.clone(),
        );
        let lease_file_errors = Counter::default();
        registry.register(
            "vigil_agent_lease_file_errors",
            "Failed writes of state_dir/lease.json, the lease the workers' shims enforce",
            lease_file_errors.clone(),
        );
        let gpu_collector = GpuCollector::new(inventory, hostname, backend == "simulated");
        registry.register_collector(Box::new(Arc::clone(&gpu_collector)));
        let fabric = FabricCollector::new();
        registry.register_collector(Box::new(Arc::clone(&fabric)));
        Self {
            connected,
            heartbeats_sent,
            reconnects,
            registrations,
            coordinator_term,
            leader_changes,
            stale_term_messages,
            coordinator_store_seq,
            xid_errors,
            gpu_lost,
            diagnostics,
            workers_adopted,
            lease_file_errors,
            gpus: gpu_collector,
            fabric,
            registry: Arc::new(registry),
        }
    }

    /// The term gauge shows `term` (saturating: terms are etcd revisions, far below i64::MAX).
    pub fn set_term(&self, term: u64) {
        self.coordinator_term
            .set(i64::try_from(term).unwrap_or(i64::MAX));
    }

    /// The store seq gauge shows `seq` (saturating).
    pub fn set_store_seq(&self, seq: u64) {
        self.coordinator_store_seq
            .set(i64::try_from(seq).unwrap_or(i64::MAX));
    }

    /// Counts a worker of an earlier agent by what became of it (one of [`ADOPTED_OUTCOMES`]).
    pub fn count_adopted(&self, outcome: &'static str) {
        self.workers_adopted
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The per-GPU gauges show `samples` from now on.
    pub fn observe(&self, samples: &[GpuSample]) {
        self.gpus.observe(samples);
    }

    /// The fabric series show `ports` (a heartbeat's read) from now on.
    pub fn observe_fabric(&self, ports: &[vigil_proto::v1::FabricPort]) {
        self.fabric.observe(ports);
    }

    /// Counts an event as it is emitted, whether or not a session is up to send it.
    pub fn count_event(&self, event: &AgentEvent) {
        match &event.kind {
            Some(Kind::Xid(x)) => {
                self.xid_errors
                    .get_or_create(&XidLabels {
                        gpu: x.gpu_index.to_string(),
                        xid: x.xid.to_string(),
                    })
                    .inc();
            }
            Some(Kind::GpuLost(_)) => {
                self.gpu_lost.inc();
            }
            Some(Kind::Diagnostics(d)) => {
                let result = if d.passed { "pass" } else { "fail" };
                self.diagnostics
                    .get_or_create(&ResultLabels { result })
                    .inc();
            }
            Some(
                Kind::WorkerStarted(_)
                | Kind::WorkerExited(_)
                | Kind::Checkpoint(_)
                | Kind::CheckpointScan(_)
                | Kind::RemediationResult(_)
                | Kind::LogData(_)
                | Kind::HangEvidence(_)
                | Kind::PreflightResult(_),
            )
            | None => {}
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
///
/// Each scrape samples the GPUs first, so the per-GPU gauges are fresh even
/// while no session with the coordinator is up.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    probe: Arc<dyn GpuProbe>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state((metrics, probe));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(
    State((metrics, probe)): State<(Metrics, Arc<dyn GpuProbe>)>,
) -> impl IntoResponse {
    // A wedged driver must not hang the scrape: the last sample is served instead.
    let sampled = tokio::time::timeout(
        SCRAPE_SAMPLE_TIMEOUT,
        tokio::task::spawn_blocking(move || probe.sample()),
    )
    .await;
    match sampled {
        Ok(Ok(Ok(samples))) => metrics.observe(&samples),
        _ => tracing::debug!("GPU sample for the scrape failed; serving the last one"),
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode())
}

#[cfg(test)]
mod tests {
    use vigil_proto::v1::{DiagnosticsResult, XidError};

    use super::*;
    use crate::gpu::SimProbe;

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }

    #[test]
    fn every_metric_is_exposed_with_its_prometheus_name() {
        let inventory = SimProbe::new("n", 8).inventory().unwrap_or_default();
        let m = Metrics::new("simulated", &inventory, "host");
        m.connected.set(1);
        m.heartbeats_sent.inc();
        m.set_term(9);
        m.stale_term_messages.inc();
        let text = m.encode();
        for line in [
            "vigil_agent_connected 1",
            "vigil_agent_heartbeats_sent_total 1",
            "vigil_agent_reconnects_total 0",
            "vigil_agent_registrations_total 0",
            "vigil_agent_coordinator_term 9",
            "vigil_agent_leader_changes_total 0",
            "vigil_agent_stale_term_messages_total 1",
            "vigil_agent_gpus{backend=\"simulated\"} 8",
            "vigil_agent_gpu_lost_total 0",
            "vigil_agent_diagnostics_total{result=\"fail\"} 0",
            &format!(
                "vigil_agent_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            has(&text, line);
        }
    }

    #[test]
    fn events_are_counted_by_kind() {
        let m = Metrics::new("nvml", &[], "host");
        let xid = AgentEvent {
            at_unix_ms: 1,
            kind: Some(Kind::Xid(XidError {
                gpu_index: 3,
                xid: 79,
                gpu_uuid: String::new(),
            })),
        };
        m.count_event(&xid);
        m.count_event(&xid);
        m.count_event(&AgentEvent {
            at_unix_ms: 1,
            kind: Some(Kind::Diagnostics(DiagnosticsResult {
                passed: true,
                ..DiagnosticsResult::default()
            })),
        });
        let text = m.encode();
        has(
            &text,
            "vigil_agent_xid_errors_total{gpu=\"3\",xid=\"79\"} 2",
        );
        has(&text, "vigil_agent_diagnostics_total{result=\"pass\"} 1");
    }

    #[test]
    fn gpu_gauges_carry_dcgm_labels_and_skip_unsupported_fields() -> Result<(), crate::gpu::GpuError>
    {
        let probe = SimProbe::new("n", 2);
        let inventory = probe.inventory()?;
        let m = Metrics::new("simulated", &inventory, "host-1");
        probe.apply_fault_text("gpu=1 temp=97 nvlink_down=3 pcie_width=8 thermal_throttle\n");
        m.observe(&probe.sample()?);
        let text = m.encode();
        let labels = format!(
            "gpu=\"1\",UUID=\"{}\",modelName=\"{}\",Hostname=\"host-1\",simulated=\"true\"",
            inventory[1].uuid, inventory[1].name
        );
        has(&text, &format!("vigil_gpu_temp_celsius{{{labels}}} 97.0"));
        has(
            &text,
            &format!("vigil_gpu_nvlinks{{{labels},state=\"down\"}} 1.0"),
        );
        has(
            &text,
            &format!("vigil_gpu_nvlinks{{{labels},state=\"active\"}} 17.0"),
        );
        has(
            &text,
            &format!("vigil_gpu_pcie_link_width{{{labels},kind=\"current\"}} 8.0"),
        );
        has(
            &text,
            &format!("vigil_gpu_pcie_link_width{{{labels},kind=\"max\"}} 16.0"),
        );
        has(
            &text,
            &format!("vigil_gpu_throttle{{{labels},reason=\"thermal\"}} 1.0"),
        );
        has(
            &text,
            &format!("vigil_gpu_row_remap_failure{{{labels}}} 0.0"),
        );
        assert!(
            !text.contains("vigil_gpu_retired_pages{"),
            "H100 does not report retired pages: not exported\n{text}"
        );
        probe.apply_fault_text("gpu=1 lost\n");
        m.observe(&probe.sample()?);
        assert!(
            !m.encode().contains("gpu=\"1\""),
            "a lost GPU's series disappear"
        );
        Ok(())
    }
}
