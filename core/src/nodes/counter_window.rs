//! How much a counter rose within a sliding window, pure: the fabric's flap rule and the GPU
//! counters' rate rules (PCIe replays, NVLink errors) share it. Times are monotonic ms.

use std::time::Duration;

/// Most change points kept: beyond this many rises in a window the verdict is the same.
pub const MAX_POINTS: usize = 64;

/// A counter's baseline and its value at each change since, oldest first. A counter that never
/// changes costs no allocation: nodes (and so these) are cloned for every snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterWindow {
    /// (monotonic ms, value) the rise is measured from.
    base: (u64, u64),
    changes: Vec<(u64, u64)>,
}

impl CounterWindow {
    /// A window whose baseline is `total`, seen at `now_ms`.
    pub fn new(total: u64, now_ms: u64) -> Self {
        Self {
            base: (now_ms, total),
            changes: Vec::new(),
        }
    }

    fn last(&self) -> u64 {
        self.changes.last().unwrap_or(&self.base).1
    }

    /// Record `total` at `now_ms`; a counter that went back (a driver reload, a reset) starts
    /// over from its new value.
    pub fn observe(&mut self, total: u64, now_ms: u64, window_ms: u64) {
        let last = self.last();
        if total < last {
            *self = Self::new(total, now_ms);
            return;
        }
        if total > last {
            self.changes.push((now_ms, total));
        }
        // The newest point at or before the window's start becomes the baseline.
        let start = now_ms.saturating_sub(window_ms);
        let before = self.changes.iter().filter(|(at, _)| *at <= start).count();
        if before > 0 {
            self.base = self.changes[before - 1];
            self.changes.drain(..before);
        }
        if self.changes.len() > MAX_POINTS {
            self.changes.drain(..self.changes.len() - MAX_POINTS);
        }
    }

    /// How much the counter rose within the window.
    pub fn rise(&self) -> u64 {
        self.last().saturating_sub(self.base.1)
    }

    /// Forget the rises so far: the latest value is the new baseline.
    pub fn forget(&mut self) {
        if let Some(last) = self.changes.last().copied() {
            self.base = last;
            self.changes.clear();
        }
    }

    /// How many changes are kept since the baseline (at most [`MAX_POINTS`]).
    pub fn changes(&self) -> usize {
        self.changes.len()
    }
}

/// A window length in milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_that_never_changes_keeps_no_history() {
        let mut w = CounterWindow::new(7, 0);
        for t in 1..100 {
            w.observe(7, t * 1000, 10_000);
        }
        assert_eq!((w.rise(), w.changes()), (0, 0));
        assert_eq!(w.changes.capacity(), 0, "no allocation");
    }

    #[test]
    fn the_rise_is_measured_from_the_newest_value_before_the_window() {
        let mut w = CounterWindow::new(0, 0);
        w.observe(2, 1_000, 10_000);
        w.observe(5, 8_000, 10_000);
        assert_eq!(w.rise(), 5);
        // At 12 s the window starts at 2 s: the value then was 2.
        w.observe(5, 12_000, 10_000);
        assert_eq!(w.rise(), 3);
        w.observe(5, 19_000, 10_000);
        assert_eq!(w.rise(), 0);
    }
}
