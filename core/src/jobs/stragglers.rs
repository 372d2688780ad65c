//! Stragglers, pure: each worker's step rate over a sliding window, compared
//! with its gang's median; a node consistently slower than the median by
//! `stragglers.slower_than` for `stragglers.for`, or whose GPUs report HW
//! slowdown, thermal or power-brake throttling for as long while it runs the
//! job, is flagged `Degraded: straggler` (still schedulable; the job goes on)
//! until it keeps up again or the attempt ends.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::health::{Condition, Finding};
use crate::job::{AfterStop, Job, JobPhase, Worker};
use crate::jobs::{Failure, stop_attempt};
use crate::kinds::FailureKind;
use crate::node::Node;
use crate::state::{ClusterState, Effect, Now};
use crate::time::Instant;

/// Step changes kept per worker.
const MAX_SAMPLES: usize = 64;

/// `[stragglers]` in the coordinator's config.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StragglerConfig {
    pub enabled: bool,
    /// A node whose step rate is below (1 - slower_than) x the gang's median straggles.
    pub slower_than: f64,
    /// ... consistently, for this long, before it is flagged.
    #[serde(rename = "for", with = "humantime_serde")]
    pub for_: Duration,
    /// How far back the step rate is measured.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// At the job's next complete checkpoint, restart it without its
    /// stragglers, on its spares (only when it has enough).
    pub swap_at_checkpoint: bool,
}

impl Default for StragglerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            slower_than: 0.25,
            for_: Duration::from_secs(60),
            window: Duration::from_secs(30),
            swap_at_checkpoint: false,
        }
    }
}

impl StragglerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.slower_than > 0.0 && self.slower_than < 1.0) {
            return Err(format!(
                "stragglers.slower_than = {} must lie between 0 and 1 (0.25: 25% slower than the gang's median)",
                self.slower_than
            ));
        }
        if self.window < Duration::from_secs(1) {
            return Err("stragglers.window must be at least 1s".into());
        }
        Ok(())
    }
}

/// Record a step change of `w` (its `progress_step` is the new step).
pub fn sample(w: &mut Worker, now: Instant) {
    let Some(step) = w.progress_step else {
        return;
    };
    if w.rate_samples.len() >= MAX_SAMPLES {
        w.rate_samples.pop_front();
    }
    w.rate_samples.push_back((now, step));
}

/// Steps per second over the samples within `window` of `now`.
pub fn rate(w: &Worker, now: Instant, window: Duration) -> Option<f64> {
    let since = now.saturating_sub(window);
    let mut recent = w.rate_samples.iter().filter(|(at, _)| *at >= since);
    let (t0, s0) = *recent.next()?;
    let (t1, s1) = *recent.next_back()?;
    let secs = (t1 - t0).as_secs_f64();
    (t1 > t0 && s1 >= s0).then(|| (s1 - s0) as f64 / secs)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// A complete checkpoint was just seen: swap the job's stragglers for its
/// spares now (when `enabled` and it has enough), resuming from it.
pub fn swap(
    job: &mut Job,
    nodes: &BTreeMap<String, Node>,
    enabled: bool,
    now: Now,
    effects: &mut Vec<Effect>,
) {
    let out: Vec<String> = job
        .stragglers
        .iter()
        .filter(|n| job.placement.contains(n))
        .cloned()
        .collect();
    if !enabled || job.phase != JobPhase::Running || out.is_empty() || job.spares.len() < out.len()
    {
        return;
    }
    let step = job
        .checkpoint
        .as_ref()
        .and_then(|c| c.step)
        .map_or_else(|| "?".to_owned(), |s| s.to_string());
    let reason = format!(
        "swapping straggler(s) {} for spare(s) at checkpoint step {step}",
        out.join(", ")
    );
    job.event(now.wall_ms, "straggler", reason.clone());
    job.avoid.extend(out.iter().cloned());
    let failure = Failure::new(&reason, "", FailureKind::StragglerSwap);
    stop_attempt(job, nodes, &failure, AfterStop::Restart, now, effects);
}

/// The health rules (`health::judge_samples`) that mean a GPU runs below its
/// clocks: a node running a job with one of them straggles, whatever the
/// gang's step rates say (a gang of one has no median; a whole gang may be
/// held back by it).
const THROTTLE_RULES: [&str; 3] = ["hw_slowdown", "thermal_throttle", "power_brake"];

/// What the latest heartbeat of `node` says about throttling, if anything.
fn throttling(node: Option<&Node>) -> Option<String> {
    let found: Vec<&str> = node?
        .health
        .sample_findings
        .iter()
        .filter(|f| THROTTLE_RULES.contains(&f.rule))
        .map(|f| f.message.as_str())
        .collect();
    (!found.is_empty()).then(|| found.join("; "))
}

/// Why a node is behind its gang right now.
enum Slow {
    Rate { rate: f64, median: f64 },
    Throttled(String),
}

enum Change {
    Flag {
        job: String,
        node: String,
        message: String,
    },
    Unflag {
        job: String,
        node: String,
    },
}

impl ClusterState {
    /// Measure every running gang; flag and unflag stragglers.
    pub fn stragglers_tick(&mut self, now: Now) -> Vec<Effect> {
        let cfg = self.stragglers;
        let nodes = &self.nodes;
        let mut changes = Vec::new();
        for job in self.jobs.values_mut() {
            let running = cfg.enabled && job.phase == JobPhase::Running;
            let live: Vec<(&String, &Worker)> = if running {
                job.workers
                    .iter()
                    .filter(|(_, w)| !w.phase.is_dead())
                    .collect()
            } else {
                Vec::new()
            };
            let rates: BTreeMap<String, f64> = live
                .iter()
                .filter_map(|(n, w)| rate(w, now.mono, cfg.window).map(|r| ((*n).clone(), r)))
                .collect();
            let gang = median(rates.values().copied().collect()).filter(|_| rates.len() >= 2);
            let mut slow_now: Vec<(String, Slow)> = Vec::new();
            for (node, _) in &live {
                let behind = rates
                    .get(*node)
                    .zip(gang)
                    .filter(|(r, median)| **r < (1.0 - cfg.slower_than) * median);
                if let Some((rate, median)) = behind {
                    slow_now.push((
                        (*node).clone(),
                        Slow::Rate {
                            rate: *rate,
                            median,
                        },
                    ));
                } else if let Some(why) = throttling(nodes.get(*node)) {
                    slow_now.push(((*node).clone(), Slow::Throttled(why)));
                }
            }
            job.slow_since
                .retain(|n, _| slow_now.iter().any(|(s, _)| s == n));
            for (node, slow) in slow_now {
                let since = *job.slow_since.entry(node.clone()).or_insert(now.mono);
                let lasted = now.mono.saturating_duration_since(since);
                if lasted >= cfg.for_ && !job.stragglers.contains(&node) {
                    let lasting = humantime::format_duration(Duration::from_millis(
                        u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX),
                    ));
                    let message = match slow {
                        Slow::Rate { rate: r, median } => format!(
                            "straggler: {r:.1} steps/s, {:.0}% below the gang's median {median:.1} steps/s in job {} for {lasting}",
                            (1.0 - r / median) * 100.0,
                            job.id,
                        ),
                        Slow::Throttled(why) => format!(
                            "straggler: {why} while it runs job {} for {lasting}",
                            job.id
                        ),
                    };
                    changes.push(Change::Flag {
                        job: job.id.clone(),
                        node,
                        message,
                    });
                }
            }
            let keep: Vec<String> = job.slow_since.keys().cloned().collect();
            for node in job.stragglers.iter().filter(|n| !keep.contains(n)) {
                changes.push(Change::Unflag {
                    job: job.id.clone(),
                    node: node.clone(),
                });
            }
        }
        let mut effects = Vec::new();
        for change in changes {
            let (job_id, node) = match &change {
                Change::Flag { job, node, .. } | Change::Unflag { job, node } => {
                    (job.clone(), node.clone())
                }
            };
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            let finding = match change {
                Change::Flag { message, .. } => {
                    job.stragglers.insert(node.clone());
                    job.event(now.wall_ms, "straggler", format!("{node}: {message}"));
                    effects.push(Effect::JobLog {
                        job: job_id.clone(),
                        message: format!("{node} flagged: {message}"),
                        warn: true,
                    });
                    Some(Finding {
                        condition: Condition::Degraded,
                        rule: "straggler",
                        gpu: None,
                        message,
                        observed_at_ms: now.wall_ms,
                    })
                }
                Change::Unflag { .. } => {
                    job.stragglers.remove(&node);
                    job.event(
                        now.wall_ms,
                        "straggler",
                        format!("{node} keeps up again (or its attempt ended)"),
                    );
                    None
                }
            };
            effects.push(Effect::PersistJob(Box::new(job.clone())));
            if let Some(n) = self.nodes.get_mut(&node) {
                n.health.straggler = finding;
            }
            effects.extend(self.rejudge(&node, now));
        }
        effects
    }
}

#[cfg(test)]
#[path = "stragglers_tests.rs"]
mod tests;
