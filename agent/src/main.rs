//! `vigil-agent` binary: flags, config and signals around [`vigil_agent::run`].

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::info;
use tracing_subscriber::EnvFilter;
use vigil_agent::cli::Cli;
use vigil_agent::error_chain;

/// EX_USAGE from sysexits.h: the command was used incorrectly.
const EXIT_USAGE: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
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
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vigil-agent: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_tracing();
    let signals = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vigil-agent: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    match vigil_agent::run(config, shutdown_signal(signals)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-agent: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn shutdown_signal((mut term, mut int): (Signal, Signal)) {
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "signal received");
}
