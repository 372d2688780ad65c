//! The gang scheduler: a job starts on exactly `nodes` eligible nodes, keeping the healthy
//! nodes of its last placement (rank order), then its spares, then free nodes; its spares are
//! held for it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::goodput;
use crate::health::Condition;
use crate::job::{Attempt, Checkpoint, Job, JobPhase, Worker, WorkerPhase};
use crate::kinds::FailureKind;
use crate::node::{Availability, Node};
use crate::state::{ClusterState, Effect, Now};

/// May `node` take new work needing `gpus` healthy GPUs?
pub fn eligible(node: &Node, gpus: u32) -> bool {
    node.availability == Availability::Ready
        && node.record.cordon.is_none()
        && node.condition != Condition::Unhealthy
        && node.gpus_healthy() >= gpus
}

impl ClusterState {
    /// Start every job that can start: Pending ones and Restarting ones past
    /// their backoff; refill spares. While an unconfirmed recovery hold holds jobs, none
    /// starts: each waits Pending, its reason saying why (`recovery::JOBS_HELD`).
    pub fn schedule(&mut self, now: Now) -> Vec<Effect> {
        let mut effects = self.start_triages(now);
        let held = self.jobs_held();
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
            // Judged at the relaunch, not at the stop: triage is done by then, and evidence
            // that trails the crash (an XID a moment later) has had the backoff to arrive.
            if ready_to_start
                && job.phase == JobPhase::Restarting
                && super::crash_loop::check(job, &self.nodes, &self.breaker.held, now, &mut effects)
            {
                continue;
            }
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
            if held {
                let reason = crate::recovery::JOBS_HELD.to_owned();
                wait(job, reason, now, &mut holders, &mut free, &mut effects);
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
                wait(job, reason, now, &mut holders, &mut free, &mut effects);
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

/// `job` could start but does not: it waits `Pending` for `reason`, holding no node (changed
/// and persisted only when its phase or reason changes).
fn wait(
    job: &mut Job,
    reason: String,
    now: Now,
    holders: &mut HashMap<String, String>,
    free: &mut HashMap<u32, usize>,
    effects: &mut Vec<Effect>,
) {
    if job.reason == reason && job.phase == JobPhase::Pending {
        return;
    }
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
    // Counting free nodes scans the whole cluster: only for a job short of spares (after
    // every registration of a reconnect storm, a job with its spares would pay it again).
    let short = job.spares.len() < want;
    if short
        && *free
            .entry(gpus)
            .or_insert_with(|| count_free(nodes, holders, gpus))
            > 0
    {
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
        .filter(|(name, node)| eligible(node, gpus) && !holders.contains_key(name.as_str()))
        .count()
}

pub(super) fn release(job: &mut Job) {
    job.placement.clear();
    job.spares.clear();
    job.workers.clear();
    job.restart_at_ms = None;
    job.restart_at = None;
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
            kind: job.failure_kind.take().unwrap_or(FailureKind::Other),
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
    });
    goodput::on_start(job);
    super::resume_scan::begin(job, now);
    let from = Checkpoint::describe(job.checkpoint.as_ref());
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
    super::preflight::begin(job, now);
    // The StartWorker commands follow from the Starting workers (`commands`), once a relaunch's
    // checkpoint scan is answered (`resume_scan`) and the gang preflight passed (`preflight`).
}
