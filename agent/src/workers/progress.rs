//! A worker's progress: the step it last wrote to `VIGIL_PROGRESS_FILE`, and when that changed.
//!
//! The coordinator judges hangs from `progress_at_unix_ms`, so the time is that
//! of the last *change* the agent saw, not of the last read.

/// What the agent knows of one worker's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub step: Option<u64>,
    /// When `step` last changed (unix ms); the start time until the first step.
    pub at_unix_ms: u64,
}

impl Progress {
    pub fn new(started_at_unix_ms: u64) -> Self {
        Self {
            step: None,
            at_unix_ms: started_at_unix_ms,
        }
    }

    /// Takes in the progress file's text; true when the step changed.
    ///
    /// A file caught half-written (empty, garbage) keeps the last step.
    pub fn observe(&mut self, text: &str, now_unix_ms: u64) -> bool {
        match parse_step(text) {
            Some(step) if self.step != Some(step) => {
                self.step = Some(step);
                self.at_unix_ms = now_unix_ms;
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
    fn progress_time_moves_only_when_the_step_changes() {
        let mut p = Progress::new(100);
        assert_eq!(
            p,
            Progress {
                step: None,
                at_unix_ms: 100
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
                at_unix_ms: 500
            }
        );
    }
}
