//! Crash loops, pure: an application bug is not an infrastructure fault. When the last
//! `crash_loop.after` attempts of a job all failed the same way with no hardware culprit (same
//! failure kind, exit code and signal, within `step_tolerance` steps of each other),
//! the job ends `Failed` with a reason starting `crash loop:` instead of restarting again.
//!
//! Each attempt is judged once, when the job is about to relaunch (its backoff over, its triage,
//! if any, done): only then is it known whether a node was to blame, and evidence that trails
//! the crash (an XID a moment later) has had the backoff to arrive. The judgement is kept on the attempt
//! ([`Judged`]), so a later cordon lift or a coordinator restart does not change it.
//! - Counted: a crash or a hang with no culprit: triage failed no node, and no node of the gang is
//!   cordoned (automatically: its own evidence), unhealthy, or held by the open cordon breaker.
//! - Excused: anything else (a node failure, a lost node, an operator's restart, a loss spike,
//!   a worker its agent stopped), or a crash or hang pinned on a node. An excused attempt breaks
//!   the chain: the count starts again after it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::breaker::Held;
use crate::health::Condition;
use crate::job::{Attempt, Job, JobPhase};
use crate::kinds::FailureKind;
use crate::node::{CordonSource, Node};
use crate::state::{Effect, Now};

pub const DEFAULT_AFTER: u32 = 3;
pub const DEFAULT_STEP_TOLERANCE: u64 = 50;
/// The most of a failing worker's last output an attempt keeps.
pub const MAX_KEPT_TAIL: usize = 2048;
/// How many lines of it the job's failure reason quotes.
const QUOTED_LINES: usize = 5;

/// `[crash_loop]` in a job spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrashLoopSpec {
    /// Consecutive attempts failing the same way that end the job; 0 turns the rail off.
    pub after: u32,
    /// Failures within this many steps of each other are "about the same step". Progress is
    /// sampled once a heartbeat, so this must cover the steps a heartbeat interval spans.
    pub step_tolerance: u64,
}

impl Default for CrashLoopSpec {
    fn default() -> Self {
        Self {
            after: DEFAULT_AFTER,
            step_tolerance: DEFAULT_STEP_TOLERANCE,
        }
    }
}

impl CrashLoopSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.after == 1 {
            return Err("crash_loop.after = 1 would end the job at its first crash: use 2 or more, 0 to turn crash-loop detection off, or restart.max_restarts = 0 to never restart".into());
        }
        if self.after > 1000 {
            return Err(format!(
                "crash_loop.after = {} is more than 1000: use restart.max_restarts to bound restarts instead, or 0 to turn crash-loop detection off",
                self.after
            ));
        }
        Ok(())
    }
}

/// How an attempt's failure was judged for crash loops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Judged {
    /// It counts, with this signature ("worker exited with code 1").
    Counts(String),
    /// It does not count, and why ("triage failed gpu-003").
    Excused(String),
}

impl Judged {
    /// `counts: <signature>` or `excused: <why>`, as `clusterctl job` shows it.
    pub fn describe(&self) -> String {
        match self {
            Judged::Counts(s) => format!("counts: {s}"),
            Judged::Excused(why) => format!("excused: {why}"),
        }
    }
}

/// How the failing worker of an attempt ended: what a crash-loop signature is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Its last output (at most [`MAX_KEPT_TAIL`] bytes, whole lines).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log_tail: String,
}

impl WorkerEnd {
    pub fn new(exit_code: Option<i32>, signal: Option<i32>, log_tail: &str) -> Self {
        Self {
            exit_code,
            signal,
            log_tail: keep_tail(log_tail, MAX_KEPT_TAIL),
        }
    }
}

/// The last whole lines of `text` within `max` bytes.
fn keep_tail(text: &str, max: usize) -> String {
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let cut = &text[start..];
    cut.split_once('\n')
        .map_or(cut, |(_, rest)| rest)
        .to_owned()
}

/// The signature of a counted failure: its kind and how the worker ended.
fn signature(a: &Attempt) -> String {
    let kind = a.failure_kind.unwrap_or(FailureKind::Other);
    let end = a.worker_end.as_ref();
    match (
        kind,
        end.and_then(|e| e.signal),
        end.and_then(|e| e.exit_code),
    ) {
        (FailureKind::Hang, _, _) => "hang (no progress for hang_timeout)".into(),
        (_, Some(sig), _) => format!("worker killed by signal {sig}"),
        (_, None, Some(code)) => format!("worker exited with code {code}"),
        _ => format!("{kind} with no exit code"),
    }
}

/// Judge the last attempt of `job` (a restarting job whose triage is done), once.
fn judge(job: &mut Job, nodes: &BTreeMap<String, Node>, held: &BTreeMap<String, Held>) {
    let Some(a) = job.attempts.last_mut() else {
        return;
    };
    if a.attempt != job.attempt || a.crash_loop.is_some() {
        return;
    }
    let excuse = match a.failure_kind {
        Some(FailureKind::Crash | FailureKind::Hang) => culprit(a, nodes, held),
        Some(kind) => Some(format!("ended by {kind}, not by the program")),
        None => Some("no failure recorded".into()),
    };
    a.crash_loop = Some(match excuse {
        Some(why) => Judged::Excused(why),
        None => Judged::Counts(signature(a)),
    });
}

/// A node to blame for a crash or hang of `a`, as a reason; None when there is none.
fn culprit(
    a: &Attempt,
    nodes: &BTreeMap<String, Node>,
    held: &BTreeMap<String, Held>,
) -> Option<String> {
    let failed: Vec<&str> = a
        .triage
        .iter()
        .filter(|(_, v)| matches!(v, crate::triage::Verdict::Failed(_)))
        .map(|(n, _)| n.as_str())
        .collect();
    if !failed.is_empty() {
        return Some(format!("triage failed {}", failed.join(", ")));
    }
    // A node of the gang cordoned on its own evidence, or unhealthy, since: it was eligible
    // when the attempt was placed on it, so whatever it shows arrived during or after it.
    a.nodes.iter().find_map(|name| {
        let node = nodes.get(name)?;
        if node
            .record
            .cordon
            .as_ref()
            .is_some_and(|c| c.source == CordonSource::Auto)
        {
            Some(format!("{name} was cordoned automatically"))
        } else if node.condition == Condition::Unhealthy {
            Some(format!("{name} is unhealthy"))
        } else if held.contains_key(name) {
            Some(format!(
                "{name}'s automatic cordon is held by the open cordon breaker"
            ))
        } else {
            None
        }
    })
}

/// Where an attempt failed: its last reported step, or, with none reported, the step it resumed
/// from (0 for a fresh start). Progress arrives with heartbeats, so a crash a few steps after a
/// start is often reported at no step at all.
fn position(a: &Attempt) -> u64 {
    a.last_step
        .or_else(|| a.resumed_from.as_ref().and_then(|c| c.step))
        .unwrap_or(0)
}

/// The last `after` attempts, when they all count with one signature at about the same step.
fn looping(job: &Job) -> Option<&[Attempt]> {
    let spec = job.spec.crash_loop;
    let n = spec.after as usize;
    if n == 0 || job.attempts.len() < n {
        return None;
    }
    let last = &job.attempts[job.attempts.len() - n..];
    let first = match last.first()?.crash_loop.as_ref()? {
        Judged::Counts(s) => s,
        Judged::Excused(_) => return None,
    };
    let same = last
        .iter()
        .all(|a| matches!(&a.crash_loop, Some(Judged::Counts(s)) if s == first));
    let lo = last.iter().map(position).min()?;
    let hi = last.iter().map(position).max()?;
    (same && hi - lo <= spec.step_tolerance).then_some(last)
}

/// Judge a job about to relaunch (backoff over, triage done) and, if it is in a crash loop, end it `Failed`.
/// True when it did.
pub(crate) fn check(
    job: &mut Job,
    nodes: &BTreeMap<String, Node>,
    held: &BTreeMap<String, crate::breaker::Held>,
    now: Now,
    effects: &mut Vec<Effect>,
) -> bool {
    if job.phase != JobPhase::Restarting {
        return false;
    }
    judge(job, nodes, held);
    let Some(last) = looping(job) else {
        return false;
    };
    let numbers: Vec<String> = last.iter().map(|a| a.attempt.to_string()).collect();
    let signature = match last.last().and_then(|a| a.crash_loop.as_ref()) {
        Some(Judged::Counts(s)) => s.clone(),
        _ => return false,
    };
    let at = match last.last().and_then(|a| a.last_step) {
        Some(step) => format!("at step {step}"),
        None => "before its first reported step".to_owned(),
    };
    let tail = last
        .last()
        .and_then(|a| a.worker_end.as_ref())
        .map(|e| quote(&e.log_tail))
        .unwrap_or_default();
    let culprit = last.last().map_or("", |a| a.culprit_node.as_str());
    let on = if culprit.is_empty() {
        String::new()
    } else {
        format!(" (last on {culprit})")
    };
    let reason = format!(
        "crash loop: attempts {} failed the same way, {signature} {at}{on}, with no hardware culprit (crash_loop.after = {}); fix the program, then resubmit{}",
        numbers.join(", "),
        job.spec.crash_loop.after,
        if tail.is_empty() {
            String::new()
        } else {
            format!("; last output: {tail}")
        }
    );
    super::attempt::fail_job(job, reason, "crash-loop", now, effects);
    effects.push(Effect::PersistJob(Box::new(job.clone())));
    true
}

/// The last lines of a worker's output, on one line (`" | "` between them).
fn quote(tail: &str) -> String {
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let from = lines.len().saturating_sub(QUOTED_LINES);
    lines[from..].join(" | ")
}

#[cfg(test)]
#[path = "crash_loop_tests.rs"]
mod tests;
