//! The job state machine and gang scheduler, pure: (cluster state, input,
//! now) -> new state + effects. Jobs start on exactly `nodes` eligible nodes,
//! fail gang-wide, are stopped everywhere before attempt N+1 starts, and
//! resume from their last complete checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use vigil_proto::v1;

use crate::goodput;
use crate::health::Condition;
use crate::job::{AfterStop, Attempt, Checkpoint, Job, JobPhase, Worker, WorkerPhase};
use crate::jobspec;
use crate::node::{Availability, Node};
use crate::state::{ClusterState, Effect, Now, StateError};

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// May `node` take new work needing `gpus` healthy GPUs?
pub fn eligible(node: &Node, gpus: u32) -> bool {
    node.availability == Availability::Ready
        && node.record.cordon.is_none()
        && node.condition != Condition::Unhealthy
        && node.gpus_healthy() >= gpus
}

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
            failure_kind: String::new(),
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
                let failure = Failure::new("cancelled by an operator", "", "cancelled");
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
                let failure = Failure::new(&why, "", "drain");
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

    /// WorkerStarted / WorkerExited / CheckpointSeen from `node`.
    pub fn worker_event(&mut self, node: &str, event: &v1::AgentEvent, now: Now) -> Vec<Effect> {
        use v1::agent_event::Kind;
        let (job_id, attempt) = match &event.kind {
            Some(Kind::WorkerStarted(w)) => (&w.job_id, w.attempt),
            Some(Kind::WorkerExited(w)) => (&w.job_id, w.attempt),
            Some(Kind::Checkpoint(c)) => (&c.job_id, c.attempt),
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
                if !inside
                    || known
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
                };
                goodput::on_checkpoint(job, seen.clone());
                job.checkpoint = Some(seen);
                let swap = self.stragglers.swap_at_checkpoint;
                crate::stragglers::swap(job, &self.nodes, swap, now, &mut effects);
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
                    let failure = Failure::new(&reason, node, "worker_gone");
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
            let kind = if lost { "node_lost" } else { "node_unhealthy" };
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
        }
    }

    /// Time-driven job transitions: hangs, then the scheduler.
    pub fn jobs_tick(&mut self, now: Now) -> Vec<Effect> {
        let mut effects = Vec::new();
        for job in self
            .jobs
            .values_mut()
            .filter(|j| j.phase == JobPhase::Running)
        {
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
                    ..Failure::new(&reason, "", "hang")
                };
                stop_attempt(job, &self.nodes, &failure, after, now, &mut effects);
                effects.push(Effect::PersistJob(Box::new(job.clone())));
            }
        }
        effects.extend(self.triage_tick(now));
        effects.extend(self.stragglers_tick(now));
        effects
    }

    /// Start every job that can start: Pending ones and Restarting ones past
    /// their backoff; refill spares.
    pub fn schedule(&mut self, now: Now) -> Vec<Effect> {
        let mut effects = self.start_triages(now);
        let mut order: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| !j.phase.is_terminal())
            .map(|j| (j.seq, j.id.clone()))
            .collect();
        order.sort();
        // Who holds each node, and how many eligible nodes are free per GPU
        // need: computed once per pass (and again only after a job takes
        // nodes), so waiting jobs cost next to nothing on every tick.
        let mut holders = self.holders();
        let mut free: HashMap<u32, usize> = HashMap::new();
        for (_, id) in order {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let ready_to_start = match job.phase {
                JobPhase::Pending => true,
                JobPhase::Restarting => {
                    job.restart_at.is_none_or(|t| now.mono >= t)
                        && crate::triage::clear_to_start(job)
                }
                _ => false,
            };
            let gpus = job.spec.gpus_per_node;
            let nodes = &self.nodes;
            let avoid = job.avoid.clone();
            let ok = |n: &str, holders: &HashMap<String, String>| {
                holders.get(n).is_none_or(|h| *h == id)
                    && nodes.get(n).is_some_and(|node| eligible(node, gpus))
                    && !avoid.contains(n)
            };
            if job.phase.holds_nodes() && reserve_spares(job, nodes, &mut holders, &mut free) {
                effects.push(Effect::PersistJob(Box::new(job.clone())));
            }
            if !ready_to_start {
                continue;
            }
            let wanted = job.spec.nodes as usize;
            let own: BTreeSet<&String> = job
                .placement
                .iter()
                .chain(job.spares.iter())
                .filter(|n| ok(n, &holders) && holders.contains_key(n.as_str()))
                .collect();
            let available = own.len()
                + *free
                    .entry(gpus)
                    .or_insert_with(|| count_free(nodes, &holders, gpus));
            if available < wanted {
                let reason = format!(
                    "waiting for {wanted} eligible nodes (Ready, not cordoned, not in another job, {gpus} healthy GPUs); {available} available"
                );
                if job.reason != reason || job.phase != JobPhase::Pending {
                    if job.phase == JobPhase::Restarting {
                        job.event(now.wall_ms, "pending", reason.clone());
                    }
                    job.phase = JobPhase::Pending;
                    job.reason = reason;
                    for n in job.placement.iter().chain(job.spares.iter()) {
                        holders.remove(n);
                    }
                    free.clear();
                    release(job);
                    effects.push(Effect::PersistJob(Box::new(job.clone())));
                }
                continue;
            }
            // Keep the healthy nodes of the last placement (rank order), then spares, then free nodes.
            let mut chosen: Vec<String> = Vec::with_capacity(wanted);
            let mut taken: HashSet<&str> = HashSet::with_capacity(wanted);
            for n in job
                .placement
                .iter()
                .chain(job.spares.iter())
                .chain(nodes.keys())
            {
                if chosen.len() >= wanted {
                    break;
                }
                if ok(n, &holders) && taken.insert(n.as_str()) {
                    chosen.push(n.clone());
                }
            }
            drop(taken);
            for n in &chosen {
                holders.insert(n.clone(), id.clone());
            }
            free.clear();
            // Spares are few: a linear look-up is cheapest.
            job.spares.retain(|s| !chosen.contains(s));
            start_attempt(job, chosen, now, &mut effects);
            // Its spares too, in this same pass: a later job must not take them.
            reserve_spares(job, nodes, &mut holders, &mut free);
            effects.push(Effect::PersistJob(Box::new(job.clone())));
        }
        effects
    }

    /// The job holding each node (placement or spare), for jobs that hold nodes.
    fn holders(&self) -> HashMap<String, String> {
        self.jobs
            .values()
            .filter(|j| j.phase.holds_nodes())
            .flat_map(|j| {
                j.placement
                    .iter()
                    .chain(j.spares.iter())
                    .map(move |n| (n.clone(), j.id.clone()))
            })
            .collect()
    }
}

/// Keep `job`'s spares eligible and top them up to `spare_nodes` from free nodes, marking
/// them held; whether its spares changed.
fn reserve_spares(
    job: &mut Job,
    nodes: &BTreeMap<String, Node>,
    holders: &mut HashMap<String, String>,
    free: &mut HashMap<u32, usize>,
) -> bool {
    let gpus = job.spec.gpus_per_node;
    let id = job.id.clone();
    let avoid = job.avoid.clone();
    let ok = |n: &str, holders: &HashMap<String, String>| {
        holders.get(n).is_none_or(|h| *h == id)
            && nodes.get(n).is_some_and(|node| eligible(node, gpus))
            && !avoid.contains(n)
    };
    let before = job.spares.clone();
    job.spares.retain(|s| ok(s, holders));
    let want = job.spec.spare_nodes as usize;
    let free_now = *free
        .entry(gpus)
        .or_insert_with(|| count_free(nodes, holders, gpus));
    if job.spares.len() < want && free_now > 0 {
        let extra: Vec<String> = nodes
            .keys()
            .filter(|n| ok(n, holders) && !job.placement.contains(n) && !job.spares.contains(n))
            .take(want - job.spares.len())
            .cloned()
            .collect();
        for n in &extra {
            holders.insert(n.clone(), id.clone());
        }
        free.clear();
        job.spares.extend(extra);
    }
    job.spares != before
}

/// Eligible nodes that no job holds.
fn count_free(
    nodes: &BTreeMap<String, Node>,
    holders: &HashMap<String, String>,
    gpus: u32,
) -> usize {
    nodes
        .iter()
        .filter(|(name, node)| !holders.contains_key(name.as_str()) && eligible(node, gpus))
        .count()
}

pub(crate) fn after_failure(job: &Job) -> AfterStop {
    if job.restarts < job.spec.restart.max_restarts {
        AfterStop::Restart
    } else {
        AfterStop::Fail
    }
}

fn release(job: &mut Job) {
    job.placement.clear();
    job.spares.clear();
    job.workers.clear();
    job.restart_at_ms = None;
    job.restart_at = None;
}

pub(crate) fn stop_command(
    job_id: &str,
    attempt: u64,
    reason: &str,
    grace: std::time::Duration,
) -> v1::command::Kind {
    v1::command::Kind::StopWorkers(v1::StopWorkers {
        job_id: job_id.to_owned(),
        attempt,
        reason: reason.to_owned(),
        grace_ms: ms(grace),
    })
}

/// The `StartWorker` of `node`'s worker in `job`'s current attempt (`None`: not placed there).
pub(crate) fn start_command(
    job: &Job,
    nodes: &BTreeMap<String, Node>,
    node: &str,
) -> Option<v1::command::Kind> {
    let rank = job.placement.iter().position(|n| n == node)?;
    Some(v1::command::Kind::StartWorker(v1::StartWorker {
        job_id: job.id.clone(),
        attempt: job.attempt,
        node_rank: u32::try_from(rank).unwrap_or(u32::MAX),
        nnodes: u32::try_from(job.placement.len()).unwrap_or(u32::MAX),
        command: job.spec.command.clone(),
        workdir: job.spec.workdir.clone(),
        env: worker_env(job, nodes, rank).into_iter().collect(),
        checkpoint_dir: if rank == 0 {
            job.spec.checkpoint.dir.clone()
        } else {
            String::new()
        },
        checkpoint_layout: job.spec.checkpoint.layout.clone(),
        stop_grace_ms: ms(job.spec.restart.stop_grace),
    }))
}

/// The environment of one worker: the spec's env, then vigil's variables and
/// the launcher conventions (torchrun's PET_*, Lightning/DeepSpeed's NODE_RANK).
pub fn worker_env(
    job: &Job,
    nodes: &BTreeMap<String, Node>,
    rank: usize,
) -> BTreeMap<String, String> {
    let mut env = job.spec.env.clone();
    env.extend(job.env_override.clone());
    let nnodes = job.placement.len().to_string();
    let master = job
        .placement
        .first()
        .and_then(|n| nodes.get(n))
        .map_or_else(|| "127.0.0.1".to_owned(), |n| n.record.address.clone());
    let port = job.spec.master_port.to_string();
    let gpus = job
        .placement
        .get(rank)
        .and_then(|n| nodes.get(n))
        .map(|n| {
            n.record
                .gpus
                .iter()
                .filter(|g| n.health.gpu_condition(g.index).0 != Condition::Unhealthy)
                .take(job.spec.gpus_per_node as usize)
                .map(|g| g.index.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let r = rank.to_string();
    let vars = [
        ("VIGIL_JOB_ID", job.id.clone()),
        ("VIGIL_ATTEMPT", job.attempt.to_string()),
        ("VIGIL_NNODES", nnodes.clone()),
        ("VIGIL_NODE_RANK", r.clone()),
        ("CUDA_VISIBLE_DEVICES", gpus),
        ("MASTER_ADDR", master.clone()),
        ("MASTER_PORT", port.clone()),
        ("NODE_RANK", r.clone()),
        ("GROUP_RANK", r.clone()),
        ("PET_NNODES", nnodes),
        ("PET_NODE_RANK", r),
        ("PET_MASTER_ADDR", master),
        ("PET_MASTER_PORT", port),
        ("PET_NPROC_PER_NODE", job.spec.gpus_per_node.to_string()),
    ];
    env.extend(vars.into_iter().map(|(k, v)| (k.to_owned(), v)));
    match &job.checkpoint {
        Some(c) => env.insert("VIGIL_RESUME_FROM".into(), c.path.clone()),
        None => env.remove("VIGIL_RESUME_FROM"),
    };
    env
}

fn start_attempt(job: &mut Job, placement: Vec<String>, now: Now, effects: &mut Vec<Effect>) {
    job.attempt += 1;
    job.placement = placement;
    job.avoid.clear();
    job.phase = JobPhase::Running;
    job.reason = String::new();
    job.after_stop = None;
    job.restart_at_ms = None;
    job.restart_at = None;
    if let Some(failed) = job.failed_at_ms.take() {
        let lost_ms = now.wall_ms.saturating_sub(failed);
        job.lost_ms += lost_ms;
        let fault_at = job.fault_at_ms.take().unwrap_or(failed);
        effects.push(Effect::Restarted {
            job: job.id.clone(),
            kind: std::mem::take(&mut job.failure_kind),
            lost_ms,
            fault_to_relaunch_ms: now.wall_ms.saturating_sub(fault_at),
        });
    }
    job.workers = job
        .placement
        .iter()
        .enumerate()
        .map(|(rank, n)| {
            let worker = Worker {
                node_rank: u32::try_from(rank).unwrap_or(u32::MAX),
                phase: WorkerPhase::Starting,
                pid: 0,
                exit_code: None,
                signal: None,
                progress_step: None,
                progress_at_ms: now.wall_ms,
                progress_mono: now.mono,
                sent: None,
                log_path: String::new(),
                rate_samples: Default::default(),
            };
            (n.clone(), worker)
        })
        .collect();
    job.attempts.push(Attempt {
        attempt: job.attempt,
        nodes: job.placement.clone(),
        started_at_ms: now.wall_ms,
        ended_at_ms: 0,
        outcome: "running".into(),
        reason: String::new(),
        culprit_node: String::new(),
        resumed_from: job.checkpoint.clone(),
        last_step: None,
        fault_at_ms: 0,
        detected_at_ms: 0,
        failure_kind: String::new(),
        first_progress_at_ms: None,
        catch_up_step: None,
        caught_up_at_ms: None,
        triage: BTreeMap::new(),
    });
    goodput::on_start(job);
    let from = job.checkpoint.as_ref().map_or_else(
        || "a fresh start".to_owned(),
        |c| {
            format!(
                "checkpoint {} (step {})",
                c.path,
                c.step.map_or_else(|| "?".into(), |s| s.to_string())
            )
        },
    );
    let msg = format!(
        "attempt {} starting on {} from {from}",
        job.attempt,
        job.placement.join(",")
    );
    job.event(now.wall_ms, "started", msg.clone());
    effects.push(Effect::JobLog {
        job: job.id.clone(),
        message: msg,
        warn: false,
    });
    // The StartWorker commands follow from the Starting workers (`commands`).
}

/// Why an attempt ends: the reason, the node blamed (if any), a stable kind
/// (a metric label), and when the fault was observed if earlier than now.
pub(crate) struct Failure<'a> {
    pub(crate) reason: &'a str,
    pub(crate) culprit: &'a str,
    pub(crate) kind: &'static str,
    pub(crate) fault_at_ms: Option<u64>,
    /// When the job stopped making progress, where known earlier than the
    /// fault was observed (a hang: its last step; a lost node: its last
    /// message). For goodput's detection time.
    pub(crate) stalled_at_ms: Option<u64>,
}

impl<'a> Failure<'a> {
    pub(crate) fn new(reason: &'a str, culprit: &'a str, kind: &'static str) -> Self {
        Self {
            reason,
            culprit,
            kind,
            fault_at_ms: None,
            stalled_at_ms: None,
        }
    }
}

/// The attempt failed (or is cancelled): stop its workers on every node.
/// Nothing starts again until every one of them is confirmed dead.
pub(crate) fn stop_attempt(
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
    job.failure_kind = failure.kind.to_owned();
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

fn worker_exited(
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
            let failure = Failure {
                fault_at_ms: (observed_at_ms > 0).then_some(observed_at_ms),
                ..Failure::new(&reason, node, "crash")
            };
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

/// Once every worker of a stopping attempt is dead, move on.
fn finish_if_stopped(job: &mut Job, now: Now, effects: &mut Vec<Effect>) {
    if job.phase != JobPhase::Stopping || !job.workers.values().all(|w| w.phase.is_dead()) {
        return;
    }
    if let Some(a) = job.current_attempt_mut() {
        a.ended_at_ms = now.wall_ms;
    }
    let attempt = job.attempt;
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
            job.phase = JobPhase::Failed;
            job.finished_at_ms = Some(now.wall_ms);
            job.reason = format!(
                "gave up after {} restarts (max_restarts = {}); last failure: {}",
                job.restarts, job.spec.restart.max_restarts, job.reason
            );
            job.event(now.wall_ms, "failed", job.reason.clone());
            effects.push(Effect::JobLog {
                job: job.id.clone(),
                message: job.reason.clone(),
                warn: true,
            });
            job.placement.clear();
            job.spares.clear();
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

#[cfg(test)]
#[path = "jobs_tests.rs"]
mod tests;
