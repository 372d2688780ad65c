//! Per-agent-stream rate limit: two token buckets (messages and bytes), pure, time as an argument.
//!
//! The session reader charges each message it reads; when a bucket runs into debt it sleeps the
//! debt off before reading the next message. Not reading is the backpressure: HTTP/2 flow control
//! stalls that one agent's stream, and nobody else's. A run of throttled messages is an
//! *episode*: it starts with the first wait and ends once both buckets have refilled, so the
//! agent service warns and records a node event once per episode, not once per message.

use std::time::Duration;

use tokio::time::Instant;

pub use vigil_core::limits::Rates;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        let rate = rate.max(f64::MIN_POSITIVE);
        let burst = burst.max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
    }

    /// Take `cost`; the time until the bucket is out of debt again.
    fn take(&mut self, cost: f64) -> Duration {
        self.tokens -= cost;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(-self.tokens / self.rate).unwrap_or(Duration::MAX)
        }
    }

    fn full(&self) -> bool {
        self.tokens >= self.burst
    }
}

/// What the reader does with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Sleep this long before reading the next message (zero: go on).
    pub wait: Duration,
    /// This message began a throttling episode: warn and flag the node.
    pub episode_started: bool,
}

/// The rate limit of one agent session.
#[derive(Debug, Clone)]
pub struct Throttle {
    messages: Bucket,
    bytes: Bucket,
    last: Instant,
    in_episode: bool,
}

impl Throttle {
    pub fn new(rates: Rates, now: Instant) -> Self {
        Self {
            messages: Bucket::new(rates.messages_per_second, rates.message_burst),
            bytes: Bucket::new(rates.bytes_per_second, rates.bytes_burst),
            last: now,
            in_episode: false,
        }
    }

    /// Charge one message of `bytes` read at `now`.
    pub fn admit(&mut self, bytes: usize, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.messages.refill(elapsed);
        self.bytes.refill(elapsed);
        if self.in_episode && self.messages.full() && self.bytes.full() {
            self.in_episode = false;
        }
        let wait = self.messages.take(1.0).max(self.bytes.take(bytes as f64));
        let episode_started = !wait.is_zero() && !self.in_episode;
        if !wait.is_zero() {
            self.in_episode = true;
        }
        Verdict {
            wait,
            episode_started,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATES: Rates = Rates {
        messages_per_second: 10.0,
        message_burst: 5.0,
        bytes_per_second: 1000.0,
        bytes_burst: 2000.0,
    };

    #[test]
    fn a_steady_agent_under_the_rate_never_waits() {
        let t0 = Instant::now();
        let mut t = Throttle::new(RATES, t0);
        for i in 0..100 {
            let v = t.admit(50, t0 + Duration::from_millis(200 * i));
            assert_eq!(v.wait, Duration::ZERO, "message {i}");
        }
    }

    #[test]
    fn a_flood_waits_after_the_burst_and_flags_one_episode() {
        let t0 = Instant::now();
        let mut t = Throttle::new(RATES, t0);
        let verdicts: Vec<Verdict> = (0..20).map(|_| t.admit(10, t0)).collect();
        assert!(
            verdicts[..5].iter().all(|v| v.wait.is_zero()),
            "burst passes"
        );
        assert!(verdicts[5].episode_started);
        assert_eq!(verdicts[5].wait, Duration::from_millis(100));
        assert_eq!(verdicts[19].wait, Duration::from_millis(1500));
        assert_eq!(
            verdicts.iter().filter(|v| v.episode_started).count(),
            1,
            "one warning per episode"
        );
    }

    #[test]
    fn an_episode_ends_once_the_buckets_refill() {
        let t0 = Instant::now();
        let mut t = Throttle::new(RATES, t0);
        for _ in 0..6 {
            t.admit(10, t0);
        }
        // Long enough for both buckets to refill: the next flood is a new episode.
        let t1 = t0 + Duration::from_secs(5);
        let again: Vec<Verdict> = (0..7).map(|_| t.admit(10, t1)).collect();
        assert!(again[5].episode_started, "{again:?}");
    }

    #[test]
    fn big_messages_are_limited_by_bytes() {
        let t0 = Instant::now();
        let mut t = Throttle::new(RATES, t0);
        assert!(t.admit(1500, t0).wait.is_zero());
        let v = t.admit(1500, t0);
        assert_eq!(v.wait, Duration::from_millis(1000));
        assert!(v.episode_started);
        // A message bigger than the burst still goes through, after its debt is paid.
        let mut fresh = Throttle::new(RATES, t0);
        assert_eq!(fresh.admit(4000, t0).wait, Duration::from_secs(2));
    }
}
