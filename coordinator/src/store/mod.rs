//! The durable store: one [`Backend`] trait, three backends, and the [`Store`] the engine holds.
//!
//! Write-ahead, group commit: a turn of the engine stages every record it
//! changed (`put_*`), then commits them once (`flush`) before any effect of
//! that turn is sent. A commit makes everything staged durable in one
//! operation, or fails and keeps all of it staged, ahead of anything staged
//! since, so the next commit writes it. `load_*` never sees what is only
//! staged (the engine loads once, at start; etcd hands out what it read when
//! leadership was won).
//!
//! Layout:
//! - `sqlite`: a single coordinator's data dir (the default); a commit is one
//!   transaction with its manifest, every record checksummed, all of it checked at open.
//! - `sled`: the engine before, read only to move an old data dir over.
//! - `etcd`: the HA group's state, every commit a transaction fenced on the
//!   leadership term, bounded in time.
//! - `memory`: in-process maps for tests, with failures on demand.
//! - `backup`: backups of the SQLite store (while it runs), restoring one, and the `[backup]`
//!   schedule.
//! - `evidence`: hung attempts' evidence, one record per (job, attempt, node), kept apart from
//!   the job records and read on demand ([`EvidenceReader`]), never loaded at start.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::job::Job;
use crate::leadership::Leadership;
use crate::lemons::LemonRecord;
use crate::node::{NodeEvent, NodeRecord};

pub mod backup;
pub mod etcd;
pub mod evidence;
pub mod memory;
mod pending;
pub mod scrub;
pub mod sled;
pub mod sqlite;

pub use etcd::EtcdStore;
pub use evidence::{EvidenceReader, Reader};
pub use memory::{Memory, MemoryFaults};
pub(crate) use pending::Pending;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {path} is not a directory; point --data-dir (data_dir) at a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot create data dir {path}: {source}; create it or point --data-dir elsewhere")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open the state store in data dir {path}: {message}; if another vigil-coordinator \
         uses it, stop that one; if the directory is not vigil's, point --data-dir elsewhere"
    )]
    Open { path: PathBuf, message: String },
    #[error(
        "data dir {path} holds files but no vigil state store ({found}); point --data-dir at an \
         empty directory or at an existing vigil data dir"
    )]
    Foreign { path: PathBuf, found: String },
    #[error(
        "state store in {path}: record {key:?} is unreadable ({message}); restore the data dir from backup"
    )]
    Corrupt {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The store holds less, or other, than it committed: never served from (exit 65).
    #[error(
        "the state store in {path} is damaged: {what}. vigil-coordinator does not run on a \
         damaged store. Two ways out: restore the last backup (vigil-coordinator restore --from \
         FILE --data-dir {path}), or start from what is still valid (vigil-coordinator --recover \
         --data-dir {path}: every lost record is listed, every node is held cordoned for review \
         and no job starts until an operator confirms with clusterctl recovery confirm)"
    )]
    Damaged { path: PathBuf, what: String },
    #[error("state store in {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "no space left on the disk of the state store in {path}; free space there: running jobs \
         carry on, but no change is accepted until it can be saved"
    )]
    Full { path: PathBuf },
    #[error(
        "this coordinator no longer leads (term {term}): {reason}; nothing was written, and it \
         steps down"
    )]
    Fenced { term: u64, reason: String },
}

/// What a record is; each backend keeps each kind in its own tree or key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Job,
    Lemon,
    /// Cluster-wide records, by name (the recovery hold after `--recover`).
    Cluster,
    /// A node's history: every put appends an entry, the oldest beyond
    /// [`crate::node::MAX_EVENTS`] per node are dropped.
    Event,
    /// A hung attempt's evidence from one node, keyed `{job}/{attempt:020}/{node}` (see
    /// `evidence`): written once per answer, deleted past the job's retention, read on demand.
    Evidence,
}

impl Kind {
    /// Its name in the store (the `kind` column in SQLite, the key range in etcd), and of its
    /// keys in errors.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Job => "jobs",
            Kind::Lemon => "lemons",
            Kind::Event => "events",
            Kind::Cluster => "cluster",
            Kind::Evidence => "evidence",
        }
    }
}

/// One staged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub kind: Kind,
    /// The node's name, the job's id, the lemon record's key; for an event, its node's name.
    pub key: String,
    /// The record's JSON, the same on every backend.
    pub value: Vec<u8>,
}

/// One staged change: a record written, or one deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(Put),
    /// Only evidence records are deleted by key (a node's history is pruned by each backend).
    Delete {
        kind: Kind,
        key: String,
    },
}

impl Write {
    /// The record it changes, for keeping one write per record; `None` for a history entry
    /// (each put appends one).
    pub fn record(&self) -> Option<(Kind, &str)> {
        match self {
            Write::Put(p) if p.kind == Kind::Event => None,
            Write::Put(p) => Some((p.kind, &p.key)),
            Write::Delete { kind, key } => Some((*kind, key)),
        }
    }
}

/// Which store this is and how far it has committed: agents keep the highest mark they
/// were told, so a data dir replaced by an older copy of itself (same `store_id`, lower
/// `seq`) is exposed by the first agent that registers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreMark {
    /// Random, fixed when the store is created; a restore or a `--recover` makes a new one.
    pub store_id: String,
    /// The number of commits made to this store; rises by one with every commit.
    pub seq: u64,
}

/// What `vigil-coordinator --recover` found on a damaged store: the store now holds only what
/// was still valid, and the engine holds the cluster for review (see `RecoveryHold`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    /// Why the store was damaged, as the refusal to start said it.
    pub damage: String,
    /// One line per problem found ("nodes/gpu-017 fails its checksum", "commit 412 wrote 3
    /// jobs records, 2 are there").
    pub lost: Vec<String>,
    /// Node names whose records were lost (they come back as new when their agents register).
    pub lost_nodes: Vec<String>,
    /// Job ids whose records were lost.
    pub lost_jobs: Vec<String>,
    /// Where the damaged files were moved, kept for a post-mortem.
    pub damaged_copy: PathBuf,
}

impl StoreMark {
    /// The store's own id, without the `@instance` a backend may add (see [`StoreMark::is_behind`]).
    pub fn store(&self) -> &str {
        self.store_id
            .split_once('@')
            .map_or(&self.store_id, |(s, _)| s)
    }

    fn instance(&self) -> &str {
        self.store_id.split_once('@').map_or("", |(_, i)| i)
    }

    /// Whether this store lost commits that `told`, a mark of the same store that an agent
    /// was told, vouches for: then it was rolled back. A mark of another store (before a
    /// restore or a recovery) says nothing about this one.
    ///
    /// A backend that names each opening (`store@instance`) is judged exactly: a mark from
    /// an earlier opening must be within what this one found at open (`opened`, the seq then),
    /// whatever it committed since; a mark from this opening, within its commits so far.
    pub fn is_behind(&self, told: &StoreMark, opened: u64) -> bool {
        if self.store() != told.store() {
            return false;
        }
        if self.instance() == told.instance() {
            told.seq > self.seq
        } else {
            told.seq > opened
        }
    }
}

/// A commit in flight: it borrows the backend until it is done.
pub type Commit<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// Where the state lives. `Sync` because the engine awaits a commit while
/// holding the store by reference inside a spawned (`Send`) task.
pub trait Backend: Send + Sync {
    /// "sqlite", "etcd" or "memory": the label of the store's metrics.
    fn name(&self) -> &'static str;

    /// Where it lives, for messages: the data dir, or the etcd endpoints and prefix.
    fn path(&self) -> &Path;

    /// Whose writes these are: term 0, always valid, unless the group is on etcd.
    fn leadership(&self) -> &Arc<Leadership>;

    /// Every committed record of `kind` as (key, JSON); events oldest first within each node.
    fn load(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Add a write to the pending batch; nothing is written before [`Backend::commit`].
    fn stage(&self, put: Put);

    /// Add the deletion of a record to the pending batch, after what is staged.
    fn stage_delete(&self, kind: Kind, key: String);

    /// Reads committed records of a kind by key prefix, from any task, without the engine
    /// (a job's evidence for `clusterctl job show`).
    fn reader(&self) -> std::sync::Arc<dyn Reader>;

    /// Drop every staged write (an operator's request whose commit failed is undone: what it
    /// staged, on a store with nothing else pending, must never be written later).
    fn discard(&self);

    /// Make every staged write durable in one operation. On error, all of
    /// the batch stays staged (ahead of anything staged since) for the next
    /// commit, and the error says why; a commit never waits without bound.
    fn commit(&self) -> Commit<'_>;

    /// After a failed commit, reopen what must be reopened. `Ok(true)`: it
    /// was, and what was committed but not yet durable may be gone, so the
    /// caller must stage its whole state again.
    fn recover(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// The store's identity and its last durable commit; `None` where the backend has its
    /// own guard against being rolled back (etcd's revisions).
    fn mark(&self) -> Option<StoreMark> {
        None
    }

    /// The seq [`Backend::mark`] had when this process opened the store (see
    /// [`StoreMark::is_behind`]).
    fn opened_seq(&self) -> u64 {
        0
    }

    /// Set once, by a store opened with `--recover` on a damaged data dir.
    fn recovered(&self) -> Option<RecoveryReport> {
        None
    }

    /// Bytes the state takes where it is kept.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// The store the engine owns: typed records over one [`Backend`].
pub struct Store(Box<dyn Backend>);

impl Store {
    pub fn new(backend: Box<dyn Backend>) -> Self {
        Self(backend)
    }

    /// Open (or create) the store in the data dir `path`, refusing a directory that holds
    /// something other than a vigil store rather than writing into it, and a damaged store
    /// ([`StoreError::Damaged`]). An old sled store there is moved over once.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self(Box::new(sqlite::Sqlite::open(path)?)))
    }

    /// `vigil-coordinator --recover`: like [`Store::open`], but a damaged store is replaced
    /// by a new one holding what was still valid, and [`Store::recovered`] says what was lost.
    pub fn open_recover(path: &Path) -> Result<Self, StoreError> {
        Ok(Self(Box::new(sqlite::Sqlite::open_with(
            path,
            sqlite::OnDamage::Recover,
        )?)))
    }

    /// The state in etcd, written under `etcd`'s leadership.
    pub fn on_etcd(etcd: EtcdStore) -> Self {
        Self(Box::new(etcd))
    }

    /// Empty, in memory, always leading: for tests. See [`Memory`] for one
    /// that survives a "restart" and fails on demand.
    pub fn memory() -> Self {
        Memory::new().store()
    }

    /// "sqlite", "etcd" or "memory".
    pub fn backend(&self) -> &'static str {
        self.0.name()
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The leadership this store writes under (term 0, always valid, for a single coordinator).
    pub fn leadership(&self) -> &Arc<Leadership> {
        self.0.leadership()
    }

    /// See [`Backend::recover`].
    pub fn recover(&mut self) -> Result<bool, StoreError> {
        self.0.recover()
    }

    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.0.size_on_disk()
    }

    /// See [`Backend::recovered`].
    pub fn recovered(&self) -> Option<RecoveryReport> {
        self.0.recovered()
    }

    /// See [`Backend::opened_seq`].
    pub fn opened_seq(&self) -> u64 {
        self.0.opened_seq()
    }

    /// See [`Backend::mark`].
    pub fn mark(&self) -> Option<StoreMark> {
        self.0.mark()
    }

    pub fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::new();
        for (name, record) in self.load::<NodeRecord>(Kind::Node)? {
            if record.name != name {
                return Err(StoreError::Corrupt {
                    path: self.path().to_owned(),
                    key: format!("nodes/{name}"),
                    message: format!("holds the record of node {:?}", record.name),
                });
            }
            out.push(record);
        }
        Ok(out)
    }

    pub fn load_jobs(&self) -> Result<Vec<Job>, StoreError> {
        Ok(self.load(Kind::Job)?.into_iter().map(|(_, j)| j).collect())
    }

    /// The lemon ledger: every host and GPU with a failure on record.
    pub fn load_lemons(&self) -> Result<Vec<LemonRecord>, StoreError> {
        Ok(self
            .load(Kind::Lemon)?
            .into_iter()
            .map(|(_, l)| l)
            .collect())
    }

    /// Every stored history entry, oldest first within each node.
    pub fn load_events(&self) -> Result<Vec<(String, NodeEvent)>, StoreError> {
        self.load(Kind::Event)
    }

    /// Stage a node record; durable after the next [`Store::flush`].
    pub fn put_node(&self, record: &NodeRecord) -> Result<(), StoreError> {
        let what = format!("node {:?}", record.name);
        self.stage(Kind::Node, &record.name, &what, record)
    }

    /// Stage a job record; durable after the next [`Store::flush`].
    pub fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.stage(Kind::Job, &job.id, &format!("job {:?}", job.id), job)
    }

    /// Stage a lemon record; durable after the next [`Store::flush`].
    pub fn put_lemon(&self, record: &LemonRecord) -> Result<(), StoreError> {
        let key = record.key();
        self.stage(Kind::Lemon, &key, &format!("lemon record {key:?}"), record)
    }

    /// Stage a cluster-wide record under `name`; durable after the next [`Store::flush`].
    pub fn put_cluster<T: Serialize>(&self, name: &str, record: &T) -> Result<(), StoreError> {
        self.stage(
            Kind::Cluster,
            name,
            &format!("cluster record {name:?}"),
            record,
        )
    }

    /// The cluster-wide record `name`, if one was stored. Only that record is read as a `T`:
    /// the others (the recovery hold, the cordon breaker) are other types.
    pub fn load_cluster<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let Some((_, value)) = self
            .0
            .load(Kind::Cluster)?
            .into_iter()
            .find(|(key, _)| key == name)
        else {
            return Ok(None);
        };
        serde_json::from_slice(&value)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path().to_owned(),
                key: format!("{}/{name}", Kind::Cluster.dir()),
                message: e.to_string(),
            })
    }

    /// Stage a history entry of `node`; durable after the next [`Store::flush`].
    pub fn put_event(&self, node: &str, event: &NodeEvent) -> Result<(), StoreError> {
        let what = format!("an event of node {node:?}");
        self.stage(Kind::Event, node, &what, event)
    }

    /// Stage one node's evidence of a hung attempt, under (job, attempt, node); durable after
    /// the next [`Store::flush`].
    pub fn put_evidence(
        &self,
        job: &str,
        attempt: u64,
        evidence: &vigil_core::jobs::evidence::NodeEvidence,
    ) -> Result<(), StoreError> {
        let key = evidence::key(job, attempt, &evidence.node);
        let what = format!("evidence {key:?}");
        self.stage(Kind::Evidence, &key, &what, evidence)
    }

    /// Stage the deletion of `node`'s evidence of (job, attempt).
    pub fn drop_evidence(&self, job: &str, attempt: u64, node: &str) {
        self.0
            .stage_delete(Kind::Evidence, evidence::key(job, attempt, node));
    }

    /// Reads jobs' evidence from any task (see [`EvidenceReader`]).
    pub fn evidence_reader(&self) -> EvidenceReader {
        EvidenceReader::new(self.0.reader(), self.path().to_owned())
    }

    /// Drop every staged write (see [`Backend::discard`]).
    pub fn discard(&self) {
        self.0.discard();
    }

    /// Make every staged write durable, in one operation; see [`Backend::commit`].
    pub async fn commit(&self) -> Result<(), StoreError> {
        self.0.commit().await
    }

    /// The same as [`Store::commit`], under the name callers have always used.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.commit().await
    }

    fn stage<T: Serialize>(
        &self,
        kind: Kind,
        key: &str,
        what: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Io {
            path: self.path().to_owned(),
            message: format!("cannot encode {what}: {e}"),
        })?;
        self.0.stage(Put {
            kind,
            key: key.to_owned(),
            value,
        });
        Ok(())
    }

    fn load<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<(String, T)>, StoreError> {
        self.0
            .load(kind)?
            .into_iter()
            .map(|(key, value)| match serde_json::from_slice(&value) {
                Ok(record) => Ok((key, record)),
                Err(e) => Err(StoreError::Corrupt {
                    path: self.path().to_owned(),
                    key: format!("{}/{key}", kind.dir()),
                    message: e.to_string(),
                }),
            })
            .collect()
    }
}

/// Puts `batch` back in front of whatever was staged while it was being committed.
fn restage<T>(pending: &std::sync::Mutex<Vec<T>>, batch: Vec<T>) {
    let mut pending = lock(pending);
    let newer = std::mem::replace(&mut *pending, batch);
    pending.extend(newer);
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::StoreMark;

    fn mark(id: &str, seq: u64) -> StoreMark {
        StoreMark {
            store_id: id.into(),
            seq,
        }
    }

    #[test]
    fn a_store_is_behind_only_a_higher_mark_of_itself() {
        assert!(mark("a", 5).is_behind(&mark("a", 6), 0));
        assert!(!mark("a", 5).is_behind(&mark("a", 5), 0));
        assert!(!mark("a", 5).is_behind(&mark("a", 2), 0));
        assert!(!mark("a", 5).is_behind(&mark("b", 900), 0), "another store");
    }

    #[test]
    fn a_mark_of_an_earlier_opening_is_judged_against_what_this_one_found() {
        // Opened a copy at commit 50 and has committed up to 120 since: an agent told 100 by
        // the previous opening still exposes it, though 100 < 120.
        assert!(mark("a@i2", 120).is_behind(&mark("a@i1", 100), 50));
        // Opened the real store at 100: the same agent is in step.
        assert!(!mark("a@i2", 120).is_behind(&mark("a@i1", 100), 100));
        // Told by this opening: within its commits.
        assert!(!mark("a@i2", 120).is_behind(&mark("a@i2", 110), 50));
        assert!(mark("a@i2", 120).is_behind(&mark("a@i2", 121), 50));
        assert!(
            !mark("a@i2", 120).is_behind(&mark("b@i1", 900), 50),
            "another store"
        );
        assert_eq!(mark("a@i2", 1).store(), "a");
    }
}

#[cfg(test)]
pub(crate) mod test_records {
    use crate::node::{Cordon, CordonSource, NodeEvent, NodeRecord};

    pub fn record(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            hostname: "h".into(),
            address: "10.0.0.1".into(),
            agent_version: "0.1.0".into(),
            simulated: true,
            gpus: Vec::new(),
            cordon: Some(Cordon {
                reason: "bad fan".into(),
                source: CordonSource::Operator,
                since_unix_ms: 42,
            }),
            first_registered_unix_ms: 1,
            last_registered_unix_ms: 2,
            last_diagnostics: None,
            burn_in: None,
            remediation: None,
            machine_id: format!("machine-{name}"),
            boot_id: "boot-1".into(),
            fabric_ports: Vec::new(),
        }
    }

    /// A store in `dir` with two nodes (gpu-001 cordoned by an operator, gpu-002 not) and
    /// five history entries of gpu-001, over 6 commits.
    pub async fn populated(dir: &std::path::Path) -> crate::store::Store {
        let store = crate::store::Store::open(dir).expect("open");
        let mut other = record("gpu-002");
        other.cordon = None;
        store.put_node(&record("gpu-001")).expect("put");
        store.flush().await.expect("commit");
        store.put_node(&other).expect("put");
        for i in 0..5 {
            store.put_event("gpu-001", &event(i)).expect("put");
            store.flush().await.expect("commit");
        }
        store
    }

    /// Overwrites up to 1,647 bytes in the middle of `file` with random ones from `seed`: a
    /// bad sector, a torn write on a disk that lies about flushes, a stray `dd`.
    pub fn randomize_middle(file: &std::path::Path, seed: u64) {
        let mut bytes = std::fs::read(file).expect("read");
        let mut rng = fastrand::Rng::with_seed(seed);
        let n = 1647.min(bytes.len() / 4);
        let start = bytes.len() / 2 - n / 2;
        for b in &mut bytes[start..start + n] {
            *b = rng.u8(..);
        }
        std::fs::write(file, &bytes).expect("write");
    }

    pub fn event(i: u64) -> NodeEvent {
        NodeEvent {
            at_unix_ms: i,
            kind: "xid".into(),
            message: format!("e{i}"),
            gpu_index: Some(1),
        }
    }
}
