//! vigil coordinator: tracks every agent, owns cluster state, decides node health.
//!
//! The shell around `vigil-core`: every decision (liveness, GPU health, jobs, lemons, burn-in,
//! triage, stragglers, rollback, goodput, input validation) is made there, purely; this crate
//! reads the clock, talks to agents and operators, keeps the store, and carries decisions out.
//! See docs/architecture.md for the path of one XID through both.
//!
//! Layout:
//! - `engine/`: the single task that owns the state and the store: feeds inputs to
//!   `vigil_core::step`/`tick`, commits each turn once, then carries out the effects.
//! - `api/`: the gRPC services (agent and control), access, the rate limit, protocol views.
//! - `store/`: the durable store: one backend trait, SQLite (default; checksummed, checked at open), etcd (HA), memory (tests);
//!   a turn's writes are staged, then committed once before anything is acknowledged.
//! - `ha/`: several coordinators on etcd: election, standby services, status.
//! - `metrics/`: Prometheus metrics and the `/metrics` + `/healthz` HTTP server.
//! - `clock`: the one clock the engine reads (monotonic for deadlines, wall for records).
//! - `config`: the TOML configuration with its named defaults and validation (embeds the
//!   settings of vigil-core's policies).
//! - `slurm/`: the Slurm adapter (`[slurm]`): drains, resumes and requeues through `scontrol`.
//! - `leadership`: this coordinator's term (the fencing token) and until when it may act.
//! - `notify`: systemd notifications (ready, status, watchdog fed by the engine loop, stopping).
//! - `error`: boundary errors and their single mapping to gRPC status.

// The decisions live in vigil-core and the services in `api`; their modules keep their old
// paths here, so `crate::state`, `crate::agent_service`, ... read as before.
pub use api::{
    access, agent_service, breaker_view, control_service, control_streams, job_view, lemon_view,
    node_view, recovery_view, throttle,
};
pub use vigil_core::{
    audit, breaker, burn_in, goodput, health, job, jobs, jobspec, lemon_watch, lemons, limits,
    liveness, node, remediation, rollback, state, stragglers, training_health, triage, validate,
    xid,
};

pub mod api;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod ha;
pub mod leadership;
pub mod metrics;
pub mod notify;
pub mod slurm;
pub mod store;

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
        Some(files) => Ok(Some(vigil_tls::ServerTls::new(server_tls_config(
            files, config,
        )?))),
        None => Ok(None),
    }
}

/// The server config for `files`, issuing session tickets sealed with the keys in the data
/// dir (`tls-ticket-keys`), so that agents resume their sessions after a restart. Before the
/// data dir exists (the check of the files at start-up), keys in memory.
pub fn server_tls_config(
    files: &vigil_tls::TlsFiles,
    config: &Config,
) -> Result<Arc<vigil_tls::ServerConfig>, vigil_tls::TlsError> {
    let tickets = config
        .data_dir
        .is_dir()
        .then_some(config.data_dir.as_path());
    files.server_config_resuming(SystemTime::now(), tickets)
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
    // Scheduled backups and the scrub: a single coordinator's SQLite store only (config
    // refuses [backup] with [ha]; etcd checks its own data).
    let backup_dir = (store.backend() == "sqlite").then(|| store.path().to_owned());
    let (mut engine, handle) = engine::Engine::new(store, &config, metrics.clone())?;
    // After a --recover open: the hold is durable before anything is served.
    engine.commit_recovery_hold().await?;
    let metrics_for_control = metrics.clone();
    let metrics_for_agents = metrics.clone();
    if let Some(tick) = hooks.engine_tick.take() {
        engine = engine.on_tick(tick);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut engine_task = tokio::spawn(engine.run(stop_rx.clone()));
    if let Some(data_dir) = &backup_dir {
        store::scrub::schedule(data_dir.clone(), metrics.clone(), stop_rx.clone());
    }
    if let (Some(backup), Some(data_dir)) = (config.backup.clone(), backup_dir) {
        store::backup::schedule(backup, data_dir, metrics.clone(), stop_rx.clone());
    }
    let admin_drains = config
        .slurm
        .clone()
        .map(|slurm| slurm::spawn(slurm, handle.clone(), metrics.clone(), stop_rx.clone()));

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
        .with_ha(hooks.ha.take())
        .with_slurm_drains(admin_drains),
    )
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let control = tonic::service::interceptor::InterceptedService::new(
        control,
        crate::api::client_version::check,
    );
    let mut server_stop = stop_rx;
    let incoming = vigil_tls::incoming(grpc, tls, metrics.security.handshake_observer());
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

    // Set when the engine ended on its own (a damaged store): the coordinator stops serving.
    let mut engine_ended = None;
    let result = tokio::select! {
        r = &mut server => r.map_err(CoordinatorError::from),
        ended = &mut engine_task => {
            engine_ended = Some(ended);
            stop_tx.send(true).ok();
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                warn!("gRPC server did not stop within {}s; exiting anyway", SHUTDOWN_GRACE.as_secs());
            }
            Ok(())
        }
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
    let ended = match engine_ended {
        Some(ended) => ended,
        None => engine_task.await,
    };
    metrics_task.abort();
    match ended {
        // The engine's error (a damaged store: exit 65) comes first.
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(())) => result,
        Err(e) => {
            warn!(error = %e, "engine task failed");
            result
        }
    }
}
