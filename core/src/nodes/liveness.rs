//! Pure liveness rules: silence from an agent -> node availability.

use crate::time::Instant;

use crate::config::LivenessConfig;
use crate::node::Availability;

/// What availability a node has, given how long its agent has been silent
/// and whether its stream is open. A closed stream is `Unreachable` at once
/// (the agent's host or process is gone, or the link is); silence alone turns
/// an open stream `Unreachable` after `unreachable_after`. Either way the node
/// is `Lost` once silent for `lost_after`.
pub fn availability(
    silent_since: Instant,
    connected: bool,
    now: Instant,
    cfg: &LivenessConfig,
) -> Availability {
    let silence = now.saturating_duration_since(silent_since);
    if silence >= cfg.lost_after {
        Availability::Lost
    } else if !connected || silence >= cfg.unreachable_after {
        Availability::Unreachable
    } else {
        Availability::Ready
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg() -> LivenessConfig {
        LivenessConfig::default()
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn connected_node_is_ready_until_unreachable_after() {
        let t0 = Instant::ZERO;
        assert_eq!(availability(t0, true, t0, &cfg()), Availability::Ready);
        assert_eq!(
            availability(t0, true, t0 + secs(2.99), &cfg()),
            Availability::Ready
        );
        assert_eq!(
            availability(t0, true, t0 + secs(3.0), &cfg()),
            Availability::Unreachable
        );
    }

    #[test]
    fn silent_node_is_lost_after_lost_after() {
        let t0 = Instant::ZERO;
        assert_eq!(
            availability(t0, true, t0 + secs(9.99), &cfg()),
            Availability::Unreachable
        );
        assert_eq!(
            availability(t0, true, t0 + secs(10.0), &cfg()),
            Availability::Lost
        );
        assert_eq!(
            availability(t0, true, t0 + secs(1e6), &cfg()),
            Availability::Lost
        );
    }

    #[test]
    fn closed_stream_is_unreachable_at_once_and_lost_on_schedule() {
        let t0 = Instant::ZERO;
        assert_eq!(
            availability(t0, false, t0, &cfg()),
            Availability::Unreachable
        );
        assert_eq!(
            availability(t0, false, t0 + secs(9.9), &cfg()),
            Availability::Unreachable
        );
        assert_eq!(
            availability(t0, false, t0 + secs(10.0), &cfg()),
            Availability::Lost
        );
    }
}
