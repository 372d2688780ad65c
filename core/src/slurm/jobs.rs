//! vigil's record of the Slurm jobs it saw running on its nodes, decided purely from what
//! `squeue` showed ([`Ledger::observe`]) and from the requeues the adapter carried out
//! ([`Ledger::requeued`]): each job's runs (nodes, first and last seen running), each requeue
//! vigil sent (when, the faulty node, why) and how it ended. The whole ledger is one
//! cluster-wide record ([`RECORD`]), written only when it changed.
//!
//! It is also the adapter's memory across a coordinator restart: a job whose latest requeue
//! by vigil has not been followed by a run yet ([`Ledger::awaiting_rerun`]) still has its
//! requeue hold lifted by the next coordinator.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{JobState, SlurmJob};

/// The name of the cluster-wide record that holds the ledger.
pub const RECORD: &str = "slurm_jobs";
/// Finished records kept by default (`[slurm] keep_finished_jobs`); the oldest go first.
pub const DEFAULT_KEEP_FINISHED: usize = 500;
/// Runs kept per job (a job that Slurm requeues over and over keeps its latest runs).
pub const MAX_RUNS: usize = 100;
/// The `outcome` of a job that left the queue without vigil seeing its final state (it
/// ended while the coordinator was down, past Slurm's `MinJobAge`).
pub const GONE: &str = "left the queue";

/// One stretch of a Slurm job running, as vigil saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmRun {
    /// vigil's names of its nodes (Slurm's where vigil does not know the node).
    pub nodes: Vec<String>,
    /// First seen running (wall ms).
    pub started_ms: u64,
    /// First seen no longer running; `None` while it runs.
    pub ended_ms: Option<u64>,
}

/// One requeue vigil sent for a hardware fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmRequeue {
    /// When `scontrol requeue` succeeded (wall ms).
    pub at_ms: u64,
    /// The faulty node (vigil's name).
    pub node: String,
    /// The drain reason (`vigil: XID 79 ...`, `vigil: agent lost`).
    pub reason: String,
    /// When vigil cordoned the node (the fault's detection), where known.
    pub fault_at_ms: Option<u64>,
    /// How many runs the record held then: the run it ended is the last of them, and the job
    /// awaits its rerun while no run has been added since.
    pub after_runs: usize,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub at_ms: u64,
    /// Slurm's final state (`COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`, `NODE_FAIL`, ...),
    /// or [`GONE`].
    pub outcome: String,
}

/// A Slurm job vigil saw running on its nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlurmJobRecord {
    /// Slurm's job id (`123`, `123_4` for an array task).
    pub id: String,
    pub name: String,
    pub user: String,
    /// Slurm's state when last seen (`RUNNING`, `PENDING`, `COMPLETED`, ...).
    pub state: String,
    pub runs: Vec<SlurmRun>,
    pub requeues: Vec<SlurmRequeue>,
    pub finished: Option<Finished>,
}

impl SlurmJobRecord {
    /// vigil requeued it and it has not run since.
    pub fn awaiting_rerun(&self) -> bool {
        self.finished.is_none()
            && self
                .requeues
                .last()
                .is_some_and(|r| r.after_runs == self.runs.len())
    }

    /// The id `clusterctl` shows (`slurm:123`).
    pub fn shown_id(&self) -> String {
        format!("{ID_PREFIX}{}", self.id)
    }

    fn open_run(&mut self) -> Option<&mut SlurmRun> {
        self.runs.last_mut().filter(|r| r.ended_ms.is_none())
    }

    /// Ends the open run at `now`; whether there was one.
    fn end_run(&mut self, now_ms: u64) -> bool {
        self.open_run().map(|r| r.ended_ms = Some(now_ms)).is_some()
    }
}

/// What `clusterctl` puts before a Slurm job's id.
pub const ID_PREFIX: &str = "slurm:";

/// Every Slurm job vigil keeps a record of, by Slurm job id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ledger {
    pub jobs: BTreeMap<String, SlurmJobRecord>,
    /// Finished records kept (config, not stored).
    #[serde(skip)]
    pub keep_finished: usize,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            jobs: BTreeMap::new(),
            keep_finished: DEFAULT_KEEP_FINISHED,
        }
    }
}

impl Ledger {
    /// The jobs vigil requeued that have not run again yet: their requeue hold is vigil's to
    /// lift.
    pub fn awaiting_rerun(&self) -> BTreeSet<String> {
        self.jobs
            .values()
            .filter(|r| r.awaiting_rerun())
            .map(|r| r.id.clone())
            .collect()
    }

    /// Takes in one `squeue` listing (`complete`: every line parsed, so a job missing from it
    /// has left the queue). `on_vigil` says whether a node name is one of vigil's nodes: a job
    /// gets a record the first time it is seen running on one. Whether anything changed.
    pub fn observe(
        &mut self,
        jobs: &[SlurmJob],
        complete: bool,
        on_vigil: impl Fn(&str) -> bool,
        now_ms: u64,
    ) -> bool {
        let mut changed = false;
        for job in jobs {
            let running = job.state == JobState::Running;
            let record = match self.jobs.get_mut(&job.id) {
                Some(r) => r,
                None if running && job.nodes.iter().any(|n| on_vigil(n)) => {
                    changed = true;
                    self.jobs.entry(job.id.clone()).or_insert(SlurmJobRecord {
                        id: job.id.clone(),
                        ..SlurmJobRecord::default()
                    })
                }
                None => continue,
            };
            changed |= update(record, job, now_ms);
        }
        if complete {
            let listed: BTreeSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
            for record in self.jobs.values_mut() {
                if record.finished.is_none() && !listed.contains(record.id.as_str()) {
                    record.end_run(now_ms);
                    record.finished = Some(Finished {
                        at_ms: now_ms,
                        outcome: GONE.to_owned(),
                    });
                    changed = true;
                }
            }
        }
        if changed {
            self.bound();
        }
        changed
    }

    /// The adapter requeued `job` for a fault on `node`; whether the ledger knows the job.
    pub fn requeued(
        &mut self,
        job: &str,
        node: &str,
        reason: &str,
        fault_at_ms: Option<u64>,
        now_ms: u64,
    ) -> bool {
        let Some(record) = self.jobs.get_mut(job) else {
            return false;
        };
        let after_runs = record.runs.len();
        record.requeues.push(SlurmRequeue {
            at_ms: now_ms,
            node: node.to_owned(),
            reason: reason.to_owned(),
            fault_at_ms,
            after_runs,
        });
        true
    }

    /// Drops the oldest finished records beyond `keep_finished`.
    fn bound(&mut self) {
        let mut finished: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter_map(|r| Some((r.finished.as_ref()?.at_ms, r.id.clone())))
            .collect();
        if finished.len() <= self.keep_finished {
            return;
        }
        finished.sort();
        let extra = finished.len() - self.keep_finished;
        for (_, id) in finished.into_iter().take(extra) {
            self.jobs.remove(&id);
        }
    }
}

/// One listed job's news for its record; whether it changed.
fn update(record: &mut SlurmJobRecord, job: &SlurmJob, now_ms: u64) -> bool {
    let mut changed = false;
    for (field, seen) in [
        (&mut record.name, &job.name),
        (&mut record.user, &job.user),
        (&mut record.state, &job.state_text),
    ] {
        if field != seen && !seen.is_empty() {
            seen.clone_into(field);
            changed = true;
        }
    }
    match job.state {
        JobState::Running => {
            // Running again after it ended (Slurm requeued a finished NODE_FAIL job): reopened.
            changed |= record.finished.take().is_some();
            match record.open_run() {
                Some(run) if run.nodes != job.nodes => {
                    run.nodes.clone_from(&job.nodes);
                    changed = true;
                }
                Some(_) => {}
                None => {
                    record.runs.push(SlurmRun {
                        nodes: job.nodes.clone(),
                        started_ms: now_ms,
                        ended_ms: None,
                    });
                    if record.runs.len() > MAX_RUNS {
                        record.runs.remove(0);
                        for r in &mut record.requeues {
                            r.after_runs = r.after_runs.saturating_sub(1);
                        }
                        record.requeues.retain(|r| r.after_runs > 0);
                    }
                    changed = true;
                }
            }
        }
        JobState::Pending | JobState::Other => changed |= record.end_run(now_ms),
        JobState::Finished => {
            changed |= record.end_run(now_ms);
            if record.finished.is_none() {
                record.finished = Some(Finished {
                    at_ms: now_ms,
                    outcome: job.state_text.clone(),
                });
                changed = true;
            }
        }
    }
    changed
}

#[cfg(test)]
#[path = "jobs_tests.rs"]
mod tests;
