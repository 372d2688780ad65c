//! The recovery hold as clusterctl sees it (`recovery`, and the `state` line of `status`).

use vigil_proto::v1;

use crate::engine::Snapshot;
use crate::node::CordonSource;
use vigil_core::recovery::{JOBS_HELD, RecoveryHold};

/// The hold with what it still holds: the nodes it keeps cordoned, the jobs waiting for it.
pub fn hold(hold: &RecoveryHold, snap: &Snapshot) -> v1::RecoveryHold {
    let nodes_held = snap
        .nodes
        .iter()
        .filter(|n| {
            n.record
                .cordon
                .as_ref()
                .is_some_and(|c| c.source == CordonSource::Recovery)
        })
        .map(|n| n.record.name.clone())
        .collect();
    let jobs_held = snap
        .jobs
        .iter()
        .filter(|j| !j.phase.is_terminal() && j.reason == JOBS_HELD)
        .count();
    v1::RecoveryHold {
        since_unix_ms: hold.since_unix_ms,
        damage: hold.damage.clone(),
        lost: hold.lost.clone(),
        lost_nodes: hold.lost_nodes.clone(),
        lost_jobs: hold.lost_jobs.clone(),
        damaged_copy: hold.damaged_copy.clone(),
        confirmed_by: hold.confirmed_by.clone().unwrap_or_default(),
        confirmed_at_unix_ms: hold.confirmed_at_unix_ms,
        nodes_held,
        jobs_held: u32::try_from(jobs_held).unwrap_or(u32::MAX),
    }
}

/// The snapshot's hold, if the store was ever recovered.
pub fn of(snap: &Snapshot) -> Option<v1::RecoveryHold> {
    snap.recovery.as_ref().map(|h| hold(h, snap))
}
