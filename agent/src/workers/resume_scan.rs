//! The coordinator's `ScanCheckpoints`, before a relaunch: the newest complete checkpoint in a
//! job's checkpoint directory, by the same completeness rules as the watcher of a running worker.
//! A writer cut off from the coordinator may have completed one that nobody reported; the
//! relaunch resumes from it. The directory must lie under `workers.allowed_roots`, as for a start.
//!
//! With a `verify_command`, complete candidates are tried newest first (at most
//! [`MAX_CANDIDATES`]; with a tracker file only the tracked one), each verified
//! ([`super::verify`]) as the job's user in its workdir; the first that passes is the answer, the
//! ones that failed are `rejected`. When none passes, `newest` is empty and `error` names them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};
use vigil_proto::v1::{CheckpointScan, CheckpointSeen, RejectedCheckpoint, ScanCheckpoints};

use super::confine::Confinement;
use super::verify::Verifier;
use crate::checkpoint::{self, Checkpoint, Layout};

/// Most candidates one scan verifies (the coordinator's budget allows each its timeout).
pub const MAX_CANDIDATES: usize = 3;
/// A verification's limit when the coordinator sends none, and its most.
const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_VERIFY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Scan as `scan` asks. The directory is read on the blocking pool (a hung network file system
/// blocks a blocking thread, nothing else); verifications run as child processes.
pub async fn run(confine: std::sync::Arc<Confinement>, scan: ScanCheckpoints) -> CheckpointScan {
    let mut answer = CheckpointScan {
        job_id: scan.job_id.clone(),
        attempt: scan.attempt,
        newest: None,
        error: String::new(),
        rejected: Vec::new(),
    };
    let outcome = if scan.verify_command.is_empty() {
        let s = scan.clone();
        blocking(move || newest(&confine, &s)).await
    } else {
        verified(confine, &scan, &mut answer.rejected).await
    };
    match outcome {
        Ok(newest) => {
            info!(
                job_id = %scan.job_id,
                attempt = scan.attempt,
                found = newest.as_ref().map_or("none", |c| c.path.as_str()),
                rejected = answer.rejected.len(),
                "checkpoint directory scanned before the relaunch"
            );
            answer.newest = newest;
        }
        Err(e) => {
            warn!(job_id = %scan.job_id, attempt = scan.attempt, error = %e, "checkpoint scan failed");
            answer.error = e;
        }
    }
    answer
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("checkpoint scan task failed: {e}")))
}

/// The directory `scan` names, resolved within the allowed roots, and its layout.
fn locate(confine: &Confinement, scan: &ScanCheckpoints) -> Result<(PathBuf, Layout), String> {
    let layout: Layout = scan
        .checkpoint_layout
        .parse()
        .map_err(|e: checkpoint::UnknownLayout| e.to_string())?;
    let resolved = confine
        .inside("checkpoint_dir", &scan.checkpoint_dir)
        .map_err(|e| e.to_string())?;
    Ok((resolved, layout))
}

/// The gang's world size the scan was given, if any.
fn world(scan: &ScanCheckpoints) -> Option<u32> {
    (scan.world_size > 0).then_some(scan.world_size)
}

fn newest(confine: &Confinement, scan: &ScanCheckpoints) -> Result<Option<CheckpointSeen>, String> {
    let (resolved, layout) = locate(confine, scan)?;
    let found = checkpoint::latest_complete_with(&resolved, layout, world(scan))
        .map_err(|e| format!("cannot scan {}: {e}", resolved.display()))?;
    Ok(found.map(|found| seen(scan, &resolved, layout, &found)))
}

/// `found` as reported: named under the directory the spec gave (symlinks unresolved), as the
/// watcher names it, with its save's timing.
fn seen(
    scan: &ScanCheckpoints,
    resolved: &Path,
    layout: Layout,
    found: &Checkpoint,
) -> CheckpointSeen {
    let timing = checkpoint::save_timing(resolved, found, layout);
    let path = found.path.strip_prefix(resolved).map_or_else(
        |_| found.path.clone(),
        |rest| Path::new(&scan.checkpoint_dir).join(rest),
    );
    CheckpointSeen {
        job_id: scan.job_id.clone(),
        attempt: scan.attempt,
        path: path.display().to_string(),
        step: found.step,
        save_ms: timing.map(|(ms, _)| ms),
        completed_at_unix_ms: timing.map(|(_, at)| at),
    }
}

/// The newest candidate that passes the verify_command; the ones that failed go in `rejected`.
async fn verified(
    confine: std::sync::Arc<Confinement>,
    scan: &ScanCheckpoints,
    rejected: &mut Vec<RejectedCheckpoint>,
) -> Result<Option<CheckpointSeen>, String> {
    let s = scan.clone();
    let c = std::sync::Arc::clone(&confine);
    let (verifier, candidates) = blocking(move || {
        let (resolved, layout) = locate(&c, &s)?;
        let verifier = verifier(&c, &s)?;
        let candidates =
            checkpoint::complete_candidates(&resolved, layout, MAX_CANDIDATES, world(&s))
                .map_err(|e| format!("cannot scan {}: {e}", resolved.display()))?;
        let candidates: Vec<CheckpointSeen> = candidates
            .iter()
            .map(|c| seen(&s, &resolved, layout, c))
            .collect();
        Ok((verifier, candidates))
    })
    .await?;
    for candidate in candidates {
        let outcome = verifier.verify(&candidate.path).await.map_err(|e| {
            // Says nothing about the checkpoints: none is rejected for it.
            rejected.clear();
            format!("cannot run verify_command on {}: {e}", candidate.path)
        })?;
        match outcome {
            Ok(()) => {
                info!(job_id = %scan.job_id, attempt = scan.attempt, checkpoint = %candidate.path, "checkpoint passed verify_command");
                return Ok(Some(candidate));
            }
            Err(failed) => {
                warn!(job_id = %scan.job_id, attempt = scan.attempt, checkpoint = %candidate.path, why = %failed.why, "checkpoint failed verify_command");
                rejected.push(RejectedCheckpoint {
                    path: candidate.path,
                    step: candidate.step,
                    output: failed.output,
                    why: crate::diagnostics::truncate(failed.why, MAX_WHY),
                });
            }
        }
    }
    if rejected.is_empty() {
        return Ok(None);
    }
    let tried: Vec<String> = rejected
        .iter()
        .map(|r| format!("{} ({})", r.path, r.why))
        .collect();
    Err(crate::diagnostics::truncate(
        format!(
            "no checkpoint passed verify_command: tried {}",
            tried.join(", ")
        ),
        MAX_ERROR,
    ))
}

/// Most bytes of a rejection's `why`, and of the answer's `error` (the coordinator's limits).
const MAX_WHY: usize = 200;
const MAX_ERROR: usize = 4000;

/// How `scan`'s candidates are verified: as the job's user, in its resolved workdir.
fn verifier(confine: &Confinement, scan: &ScanCheckpoints) -> Result<Verifier, String> {
    let timeout = match Duration::from_millis(scan.verify_timeout_ms) {
        d if d.is_zero() => DEFAULT_VERIFY_TIMEOUT,
        d => d.min(MAX_VERIFY_TIMEOUT),
    };
    Verifier::confined(
        confine,
        &scan.verify_command,
        &scan.workdir,
        &scan.env,
        timeout,
    )
}
