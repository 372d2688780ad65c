//! Prometheus metrics of the coordinator and the HTTP server for `/metrics` and `/healthz`.
//!
//! Layout: this file (the registry, node, job, engine and store series, the HTTP server);
//! `goodput` (per-job goodput series), `input` (rejected, throttled and ignored agent input),
//! `security` (refused connections, denied calls, certificate expiry), `backup` (scheduled
//! backups of the state store), `slurm` (the Slurm adapter's actions).

pub mod backup;
pub mod breaker;
pub mod goodput;
pub mod input;
pub mod remediation;
pub mod scrub;
pub mod security;
pub mod slurm;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::health::Condition;
use crate::job::{Job, JobPhase};
use crate::node::{Availability, Node, NodeState};

/// An engine that has not looped for this long is wedged: `/healthz` fails.
const ENGINE_STALL: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabel {
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CordonLabel {
    pub source: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XidLabel {
    pub xid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeConditionLabel {
    pub node: String,
    pub condition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FormLabel {
    pub form: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// Not `job`: Prometheus's own target label would shadow it.
    pub job_id: String,
}

/// Health rules that can cordon a node (see health.rs).
const CORDON_RULES: [&str; 8] = [
    "xid",
    "xid_recurrence",
    "ecc_uncorrected",
    "retired_pages_pending",
    "remap_failure",
    "gpu_lost",
    "gpu_missing",
    "nvlink_down",
];

/// How many jobs get their own checkpoint-age series (bounded cardinality).
const MAX_JOB_SERIES: usize = 100;

/// Restart buckets: seconds to an hour (hang timeouts, backoffs).
const RESTART_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Fault-to-cordon buckets: the target is under a second.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    nodes: Family<StateLabel, Gauge>,
    gpus: Family<StateLabel, Gauge>,
    pub connected_agents: Gauge,
    /// By `form`: `full` (GPU samples) or `compact` (GPU health unchanged, telemetry only).
    heartbeats: Family<FormLabel, Counter>,
    /// The two series of `heartbeats`, made once: no label is built per heartbeat.
    heartbeats_full: Counter,
    heartbeats_compact: Counter,
    pub registrations: Counter,
    /// Leases renewed at an agent's contact, before its registration was stepped.
    pub early_lease_renewals: Counter,
    pub rejected_registrations: Counter,
    /// Registrations that showed the store was rolled back (the coordinator then stops).
    pub store_rollbacks: Counter,
    pub stale_messages: Counter,
    pub availability_transitions: Family<TransitionLabel, Counter>,
    pub cordons: Family<CordonLabel, Counter>,
    pub uncordons: Counter,
    pub xid_errors: Family<XidLabel, Counter>,
    pub fault_to_cordon: Histogram,
    pub node_condition: Family<NodeConditionLabel, Gauge>,
    /// The condition last exported per node.
    conditions_seen: std::sync::Mutex<std::collections::HashMap<String, Condition>>,
    pub diagnostics: Family<ResultLabel, Counter>,
    jobs: Family<StateLabel, Gauge>,
    pub job_restarts: Family<ReasonLabel, Counter>,
    pub job_lost: Histogram,
    pub fault_to_relaunch: Histogram,
    pub heartbeat_lag: Histogram,
    checkpoint_age: Family<JobLabel, Gauge>,
    goodput: crate::metrics::goodput::GoodputMetrics,
    pub control_streams: Gauge,
    pub engine_queue_depth: Gauge,
    /// How far behind its queue the engine was at the last tick: agent silence is judged as
    /// of that long ago (`ClusterState::tick_heard_until`).
    pub engine_behind: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub store_size_bytes: Gauge,
    /// 1 while an unconfirmed recovery hold holds jobs.
    pub store_recovery_hold: Gauge,
    /// Refused, throttled and ignored agent input.
    pub input: crate::metrics::input::InputMetrics,
    /// Wall clock (unix ms) of the engine's last loop, for `/healthz`.
    engine_alive_unix_ms: AtomicU64,
    pub security: crate::metrics::security::SecurityMetrics,
    /// Leadership, etcd and store latency (`ha::metrics`).
    pub ha: crate::ha::metrics::HaMetrics,
    /// Scheduled backups of the state store (`[backup]`).
    pub backup: crate::metrics::backup::BackupMetrics,
    /// The Slurm adapter (`[slurm]`).
    pub slurm: crate::metrics::slurm::SlurmMetrics,
    /// The background scrub of the state store (`store::scrub`).
    pub scrub: crate::metrics::scrub::ScrubMetrics,
    pub cordon_breaker: crate::metrics::breaker::BreakerMetrics,
    /// `vigil_remediations_total{action, outcome}` (the remediation ladder).
    pub remediation: crate::metrics::remediation::RemediationMetrics,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Metrics {
    pub fn new(started_unix_ms: u64) -> Self {
        let mut registry = Registry::default();
        let heartbeats = Family::<FormLabel, Counter>::default();
        let form = |form: &str| {
            heartbeats
                .get_or_create(&FormLabel {
                    form: form.to_owned(),
                })
                .clone()
        };
        let (heartbeats_full, heartbeats_compact) = (form("full"), form("compact"));
        let m = Self {
            nodes: Family::default(),
            gpus: Family::default(),
            connected_agents: Gauge::default(),
            heartbeats,
            heartbeats_full,
            heartbeats_compact,
            registrations: Counter::default(),
            early_lease_renewals: Counter::default(),
            rejected_registrations: Counter::default(),
            store_rollbacks: Counter::default(),
            stale_messages: Counter::default(),
            availability_transitions: Family::default(),
            cordons: Family::default(),
            uncordons: Counter::default(),
            xid_errors: Family::default(),
            fault_to_cordon: Histogram::new(LATENCY_BUCKETS),
            node_condition: Family::default(),
            conditions_seen: std::sync::Mutex::default(),
            diagnostics: Family::default(),
            jobs: Family::default(),
            job_restarts: Family::default(),
            job_lost: Histogram::new(RESTART_BUCKETS),
            fault_to_relaunch: Histogram::new(RESTART_BUCKETS),
            heartbeat_lag: Histogram::new(LATENCY_BUCKETS),
            checkpoint_age: Family::default(),
            goodput: Default::default(),
            control_streams: Gauge::default(),
            engine_queue_depth: Gauge::default(),
            engine_behind: Gauge::default(),
            store_size_bytes: Gauge::default(),
            store_recovery_hold: Gauge::default(),
            input: Default::default(),
            engine_alive_unix_ms: AtomicU64::new(started_unix_ms),
            security: crate::metrics::security::SecurityMetrics::default(),
            ha: crate::ha::metrics::HaMetrics::default(),
            backup: crate::metrics::backup::BackupMetrics::default(),
            slurm: crate::metrics::slurm::SlurmMetrics::default(),
            scrub: crate::metrics::scrub::ScrubMetrics::default(),
            cordon_breaker: Default::default(),
            remediation: Default::default(),
            registry: Registry::default(),
        };
        m.security.register(&mut registry);
        m.ha.register(&mut registry);
        registry.register(
            "vigil_nodes",
            "Nodes by operator-facing state (Ready, Degraded, Cordoned, Unreachable, Lost)",
            m.nodes.clone(),
        );
        registry.register(
            "vigil_gpus",
            "GPUs by state: healthy, unhealthy (judged so by the health policy) or unknown (node unreachable or lost)",
            m.gpus.clone(),
        );
        registry.register(
            "vigil_agents_connected",
            "Agent streams open right now",
            m.connected_agents.clone(),
        );
        registry.register(
            "vigil_heartbeats_received",
            "Heartbeats received from agents, by form: full (GPU samples) or compact (GPU health unchanged, telemetry only)",
            m.heartbeats.clone(),
        );
        registry.register(
            "vigil_agent_registrations",
            "Agent registrations accepted",
            m.registrations.clone(),
        );
        registry.register(
            "vigil_agent_early_lease_renewals",
            "Agents' leases renewed as soon as their Register arrived, before the registration \
             was stepped (a reconnect storm): each kept its workers while it waited in the queue",
            m.early_lease_renewals.clone(),
        );
        registry.register(
            "vigil_agent_registrations_rejected",
            "Agent registrations refused (invalid, or the store could not save them)",
            m.rejected_registrations.clone(),
        );
        registry.register(
            "vigil_store_rollbacks_detected",
            "Agent registrations that showed the state store holds fewer commits than an agent \
             was told (its data dir was replaced by an older copy); the coordinator stops",
            m.store_rollbacks.clone(),
        );
        registry.register(
            "vigil_stale_agent_messages",
            "Messages ignored because a newer session of the same node replaced theirs",
            m.stale_messages.clone(),
        );
        registry.register(
            "vigil_node_availability_transitions",
            "Node availability changes, by new availability",
            m.availability_transitions.clone(),
        );
        registry.register(
            "vigil_cordons",
            "Cordons applied, by source (auto, operator) and rule (manual for operators)",
            m.cordons.clone(),
        );
        registry.register("vigil_uncordons", "Cordons lifted", m.uncordons.clone());
        registry.register(
            "vigil_xid_errors",
            "XID errors reported by agents, by XID code",
            m.xid_errors.clone(),
        );
        registry.register_with_unit(
            "vigil_fault_to_cordon",
            "From the agent observing a fault to the automatic cordon persisted",
            prometheus_client::registry::Unit::Seconds,
            m.fault_to_cordon.clone(),
        );
        registry.register(
            "vigil_node_condition",
            "1 for the node's current health condition (Healthy, Degraded, Unhealthy), else 0",
            m.node_condition.clone(),
        );
        registry.register(
            "vigil_diagnostics",
            "Diagnostic runs reported by agents, by result (pass, fail)",
            m.diagnostics.clone(),
        );
        registry.register(
            "vigil_jobs",
            "Jobs by state (Pending, Running, Restarting, Succeeded, Failed, Cancelling, Cancelled)",
            m.jobs.clone(),
        );
        registry.register(
            "vigil_job_restarts",
            "Job attempts restarted after a failure, by kind (crash, hang, node_lost, node_unhealthy, worker_gone, drain)",
            m.job_restarts.clone(),
        );
        registry.register_with_unit(
            "vigil_job_lost",
            "Time lost per restart: from the failure's detection to the next attempt's start",
            prometheus_client::registry::Unit::Seconds,
            m.job_lost.clone(),
        );
        registry.register_with_unit(
            "vigil_fault_to_relaunch",
            "From a fault's observation (by the agent, where known) to the next attempt's start",
            prometheus_client::registry::Unit::Seconds,
            m.fault_to_relaunch.clone(),
        );
        registry.register_with_unit(
            "vigil_heartbeat_lag",
            "Heartbeat delay: received by the coordinator minus sent by the agent (clocks must be in sync)",
            prometheus_client::registry::Unit::Seconds,
            m.heartbeat_lag.clone(),
        );
        registry.register_with_unit(
            "vigil_job_checkpoint_age",
            "Age of each running job's last complete checkpoint (at most 100 jobs)",
            prometheus_client::registry::Unit::Seconds,
            m.checkpoint_age.clone(),
        );
        m.goodput.register(&mut registry);
        registry.register(
            "vigil_control_streams",
            "Open clusterctl streams (events --follow, job logs)",
            m.control_streams.clone(),
        );
        registry.register(
            "vigil_engine_queue_depth",
            "Events waiting for the engine",
            m.engine_queue_depth.clone(),
        );
        registry.register_with_unit(
            "vigil_engine_behind",
            "How long ago the engine last had every agent message it had received in hand, at \
             the last tick: agents' silence is judged as of then, so a coordinator behind its \
             queue does not take its own backlog for silent agents (capped at lost_after)",
            prometheus_client::registry::Unit::Seconds,
            m.engine_behind.clone(),
        );
        registry.register_with_unit(
            "vigil_store_size",
            "Size of the state store on disk",
            prometheus_client::registry::Unit::Bytes,
            m.store_size_bytes.clone(),
        );
        registry.register(
            "vigil_store_recovery_hold",
            "1 while the coordinator, recovered from a damaged state store, holds every job until an operator confirms (clusterctl recovery confirm)",
            m.store_recovery_hold.clone(),
        );
        m.backup.register(&mut registry);
        m.slurm.register(&mut registry);
        m.scrub.register(&mut registry);
        m.cordon_breaker.register(&mut registry);
        m.remediation.register(&mut registry);
        let start = Gauge::<i64>::default();
        start.set(i64::try_from(started_unix_ms / 1000).unwrap_or(i64::MAX));
        registry.register(
            "vigil_coordinator_start_time_seconds",
            "When this coordinator process started, unix seconds",
            start,
        );
        registry.register(
            "vigil_build",
            "Build of this coordinator",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        m.input.register(&mut registry);
        // Known label values exist from the start at 0, so that increase()
        // sees their first event.
        m.count_cordon_init();
        for reason in [
            "crash",
            "hang",
            "node_lost",
            "node_unhealthy",
            "worker_gone",
            "drain",
        ] {
            let _ = m.job_restarts.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            });
        }
        for result in ["pass", "fail"] {
            let _ = m.diagnostics.get_or_create(&ResultLabel {
                result: result.to_owned(),
            });
        }
        Self { registry, ..m }
    }

    fn count_cordon_init(&self) {
        let _ = self.cordons.get_or_create(&CordonLabel {
            source: "operator".into(),
            rule: "manual".into(),
        });
        for rule in CORDON_RULES {
            let _ = self.cordons.get_or_create(&CordonLabel {
                source: "auto".into(),
                rule: rule.to_owned(),
            });
        }
        let _ = self.cordons.get_or_create(&CordonLabel {
            source: "recovery".into(),
            rule: "recovery".into(),
        });
    }

    /// The recovery hold's gauge: 1 while it holds jobs (unconfirmed).
    pub fn observe_recovery(&self, hold: Option<&vigil_core::RecoveryHold>) {
        self.store_recovery_hold
            .set(i64::from(hold.is_some_and(|h| h.holds_jobs())));
    }

    /// Refresh the gauges derived from cluster state.
    pub fn observe_nodes<'a>(&self, nodes: impl Iterator<Item = &'a Node>) {
        let mut by_state = [0i64; NodeState::ALL.len()];
        let (mut healthy, mut unhealthy, mut unknown) = (0i64, 0i64, 0i64);
        let mut connected = 0i64;
        for n in nodes {
            by_state[n.display_state() as usize] += 1;
            healthy += i64::from(n.gpus_healthy());
            let rest = i64::from(n.gpus_total() - n.gpus_healthy());
            if n.availability == Availability::Ready {
                unhealthy += rest;
            } else {
                unknown += rest;
            }
            connected += i64::from(n.session.is_some());
        }
        for (state, count) in NodeState::ALL.iter().zip(by_state) {
            self.nodes
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(count);
        }
        for (state, count) in [
            ("healthy", healthy),
            ("unhealthy", unhealthy),
            ("unknown", unknown),
        ] {
            self.gpus
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(count);
        }
        self.connected_agents.set(connected);
    }

    /// Refresh the job gauges and the restart counter from the jobs, and the goodput series
    /// of vigil's jobs and of the Slurm jobs vigil records.
    pub fn observe_jobs<'a>(
        &self,
        jobs: impl Iterator<Item = &'a Job>,
        slurm: &vigil_core::slurm::jobs::Ledger,
        now_unix_ms: u64,
    ) {
        let jobs: Vec<&Job> = jobs.collect();
        self.goodput
            .observe(jobs.iter().copied(), slurm, now_unix_ms);
        const STATES: [&str; 7] = [
            "Pending",
            "Running",
            "Restarting",
            "Succeeded",
            "Failed",
            "Cancelling",
            "Cancelled",
        ];
        let mut counts = [0i64; STATES.len()];
        self.checkpoint_age.clear();
        let mut series = 0;
        for job in jobs {
            if let Some(i) = STATES.iter().position(|s| *s == job.phase_name()) {
                counts[i] += 1;
            }
            // A job that never checkpointed counts from its first start, so
            // "checkpoint too old" fires for it too.
            let since = job
                .checkpoint
                .as_ref()
                .map(|c| c.seen_at_ms)
                .or_else(|| job.attempts.first().map(|a| a.started_at_ms));
            if let (JobPhase::Running, Some(since), true) =
                (job.phase, since, series < MAX_JOB_SERIES)
            {
                series += 1;
                let age = now_unix_ms.saturating_sub(since) / 1000;
                self.checkpoint_age
                    .get_or_create(&JobLabel {
                        job_id: job.id.clone(),
                    })
                    .set(i64::try_from(age).unwrap_or(i64::MAX));
            }
        }
        for (state, count) in STATES.iter().zip(counts) {
            self.jobs
                .get_or_create(&StateLabel {
                    state: (*state).to_owned(),
                })
                .set(count);
        }
    }

    /// Per-node condition series, touched only when a node's condition
    /// changes (the engine calls this on each change): with thousands of
    /// nodes, rewriting every series on every snapshot would cost more than
    /// the rest of the engine.
    pub fn observe_condition(&self, node: &str, condition: Condition) {
        let Ok(mut known) = self.conditions_seen.lock() else {
            return;
        };
        if known.get(node) == Some(&condition) {
            return;
        }
        known.insert(node.to_owned(), condition);
        for c in [
            Condition::Healthy,
            Condition::Degraded,
            Condition::Unhealthy,
        ] {
            self.node_condition
                .get_or_create(&NodeConditionLabel {
                    node: node.to_owned(),
                    condition: c.as_str().to_owned(),
                })
                .set(i64::from(condition == c));
        }
    }

    pub fn count_restart(&self, kind: &str, lost_ms: u64, fault_to_relaunch_ms: u64) {
        self.job_restarts
            .get_or_create(&ReasonLabel {
                reason: kind.to_owned(),
            })
            .inc();
        self.job_lost.observe(lost_ms as f64 / 1000.0);
        self.fault_to_relaunch
            .observe(fault_to_relaunch_ms as f64 / 1000.0);
    }

    pub fn count_transition(&self, to: Availability) {
        self.availability_transitions
            .get_or_create(&TransitionLabel {
                to: to.as_str().to_owned(),
            })
            .inc();
    }

    pub fn count_cordon(&self, source: &str, rule: &str) {
        self.cordons
            .get_or_create(&CordonLabel {
                source: source.to_owned(),
                rule: rule.to_owned(),
            })
            .inc();
    }

    pub fn count_xid(&self, xid: u32) {
        self.xid_errors
            .get_or_create(&XidLabel {
                xid: xid.to_string(),
            })
            .inc();
    }

    /// A heartbeat arrived; `compact`: it said GPU health is unchanged.
    pub fn heartbeat_received(&self, compact: bool) {
        if compact {
            self.heartbeats_compact.inc();
        } else {
            self.heartbeats_full.inc();
        }
    }

    pub fn count_diagnostics(&self, passed: bool) {
        let result = if passed { "pass" } else { "fail" };
        self.diagnostics
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn engine_alive(&self, now_unix_ms: u64) {
        self.engine_alive_unix_ms
            .store(now_unix_ms, Ordering::Relaxed);
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Serve `/metrics` and `/healthz` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

async fn healthz_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let last = m.engine_alive_unix_ms.load(Ordering::Relaxed);
    let age = unix_ms(SystemTime::now()).saturating_sub(last);
    if Duration::from_millis(age) > ENGINE_STALL {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("engine stalled: no loop for {age} ms\n"),
        )
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}
