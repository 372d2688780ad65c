//! Slurm jobs as clusterctl sees them (`[slurm]`, docs/slurm.md): vigil's record of a Slurm
//! job in the protocol's job messages, so `clusterctl jobs`, `job show` and `job report` show
//! them beside vigil's own: id `slurm:<id>`, source `slurm`, each run an attempt (the faulty
//! node as its culprit when vigil requeued it), goodput in the same terms.

use vigil_core::slurm::goodput;
use vigil_core::slurm::jobs::{ID_PREFIX, Ledger, SlurmJobRecord};
use vigil_proto::v1;

/// The `source` of a Slurm job.
pub const SOURCE: &str = "slurm";

/// The record `id` names (`slurm:123`), if it names one.
pub fn find<'a>(ledger: &'a Ledger, id: &str) -> Option<&'a SlurmJobRecord> {
    ledger.jobs.get(id.strip_prefix(ID_PREFIX)?)
}

/// Slurm runs its jobs: a request to change one (`job cancel`, `job restart`) is refused,
/// naming the Slurm command that does it.
pub fn refuse(id: &str, command: &str) -> Result<(), crate::error::ControlError> {
    match id.strip_prefix(ID_PREFIX) {
        Some(slurm_id) => Err(crate::error::ControlError::InvalidArgument(format!(
            "{id} is a Slurm job: Slurm runs it, vigil only records it; use {command} {slurm_id}"
        ))),
        None => Ok(()),
    }
}

/// What it waits for, or how it ended.
fn reason(r: &SlurmJobRecord) -> String {
    if let Some(q) = r.requeues.last().filter(|_| r.awaiting_rerun()) {
        return format!(
            "requeued by vigil ({} on {}), waiting to run again",
            q.reason, q.node
        );
    }
    r.finished
        .as_ref()
        .map_or_else(String::new, |f| f.outcome.clone())
}

pub fn summary(r: &SlurmJobRecord) -> v1::JobSummary {
    let last = r.runs.last();
    let running = last.filter(|run| run.ended_ms.is_none());
    v1::JobSummary {
        id: r.shown_id(),
        name: r.name.clone(),
        state: r.state.clone(),
        attempt: r.runs.len() as u64,
        restarts: u32::try_from(r.requeues.len()).unwrap_or(u32::MAX),
        nodes: last.map_or(0, |run| u32::try_from(run.nodes.len()).unwrap_or(u32::MAX)),
        assigned_nodes: running.map_or_else(Vec::new, |run| run.nodes.clone()),
        submitted_at_unix_ms: r.runs.first().map_or(0, |run| run.started_ms),
        reason: reason(r),
        source: SOURCE.to_owned(),
        ..v1::JobSummary::default()
    }
}

/// Each run as an attempt: ended by vigil's requeue (the faulty node its culprit), running,
/// or ended otherwise.
fn attempts(r: &SlurmJobRecord) -> Vec<v1::AttemptRecord> {
    r.runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let requeue = r.requeues.iter().find(|q| q.after_runs == i + 1);
            let outcome = match (requeue, run.ended_ms) {
                (Some(_), _) => "requeued",
                (None, None) => "running",
                (None, Some(_)) if i + 1 == r.runs.len() => {
                    r.finished.as_ref().map_or("ended", |f| f.outcome.as_str())
                }
                (None, Some(_)) => "ended",
            };
            v1::AttemptRecord {
                attempt: i as u64 + 1,
                nodes: run.nodes.clone(),
                started_at_unix_ms: run.started_ms,
                ended_at_unix_ms: run.ended_ms.unwrap_or(0),
                outcome: outcome.to_owned(),
                reason: requeue.map_or_else(String::new, |q| q.reason.clone()),
                culprit_node: requeue.map_or_else(String::new, |q| q.node.clone()),
                ..v1::AttemptRecord::default()
            }
        })
        .collect()
}

/// A Slurm job's detail as of `now_ms` (its goodput counts up to then).
pub fn detail_at(r: &SlurmJobRecord, now_ms: u64) -> v1::JobDetail {
    let g = goodput::account(r, now_ms);
    v1::JobDetail {
        summary: Some(summary(r)),
        attempts: attempts(r),
        lost_ms: g.lost_ms,
        events: r
            .requeues
            .iter()
            .map(|q| v1::JobEvent {
                at_unix_ms: q.at_ms,
                kind: "requeued".to_owned(),
                message: format!("requeued by vigil: {} on {}", q.reason, q.node),
            })
            .collect(),
        goodput: Some(super::job_view::goodput(&g)),
        slurm: Some(v1::SlurmJobInfo {
            job_id: r.id.clone(),
            user: r.user.clone(),
            slurm_state: r.state.clone(),
            requeues: r
                .requeues
                .iter()
                .map(|q| v1::SlurmRequeue {
                    at_unix_ms: q.at_ms,
                    node: q.node.clone(),
                    reason: q.reason.clone(),
                    fault_at_unix_ms: q.fault_at_ms,
                    run: q.after_runs as u64,
                })
                .collect(),
            finished_at_unix_ms: r.finished.as_ref().map(|f| f.at_ms),
            outcome: r
                .finished
                .as_ref()
                .map_or_else(String::new, |f| f.outcome.clone()),
            awaiting_rerun: r.awaiting_rerun(),
        }),
        ..v1::JobDetail::default()
    }
}

#[cfg(test)]
mod tests {
    use vigil_core::slurm::jobs::{Finished, SlurmRequeue, SlurmRun};

    use super::*;

    fn record() -> SlurmJobRecord {
        SlurmJobRecord {
            id: "42".into(),
            name: "train".into(),
            user: "alice".into(),
            state: "RUNNING".into(),
            runs: vec![
                SlurmRun {
                    nodes: vec!["n1".into(), "n2".into()],
                    started_ms: 1_000,
                    ended_ms: Some(5_000),
                },
                SlurmRun {
                    nodes: vec!["n1".into(), "n3".into()],
                    started_ms: 6_000,
                    ended_ms: None,
                },
            ],
            requeues: vec![SlurmRequeue {
                at_ms: 4_800,
                node: "n2".into(),
                reason: "vigil: XID 79".into(),
                fault_at_ms: Some(4_500),
                after_runs: 1,
            }],
            finished: None,
        }
    }

    #[test]
    fn a_slurm_job_shows_its_runs_as_attempts_and_the_faulty_node_as_culprit() {
        let mut ledger = Ledger::default();
        ledger.jobs.insert("42".into(), record());
        let r = find(&ledger, "slurm:42").expect("found by its shown id");
        assert!(find(&ledger, "42").is_none(), "vigil's ids are not Slurm's");
        let d = detail_at(r, 10_000);
        let s = d.summary.clone().unwrap_or_default();
        assert_eq!((s.id.as_str(), s.source.as_str()), ("slurm:42", "slurm"));
        assert_eq!((s.attempt, s.restarts), (2, 1));
        assert_eq!(s.assigned_nodes, ["n1", "n3"]);
        assert_eq!(d.attempts[0].outcome, "requeued");
        assert_eq!(d.attempts[0].culprit_node, "n2");
        assert_eq!(d.attempts[1].outcome, "running");
        let g = d.goodput.unwrap_or_default();
        assert_eq!((g.wall_ms, g.lost_ms), (9_000, 1_500));
        let slurm = d.slurm.unwrap_or_default();
        assert_eq!(slurm.requeues[0].run, 1);
        assert!(!slurm.awaiting_rerun);
    }

    #[test]
    fn changing_a_slurm_job_is_refused_naming_the_slurm_command() {
        let message =
            refuse("slurm:42", "scancel").map_or_else(|e| e.to_string(), |()| "ok".into());
        assert!(message.contains("use scancel 42"), "{message}");
        assert!(refuse("j-1", "scancel").is_ok());
    }

    #[test]
    fn a_finished_job_says_how_it_ended() {
        let mut r = record();
        r.runs[1].ended_ms = Some(9_000);
        r.finished = Some(Finished {
            at_ms: 9_000,
            outcome: "COMPLETED".into(),
        });
        let d = detail_at(&r, 60_000);
        assert_eq!(d.attempts[1].outcome, "COMPLETED");
        assert_eq!(d.summary.unwrap_or_default().reason, "COMPLETED");
        assert_eq!(d.goodput.unwrap_or_default().wall_ms, 8_000);
    }
}
