//! Triage of unexplained failures, pure: when an attempt fails by a hang or
//! a crash with no unhealthy node (an NCCL timeout, say), diagnose every node
//! of the gang in parallel within a time budget, cordon the nodes that fail,
//! and only then relaunch. The verdicts go into the attempt's record and the
//! job's history.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vigil_proto::v1;

use crate::kinds::FailureKind;

use crate::job::{Job, JobPhase};
use crate::node::Availability;
use crate::state::{ClusterState, Effect, Now};

pub const DEFAULT_BUDGET: Duration = Duration::from_secs(300);
pub const DEFAULT_AFTER_FAILURES: u32 = 1;
/// `[triage]` in the coordinator's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TriageConfig {
    /// false: relaunch at once, never triage.
    pub enabled: bool,
    /// Triage from a job's Nth unexplained failure on (1: every one).
    pub after_failures: u32,
    /// How long the gang's diagnostics may take, all together.
    #[serde(with = "humantime_serde")]
    pub budget: Duration,
}

impl Default for TriageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            after_failures: DEFAULT_AFTER_FAILURES,
            budget: DEFAULT_BUDGET,
        }
    }
}

impl TriageConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.budget < Duration::from_secs(1) || self.budget > Duration::from_secs(3600) {
            return Err(format!(
                "triage.budget = {} must be between 1s and 1h",
                humantime::format_duration(self.budget)
            ));
        }
        if self.after_failures == 0 {
            return Err("triage.after_failures = 0: use 1 (every unexplained failure) or more, or enabled = false".into());
        }
        Ok(())
    }
}

/// One node's triage result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Pending,
    Passed(String),
    /// Diagnostics failed: the node is cordoned.
    Failed(String),
    /// No answer within the budget: inconclusive, the node is not cordoned.
    TimedOut,
    /// Not connected when triage began: inconclusive.
    Unreachable,
}

impl Verdict {
    pub fn describe(&self) -> String {
        match self {
            Verdict::Pending => "pending".into(),
            Verdict::Passed(s) => format!("passed ({s})"),
            Verdict::Failed(s) => format!("FAILED ({s}); cordoned"),
            Verdict::TimedOut => "no result within the budget; not cordoned".into(),
            Verdict::Unreachable => "not connected; not diagnosed".into(),
        }
    }
}

/// A triage of one failed attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Triage {
    pub attempt: u64,
    pub started_at_ms: u64,
    pub deadline_ms: u64,
    /// `deadline_ms` on the monotonic clock, which decides (re-armed when a coordinator starts).
    #[serde(skip)]
    pub deadline: crate::time::Instant,
    pub verdicts: BTreeMap<String, Verdict>,
    pub done: bool,
}

/// How many attempts of `job` ended by an unexplained failure.
fn unexplained_failures(job: &Job) -> u32 {
    let n = job
        .attempts
        .iter()
        .filter(|a| a.failure_kind.is_some_and(FailureKind::unexplained))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// May this restarting job start its next attempt, as far as triage goes?
pub fn clear_to_start(job: &Job) -> bool {
    job.triage
        .as_ref()
        .is_none_or(|t| t.done || t.attempt != job.attempt)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ClusterState {
    /// Start a triage for each job that just stopped after an unexplained
    /// failure (when the config asks for one): diagnostics on every node of
    /// the failed attempt, at once.
    pub fn start_triages(&mut self, now: Now) -> Vec<Effect> {
        let cfg = self.triage;
        let mut effects = Vec::new();
        if !cfg.enabled {
            return effects;
        }
        for job in self.jobs.values_mut() {
            let due = job.phase == JobPhase::Restarting
                && job.triage.as_ref().is_none_or(|t| t.attempt != job.attempt)
                && job.attempts.last().is_some_and(|a| {
                    a.attempt == job.attempt && a.failure_kind.is_some_and(FailureKind::unexplained)
                })
                && unexplained_failures(job) >= cfg.after_failures;
            if !due {
                continue;
            }
            let nodes = job
                .attempts
                .last()
                .map(|a| a.nodes.clone())
                .unwrap_or_default();
            let mut verdicts = BTreeMap::new();
            for node in &nodes {
                let ready = self
                    .nodes
                    .get(node)
                    .is_some_and(|n| n.availability == Availability::Ready);
                if ready {
                    verdicts.insert(node.clone(), Verdict::Pending);
                    effects.push(Effect::Command {
                        node: node.clone(),
                        kind: v1::command::Kind::RunDiagnostics(v1::RunDiagnostics {
                            timeout_ms: ms(cfg.budget),
                            command: Vec::new(),
                        }),
                    });
                } else {
                    verdicts.insert(node.clone(), Verdict::Unreachable);
                }
            }
            let msg = format!(
                "attempt {} failed with no culprit ({}): triage: diagnosing {} in parallel (budget {}) before relaunching",
                job.attempt,
                job.attempts
                    .last()
                    .and_then(|a| a.failure_kind)
                    .map_or("", FailureKind::as_str),
                nodes.join(", "),
                humantime::format_duration(cfg.budget)
            );
            job.event(now.wall_ms, "triage", msg.clone());
            effects.push(Effect::JobLog {
                job: job.id.clone(),
                message: msg,
                warn: true,
            });
            job.triage = Some(Triage {
                attempt: job.attempt,
                started_at_ms: now.wall_ms,
                deadline_ms: now.wall_ms.saturating_add(ms(cfg.budget)),
                deadline: now.mono + cfg.budget,
                verdicts,
                done: false,
            });
            finish_if_decided(job, now, &mut effects);
            effects.push(Effect::PersistJob(Box::new(job.clone())));
        }
        effects
    }

    /// A node's diagnostics reported: record the verdict in every triage
    /// waiting for it, cordon the node if it failed, finish triages that
    /// are complete.
    pub fn triage_result(
        &mut self,
        node: &str,
        passed: bool,
        summary: &str,
        now: Now,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut cordon_for: Option<String> = None;
        for job in self.jobs.values_mut() {
            let Some(t) = job.triage.as_mut().filter(|t| !t.done) else {
                continue;
            };
            let Some(v) = t.verdicts.get_mut(node).filter(|v| **v == Verdict::Pending) else {
                continue;
            };
            *v = if passed {
                Verdict::Passed(summary.to_owned())
            } else {
                cordon_for = Some(format!(
                    "triage: diagnostics failed after job {} attempt {} failed with no culprit: {summary}",
                    job.id, t.attempt
                ));
                Verdict::Failed(summary.to_owned())
            };
            finish_if_decided(job, now, &mut effects);
            effects.push(Effect::PersistJob(Box::new(job.clone())));
        }
        if let Some(reason) = cordon_for {
            let mut cordon = self.auto_cordon(node, reason, crate::kinds::CordonRule::Triage, now);
            // The cordon is persisted before the job's next attempt is placed.
            cordon.extend(effects);
            effects = cordon;
        }
        effects
    }

    /// Triages past their budget end with what they have.
    pub fn triage_tick(&mut self, now: Now) -> Vec<Effect> {
        let mut effects = Vec::new();
        for job in self.jobs.values_mut() {
            let Some(t) = job
                .triage
                .as_mut()
                .filter(|t| !t.done && now.mono >= t.deadline)
            else {
                continue;
            };
            for v in t.verdicts.values_mut() {
                if *v == Verdict::Pending {
                    *v = Verdict::TimedOut;
                }
            }
            finish_if_decided(job, now, &mut effects);
            effects.push(Effect::PersistJob(Box::new(job.clone())));
        }
        effects
    }
}

/// Every node has a verdict: record them on the attempt and in the history.
fn finish_if_decided(job: &mut Job, now: Now, effects: &mut Vec<Effect>) {
    let Some(t) = job.triage.as_mut() else {
        return;
    };
    if t.done || t.verdicts.values().any(|v| *v == Verdict::Pending) {
        return;
    }
    t.done = true;
    let verdicts = t.verdicts.clone();
    let took = now.wall_ms.saturating_sub(t.started_at_ms);
    let attempt = t.attempt;
    if let Some(a) = job.attempts.iter_mut().rev().find(|a| a.attempt == attempt) {
        a.triage = verdicts.clone();
    }
    let failed = verdicts
        .values()
        .filter(|v| matches!(v, Verdict::Failed(_)))
        .count();
    let each: Vec<String> = verdicts
        .iter()
        .map(|(n, v)| format!("{n}: {}", v.describe()))
        .collect();
    let msg = format!(
        "triage of attempt {attempt} done in {}: {failed} node(s) failed; {}",
        humantime::format_duration(Duration::from_millis(took)),
        each.join("; ")
    );
    job.event(now.wall_ms, "triage", msg.clone());
    effects.push(Effect::JobLog {
        job: job.id.clone(),
        message: msg,
        warn: failed > 0,
    });
}

#[cfg(test)]
#[path = "triage_tests.rs"]
mod tests;
