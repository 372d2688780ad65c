//! The agent's link to the coordinator: sessions one after another, forever, with backoff between them.
//!
//! The agent never gives up on its coordinator: an outage, a restart or a
//! rejection is logged once per attempt and retried. With several coordinators (a
//! highly available group) it walks the list to find the leader: the next address
//! promptly after a failed session, straight to the leader a standby names (when that
//! leader is in the list), and the exponential backoff only once a whole round of
//! addresses has failed.

use std::time::Duration;

use tokio::time::Instant;

use tracing::{Instrument, debug, info, info_span, warn};

use crate::backoff::Backoff;
use crate::config::{Coordinators, ReconnectConfig};
use crate::error_chain;
use crate::events::EventSource;
use crate::lease::Lease;
use crate::session::{self, SessionContext, SessionError};

/// Between two addresses of one round: long enough not to spin, short enough that the
/// leader is found well within a lease.
pub const NEXT_ADDRESS_PAUSE: Duration = Duration::from_millis(100);
/// Between rounds while some coordinator answered as a standby: the group is
/// alive and electing (a leader died; its etcd lease runs out within seconds).
/// Backing off exponentially here could outlast the lease and stop every job.
pub const ELECTION_POLL: Duration = Duration::from_millis(250);

/// The pause at the end of a round: short and flat while a standby answered
/// in it, else the reconnect backoff.
pub fn round_pause(
    standby_answered: bool,
    backoff: &mut Backoff,
    rng: &mut fastrand::Rng,
    cap: Option<Duration>,
) -> Duration {
    if standby_answered {
        ELECTION_POLL
    } else {
        backoff.next_delay_within(rng, cap)
    }
}

/// How a session at the current address ended, as far as choosing the next one goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It had registered (and later ended): a new round starts.
    Registered,
    /// Unreachable, refused, a standby naming no usable leader, a deposed leader.
    Failed,
    /// A standby named the leader, at this index of the list.
    Redirect(usize),
}

/// How long to wait before dialing [`Rotation::current`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Dial now: a standby named the leader.
    None,
    /// [`NEXT_ADDRESS_PAUSE`]: the next address of the round.
    Brief,
    /// The exponential backoff: a whole round failed (or there is only one address).
    Backoff,
}

/// Which address to dial next, as pure bookkeeping over the list's indices.
#[derive(Debug, Clone)]
pub struct Rotation {
    len: usize,
    current: usize,
    /// Sessions that ended since the round began; a round is `len` of them.
    failures: usize,
}

impl Rotation {
    pub fn new(len: usize) -> Self {
        Self {
            len: len.max(1),
            current: 0,
            failures: 0,
        }
    }

    /// The index of the address to dial.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Moves past a session at [`Self::current`] that ended with `outcome`; says how long
    /// to wait before dialing the new current address.
    pub fn advance(&mut self, outcome: Outcome) -> Pause {
        if self.len == 1 {
            return Pause::Backoff;
        }
        let next = (self.current + 1) % self.len;
        let (target, fast) = match outcome {
            // The session that ended is the new round's first failure.
            Outcome::Registered => {
                self.failures = 0;
                (next, Pause::Brief)
            }
            Outcome::Redirect(i) if i < self.len && i != self.current => (i, Pause::None),
            Outcome::Redirect(_) | Outcome::Failed => (next, Pause::Brief),
        };
        self.current = target;
        self.failures += 1;
        if self.failures >= self.len {
            self.failures = 0;
            Pause::Backoff
        } else {
            fast
        }
    }
}

/// Where a standby's answer leads: the index of the leader it names when that is in the
/// list, else nowhere (logged: the agent never dials an address it was not given).
fn leader_index(
    coordinators: &Coordinators,
    url: &str,
    leader: Option<&str>,
    current: usize,
) -> Option<usize> {
    let Some(leader) = leader else {
        info!(
            coordinator = %url,
            "coordinator {url} is a standby and names no leader (an election is under way); \
             trying the next coordinator"
        );
        return None;
    };
    match coordinators.position(leader) {
        Some(i) if i == current => {
            warn!(
                coordinator = %url,
                leader,
                "coordinator {url} is a standby yet names itself ({leader}) as the leader; \
                 trying the next coordinator"
            );
            None
        }
        Some(i) => {
            info!(
                coordinator = %url,
                leader,
                "coordinator {url} is a standby; the leader is {leader}"
            );
            Some(i)
        }
        None => {
            warn!(
                coordinator = %url,
                leader,
                configured = %coordinators,
                "coordinator {url} is a standby and names {leader} as the leader, which is \
                 not in this agent's coordinator list; not dialing it (add it to `coordinator` \
                 if it belongs to the group)"
            );
            None
        }
    }
}

/// Runs until dropped; dropping it mid-session closes that session's stream.
///
/// `events` outlives sessions: what arrives between them waits there.
pub async fn run(ctx: SessionContext, mut events: EventSource, reconnect: ReconnectConfig) {
    let mut backoff = Backoff::new(reconnect.initial_backoff, reconnect.max_backoff);
    let mut rng = fastrand::Rng::new();
    let coordinators = ctx.coordinators.clone();
    let mut rotation = Rotation::new(coordinators.len());
    let mut standby_answered = false;
    // The lease as the last registered session left it (the workers' supervisor holds a copy).
    let mut lease: Option<Lease> = None;
    // The last refusal logged at warn level: a refused agent retries every 30 s, and one
    // warning per change of reason says it all.
    let mut last_refusal = String::new();
    for attempt in 1u64.. {
        let index = rotation.current();
        let Some(url) = coordinators.urls().get(index) else {
            // Validation refuses an empty list; nothing to dial otherwise.
            warn!("no coordinator configured; set `coordinator`");
            return;
        };
        let span = info_span!("session", attempt, coordinator = %url);
        let end = session::run(&ctx, url, &mut events)
            .instrument(span.clone())
            .await;
        if end.registered {
            backoff.reset();
        }
        if end.lease.is_some() {
            lease = end.lease;
        }
        standby_answered |= matches!(end.cause, SessionError::Standby { .. });
        let outcome = match (&end.cause, end.registered) {
            (_, true) => Outcome::Registered,
            (SessionError::Standby { leader, .. }, false) => span.in_scope(|| {
                leader_index(&coordinators, url, leader.as_deref(), index)
                    .map_or(Outcome::Failed, Outcome::Redirect)
            }),
            (_, false) => Outcome::Failed,
        };
        let mut delay = match rotation.advance(outcome) {
            Pause::None => Duration::ZERO,
            Pause::Brief => NEXT_ADDRESS_PAUSE,
            Pause::Backoff => {
                // While the workers' lease lives, dial again before it runs out.
                let cap = lease.and_then(|l| {
                    crate::backoff::lease_cap(
                        l.remaining(Instant::now()),
                        reconnect.initial_backoff,
                    )
                });
                let pause = round_pause(standby_answered, &mut backoff, &mut rng, cap);
                standby_answered = false;
                pause
            }
        };
        if let SessionError::Refused { retry_after, .. } = &end.cause {
            delay = delay.max(*retry_after);
        }
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let next = coordinators
            .urls()
            .get(rotation.current())
            .map_or("", String::as_str);
        span.in_scope(|| match (&end.cause, end.registered) {
            (SessionError::Standby { .. }, false) => {
                debug!(retry_in_ms, next, "dialing {next} next");
            }
            (SessionError::Rejected(reason), false) => {
                warn!(%reason, retry_in_ms, next, "coordinator rejected registration; retrying");
            }
            (SessionError::Refused { reason, .. }, false) if *reason == last_refusal => {
                debug!(
                    retry_in_ms,
                    next, "registration refused again (same reason)"
                );
            }
            (SessionError::Refused { reason, .. }, false) => {
                warn!(
                    retry_in_ms,
                    next, "registration refused: {reason}; retrying slowly"
                );
            }
            (_, true) => {
                let error = error_chain(&end.cause);
                warn!(%error, retry_in_ms, next, "session with coordinator lost; reconnecting");
            }
            (_, false) => {
                let error = error_chain(&end.cause);
                warn!(%error, retry_in_ms, next, "coordinator unreachable; retrying");
            }
        });
        match &end.cause {
            SessionError::Refused { reason, .. } => last_refusal.clone_from(reason),
            _ if end.registered => last_refusal.clear(),
            _ => {}
        }
        ctx.metrics.reconnects.inc();
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dials `rotation` through `outcomes`, recording (index dialed next, pause).
    fn walk(len: usize, outcomes: &[Outcome]) -> Vec<(usize, Pause)> {
        let mut r = Rotation::new(len);
        outcomes
            .iter()
            .map(|o| {
                let pause = r.advance(*o);
                (r.current(), pause)
            })
            .collect()
    }

    #[test]
    fn an_election_under_way_is_polled_not_backed_off() {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10 {
            assert_eq!(
                round_pause(true, &mut backoff, &mut rng, None),
                ELECTION_POLL
            );
        }
        // Only rounds in which nobody answered grow the backoff.
        let first = round_pause(false, &mut backoff, &mut rng, None);
        assert!(first <= Duration::from_millis(400), "{first:?}");
    }

    #[test]
    fn a_single_coordinator_always_backs_off_as_before() {
        assert_eq!(
            walk(
                1,
                &[Outcome::Failed, Outcome::Registered, Outcome::Redirect(0)]
            ),
            [
                (0, Pause::Backoff),
                (0, Pause::Backoff),
                (0, Pause::Backoff)
            ]
        );
    }

    #[test]
    fn failures_move_on_promptly_and_back_off_after_a_whole_round() {
        assert_eq!(
            walk(3, &[Outcome::Failed; 7]),
            [
                (1, Pause::Brief),
                (2, Pause::Brief),
                (0, Pause::Backoff),
                (1, Pause::Brief),
                (2, Pause::Brief),
                (0, Pause::Backoff),
                (1, Pause::Brief),
            ]
        );
    }

    #[test]
    fn a_standby_sends_the_agent_straight_to_the_leader() {
        assert_eq!(
            walk(3, &[Outcome::Redirect(2), Outcome::Registered]),
            [(2, Pause::None), (0, Pause::Brief)]
        );
    }

    #[test]
    fn redirects_in_a_circle_still_back_off_once_a_round() {
        // Two standbys naming each other (a stale view during an election).
        assert_eq!(
            walk(
                2,
                &[
                    Outcome::Redirect(1),
                    Outcome::Redirect(0),
                    Outcome::Redirect(1)
                ]
            ),
            [(1, Pause::None), (0, Pause::Backoff), (1, Pause::None)]
        );
    }

    #[test]
    fn a_redirect_to_itself_or_out_of_range_is_a_failure() {
        assert_eq!(walk(3, &[Outcome::Redirect(0)]), [(1, Pause::Brief)]);
        assert_eq!(walk(3, &[Outcome::Redirect(9)]), [(1, Pause::Brief)]);
    }

    #[test]
    fn losing_the_leader_starts_a_new_round_at_the_next_address() {
        assert_eq!(
            walk(
                3,
                &[
                    Outcome::Failed,
                    Outcome::Registered,
                    Outcome::Failed,
                    Outcome::Failed
                ]
            ),
            [
                (1, Pause::Brief),
                (2, Pause::Brief),
                (0, Pause::Brief),
                (1, Pause::Backoff),
            ]
        );
    }

    #[test]
    fn only_listed_leaders_are_followed() {
        let list = Coordinators::from_flag("http://c1:7770,http://c2:7770,http://c3:7770");
        let from = "http://c1:7770";
        assert_eq!(
            leader_index(&list, from, Some("http://c3:7770"), 0),
            Some(2)
        );
        assert_eq!(
            leader_index(&list, from, Some("http://C3:7770/"), 0),
            Some(2)
        );
        assert_eq!(leader_index(&list, from, Some("http://evil:7770"), 0), None);
        assert_eq!(leader_index(&list, from, Some("http://c1:7770"), 0), None);
        assert_eq!(leader_index(&list, from, None, 0), None);
    }
}
