//! The memory backend, for tests: committed records in in-process maps.
//!
//! A commit always succeeds unless a test asked for failures through
//! [`MemoryFaults`]; the committed maps outlive the [`Store`] when the test
//! keeps a [`Memory`] handle, so a "restarted" engine can load them again. So does the
//! store's mark (its id, fixed when the [`Memory`] is created, and its commit count), which a
//! test can set back to simulate a data dir replaced by an older copy
//! ([`Memory::rewind_seq`]).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::evidence::{Read, Reader};
use super::{
    Backend, Commit, Kind, Pending, Put, RecoveryReport, Store, StoreError, StoreMark, Write, lock,
};
use crate::leadership::Leadership;
use crate::node::MAX_EVENTS;

#[derive(Default)]
struct Committed {
    /// Nodes, jobs, lemons and evidence: key -> JSON.
    records: BTreeMap<(Kind, String), Vec<u8>>,
    /// Each node's history, oldest first.
    events: BTreeMap<String, VecDeque<Vec<u8>>>,
    commits: u64,
    /// The mark's seq: one more per commit that wrote something (a test may set it back).
    seq: u64,
}

/// Memory stores made by this process: each gets its own store id.
static STORES: AtomicU64 = AtomicU64::new(0);

/// The committed state; cloning it gives another handle on the same maps.
#[derive(Clone)]
pub struct Memory {
    committed: Arc<Mutex<Committed>>,
    faults: MemoryFaults,
    /// Unique in this process: `memory-N`.
    store_id: Arc<str>,
    /// What stores made from this handle report as a `--recover` open (see
    /// [`Memory::recovered`]); not shared with other handles.
    recovered: Option<RecoveryReport>,
}

impl Default for Memory {
    fn default() -> Self {
        let n = STORES.fetch_add(1, Ordering::Relaxed) + 1;
        Self {
            committed: Arc::default(),
            faults: MemoryFaults::default(),
            store_id: format!("memory-{n}").into(),
            recovered: None,
        }
    }
}

/// Makes commits fail on demand; held by the test, shared with the backend.
#[derive(Clone, Default)]
pub struct MemoryFaults {
    failing: Arc<AtomicU32>,
}

impl MemoryFaults {
    /// The next `n` commits fail (and keep their batch staged).
    pub fn fail_next_commits(&self, n: u32) {
        self.failing.store(n, Ordering::Relaxed);
    }

    /// Takes one failure, if one is due.
    fn due(&self) -> bool {
        self.failing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl Memory {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn faults(&self) -> MemoryFaults {
        self.faults.clone()
    }

    /// Another handle on the same maps whose stores say they were opened with `--recover` on a
    /// damaged store and lost what `report` lists (the maps are taken as what was kept): what
    /// a coordinator started with `--recover` would see.
    pub fn recovered(&self, report: RecoveryReport) -> Memory {
        Memory {
            recovered: Some(report),
            ..self.clone()
        }
    }

    /// A store over these maps, with nothing staged: what a coordinator
    /// restarted on the same state would see.
    pub fn store(&self) -> Store {
        Store::new(Box::new(MemoryBackend {
            memory: self.clone(),
            pending: Mutex::new(Pending::default()),
            leadership: Arc::new(Leadership::single()),
        }))
    }

    /// How many commits wrote something (empty ones are not counted).
    pub fn commits(&self) -> u64 {
        lock(&self.committed).commits
    }

    /// The mark every store over these maps reports.
    pub fn mark(&self) -> StoreMark {
        StoreMark {
            store_id: self.store_id.to_string(),
            seq: lock(&self.committed).seq,
        }
    }

    /// Sets the mark's seq back to `seq` (the records stay): the store now claims fewer
    /// commits than it told, as a data dir replaced by an older copy of itself would.
    pub fn rewind_seq(&self, seq: u64) {
        let mut committed = lock(&self.committed);
        committed.seq = committed.seq.min(seq);
    }
}

struct MemoryBackend {
    memory: Memory,
    pending: Mutex<Pending>,
    leadership: Arc<Leadership>,
}

impl Reader for Memory {
    fn read_prefix(&self, kind: Kind, prefix: String) -> Read<'_> {
        let found = lock(&self.committed)
            .records
            .iter()
            .filter(|((k, key), _)| *k == kind && key.starts_with(&prefix))
            .map(|((_, key), v)| (key.clone(), v.clone()))
            .collect();
        Box::pin(async move { Ok(found) })
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn path(&self) -> &Path {
        Path::new("memory")
    }

    fn leadership(&self) -> &Arc<Leadership> {
        &self.leadership
    }

    fn load(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let committed = lock(&self.memory.committed);
        if kind == Kind::Event {
            let events = committed.events.iter();
            return Ok(events
                .flat_map(|(node, list)| list.iter().map(|v| (node.clone(), v.clone())))
                .collect());
        }
        Ok(committed
            .records
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, key), v)| (key.clone(), v.clone()))
            .collect())
    }

    fn stage(&self, put: Put) {
        lock(&self.pending).push(Write::Put(put));
    }

    fn stage_delete(&self, kind: Kind, key: String) {
        lock(&self.pending).push(Write::Delete { kind, key });
    }

    fn reader(&self) -> Arc<dyn Reader> {
        Arc::new(self.memory.clone())
    }

    fn discard(&self) {
        lock(&self.pending).take();
    }

    fn commit(&self) -> Commit<'_> {
        Box::pin(async move {
            let batch = lock(&self.pending).take();
            if batch.is_empty() {
                return Ok(());
            }
            if self.memory.faults.due() {
                lock(&self.pending).restage(batch);
                return Err(StoreError::Io {
                    path: self.path().to_owned(),
                    message: "commit failed on purpose (MemoryFaults)".into(),
                });
            }
            let mut committed = lock(&self.memory.committed);
            for write in batch {
                let Put { kind, key, value } = match write {
                    Write::Put(put) => put,
                    Write::Delete { kind, key } => {
                        committed.records.remove(&(kind, key));
                        continue;
                    }
                };
                if kind != Kind::Event {
                    committed.records.insert((kind, key), value);
                    continue;
                }
                let list = committed.events.entry(key).or_default();
                list.push_back(value);
                while list.len() > MAX_EVENTS {
                    list.pop_front();
                }
            }
            committed.commits += 1;
            committed.seq += 1;
            Ok(())
        })
    }

    fn mark(&self) -> Option<StoreMark> {
        Some(self.memory.mark())
    }

    fn recovered(&self) -> Option<RecoveryReport> {
        self.memory.recovered.clone()
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let committed = lock(&self.memory.committed);
        let records = committed
            .records
            .iter()
            .map(|((_, k), v)| k.len() + v.len());
        let events = committed.events.values().flatten().map(Vec::len);
        Ok(records.chain(events).sum::<usize>() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_records::{event, record};

    #[tokio::test]
    async fn evidence_is_read_by_job_prefix_and_deleted() {
        let memory = Memory::new();
        let store = memory.store();
        let e = |node: &str| vigil_core::jobs::evidence::NodeEvidence {
            node: node.into(),
            at_ms: 1,
            processes: Vec::new(),
            log_tail: String::new(),
            fabric: Vec::new(),
            error: String::new(),
        };
        store.put_evidence("j-1", 1, &e("n1")).expect("put");
        store.put_evidence("j-1", 1, &e("n2")).expect("put");
        store.put_evidence("j-10", 1, &e("n1")).expect("put");
        store.flush().await.expect("commit");
        store.drop_evidence("j-1", 1, "n1");
        store.flush().await.expect("commit");
        let found = store.evidence_reader().of_job("j-1").await.expect("read");
        let nodes: Vec<&str> = found.iter().map(|(_, e)| e.node.as_str()).collect();
        assert_eq!(nodes, ["n2"]);
        // A restarted engine's store over the same maps reads them too.
        let again = memory.store().evidence_reader().of_job("j-10").await;
        assert_eq!(again.expect("read").len(), 1);
    }

    #[tokio::test]
    async fn records_round_trip_through_the_memory_backend() {
        let memory = Memory::new();
        let store = memory.store();
        assert_eq!(store.backend(), "memory");
        store.put_node(&record("gpu-001")).expect("put");
        store.put_event("gpu-001", &event(1)).expect("put");
        store.put_event("gpu-001", &event(2)).expect("put");
        assert!(store.load_nodes().expect("load").is_empty(), "staged only");
        store.flush().await.expect("commit");
        assert_eq!(memory.commits(), 1, "one commit for the whole batch");
        store.flush().await.expect("nothing staged");
        assert_eq!(memory.commits(), 1, "an empty commit writes nothing");
        let restarted = memory.store();
        assert_eq!(
            restarted.load_nodes().expect("load"),
            vec![record("gpu-001")]
        );
        let events = restarted.load_events().expect("load");
        let shown: Vec<(&str, &str)> = events
            .iter()
            .map(|(n, e)| (n.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(shown, [("gpu-001", "e1"), ("gpu-001", "e2")]);
        assert!(restarted.load_jobs().expect("load").is_empty());
        assert!(restarted.size_on_disk().expect("size") > 0);
    }

    /// Regression: loading one cluster record read every other as the same type, so a stored
    /// cordon breaker beside no recovery hold made the next start refuse the store.
    #[tokio::test]
    async fn cluster_records_of_different_types_load_each_by_name() {
        use vigil_core::breaker::Breaker;
        use vigil_core::recovery::RecoveryHold;
        let memory = Memory::new();
        let store = memory.store();
        let breaker = Breaker {
            open: Some(vigil_core::breaker::Opened {
                since_unix_ms: 7,
                why: "opened".into(),
            }),
            ..Breaker::default()
        };
        store
            .put_cluster(vigil_core::breaker::RECORD, &breaker)
            .expect("put");
        store.flush().await.expect("commit");
        let restarted = memory.store();
        assert_eq!(
            restarted
                .load_cluster::<RecoveryHold>("recovery")
                .expect("no recovery hold, and the breaker is not read as one"),
            None
        );
        assert_eq!(
            restarted
                .load_cluster::<Breaker>(vigil_core::breaker::RECORD)
                .expect("load"),
            Some(breaker)
        );
    }

    #[tokio::test]
    async fn a_failed_commit_keeps_the_batch_and_a_later_commit_writes_it() {
        let memory = Memory::new();
        let store = memory.store();
        memory.faults().fail_next_commits(1);
        let mut old = record("a");
        old.hostname = "old".into();
        store.put_node(&old).expect("put");
        store.put_event("a", &event(1)).expect("put");
        store.flush().await.expect_err("fails on purpose");
        assert!(memory.store().load_nodes().expect("load").is_empty());
        // Staged after the failure: newer, so it wins over the kept batch.
        store.put_node(&record("a")).expect("put");
        store.put_node(&record("b")).expect("put");
        store.flush().await.expect("commit");
        let restarted = memory.store();
        assert_eq!(
            restarted.load_nodes().expect("load"),
            vec![record("a"), record("b")]
        );
        assert_eq!(restarted.load_events().expect("load").len(), 1);
        assert_eq!(memory.commits(), 1);
    }

    #[test]
    fn only_a_recovered_handle_reports_a_recovery() {
        let memory = Memory::new();
        assert_eq!(memory.store().recovered(), None);
        let report = RecoveryReport {
            damage: "checksum mismatch".into(),
            lost: vec!["nodes/a: checksum mismatch".into()],
            lost_nodes: vec!["a".into()],
            ..RecoveryReport::default()
        };
        let recovered = memory.recovered(report.clone());
        assert_eq!(recovered.store().recovered(), Some(report));
        assert_eq!(memory.store().recovered(), None, "other handles are not");
    }

    #[tokio::test]
    async fn the_mark_counts_commits_that_wrote_and_survives_a_restart() {
        let memory = Memory::new();
        let store = memory.store();
        let first = store.mark().expect("memory keeps a mark");
        assert_eq!(first.seq, 0);
        assert!(first.store_id.starts_with("memory-"), "{}", first.store_id);
        assert_ne!(Memory::new().mark().store_id, first.store_id, "a new store");
        store.put_node(&record("a")).expect("put");
        store.flush().await.expect("commit");
        store.flush().await.expect("nothing staged");
        memory.faults().fail_next_commits(1);
        store.put_node(&record("b")).expect("put");
        store.flush().await.expect_err("fails on purpose");
        store.flush().await.expect("commit");
        let restarted = memory.store().mark().expect("mark");
        assert_eq!(restarted.store_id, first.store_id);
        assert_eq!(restarted.seq, 2, "two commits wrote something");
        memory.rewind_seq(1);
        assert_eq!(store.mark().map(|m| m.seq), Some(1));
        assert_eq!(memory.commits(), 2, "the records and the commit count stay");
    }

    #[tokio::test]
    async fn history_beyond_max_events_is_dropped_oldest_first() {
        let memory = Memory::new();
        let store = memory.store();
        for i in 0..(MAX_EVENTS as u64 + 5) {
            store.put_event("a", &event(i)).expect("put");
        }
        store.flush().await.expect("commit");
        let events = store.load_events().expect("load");
        assert_eq!(events.len(), MAX_EVENTS);
        assert_eq!(events.first().map(|e| e.1.message.as_str()), Some("e5"));
    }
}
