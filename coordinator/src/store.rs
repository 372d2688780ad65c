//! The durable store: one small module over sled, so the backend can change.
//!
//! Layout: tree `meta` holds the schema marker; tree `nodes` maps a node name
//! to its JSON `NodeRecord`; tree `events` maps `name \0 id` (id big-endian,
//! increasing) to a JSON `NodeEvent`, the last `MAX_EVENTS` per node. A write is durable only once `flush` returns:
//! callers flush before acknowledging anything an operator or a job relies on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use std::sync::Arc;

use crate::job::Job;
use crate::leadership::Leadership;
use crate::node::{MAX_EVENTS, NodeEvent, NodeRecord};

const SCHEMA_KEY: &[u8] = b"schema";
/// sled's page cache: far more than the state of 20,000 nodes needs.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;
const SCHEMA: &[u8] = b"vigil-store-v1";

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

pub struct Store {
    path: PathBuf,
    /// `None` only while [`Store::recover`] reopens it.
    trees: Option<Trees>,
    /// A write failed: sled refuses every call after its first I/O error, even
    /// once the cause is gone, until the store is opened again.
    failed: AtomicBool,
    /// Whose writes these are: always-leading for a single coordinator.
    leadership: Arc<Leadership>,
    /// Set: the state lives in etcd (HA), and `trees` is unused.
    etcd: Option<crate::ha::store::EtcdStore>,
}

struct Trees {
    db: sled::Db,
    nodes: sled::Tree,
    events: sled::Tree,
    jobs: sled::Tree,
}

impl Store {
    /// Open (or create) the store in `path`, refusing a directory that holds
    /// something other than a vigil store rather than writing into it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_owned();
        if path.exists() && !path.is_dir() {
            return Err(StoreError::NotADirectory { path });
        }
        std::fs::create_dir_all(&path).map_err(|source| StoreError::Create {
            path: path.clone(),
            source,
        })?;
        refuse_foreign_dir(&path)?;
        Ok(Self {
            trees: Some(Trees::open(&path)?),
            path,
            failed: AtomicBool::new(false),
            leadership: Arc::new(Leadership::single()),
            etcd: None,
        })
    }

    /// The state in etcd, written under `etcd`'s leadership (see `ha::store`).
    pub fn on_etcd(etcd: crate::ha::store::EtcdStore) -> Self {
        Self {
            path: PathBuf::from(&etcd.describe),
            trees: None,
            failed: AtomicBool::new(false),
            leadership: etcd.leadership().clone(),
            etcd: Some(etcd),
        }
    }

    /// "sled" or "etcd".
    pub fn backend(&self) -> &'static str {
        if self.etcd.is_some() { "etcd" } else { "sled" }
    }

    /// After a failed write (a full disk, say), open the store again once
    /// that works: sled then holds what was last flushed. `Ok(true)`: it was
    /// reopened, and the caller must write its state again.
    pub fn recover(&mut self) -> Result<bool, StoreError> {
        // etcd keeps a failed write staged: the next flush tries it again.
        if self.etcd.is_some() || !self.failed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // sled locks its files: the old handles must be gone before it opens
        // again. Until it does, every call fails and the next one retries.
        self.trees = None;
        self.trees = Some(Trees::open(&self.path)?);
        self.failed.store(false, Ordering::Relaxed);
        Ok(true)
    }

    fn trees(&self) -> Result<&Trees, StoreError> {
        self.trees.as_ref().ok_or_else(|| StoreError::Io {
            path: self.path.clone(),
            message: "the store is being reopened after a write error".into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The leadership this store writes under (term 0, always valid, on sled).
    pub fn leadership(&self) -> &Arc<Leadership> {
        &self.leadership
    }

    pub fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        if let Some(e) = &self.etcd {
            return e.load_nodes();
        }
        let mut out = Vec::new();
        for item in self.trees()?.nodes.iter() {
            let (k, v) = item.map_err(|e| self.io(e))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let record: NodeRecord =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    key: key.clone(),
                    message: e.to_string(),
                })?;
            if record.name != key {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    key,
                    message: format!("holds the record of node {:?}", record.name),
                });
            }
            out.push(record);
        }
        Ok(out)
    }

    /// Stage a node record; durable after the next [`Store::flush`].
    pub fn put_node(&self, record: &NodeRecord) -> Result<(), StoreError> {
        if let Some(e) = &self.etcd {
            return e.put_node(record);
        }
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            message: format!("cannot encode node {:?}: {e}", record.name),
        })?;
        self.trees()?
            .nodes
            .insert(record.name.as_bytes(), value)
            .map_err(|e| self.io(e))?;
        Ok(())
    }

    pub fn load_jobs(&self) -> Result<Vec<Job>, StoreError> {
        if let Some(e) = &self.etcd {
            return e.load_jobs();
        }
        let mut out = Vec::new();
        for item in self.trees()?.jobs.iter() {
            let (k, v) = item.map_err(|e| self.io(e))?;
            let job: Job = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                key: format!("jobs/{}", String::from_utf8_lossy(&k)),
                message: e.to_string(),
            })?;
            out.push(job);
        }
        Ok(out)
    }

    /// Stage a job record; durable after the next [`Store::flush`].
    pub fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        if let Some(e) = &self.etcd {
            return e.put_job(job);
        }
        let value = serde_json::to_vec(job).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            message: format!("cannot encode job {:?}: {e}", job.id),
        })?;
        self.trees()?
            .jobs
            .insert(job.id.as_bytes(), value)
            .map_err(|e| self.io(e))?;
        Ok(())
    }

    /// The lemon ledger: every host and GPU with a failure on record.
    pub fn load_lemons(&self) -> Result<Vec<crate::lemons::LemonRecord>, StoreError> {
        if let Some(e) = &self.etcd {
            return e.load_lemons();
        }
        let tree = self
            .trees()?
            .db
            .open_tree("lemons")
            .map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        for item in tree.iter() {
            let (k, v) = item.map_err(|e| self.io(e))?;
            let record = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                key: format!("lemons/{}", String::from_utf8_lossy(&k)),
                message: e.to_string(),
            })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Stage a lemon record; durable after the next [`Store::flush`].
    pub fn put_lemon(&self, record: &crate::lemons::LemonRecord) -> Result<(), StoreError> {
        if let Some(e) = &self.etcd {
            return e.put_lemon(record);
        }
        let tree = self
            .trees()?
            .db
            .open_tree("lemons")
            .map_err(|e| self.io(e))?;
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            message: format!("cannot encode lemon record {:?}: {e}", record.key()),
        })?;
        tree.insert(record.key().as_bytes(), value)
            .map_err(|e| self.io(e))?;
        Ok(())
    }

    /// Every stored history entry, oldest first within each node.
    pub fn load_events(&self) -> Result<Vec<(String, NodeEvent)>, StoreError> {
        if let Some(e) = &self.etcd {
            return e.load_events();
        }
        let mut out = Vec::new();
        for item in self.trees()?.events.iter() {
            let (k, v) = item.map_err(|e| self.io(e))?;
            let name_end = k.iter().position(|b| *b == 0).unwrap_or(k.len());
            let name = String::from_utf8_lossy(&k[..name_end]).into_owned();
            let event: NodeEvent = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                key: format!("events/{name}"),
                message: e.to_string(),
            })?;
            out.push((name, event));
        }
        Ok(out)
    }

    /// Stage a history entry, dropping the node's oldest beyond `MAX_EVENTS`.
    pub fn put_event(&self, node: &str, event: &NodeEvent) -> Result<(), StoreError> {
        if let Some(e) = &self.etcd {
            return e.put_event(node, event);
        }
        let id = self.trees()?.db.generate_id().map_err(|e| self.io(e))?;
        let mut prefix = node.as_bytes().to_vec();
        prefix.push(0);
        let mut key = prefix.clone();
        key.extend_from_slice(&id.to_be_bytes());
        let value = serde_json::to_vec(event).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            message: format!("cannot encode an event of node {node:?}: {e}"),
        })?;
        self.trees()?
            .events
            .insert(key, value)
            .map_err(|e| self.io(e))?;
        // Prune now and then, not on every write: a scan per event would
        // dominate a reconnect storm.
        if id % 16 != 0 {
            return Ok(());
        }
        let keys: Vec<sled::IVec> = self
            .trees()?
            .events
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.io(e))?;
        for old in keys.iter().take(keys.len().saturating_sub(MAX_EVENTS)) {
            self.trees()?.events.remove(old).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        if let Some(e) = &self.etcd {
            return Ok(e.size());
        }
        self.trees()?.db.size_on_disk().map_err(|e| self.io(e))
    }

    /// Make every staged write durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        if let Some(e) = &self.etcd {
            return e.flush().await;
        }
        self.trees()?
            .db
            .flush_async()
            .await
            .map_err(|e| self.io(e))?;
        Ok(())
    }

    fn io(&self, e: sled::Error) -> StoreError {
        self.failed.store(true, Ordering::Relaxed);
        io_error(&self.path, e)
    }
}

impl Trees {
    fn open(path: &Path) -> Result<Self, StoreError> {
        let db = open_db(path)?;
        let io = |e: sled::Error| io_error(path, e);
        let meta = db.open_tree("meta").map_err(io)?;
        match meta.get(SCHEMA_KEY).map_err(io)? {
            Some(v) if v.as_ref() == SCHEMA => {}
            Some(v) => {
                return Err(StoreError::Foreign {
                    path: path.to_owned(),
                    found: format!("schema {:?}", String::from_utf8_lossy(&v)),
                });
            }
            None => {
                meta.insert(SCHEMA_KEY, SCHEMA).map_err(io)?;
                db.flush().map_err(io)?;
            }
        }
        Ok(Self {
            nodes: db.open_tree("nodes").map_err(io)?,
            events: db.open_tree("events").map_err(io)?,
            jobs: db.open_tree("jobs").map_err(io)?,
            db,
        })
    }
}

/// How long a reopen waits for sled's lock (attempts × pause): the previous
/// handle's background threads release it a moment after the handle is dropped.
const LOCK_ATTEMPTS: u32 = 150;
const LOCK_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    let mut attempt = 1;
    loop {
        let opened = sled::Config::new()
            .path(path)
            // sled caches up to 1 GiB by default; the state is small.
            .cache_capacity(CACHE_BYTES)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            // Held by this process's previous handle (its flusher thread
            // finishing), or by another coordinator: wait a little, then say so.
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock && attempt < LOCK_ATTEMPTS =>
            {
                attempt += 1;
                std::thread::sleep(LOCK_PAUSE);
            }
            Err(e) => {
                return Err(StoreError::Open {
                    path: path.to_owned(),
                    message: e.to_string(),
                });
            }
        }
    }
}

fn io_error(path: &Path, e: sled::Error) -> StoreError {
    match &e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => StoreError::Full {
            path: path.to_owned(),
        },
        _ => StoreError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        },
    }
}

/// sled keeps `conf` and `db` (plus `blobs/`, `snap.*`) in its directory. A
/// non-empty directory without them is someone else's: never write into it.
fn refuse_foreign_dir(path: &Path) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(path).map_err(|source| StoreError::Create {
        path: path.to_owned(),
        source,
    })?;
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || names.iter().any(|n| n == "conf" || n == "db") {
        return Ok(());
    }
    let mut shown: Vec<&str> = names.iter().map(String::as_str).take(3).collect();
    shown.sort_unstable();
    Err(StoreError::Foreign {
        path: path.to_owned(),
        found: format!("found {}", shown.join(", ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Cordon, CordonSource};

    fn record(name: &str) -> NodeRecord {
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
        }
    }

    #[tokio::test]
    async fn a_store_that_failed_a_write_reopens_with_what_was_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        assert!(!store.recover().expect("healthy"), "nothing to recover");
        store.put_node(&record("a")).expect("put");
        store.flush().await.expect("flush");
        // What a full disk does: sled reports an I/O error, and then refuses everything.
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let err = store.io(sled::Error::Io(full));
        assert!(matches!(err, StoreError::Full { .. }), "{err}");
        assert!(err.to_string().contains("no space left"), "{err}");
        assert!(
            store.recover().expect("reopened"),
            "reopened after a failure"
        );
        assert!(!store.recover().expect("healthy"), "once");
        let names: Vec<String> = store
            .load_nodes()
            .expect("load")
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, ["a"]);
        store.put_node(&record("b")).expect("writes work again");
        store.flush().await.expect("flush");
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.put_node(&record("gpu-001")).expect("put");
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.load_nodes().expect("load"), vec![record("gpu-001")]);
    }

    #[tokio::test]
    async fn events_are_kept_per_node_and_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            for i in 0..(2 * MAX_EVENTS as u64) {
                let e = NodeEvent {
                    at_unix_ms: i,
                    kind: "xid".into(),
                    message: format!("e{i}"),
                    gpu_index: Some(1),
                };
                store.put_event("a", &e).expect("put");
            }
            store
                .put_event(
                    "ab",
                    &NodeEvent {
                        at_unix_ms: 0,
                        kind: "cordon".into(),
                        message: "other".into(),
                        gpu_index: None,
                    },
                )
                .expect("put");
            store.flush().await.expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let events = store.load_events().expect("load");
        let a: Vec<_> = events.iter().filter(|(n, _)| n == "a").collect();
        assert!(
            (MAX_EVENTS..MAX_EVENTS + 16).contains(&a.len()),
            "pruned: {}",
            a.len()
        );
        assert_ne!(a[0].1.message, "e0", "oldest dropped");
        assert_eq!(a.last().map(|e| e.1.message.as_str()), Some("e199"));
        assert_eq!(events.iter().filter(|(n, _)| n == "ab").count(), 1);
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let file = tempfile::NamedTempFile::new().expect("file");
        let err = Store::open(file.path()).err().expect("refused");
        assert!(
            err.to_string().contains(&file.path().display().to_string()),
            "{err}"
        );
        assert!(matches!(err, StoreError::NotADirectory { .. }));
    }

    #[test]
    fn a_foreign_directory_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("notes.txt"), "hello").expect("write");
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(names.len(), 1, "nothing was written");
    }

    #[test]
    fn garbage_in_sled_files_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("conf"), b"\xff\x00garbage").expect("write");
        std::fs::write(dir.path().join("db"), vec![0xa5u8; 4096]).expect("write");
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_record_names_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let trees = store.trees().expect("open");
            trees
                .nodes
                .insert("gpu-009", &b"{not json"[..])
                .expect("insert");
            trees.db.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let err = store.load_nodes().expect_err("corrupt");
        assert!(err.to_string().contains("gpu-009"), "{err}");
    }
}
