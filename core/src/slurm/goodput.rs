//! A Slurm job's goodput, from vigil's record of it (`jobs`), in the same terms as vigil's
//! own jobs (`crate::goodput`): its wall time from first seen running to its end (or now),
//! split into productive time (running on healthy nodes) and time lost to each requeue vigil
//! sent: `detection` from the fault (vigil's cordon of the node) to the end of the run it hit,
//! `waiting` from there to the next run (Slurm stopping, requeueing and starting the job).
//!
//! What vigil cannot see of a Slurm job is not guessed: its queueing before the first run
//! (wall time starts when vigil first saw it running), its start-up, and the work redone
//! since its last checkpoint (the batch script picks the checkpoint) all count as productive.

use crate::goodput::{FailureCost, Goodput, Phase, Timeline, totals};
use crate::kinds::FailureKind;

use super::LOST_REASON;
use super::jobs::SlurmJobRecord;

/// Where `record`'s wall time went, as of `now_ms`.
pub fn account(record: &SlurmJobRecord, now_ms: u64) -> Goodput {
    let Some(first) = record.runs.first() else {
        return Goodput::default();
    };
    let start = first.started_ms;
    let end = record
        .finished
        .as_ref()
        .map_or(now_ms, |f| f.at_ms)
        .max(start);
    let mut t = Timeline::new(start, end);
    let mut failures = Vec::new();
    // The failure the time since the last run's end is charged to.
    let mut charged = None;
    for (i, run) in record.runs.iter().enumerate() {
        let attempt = i as u64 + 1;
        t.to(run.started_ms, Phase::Waiting, attempt, charged);
        let stop = run.ended_ms.unwrap_or(end);
        charged = None;
        let hit = record.requeues.iter().find(|r| r.after_runs == i + 1);
        let Some(requeue) = hit else {
            t.to(stop, Phase::Productive, attempt, None);
            continue;
        };
        let fault = requeue
            .fault_at_ms
            .unwrap_or(requeue.at_ms)
            .min(requeue.at_ms);
        t.to(fault, Phase::Productive, attempt, None);
        let kind = if requeue.reason == LOST_REASON {
            FailureKind::NodeLost
        } else {
            FailureKind::NodeUnhealthy
        };
        failures.push(FailureCost {
            attempt,
            kind: kind.as_str().to_owned(),
            reason: requeue.reason.clone(),
            culprit_node: requeue.node.clone(),
            fault_at_ms: fault,
            ..FailureCost::default()
        });
        charged = Some(failures.len() - 1);
        t.to(stop, Phase::Detection, attempt, charged);
    }
    let tail = if charged.is_some() {
        Phase::Waiting
    } else {
        Phase::Productive
    };
    t.to(end, tail, record.runs.len() as u64, charged);
    totals(end - start, t, failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slurm::jobs::{Finished, SlurmRequeue, SlurmRun};

    fn run(from: u64, to: Option<u64>) -> SlurmRun {
        SlurmRun {
            nodes: vec!["n1".into(), "n2".into()],
            started_ms: from,
            ended_ms: to,
        }
    }

    #[test]
    fn a_requeue_costs_its_detection_and_the_wait_for_the_next_run() {
        let record = SlurmJobRecord {
            id: "7".into(),
            runs: vec![run(1_000, Some(5_000)), run(8_000, None)],
            requeues: vec![SlurmRequeue {
                at_ms: 4_500,
                node: "n2".into(),
                reason: "vigil: XID 79".into(),
                fault_at_ms: Some(4_000),
                after_runs: 1,
            }],
            ..SlurmJobRecord::default()
        };
        let g = account(&record, 10_000);
        assert_eq!(g.wall_ms, 9_000);
        assert_eq!(g.productive_ms, 3_000 + 2_000);
        assert_eq!(g.detection_ms, 1_000);
        assert_eq!(g.waiting_ms, 3_000);
        assert_eq!(g.lost_ms, 4_000);
        assert_eq!(g.productive_ms + g.lost_ms, g.wall_ms);
        let f = &g.failures[0];
        assert_eq!((f.attempt, f.culprit_node.as_str()), (1, "n2"));
        assert_eq!((f.detection_ms, f.waiting_ms), (1_000, 3_000));
        assert_eq!(f.kind, "node_unhealthy");
    }

    #[test]
    fn a_job_still_waiting_for_its_rerun_keeps_losing_time_until_it_ends() {
        let mut record = SlurmJobRecord {
            id: "7".into(),
            runs: vec![run(0, Some(2_000))],
            requeues: vec![SlurmRequeue {
                at_ms: 2_000,
                node: "n1".into(),
                reason: LOST_REASON.into(),
                fault_at_ms: None,
                after_runs: 1,
            }],
            ..SlurmJobRecord::default()
        };
        let g = account(&record, 6_000);
        assert_eq!((g.productive_ms, g.waiting_ms), (2_000, 4_000));
        assert_eq!(g.failures[0].kind, "node_lost");
        record.finished = Some(Finished {
            at_ms: 3_000,
            outcome: "CANCELLED".into(),
        });
        assert_eq!(account(&record, 60_000).wall_ms, 3_000);
    }

    #[test]
    fn a_job_without_requeues_is_all_productive_and_one_never_run_has_no_time() {
        let record = SlurmJobRecord {
            runs: vec![run(100, None)],
            ..SlurmJobRecord::default()
        };
        let g = account(&record, 1_100);
        assert_eq!((g.wall_ms, g.productive_ms, g.lost_ms), (1_000, 1_000, 0));
        assert_eq!(account(&SlurmJobRecord::default(), 5).wall_ms, 0);
    }
}
