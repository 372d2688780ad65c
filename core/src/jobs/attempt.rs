//! An attempt once it runs: it fails gang-wide (a crash, a hang, a lost or unhealthy node), is
//! stopped on every node, and only once every worker is confirmed dead does the job restart (after
//! its backoff), fail for good or end cancelled; it succeeds when every worker exits 0. Its
//! clocks too: the hang watch (`jobs_tick`), and every deadline re-armed after a load.

use std::collections::BTreeMap;

use vigil_proto::v1;

use super::crash_loop::WorkerEnd;
use super::launch::stop_command;
use super::ms;
use crate::goodput;
use crate::health::Condition;
use crate::job::{AfterStop, Job, JobPhase, WorkerPhase};
use crate::kinds::FailureKind;
use crate::node::{Availability, Node};
use crate::state::{ClusterState, Effect, Now};

impl ClusterState {
    /// React to node changes in `effects`: a Lost node or an Unhealthy one
    /// fails the attempts running on it.
    pub fn react(&mut self, effects: &[Effect], now: Now) -> Vec<Effect> {
        let mut out = Vec::new();
        for e in effects {
            let (node, why) = match e {
                Effect::Availability {
                    node,
                    to: Availability::Lost,
                    ..
                } => (
                    node,
                    format!(
                        "node {node} lost (no heartbeat for {})",
                        humantime::format_duration(self.liveness.lost_after)
                    ),
                ),
                Effect::Condition {
                    node,
                    to: Condition::Unhealthy,
                    reasons,
                    ..
                } => (
                    node,
                    format!(
                        "node {node} unhealthy: {}",
                        reasons.first().map_or("", String::as_str)
                    ),
                ),
                _ => continue,
            };
            let lost = matches!(e, Effect::Availability { .. });
            let kind = if lost {
                FailureKind::NodeLost
            } else {
                FailureKind::NodeUnhealthy
            };
            // A lost node stopped working when it fell silent, not when it was declared Lost.
            let stalled_at = self.nodes.get(node).filter(|_| lost).map(|n| {
                let silent = now.mono.saturating_duration_since(n.silent_since);
                now.wall_ms.saturating_sub(ms(silent))
            });
            for job in self.jobs.values_mut().filter(|j| j.phase.holds_nodes()) {
                job.spares.retain(|s| s != node);
                let Some(worker) = job.workers.get_mut(node) else {
                    continue;
                };
                if lost && !worker.phase.is_dead() {
                    // Its lease has expired by now (lease < lost_after): the worker is dead.
                    worker.phase = WorkerPhase::Lost;
                }
                match job.phase {
                    JobPhase::Running => {
                        let after = after_failure(job);
                        let failure = Failure {
                            stalled_at_ms: stalled_at,
                            ..Failure::new(&why, node, kind)
                        };
                        stop_attempt(job, &self.nodes, &failure, after, now, &mut out);
                    }
                    JobPhase::Stopping => finish_if_stopped(job, now, &mut out),
                    _ => {}
                }
                out.push(Effect::PersistJob(Box::new(job.clone())));
            }
        }
        out
    }

    /// Arms every monotonic deadline of a state just loaded from the store (a coordinator
    /// restart, or a standby taking over). Monotonic instants mean nothing across processes, so
    /// none is persisted; each is re-derived from its wall-clock record, capped by its setting,
    /// so a wall-clock step while no coordinator ran can shorten or lengthen no deadline past it.
    /// - Progress: watched from now. Silence while no coordinator was watching is not the
    ///   job's; without this a failover longer than `hang_timeout` would restart every job.
    /// - Restart backoff: what remained of it, at most the spec's `backoff`.
    /// - Triage: what remained of its budget, at most the configured budget.
    /// - Burn-in: a diagnostic already sent is timed from its next tick (`burn_in_tick`).
    pub fn rearm_clocks(&mut self, now: Now) {
        let remaining = |at_ms: u64, cap: std::time::Duration| {
            std::time::Duration::from_millis(at_ms.saturating_sub(now.wall_ms)).min(cap)
        };
        let triage_budget = self.triage.budget;
        for job in self.jobs.values_mut() {
            if job.phase == JobPhase::Running {
                for w in job.workers.values_mut().filter(|w| !w.phase.is_dead()) {
                    w.progress_at_ms = w.progress_at_ms.max(now.wall_ms);
                    w.progress_mono = now.mono;
                }
            }
            job.restart_at = job
                .restart_at_ms
                .map(|t| now.mono + remaining(t, job.spec.restart.backoff));
            if let Some(t) = job.triage.as_mut() {
                t.deadline = now.mono + remaining(t.deadline_ms, triage_budget);
            }
            super::preflight::rearm(job, now);
        }
    }

    /// Time-driven job transitions: hangs, then the scheduler.
    pub fn jobs_tick(&mut self, now: Now) -> Vec<Effect> {
        let mut effects = self.preflight_tick(now);
        for job in self
            .jobs
            .values_mut()
            .filter(|j| j.phase == JobPhase::Running)
        {
            super::resume_scan::expire(job, now, &mut effects);
            if super::resume_scan::pending(job) || super::preflight::pending(job) {
                // Its workers have not been started: no hang to watch for.
                continue;
            }
            let timeout = job.spec.progress.hang_timeout;
            // Silence from a node nobody can hear (Unreachable: a partition, a stalled host)
            // is not the job's: its progress clock waits until the node is heard again, and
            // `lost_after` decides if it never is.
            for (node, w) in job.workers.iter_mut() {
                let heard = self
                    .nodes
                    .get(node)
                    .is_some_and(|n| n.availability == Availability::Ready);
                if !heard {
                    w.progress_mono = now.mono;
                }
            }
            let hung = job
                .workers
                .iter()
                .filter(|(_, w)| !w.phase.is_dead())
                .find(|(_, w)| now.mono.saturating_duration_since(w.progress_mono) > timeout)
                .map(|(n, w)| (n.clone(), w.node_rank, w.progress_step, w.progress_at_ms));
            if let Some((node, rank, step, stalled_at)) = hung {
                let last = step.map_or_else(|| "no step yet".into(), |s| format!("last step {s}"));
                let reason = format!(
                    "no progress from {node} (rank {rank}) for {} ({last}): hung",
                    humantime::format_duration(job.spec.progress.hang_timeout)
                );
                let after = after_failure(job);
                let failure = Failure {
                    stalled_at_ms: Some(stalled_at),
                    ..Failure::new(&reason, "", FailureKind::Hang)
                };
                // Before the stops: each agent captures, then stops.
                super::evidence::capture_commands(job, &mut effects);
                stop_attempt(job, &self.nodes, &failure, after, now, &mut effects);
                effects.push(Effect::PersistJob(Box::new(job.clone())));
            }
        }
        effects.extend(self.triage_tick(now));
        effects.extend(self.stragglers_tick(now));
        effects
    }
}

/// Why an attempt ends: the reason, the node blamed (if any), a stable kind
/// (a metric label), and when the fault was observed if earlier than now.
pub(super) struct Failure<'a> {
    pub(super) reason: &'a str,
    pub(super) culprit: &'a str,
    pub(super) kind: FailureKind,
    pub(super) fault_at_ms: Option<u64>,
    /// When the job stopped making progress, where known earlier than the
    /// fault was observed (a hang: its last step; a lost node: its last
    /// message). For goodput's detection time.
    pub(super) stalled_at_ms: Option<u64>,
}

impl<'a> Failure<'a> {
    pub(super) fn new(reason: &'a str, culprit: &'a str, kind: FailureKind) -> Self {
        Self {
            reason,
            culprit,
            kind,
            fault_at_ms: None,
            stalled_at_ms: None,
        }
    }
}

pub(super) fn after_failure(job: &Job) -> AfterStop {
    if job.restarts < job.spec.restart.max_restarts {
        AfterStop::Restart
    } else {
        AfterStop::Fail
    }
}

/// The attempt failed (or is cancelled): stop its workers on every node.
/// Nothing starts again until every one of them is confirmed dead.
pub(super) fn stop_attempt(
    job: &mut Job,
    nodes: &BTreeMap<String, Node>,
    failure: &Failure,
    after: AfterStop,
    now: Now,
    effects: &mut Vec<Effect>,
) {
    if job.phase != JobPhase::Running {
        return;
    }
    let (reason, culprit) = (failure.reason, failure.culprit);
    job.phase = JobPhase::Stopping;
    job.after_stop = Some(after);
    job.reason = reason.to_owned();
    job.failure_kind = Some(failure.kind);
    job.failed_at_ms.get_or_insert(now.wall_ms);
    job.fault_at_ms
        .get_or_insert(failure.fault_at_ms.unwrap_or(now.wall_ms).min(now.wall_ms));
    let stalled_at = failure
        .stalled_at_ms
        .or(failure.fault_at_ms)
        .unwrap_or(now.wall_ms);
    goodput::on_stop(job, failure.kind, stalled_at, now.wall_ms);
    let step = job.progress_step();
    let outcome = if after == AfterStop::Cancel {
        "cancelled"
    } else {
        "failed"
    };
    if let Some(a) = job.current_attempt_mut() {
        a.outcome = outcome.into();
        a.reason = reason.to_owned();
        a.culprit_node = culprit.to_owned();
        a.last_step = step;
    }
    let what = if after == AfterStop::Cancel {
        "cancelled"
    } else {
        "failed"
    };
    let msg = format!(
        "attempt {} {what}: {reason}; stopping its workers on every node",
        job.attempt
    );
    job.event(now.wall_ms, "failed", msg.clone());
    effects.push(Effect::JobLog {
        job: job.id.clone(),
        message: msg,
        warn: after != AfterStop::Cancel,
    });
    let grace = job.spec.restart.stop_grace;
    for (node, w) in job.workers.iter_mut() {
        if nodes
            .get(node)
            .is_some_and(|n| n.availability == Availability::Lost)
            && !w.phase.is_dead()
        {
            w.phase = WorkerPhase::Lost;
        }
        if w.phase == WorkerPhase::Lost {
            continue;
        }
        if !w.phase.is_dead() {
            w.phase = WorkerPhase::Stopping;
            // Its stop is a new command: sent at once, with a backoff of its own.
            w.sent = None;
        }
        // A worker still alive is sent its stop by `commands` until it is confirmed dead;
        // one that exited gets a single stop too: it confirms the node is clean.
        if w.phase == WorkerPhase::Exited {
            effects.push(Effect::Command {
                node: node.clone(),
                kind: stop_command(&job.id, job.attempt, reason, grace),
            });
        }
    }
    finish_if_stopped(job, now, effects);
}

pub(super) fn worker_exited(
    job: &mut Job,
    nodes: &BTreeMap<String, Node>,
    node: &str,
    w: &v1::WorkerExited,
    observed_at_ms: u64,
    now: Now,
    effects: &mut Vec<Effect>,
) {
    let Some(worker) = job.workers.get_mut(node) else {
        return;
    };
    let was_stopping = worker.phase == WorkerPhase::Stopping;
    worker.exit_code = w.exit_code;
    worker.signal = w.signal;
    if !w.log_path.is_empty() {
        worker.log_path = w.log_path.clone();
    }
    let rank = worker.node_rank;
    match job.phase {
        JobPhase::Running => {
            worker.phase = WorkerPhase::Exited;
            if w.exit_code == Some(0) && !w.stopped {
                job.event(
                    now.wall_ms,
                    "worker-exited",
                    format!("worker on {node} (rank {rank}) finished (exit 0)"),
                );
                if job
                    .workers
                    .values()
                    .all(|x| x.phase == WorkerPhase::Exited && x.exit_code == Some(0))
                {
                    succeed(job, now, effects);
                }
                return;
            }
            let how = match (w.exit_code, w.signal) {
                (_, Some(sig)) => format!("was killed by signal {sig}"),
                (Some(code), None) => format!("exited with code {code}"),
                (None, None) if !w.reason.is_empty() => format!("failed: {}", w.reason),
                (None, None) => "exited".to_owned(),
            };
            let stopped = if w.stopped && !w.reason.is_empty() {
                format!(" (stopped by its agent: {})", w.reason)
            } else {
                String::new()
            };
            let reason = format!("worker on {node} (rank {rank}) {how}{stopped}");
            let after = after_failure(job);
            // Stopped by its own side, unasked: fenced when the lease ran out (by the agent or
            // the worker's shim), or the agent shut down. That explains it: no triage.
            let kind = if w.stopped {
                FailureKind::WorkerGone
            } else {
                FailureKind::Crash
            };
            let failure = Failure {
                fault_at_ms: (observed_at_ms > 0).then_some(observed_at_ms),
                ..Failure::new(&reason, node, kind)
            };
            if let Some(a) = job.current_attempt_mut() {
                a.worker_end = Some(WorkerEnd::new(w.exit_code, w.signal, &w.log_tail));
            }
            stop_attempt(job, nodes, &failure, after, now, effects);
        }
        JobPhase::Stopping => {
            if !worker.phase.is_dead() || was_stopping {
                worker.phase = WorkerPhase::Stopped;
            }
            finish_if_stopped(job, now, effects);
        }
        _ => {}
    }
}

fn succeed(job: &mut Job, now: Now, effects: &mut Vec<Effect>) {
    job.phase = JobPhase::Succeeded;
    job.reason = "every worker exited 0".into();
    job.finished_at_ms = Some(now.wall_ms);
    let step = job.progress_step();
    if let Some(a) = job.current_attempt_mut() {
        a.outcome = "succeeded".into();
        a.ended_at_ms = now.wall_ms;
        a.last_step = step;
    }
    job.event(
        now.wall_ms,
        "succeeded",
        format!("attempt {} succeeded: every worker exited 0", job.attempt),
    );
    effects.push(Effect::JobLog {
        job: job.id.clone(),
        message: format!("job succeeded on attempt {}", job.attempt),
        warn: false,
    });
    job.placement.clear();
    job.spares.clear();
}

/// The job ends `Failed` for `reason` (an event of `kind`, a log line), releasing its nodes.
pub(super) fn fail_job(
    job: &mut Job,
    reason: String,
    kind: &str,
    now: Now,
    effects: &mut Vec<Effect>,
) {
    job.phase = JobPhase::Failed;
    job.finished_at_ms = Some(now.wall_ms);
    job.reason = reason;
    job.event(now.wall_ms, kind, job.reason.clone());
    effects.push(Effect::JobLog {
        job: job.id.clone(),
        message: job.reason.clone(),
        warn: true,
    });
    job.placement.clear();
    job.spares.clear();
    job.restart_at_ms = None;
    job.restart_at = None;
}

/// Once every worker of a stopping attempt is dead, move on.
pub(super) fn finish_if_stopped(job: &mut Job, now: Now, effects: &mut Vec<Effect>) {
    if job.phase != JobPhase::Stopping || !job.workers.values().all(|w| w.phase.is_dead()) {
        return;
    }
    if let Some(a) = job.current_attempt_mut() {
        a.ended_at_ms = now.wall_ms;
    }
    let attempt = job.attempt;
    super::evidence::judge_stopped(job, now, effects);
    match job.after_stop.take().unwrap_or(AfterStop::Restart) {
        AfterStop::Restart => {
            job.restarts += 1;
            job.phase = JobPhase::Restarting;
            job.restart_at_ms = Some(now.wall_ms.saturating_add(ms(job.spec.restart.backoff)));
            job.restart_at = Some(now.mono + job.spec.restart.backoff);
            let msg = format!(
                "attempt {attempt} stopped on every node; restart {}/{} after {} backoff",
                job.restarts,
                job.spec.restart.max_restarts,
                humantime::format_duration(job.spec.restart.backoff)
            );
            job.event(now.wall_ms, "stopped", msg.clone());
            effects.push(Effect::JobLog {
                job: job.id.clone(),
                message: msg,
                warn: false,
            });
        }
        AfterStop::Fail => {
            let reason = format!(
                "gave up after {} restarts (max_restarts = {}); last failure: {}",
                job.restarts, job.spec.restart.max_restarts, job.reason
            );
            fail_job(job, reason, "failed", now, effects);
        }
        AfterStop::Cancel => {
            job.phase = JobPhase::Cancelled;
            job.finished_at_ms = Some(now.wall_ms);
            job.reason = "cancelled by an operator".into();
            job.event(
                now.wall_ms,
                "cancelled",
                format!("attempt {attempt} stopped on every node; job cancelled"),
            );
            effects.push(Effect::JobLog {
                job: job.id.clone(),
                message: "job cancelled; every worker stopped".into(),
                warn: false,
            });
            job.placement.clear();
            job.spares.clear();
        }
    }
}
