//! Reconnect delays: exponential growth with full jitter, as pure arithmetic.
//!
//! Full jitter (a uniform draw from zero to the ceiling) spreads a fleet of
//! agents that all lost the same coordinator, so its restart is not met by a
//! synchronized stampede.

use std::time::Duration;

/// Delay schedule for one run of failed attempts; [`Backoff::reset`] once an attempt succeeds.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Failed attempts since the last reset; the ceiling doubles with each.
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The longest the next delay may be: `initial * 2^failures`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        1u32.checked_shl(self.failures)
            .and_then(|factor| self.initial.checked_mul(factor))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// Draws the delay before the next attempt and counts one more failure.
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        self.next_delay_within(rng, None)
    }

    /// As [`Backoff::next_delay`], with the ceiling lowered to `cap` where one is given (see
    /// [`lease_cap`]); the failures still count, so the ceiling is where it would be once the
    /// cap is gone.
    pub fn next_delay_within(
        &mut self,
        rng: &mut fastrand::Rng,
        cap: Option<Duration>,
    ) -> Duration {
        let ceiling = cap.map_or(self.ceiling(), |c| self.ceiling().min(c));
        let ceiling = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        self.failures = self.failures.saturating_add(1);
        Duration::from_nanos(rng.u64(0..=ceiling))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The longest ceiling a reconnect may have while this node's workers hold a lease that has
/// `remaining` to run: a quarter of it, but never below `floor`. So an agent dials about four
/// times or more before its lease runs out, whatever its backoff had grown to, and a fleet
/// that lost its coordinator spreads its dials over the time each has left instead of
/// sleeping through the coordinator's return (the plain backoff reaches 6.4 s after five
/// failures, most of an 8 s lease). `None` once the lease ran out: the workers are stopped
/// already, and the ordinary backoff spares the coordinator.
pub fn lease_cap(remaining: Duration, floor: Duration) -> Option<Duration> {
    (!remaining.is_zero()).then(|| (remaining / 4).max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff() -> Backoff {
        Backoff::new(200 * MS, 10_000 * MS)
    }

    #[test]
    fn ceiling_doubles_from_initial_until_capped() {
        let mut b = backoff();
        let mut rng = fastrand::Rng::with_seed(1);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
    }

    #[test]
    fn ceiling_stays_capped_after_very_many_failures() {
        let mut b = backoff();
        let mut rng = fastrand::Rng::with_seed(2);
        for _ in 0..1_000 {
            assert!(b.next_delay(&mut rng) <= 10_000 * MS);
        }
        assert_eq!(b.ceiling(), 10_000 * MS);
    }

    #[test]
    fn delays_are_jittered_within_zero_and_the_ceiling() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut b = backoff();
            let d = b.next_delay(&mut rng);
            assert!(d <= 200 * MS);
            seen.insert(d);
        }
        assert!(
            seen.len() > 100,
            "jitter should spread delays, got {seen:?}"
        );
    }

    #[test]
    fn reset_returns_to_the_initial_ceiling() {
        let mut b = backoff();
        let mut rng = fastrand::Rng::with_seed(4);
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), 6400 * MS);
        b.reset();
        assert_eq!(b.ceiling(), 200 * MS);
    }

    #[test]
    fn a_live_lease_caps_the_ceiling_at_a_quarter_of_what_is_left() {
        assert_eq!(lease_cap(8_000 * MS, 200 * MS), Some(2_000 * MS));
        assert_eq!(lease_cap(2_000 * MS, 200 * MS), Some(500 * MS));
        // Near its end, never below the floor.
        assert_eq!(lease_cap(400 * MS, 200 * MS), Some(200 * MS));
        assert_eq!(lease_cap(Duration::ZERO, 200 * MS), None);
    }

    #[test]
    fn capped_delays_stay_under_the_cap_and_still_count_failures() {
        let mut b = backoff();
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..6 {
            assert!(b.next_delay_within(&mut rng, Some(1_000 * MS)) <= 1_000 * MS);
        }
        assert_eq!(b.ceiling(), 10_000 * MS);
        // A cap above the ceiling changes nothing.
        b.reset();
        assert!(b.next_delay_within(&mut rng, Some(5_000 * MS)) <= 200 * MS);
    }

    #[test]
    fn max_below_initial_is_raised_to_initial() {
        let b = Backoff::new(5 * MS, MS);
        assert_eq!(b.ceiling(), 5 * MS);
    }
}
