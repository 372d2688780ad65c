//! The agent's link to the coordinator: sessions one after another, forever, with backoff between them.
//!
//! The agent never gives up on its coordinator: an outage, a restart or a
//! rejection is logged once per attempt and retried.

use tracing::{Instrument, info_span, warn};

use crate::backoff::Backoff;
use crate::config::ReconnectConfig;
use crate::error_chain;
use crate::events::EventSource;
use crate::session::{self, SessionContext, SessionError};

/// Runs until dropped; dropping it mid-session closes that session's stream.
///
/// `events` outlives sessions: what arrives between them waits there.
pub async fn run(ctx: SessionContext, mut events: EventSource, reconnect: ReconnectConfig) {
    let mut backoff = Backoff::new(reconnect.initial_backoff, reconnect.max_backoff);
    let mut rng = fastrand::Rng::new();
    for attempt in 1u64.. {
        let span = info_span!("session", attempt);
        let end = session::run(&ctx, &mut events)
            .instrument(span.clone())
            .await;
        if end.registered {
            backoff.reset();
        }
        let delay = backoff.next_delay(&mut rng);
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        span.in_scope(|| match (&end.cause, end.registered) {
            (SessionError::Rejected(reason), false) => {
                warn!(%reason, retry_in_ms, "coordinator rejected registration; retrying");
            }
            (_, true) => {
                let error = error_chain(&end.cause);
                warn!(%error, retry_in_ms, "session with coordinator lost; reconnecting");
            }
            (_, false) => {
                let error = error_chain(&end.cause);
                warn!(%error, retry_in_ms, "coordinator unreachable; retrying");
            }
        });
        ctx.metrics.reconnects.inc();
        tokio::time::sleep(delay).await;
    }
}
