//! systemd service notifications (`sd_notify`): ready, status, reloading, stopping, watchdog.
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd
//! with `Type=notify`), so the coordinator runs the same anywhere.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;
use tracing::warn;

/// `READY=1` with a one-line `STATUS=`: start-up (or a reload) is complete.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line `STATUS=` shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` (with the monotonic time systemd 253+ requires); follow with [`ready`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Feeds systemd's watchdog (`WATCHDOG=1`) from the engine loop, at most once
/// per half watchdog interval, so that a wedged engine, not only a dead
/// process, lets the watchdog fire.
#[derive(Debug)]
pub struct Watchdog {
    every: Duration,
    last: Option<Instant>,
}

impl Watchdog {
    /// The watchdog systemd asked for (`WATCHDOG_USEC`, for this process's
    /// `WATCHDOG_PID` if set), or `None` when it is off.
    pub fn from_env() -> Option<Self> {
        sd_notify::watchdog_enabled().map(Self::new)
    }

    /// A watchdog of `interval`, fed every `interval / 2`.
    pub fn new(interval: Duration) -> Self {
        Self {
            every: interval / 2,
            last: None,
        }
    }

    /// The watchdog interval systemd enforces.
    pub fn interval(&self) -> Duration {
        self.every * 2
    }

    /// Whether a keep-alive is due at `now`; if so, it counts as sent.
    pub fn due(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            return false;
        }
        self.last = Some(now);
        true
    }

    /// Called on every engine tick: sends `WATCHDOG=1` when due.
    pub fn tick(&mut self) {
        if self.due(Instant::now()) {
            send(&[NotifyState::Watchdog]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_is_fed_once_per_half_interval() {
        let mut w = Watchdog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(w.due(t0), "the first tick feeds at once");
        let fed = (1..=100)
            .filter(|i| w.due(t0 + Duration::from_millis(100) * *i))
            .count();
        assert_eq!(fed, 2, "10 s of 100 ms ticks feed at 5 s and 10 s");
    }

    #[test]
    fn watchdog_feeds_at_once_after_a_stall() {
        let mut w = Watchdog::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(w.due(t0));
        assert!(!w.due(t0 + Duration::from_millis(400)));
        assert!(w.due(t0 + Duration::from_secs(3)));
        assert!(!w.due(t0 + Duration::from_millis(3400)));
    }
}
