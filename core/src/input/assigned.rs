//! Whether an agent's report concerns work assigned to that agent's node, so that a compromised
//! or confused host cannot move another job's progress, checkpoint or outcome.
//!
//! The job state machine fences such reports itself (it changes nothing for them); this module
//! names why a report was ignored, as an `Effect::Ignored` that the shell logs and counts
//! (`vigil_agent_reports_ignored_total{reason}`).

use std::collections::BTreeMap;

use vigil_proto::v1::{self, agent_event::Kind};

use crate::job::Job;
use crate::state::{Effect, Ignored};

/// Why a report about `(job, attempt)` from a node was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unassigned {
    /// No such job.
    UnknownJob,
    /// The node never ran that attempt of the job (or the attempt does not exist yet).
    NotAssigned,
    /// The node ran that attempt, but the job has moved on to a newer one: normal while an
    /// old attempt is being stopped.
    StaleAttempt,
}

impl Unassigned {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownJob => "unknown_job",
            Self::NotAssigned => "not_assigned",
            Self::StaleAttempt => "stale_attempt",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::UnknownJob => "no such job",
            Self::NotAssigned => "not assigned to this node",
            Self::StaleAttempt => "an attempt that has ended",
        }
    }
}

/// Is attempt `attempt` of `job_id` assigned to `node`?
pub fn check(
    jobs: &BTreeMap<String, Job>,
    node: &str,
    job_id: &str,
    attempt: u64,
) -> Result<(), Unassigned> {
    let job = jobs.get(job_id).ok_or(Unassigned::UnknownJob)?;
    if attempt == 0 || attempt > job.attempt {
        return Err(Unassigned::NotAssigned);
    }
    if attempt == job.attempt && job.workers.contains_key(node) {
        return Ok(());
    }
    match job.attempts.iter().find(|a| a.attempt == attempt) {
        Some(a) if a.nodes.iter().any(|n| n == node) => {
            if attempt == job.attempt {
                Ok(())
            } else {
                Err(Unassigned::StaleAttempt)
            }
        }
        Some(_) => Err(Unassigned::NotAssigned),
        // An old attempt whose record was trimmed: assume it was this node's.
        None if attempt < job.attempt => Err(Unassigned::StaleAttempt),
        None => Err(Unassigned::NotAssigned),
    }
}

/// The `(job, attempt)` an agent event reports on, if it concerns a job.
pub fn subject(event: &v1::AgentEvent) -> Option<(&str, u64, &'static str)> {
    match &event.kind {
        Some(Kind::WorkerStarted(w)) => Some((&w.job_id, w.attempt, "worker_started")),
        Some(Kind::WorkerExited(w)) => Some((&w.job_id, w.attempt, "worker_exited")),
        Some(Kind::Checkpoint(c)) => Some((&c.job_id, c.attempt, "checkpoint")),
        Some(Kind::CheckpointScan(c)) => Some((&c.job_id, c.attempt, "checkpoint_scan")),
        Some(Kind::HangEvidence(e)) => Some((&e.job_id, e.attempt, "hang_evidence")),
        _ => None,
    }
}

/// An `Ignored` effect for every report in `reports` that is not `node`'s to make.
pub fn ignored<'a>(
    jobs: &BTreeMap<String, Job>,
    node: &str,
    reports: impl IntoIterator<Item = (&'a str, u64, &'static str)>,
) -> Vec<Effect> {
    let mut out = Vec::new();
    for (job, attempt, what) in reports {
        let Err(why) = check(jobs, node, job, attempt) else {
            continue;
        };
        let job: String = job.chars().take(128).collect();
        out.push(Effect::Ignored {
            reason: format!(
                "{what} from {node} about attempt {attempt} of job {job}: {}",
                why.describe()
            ),
            why: Ignored::Unassigned(why),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Attempt, JobPhase, Worker, WorkerPhase};

    const SPEC: &str = "name = \"j\"\nnodes = 1\ngpus_per_node = 1\ncommand = [\"x\"]\nworkdir = \"/w\"\n[checkpoint]\ndir = \"/c\"\n";

    fn job(attempt: u64, current: &[&str], history: &[(u64, &[&str])]) -> BTreeMap<String, Job> {
        let spec = crate::jobspec::parse(SPEC, "", 1).expect("valid spec");
        let worker = Worker {
            node_rank: 0,
            phase: WorkerPhase::Running,
            pid: 1,
            exit_code: None,
            signal: None,
            progress_step: None,
            progress_at_ms: 0,
            progress_mono: Default::default(),
            sent: None,
            log_path: String::new(),
            rate_samples: Default::default(),
        };
        let mut j = Job {
            id: "j-1".into(),
            seq: 1,
            spec,
            spec_toml: SPEC.into(),
            phase: JobPhase::Running,
            reason: String::new(),
            attempt,
            placement: Vec::new(),
            spares: Vec::new(),
            restarts: 0,
            attempts: Vec::new(),
            workers: BTreeMap::new(),
            checkpoint: None,
            submitted_at_ms: 0,
            after_stop: None,
            restart_at_ms: None,
            restart_at: None,
            failed_at_ms: None,
            fault_at_ms: None,
            failure_kind: None,
            lost_ms: 0,
            high_water_step: None,
            checkpoints: Vec::new(),
            finished_at_ms: None,
            triage: None,
            slow_since: BTreeMap::new(),
            stragglers: Default::default(),
            loss_history: Default::default(),
            rollback_attempt: None,
            avoid: Default::default(),
            env_override: BTreeMap::new(),
            events: Vec::new(),
            resume_scan: None,
            preflight: None,
            bad_checkpoints: Default::default(),
            unannounced: Vec::new(),
        };
        j.workers = current
            .iter()
            .map(|n| ((*n).to_owned(), worker.clone()))
            .collect();
        j.attempts = history
            .iter()
            .map(|(a, nodes)| Attempt {
                attempt: *a,
                nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
                started_at_ms: 0,
                ended_at_ms: 0,
                outcome: String::new(),
                reason: String::new(),
                culprit_node: String::new(),
                resumed_from: None,
                last_step: None,
                fault_at_ms: 0,
                detected_at_ms: 0,
                failure_kind: None,
                first_progress_at_ms: None,
                catch_up_step: None,
                caught_up_at_ms: None,
                triage: BTreeMap::new(),
                worker_end: None,
                crash_loop: None,
                evidence: Vec::new(),
                evidence_from: Default::default(),
                suspect: String::new(),
                preflight: None,
            })
            .collect();
        BTreeMap::from([("j-1".to_owned(), j)])
    }

    #[test]
    fn reports_of_the_current_attempt_from_its_nodes_are_assigned() {
        let jobs = job(2, &["a", "b"], &[(1, &["a", "c"]), (2, &["a", "b"])]);
        assert_eq!(check(&jobs, "a", "j-1", 2), Ok(()));
        assert_eq!(check(&jobs, "b", "j-1", 2), Ok(()));
    }

    #[test]
    fn another_nodes_job_is_not_assigned() {
        let jobs = job(2, &["a", "b"], &[(1, &["a", "c"]), (2, &["a", "b"])]);
        assert_eq!(check(&jobs, "c", "j-1", 2), Err(Unassigned::NotAssigned));
        assert_eq!(check(&jobs, "d", "j-1", 1), Err(Unassigned::NotAssigned));
        assert_eq!(check(&jobs, "a", "j-1", 3), Err(Unassigned::NotAssigned));
        assert_eq!(check(&jobs, "a", "j-1", 0), Err(Unassigned::NotAssigned));
        assert_eq!(check(&jobs, "a", "nope", 1), Err(Unassigned::UnknownJob));
    }

    #[test]
    fn an_old_attempt_of_the_same_node_is_stale() {
        let jobs = job(2, &["a", "b"], &[(1, &["a", "c"]), (2, &["a", "b"])]);
        assert_eq!(check(&jobs, "c", "j-1", 1), Err(Unassigned::StaleAttempt));
    }

    #[test]
    fn a_finished_job_still_accepts_late_reports_of_its_last_attempt() {
        // Released: no workers, but the attempt record names the nodes.
        let jobs = job(1, &[], &[(1, &["a"])]);
        assert_eq!(check(&jobs, "a", "j-1", 1), Ok(()));
        assert_eq!(check(&jobs, "b", "j-1", 1), Err(Unassigned::NotAssigned));
    }
}
