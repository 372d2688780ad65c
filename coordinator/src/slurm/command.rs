//! Slurm's commands run as child processes: with a time limit, output read to a bound, and an
//! error that names the command and what it said.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::process::Command;

use super::config::SlurmConfig;

/// Most bytes of a command's stdout read (a `squeue` of a large cluster fits with room).
pub const MAX_OUTPUT_BYTES: u64 = 16 << 20;
/// Most bytes of stderr kept for the error message.
const MAX_ERROR_BYTES: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error(
        "cannot run {program} ({source}); install Slurm's client commands or set slurm.bin_dir"
    )]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} took longer than slurm.command_timeout ({timeout:?}) and was killed")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("reading {program}'s output: {source}")]
    Read {
        program: String,
        source: std::io::Error,
    },
}

/// Runs `program args` as `config` says; its stdout when it exits 0.
pub async fn run(config: &SlurmConfig, program: &str, args: &[&str]) -> Result<String, SlurmError> {
    let path = if config.bin_dir.as_os_str().is_empty() {
        Path::new(program).to_owned()
    } else {
        config.bin_dir.join(program)
    };
    let mut command = Command::new(&path);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if !config.slurm_conf.as_os_str().is_empty() {
        command.env("SLURM_CONF", &config.slurm_conf);
    }
    let mut child = command.spawn().map_err(|source| SlurmError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    let read = async {
        let (mut out, mut err) = (String::new(), Vec::new());
        if let Some(stdout) = child.stdout.take() {
            stdout
                .take(MAX_OUTPUT_BYTES)
                .read_to_string(&mut out)
                .await?;
        }
        if let Some(stderr) = child.stderr.take() {
            stderr.take(MAX_ERROR_BYTES).read_to_end(&mut err).await?;
        }
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(config.command_timeout, read)
        .await
        .map_err(|_| SlurmError::Timeout {
            program: program.to_owned(),
            timeout: config.command_timeout,
        })?
        .map_err(|source| SlurmError::Read {
            program: program.to_owned(),
            source,
        })?;
    if !status.success() {
        return Err(SlurmError::Failed {
            program: program.to_owned(),
            status,
            stderr: String::from_utf8_lossy(&err).trim().to_owned(),
        });
    }
    Ok(out)
}
