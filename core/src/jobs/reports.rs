//! What agents report about workers: events (started, exited, a complete checkpoint), progress
//! in heartbeats, and the workers a node still runs when it (re)registers. A report of any other
//! attempt, or from a node outside it, changes no job (`commands` stops a stray worker).

use vigil_proto::v1;

use super::attempt::{Failure, after_failure, finish_if_stopped, stop_attempt, worker_exited};
use crate::goodput;
use crate::job::{Checkpoint, JobPhase, WorkerPhase};
use crate::kinds::FailureKind;
use crate::state::{ClusterState, Effect, Now};

impl ClusterState {
    /// WorkerStarted / WorkerExited / CheckpointSeen from `node`.
    pub fn worker_event(&mut self, node: &str, event: &v1::AgentEvent, now: Now) -> Vec<Effect> {
        use v1::agent_event::Kind;
        let (job_id, attempt) = match &event.kind {
            Some(Kind::WorkerStarted(w)) => (&w.job_id, w.attempt),
            Some(Kind::WorkerExited(w)) => (&w.job_id, w.attempt),
            Some(Kind::Checkpoint(c)) => (&c.job_id, c.attempt),
            Some(Kind::CheckpointScan(c)) => (&c.job_id, c.attempt),
            _ => return Vec::new(),
        };
        let mut effects = Vec::new();
        let Some(job) = self.jobs.get_mut(job_id.as_str()) else {
            return effects;
        };
        // Fencing: reports of any other attempt, or from a node outside it, change nothing.
        if attempt != job.attempt || !job.workers.contains_key(node) {
            effects.push(Effect::JobLog {
                job: job_id.clone(),
                message: format!(
                    "ignored a report of attempt {attempt} from {node} (current attempt {})",
                    job.attempt
                ),
                warn: false,
            });
            return effects;
        }
        match &event.kind {
            Some(Kind::WorkerStarted(w)) => {
                if let Some(worker) = job
                    .workers
                    .get_mut(node)
                    .filter(|w| w.phase == WorkerPhase::Starting)
                {
                    worker.phase = WorkerPhase::Running;
                    worker.pid = w.pid;
                    worker.log_path = w.log_path.clone();
                }
            }
            Some(Kind::WorkerExited(w)) => worker_exited(
                job,
                &self.nodes,
                node,
                w,
                event.at_unix_ms,
                now,
                &mut effects,
            ),
            Some(Kind::Checkpoint(c)) => {
                let inside = std::path::Path::new(&c.path).starts_with(&job.spec.checkpoint.dir);
                let known = job.checkpoint.as_ref().is_some_and(|k| k.path == c.path);
                // A checkpoint that failed verify_command stays bad, rewritten or not.
                let bad = job.bad_checkpoints.contains(&c.path);
                if !inside
                    || known
                    || bad
                    || job.workers.get(node).is_none_or(|w| w.node_rank != 0)
                    || crate::rollback::stale(job, c)
                {
                    return effects;
                }
                let step = c
                    .step
                    .map_or_else(|| "unknown step".into(), |s| format!("step {s}"));
                job.event(
                    now.wall_ms,
                    "checkpoint",
                    format!("complete checkpoint {} ({step})", c.path),
                );
                let seen = Checkpoint {
                    path: c.path.clone(),
                    step: c.step,
                    seen_at_ms: now.wall_ms,
                    attempt,
                    save_ms: c.save_ms,
                    completed_at_ms: c.completed_at_unix_ms,
                };
                goodput::on_checkpoint(job, seen.clone());
                job.checkpoint = Some(seen);
                let swap = self.stragglers.swap_at_checkpoint;
                crate::stragglers::swap(job, &self.nodes, swap, now, &mut effects);
            }
            Some(Kind::CheckpointScan(c)) => {
                super::resume_scan::answered(job, node, c, now, &mut effects);
                return effects;
            }
            _ => {}
        }
        effects.push(Effect::PersistJob(Box::new(job.clone())));
        effects
    }

    /// Progress from a heartbeat: a step that changed resets the hang clock.
    /// The job is persisted when a goodput mark (first step, caught up) is set.
    pub fn worker_progress(
        &mut self,
        node: &str,
        workers: &[v1::WorkerInfo],
        now: Now,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        for info in workers {
            let Some(job) = self.jobs.get_mut(&info.job_id) else {
                continue;
            };
            if info.attempt != job.attempt {
                continue;
            }
            let Some(w) = job.workers.get_mut(node) else {
                continue;
            };
            if w.phase == WorkerPhase::Starting {
                w.phase = WorkerPhase::Running;
                w.pid = info.pid;
            }
            if info.progress_step.is_some() && info.progress_step != w.progress_step {
                w.progress_step = info.progress_step;
                w.progress_at_ms = now.wall_ms;
                w.progress_mono = now.mono;
                crate::stragglers::sample(w, now.mono);
                let rank0 = w.node_rank == 0;
                if rank0 && crate::rollback::observe(job, &self.nodes, info, now, &mut effects) {
                    continue;
                }
                if goodput::on_progress(job, now.wall_ms) {
                    effects.push(Effect::PersistJob(Box::new(job.clone())));
                }
            }
        }
        effects
    }

    /// A node (re)registered reporting `reported` workers: adopt those of
    /// current attempts, stop the rest, and notice workers that are gone.
    pub fn reconcile_node(
        &mut self,
        node: &str,
        reported: &[v1::WorkerInfo],
        now: Now,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        for w in reported {
            let current = self.jobs.get_mut(&w.job_id).filter(|j| {
                j.phase == JobPhase::Running
                    && j.attempt == w.attempt
                    && j.workers.contains_key(node)
            });
            match current.and_then(|j| j.workers.get_mut(node)) {
                Some(worker) if !worker.phase.is_dead() => {
                    worker.phase = WorkerPhase::Running;
                    worker.pid = w.pid;
                    effects.push(Effect::JobLog {
                        job: w.job_id.clone(),
                        message: format!(
                            "adopted running worker of attempt {} on {node} (pid {})",
                            w.attempt, w.pid
                        ),
                        warn: false,
                    });
                }
                // Not a current attempt's: `commands` stops it (`stop_strays`).
                _ => {}
            }
        }
        let ids: Vec<String> = self.jobs.keys().cloned().collect();
        for id in ids {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let reported_here = reported
                .iter()
                .any(|w| w.job_id == id && w.attempt == job.attempt);
            let Some(worker) = job.workers.get_mut(node) else {
                continue;
            };
            if reported_here || worker.phase.is_dead() {
                continue;
            }
            match job.phase {
                JobPhase::Running => {
                    let reason =
                        format!("worker on {node} is gone: its agent came back without it");
                    let failure = Failure::new(&reason, node, FailureKind::WorkerGone);
                    let after = after_failure(job);
                    stop_attempt(job, &self.nodes, &failure, after, now, &mut effects);
                }
                JobPhase::Stopping => {
                    worker.phase = WorkerPhase::Stopped;
                    finish_if_stopped(job, now, &mut effects);
                }
                _ => continue,
            }
            effects.push(Effect::PersistJob(Box::new(job.clone())));
        }
        effects
    }
}
