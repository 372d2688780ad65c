//! What this coordinator knows of the others and of etcd: shown by `clusterctl status`
//! and exported to Prometheus. Written by the election and health tasks, read by anyone.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use vigil_proto::v1;

/// The value of the leader key, and of each coordinator's presence key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    pub name: String,
    pub url: String,
    pub version: String,
    pub started_at_unix_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Leader {
    pub name: String,
    pub url: String,
    pub term: u64,
    pub since_unix_ms: u64,
}

#[derive(Debug, Default)]
struct Inner {
    leader: Option<Leader>,
    /// Whether this coordinator leads.
    leading: bool,
    coordinators: Vec<CoordinatorRecord>,
    members: Vec<v1::EtcdMember>,
    quorum: bool,
    etcd_error: String,
    checked: Option<Instant>,
}

pub struct HaView {
    me: CoordinatorRecord,
    inner: Mutex<Inner>,
    leader_changes: AtomicU64,
    metrics: Option<Exported>,
}

/// The series this view keeps current.
struct Exported {
    leader: Gauge,
    changes: Counter,
    term: Gauge,
    quorum: Gauge,
    healthy: Gauge,
}

impl HaView {
    pub fn new(me: CoordinatorRecord) -> Self {
        Self {
            me,
            inner: Mutex::new(Inner::default()),
            leader_changes: AtomicU64::new(0),
            metrics: None,
        }
    }

    /// Keeps `vigil_leader`, `vigil_leader_changes_total`, the term and etcd's health current.
    pub fn with_metrics(mut self, m: &crate::ha::metrics::HaMetrics) -> Self {
        self.metrics = Some(Exported {
            leader: m.leader.clone(),
            changes: m.leader_changes.clone(),
            term: m.term.clone(),
            quorum: m.etcd_quorum.clone(),
            healthy: m.etcd_members_healthy.clone(),
        });
        self
    }

    pub fn me(&self) -> &CoordinatorRecord {
        &self.me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who leads now (`None`: nobody); counts a change of leader or term.
    pub fn set_leader(&self, leader: Option<Leader>) {
        let mut inner = self.lock();
        let before = inner.leader.as_ref().map(|l| (l.name.clone(), l.term));
        let after = leader.as_ref().map(|l| (l.name.clone(), l.term));
        if let (Some(_), true) = (&after, before != after) {
            self.leader_changes.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.changes.inc();
            }
        }
        inner.leading = leader.as_ref().is_some_and(|l| l.name == self.me.name);
        if let (Some(l), true, false) = (&leader, before != after, inner.leading) {
            tracing::info!(leader = %l.name, url = %l.url, term = l.term, "standing by: {} leads at term {}", l.name, l.term);
        }
        if let Some(m) = &self.metrics {
            m.leader.set(i64::from(inner.leading));
            m.term.set(
                leader
                    .as_ref()
                    .map_or(0, |l| i64::try_from(l.term).unwrap_or(i64::MAX)),
            );
        }
        inner.leader = leader;
    }

    pub fn leader(&self) -> Option<Leader> {
        self.lock().leader.clone()
    }

    pub fn leading(&self) -> bool {
        self.lock().leading
    }

    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.load(Ordering::Relaxed)
    }

    /// The leader's URL for a client to go to ("" while none leads).
    pub fn leader_url(&self) -> String {
        self.lock()
            .leader
            .as_ref()
            .map(|l| l.url.clone())
            .unwrap_or_default()
    }

    pub fn set_health(
        &self,
        coordinators: Vec<CoordinatorRecord>,
        members: Vec<v1::EtcdMember>,
        quorum: bool,
        etcd_error: String,
    ) {
        let mut inner = self.lock();
        inner.coordinators = coordinators;
        inner.members = members;
        inner.quorum = quorum;
        inner.etcd_error = etcd_error;
        inner.checked = Some(Instant::now());
        if let Some(m) = &self.metrics {
            m.quorum.set(i64::from(inner.quorum));
            m.healthy.set(
                i64::try_from(inner.members.iter().filter(|m| m.healthy).count()).unwrap_or(0),
            );
        }
    }

    pub fn quorum(&self) -> bool {
        self.lock().quorum
    }

    pub fn members_healthy(&self) -> usize {
        self.lock().members.iter().filter(|m| m.healthy).count()
    }

    /// Age of the last health check, for staleness.
    pub fn checked_ago(&self) -> Option<Duration> {
        self.lock().checked.map(|t| t.elapsed())
    }

    pub fn status(&self) -> v1::HaStatus {
        let inner = self.lock();
        let leader = inner.leader.clone().unwrap_or_default();
        v1::HaStatus {
            store: "etcd".into(),
            coordinator: self.me.name.clone(),
            role: if inner.leading { "leader" } else { "standby" }.into(),
            leader: leader.name.clone(),
            leader_url: leader.url.clone(),
            term: leader.term,
            leader_since_unix_ms: leader.since_unix_ms,
            coordinators: inner
                .coordinators
                .iter()
                .map(|c| v1::CoordinatorInfo {
                    name: c.name.clone(),
                    url: c.url.clone(),
                    leader: !leader.name.is_empty() && c.name == leader.name,
                    version: c.version.clone(),
                    started_at_unix_ms: c.started_at_unix_ms,
                })
                .collect(),
            etcd: inner.members.clone(),
            quorum: inner.quorum,
            etcd_error: inner.etcd_error.clone(),
            leader_changes: self.leader_changes(),
        }
    }
}

/// The status of a single coordinator on SQLite: it always leads, at term 0.
pub fn single_status(started_at_unix_ms: u64) -> v1::HaStatus {
    v1::HaStatus {
        // One coordinator has no name in a group: clusterctl shows only "sqlite (single coordinator)".
        store: "sqlite".into(),
        role: "leader".into(),
        term: 0,
        leader_since_unix_ms: started_at_unix_ms,
        quorum: true,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> CoordinatorRecord {
        CoordinatorRecord {
            name: "c1".into(),
            url: "http://c1".into(),
            version: "0".into(),
            started_at_unix_ms: 1,
        }
    }

    fn leader(name: &str, term: u64) -> Option<Leader> {
        Some(Leader {
            name: name.into(),
            url: format!("http://{name}"),
            term,
            since_unix_ms: 5,
        })
    }

    #[test]
    fn leader_changes_count_new_leaders_and_terms_not_repeats() {
        let v = HaView::new(me());
        v.set_leader(leader("c2", 10));
        v.set_leader(leader("c2", 10));
        assert_eq!(v.leader_changes(), 1);
        assert!(!v.leading());
        v.set_leader(None);
        assert_eq!(v.leader_url(), "");
        v.set_leader(leader("c1", 12));
        assert_eq!(v.leader_changes(), 2);
        assert!(v.leading());
        let s = v.status();
        assert_eq!(
            (s.role.as_str(), s.term, s.leader.as_str()),
            ("leader", 12, "c1")
        );
    }
}
