//! `vigil-coordinator`: parse flags and config, open the store, bind, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use vigil_coordinator::{Config, CoordinatorError, Store};

/// EX_USAGE from sysexits.h: the configuration is invalid.
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "vigil-coordinator",
    version,
    about = "vigil coordinator: tracks agents, decides node health"
)]
struct Cli {
    /// TOML configuration file; flags override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// gRPC address for agents and clusterctl [default: 0.0.0.0:7770].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// HTTP address for /metrics and /healthz [default: 0.0.0.0:9770].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Directory of the state store [default: /var/lib/vigil].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn load_config(cli: Cli) -> Result<Config, vigil_coordinator::config::ConfigError> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(a) = cli.listen {
        config.listen = a;
    }
    if let Some(a) = cli.metrics_listen {
        config.metrics_listen = a;
    }
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    config.validate()?;
    Ok(config)
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<TcpListener, CoordinatorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr,
            what,
            flag,
            source,
        })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
    }
}

async fn start(config: Config) -> Result<(), CoordinatorError> {
    let store = Store::open(&config.data_dir)?;
    let grpc = bind(config.listen, "gRPC", "--listen").await?;
    let metrics = bind(config.metrics_listen, "metrics", "--metrics-listen").await?;
    let grpc_addr = grpc.local_addr().unwrap_or(config.listen);
    let metrics_addr = metrics.local_addr().unwrap_or(config.metrics_listen);
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, data_dir = %config.data_dir.display(), "coordinator serving");
    // One line on stdout for scripts and tests that started us on port 0.
    println!(
        "vigil-coordinator {} serving grpc={grpc_addr} metrics={metrics_addr} data_dir={}",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display()
    );
    vigil_coordinator::run(config, store, grpc, metrics, shutdown_signal()).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = match load_config(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vigil-coordinator: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vigil-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(start(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
