//! The Slurm adapter's inputs to the cluster state: what `squeue` showed (the ledger of Slurm
//! jobs, `jobs`) and each requeue it carried out. The ledger is stored, as one cluster-wide
//! record, only when it changed.

use crate::state::{ClusterState, Effect, Now};

use super::SlurmJob;
use super::jobs::Ledger;

impl ClusterState {
    /// One round's `squeue` listing (`complete`: every line of it parsed). Node names are
    /// vigil's where the adapter knows them.
    pub fn slurm_jobs(&mut self, jobs: &[SlurmJob], complete: bool, now: Now) -> Vec<Effect> {
        let nodes = &self.nodes;
        let changed =
            self.slurm_jobs
                .observe(jobs, complete, |n| nodes.contains_key(n), now.wall_ms);
        self.persist_slurm_jobs(changed)
    }

    /// The adapter requeued Slurm job `job` for a fault on vigil node `node`: recorded in the
    /// node's history and on the job's record (with the time vigil cordoned the node, the
    /// fault's detection, where it did).
    pub fn slurm_requeued(&mut self, job: &str, node: &str, reason: &str, now: Now) -> Vec<Effect> {
        let mut effects =
            self.slurm_record(node, format!("requeued slurm job {job}: {reason}"), now);
        let fault_at = self
            .nodes
            .get(node)
            .and_then(|n| n.record.cordon.as_ref())
            .map(|c| c.since_unix_ms);
        let known = self
            .slurm_jobs
            .requeued(job, node, reason, fault_at, now.wall_ms);
        effects.extend(self.persist_slurm_jobs(known));
        effects
    }

    fn persist_slurm_jobs(&self, changed: bool) -> Vec<Effect> {
        if changed {
            vec![Effect::PersistSlurmJobs(Box::new(self.slurm_jobs.clone()))]
        } else {
            Vec::new()
        }
    }

    /// The ledger loaded from the store, keeping `keep_finished` finished records.
    pub fn restore_slurm_jobs(&mut self, stored: Option<Ledger>, keep_finished: usize) {
        self.slurm_jobs = stored.unwrap_or_default();
        self.slurm_jobs.keep_finished = keep_finished;
    }
}
