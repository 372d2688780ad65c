//! Rolling a job back, pure: automatically when its training goes unhealthy
//! (see `training_health`), or on an operator's `clusterctl job restart ID
//! --from-checkpoint STEP --env K=V`. Either way the attempt is stopped on
//! every node and the next one resumes from the chosen complete checkpoint.

use std::collections::BTreeMap;

use vigil_proto::v1;

use crate::job::{AfterStop, Job, JobPhase};
use crate::jobs::{Failure, after_failure, stop_attempt};
use crate::kinds::FailureKind;
use crate::node::Node;
use crate::state::{ClusterState, Effect, Now, StateError};
use crate::training_health::{self, Report, Trouble};

/// Node rank 0 reported `info`: judge its training metrics; true when the
/// attempt is being rolled back.
pub fn observe(
    job: &mut Job,
    nodes: &BTreeMap<String, Node>,
    info: &v1::WorkerInfo,
    now: Now,
    effects: &mut Vec<Effect>,
) -> bool {
    let Some(step) = info.progress_step else {
        return false;
    };
    if job.phase != JobPhase::Running || (info.loss.is_none() && info.loss_scale.is_none()) {
        return false;
    }
    let report = Report {
        step,
        loss: info.loss,
        loss_scale: info.loss_scale,
        at_ms: now.wall_ms,
    };
    let spec = job.spec.training_health.clone();
    match training_health::observe(&mut job.loss_history, report, &spec) {
        Some(trouble) => {
            roll_back(job, nodes, &trouble, now, effects);
            true
        }
        None => false,
    }
}

fn roll_back(
    job: &mut Job,
    nodes: &BTreeMap<String, Node>,
    trouble: &Trouble,
    now: Now,
    effects: &mut Vec<Effect>,
) {
    let target = training_health::checkpoint_before(job, trouble.since_step);
    let to = target.as_ref().map_or_else(
        || "a fresh start (no complete checkpoint before it)".to_owned(),
        |c| format!("checkpoint {} (step {})", c.path, c.step.unwrap_or(0)),
    );
    let reason = format!(
        "training unhealthy ({}) since step {}: {}; rolling back to {to}",
        trouble.kind, trouble.since_step, trouble.evidence
    );
    job.event(now.wall_ms, "rollback", reason.clone());
    let after = after_failure(job);
    stop_attempt(
        job,
        nodes,
        &Failure::new(&reason, "", trouble.kind),
        after,
        now,
        effects,
    );
    job.checkpoint = target;
    job.rollback_attempt = Some(job.attempt + 1);
    job.loss_history.clear();
    effects.push(Effect::PersistJob(Box::new(job.clone())));
}

/// In the attempt after a rollback, a checkpoint completed before it started
/// is one the rollback left behind (written during the trouble): ignore it.
/// So is anything the rolled-back attempt reports while it stops (its final
/// checkpoint scan at exit): it was written during the trouble too.
pub fn stale(job: &Job, c: &v1::CheckpointSeen) -> bool {
    if job.rollback_attempt == Some(job.attempt + 1) {
        return true;
    }
    let started = job
        .attempts
        .iter()
        .rev()
        .find(|a| a.attempt == job.attempt)
        .map_or(0, |a| a.started_at_ms);
    job.rollback_attempt == Some(job.attempt) && c.completed_at_unix_ms.is_some_and(|t| t < started)
}

impl ClusterState {
    /// An operator restarts a job now, optionally from the complete
    /// checkpoint at `from_step` and with `env` over the spec's environment.
    pub fn restart_job(
        &mut self,
        id: &str,
        from_step: Option<u64>,
        env: BTreeMap<String, String>,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let job = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| StateError::UnknownJob(id.to_owned()))?;
        if job.phase.is_terminal() {
            return Err(StateError::InvalidRequest(format!(
                "job {id} is {}; submit it again instead",
                job.phase_name()
            )));
        }
        if let Some(bad) = env
            .keys()
            .find(|k| k.is_empty() || k.starts_with("VIGIL_") || k.contains('='))
        {
            return Err(StateError::InvalidRequest(format!(
                "--env {bad:?}: names must be non-empty, without '=', and not start with VIGIL_"
            )));
        }
        let target = match from_step {
            None => None,
            Some(step) => Some(
                job.checkpoints
                    .iter()
                    .rev()
                    .find(|c| c.step == Some(step) && !job.bad_checkpoints.contains(&c.path))
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<String> = job
                            .checkpoints
                            .iter()
                            .filter_map(|c| c.step.map(|s| s.to_string()))
                            .collect();
                        StateError::InvalidRequest(format!(
                            "job {id} has no complete checkpoint at step {step}; known steps: {}",
                            if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            }
                        ))
                    })?,
            ),
        };
        let mut what = Vec::new();
        if let Some(c) = &target {
            what.push(format!(
                "from checkpoint {} (step {})",
                c.path,
                c.step.unwrap_or(0)
            ));
        }
        if !env.is_empty() {
            let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            what.push(format!("with {}", pairs.join(" ")));
        }
        let reason = format!("restarted by an operator {}", what.join(" "))
            .trim_end()
            .to_owned();
        job.event(now.wall_ms, "restart", reason.clone());
        job.env_override.extend(env);
        let mut effects = Vec::new();
        if job.phase == JobPhase::Running {
            stop_attempt(
                job,
                &self.nodes,
                &Failure::new(&reason, "", FailureKind::OperatorRestart),
                AfterStop::Restart,
                now,
                &mut effects,
            );
        }
        if target.is_some() {
            job.checkpoint = target;
            job.rollback_attempt = Some(job.attempt + 1);
            job.loss_history.clear();
        }
        effects.push(Effect::PersistJob(Box::new(job.clone())));
        Ok(effects)
    }
}

#[cfg(test)]
#[path = "rollback_tests.rs"]
mod tests;
