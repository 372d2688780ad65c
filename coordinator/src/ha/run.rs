//! A coordinator in an HA group: stand by until elected, then lead until
//! leadership is lost or the process is asked to stop.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};
use vigil_proto::v1::{
    agent_service_server::AgentServiceServer, control_service_server::ControlServiceServer,
};

use super::HaView;
use super::election::{self, CoordinatorRecord};
use super::standby::{StandbyAgents, StandbyControl};
use super::store::EtcdStore;
use crate::metrics::{self, Metrics};
use crate::{Config, CoordinatorError, Hooks, Store};

/// How a coordinator of an HA group stopped.
#[derive(Debug)]
pub enum HaEnd {
    /// Asked to (SIGTERM): as leader, it resigned first, so a standby takes over at once.
    Shutdown,
    /// It led and lost leadership: exit, and let the service manager start a standby.
    LeadershipLost(String),
}

type Tick = Arc<Mutex<Option<Box<dyn FnMut() + Send>>>>;

/// Runs one coordinator of the group: serves as a standby (agents and
/// clusterctl are sent to the leader) while campaigning; once elected, loads
/// the state from etcd and runs exactly like a coordinator that restarted.
pub async fn run_ha(
    config: Config,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut hooks: Hooks,
) -> Result<HaEnd, CoordinatorError> {
    let Some(ha) = config.ha.clone() else {
        return Err(CoordinatorError::Config(
            crate::config::ConfigError::Invalid("run_ha needs an [ha] section".into()),
        ));
    };
    config.validate_transport()?;
    let started_unix_ms = metrics::unix_ms(SystemTime::now());
    let metrics = Arc::new(Metrics::new(started_unix_ms));
    crate::observe_transport(&config, &metrics);
    let me = CoordinatorRecord {
        name: ha.name.clone(),
        url: ha.advertise_url.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at_unix_ms: started_unix_ms,
    };
    let view = Arc::new(HaView::new(me.clone()).with_metrics(&metrics.ha));
    let client = super::etcd::connect(&ha)
        .await
        .map_err(|e| CoordinatorError::Ha(e.to_string()))?;
    info!(
        coordinator = %ha.name,
        url = %ha.advertise_url,
        etcd = %ha.etcd_endpoints.join(","),
        prefix = %ha.prefix,
        "HA coordinator starting as a standby; campaigning for leadership"
    );
    let background = [
        tokio::spawn(election::stay_present(
            client.clone(),
            ha.clone(),
            me.clone(),
        )),
        tokio::spawn(election::watch_health(
            client.clone(),
            ha.clone(),
            view.clone(),
        )),
    ];
    let abort_background = || {
        for task in &background {
            task.abort();
        }
    };

    // Standby: serve on copies of the listeners, so the leader can take them over.
    let grpc_std = grpc.into_std().map_err(|e| io_error(&config, e))?;
    let metrics_std = metrics_listener
        .into_std()
        .map_err(|e| io_error(&config, e))?;
    let listen = grpc_std.local_addr().unwrap_or(config.listen);
    let (stop_standby, standby_stopped) = watch::channel(false);
    let standby_grpc = serve_standby(
        &config,
        clone_listener(&grpc_std, &config)?,
        listen,
        view.clone(),
        standby_stopped.clone(),
        metrics.clone(),
    )?;
    let mut metrics_stop = standby_stopped.clone();
    let standby_metrics = tokio::spawn(metrics::serve(
        clone_listener(&metrics_std, &config)?,
        metrics.clone(),
        async move {
            crate::engine::stopped(&mut metrics_stop).await;
        },
    ));
    let tick: Tick = Arc::new(Mutex::new(hooks.engine_tick.take()));
    let standby_tick = {
        let tick = tick.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                metrics.engine_alive(metrics::unix_ms(SystemTime::now()));
                if let Some(f) = tick.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    f();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    if let Some(serving) = hooks.serving.take() {
        serving();
    }
    crate::notify::status(&format!("standby {}: campaigning", ha.name));

    tokio::pin!(shutdown);
    let won = tokio::select! {
        won = election::campaign(&client, &ha, &view) => won,
        () = &mut shutdown => {
            info!("shutting down as a standby");
            stop_standby.send(true).ok();
            standby_tick.abort();
            abort_background();
            return Ok(HaEnd::Shutdown);
        }
    };
    let leadership = won.leadership.clone();
    let elected_at = Instant::now();
    // From here on this coordinator leads, for as long as the lease holds.
    let keeper = tokio::spawn(election::keep_leading(
        client.clone(),
        ha.clone(),
        won.lease,
        leadership.clone(),
    ));
    stop_standby.send(true).ok();
    standby_tick.abort();
    standby_grpc.await.ok();
    standby_metrics.await.ok();
    let loaded = Instant::now();
    let store = match EtcdStore::open(client.clone(), &ha, leadership.clone()).await {
        Ok(s) => Store::on_etcd(s),
        Err(e) => {
            keeper.abort();
            abort_background();
            resign(&client, won.lease).await;
            return Err(e.into());
        }
    };
    metrics
        .ha
        .observe("etcd", "load", loaded.elapsed().as_secs_f64());
    crate::notify::status(&format!("leader {} at term {}", ha.name, leadership.term()));
    hooks.engine_tick = Some(Box::new(move || {
        if let Some(f) = tick.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            f();
        }
    }));
    hooks.metrics = Some(metrics.clone());
    hooks.ha = Some(view.clone());
    info!(
        term = leadership.term(),
        took_ms = elected_at.elapsed().as_millis() as u64,
        "leading: state loaded, serving agents and operators"
    );
    let lost = leadership.clone();
    let stop = async move {
        tokio::select! {
            () = &mut shutdown => {}
            reason = lost.lost() => {
                warn!(%reason, "leadership lost: stopping at once, writing nothing more");
            }
        }
    };
    let result = crate::run_with_hooks(
        config.clone(),
        store,
        TcpListener::from_std(grpc_std).map_err(|e| io_error(&config, e))?,
        TcpListener::from_std(metrics_std).map_err(|e| io_error(&config, e))?,
        stop,
        hooks,
    )
    .await;
    keeper.abort();
    abort_background();
    metrics.ha.leader.set(0);
    if let Some(reason) = leadership.lost_reason() {
        return Ok(HaEnd::LeadershipLost(reason));
    }
    // A clean stop: hand over now rather than after the lease runs out.
    resign(&client, won.lease).await;
    result.map(|()| HaEnd::Shutdown)
}

/// Revokes the leader lease: the leader key goes, and a standby is elected at once.
async fn resign(client: &etcd_client::Client, lease: i64) {
    let mut c = client.clone();
    match tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(lease)).await {
        Ok(Ok(_)) => info!("resigned leadership: a standby takes over now"),
        _ => warn!("could not resign leadership; a standby takes over when the lease runs out"),
    }
}

fn io_error(config: &Config, source: std::io::Error) -> CoordinatorError {
    CoordinatorError::Bind {
        addr: config.listen,
        what: "gRPC",
        flag: "--listen",
        source,
    }
}

fn clone_listener(
    l: &std::net::TcpListener,
    config: &Config,
) -> Result<TcpListener, CoordinatorError> {
    let copy = l.try_clone().map_err(|e| io_error(config, e))?;
    copy.set_nonblocking(true)
        .map_err(|e| io_error(config, e))?;
    TcpListener::from_std(copy).map_err(|e| io_error(config, e))
}

fn serve_standby(
    config: &Config,
    grpc: TcpListener,
    listen: std::net::SocketAddr,
    view: Arc<HaView>,
    mut stopped: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>, CoordinatorError> {
    let tls = crate::load_tls(config)?;
    let max = vigil_proto::MAX_MESSAGE_BYTES;
    let agents = AgentServiceServer::new(StandbyAgents { view: view.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let control = ControlServiceServer::new(StandbyControl {
        view,
        listen,
        insecure: config.insecure,
        started: Instant::now(),
        started_unix_ms: metrics::unix_ms(SystemTime::now()),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let control = tonic::service::interceptor::InterceptedService::new(
        control,
        crate::api::client_version::check,
    );
    let incoming = vigil_tls::incoming(grpc, tls, metrics.security.handshake_observer());
    let server = tonic::transport::Server::builder()
        .add_service(agents)
        .add_service(control)
        .serve_with_incoming_shutdown(incoming, async move {
            crate::engine::stopped(&mut stopped).await;
        });
    Ok(tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!(error = %e, "standby gRPC server failed");
        }
    }))
}
