//! Goodput accounting, pure: where a job's wall time went (productive
//! training, or lost to queueing, start-up and each failure's detection,
//! teardown, waiting for nodes, start-up and recomputation), its effective
//! training time ratio (ETTR), and the checkpoint interval Young's formula
//! suggests from the observed failure rate and checkpoint save time.
//!
//! The job state machine (`jobs`) only records marks on each attempt (fault,
//! detection, first step, caught up); [`account`] turns them into a timeline
//! whose segments cover `[submitted, end)` exactly once, so
//! productive + lost = wall by construction.

use crate::job::{Attempt, Checkpoint, Job, MAX_CHECKPOINT_HISTORY};
use crate::kinds::FailureKind;

/// Where one stretch of wall time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Submitted, waiting for the first placement.
    Queued,
    /// Attempt started, no step reported yet.
    Startup,
    /// Redoing steps an earlier attempt had done after its last checkpoint.
    Recomputation,
    /// Making new progress (or running with no failure yet seen).
    Productive,
    /// The fault happened, the coordinator had not noticed yet.
    Detection,
    /// Stopping the failed attempt's workers on every node.
    Teardown,
    /// Backoff and waiting for eligible nodes before the next attempt.
    Waiting,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Startup => "startup",
            Phase::Recomputation => "recomputation",
            Phase::Productive => "productive",
            Phase::Detection => "detection",
            Phase::Teardown => "teardown",
            Phase::Waiting => "waiting",
        }
    }

    /// The phases that are lost time (everything but productive).
    pub const LOST: [Phase; 6] = [
        Phase::Queued,
        Phase::Detection,
        Phase::Teardown,
        Phase::Waiting,
        Phase::Startup,
        Phase::Recomputation,
    ];
}

/// One stretch of the timeline; `failure` is the index into
/// [`Goodput::failures`] of the failure it is charged to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub phase: Phase,
    pub from_ms: u64,
    pub to_ms: u64,
    pub attempt: u64,
    pub failure: Option<usize>,
}

/// The time one failure (or operator interruption) cost, by phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureCost {
    /// The attempt that ended.
    pub attempt: u64,
    pub kind: String,
    pub reason: String,
    pub culprit_node: String,
    pub fault_at_ms: u64,
    pub detection_ms: u64,
    pub teardown_ms: u64,
    pub waiting_ms: u64,
    pub startup_ms: u64,
    pub recomputation_ms: u64,
    /// Steps done after the checkpoint the next attempt resumed from.
    pub steps_lost: Option<u64>,
}

impl FailureCost {
    pub fn total_ms(&self) -> u64 {
        self.detection_ms
            + self.teardown_ms
            + self.waiting_ms
            + self.startup_ms
            + self.recomputation_ms
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Goodput {
    /// From submission to the end (terminal state) or now.
    pub wall_ms: u64,
    pub productive_ms: u64,
    /// wall - productive: the sum of every lost phase below.
    pub lost_ms: u64,
    pub queued_ms: u64,
    pub detection_ms: u64,
    pub teardown_ms: u64,
    pub waiting_ms: u64,
    pub startup_ms: u64,
    pub recomputation_ms: u64,
    /// productive / wall; 0 for a job with no wall time yet.
    pub ettr: f64,
    pub failures: Vec<FailureCost>,
    pub segments: Vec<Segment>,
    /// Time attempts ran per failure that was not an operator's doing.
    pub mtbf_ms: Option<u64>,
    /// Median checkpoint save time the agent measured.
    pub checkpoint_save_ms: Option<u64>,
    /// Median time between consecutive checkpoints of one attempt.
    pub checkpoint_interval_ms: Option<u64>,
    /// Young: sqrt(2 × save time × MTBF).
    pub suggested_interval_ms: Option<u64>,
}

/// Builds the timeline: each `to` closes the stretch since the last one.
pub(crate) struct Timeline {
    end: u64,
    cursor: u64,
    segments: Vec<Segment>,
}

impl Timeline {
    /// An empty timeline of `[start, end)`.
    pub(crate) fn new(start: u64, end: u64) -> Self {
        Self {
            end,
            cursor: start,
            segments: Vec::new(),
        }
    }

    pub(crate) fn to(&mut self, at_ms: u64, phase: Phase, attempt: u64, failure: Option<usize>) {
        let at = at_ms.clamp(self.cursor, self.end);
        if at > self.cursor {
            self.segments.push(Segment {
                phase,
                from_ms: self.cursor,
                to_ms: at,
                attempt,
                failure,
            });
        }
        self.cursor = at;
    }
}

fn interrupted(a: &Attempt) -> bool {
    a.detected_at_ms > 0
}

/// Where `job`'s wall time went, as of `now_ms`.
pub fn account(job: &Job, now_ms: u64) -> Goodput {
    let end = job
        .finished_at_ms
        .unwrap_or(now_ms)
        .max(job.submitted_at_ms);
    let mut t = Timeline::new(job.submitted_at_ms, end);
    let mut failures: Vec<FailureCost> = Vec::new();
    // The failure the time since the last interruption is charged to.
    let mut charged: Option<usize> = None;
    for (i, a) in job.attempts.iter().enumerate() {
        let before = if i == 0 {
            Phase::Queued
        } else {
            Phase::Waiting
        };
        t.to(a.started_at_ms, before, a.attempt, charged);
        let stop = if interrupted(a) {
            a.fault_at_ms.min(a.detected_at_ms)
        } else if a.ended_at_ms > 0 {
            a.ended_at_ms
        } else {
            end
        };
        t.to(
            a.first_progress_at_ms.unwrap_or(stop),
            Phase::Startup,
            a.attempt,
            charged,
        );
        if a.catch_up_step.is_some() {
            t.to(
                a.caught_up_at_ms.unwrap_or(stop),
                Phase::Recomputation,
                a.attempt,
                charged,
            );
        }
        t.to(stop, Phase::Productive, a.attempt, None);
        if !interrupted(a) {
            continue;
        }
        let next = job.attempts.get(i + 1);
        let from = next
            .and_then(|n| n.resumed_from.as_ref())
            .and_then(|c| c.step)
            .unwrap_or(0);
        // Once the next attempt started, the steps it must redo are exactly its catch-up
        // target past its checkpoint (the gang's high-water mark, which also counts progress
        // reported after the stop was decided): the same number its recomputation time is
        // measured against, so the two never disagree. Before that, the last step known.
        let steps_lost = match next {
            Some(n) => Some(n.catch_up_step.map_or(0, |high| high.saturating_sub(from))),
            None => a.last_step.map(|s| s.saturating_sub(from)),
        };
        failures.push(FailureCost {
            attempt: a.attempt,
            kind: a
                .failure_kind
                .map_or_else(String::new, |k| k.as_str().to_owned()),
            reason: a.reason.clone(),
            culprit_node: a.culprit_node.clone(),
            fault_at_ms: a.fault_at_ms,
            steps_lost,
            ..FailureCost::default()
        });
        charged = Some(failures.len() - 1);
        t.to(a.detected_at_ms, Phase::Detection, a.attempt, charged);
        let stopped = if a.ended_at_ms > 0 {
            a.ended_at_ms
        } else {
            end
        };
        t.to(stopped, Phase::Teardown, a.attempt, charged);
    }
    let last = job.attempts.last();
    let tail = match last {
        None => Phase::Queued,
        Some(a) if interrupted(a) => Phase::Waiting,
        Some(_) => Phase::Productive,
    };
    let tail_failure = if tail == Phase::Waiting {
        charged
    } else {
        None
    };
    t.to(end, tail, last.map_or(0, |a| a.attempt), tail_failure);

    let mut g = totals(end - job.submitted_at_ms, t, failures);
    g.mtbf_ms = mtbf(job, end);
    g.checkpoint_save_ms = median(job.checkpoints.iter().filter_map(|c| c.save_ms).collect());
    g.checkpoint_interval_ms = checkpoint_interval(&job.checkpoints);
    g.suggested_interval_ms = suggested_interval(g.checkpoint_save_ms, g.mtbf_ms);
    g
}

/// The sums of a finished timeline of `wall_ms`: time by phase, each failure's cost, ETTR.
pub(crate) fn totals(wall_ms: u64, t: Timeline, mut failures: Vec<FailureCost>) -> Goodput {
    let mut g = Goodput {
        wall_ms,
        ..Goodput::default()
    };
    for s in &t.segments {
        let d = s.to_ms - s.from_ms;
        let slot = match s.phase {
            Phase::Productive => &mut g.productive_ms,
            Phase::Queued => &mut g.queued_ms,
            Phase::Detection => &mut g.detection_ms,
            Phase::Teardown => &mut g.teardown_ms,
            Phase::Waiting => &mut g.waiting_ms,
            Phase::Startup => &mut g.startup_ms,
            Phase::Recomputation => &mut g.recomputation_ms,
        };
        *slot += d;
        if let Some(f) = s.failure.and_then(|i| failures.get_mut(i)) {
            match s.phase {
                Phase::Detection => f.detection_ms += d,
                Phase::Teardown => f.teardown_ms += d,
                Phase::Waiting | Phase::Queued => f.waiting_ms += d,
                Phase::Startup => f.startup_ms += d,
                Phase::Recomputation => f.recomputation_ms += d,
                Phase::Productive => {}
            }
        }
    }
    g.lost_ms = g.wall_ms - g.productive_ms;
    g.ettr = if g.wall_ms == 0 {
        0.0
    } else {
        g.productive_ms as f64 / g.wall_ms as f64
    };
    g.failures = failures;
    g.segments = t.segments;
    g
}

/// Young's interval, once a save was measured (a save time of 0, files whose times are
/// equal, is no measurement: it would suggest checkpointing continuously) and a failure seen.
fn suggested_interval(save_ms: Option<u64>, mtbf_ms: Option<u64>) -> Option<u64> {
    match (save_ms, mtbf_ms) {
        (Some(save), Some(mtbf)) if save > 0 => Some(young(save, mtbf)).filter(|s| *s > 0),
        _ => None,
    }
}

/// Young's optimum checkpoint interval: sqrt(2 × save × MTBF).
pub fn young(save_ms: u64, mtbf_ms: u64) -> u64 {
    (2.0 * save_ms as f64 * mtbf_ms as f64).sqrt().round() as u64
}

/// Running time per failure that was not an operator's doing.
fn mtbf(job: &Job, end: u64) -> Option<u64> {
    let ran: u64 = job
        .attempts
        .iter()
        .map(|a| {
            let stop = if interrupted(a) {
                a.detected_at_ms
            } else if a.ended_at_ms > 0 {
                a.ended_at_ms
            } else {
                end
            };
            stop.saturating_sub(a.started_at_ms)
        })
        .sum();
    let failures = job
        .attempts
        .iter()
        .filter(|a| interrupted(a) && !a.failure_kind.is_some_and(FailureKind::by_choice))
        .count() as u64;
    (failures > 0).then(|| ran / failures)
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// When a checkpoint was written: its save's completion as the agent read it from the files,
/// else (an older agent) when the coordinator heard of it.
fn written_at(c: &Checkpoint) -> u64 {
    c.completed_at_ms.unwrap_or(c.seen_at_ms)
}

/// Median gap between consecutive checkpoints written by the same attempt, by when they were
/// written: arrivals bunch up (an agent reports what its scan found in one batch), so the
/// gaps between arrivals are the report cadence, not the checkpoint interval.
fn checkpoint_interval(history: &[Checkpoint]) -> Option<u64> {
    median(
        history
            .windows(2)
            .filter(|w| w[0].attempt == w[1].attempt)
            .map(|w| written_at(&w[1]).saturating_sub(written_at(&w[0])))
            .collect(),
    )
}

/// A complete checkpoint was seen: remember it (bounded).
pub fn on_checkpoint(job: &mut Job, checkpoint: Checkpoint) {
    if job.checkpoints.len() >= MAX_CHECKPOINT_HISTORY {
        job.checkpoints.remove(0);
    }
    job.checkpoints.push(checkpoint);
}

/// Attempt `job.attempt` just started: steps past its checkpoint up to the
/// job's high-water mark will be recomputed.
pub fn on_start(job: &mut Job) {
    let from = job.checkpoint.as_ref().and_then(|c| c.step).unwrap_or(0);
    let high = job.high_water_step.filter(|h| *h > from);
    if let Some(a) = job.current_attempt_mut() {
        a.catch_up_step = high;
    }
}

/// The gang's step: every worker's lowest, 0 for a worker with none yet.
fn gang_step(job: &Job) -> u64 {
    job.workers
        .values()
        .map(|w| w.progress_step.unwrap_or(0))
        .min()
        .unwrap_or(0)
}

/// Progress arrived. Returns true when a mark changed (persist the job).
pub fn on_progress(job: &mut Job, now_ms: u64) -> bool {
    let any = job.workers.values().any(|w| w.progress_step.is_some());
    let gang = gang_step(job);
    if any && job.high_water_step.is_none_or(|h| gang > h) {
        job.high_water_step = Some(gang);
    }
    let Some(a) = job.current_attempt_mut() else {
        return false;
    };
    let mut changed = false;
    if any && a.first_progress_at_ms.is_none() {
        a.first_progress_at_ms = Some(now_ms);
        changed = true;
    }
    if let Some(target) = a.catch_up_step
        && a.caught_up_at_ms.is_none()
        && gang >= target
    {
        a.caught_up_at_ms = Some(now_ms);
        changed = true;
    }
    changed
}

/// The current attempt is being stopped: record when its work stopped
/// (`fault_at_ms`) and when the coordinator noticed (`now_ms`).
pub fn on_stop(job: &mut Job, kind: FailureKind, fault_at_ms: u64, now_ms: u64) {
    if let Some(a) = job.current_attempt_mut()
        && a.detected_at_ms == 0
    {
        a.detected_at_ms = now_ms;
        a.fault_at_ms = fault_at_ms.min(now_ms);
        a.failure_kind = Some(kind);
    }
}

#[cfg(test)]
#[path = "goodput_tests.rs"]
mod tests;
