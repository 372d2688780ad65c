//! The coordinator's `ScanCheckpoints`, before a relaunch: the newest complete checkpoint in a
//! job's checkpoint directory, by the same completeness rules as the watcher of a running worker.
//! A writer cut off from the coordinator may have completed one that nobody reported; the
//! relaunch resumes from it. The directory must lie under `workers.allowed_roots`, as for a start.

use std::path::Path;

use tracing::{info, warn};
use vigil_proto::v1::{CheckpointScan, CheckpointSeen, ScanCheckpoints};

use super::confine::Confinement;
use crate::checkpoint::{self, Layout};

/// Scan as `scan` asks (blocking: run it off the async threads).
pub fn run(confine: &Confinement, scan: &ScanCheckpoints) -> CheckpointScan {
    let mut answer = CheckpointScan {
        job_id: scan.job_id.clone(),
        attempt: scan.attempt,
        newest: None,
        error: String::new(),
    };
    match newest(confine, scan) {
        Ok(newest) => {
            info!(
                job_id = %scan.job_id,
                attempt = scan.attempt,
                found = newest.as_ref().map_or("none", |c| c.path.as_str()),
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

fn newest(confine: &Confinement, scan: &ScanCheckpoints) -> Result<Option<CheckpointSeen>, String> {
    let layout: Layout = scan
        .checkpoint_layout
        .parse()
        .map_err(|e: checkpoint::UnknownLayout| e.to_string())?;
    let resolved = confine
        .inside("checkpoint_dir", &scan.checkpoint_dir)
        .map_err(|e| e.to_string())?;
    let world = (scan.world_size > 0).then_some(scan.world_size);
    let found = checkpoint::latest_complete_with(&resolved, layout, world)
        .map_err(|e| format!("cannot scan {}: {e}", resolved.display()))?;
    let Some(found) = found else {
        return Ok(None);
    };
    let timing = checkpoint::save_timing(&resolved, &found, layout);
    // Named under the directory the spec gave (symlinks unresolved), as the watcher names it.
    let path = found.path.strip_prefix(&resolved).map_or_else(
        |_| found.path.clone(),
        |rest| Path::new(&scan.checkpoint_dir).join(rest),
    );
    Ok(Some(CheckpointSeen {
        job_id: scan.job_id.clone(),
        attempt: scan.attempt,
        path: path.display().to_string(),
        step: found.step,
        save_ms: timing.map(|(ms, _)| ms),
        completed_at_unix_ms: timing.map(|(_, at)| at),
    }))
}
