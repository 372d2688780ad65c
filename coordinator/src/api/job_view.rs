//! Jobs as clusterctl sees them: the protocol's view of a `Job`.

use vigil_proto::v1;

use crate::goodput::Goodput;
use crate::job::{Checkpoint, Job};
use vigil_core::jobs::evidence::NodeEvidence;

/// The `source` of vigil's own jobs (Slurm's are shown by `slurm_job_view`).
pub const SOURCE: &str = "vigil";

pub fn summary(job: &Job) -> v1::JobSummary {
    v1::JobSummary {
        id: job.id.clone(),
        name: job.spec.name.clone(),
        state: job.phase_name().to_owned(),
        attempt: job.attempt,
        restarts: job.restarts,
        max_restarts: job.spec.restart.max_restarts,
        nodes: job.spec.nodes,
        gpus_per_node: job.spec.gpus_per_node,
        assigned_nodes: job.placement.clone(),
        last_checkpoint_step: job.checkpoint.as_ref().and_then(|c| c.step),
        submitted_at_unix_ms: job.submitted_at_ms,
        reason: job.reason.clone(),
        progress_step: job.progress_step(),
        source: SOURCE.to_owned(),
    }
}

fn checkpoint(c: &Checkpoint) -> v1::CheckpointRecord {
    v1::CheckpointRecord {
        path: c.path.clone(),
        step: c.step,
        seen_at_unix_ms: c.seen_at_ms,
        attempt: c.attempt,
    }
}

/// Goodput as the control API shows it (vigil's jobs and Slurm's alike).
pub(crate) fn goodput(g: &Goodput) -> v1::Goodput {
    v1::Goodput {
        wall_ms: g.wall_ms,
        productive_ms: g.productive_ms,
        lost_ms: g.lost_ms,
        ettr: g.ettr,
        queued_ms: g.queued_ms,
        detection_ms: g.detection_ms,
        teardown_ms: g.teardown_ms,
        waiting_ms: g.waiting_ms,
        startup_ms: g.startup_ms,
        recomputation_ms: g.recomputation_ms,
        failures: g
            .failures
            .iter()
            .map(|f| v1::FailureCost {
                attempt: f.attempt,
                kind: f.kind.clone(),
                reason: f.reason.clone(),
                culprit_node: f.culprit_node.clone(),
                fault_at_unix_ms: f.fault_at_ms,
                detection_ms: f.detection_ms,
                teardown_ms: f.teardown_ms,
                waiting_ms: f.waiting_ms,
                startup_ms: f.startup_ms,
                recomputation_ms: f.recomputation_ms,
                steps_lost: f.steps_lost,
            })
            .collect(),
        timeline: g
            .segments
            .iter()
            .map(|s| v1::TimelineSegment {
                phase: s.phase.as_str().to_owned(),
                from_unix_ms: s.from_ms,
                to_unix_ms: s.to_ms,
                attempt: s.attempt,
            })
            .collect(),
        mtbf_ms: g.mtbf_ms,
        checkpoint_save_ms: g.checkpoint_save_ms,
        checkpoint_interval_ms: g.checkpoint_interval_ms,
        suggested_checkpoint_interval_ms: g.suggested_interval_ms,
    }
}

/// One node's evidence of a hung attempt, as the control API shows it.
fn evidence(e: &NodeEvidence) -> v1::NodeEvidence {
    v1::NodeEvidence {
        node: e.node.clone(),
        captured_at_unix_ms: e.at_ms,
        processes: e
            .processes
            .iter()
            .map(|p| v1::ProcessEvidence {
                pid: p.pid,
                comm: p.comm.clone(),
                state: p.state.clone(),
                wchan: p.wchan.clone(),
                kernel_stack: p.kernel_stack.clone(),
                python_stacks: p.python_stacks.clone(),
            })
            .collect(),
        log_tail: e.log_tail.clone(),
        fabric: e
            .fabric
            .iter()
            .map(|d| v1::FabricDelta {
                port: d.port.clone(),
                state: d.state.clone(),
                link_downed: d.link_downed,
                link_error_recovery: d.link_error_recovery,
                symbol_error: d.symbol_error,
                port_rcv_errors: d.port_rcv_errors,
                port_xmit_discards: d.port_xmit_discards,
                carrier_changes: d.carrier_changes,
            })
            .collect(),
        error: e.error.clone(),
    }
}

/// The most evidence one `job show` answer carries, all attempts together: the newest
/// attempts' first, within the control API's message bound (4 MiB).
const MAX_SHOWN_EVIDENCE: u64 = vigil_core::jobs::evidence::MAX_ATTEMPT_BYTES;

/// Adds the stored evidence records (attempt, evidence) to their attempts in `detail`, in node
/// order beside any the job record itself held (the previous release kept them there), the
/// newest attempts first while they fit in [`MAX_SHOWN_EVIDENCE`].
pub fn add_evidence(detail: &mut v1::JobDetail, stored: Vec<(u64, NodeEvidence)>) {
    let mut budget = MAX_SHOWN_EVIDENCE;
    for a in detail.attempts.iter_mut().rev() {
        let mine: Vec<&NodeEvidence> = stored
            .iter()
            .filter(|(n, _)| *n == a.attempt)
            .map(|(_, e)| e)
            .collect();
        let bytes: u64 = mine.iter().map(|e| e.approx_bytes()).sum();
        if mine.is_empty() || bytes > budget {
            continue;
        }
        budget -= bytes;
        a.evidence
            .retain(|old| !mine.iter().any(|e| e.node == old.node));
        a.evidence.extend(mine.into_iter().map(evidence));
        a.evidence.sort_by(|x, y| x.node.cmp(&y.node));
    }
}

/// A job's detail as of now.
pub fn detail(job: &Job) -> v1::JobDetail {
    detail_at(job, crate::metrics::unix_ms(std::time::SystemTime::now()))
}

/// A job's detail as of `now_ms` (its goodput counts up to then).
pub fn detail_at(job: &Job, now_ms: u64) -> v1::JobDetail {
    v1::JobDetail {
        summary: Some(summary(job)),
        spec_toml: job.spec_toml.clone(),
        spare_nodes: job.spares.clone(),
        attempts: job
            .attempts
            .iter()
            .map(|a| v1::AttemptRecord {
                attempt: a.attempt,
                nodes: a.nodes.clone(),
                started_at_unix_ms: a.started_at_ms,
                ended_at_unix_ms: a.ended_at_ms,
                outcome: a.outcome.clone(),
                reason: a.reason.clone(),
                culprit_node: a.culprit_node.clone(),
                resumed_from: a
                    .resumed_from
                    .as_ref()
                    .map_or_else(String::new, |c| c.path.clone()),
                resumed_from_step: a.resumed_from.as_ref().and_then(|c| c.step),
                last_step: a.last_step,
                triage: a
                    .triage
                    .iter()
                    .map(|(n, v)| (n.clone(), v.describe()))
                    .collect(),
                exit_code: a.worker_end.as_ref().and_then(|e| e.exit_code),
                signal: a.worker_end.as_ref().and_then(|e| e.signal),
                log_tail: a
                    .worker_end
                    .as_ref()
                    .map_or_else(String::new, |e| e.log_tail.clone()),
                crash_loop: a
                    .crash_loop
                    .as_ref()
                    .map_or_else(String::new, |j| j.describe()),
                evidence: a.evidence.iter().map(evidence).collect(),
                suspect: a.suspect.clone(),
                // The running preflight is the job's; a finished one is kept on its attempt.
                preflight: job
                    .preflight
                    .as_ref()
                    .filter(|p| p.attempt == a.attempt && !p.done())
                    .or(a.preflight.as_ref())
                    .map(vigil_core::jobs::preflight::describe)
                    .unwrap_or_default(),
            })
            .collect(),
        last_checkpoint: job.checkpoint.as_ref().map(checkpoint),
        bad_checkpoints: job.bad_checkpoints.iter().cloned().collect(),
        lost_ms: job.lost_ms,
        events: job
            .events
            .iter()
            .map(|e| v1::JobEvent {
                at_unix_ms: e.at_ms,
                kind: e.kind.clone(),
                message: e.message.clone(),
            })
            .collect(),
        workers: job
            .workers
            .iter()
            .map(|(node, w)| v1::WorkerStatus {
                node: node.clone(),
                node_rank: w.node_rank,
                state: w.phase.as_str().to_owned(),
                exit_code: w.exit_code,
                progress_step: w.progress_step,
                progress_at_unix_ms: w.progress_at_ms,
                pid: w.pid,
                log_path: w.log_path.clone(),
            })
            .collect(),
        workdir: job.spec.workdir.clone(),
        checkpoint_dir: job.spec.checkpoint.dir.clone(),
        checkpoint_layout: job.spec.checkpoint.layout.clone(),
        goodput: Some(goodput(&crate::goodput::account(job, now_ms))),
        slurm: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(node: &str, tail_bytes: usize) -> NodeEvidence {
        NodeEvidence {
            node: node.into(),
            at_ms: 1,
            processes: Vec::new(),
            log_tail: "x".repeat(tail_bytes),
            fabric: Vec::new(),
            error: String::new(),
        }
    }

    fn detail_with(attempts: &[u64], legacy: Option<(u64, &str)>) -> v1::JobDetail {
        v1::JobDetail {
            attempts: attempts
                .iter()
                .map(|&attempt| v1::AttemptRecord {
                    attempt,
                    evidence: legacy
                        .filter(|(a, _)| *a == attempt)
                        .map(|(_, n)| vec![evidence(&e(n, 1))])
                        .unwrap_or_default(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn nodes(d: &v1::JobDetail) -> Vec<Vec<String>> {
        d.attempts
            .iter()
            .map(|a| a.evidence.iter().map(|e| e.node.clone()).collect())
            .collect()
    }

    #[test]
    fn stored_evidence_joins_its_attempt_in_node_order_beside_an_old_records() {
        let mut d = detail_with(&[1, 2], Some((1, "n3")));
        add_evidence(
            &mut d,
            vec![(1, e("n2", 1)), (1, e("n1", 1)), (2, e("n1", 1))],
        );
        assert_eq!(nodes(&d), [vec!["n1", "n2", "n3"], vec!["n1"]]);
    }

    #[test]
    fn the_newest_attempts_evidence_is_shown_first_within_the_bound() {
        let big = usize::try_from(MAX_SHOWN_EVIDENCE / 2).expect("fits");
        let mut d = detail_with(&[1, 2, 3], None);
        add_evidence(
            &mut d,
            vec![(1, e("n1", 10)), (2, e("n1", big)), (3, e("n1", big))],
        );
        // Attempt 3 takes half the bound, attempt 2 no longer fits, attempt 1 still does.
        let empty: Vec<String> = Vec::new();
        assert_eq!(
            nodes(&d),
            [vec!["n1".to_owned()], empty, vec!["n1".to_owned()]]
        );
        let total: usize = d
            .attempts
            .iter()
            .flat_map(|a| &a.evidence)
            .map(|e| e.log_tail.len())
            .sum();
        assert!(total as u64 <= MAX_SHOWN_EVIDENCE, "{total}");
    }
}
