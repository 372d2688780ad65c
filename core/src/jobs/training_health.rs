//! Training-health rollback, pure: a job's loss (from node rank 0's progress
//! file) is watched for NaN/Inf, a spike above k x its recent median for M
//! reports, or a loss scale stuck at its floor for M reports; then the
//! attempt is stopped and the job restarts from the newest complete
//! checkpoint taken *before* the trouble began, with the evidence recorded.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::job::{Checkpoint, Job};

/// Reports kept per job (the median's window is at most this).
pub const MAX_HISTORY: usize = 256;

/// `[training_health]` in a job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingHealthSpec {
    /// Roll back when the loss is NaN or infinite.
    pub nan: bool,
    /// k: roll back when the loss stays above k x its recent median ...; 0: off.
    pub spike_factor: f64,
    /// M: ... for this many consecutive reports (also for `loss_scale_floor`).
    pub spike_reports: u32,
    /// How many earlier reports the median is taken over.
    pub median_window: u32,
    /// Roll back when the loss scale stays at or below this for M reports; 0: off.
    pub loss_scale_floor: f64,
}

impl Default for TrainingHealthSpec {
    fn default() -> Self {
        Self {
            nan: true,
            spike_factor: 0.0,
            spike_reports: 3,
            median_window: 20,
            loss_scale_floor: 0.0,
        }
    }
}

impl TrainingHealthSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.spike_factor != 0.0 && !(self.spike_factor > 1.0 && self.spike_factor.is_finite()) {
            return Err(format!(
                "[training_health] spike_factor = {} must be above 1 (e.g. 3.0), or 0 to turn it off",
                self.spike_factor
            ));
        }
        if self.spike_reports == 0
            || self.median_window < 2
            || self.median_window as usize > MAX_HISTORY
        {
            return Err(format!(
                "[training_health] spike_reports must be at least 1 and median_window between 2 and {MAX_HISTORY}"
            ));
        }
        if !(self.loss_scale_floor >= 0.0 && self.loss_scale_floor.is_finite()) {
            return Err("[training_health] loss_scale_floor must be 0 (off) or positive".into());
        }
        Ok(())
    }
}

/// One report of node rank 0's training metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub step: u64,
    pub loss: Option<f64>,
    pub loss_scale: Option<f64>,
    pub at_ms: u64,
}

/// Why training is unhealthy, with the evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Trouble {
    /// The first step of the trouble: the rollback goes to a checkpoint before it.
    pub since_step: u64,
    pub kind: crate::kinds::FailureKind,
    pub evidence: String,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| {
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    })
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x}"))
}

/// Add `report` to `history` and judge it.
pub fn observe(
    history: &mut VecDeque<Report>,
    report: Report,
    spec: &TrainingHealthSpec,
) -> Option<Trouble> {
    if history.back().is_some_and(|r| r.step >= report.step) {
        return None;
    }
    if history.len() >= MAX_HISTORY {
        history.pop_front();
    }
    history.push_back(report);
    if spec.nan && report.loss.is_some_and(|l| !l.is_finite()) {
        return Some(Trouble {
            since_step: report.step,
            kind: crate::kinds::FailureKind::LossNan,
            evidence: format!("loss {} at step {}", fmt(report.loss), report.step),
        });
    }
    let m = spec.spike_reports as usize;
    let recent: Vec<&Report> = history.iter().rev().take(m).collect();
    if recent.len() < m {
        return None;
    }
    if spec.spike_factor > 0.0 {
        let before: Vec<f64> = history
            .iter()
            .rev()
            .skip(m)
            .take(spec.median_window as usize)
            .filter_map(|r| r.loss.filter(|l| l.is_finite()))
            .collect();
        if before.len() >= 2
            && let Some(med) = median(before)
        {
            let limit = spec.spike_factor * med;
            if recent.iter().all(|r| r.loss.is_some_and(|l| l > limit)) {
                let first = recent.last().map_or(report.step, |r| r.step);
                let losses: Vec<String> = recent
                    .iter()
                    .rev()
                    .map(|r| format!("{}@{}", fmt(r.loss), r.step))
                    .collect();
                return Some(Trouble {
                    since_step: first,
                    kind: crate::kinds::FailureKind::LossSpike,
                    evidence: format!(
                        "loss above {:.1} x its median {med:.4} (limit {limit:.4}) for {m} reports: {}",
                        spec.spike_factor,
                        losses.join(", ")
                    ),
                });
            }
        }
    }
    if spec.loss_scale_floor > 0.0
        && recent
            .iter()
            .all(|r| r.loss_scale.is_some_and(|s| s <= spec.loss_scale_floor))
    {
        let first = recent.last().map_or(report.step, |r| r.step);
        return Some(Trouble {
            since_step: first,
            kind: crate::kinds::FailureKind::LossScaleFloor,
            evidence: format!(
                "loss scale at its floor {} for {m} reports since step {first} (last {})",
                spec.loss_scale_floor,
                fmt(report.loss_scale)
            ),
        });
    }
    None
}

/// The newest complete checkpoint of `job` taken before `step` (by its step).
pub fn checkpoint_before(job: &Job, step: u64) -> Option<Checkpoint> {
    job.checkpoints
        .iter()
        .filter(|c| c.step.is_some_and(|s| s < step) && !job.bad_checkpoints.contains(&c.path))
        .max_by_key(|c| c.step)
        .cloned()
}

#[cfg(test)]
#[path = "training_health_tests.rs"]
mod tests;
