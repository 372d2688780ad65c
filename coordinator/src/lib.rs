//! vigil coordinator: tracks every agent, owns cluster state, decides node health.
//!
//! Layout:
//! - `config`: the TOML configuration with its named defaults and validation.
//! - `node`: a node's persisted record (identity, GPUs, cordon) and observed availability.
//! - `liveness`: pure rule turning agent silence into Ready / Unreachable / Lost.
//! - `xid`: NVIDIA's XID catalog (shipped as data) and the class of each XID.
//! - `health`: pure GPU-health policy: samples and events -> findings -> condition.
//! - `state`: `ClusterState` and its pure transitions, returning `Effect`s.
//! - `lemons`: the pure lemon ledger: failures per host and GPU serial, blocklist.
//! - `lemon_watch`: which node changes are charged to it, and its cordons.
//! - `lemon_view`: the protocol's view of the ledger, for clusterctl.
//! - `jobspec`: the job spec (TOML) and its validation.
//! - `job`: a job's persisted record: spec, attempts, workers, checkpoint, history.
//! - `jobs`: pure job state machine and gang scheduler.
//! - `goodput`: pure goodput accounting: where a job's wall time went, ETTR,
//!   and the checkpoint interval Young's formula suggests.
//! - `goodput_metrics`: its Prometheus series.
//! - `job_view`: the protocol's view of a job, for clusterctl.
//! - `burn_in`: pure burn-in before a node joins or rejoins (`Validating`).
//! - `stragglers`: pure step-rate comparison within a gang: `Degraded: straggler`.
//! - `training_health`: pure loss / loss-scale policies of a job's training metrics.
//! - `rollback`: rolling a job back to an earlier checkpoint (unhealthy training, or an operator).
//! - `triage`: pure triage of unexplained failures: diagnose the gang, cordon who fails.
//! - `store`: the durable store: one backend trait, sled (default), etcd (HA), memory (tests);
//!   a turn's writes are staged, then committed once before anything is acknowledged.
//! - `ha`: several coordinators on etcd: election, fenced store, standby services.
//! - `leadership`: this coordinator's term (the fencing token) and until when it may act.
//! - `engine`: the single task that owns state and store, applies events, publishes snapshots.
//! - `agent_service`: the `AgentService.Connect` stream, one task per agent session.
//! - `limits`: every bound on agent and operator input, and the `[limits]` config.
//! - `validate`: pure validation of every agent message (also the fuzz targets' entry).
//! - `throttle`: the per-agent-stream rate limit (token buckets), pure.
//! - `assigned`: whether an agent's report concerns work assigned to its node.
//! - `input_metrics`: counters of rejected, throttled and ignored agent input.
//! - `control_service`: the `ControlService` clusterctl talks to.
//! - `control_streams`: its long-lived streams: `events --follow` and `job logs`.
//! - `metrics`: Prometheus metrics and the `/metrics` + `/healthz` HTTP server.
//! - `security_metrics`: refused connections, denied calls, certificate expiry.
//! - `audit`: who changed what, recorded in the node's or job's history.
//! - `access`: who a request comes from and whether their role allows the call.
//! - `notify`: systemd notifications (ready, status, watchdog fed by the engine loop, stopping).
//! - `error`: boundary errors and their single mapping to gRPC status.

// The decisions live in vigil-core; their modules keep their old paths here.
pub use vigil_core::{
    audit, burn_in, goodput, health, job, jobs, jobspec, lemon_watch, lemons, limits, liveness,
    node, rollback, state, stragglers, training_health, triage, validate, xid,
};

pub mod access;
pub mod agent_service;
pub mod assigned;
pub mod clock;
pub mod config;
pub mod control_service;
pub mod control_streams;
pub mod engine;
pub mod error;
pub mod goodput_metrics;
pub mod ha;
pub mod input_metrics;
pub mod job_view;
pub mod leadership;
pub mod lemon_view;
pub mod metrics;
pub mod notify;
pub mod security_metrics;
pub mod store;
pub mod throttle;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};
use vigil_proto::v1::{
    agent_service_server::AgentServiceServer, control_service_server::ControlServiceServer,
};

pub use config::Config;
pub use error::CoordinatorError;
pub use store::Store;

/// How long in-flight calls get to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Receives the server's TLS config and the metrics, for SIGHUP to swap certificates in.
pub type TlsLoaded = Box<dyn FnOnce(vigil_tls::ServerTls, Arc<metrics::Metrics>) + Send>;

/// Callbacks for the service manager (systemd's sd_notify in `main.rs`).
#[derive(Default)]
pub struct Hooks {
    /// Once the coordinator serves (engine running, listeners accepting).
    pub serving: Option<Box<dyn FnOnce() + Send>>,
    /// On every tick of the engine loop.
    pub engine_tick: Option<Box<dyn FnMut() + Send>>,
    /// Given the TLS config the server uses, so SIGHUP can swap its certificates.
    pub tls_loaded: Option<TlsLoaded>,
    /// Metrics to serve instead of new ones (HA: the standby's carry on when it leads).
    pub metrics: Option<Arc<metrics::Metrics>>,
    /// The coordinators and etcd (HA), for `clusterctl status`.
    pub ha: Option<Arc<ha::HaView>>,
}

/// Serve agents and operators on `grpc`, metrics on `metrics`, until `shutdown`.
pub async fn run(
    config: Config,
    store: Store,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    run_with_hooks(
        config,
        store,
        grpc,
        metrics_listener,
        shutdown,
        Hooks::default(),
    )
    .await
}

/// Loads the `[tls]` files of `config`: `None` when it is `insecure`.
pub fn load_tls(config: &Config) -> Result<Option<vigil_tls::ServerTls>, vigil_tls::TlsError> {
    match &config.tls {
        Some(files) => Ok(Some(vigil_tls::ServerTls::new(
            files.server_config(SystemTime::now())?,
        ))),
        None => Ok(None),
    }
}

/// Exports whether the coordinator is insecure and when its certificate expires; warns
/// loudly about plaintext.
pub fn observe_transport(config: &Config, metrics: &metrics::Metrics) {
    let security = &metrics.security;
    security.insecure.set(i64::from(config.insecure));
    if config.insecure {
        warn!(
            "INSECURE: serving plaintext gRPC (insecure = true): nobody is authenticated and \
             anyone who reaches this port can cordon nodes and run code on every agent; use \
             [tls] outside a local test cluster (docs/security.md)"
        );
    }
    if let Some(files) = &config.tls {
        match vigil_tls::files::not_after(&files.cert) {
            Ok(t) => {
                security.certificate_expiry.set(t);
            }
            Err(e) => warn!(error = %e, "cannot read the certificate's expiry"),
        }
    }
}

/// [`run`], calling `hooks` as the coordinator comes up and runs.
pub async fn run_with_hooks(
    config: Config,
    store: Store,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut hooks: Hooks,
) -> Result<(), CoordinatorError> {
    let started = metrics::unix_ms(SystemTime::now());
    // HA: the standby's metrics carry on, its transport already observed (and warned about).
    let carried = hooks.metrics.take();
    let observed = carried.is_some();
    let metrics = carried.unwrap_or_else(|| Arc::new(metrics::Metrics::new(started)));
    let leadership = store.leadership().clone();
    metrics.ha.leader.set(1);
    metrics.ha.with_backend(store.backend());
    metrics
        .ha
        .term
        .set(i64::try_from(leadership.term()).unwrap_or(i64::MAX));
    if hooks.ha.is_none() {
        metrics.ha.etcd_quorum.set(1);
    }
    config.validate_transport()?;
    let tls = load_tls(&config)?;
    if !observed {
        observe_transport(&config, &metrics);
    }
    if let (Some(tls), Some(loaded)) = (&tls, hooks.tls_loaded.take()) {
        loaded(tls.clone(), metrics.clone());
    }
    let term = store.leadership().term();
    let (mut engine, handle) = engine::Engine::new(store, &config, metrics.clone())?;
    let metrics_for_control = metrics.clone();
    let metrics_for_agents = metrics.clone();
    if let Some(tick) = hooks.engine_tick.take() {
        engine = engine.on_tick(tick);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let engine_task = tokio::spawn(engine.run(stop_rx.clone()));

    let grpc_addr = grpc.local_addr().unwrap_or(config.listen);
    let mut metrics_stop = stop_rx.clone();
    let metrics_task = tokio::spawn(metrics::serve(
        metrics_listener,
        metrics.clone(),
        async move {
            engine::stopped(&mut metrics_stop).await;
        },
    ));

    let max = vigil_proto::MAX_MESSAGE_BYTES;
    let agents = AgentServiceServer::new(agent_service::AgentService::new(
        handle.clone(),
        metrics_for_agents,
        config.limits.rates(),
        term,
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let control = ControlServiceServer::new(
        control_service::ControlService::new(
            handle,
            metrics_for_control,
            grpc_addr,
            config.diagnostics.timeout,
            config.insecure,
        )
        .with_ha(hooks.ha.take()),
    )
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let mut server_stop = stop_rx;
    let refusals = metrics.clone();
    let incoming = vigil_tls::incoming(
        grpc,
        tls,
        Arc::new(move |r: vigil_tls::Refusal| {
            refusals
                .security
                .connections_refused
                .get_or_create(&security_metrics::RefusalLabel {
                    reason: r.as_str().to_owned(),
                })
                .inc();
        }),
    );
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(agents)
        .add_service(control)
        .serve_with_incoming_shutdown(incoming, async move {
            engine::stopped(&mut server_stop).await;
        });
    tokio::pin!(server);
    if let Some(serving) = hooks.serving.take() {
        serving();
    }

    let result = tokio::select! {
        r = &mut server => r.map_err(CoordinatorError::from),
        () = shutdown => {
            info!("shutting down: flushing state and closing agent streams");
            stop_tx.send(true).ok();
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r.map_err(CoordinatorError::from),
                Err(_) => {
                    warn!("gRPC server did not stop within {}s; exiting anyway", SHUTDOWN_GRACE.as_secs());
                    Ok(())
                }
            }
        }
    };
    stop_tx.send(true).ok();
    engine_task.await.ok();
    metrics_task.abort();
    result
}
