//! Time as decisions see it: `Now { mono, wall_ms }`.
//!
//! Every deadline (liveness, lease, hang, restart backoff, stragglers window, burn-in and triage
//! budgets) is measured on `mono`, a monotonic instant that no wall-clock step (NTP, a resumed VM,
//! an operator's `date -s`) can move. `wall_ms` is for records and display only, and a timestamp
//! sent by another host is never compared with ours to decide anything. Pure code never reads a
//! clock: the shell (the coordinator's engine) reads both and passes them in.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on the monotonic clock: how long after the clock's origin (the start of the process
/// that owns the state; its value means nothing across processes, so it is never persisted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(Duration);

impl Instant {
    /// The clock's origin.
    pub const ZERO: Instant = Instant(Duration::ZERO);

    /// The instant `since_origin` after the clock's origin.
    pub const fn from_origin(since_origin: Duration) -> Self {
        Self(since_origin)
    }

    /// How long after the origin this instant is.
    pub const fn since_origin(self) -> Duration {
        self.0
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// `self - earlier`, or `None` when `earlier` is later.
    pub fn checked_duration_since(self, earlier: Instant) -> Option<Duration> {
        self.0.checked_sub(earlier.0)
    }

    pub fn checked_add(self, d: Duration) -> Option<Instant> {
        self.0.checked_add(d).map(Instant)
    }

    /// `self - d`, or the origin when `d` reaches past it.
    pub fn saturating_sub(self, d: Duration) -> Instant {
        Instant(self.0.saturating_sub(d))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    /// Saturates instead of overflowing: a deadline too far away to represent never comes.
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d))
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, d: Duration) -> Instant {
        self.saturating_sub(d)
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// The moment an input is handled: monotonic for deadlines, wall clock for records.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Now {
    pub mono: Instant,
    pub wall_ms: u64,
}

impl Now {
    /// `mono` in milliseconds since the clock's origin, for policies that keep plain numbers.
    pub fn mono_ms(self) -> u64 {
        u64::try_from(self.mono.since_origin().as_millis()).unwrap_or(u64::MAX)
    }

    /// `d` later on both clocks (tests and simulations).
    pub fn after(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            wall_ms: self
                .wall_ms
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        let t = Instant::from_origin(Duration::from_secs(5));
        assert_eq!(t - Duration::from_secs(10), Instant::ZERO);
        assert_eq!(Instant::ZERO - t, Duration::ZERO);
        assert_eq!(t.checked_duration_since(t + Duration::from_secs(1)), None);
        assert_eq!(
            (t + Duration::MAX).since_origin(),
            Duration::MAX,
            "a deadline too far to represent never comes"
        );
    }

    #[test]
    fn after_moves_both_clocks() {
        let now = Now {
            mono: Instant::ZERO,
            wall_ms: 1_000,
        };
        let later = now.after(Duration::from_millis(1_500));
        assert_eq!(later.mono.since_origin(), Duration::from_millis(1_500));
        assert_eq!(later.wall_ms, 2_500);
    }
}
