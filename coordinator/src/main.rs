//! `vigil-coordinator`: parse flags and config, open the store, bind, run;
//! tell systemd how it goes (ready, watchdog, stopping) and re-read the config on SIGHUP.

/// mimalloc instead of glibc's malloc (docs/scale-analysis.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use vigil_coordinator::config::ConfigError;
use vigil_coordinator::error::EXIT_DATAERR;
use vigil_coordinator::ha::EXIT_LEADERSHIP_LOST;
use vigil_coordinator::ha::run::{HaEnd, run_ha};
use vigil_coordinator::metrics::Metrics;
use vigil_coordinator::metrics::security::ResultLabel;
use vigil_coordinator::notify::{self, Watchdog};
use vigil_coordinator::{Config, CoordinatorError, Hooks, Store, observe_transport};
use vigil_tls::ServerTls;

/// EX_USAGE from sysexits.h: the configuration is invalid.
const EXIT_USAGE: u8 = 64;

/// What `--help` says after the flags: most settings have none.
const CONFIG_FILE_HELP: &str = "\
Everything else is set in the --config file (TOML), not by flags: TLS ([tls]: the cluster CA, \
certificate and key), high availability ([ha]: etcd), the policies ([liveness], [health], \
[lemons], [triage], [burn_in], [stragglers], [diagnostics], [limits]) and scheduled backups \
([backup]). Every key with its default: docs/configuration.md; an example file with every key: \
deploy/config/coordinator.toml.";

#[derive(Parser, Debug)]
#[command(
    name = "vigil-coordinator",
    version,
    about = "vigil coordinator: tracks agents, decides node health",
    after_help = CONFIG_FILE_HELP,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Serve plaintext gRPC: no authentication, anyone who reaches --listen can cordon
    /// nodes and run code on them. For a local demo or test cluster only.
    #[arg(long)]
    insecure: bool,
    /// Start on a damaged state store from what is still valid: the damaged files are kept
    /// aside, every lost record is listed, every node is held cordoned for review and no job
    /// starts until `clusterctl recovery confirm` (docs/failure-handling.md). Without it, a
    /// damaged store stops the start with exit 65.
    #[arg(long)]
    recover: bool,
    /// Validate FILE and exit: 0 printing "FILE: ok", or 64 with the error.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Print this program's man page (roff) to stdout and exit; scripts/package.sh uses it.
    #[arg(long, hide = true, exclusive = true)]
    print_man: bool,
}

/// Commands on a data dir; without one, the coordinator runs.
#[derive(Subcommand, Debug)]
enum Command {
    /// Write a checked snapshot of the state store to FILE; safe while the coordinator runs
    /// (it takes no lock). Prints one line: path, store id, commit seq, records, bytes.
    Backup {
        /// The coordinator's data dir (data_dir in its config).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Where the backup goes: a file name, written under a temporary name first.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Install a backup as the state store of DIR, under a new store id. Stop the
    /// coordinator first; what DIR held is moved to DIR/replaced-<unix ms>/, never deleted.
    Restore {
        /// The backup file (from `vigil-coordinator backup` or the [backup] schedule).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The coordinator's data dir (data_dir in its config); created if missing.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

/// `backup` and `restore`: one line on stdout, or the error; exit 65 when a backup or the
/// store is damaged, 1 on any other failure.
fn run_command(command: &Command) -> ExitCode {
    use vigil_coordinator::store::backup;
    let (name, result) = match command {
        Command::Backup {
            data_dir,
            to,
            force,
        } => (
            "backup",
            backup::backup(data_dir, to, *force).map(|b| b.to_string()),
        ),
        Command::Restore { from, data_dir } => (
            "restore",
            backup::restore(from, data_dir).map(|r| r.to_string()),
        ),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vigil-coordinator {name}: {e}");
            ExitCode::from(if e.is_damage() { EXIT_DATAERR } else { 1 })
        }
    }
}

/// The config file (if any) with the flags applied over it, validated; on
/// SIGHUP the same flags apply again over the re-read file.
fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
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
    if let Some(d) = &cli.data_dir {
        config.data_dir.clone_from(d);
    }
    if cli.insecure {
        config.insecure = true;
    }
    config.validate()?;
    config.validate_transport()?;
    Ok(config)
}

/// Connections the kernel queues before the coordinator accepts them. After a restart every
/// agent of the cluster dials within a few seconds; with tokio's default (1,024) the excess SYNs
/// are dropped and each dropped one costs its agent a 1 s SYN retransmit, then 3 s, eating its
/// lease. The kernel caps it at `net.core.somaxconn` (4,096 by default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 65_535;

fn bind(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<TcpListener, CoordinatorError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| CoordinatorError::Bind {
        addr,
        what,
        flag,
        source,
    })
}

/// SIGTERM and SIGINT stop the coordinator; SIGHUP re-reads its config.
/// Installed first thing: SIGHUP's default action would kill the process.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

async fn shutdown_signal(mut term: Signal, mut int: Signal) {
    tokio::select! {
        _ = term.recv() => info!("received SIGTERM"),
        _ = int.recv() => info!("received SIGINT"),
    }
    notify::stopping();
}

/// The TLS config the server uses, once it runs, for SIGHUP to swap certificates in.
type TlsSlot = Arc<Mutex<Option<(ServerTls, Arc<Metrics>)>>>;

/// Re-reads the `[tls]` files into the running server: new connections get them, open
/// streams keep theirs. On any error the certificates in use stay.
fn reload_tls(slot: &TlsSlot, new: &Config) -> Option<String> {
    let guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    let ((tls, metrics), Some(files)) = (guard.as_ref()?, &new.tls) else {
        return None;
    };
    let result = vigil_coordinator::server_tls_config(files, new);
    let label = ResultLabel {
        result: if result.is_ok() { "ok" } else { "error" }.to_owned(),
    };
    metrics.security.tls_reloads.get_or_create(&label).inc();
    Some(match result {
        Ok(config) => {
            tls.replace(config);
            observe_transport(new, metrics);
            info!(
                cert = %files.cert.display(),
                "SIGHUP: TLS certificate, key and CA re-read; new connections use them, open \
                 streams keep theirs"
            );
            "TLS certificates re-read".to_owned()
        }
        Err(e) => {
            warn!("SIGHUP: keeping the TLS certificates in use: {e}");
            "TLS files invalid, kept the ones in use (see the log)".to_owned()
        }
    })
}

/// On every SIGHUP: re-read the config file (flags still override it), re-read the TLS
/// files, and report what else would change (those keys are read at start only). An
/// invalid file never stops the coordinator. `serving` heads the systemd status line.
async fn reload_on_sighup(
    mut hup: Signal,
    cli: Cli,
    running: Config,
    serving: String,
    tls: TlsSlot,
) {
    while hup.recv().await.is_some() {
        notify::reloading();
        let Some(path) = &cli.config else {
            info!("SIGHUP: started without --config; nothing to re-read");
            notify::ready(&format!("{serving}; SIGHUP: no config file to re-read"));
            continue;
        };
        let file = path.display();
        let status = match load_config(&cli) {
            Ok(new) => {
                let tls_status = reload_tls(&tls, &new);
                let changed = running
                    .changed_keys(&new)
                    .into_iter()
                    .filter(|k| *k != "tls" || tls_status.is_none())
                    .collect::<Vec<_>>()
                    .join(", ");
                let serving = match &tls_status {
                    Some(t) => format!("{serving}; {t}"),
                    None => serving.clone(),
                };
                if changed.is_empty() {
                    info!("SIGHUP: config {file} re-read and valid; nothing changed");
                    format!("{serving}; config re-read, unchanged")
                } else {
                    warn!(
                        changed,
                        "SIGHUP: config {file} re-read and valid; changes to {changed} need a \
                         restart (only the [tls] files are re-read at run time)"
                    );
                    format!("{serving}; config re-read: {changed} changed, restart to apply")
                }
            }
            Err(e) => {
                warn!("SIGHUP: keeping the running configuration: {e}");
                format!("{serving}; config {file} invalid, kept the running one (see the log)")
            }
        };
        notify::ready(&status);
    }
}

async fn start(cli: Cli, config: Config, signals: Signals) -> Result<u8, CoordinatorError> {
    // Certificates first: a bad or expired one stops the start, naming the file.
    vigil_coordinator::load_tls(&config)?;
    if cli.recover && config.ha.is_some() {
        return Err(CoordinatorError::Ha(
            "--recover applies to a single coordinator's data dir; with [ha] the state is in \
             etcd: restore an etcd snapshot instead (docs/operations.md, \"Backing up etcd\")"
                .into(),
        ));
    }
    // With [ha] the state lives in etcd, read once this coordinator is elected.
    let store = match &config.ha {
        Some(_) => None,
        None if cli.recover => Some(Store::open_recover(&config.data_dir)?),
        None => Some(Store::open(&config.data_dir)?),
    };
    let known_nodes = store
        .as_ref()
        .map_or(0, |s| s.load_nodes().map_or(0, |n| n.len()));
    let grpc = bind(config.listen, "gRPC", "--listen")?;
    let metrics = bind(config.metrics_listen, "metrics", "--metrics-listen")?;
    let grpc_addr = grpc.local_addr().unwrap_or(config.listen);
    let metrics_addr = metrics.local_addr().unwrap_or(config.metrics_listen);
    let state = match &config.ha {
        Some(ha) => format!("etcd={}{}", ha.etcd_endpoints.join(","), ha.prefix),
        None => format!("data_dir={}", config.data_dir.display()),
    };
    info!(grpc = %grpc_addr, metrics = %metrics_addr, %state, "coordinator serving");
    // One line on stdout for scripts and tests that started us on port 0.
    println!(
        "vigil-coordinator {} serving grpc={grpc_addr} metrics={metrics_addr} {state}",
        env!("CARGO_PKG_VERSION"),
    );
    let serving = format!("serving on {grpc_addr}");
    let tls_slot = TlsSlot::default();
    tokio::spawn(reload_on_sighup(
        signals.hup,
        cli,
        config.clone(),
        serving.clone(),
        tls_slot.clone(),
    ));
    let mut hooks = Hooks {
        serving: Some(Box::new(move || {
            notify::ready(&format!("{serving}; {known_nodes} nodes known"));
        })),
        engine_tick: None,
        tls_loaded: Some(Box::new(move |tls, metrics| {
            *tls_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((tls, metrics));
        })),
        metrics: None,
        ha: None,
    };
    if let Some(mut watchdog) = Watchdog::from_env() {
        info!(interval = ?watchdog.interval(), "systemd watchdog on: the engine loop feeds it");
        hooks.engine_tick = Some(Box::new(move || watchdog.tick()));
    }
    let shutdown = shutdown_signal(signals.term, signals.int);
    let Some(store) = store else {
        return match run_ha(config, grpc, metrics, shutdown, hooks).await? {
            HaEnd::Shutdown => Ok(0),
            HaEnd::LeadershipLost(reason) => {
                eprintln!(
                    "vigil-coordinator: leadership lost ({reason}); exiting so that the service \
                     manager starts this coordinator again as a standby"
                );
                Ok(EXIT_LEADERSHIP_LOST)
            }
        };
    };
    vigil_coordinator::run_with_hooks(config, store, grpc, metrics, shutdown, hooks).await?;
    Ok(0)
}

/// `--check-config FILE`: the same checks as start-up, nothing started.
fn check_config(path: &Path) -> ExitCode {
    match Config::from_file(path).and_then(|c| c.validate_transport().map(|()| c)) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vigil-coordinator: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The man page (roff), made from the flags above.
fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory;
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    Ok(page)
}

/// `--print-man`: the man page on stdout.
fn print_man() -> ExitCode {
    match man_page().and_then(|page| std::io::Write::write_all(&mut std::io::stdout(), &page)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-coordinator: writing the man page: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_man {
        return print_man();
    }
    if let Some(path) = &cli.check_config {
        return check_config(path);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    if let Some(command) = &cli.command {
        return run_command(command);
    }
    let config = match load_config(&cli) {
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
    let result = runtime.block_on(async {
        let signals =
            Signals::install().map_err(|e| anyhow!("cannot install signal handlers: {e}"))?;
        start(cli, config, signals)
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Every message already ends with its cause.
            eprintln!("vigil-coordinator: {e}");
            let damaged = e
                .downcast_ref::<CoordinatorError>()
                .is_some_and(CoordinatorError::is_damaged_store);
            if damaged {
                ExitCode::from(EXIT_DATAERR)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_page_names_the_coordinator_its_flags_and_commands_but_not_itself() {
        let page = String::from_utf8(man_page().expect("renders")).expect("utf-8");
        assert!(page.contains(".TH vigil-coordinator 1"), "{page}");
        assert!(
            page.contains(".SH NAME\nvigil\\-coordinator \\- "),
            "{page}"
        );
        for flag in ["check\\-config", "data\\-dir", "recover"] {
            assert!(
                page.contains(&format!("\\fB\\-\\-{flag}\\fR")),
                "no {flag}: {page}"
            );
        }
        assert!(page.contains("vigil\\-coordinator\\-backup(1)"), "{page}");
        assert!(
            !page.contains("print\\-man"),
            "the hidden flag shows: {page}"
        );
        let cli = Cli::try_parse_from(["vigil-coordinator", "--print-man"]).expect("parses");
        assert!(cli.print_man);
        assert!(Cli::try_parse_from(["vigil-coordinator", "--print-man", "--insecure"]).is_err());
    }
}
