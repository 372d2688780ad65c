//! vigil agent: the hands of the cluster on one GPU node.
//!
//! # Layout
//! - [`config`]: the TOML config, its defaults and validation.
//! - [`cli`]: command-line flags layered over the config.
//! - [`gpu`]: the [`gpu::GpuProbe`] trait, with NVML and simulated backends
//!   (the simulator's fault file, NVML's XID event thread).
//! - [`evidence`]: a hung attempt's evidence (process stacks, kernel state, log tail, fabric
//!   deltas), captured before its worker is stopped.
//! - [`fabric`]: the InfiniBand/RoCE ports and network interfaces, read from sysfs (under
//!   `--sysfs-root`) at every heartbeat; `--check-fabric`; a fake tree for tests.
//! - [`fabric_metrics`]: the fabric's counters and states, named as node_exporter names them.
//! - [`events`]: XID, lost-GPU and diagnostics events, queued until a session sends them.
//! - [`diagnostics`]: the coordinator's `RunDiagnostics`: a configured command or the built-in self-check.
//! - [`link`]: the reconnect loop that keeps a session with the coordinator alive, and finds
//!   the leader among several coordinators.
//! - [`session`]: one session: dial, register, heartbeat, send events at once, obey commands, watch the lease.
//! - [`term`]: fencing by term: messages from a deposed leader are ignored; the highest term is kept on disk.
//! - [`store_mark`]: the highest store mark the coordinator told, kept on disk and sent in every
//!   `Register`, so a coordinator whose data dir was rolled back is exposed.
//! - [`lease`]: how long the agent may go without hearing from the coordinator.
//! - [`backoff`]: reconnect delays (exponential, full jitter), pure.
//! - [`metrics`]: Prometheus metrics and the `/metrics` + `/healthz` endpoint.
//! - [`gpu_metrics`]: the per-GPU gauges (dcgm-exporter names and labels), encoded from the latest sample.
//! - [`workers`]: the job workers on this node: one process group per (job, attempt),
//!   spawned, stopped, fenced by the lease, recorded for the next agent, progress polled.
//! - [`shim`]: the per-attempt supervisor (`vigil-agent shim`) that runs each worker, outlives
//!   the agent, holds the fence by the lease file, and records the worker's exit.
//! - [`checkpoint`]: the newest complete checkpoint of a job, per layout (crate `vigil-checkpoint`,
//!   shared with clusterctl); reported by node rank 0.

pub mod backoff;
pub use vigil_checkpoint as checkpoint;
pub mod cli;
pub mod config;
pub mod diagnostics;
pub mod events;
pub mod evidence;
pub mod fabric;
pub mod fabric_metrics;
pub mod gpu;
pub mod gpu_metrics;
pub mod identity;
pub mod lease;
pub mod link;
pub mod metrics;
pub mod remediation;
pub mod session;
pub mod shim;
pub mod store_mark;
pub mod term;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

pub use config::AgentConfig;

use crate::config::GpuBackendKind;
use crate::diagnostics::Diagnostics;
use crate::gpu::{GpuBackend, GpuInfo, GpuProbe, backend_label};
use crate::metrics::Metrics;
use crate::session::{Registration, SessionContext};
use crate::store_mark::StoreWitness;
use crate::term::TermFence;
use crate::workers::{Workers, WorkersConfig};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
    #[error("cannot create state directory {path}; pass --state-dir with a writable directory")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for metrics on {addr}; pass --metrics-listen with a free address")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics server failed")]
    MetricsServe(#[source] std::io::Error),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

/// Called once the agent is up, with a one-line summary.
pub type ReadyHook = Box<dyn FnOnce(&str) + Send>;
/// Called with the coordinator once registered with it, `None` once the session is lost.
pub type RegisteredHook = Box<dyn FnMut(Option<&Registration>) + Send>;

/// Callbacks for the service manager (systemd's sd_notify in `main.rs`).
#[derive(Default)]
pub struct Hooks {
    /// Once the GPU backend is open and the metrics listener bound.
    /// Never waits for the coordinator, which may be down.
    pub ready: Option<ReadyHook>,
    /// When registration with the coordinator changes.
    pub registered: Option<RegisteredHook>,
}

/// Runs the agent until `shutdown` resolves, binding the metrics listener from the config.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_with_hooks(config, shutdown, Hooks::default()).await
}

/// [`run`], calling `hooks` as the agent comes up and its registration changes.
pub async fn run_with_hooks(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
    hooks: Hooks,
) -> Result<(), AgentError> {
    let span = agent_span(&config);
    async {
        let prepared = prepare(&config).await?;
        let addr = config.metrics_listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::MetricsListen { addr, source })?;
        serve(config, prepared, listener, shutdown, hooks).await
    }
    .instrument(span)
    .await
}

/// Like [`run`], with a listener the caller bound (tests use `127.0.0.1:0`).
pub async fn run_with_listener(
    config: AgentConfig,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let span = agent_span(&config);
    async {
        let prepared = prepare(&config).await?;
        serve(
            config,
            prepared,
            metrics_listener,
            shutdown,
            Hooks::default(),
        )
        .await
    }
    .instrument(span)
    .await
}

/// Every log line carries the node and backend, so simulated GPUs are never mistaken for real ones.
fn agent_span(config: &AgentConfig) -> tracing::Span {
    let backend = match config.gpu_backend {
        GpuBackendKind::Nvml => GpuBackend::Nvml,
        GpuBackendKind::Sim => GpuBackend::Simulated,
    };
    info_span!("agent", node = %config.node_name, gpu_backend = backend_label(backend))
}

/// Everything that can fail at start-up, checked before the agent touches the network.
async fn prepare(config: &AgentConfig) -> Result<Prepared, AgentError> {
    config.validate()?;
    let probe = gpu::open(config)?;
    let inventory = probe.inventory()?;
    let gpus = inventory.len();
    match probe.backend() {
        GpuBackend::Simulated => {
            warn!(
                gpus,
                "GPU backend is SIMULATED: no real hardware is monitored"
            );
        }
        _ if gpus == 0 => warn!("NVML found no GPUs on this host"),
        _ => info!(gpus, "GPU inventory read through NVML"),
    }
    if let (Some(path), GpuBackend::Nvml) = (&config.sim_fault_file, probe.backend()) {
        warn!(
            path = %path.display(),
            "sim_fault_file only applies to --gpu-backend sim; ignored with real GPUs"
        );
    }
    create_state_dir(&config.state_dir).await?;
    Ok(Prepared { probe, inventory })
}

struct Prepared {
    probe: Arc<dyn GpuProbe>,
    /// At start-up: labels the GPU metrics and is what diagnostics expect to find;
    /// each session re-reads the inventory it registers.
    inventory: Vec<GpuInfo>,
}

async fn create_state_dir(path: &Path) -> Result<(), AgentError> {
    tokio::fs::create_dir_all(path)
        .await
        .map_err(|source| AgentError::StateDir {
            path: path.to_owned(),
            source,
        })
}

async fn serve(
    config: AgentConfig,
    Prepared { probe, inventory }: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    hooks: Hooks,
) -> Result<(), AgentError> {
    let hostname = config::hostname();
    let host = identity::load(config.identity.machine_id.as_deref(), &config.state_dir).await?;
    let metrics = Metrics::new(backend_label(probe.backend()), &inventory, &hostname);
    let fence = Arc::new(TermFence::load(&config.state_dir).await);
    metrics.set_term(fence.highest());
    let store = Arc::new(StoreWitness::load(&config.state_dir).await);
    metrics.set_store_seq(store.kept().await.map_or(0, |m| m.seq));
    let (sink, events) = events::channel(metrics.clone());
    Arc::clone(&probe).start_events(sink.clone());
    let confinement = workers::confine::Confinement {
        run_as: config.workers.run_as.clone(),
        allowed_roots: config.workers.allowed_roots.clone(),
    };
    for warning in confinement.startup_warnings(workers::confine::agent_uid()) {
        warn!("{warning}");
    }
    let workers = Workers::start(
        WorkersConfig {
            state_dir: config.state_dir.clone(),
            stop_grace: config.worker_stop_grace,
            lease_stop_grace: config.lease_stop_grace,
            confine: confinement,
            shim_program: config
                .shim_program
                .clone()
                .unwrap_or_else(|| PathBuf::from("/proc/self/exe")),
        },
        sink.clone(),
    );
    let metrics_addr = listener.local_addr().map_err(AgentError::MetricsServe)?;
    // Held here; the metrics server stops when this side sends.
    let (stop_tx, mut stop_rx) = watch::channel(());
    let server = tokio::spawn(
        metrics::serve(listener, metrics.clone(), Arc::clone(&probe), async move {
            let _ = stop_rx.changed().await;
        })
        .in_current_span(),
    );
    info!(
        version = env!("CARGO_PKG_VERSION"),
        coordinator = %config.coordinator,
        metrics = %metrics_addr,
        state_dir = %config.state_dir.display(),
        "vigil-agent started"
    );
    if let Some(ready) = hooks.ready {
        ready(&format!(
            "{} GPUs ({}); metrics on {metrics_addr}; connecting to {}",
            inventory.len(),
            backend_label(probe.backend()),
            config.coordinator
        ));
    }
    let (registration_tx, registration_rx) = watch::channel(None);
    let registration = hooks
        .registered
        .map(|hook| tokio::spawn(watch_registration(registration_rx, hook).in_current_span()));
    let remediation = Arc::new(remediation::Remediator::new(
        config.remediation.clone(),
        sink.clone(),
    ));
    let evidence_sink = sink.clone();
    let diagnostics = Arc::new(Diagnostics {
        probe: Arc::clone(&probe),
        expected: inventory,
        command: config.diagnostics_command.clone(),
        sink,
    });
    if config.insecure {
        warn!(
            coordinator = %config.coordinator,
            "INSECURE: plaintext link to the coordinator (insecure = true): this agent cannot \
             tell the coordinator from an impostor and runs what it is told; use [tls] outside a \
             local test cluster (docs/security.md)"
        );
    }
    let fabric_reader = fabric::FabricReader::new(&config.sysfs_root, &config.fabric);
    let ctx = SessionContext {
        coordinators: config.coordinator.clone(),
        tls: config.tls.clone(),
        tls_sessions: Arc::default(),
        node_name: config.node_name.clone(),
        hostname,
        identity: host,
        probe,
        fabric: fabric_reader.clone(),
        evidence: evidence::Evidence::new(
            workers.clone(),
            fabric_reader,
            config.state_dir.clone(),
            evidence_sink,
        ),
        metrics,
        diagnostics,
        remediation,
        workers: workers.clone(),
        launch: config.workers.launch,
        fence,
        store,
        registration: registration_tx,
    };
    // Dropping the link at shutdown drops `events`, which stops the event sources.
    tokio::select! {
        () = link::run(ctx, events, config.reconnect) => {}
        () = shutdown => info!("shutting down"),
    }
    if let Some(task) = registration {
        task.abort();
    }
    workers.shutdown(config.keep_workers_on_shutdown).await;
    let _ = stop_tx.send(());
    match server.await {
        Ok(result) => result.map_err(AgentError::MetricsServe),
        Err(join) => Err(AgentError::MetricsServe(std::io::Error::other(join))),
    }
}

/// Calls `hook` whenever the session's registration changes (registered with another
/// coordinator, or lost); runs until aborted or the link ends.
async fn watch_registration(
    mut registration: watch::Receiver<Option<Registration>>,
    mut hook: RegisteredHook,
) {
    let mut last: Option<Registration> = None;
    while registration.changed().await.is_ok() {
        let now = registration.borrow_and_update().clone();
        if now != last {
            hook(now.as_ref());
            last = now;
        }
    }
}

/// Sleeps until `at`, forever when there is none: a `select!` branch for an optional deadline.
pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Wall-clock time for messages and samples, unix milliseconds: a record, never a deadline.
/// Every timeout, lease and backoff is on `tokio::time::Instant`, so a step of the host's clock
/// changes no decision (DESIGN.md, "Time"; tests/tests/clock_step.rs steps it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An error and its causes on one line, for log fields and the exit message.
///
/// Some errors (libloading's, through NVML's) repeat their cause in their own
/// message; a cause the line already ends with is not written twice.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Plain(#[source] std::io::Error);

    #[test]
    fn error_chain_names_every_cause_once() {
        let io = || std::io::Error::other("inner");
        assert_eq!(error_chain(&Plain(io())), "outer: inner");
        assert_eq!(error_chain(&Repeats(io())), "outer: inner");
    }
}
