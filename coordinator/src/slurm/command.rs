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
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    // Both pipes at once: a command that fills one while we wait on the other must not stall.
    let read = async {
        let out = async {
            let mut out = String::new();
            if let Some(stdout) = stdout {
                stdout
                    .take(MAX_OUTPUT_BYTES)
                    .read_to_string(&mut out)
                    .await?;
            }
            Ok::<_, std::io::Error>(out)
        };
        let err = async {
            let mut err = Vec::new();
            if let Some(stderr) = stderr {
                stderr.take(MAX_ERROR_BYTES).read_to_end(&mut err).await?;
            }
            Ok::<_, std::io::Error>(err)
        };
        let (out, err) = tokio::try_join!(out, err)?;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config(timeout: Duration) -> SlurmConfig {
        SlurmConfig {
            command_timeout: timeout,
            ..SlurmConfig::default()
        }
    }

    #[tokio::test]
    async fn output_comes_back_and_a_failure_carries_its_stderr() {
        let c = config(Duration::from_secs(20));
        let out = run(&c, "sh", &["-c", "echo 'n1|idle|none'"]).await;
        assert_eq!(out.ok().as_deref(), Some("n1|idle|none\n"));
        let err = run(&c, "sh", &["-c", "echo 'Invalid node name' >&2; exit 1"]).await;
        let message = err.map_or_else(|e| e.to_string(), |o| format!("succeeded: {o}"));
        assert!(message.contains("Invalid node name"), "{message}");
    }

    #[tokio::test]
    async fn a_hung_command_is_killed_at_the_timeout() {
        let c = config(Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        let err = run(&c, "sleep", &["30"]).await;
        assert!(matches!(err, Err(SlurmError::Timeout { .. })), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_missing_command_names_the_setting_to_fix() {
        let c = SlurmConfig {
            bin_dir: "/nonexistent/slurm/bin".into(),
            ..config(Duration::from_secs(5))
        };
        let message = run(&c, "scontrol", &["ping"])
            .await
            .map_or_else(|e| e.to_string(), |o| format!("succeeded: {o}"));
        assert!(message.contains("slurm.bin_dir"), "{message}");
    }
}
