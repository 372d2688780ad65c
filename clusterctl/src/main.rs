//! `clusterctl`: the operators' command-line tool for a vigil cluster.
//!
//! Layout:
//! - `cli`: the command line (clap), a contract with docs and tests.
//! - `client`: the coordinator's calls, and gRPC failures turned into one-line errors.
//! - `dial`: which coordinator answers: the `--coordinator` list in order, a standby's leader
//!   hint followed, one error line naming every address when none answers.
//! - `feed`: reads a server stream, within a time limit unless following.
//! - `checkpoint`: `checkpoint latest`, read from the filesystem with the agent's validator.
//! - `commands`: one function per subcommand; calls the coordinator and picks the output.
//! - `follow`: `events` and `job logs`, printed as the coordinator streams them.
//! - `watch`: `status --watch`.
//! - `model`: the stable JSON model, mapped from the vigil.v1 prost types.
//! - `render`: text views of the model (status screen, node tables, node detail, diagnostics,
//!   events, logs).
//! - `table`: aligned tables and human units (ages, durations, times, GiB).
//! - `term`: the terminal: colour and width only on a TTY, writing as output arrives, Ctrl-C.

mod checkpoint;
mod cli;
mod client;
mod commands;
mod dial;
mod feed;
mod follow;
#[cfg(test)]
mod golden;
mod model;
mod render;
mod table;
mod term;
mod watch;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if std::env::args_os().skip(1).eq(["--print-man"]) {
        return match cli::man_page() {
            Ok(page) => write_stdout(&String::from_utf8_lossy(&page))
                .map_or_else(|code| code, |()| ExitCode::SUCCESS),
            Err(e) => fail(&anyhow::Error::from(e).context("rendering the man page")),
        };
    }
    let cli = cli::Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(commands::run(cli)));
    match result {
        Ok(outcome) => match (write_stdout(&outcome.stdout), outcome.failure) {
            (Ok(()), Some(failure)) => fail(&anyhow::anyhow!(failure)),
            (Ok(()), None) => ExitCode::SUCCESS,
            (Err(code), _) => code,
        },
        Err(err) => fail(&err),
    }
}

/// Writes stdout; `Err` carries the exit code of a failed write.
fn write_stdout(text: &str) -> Result<(), ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        // `clusterctl nodes | head` closes the pipe early; that is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(fail(&anyhow::Error::from(e).context("writing to stdout"))),
    }
}

/// One line on stderr, `error: ` first, so scripts and people both read it.
fn fail(err: &anyhow::Error) -> ExitCode {
    let line = table::sanitize(&format!("{err:#}"));
    eprintln!("error: {line}");
    ExitCode::FAILURE
}
