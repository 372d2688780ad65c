//! The one clock the engine reads: monotonic time for every deadline, wall time for records.
//!
//! The pure core never reads a clock; the engine reads this one and passes `Now` in. Its
//! monotonic side is tokio's `Instant`, so `#[tokio::test(start_paused = true)]` moves it, and
//! no wall-clock step (NTP, a resumed VM, `date -s`) moves any deadline.

use std::time::SystemTime;

use tokio::time::Instant;
use vigil_core::time::{Instant as Mono, Now};

/// Readings relative to the moment the clock was started (an engine's start).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// The present, on both clocks.
    pub fn now(&self) -> Now {
        Now {
            mono: self.mono(Instant::now()),
            wall_ms: crate::metrics::unix_ms(SystemTime::now()),
        }
    }

    /// `t` as the core's monotonic instant.
    pub fn mono(&self, t: Instant) -> Mono {
        Mono::from_origin(t.saturating_duration_since(self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn monotonic_side_follows_tokio_time() {
        let clock = Clock::start();
        let a = clock.now().mono;
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(
            clock.now().mono.saturating_duration_since(a),
            Duration::from_secs(90)
        );
    }
}
