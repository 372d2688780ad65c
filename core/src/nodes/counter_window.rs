//! How much a counter rose within a sliding window, pure: the fabric's flap rule and the GPU
//! counters' rate rules (PCIe replays, NVLink errors) share it. Times are monotonic ms.

use std::time::Duration;

/// Most change points kept: beyond this many rises in a window the verdict is the same.
pub const MAX_POINTS: usize = 64;

/// A counter's value at each change, oldest first; the first point is the baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterWindow {
    points: Vec<(u64, u64)>,
}

impl CounterWindow {
    /// A window whose baseline is `total`, seen at `now_ms`.
    pub fn new(total: u64, now_ms: u64) -> Self {
        Self {
            points: vec![(now_ms, total)],
        }
    }

    /// Record `total` at `now_ms`; a counter that went back (a driver reload, a reset) starts
    /// over from its new value.
    pub fn observe(&mut self, total: u64, now_ms: u64, window_ms: u64) {
        match self.points.last() {
            Some((_, last)) if *last == total => {}
            Some((_, last)) if *last > total => self.points = vec![(now_ms, total)],
            _ => self.points.push((now_ms, total)),
        }
        // Keep the newest point at or before the window's start: it is the baseline.
        let start = now_ms.saturating_sub(window_ms);
        let before = self.points.iter().filter(|(at, _)| *at <= start).count();
        if before > 1 {
            self.points.drain(..before - 1);
        }
        if self.points.len() > MAX_POINTS {
            self.points.drain(1..self.points.len() - MAX_POINTS + 1);
        }
    }

    /// How much the counter rose within the window.
    pub fn rise(&self) -> u64 {
        match (self.points.first(), self.points.last()) {
            (Some((_, first)), Some((_, last))) => last.saturating_sub(*first),
            _ => 0,
        }
    }

    /// Forget the rises so far: the latest value is the new baseline.
    pub fn forget(&mut self) {
        if let Some(last) = self.points.last().copied() {
            self.points = vec![last];
        }
    }

    /// How many points are kept (bounded by [`MAX_POINTS`] plus the baseline).
    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// A window length in milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
