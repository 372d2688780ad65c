//! Operators' requests about jobs: submit one, cancel one, and drain a node (cordon it and
//! restart its jobs elsewhere).

use std::collections::{BTreeMap, BTreeSet};

use super::attempt::{Failure, stop_attempt};
use super::schedule::release;
use crate::job::{AfterStop, Job, JobPhase};
use crate::jobspec;
use crate::kinds::FailureKind;
use crate::state::{ClusterState, Effect, Now, StateError};

impl ClusterState {
    pub fn submit_job(
        &mut self,
        text: &str,
        source: &str,
        now: Now,
    ) -> Result<(String, Vec<Effect>), StateError> {
        let spec =
            jobspec::parse(text, source, self.nodes.len()).map_err(StateError::InvalidSpec)?;
        self.next_job_seq += 1;
        let seq = self.next_job_seq;
        let id = format!("{}-{seq}", spec.name);
        let mut job = Job {
            id: id.clone(),
            seq,
            spec,
            spec_toml: text.to_owned(),
            phase: JobPhase::Pending,
            reason: String::new(),
            attempt: 0,
            placement: Vec::new(),
            spares: Vec::new(),
            restarts: 0,
            attempts: Vec::new(),
            workers: BTreeMap::new(),
            checkpoint: None,
            submitted_at_ms: now.wall_ms,
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
            stragglers: BTreeSet::new(),
            loss_history: Default::default(),
            rollback_attempt: None,
            avoid: BTreeSet::new(),
            env_override: BTreeMap::new(),
            events: Vec::new(),
            resume_scan: None,
            preflight: None,
            bad_checkpoints: Default::default(),
            unannounced: Vec::new(),
        };
        job.event(
            now.wall_ms,
            "submitted",
            format!(
                "submitted from {}",
                if source.is_empty() { "-" } else { source }
            ),
        );
        let effects = vec![Effect::PersistJob(Box::new(job.clone()))];
        self.jobs.insert(id.clone(), job);
        Ok((id, effects))
    }

    pub fn cancel_job(&mut self, id: &str, now: Now) -> Result<Vec<Effect>, StateError> {
        let job = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| StateError::UnknownJob(id.to_owned()))?;
        let mut effects = Vec::new();
        match job.phase {
            JobPhase::Pending | JobPhase::Restarting => {
                job.phase = JobPhase::Cancelled;
                job.reason = "cancelled by an operator".into();
                job.finished_at_ms = Some(now.wall_ms);
                release(job);
                job.event(now.wall_ms, "cancelled", "cancelled by an operator".into());
            }
            JobPhase::Running => {
                let failure = Failure::new("cancelled by an operator", "", FailureKind::Cancelled);
                stop_attempt(
                    job,
                    &self.nodes,
                    &failure,
                    AfterStop::Cancel,
                    now,
                    &mut effects,
                );
            }
            JobPhase::Stopping => job.after_stop = Some(AfterStop::Cancel),
            JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled => return Ok(effects),
        }
        effects.push(Effect::PersistJob(Box::new(job.clone())));
        Ok(effects)
    }

    /// Cordon `node` and restart the jobs running on it elsewhere now, from
    /// their last checkpoint. A drain is the operator's doing: it restarts
    /// even a job whose `max_restarts` is used up, and blames no node.
    pub fn drain_node(
        &mut self,
        node: &str,
        reason: &str,
        now: Now,
    ) -> Result<(Vec<String>, Vec<Effect>), StateError> {
        let mut effects = self.cordon(
            node,
            format!("drain: {reason}"),
            crate::node::CordonSource::Operator,
            now,
        )?;
        let mut restarted = Vec::new();
        let why = format!("node {node} drained by an operator ({reason})");
        for job in self.jobs.values_mut().filter(|j| j.phase.holds_nodes()) {
            job.spares.retain(|s| s != node);
            if job.phase == JobPhase::Running && job.workers.contains_key(node) {
                let failure = Failure::new(&why, "", FailureKind::Drain);
                stop_attempt(
                    job,
                    &self.nodes,
                    &failure,
                    AfterStop::Restart,
                    now,
                    &mut effects,
                );
                restarted.push(job.id.clone());
            }
            effects.push(Effect::PersistJob(Box::new(job.clone())));
        }
        Ok((restarted, effects))
    }
}
