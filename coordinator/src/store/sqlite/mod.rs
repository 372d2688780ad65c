//! The SQLite backend: a single coordinator's state in its data dir, checked end to end.
//!
//! Files in the data dir:
//! - `state.sqlite` (with `-wal`/`-shm` while it runs): tables `records` (kind, key, crc,
//!   value), `events` (node, id, crc, value), `evidence` (key, crc, value: hung attempts'
//!   evidence, created with the first one) and `meta` (the schema, the store's id, the
//!   manifest);
//! - `vigil-store`: the marker, written when the store is created, naming its id;
//! - `lock`: held (flock) by the one coordinator that uses the dir.
//!
//! Every record carries a CRC-32 of its kind, key and value. The manifest, written in the same
//! transaction as every commit, holds the commit's sequence number, the record count of each
//! kind and an order-free digest (XOR of a 64-bit hash of every record); evidence records are
//! counted and digested apart (`Manifest::evidence`), so that the previous release, which
//! knows neither the table nor the field, still reads a store this one wrote. Opening reads every
//! record back and checks all three, so a flipped byte, a block of random bytes, a truncated
//! file, a record that went missing or came back in an older version, and a missing file are
//! each found before anything is served: the store is [`StoreError::Damaged`] and the
//! coordinator exits 65. `--recover` instead keeps what is still valid ([`RecoveryReport`]).
//!
//! sled, the engine before this one, could not give that guarantee: it recovers its log up to
//! the first damaged segment and drops the rest without a word, so a damaged file read back as
//! an older, self-consistent state (docs/failure-handling.md, "A damaged store"). An old sled
//! store is moved over once, at open, and its files kept aside.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::Flock;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::evidence::Reader;
use super::{
    Backend, Commit, Kind, Pending, Put, RecoveryReport, StoreError, StoreMark, Write, lock,
};

mod check;
mod files;
mod open;
mod reader;

use crate::leadership::Leadership;
use crate::node::MAX_EVENTS;
pub use check::sums;
use check::{damaged, manifest_of, scan, slot, sql_error};
pub(crate) use check::{has_evidence, kind_of, put_meta};
use files::file_sum;
pub(crate) use files::{
    Seal, entries, marker_text, new_store_id, read_marker, take_lock, unix_ms, write_durably,
};

pub const DB_FILE: &str = "state.sqlite";
pub const MARKER_FILE: &str = "vigil-store";
pub const LOCK_FILE: &str = "lock";
const MARKER_HEAD: &str = "vigil-store v2";
const SCHEMA: &str = "vigil-store-v2";
/// What `open` may find in a data dir besides the store itself and still call it ours.
const OLD_SLED: [&str; 2] = ["conf", "db"];
pub(crate) const KINDS: [Kind; 5] = [
    Kind::Node,
    Kind::Job,
    Kind::Lemon,
    Kind::Event,
    Kind::Cluster,
];

const CREATE_TABLES: &str = "
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, crc INTEGER NOT NULL, value BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, key TEXT NOT NULL, crc INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS events (node TEXT NOT NULL, id INTEGER NOT NULL, crc INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (node, id)) WITHOUT ROWID;
";
/// Made by the first commit that stores evidence (a store made by the previous release has none).
const CREATE_EVIDENCE: &str = "CREATE TABLE IF NOT EXISTS evidence (key TEXT PRIMARY KEY, crc INTEGER NOT NULL, value BLOB NOT NULL) WITHOUT ROWID;";

/// Written with every commit: what the store must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub seq: u64,
    /// Records per kind, in [`KINDS`] order.
    pub counts: [u64; 5],
    /// XOR of every record's 64-bit hash, in hex.
    pub digest: String,
    /// The evidence table's count and digest; absent from a manifest the previous release
    /// wrote (it knows no evidence): then the table is checked record by record only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<EvidenceSums>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceSums {
    pub count: u64,
    /// XOR of every evidence record's 64-bit hash, in hex.
    pub digest: String,
}

/// What the store holds, kept in step with every commit: the next manifest is derived from
/// it without reading the records again.
#[derive(Debug, Default, Clone)]
pub(super) struct Book {
    pub(super) seq: u64,
    pub(super) counts: [u64; 5],
    pub(super) digest: u64,
    /// The hash of every record but events, to take an overwritten one out of the digest.
    pub(super) hashes: HashMap<(Kind, String), u64>,
    /// Evidence records: how many, and the XOR of their hashes (apart from `counts`/`digest`).
    pub(super) evidence: u64,
    pub(super) evidence_digest: u64,
    /// Each node's events, oldest first: (id, hash), to prune without reading them.
    pub(super) events: HashMap<String, VecDeque<(u64, u64)>>,
    pub(super) next_event: u64,
}

/// Records by kind, as (key, JSON): what `open` read and checked.
type Loaded = HashMap<Kind, Vec<(String, Vec<u8>)>>;

pub(super) struct Inner {
    pub(super) conn: Connection,
    pub(super) book: Book,
}

pub struct Sqlite {
    dir: PathBuf,
    /// `None` only while [`Backend::recover`] reopens it.
    inner: Arc<Mutex<Option<Inner>>>,
    pending: Mutex<Pending>,
    /// What `open` read and checked, handed out by `load` until the first commit.
    pub(super) loaded: Mutex<Loaded>,
    pub(super) store_id: String,
    /// Random per opening: agents' marks name it, so a mark from an earlier opening is judged
    /// against `opened_seq` ([`StoreMark::is_behind`]).
    instance: String,
    opened_seq: u64,
    pub(super) seq: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    leadership: Arc<Leadership>,
    recovered: Option<RecoveryReport>,
    _lock: Flock<File>,
}

/// One transaction of the whole batch with its manifest; the book moves on only if it commits.
fn write(inner: &mut Inner, batch: &[Write]) -> rusqlite::Result<u64> {
    let Inner { conn, book } = inner;
    let mut next = Book {
        seq: book.seq + 1,
        counts: book.counts,
        digest: book.digest,
        hashes: HashMap::new(),
        evidence: book.evidence,
        evidence_digest: book.evidence_digest,
        events: HashMap::new(),
        next_event: book.next_event,
    };
    // Records written (`Some(hash)`) or deleted (`None`) by this batch.
    let mut changed: HashMap<(Kind, String), Option<u64>> = HashMap::new();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if batch
        .iter()
        .any(|w| matches!(w.record(), Some((Kind::Evidence, _))))
    {
        tx.execute_batch(CREATE_EVIDENCE)?;
    }
    {
        let mut put_record = tx.prepare_cached(
            "INSERT INTO records (kind, key, crc, value) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (kind, key) DO UPDATE SET crc = excluded.crc, value = excluded.value",
        )?;
        let mut drop_record =
            tx.prepare_cached("DELETE FROM records WHERE kind = ?1 AND key = ?2")?;
        let mut put_event =
            tx.prepare_cached("INSERT INTO events (node, id, crc, value) VALUES (?1, ?2, ?3, ?4)")?;
        let mut drop_event = tx.prepare_cached("DELETE FROM events WHERE node = ?1 AND id = ?2")?;
        for write in batch {
            let put = match write {
                Write::Put(put) => put,
                Write::Delete { kind, key } => {
                    let k = (*kind, key.clone());
                    let Some(old) = changed
                        .get(&k)
                        .copied()
                        .unwrap_or_else(|| book.hashes.get(&k).copied())
                    else {
                        continue;
                    };
                    if *kind == Kind::Evidence {
                        tx.execute("DELETE FROM evidence WHERE key = ?1", params![key])?;
                        next.evidence_digest ^= old;
                        next.evidence -= 1;
                    } else {
                        drop_record.execute(params![kind.dir(), key])?;
                        next.digest ^= old;
                        next.counts[slot(*kind)] -= 1;
                    }
                    changed.insert(k, None);
                    continue;
                }
            };
            if put.kind == Kind::Event {
                let id = next.next_event;
                next.next_event += 1;
                let (crc, hash) = sums(Kind::Event, &put.key, Some(id), &put.value);
                put_event.execute(params![put.key, id, i64::from(crc), put.value])?;
                next.digest ^= hash;
                next.counts[slot(Kind::Event)] += 1;
                let ids = next
                    .events
                    .entry(put.key.clone())
                    .or_insert_with(|| book.events.get(&put.key).cloned().unwrap_or_default());
                ids.push_back((id, hash));
                while ids.len() > MAX_EVENTS {
                    if let Some((old, old_hash)) = ids.pop_front() {
                        drop_event.execute(params![put.key, old])?;
                        next.digest ^= old_hash;
                        next.counts[slot(Kind::Event)] -= 1;
                    }
                }
                continue;
            }
            let (crc, hash) = sums(put.kind, &put.key, None, &put.value);
            let key = (put.kind, put.key.clone());
            let old = changed
                .get(&key)
                .copied()
                .unwrap_or_else(|| book.hashes.get(&key).copied());
            if put.kind == Kind::Evidence {
                tx.execute(
                    "INSERT INTO evidence (key, crc, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (key) DO UPDATE SET crc = excluded.crc, value = excluded.value",
                    params![put.key, i64::from(crc), put.value],
                )?;
                match old {
                    Some(old) => next.evidence_digest ^= old,
                    None => next.evidence += 1,
                }
                next.evidence_digest ^= hash;
            } else {
                put_record.execute(params![put.kind.dir(), put.key, i64::from(crc), put.value])?;
                match old {
                    Some(old) => next.digest ^= old,
                    None => next.counts[slot(put.kind)] += 1,
                }
                next.digest ^= hash;
            }
            changed.insert(key, Some(hash));
        }
    }
    let manifest = serde_json::to_vec(&manifest_of(&next)).unwrap_or_default();
    put_meta(&tx, "manifest", &manifest)?;
    tx.commit()?;
    book.seq = next.seq;
    book.counts = next.counts;
    book.digest = next.digest;
    book.evidence = next.evidence;
    book.evidence_digest = next.evidence_digest;
    book.next_event = next.next_event;
    for (key, hash) in changed {
        match hash {
            Some(h) => book.hashes.insert(key, h),
            None => book.hashes.remove(&key),
        };
    }
    book.events.extend(next.events);
    Ok(book.seq)
}

fn open_conn(db: &Path, create: bool) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(db, flags)?;
    // WAL: a commit is one fsync of the log, readers (a backup) never block the writer.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Extra checks of every b-tree cell SQLite reads: damage is an error, never a wild read.
    conn.pragma_update(None, "cell_size_check", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// How [`Sqlite::open_with`] treats damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDamage {
    /// Refuse: [`StoreError::Damaged`].
    Refuse,
    /// Keep what is valid in a new store, move the damaged files aside, report the loss.
    Recover,
}

impl Drop for Sqlite {
    /// A clean stop: close SQLite (it folds its log into the file and removes it), then seal
    /// the file in the marker. Skipped after a failed write: nothing is sealed that may be
    /// behind what was acknowledged.
    fn drop(&mut self) {
        if self.failed.load(Ordering::Relaxed) || !lock(&self.pending).is_empty() {
            return;
        }
        let Some(inner) = lock(&self.inner).take() else {
            return;
        };
        let seq = inner.book.seq;
        if let Err((_, e)) = inner.conn.close() {
            warn!(data_dir = %self.dir.display(), error = %e, "state store not sealed: closing it failed");
            return;
        }
        if self.dir.join(format!("{DB_FILE}-wal")).exists() {
            warn!(data_dir = %self.dir.display(), "state store not sealed: its log is still there after closing");
            return;
        }
        let sealed = file_sum(&self.dir.join(DB_FILE)).and_then(|(len, crc)| {
            let seal = Seal { seq, len, crc };
            let text = format!("{}{}", marker_text(&self.store_id), seal.line());
            write_durably(&self.dir, MARKER_FILE, text.as_bytes()).map(|()| seal)
        });
        match sealed {
            Ok(seal) => info!(
                data_dir = %self.dir.display(),
                seq,
                bytes = seal.len,
                crc = %format!("{:08x}", seal.crc),
                "state store closed and sealed: any change to it before the next start is found"
            ),
            Err(e) => warn!(data_dir = %self.dir.display(), error = %e, "state store not sealed"),
        }
    }
}

/// The first few problems, and how many more.
pub(crate) fn summary(problems: &[String]) -> String {
    let shown: Vec<&str> = problems.iter().take(3).map(String::as_str).collect();
    match problems.len().saturating_sub(3) {
        0 => shown.join("; "),
        more => format!("{}; and {more} more", shown.join("; ")),
    }
}

impl Backend for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn leadership(&self) -> &Arc<Leadership> {
        &self.leadership
    }

    fn load(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // What open read and checked: until the first commit changes it (the engine loads
        // everything before it commits anything).
        if let Some(checked) = lock(&self.loaded).get(&kind) {
            return Ok(checked.clone());
        }
        let guard = lock(&self.inner);
        let inner = guard.as_ref().ok_or_else(|| StoreError::Io {
            path: self.dir.clone(),
            message: "the store is being reopened after a write error".into(),
        })?;
        let scan = scan(&inner.conn);
        if !scan.problems.is_empty() {
            return Err(damaged(&self.dir, summary(&scan.problems)));
        }
        Ok(scan.loaded.get(&kind).cloned().unwrap_or_default())
    }

    fn discard(&self) {
        lock(&self.pending).take();
    }

    fn stage(&self, put: Put) {
        lock(&self.pending).push(Write::Put(put));
    }

    fn stage_delete(&self, kind: Kind, key: String) {
        lock(&self.pending).push(Write::Delete { kind, key });
    }

    fn reader(&self) -> Arc<dyn Reader> {
        Arc::new(reader::SqliteReader::new(&self.dir))
    }

    fn commit(&self) -> Commit<'_> {
        Box::pin(async move {
            let batch = lock(&self.pending).take();
            if batch.is_empty() {
                return Ok(());
            }
            lock(&self.loaded).clear();
            let inner = self.inner.clone();
            let dir = self.dir.clone();
            let copy = batch.clone();
            // SQLite blocks on its fsync: off the async threads.
            let written = tokio::task::spawn_blocking(move || {
                let mut guard = lock(&inner);
                let inner = guard.as_mut().ok_or_else(|| StoreError::Io {
                    path: dir.clone(),
                    message: "the store is being reopened after a write error".into(),
                })?;
                write(inner, &copy).map_err(|e| sql_error(&dir, &e))
            })
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Io {
                    path: self.dir.clone(),
                    message: format!("the commit did not finish: {e}"),
                })
            });
            match written {
                Ok(seq) => {
                    self.seq.store(seq, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => {
                    self.failed.store(true, Ordering::Relaxed);
                    lock(&self.pending).restage(batch);
                    Err(e)
                }
            }
        })
    }

    /// After a failed commit, open the store again and read it back: whether the failed
    /// commit landed or not, the book then matches the file.
    fn recover(&mut self) -> Result<bool, StoreError> {
        if !self.failed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut guard = lock(&self.inner);
        *guard = None;
        let conn =
            open_conn(&self.dir.join(DB_FILE), false).map_err(|e| sql_error(&self.dir, &e))?;
        let scan = scan(&conn);
        if !scan.problems.is_empty() {
            return Err(damaged(&self.dir, summary(&scan.problems)));
        }
        self.seq.store(scan.book.seq, Ordering::Relaxed);
        *guard = Some(Inner {
            conn,
            book: scan.book,
        });
        self.failed.store(false, Ordering::Relaxed);
        Ok(true)
    }

    fn mark(&self) -> Option<StoreMark> {
        Some(StoreMark {
            store_id: format!("{}@{}", self.store_id, self.instance),
            seq: self.seq.load(Ordering::Relaxed),
        })
    }

    fn recovered(&self) -> Option<RecoveryReport> {
        self.recovered.clone()
    }

    fn opened_seq(&self) -> u64 {
        self.opened_seq
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for name in [DB_FILE.to_owned(), format!("{DB_FILE}-wal")] {
            total += std::fs::metadata(self.dir.join(name)).map_or(0, |m| m.len());
        }
        Ok(total)
    }
}

/// For `backup.rs`: reads every record of `conn` back and checks it as [`Sqlite::open`] does.
pub(crate) fn verify(conn: &Connection) -> super::backup::Verified {
    let s = scan(conn);
    super::backup::Verified {
        store_id: s.store_id,
        seq: s.book.seq,
        counts: {
            let c = s.book.counts;
            [c[0], c[1], c[2], c[3], c[4], s.book.evidence]
        },
        problems: s.problems,
    }
}

#[cfg(test)]
mod evidence_tests;
#[cfg(test)]
mod tests;
