//! Running a job's `[checkpoint] verify_command` on one candidate checkpoint, before a relaunch
//! resumes from it: as the job's user (the same [`Confinement`](super::confine::Confinement) as
//! its workers), in its resolved workdir, with the spec's env and `VIGIL_CHECKPOINT`, the
//! candidate's path also appended as the last argument. The command gets a process group of its
//! own, killed whole at the timeout. Exit 0: the checkpoint is good. Its stdout and stderr go to
//! one pipe, of which the last [`MAX_OUTPUT`] bytes are kept, for the coordinator's event.
//! A job's `[preflight] command` runs the same way (`Verifier::run`, no checkpoint).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Command;

use super::confine::Identity;
use super::group;

/// The variable naming the candidate checkpoint.
pub const CHECKPOINT_VAR: &str = "VIGIL_CHECKPOINT";
/// Most bytes of the command's output kept (its tail).
pub const MAX_OUTPUT: usize = 4096;
/// How long the output is still read after the command exited (a background process it left
/// may hold the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// How to verify candidates of one job.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub argv: Vec<String>,
    pub timeout: Duration,
    /// The job's workdir, symlinks resolved.
    pub workdir: PathBuf,
    pub env: BTreeMap<String, String>,
    /// `None`: the agent's own user (as the confinement allows).
    pub identity: Option<Identity>,
}

/// A candidate that did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// `exited with code 3`, `killed by signal 9`, `timed out after 5m`.
    pub why: String,
    /// The tail of its stdout and stderr.
    pub output: String,
}

impl Verifier {
    /// `argv` run as the job's user (the confinement's), in `workdir` resolved within the
    /// allowed roots, with `env`; `Err` names what the confinement refused.
    pub fn confined(
        confine: &super::confine::Confinement,
        argv: &[String],
        workdir: &str,
        env: &std::collections::HashMap<String, String>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let identity = confine
            .identity(super::confine::agent_uid())
            .map_err(|e| e.to_string())?;
        let workdir = confine
            .inside("workdir", workdir)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            argv: argv.to_vec(),
            timeout,
            workdir,
            env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            identity,
        })
    }

    /// Verify the checkpoint at `path` (as the job names it). `Err`: the command could not be
    /// run at all (no such program, ...), which says nothing about the checkpoint.
    pub async fn verify(&self, path: &str) -> Result<Result<(), Failed>, String> {
        self.run(Some(path)).await
    }

    /// Run the command (with `checkpoint` appended and in [`CHECKPOINT_VAR`], when given).
    /// `Err`: it could not be run at all.
    pub async fn run(&self, checkpoint: Option<&str>) -> Result<Result<(), Failed>, String> {
        let program = self.argv.first().map(String::as_str).unwrap_or_default();
        let cannot =
            |what: &str, e: &dyn std::fmt::Display| format!("cannot {what} {program:?}: {e}");
        let (reader, writer) = nix::unistd::pipe().map_err(|e| cannot("open a pipe for", &e))?;
        let writer2 = writer
            .try_clone()
            .map_err(|e| cannot("open a pipe for", &e))?;
        let mut cmd = Command::new(program);
        cmd.args(self.argv.iter().skip(1)).envs(&self.env);
        if let Some(path) = checkpoint {
            cmd.arg(path).env(CHECKPOINT_VAR, path);
        }
        cmd
            // The agent's systemd notification socket is not the job's.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2))
            .process_group(0)
            .kill_on_drop(true);
        if let Some(id) = &self.identity {
            // std clears the supplementary groups (setgroups(0)) before setuid.
            cmd.uid(id.uid)
                .gid(id.gid)
                .env("HOME", &id.home)
                .env("USER", &id.name);
        }
        let spawned = cmd.spawn();
        // The command holds the pipe's write ends until dropped: the reader sees EOF only then.
        drop(cmd);
        let mut child = spawned.map_err(|e| cannot("start", &e))?;
        let output = read_tail(reader);
        let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let status = match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(status) => status.map_err(|e| cannot("wait for", &e))?,
            Err(_) => {
                // Not reaped yet: the group id is still its own.
                group::signal_group(pgid, Signal::SIGKILL);
                let _ = child.wait().await;
                return Ok(Err(Failed {
                    why: format!(
                        "timed out after {}",
                        humantime::format_duration(self.timeout)
                    ),
                    output: output_of(output).await,
                }));
            }
        };
        if status.success() {
            return Ok(Ok(()));
        }
        let why = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => format!("ended with {status}"),
        };
        Ok(Err(Failed {
            why,
            output: output_of(output).await,
        }))
    }
}

/// Reads the pipe to its end on a thread of its own, keeping the last [`MAX_OUTPUT`] bytes.
fn read_tail(reader: std::os::fd::OwnedFd) -> tokio::sync::oneshot::Receiver<String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut file = std::fs::File::from(reader);
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > MAX_OUTPUT {
                        tail.drain(..tail.len() - MAX_OUTPUT);
                    }
                }
            }
        }
        let _ = tx.send(tail_text(&tail));
    });
    rx
}

/// `bytes` as text of at most [`MAX_OUTPUT`] bytes, a character cut in two at the start dropped.
fn tail_text(bytes: &[u8]) -> String {
    crate::diagnostics::tail(&String::from_utf8_lossy(bytes), MAX_OUTPUT)
}

async fn output_of(rx: tokio::sync::oneshot::Receiver<String>) -> String {
    match tokio::time::timeout(OUTPUT_GRACE, rx).await {
        Ok(Ok(text)) => text,
        _ => "(output unavailable: a process the command started still holds it)".to_owned(),
    }
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
