//! Who this coordinator is and whether it may decide: the leadership term and its deadline.
//!
//! A single coordinator (SQLite store) always leads, at term 0. With etcd (`ha`), a
//! coordinator leads only while its etcd lease holds: every keepalive that etcd
//! answers pushes the local deadline forward (to when the keepalive was sent,
//! plus the lease TTL, minus a safety margin), and nothing is sent to an agent
//! once the deadline has passed, even before the keepalive task notices. A
//! process that was paused (SIGSTOP, a VM freeze) therefore wakes up unable to
//! command anyone: `Instant` keeps counting while it sleeps.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use tokio::sync::watch;

pub struct Leadership {
    name: String,
    url: String,
    term: u64,
    epoch: Instant,
    /// Milliseconds after `epoch` until which this coordinator may act; `u64::MAX`: always.
    valid_until_ms: AtomicU64,
    lost: watch::Sender<Option<String>>,
    since_unix_ms: u64,
    lost_reason: Mutex<Option<String>>,
}

impl Leadership {
    /// The single coordinator (SQLite store): leads forever, at term 0.
    pub fn single() -> Self {
        Self::new("coordinator", "", 0, None, 0)
    }

    /// Leadership won in etcd at `term`, valid until `valid_until`.
    pub fn elected(
        name: &str,
        url: &str,
        term: u64,
        valid_until: Instant,
        since_unix_ms: u64,
    ) -> Self {
        Self::new(name, url, term, Some(valid_until), since_unix_ms)
    }

    fn new(
        name: &str,
        url: &str,
        term: u64,
        valid_until: Option<Instant>,
        since_unix_ms: u64,
    ) -> Self {
        let epoch = Instant::now();
        let until = valid_until.map_or(u64::MAX, |t| millis_after(epoch, t));
        Self {
            name: name.to_owned(),
            url: url.to_owned(),
            term,
            epoch,
            valid_until_ms: AtomicU64::new(until),
            lost: watch::channel(None).0,
            since_unix_ms,
            lost_reason: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The fencing token carried on every message to agents.
    pub fn term(&self) -> u64 {
        self.term
    }

    pub fn since_unix_ms(&self) -> u64 {
        self.since_unix_ms
    }

    /// Whether this coordinator may still act (send to agents, decide), now.
    pub fn is_valid(&self) -> bool {
        let until = self.valid_until_ms.load(Ordering::Acquire);
        until == u64::MAX || millis_after(self.epoch, Instant::now()) < until
    }

    /// How long leadership is still certain; `None` for a single coordinator.
    pub fn remaining(&self) -> Option<Duration> {
        let until = self.valid_until_ms.load(Ordering::Acquire);
        if until == u64::MAX {
            return None;
        }
        let now = millis_after(self.epoch, Instant::now());
        Some(Duration::from_millis(until.saturating_sub(now)))
    }

    /// A keepalive was answered: leadership holds until `until` (never moves back).
    pub fn extend(&self, until: Instant) {
        if self.lost_reason().is_some() {
            return;
        }
        let ms = millis_after(self.epoch, until);
        self.valid_until_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Leadership is gone (lease lost, a fenced write, etcd said so): stop acting at once.
    pub fn revoke(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.valid_until_ms.store(0, Ordering::Release);
        let mut lost = self.lost_reason.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() {
            *lost = Some(reason.clone());
            self.lost.send_replace(Some(reason));
        }
    }

    pub fn lost_reason(&self) -> Option<String> {
        self.lost_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves with the reason once leadership is revoked.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "leadership dropped".into();
            }
        }
    }
}

fn millis_after(epoch: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_always_leads_at_term_zero() {
        let l = Leadership::single();
        assert!(l.is_valid());
        assert_eq!(l.term(), 0);
        assert_eq!(l.remaining(), None);
    }

    #[test]
    fn elected_leads_until_its_deadline_and_extends_forward_only() {
        let now = Instant::now();
        let l = Leadership::elected("c1", "http://c1", 7, now + Duration::from_secs(5), 1);
        assert!(l.is_valid());
        assert_eq!(l.term(), 7);
        l.extend(now + Duration::from_secs(1));
        assert!(
            l.remaining().is_some_and(|r| r > Duration::from_secs(3)),
            "never moves back"
        );
        let past = Leadership::elected("c1", "", 7, now, 1);
        assert!(!past.is_valid(), "a deadline already passed");
    }

    #[tokio::test]
    async fn revoked_stops_acting_and_stays_revoked() {
        let l = Leadership::elected("c1", "", 3, Instant::now() + Duration::from_secs(60), 1);
        l.revoke("lease lost");
        assert!(!l.is_valid());
        l.extend(Instant::now() + Duration::from_secs(60));
        assert!(
            !l.is_valid(),
            "a late keepalive answer does not bring it back"
        );
        assert_eq!(l.lost().await, "lease lost");
        l.revoke("second reason");
        assert_eq!(l.lost_reason().as_deref(), Some("lease lost"));
    }
}
