//! A worker's progress: the step it last wrote to `VIGIL_PROGRESS_FILE`, and when that changed,
//! with the training metrics of that step when the worker writes them.
//!
//! The file holds one line: a bare step number (`1200`), or `key=value` pairs separated by
//! spaces: `step=1200 loss=2.31 grad_norm=0.82 loss_scale=65536` (`step` required; `nan`, `inf`
//! accepted as values; unknown keys ignored). The coordinator judges hangs from
//! `progress_at_unix_ms`, so the time is that of the last *change* the agent saw, not of the last
//! read.

/// What the agent knows of one worker's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    pub step: Option<u64>,
    /// When `step` last changed (unix ms); the start time until the first step.
    pub at_unix_ms: u64,
    pub metrics: Metrics,
}

/// Training metrics of the last step, as the worker wrote them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metrics {
    pub loss: Option<f64>,
    pub grad_norm: Option<f64>,
    pub loss_scale: Option<f64>,
}

/// The step and metrics of a progress line; `None` without a valid step.
pub fn parse_line(text: &str) -> Option<(u64, Metrics)> {
    let text = text.trim();
    if let Some(step) = parse_step(text) {
        return Some((step, Metrics::default()));
    }
    let mut step = None;
    let mut m = Metrics::default();
    for pair in text.split_whitespace() {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let number = || value.parse::<f64>().ok();
        match key {
            "step" => step = value.parse::<u64>().ok(),
            "loss" => m.loss = number(),
            "grad_norm" => m.grad_norm = number(),
            "loss_scale" => m.loss_scale = number(),
            _ => {}
        }
    }
    step.map(|s| (s, m))
}

impl Progress {
    pub fn new(started_at_unix_ms: u64) -> Self {
        Self {
            step: None,
            at_unix_ms: started_at_unix_ms,
            metrics: Metrics::default(),
        }
    }

    /// Takes in the progress file's text; true when the step changed.
    ///
    /// A file caught half-written (empty, garbage) keeps the last step.
    pub fn observe(&mut self, text: &str, now_unix_ms: u64) -> bool {
        match parse_line(text) {
            Some((step, metrics)) if self.step != Some(step) => {
                self.step = Some(step);
                self.at_unix_ms = now_unix_ms;
                self.metrics = metrics;
                true
            }
            _ => false,
        }
    }
}

/// A decimal step number, surrounding whitespace allowed.
pub fn parse_step(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_is_a_decimal_integer_with_optional_whitespace() {
        assert_eq!(parse_step("5"), Some(5));
        assert_eq!(parse_step("  1200\n"), Some(1200));
        assert_eq!(parse_step(""), None);
        assert_eq!(parse_step("-1"), None);
        assert_eq!(parse_step("1e3"), None);
        assert_eq!(parse_step("step 5"), None);
    }

    #[test]
    fn a_line_of_key_value_pairs_carries_the_training_metrics() {
        let (step, m) =
            parse_line("step=1200 loss=2.31 grad_norm=0.82 loss_scale=65536\n").expect("valid");
        assert_eq!(step, 1200);
        assert_eq!(m.loss, Some(2.31));
        assert_eq!(m.grad_norm, Some(0.82));
        assert_eq!(m.loss_scale, Some(65536.0));
        let (_, m) = parse_line("step=5 loss=nan lr=3e-4").expect("valid");
        assert!(
            m.loss.is_some_and(f64::is_nan),
            "NaN is kept: it is the signal"
        );
        assert_eq!(parse_line("loss=2.0"), None, "a step is required");
        assert_eq!(parse_line("7").map(|(s, _)| s), Some(7));
        assert_eq!(parse_line("step=x loss=1"), None);
    }

    #[test]
    fn progress_time_moves_only_when_the_step_changes() {
        let mut p = Progress::new(100);
        assert_eq!(
            p,
            Progress {
                step: None,
                at_unix_ms: 100,
                metrics: Metrics::default(),
            }
        );
        assert!(p.observe("5\n", 200));
        assert!(!p.observe("5", 300), "same step: no progress");
        assert_eq!(p.at_unix_ms, 200);
        assert!(!p.observe("", 400), "half-written file keeps the last step");
        assert_eq!(p.step, Some(5));
        assert!(p.observe("6", 500));
        assert_eq!(
            p,
            Progress {
                step: Some(6),
                at_unix_ms: 500,
                metrics: Metrics::default(),
            }
        );
    }
}
