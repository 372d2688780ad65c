//! The agent's lease: how long it may go without hearing from the coordinator.
//!
//! Every coordinator message renews it. Once it runs out the coordinator may
//! already be relaunching this node's work elsewhere, so the session is over,
//! and so are this node's workers (the [`crate::workers`] supervisor holds a
//! copy of the lease and stops them at its deadline, session or no session).

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Lease {
    duration: Duration,
    last_heard: Instant,
}

impl Lease {
    pub fn new(duration: Duration, now: Instant) -> Self {
        Self {
            duration,
            last_heard: now,
        }
    }

    pub fn renew(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// How long silence may last.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    pub fn deadline(&self) -> Instant {
        self.last_heard + self.duration
    }

    /// When the last valid message arrived.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// What is left of it at `now` (zero once it ran out).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.deadline().saturating_duration_since(now)
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.deadline()
    }

    /// Silence so far, for the log line that explains an expiry.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }
}

/// How long an agent waits for its `Registered` once a `LeaseRenewed` said the coordinator has
/// its `Register` queued: three quarters of the `lease` just renewed, leaving a quarter to dial
/// again should it not come, and never less than the usual `register_timeout`. The agent and
/// the load generator both wait this long.
pub fn registered_wait(lease: Duration, register_timeout: Duration) -> Duration {
    (lease * 3 / 4).max(register_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECS: Duration = Duration::from_secs(1);

    #[test]
    fn lease_expires_after_its_duration_of_silence() {
        let t0 = Instant::now();
        let lease = Lease::new(8 * SECS, t0);
        assert!(!lease.is_expired(t0 + 7 * SECS));
        assert!(lease.is_expired(t0 + 8 * SECS));
        assert_eq!(lease.silent_for(t0 + 9 * SECS), 9 * SECS);
    }

    #[test]
    fn what_remains_shrinks_to_zero_at_the_deadline() {
        let t0 = Instant::now();
        let lease = Lease::new(8 * SECS, t0);
        assert_eq!(lease.remaining(t0 + 3 * SECS), 5 * SECS);
        assert_eq!(lease.remaining(t0 + 9 * SECS), Duration::ZERO);
    }

    #[test]
    fn registered_is_awaited_for_three_quarters_of_the_lease_at_least_the_timeout() {
        assert_eq!(registered_wait(8 * SECS, 5 * SECS), 6 * SECS);
        assert_eq!(registered_wait(4 * SECS, 5 * SECS), 5 * SECS);
    }

    #[test]
    fn every_message_pushes_the_deadline_out() {
        let t0 = Instant::now();
        let mut lease = Lease::new(8 * SECS, t0);
        lease.renew(t0 + 5 * SECS);
        assert!(!lease.is_expired(t0 + 12 * SECS));
        assert_eq!(lease.deadline(), t0 + 13 * SECS);
    }

    #[test]
    fn renewal_never_moves_the_deadline_back() {
        let t0 = Instant::now();
        let mut lease = Lease::new(8 * SECS, t0 + 5 * SECS);
        lease.renew(t0);
        assert_eq!(lease.deadline(), t0 + 13 * SECS);
    }
}
