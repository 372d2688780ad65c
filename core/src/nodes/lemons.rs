//! Lemon hosts and GPUs, pure: every failure is charged to the hardware
//! behind it (the host by node name, each GPU by serial, or UUID where the
//! serial is unknown), across jobs, restarts and coordinator restarts (the
//! ledger is persisted). A host or GPU that caused `lemons.max_failures`
//! failures within `lemons.window` is blocklisted: its node is cordoned with
//! reason `repeat-offender`, and a node that (re)joins holding a blocklisted
//! GPU serial is cordoned at once, until an operator clears the entry.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::node::NodeRecord;

pub const DEFAULT_MAX_FAILURES: u32 = 3;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Incidents kept per host or GPU (the window decides which count).
pub const MAX_INCIDENTS: usize = 32;
/// The cordon reason's first word, as operators and alerts match it.
pub const REASON: &str = "repeat-offender";

/// `[lemons]` in the coordinator's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LemonConfig {
    /// Failures within `window` that make a host or GPU a lemon; 0 turns
    /// lemon detection off (failures are still recorded).
    pub max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for LemonConfig {
    fn default() -> Self {
        Self {
            max_failures: DEFAULT_MAX_FAILURES,
            window: DEFAULT_WINDOW,
        }
    }
}

impl LemonConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.window < Duration::from_secs(1) {
            return Err(format!(
                "lemons.window = {} is too short; use at least 1s (e.g. \"7d\")",
                humantime::format_duration(self.window)
            ));
        }
        Ok(())
    }

    fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SubjectKind {
    Host,
    Gpu,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Host => "host",
            SubjectKind::Gpu => "gpu",
        }
    }
}

/// One failure charged to a host or GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    pub at_ms: u64,
    /// unhealthy (a GPU fault the health policy judged fatal), node_lost.
    pub kind: String,
    /// The node it happened on (a GPU may move between hosts).
    pub node: String,
    pub gpu_index: Option<u32>,
    pub detail: String,
}

/// What vigil remembers about one host or GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LemonRecord {
    pub kind: SubjectKind,
    /// Node name (host) or serial / UUID (GPU).
    pub id: String,
    /// Where it was last seen.
    pub node: String,
    /// Oldest first, at most `MAX_INCIDENTS`.
    pub incidents: Vec<Incident>,
    /// Set when it became a lemon; cleared only by an operator.
    pub blocklisted_at_ms: Option<u64>,
    pub cleared_at_ms: Option<u64>,
}

impl LemonRecord {
    /// The store key and the name operators use: `host/NAME`, `gpu/SERIAL`.
    pub fn key(&self) -> String {
        key(self.kind, &self.id)
    }

    /// Incidents within the window ending at `now_ms`, since the last clear.
    pub fn recent(&self, now_ms: u64, cfg: &LemonConfig) -> impl Iterator<Item = &Incident> {
        let since = now_ms
            .saturating_sub(cfg.window_ms())
            .max(self.cleared_at_ms.map_or(0, |c| c + 1));
        self.incidents.iter().filter(move |i| i.at_ms >= since)
    }

    /// `unhealthy x2, node_lost x1`.
    pub fn kinds(&self, now_ms: u64, cfg: &LemonConfig) -> String {
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for i in self.recent(now_ms, cfg) {
            *counts.entry(i.kind.as_str()).or_default() += 1;
        }
        counts
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn key(kind: SubjectKind, id: &str) -> String {
    format!("{}/{id}", kind.as_str())
}

/// A GPU's hardware identity: its serial, or its UUID where the serial is unknown.
pub fn gpu_identity(serial: &str, uuid: &str) -> String {
    if serial.is_empty() {
        uuid.to_owned()
    } else {
        serial.to_owned()
    }
}

/// A failure to charge: to the host, and to the GPUs named.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub node: &'a str,
    pub kind: &'a str,
    pub detail: &'a str,
    /// (index, identity) of each GPU at fault.
    pub gpus: Vec<(u32, String)>,
}

/// Every host and GPU with a failure on record.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub cfg: LemonConfig,
    pub records: BTreeMap<String, LemonRecord>,
}

impl Ledger {
    pub fn new(cfg: LemonConfig, records: Vec<LemonRecord>) -> Self {
        Self {
            cfg,
            records: records.into_iter().map(|r| (r.key(), r)).collect(),
        }
    }

    /// Charge `failure`. Returns the records that changed (to persist), and
    /// among them the keys that just became lemons.
    pub fn charge(&mut self, failure: &Failure, now_ms: u64) -> (Vec<LemonRecord>, Vec<String>) {
        let mut subjects = vec![(SubjectKind::Host, failure.node.to_owned(), None)];
        subjects.extend(
            failure
                .gpus
                .iter()
                .map(|(index, id)| (SubjectKind::Gpu, id.clone(), Some(*index))),
        );
        let (mut changed, mut newly) = (Vec::new(), Vec::new());
        for (kind, id, gpu_index) in subjects {
            let k = key(kind, &id);
            let r = self
                .records
                .entry(k.clone())
                .or_insert_with(|| LemonRecord {
                    kind,
                    id,
                    node: failure.node.to_owned(),
                    incidents: Vec::new(),
                    blocklisted_at_ms: None,
                    cleared_at_ms: None,
                });
            r.node = failure.node.to_owned();
            if r.incidents.len() >= MAX_INCIDENTS {
                r.incidents.remove(0);
            }
            r.incidents.push(Incident {
                at_ms: now_ms,
                kind: failure.kind.to_owned(),
                node: failure.node.to_owned(),
                gpu_index,
                detail: failure.detail.to_owned(),
            });
            let count = r.recent(now_ms, &self.cfg).count();
            if self.cfg.max_failures > 0
                && r.blocklisted_at_ms.is_none()
                && count >= self.cfg.max_failures as usize
            {
                r.blocklisted_at_ms = Some(now_ms);
                newly.push(k);
            }
            changed.push(r.clone());
        }
        (changed, newly)
    }

    /// Why `node` must not serve, if it is (or holds) a blocklisted host or GPU.
    pub fn blocks(&self, node: &NodeRecord) -> Option<String> {
        let host = self
            .records
            .get(&key(SubjectKind::Host, &node.name))
            .filter(|r| r.blocklisted_at_ms.is_some());
        let gpus = node.gpus.iter().filter_map(|g| {
            self.records
                .get(&key(SubjectKind::Gpu, &gpu_identity(&g.serial, &g.uuid)))
                .filter(|r| r.blocklisted_at_ms.is_some())
                .map(|r| (g.index, r))
        });
        let mut why: Vec<String> = host
            .map(|r| format!("host {} blocklisted ({} failures)", r.id, r.incidents.len()))
            .into_iter()
            .collect();
        why.extend(gpus.map(|(index, r)| {
            format!(
                "GPU {index} serial {} blocklisted ({} failures)",
                r.id,
                r.incidents.len()
            )
        }));
        (!why.is_empty()).then(|| format!("{REASON}: {}", why.join("; ")))
    }

    /// An operator clears `node`: its host entry and every GPU it holds. The
    /// history stays; only failures after the clear count again.
    pub fn clear_node(&mut self, node: &NodeRecord, now_ms: u64) -> Vec<LemonRecord> {
        let mut keys = vec![key(SubjectKind::Host, &node.name)];
        keys.extend(
            node.gpus
                .iter()
                .map(|g| key(SubjectKind::Gpu, &gpu_identity(&g.serial, &g.uuid))),
        );
        self.clear_keys(&keys, now_ms)
    }

    /// Clear one entry by key (`host/NAME`, `gpu/SERIAL`), or a bare id.
    pub fn clear(&mut self, subject: &str, now_ms: u64) -> Vec<LemonRecord> {
        let keys = [
            subject.to_owned(),
            key(SubjectKind::Host, subject),
            key(SubjectKind::Gpu, subject),
        ];
        self.clear_keys(&keys, now_ms)
    }

    fn clear_keys(&mut self, keys: &[String], now_ms: u64) -> Vec<LemonRecord> {
        let mut changed = Vec::new();
        for k in keys {
            if let Some(r) = self.records.get_mut(k) {
                r.blocklisted_at_ms = None;
                r.cleared_at_ms = Some(now_ms);
                changed.push(r.clone());
            }
        }
        changed
    }

    /// Lemons and suspects (at least one recent failure), worst first.
    pub fn listing(&self, now_ms: u64) -> Vec<&LemonRecord> {
        let mut out: Vec<&LemonRecord> = self
            .records
            .values()
            .filter(|r| r.blocklisted_at_ms.is_some() || r.recent(now_ms, &self.cfg).count() > 0)
            .collect();
        out.sort_by_key(|r| {
            (
                r.blocklisted_at_ms.is_none(),
                std::cmp::Reverse(r.recent(now_ms, &self.cfg).count()),
                r.key(),
            )
        });
        out
    }
}

#[cfg(test)]
#[path = "lemons_tests.rs"]
mod tests;
