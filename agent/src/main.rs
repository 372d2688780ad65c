//! `vigil-agent` binary: flags, config and signals around [`vigil_agent::run_with_hooks`];
//! tells systemd how it goes (ready, status, stopping) and re-reads the config on SIGHUP.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use vigil_agent::cli::Cli;
use vigil_agent::config::{ConfigError, Coordinators};
use vigil_agent::fabric::{self, FabricReader};
use vigil_agent::gpu::{self, GpuError};
use vigil_agent::session::Registration;
use vigil_agent::{AgentConfig, Hooks, error_chain};

/// EX_USAGE from sysexits.h: the command was used incorrectly.
const EXIT_USAGE: u8 = 64;
/// EX_UNAVAILABLE from sysexits.h: `--check-gpus` found no GPU backend (no NVIDIA driver).
const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    // The per-attempt shim and its guard are this binary too (agent/src/shim), started by the
    // agent with these first arguments; they run no agent.
    match std::env::args_os().nth(1).as_ref().and_then(|a| a.to_str()) {
        Some("shim") => return vigil_agent::shim::main(),
        Some("shim-guard") => return vigil_agent::shim::guard_main(),
        _ => {}
    }
    agent_main()
}

#[tokio::main]
async fn agent_main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not mistakes.
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if cli.print_man {
        return match Cli::man_page()
            .and_then(|page| std::io::Write::write_all(&mut std::io::stdout(), &page))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vigil-agent: writing the man page: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = &cli.check_config {
        return check_config(path);
    }
    let config = if cli.check_gpus {
        cli.clone().into_gpu_config()
    } else if cli.check_fabric {
        cli.clone().into_fabric_config()
    } else {
        cli.clone().into_config()
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vigil-agent: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_tracing();
    if cli.check_gpus {
        return check_gpus(&config, cli.json).await;
    }
    if cli.check_fabric {
        return check_fabric(&config, cli.json);
    }
    // Before anything slow: SIGHUP's default action would kill the agent.
    let (term, int, hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(term), Ok(int), Ok(hup)) => (term, int, hup),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("vigil-agent: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(reload_on_sighup(hup, cli, config.clone()));
    let coordinators = config.coordinator.clone();
    let hooks = Hooks {
        ready: Some(Box::new(|summary| {
            notify(&[NotifyState::Ready, NotifyState::Status(summary)]);
        })),
        registered: Some(Box::new(move |registration| {
            let status = registration_status(&coordinators, registration);
            notify(&[NotifyState::Status(&status)]);
        })),
    };
    match vigil_agent::run_with_hooks(config, shutdown_signal(term, int), hooks).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-agent: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// systemd's STATUS for a registration change: which coordinator, or that none answers.
/// A single coordinator keeps the short form (`registered with URL`).
fn registration_status(coordinators: &Coordinators, registration: Option<&Registration>) -> String {
    match (registration, coordinators.is_group()) {
        (Some(r), false) => format!("registered with {}", r.url),
        (Some(r), true) => format!("registered with coordinator {r}"),
        (None, false) => format!("coordinator {coordinators} unreachable, retrying"),
        (None, true) => format!("no leader among coordinators {coordinators}, retrying"),
    }
}

/// `--check-config FILE`: the same checks as start-up, nothing started.
fn check_config(path: &Path) -> ExitCode {
    match Cli::check_config(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        // Read and parse errors name the file already.
        Err(e @ ConfigError::Invalid { .. }) => {
            eprintln!("vigil-agent: {}: {e}", path.display());
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("vigil-agent: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `--check-gpus`: one read of the configured backend, printed; nothing else started.
async fn check_gpus(config: &AgentConfig, json: bool) -> ExitCode {
    let config = config.clone();
    let read = tokio::task::spawn_blocking(move || {
        let probe = gpu::open(&config)?;
        gpu::check::run(probe.as_ref())
    })
    .await;
    let report = match read {
        Ok(Ok(report)) => report,
        Ok(Err(e @ GpuError::NvmlUnavailable { .. })) => {
            eprintln!("vigil-agent: --check-gpus: {}", error_chain(&e));
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        Ok(Err(e)) => {
            eprintln!("vigil-agent: --check-gpus: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("vigil-agent: --check-gpus: the GPU read panicked or was cancelled: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&gpu::check::render_json(&report)) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("vigil-agent: --check-gpus --json: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", gpu::check::render_text(&report));
    }
    ExitCode::SUCCESS
}

/// `--check-fabric`: one read of the watched fabric ports, printed; nothing else started.
/// Missing files are absent values, so the read itself cannot fail.
fn check_fabric(config: &AgentConfig, json: bool) -> ExitCode {
    let reader = FabricReader::new(&config.sysfs_root, &config.fabric);
    let ports = reader.read();
    if json {
        match serde_json::to_string_pretty(&fabric::check::render_json(&reader, &ports)) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("vigil-agent: --check-fabric --json: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", fabric::check::render_text(&reader, &ports));
    }
    ExitCode::SUCCESS
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn shutdown_signal(mut term: Signal, mut int: Signal) {
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "signal received");
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping workers"),
    ]);
}

/// On every SIGHUP: re-read the config file (flags still override it), check the TLS
/// files (read again at every connection, so renewed ones apply at the next one without
/// dropping the open stream) and report what else would change. An invalid file never
/// stops the agent.
async fn reload_on_sighup(mut hup: Signal, cli: Cli, running: AgentConfig) {
    while hup.recv().await.is_some() {
        let Some(path) = cli.config.clone() else {
            info!("SIGHUP: started without --config; nothing to re-read");
            continue;
        };
        let file = path.display();
        match cli.clone().into_config() {
            Ok(new) => {
                if let Some(files) = &new.tls {
                    match files.client_config(std::time::SystemTime::now()) {
                        Ok(_) => info!(
                            cert = %files.cert.display(),
                            "SIGHUP: TLS files re-read and valid; the next connection uses \
                             them, the open stream stays"
                        ),
                        Err(e) => warn!(
                            "SIGHUP: TLS files invalid; the next connection will fail until they are fixed: {e}"
                        ),
                    }
                }
                let changed = running.changed_keys(&new);
                if changed.is_empty() {
                    info!("SIGHUP: config {file} re-read and valid; nothing changed");
                } else {
                    let changed = changed.join(", ");
                    warn!(
                        changed,
                        "SIGHUP: config {file} re-read and valid; changes to {changed} need a \
                         restart (only the contents of the [tls] files apply at run time)"
                    );
                }
            }
            Err(e) => warn!("SIGHUP: keeping the running configuration: {e}"),
        }
    }
}

/// Sends `states` to systemd; a no-op when `NOTIFY_SOCKET` is unset.
fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_coordinator_registered_with() {
        let one = Coordinators::from("http://c1:7770");
        let group = Coordinators::from_flag("http://c1:7770,http://c2:7770");
        let at = Registration {
            url: "http://c2:7770".into(),
            name: "c2".into(),
            term: 9,
        };
        assert_eq!(
            registration_status(&one, Some(&at)),
            "registered with http://c2:7770"
        );
        assert_eq!(
            registration_status(&one, None),
            "coordinator http://c1:7770 unreachable, retrying"
        );
        assert_eq!(
            registration_status(&group, Some(&at)),
            "registered with coordinator c2 (http://c2:7770) at term 9"
        );
        assert_eq!(
            registration_status(&group, None),
            "no leader among coordinators http://c1:7770,http://c2:7770, retrying"
        );
    }
}
