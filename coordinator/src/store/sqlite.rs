//! The SQLite backend: a single coordinator's state in its data dir, checked end to end.
//!
//! Files in the data dir:
//! - `state.sqlite` (with `-wal`/`-shm` while it runs): tables `records` (kind, key, crc,
//!   value), `events` (node, id, crc, value) and `meta` (the schema, the store's id, the
//!   manifest);
//! - `vigil-store`: the marker, written when the store is created, naming its id;
//! - `lock`: held (flock) by the one coordinator that uses the dir.
//!
//! Every record carries a CRC-32 of its kind, key and value. The manifest, written in the same
//! transaction as every commit, holds the commit's sequence number, the record count of each
//! kind and an order-free digest (XOR of a 64-bit hash of every record). Opening reads every
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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Backend, Commit, Kind, Put, RecoveryReport, StoreError, StoreMark, lock, restage};
use crate::leadership::Leadership;
use crate::node::MAX_EVENTS;

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

/// Written with every commit: what the store must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub seq: u64,
    /// Records per kind, in [`KINDS`] order.
    pub counts: [u64; 5],
    /// XOR of every record's 64-bit hash, in hex.
    pub digest: String,
}

/// What the store holds, kept in step with every commit: the next manifest is derived from
/// it without reading the records again.
#[derive(Debug, Default, Clone)]
struct Book {
    seq: u64,
    counts: [u64; 5],
    digest: u64,
    /// The hash of every record but events, to take an overwritten one out of the digest.
    hashes: HashMap<(Kind, String), u64>,
    /// Each node's events, oldest first: (id, hash), to prune without reading them.
    events: HashMap<String, VecDeque<(u64, u64)>>,
    next_event: u64,
}

/// Records by kind, as (key, JSON): what `open` read and checked.
type Loaded = HashMap<Kind, Vec<(String, Vec<u8>)>>;

struct Inner {
    conn: Connection,
    book: Book,
}

pub struct Sqlite {
    dir: PathBuf,
    /// `None` only while [`Backend::recover`] reopens it.
    inner: Arc<Mutex<Option<Inner>>>,
    pending: Mutex<Vec<Put>>,
    /// What `open` read and checked, handed out by `load` until the first commit.
    loaded: Mutex<Loaded>,
    store_id: String,
    /// Random per opening: agents' marks name it, so a mark from an earlier opening is judged
    /// against `opened_seq` ([`StoreMark::is_behind`]).
    instance: String,
    opened_seq: u64,
    seq: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    leadership: Arc<Leadership>,
    recovered: Option<RecoveryReport>,
    _lock: Flock<File>,
}

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Node => 0,
        Kind::Job => 1,
        Kind::Lemon => 2,
        Kind::Event => 3,
        Kind::Cluster => 4,
    }
}

fn kind_of(dir: &str) -> Option<Kind> {
    KINDS.into_iter().find(|k| k.dir() == dir)
}

/// CRC-32 and 64-bit FNV-1a of what identifies a record: its kind, key, event id and value.
pub fn sums(kind: Kind, key: &str, id: Option<u64>, value: &[u8]) -> (u32, u64) {
    let mut crc = crc32fast::Hasher::new();
    let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
    let id = id.map(u64::to_be_bytes);
    let parts: [&[u8]; 6] = [
        kind.dir().as_bytes(),
        b"\0",
        key.as_bytes(),
        b"\0",
        id.as_ref().map_or(&[][..], |b| &b[..]),
        value,
    ];
    for part in parts {
        crc.update(part);
        for b in part {
            fnv ^= u64::from(*b);
            fnv = fnv.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    (crc.finalize(), fnv)
}

fn meta_sum(key: &str, value: &[u8]) -> u32 {
    sums(Kind::Cluster, &format!("meta/{key}"), None, value).0
}

fn sql_error(dir: &Path, e: &rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            StoreError::Full {
                path: dir.to_owned(),
            }
        }
        _ => StoreError::Io {
            path: dir.to_owned(),
            message: e.to_string(),
        },
    }
}

fn damaged(dir: &Path, what: impl Into<String>) -> StoreError {
    StoreError::Damaged {
        path: dir.to_owned(),
        what: what.into(),
    }
}

/// What reading the whole store back found.
#[derive(Default)]
struct Scan {
    book: Book,
    loaded: Loaded,
    store_id: Option<String>,
    manifest: Option<Manifest>,
    /// Everything that is not as committed, each said once.
    problems: Vec<String>,
    lost_nodes: Vec<String>,
    lost_jobs: Vec<String>,
}

impl Scan {
    fn lost(&mut self, kind: Option<Kind>, key: &str, why: String) {
        match kind {
            Some(Kind::Node) => self.lost_nodes.push(key.to_owned()),
            Some(Kind::Job) => self.lost_jobs.push(key.to_owned()),
            _ => {}
        }
        self.problems.push(why);
    }
}

/// Reads every record and checks it, its count and the digest against the manifest.
fn scan(conn: &Connection) -> Scan {
    let mut s = Scan::default();
    if let Err(e) = scan_meta(conn, &mut s) {
        s.problems
            .push(format!("{DB_FILE} cannot be read (meta: {e})"));
        return s;
    }
    if let Err(e) = scan_records(conn, &mut s) {
        s.problems
            .push(format!("{DB_FILE} cannot be read past some records ({e})"));
    }
    if let Err(e) = scan_events(conn, &mut s) {
        s.problems.push(format!(
            "{DB_FILE} cannot be read past some history entries ({e})"
        ));
    }
    let Some(manifest) = s.manifest.clone() else {
        s.problems
            .push("the manifest (what the last commit wrote) is missing".into());
        return s;
    };
    s.book.seq = manifest.seq;
    for (i, kind) in KINDS.into_iter().enumerate() {
        let (want, found) = (manifest.counts[i], s.book.counts[i]);
        if want != found {
            s.problems.push(format!(
                "commit {} wrote {want} {} records, {found} are there",
                manifest.seq,
                kind.dir()
            ));
        }
    }
    let digest = format!("{:016x}", s.book.digest);
    if s.problems.is_empty() && digest != manifest.digest {
        s.problems.push(format!(
            "the records are not those commit {} wrote (digest {digest}, manifest {}): some hold \
             an older or altered version",
            manifest.seq, manifest.digest
        ));
    }
    s
}

fn scan_meta(conn: &Connection, s: &mut Scan) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT key, crc, value FROM meta")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let key: String = row.get(0)?;
        let crc: i64 = row.get(1)?;
        let value: Vec<u8> = row.get(2)?;
        if i64::from(meta_sum(&key, &value)) != crc {
            s.problems.push(format!("meta/{key} fails its checksum"));
            continue;
        }
        match key.as_str() {
            "schema" if value != SCHEMA.as_bytes() => s.problems.push(format!(
                "schema {:?}, this coordinator reads {SCHEMA}",
                String::from_utf8_lossy(&value)
            )),
            "store_id" => s.store_id = Some(String::from_utf8_lossy(&value).into_owned()),
            "manifest" => match serde_json::from_slice(&value) {
                Ok(m) => s.manifest = Some(m),
                Err(e) => s.problems.push(format!("the manifest is unreadable ({e})")),
            },
            _ => {}
        }
    }
    Ok(())
}

fn scan_records(conn: &Connection, s: &mut Scan) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT kind, key, crc, value FROM records")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let dir: String = row.get(0)?;
        let key: String = row.get(1)?;
        let crc: i64 = row.get(2)?;
        let value: Vec<u8> = row.get(3)?;
        let kind = kind_of(&dir);
        let Some(k) = kind.filter(|k| *k != Kind::Event) else {
            s.lost(
                None,
                &key,
                format!("{dir}/{key}: not a kind of record vigil stores"),
            );
            continue;
        };
        let (sum, hash) = sums(k, &key, None, &value);
        if i64::from(sum) != crc {
            s.lost(kind, &key, format!("{dir}/{key} fails its checksum"));
            continue;
        }
        s.book.counts[slot(k)] += 1;
        s.book.digest ^= hash;
        s.book.hashes.insert((k, key.clone()), hash);
        s.loaded.entry(k).or_default().push((key, value));
    }
    Ok(())
}

fn scan_events(conn: &Connection, s: &mut Scan) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT node, id, crc, value FROM events ORDER BY node, id")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let node: String = row.get(0)?;
        let id: i64 = row.get(1)?;
        let crc: i64 = row.get(2)?;
        let value: Vec<u8> = row.get(3)?;
        let id = u64::try_from(id).unwrap_or(0);
        let (sum, hash) = sums(Kind::Event, &node, Some(id), &value);
        s.book.next_event = s.book.next_event.max(id + 1);
        if i64::from(sum) != crc {
            s.problems.push(format!(
                "events/{node}/{id} (a history entry) fails its checksum"
            ));
            continue;
        }
        s.book.counts[slot(Kind::Event)] += 1;
        s.book.digest ^= hash;
        s.book
            .events
            .entry(node.clone())
            .or_default()
            .push_back((id, hash));
        s.loaded.entry(Kind::Event).or_default().push((node, value));
    }
    Ok(())
}

pub(crate) fn put_meta(conn: &Connection, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, crc, value) VALUES (?1, ?2, ?3) \
         ON CONFLICT (key) DO UPDATE SET crc = excluded.crc, value = excluded.value",
        params![key, i64::from(meta_sum(key, value)), value],
    )?;
    Ok(())
}

fn manifest_of(book: &Book) -> Manifest {
    Manifest {
        seq: book.seq,
        counts: book.counts,
        digest: format!("{:016x}", book.digest),
    }
}

/// One transaction of the whole batch with its manifest; the book moves on only if it commits.
fn write(inner: &mut Inner, batch: &[Put]) -> rusqlite::Result<u64> {
    let Inner { conn, book } = inner;
    let mut next = Book {
        seq: book.seq + 1,
        counts: book.counts,
        digest: book.digest,
        hashes: HashMap::new(),
        events: HashMap::new(),
        next_event: book.next_event,
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut put_record = tx.prepare_cached(
            "INSERT INTO records (kind, key, crc, value) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (kind, key) DO UPDATE SET crc = excluded.crc, value = excluded.value",
        )?;
        let mut put_event =
            tx.prepare_cached("INSERT INTO events (node, id, crc, value) VALUES (?1, ?2, ?3, ?4)")?;
        let mut drop_event = tx.prepare_cached("DELETE FROM events WHERE node = ?1 AND id = ?2")?;
        for put in batch {
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
            put_record.execute(params![put.kind.dir(), put.key, i64::from(crc), put.value])?;
            let key = (put.kind, put.key.clone());
            match next.hashes.get(&key).or_else(|| book.hashes.get(&key)) {
                Some(old) => next.digest ^= old,
                None => next.counts[slot(put.kind)] += 1,
            }
            next.digest ^= hash;
            next.hashes.insert(key, hash);
        }
    }
    let manifest = serde_json::to_vec(&manifest_of(&next)).unwrap_or_default();
    put_meta(&tx, "manifest", &manifest)?;
    tx.commit()?;
    book.seq = next.seq;
    book.counts = next.counts;
    book.digest = next.digest;
    book.next_event = next.next_event;
    book.hashes.extend(next.hashes);
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

pub(crate) fn new_store_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `text` to `dir/name` durably: a temporary file, fsync, rename, fsync of the dir.
pub fn write_durably(dir: &Path, name: &str, text: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

pub(crate) fn marker_text(store_id: &str) -> String {
    format!("{MARKER_HEAD}\nstore_id {store_id}\n")
}

/// What a clean stop wrote into the marker: the whole file's length and CRC-32 once the log
/// was folded into it. A byte changed anywhere in it since, even in space no record uses, is
/// found at the next open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seal {
    seq: u64,
    len: u64,
    crc: u32,
}

impl Seal {
    fn line(self) -> String {
        format!(
            "sealed seq {} bytes {} crc {:08x}\n",
            self.seq, self.len, self.crc
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["sealed", "seq", seq, "bytes", len, "crc", crc] => Some(Self {
                seq: seq.parse().ok()?,
                len: len.parse().ok()?,
                crc: u32::from_str_radix(crc, 16).ok()?,
            }),
            _ => None,
        }
    }
}

/// Length and CRC-32 of a whole file.
fn file_sum(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut file = File::open(path)?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok((len, crc.finalize()));
        }
        crc.update(&buf[..n]);
        len += n as u64;
    }
}

/// The store id the marker names and the seal of a clean stop; `Ok(None)` when there is no
/// marker.
pub(crate) fn read_marker(dir: &Path) -> Result<Option<(String, Option<Seal>)>, StoreError> {
    let text = match std::fs::read_to_string(dir.join(MARKER_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(damaged(
                dir,
                format!("the marker {MARKER_FILE} is unreadable ({e})"),
            ));
        }
    };
    let mut lines = text.lines();
    let id = match (lines.next(), lines.next()) {
        (Some(MARKER_HEAD), Some(line)) => line.strip_prefix("store_id ").map(str::to_owned),
        _ => None,
    };
    let seal = lines.next().map(Seal::parse);
    match (id, seal) {
        (Some(id), None) if !id.is_empty() => Ok(Some((id, None))),
        (Some(id), Some(Some(seal))) if !id.is_empty() => Ok(Some((id, Some(seal)))),
        _ => Err(damaged(
            dir,
            format!("the marker {MARKER_FILE} is not vigil's ({text:.60?})"),
        )),
    }
}

/// Whether the file is still the one a clean stop sealed.
fn check_seal(dir: &Path, seal: Seal) -> Option<String> {
    let wal = dir.join(format!("{DB_FILE}-wal"));
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return Some(format!(
            "{DB_FILE}-wal appeared after the clean stop that sealed {DB_FILE} at commit {}",
            seal.seq
        ));
    }
    match file_sum(&dir.join(DB_FILE)) {
        Ok((len, crc)) if (len, crc) == (seal.len, seal.crc) => None,
        Ok((len, crc)) => Some(format!(
            "{DB_FILE} changed after the clean stop that sealed it at commit {} ({} bytes, \
             CRC-32 {:08x}; now {len} bytes, CRC-32 {crc:08x}): damaged or altered on disk",
            seal.seq, seal.len, seal.crc
        )),
        Err(e) => Some(format!("{DB_FILE} cannot be read ({e})")),
    }
}

pub(crate) fn take_lock(dir: &Path) -> Result<Flock<File>, StoreError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|e| StoreError::Open {
            path: dir.to_owned(),
            message: format!("cannot open {LOCK_FILE}: {e}"),
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| StoreError::Open {
        path: dir.to_owned(),
        message: format!("another process holds {LOCK_FILE} ({errno})"),
    })
}

/// The names in `dir` other than the lock file.
pub(crate) fn entries(dir: &Path) -> Result<Vec<String>, StoreError> {
    let read = std::fs::read_dir(dir).map_err(|source| StoreError::Create {
        path: dir.to_owned(),
        source,
    })?;
    Ok(read
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK_FILE)
        .collect())
}

/// How [`Sqlite::open_with`] treats damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDamage {
    /// Refuse: [`StoreError::Damaged`].
    Refuse,
    /// Keep what is valid in a new store, move the damaged files aside, report the loss.
    Recover,
}

impl Sqlite {
    /// Open (or create) the store in `dir`; a damaged one is refused.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, OnDamage::Refuse)
    }

    pub fn open_with(dir: &Path, on_damage: OnDamage) -> Result<Self, StoreError> {
        let dir = dir.to_owned();
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::NotADirectory { path: dir });
        }
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Create {
            path: dir.clone(),
            source,
        })?;
        let names = entries(&dir)?;
        let ours = |n: &String| n == DB_FILE || n == MARKER_FILE || OLD_SLED.contains(&n.as_str());
        if !names.is_empty() && !names.iter().any(ours) {
            // Someone else's directory: refused before anything (even the lock) is written.
            let mut shown: Vec<&str> = names.iter().map(String::as_str).take(3).collect();
            shown.sort_unstable();
            return Err(StoreError::Foreign {
                path: dir,
                found: format!("found {}", shown.join(", ")),
            });
        }
        let lock = take_lock(&dir)?;
        let marker = read_marker(&dir);
        let has_db = names.iter().any(|n| n == DB_FILE);
        if !has_db && matches!(marker, Ok(None)) {
            if OLD_SLED.iter().all(|f| names.iter().any(|n| n == f)) {
                return Self::from_sled(dir, lock);
            }
            let store = Self::create(dir, lock, &[])?;
            info!(data_dir = %store.dir.display(), store_id = %store.store_id, "created a new state store");
            return Ok(store);
        }
        let problem = match (&marker, has_db) {
            (Err(e), _) => Some(e.to_string()),
            (Ok(Some((id, _))), false) => Some(format!(
                "{DB_FILE} is missing (the marker {MARKER_FILE} says store {id} lives here)"
            )),
            // Checked before SQLite opens it (opening folds a log in, and changes the file).
            (Ok(Some((_, Some(seal)))), true) => check_seal(&dir, *seal),
            _ => None,
        };
        let (marker, sealed) = match marker {
            Ok(Some((id, seal))) => (Some(id), seal.is_some()),
            _ => (None, false),
        };
        let (conn, mut scan) = if has_db {
            match open_conn(&dir.join(DB_FILE), false) {
                Ok(conn) => {
                    let scan = scan(&conn);
                    (Some(conn), scan)
                }
                Err(e) => {
                    let mut scan = Scan::default();
                    scan.problems
                        .push(format!("{DB_FILE} cannot be opened ({e})"));
                    (None, scan)
                }
            }
        } else {
            (None, Scan::default())
        };
        scan.problems.splice(0..0, problem);
        match (&marker, &scan.store_id) {
            (Some(m), Some(s)) if m != s => scan.problems.push(format!(
                "{DB_FILE} belongs to store {s}, the marker {MARKER_FILE} names store {m}"
            )),
            (None, _) if has_db && scan.book.seq > 0 => scan
                .problems
                .push(format!("the marker {MARKER_FILE} is missing")),
            (_, None) if conn.is_some() && scan.problems.is_empty() => scan
                .problems
                .push("the store's id is missing from its meta table".into()),
            _ => {}
        }
        if scan.problems.is_empty() {
            let conn = conn.ok_or_else(|| damaged(&dir, format!("{DB_FILE} is missing")))?;
            let store_id = scan.store_id.clone().unwrap_or_default();
            if marker.is_none() || sealed {
                // Created, never committed to: finish what the creation began. Sealed: the
                // file is about to change, so the seal goes before anything is written.
                write_durably(&dir, MARKER_FILE, marker_text(&store_id).as_bytes()).map_err(
                    |e| StoreError::Io {
                        path: dir.clone(),
                        message: e.to_string(),
                    },
                )?;
            }
            if on_damage == OnDamage::Recover {
                // Whole, but it may be an older copy of itself (a rollback an agent exposed):
                // asked to recover, it goes on as a new store, held for review like any other.
                drop(conn);
                let what = "--recover on a store that checks out whole: it may still be behind \
                            what agents were told (a data dir replaced by an older copy); it goes \
                            on as a new store, held for review";
                warn!(data_dir = %dir.display(), "{what}");
                return Self::salvage(dir, lock, scan, what.to_owned());
            }
            info!(
                data_dir = %dir.display(),
                store_id,
                seq = scan.book.seq,
                records = scan.book.counts.iter().sum::<u64>(),
                "state store checked: every record matches its checksum and the last commit's manifest"
            );
            return Ok(Self::assemble(dir, lock, conn, scan, None));
        }
        let what = summary(&scan.problems);
        if on_damage == OnDamage::Refuse {
            return Err(damaged(&dir, what));
        }
        drop(conn);
        Self::salvage(dir, lock, scan, what)
    }

    fn assemble(
        dir: PathBuf,
        lock: Flock<File>,
        conn: Connection,
        scan: Scan,
        recovered: Option<RecoveryReport>,
    ) -> Self {
        let store_id = scan.store_id.unwrap_or_default();
        Self {
            instance: format!("{:08x}", fastrand::u32(..)),
            opened_seq: scan.book.seq,
            seq: Arc::new(AtomicU64::new(scan.book.seq)),
            inner: Arc::new(Mutex::new(Some(Inner {
                conn,
                book: scan.book,
            }))),
            dir,
            pending: Mutex::new(Vec::new()),
            loaded: Mutex::new(scan.loaded),
            store_id,
            failed: Arc::new(AtomicBool::new(false)),
            leadership: Arc::new(Leadership::single()),
            recovered,
            _lock: lock,
        }
    }

    /// A new store in `dir` holding `records` (one first commit), its marker written last.
    fn create(dir: PathBuf, lock: Flock<File>, records: &[Put]) -> Result<Self, StoreError> {
        let io = |e: rusqlite::Error| sql_error(&dir, &e);
        let conn = open_conn(&dir.join(DB_FILE), true).map_err(io)?;
        let store_id = new_store_id();
        conn.execute_batch(CREATE_TABLES).map_err(io)?;
        put_meta(&conn, "schema", SCHEMA.as_bytes()).map_err(io)?;
        put_meta(&conn, "store_id", store_id.as_bytes()).map_err(io)?;
        let manifest = serde_json::to_vec(&manifest_of(&Book::default())).unwrap_or_default();
        put_meta(&conn, "manifest", &manifest).map_err(io)?;
        let mut inner = Inner {
            conn,
            book: Book::default(),
        };
        if !records.is_empty() {
            write(&mut inner, records).map_err(io)?;
        }
        write_durably(&dir, MARKER_FILE, marker_text(&store_id).as_bytes()).map_err(|e| {
            StoreError::Io {
                path: dir.clone(),
                message: format!("cannot write {MARKER_FILE}: {e}"),
            }
        })?;
        let mut loaded = Loaded::new();
        for put in records {
            loaded
                .entry(put.kind)
                .or_default()
                .push((put.key.clone(), put.value.clone()));
        }
        let scan = Scan {
            book: inner.book,
            loaded,
            store_id: Some(store_id),
            ..Scan::default()
        };
        Ok(Self::assemble(dir, lock, inner.conn, scan, None))
    }

    /// `--recover`: the valid records of a damaged store go into a new one; the damaged
    /// files are moved to `dir/damaged-<unix ms>/`.
    fn salvage(
        dir: PathBuf,
        lock: Flock<File>,
        scan: Scan,
        damage: String,
    ) -> Result<Self, StoreError> {
        let aside = dir.join(format!("damaged-{}", unix_ms()));
        std::fs::create_dir_all(&aside).map_err(|source| StoreError::Create {
            path: aside.clone(),
            source,
        })?;
        for name in [
            DB_FILE.to_owned(),
            format!("{DB_FILE}-wal"),
            format!("{DB_FILE}-shm"),
            MARKER_FILE.to_owned(),
        ] {
            let from = dir.join(&name);
            if from.exists() {
                std::fs::rename(&from, aside.join(&name)).map_err(|e| StoreError::Io {
                    path: dir.clone(),
                    message: format!("cannot move {name} to {}: {e}", aside.display()),
                })?;
            }
        }
        let mut records = Vec::new();
        for kind in KINDS {
            for (key, value) in scan.loaded.get(&kind).into_iter().flatten() {
                records.push(Put {
                    kind,
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        let kept = records.len();
        let mut store = Self::create(dir, lock, &records)?;
        for line in &scan.problems {
            warn!(data_dir = %store.dir.display(), "--recover: lost: {line}");
        }
        warn!(
            data_dir = %store.dir.display(),
            kept,
            problems = scan.problems.len(),
            damaged_copy = %aside.display(),
            store_id = %store.store_id,
            "--recover: started a new store from what was still valid; the damaged files are kept aside"
        );
        store.recovered = Some(RecoveryReport {
            damage,
            lost: scan.problems,
            lost_nodes: scan.lost_nodes,
            lost_jobs: scan.lost_jobs,
            damaged_copy: aside,
        });
        Ok(store)
    }

    /// An old sled store: read it whole, write it as the first commit of a new store, move
    /// sled's files to `dir/sled-v1-<unix ms>/`.
    fn from_sled(dir: PathBuf, lock: Flock<File>) -> Result<Self, StoreError> {
        let mut records = Vec::new();
        {
            let old = super::sled::Sled::open(&dir)?;
            for kind in [Kind::Node, Kind::Job, Kind::Lemon, Kind::Event] {
                for (key, value) in old.load(kind)? {
                    records.push(Put { kind, key, value });
                }
            }
        }
        let aside = dir.join(format!("sled-v1-{}", unix_ms()));
        let store = match Self::create(dir.clone(), lock, &records) {
            Ok(s) => s,
            Err(e) => {
                for name in [DB_FILE, MARKER_FILE] {
                    std::fs::remove_file(dir.join(name)).ok();
                }
                return Err(e);
            }
        };
        std::fs::create_dir_all(&aside).map_err(|source| StoreError::Create {
            path: aside.clone(),
            source,
        })?;
        for name in entries(&dir)? {
            let sled_file =
                name == "conf" || name == "db" || name == "blobs" || name.starts_with("snap.");
            if sled_file {
                std::fs::rename(dir.join(&name), aside.join(&name)).ok();
            }
        }
        info!(
            data_dir = %dir.display(),
            records = records.len(),
            old_files = %aside.display(),
            "moved the state store from sled to SQLite (checksummed records); sled's files are kept aside"
        );
        Ok(store)
    }
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
        lock(&self.pending).clear();
    }

    fn stage(&self, put: Put) {
        lock(&self.pending).push(put);
    }

    fn commit(&self) -> Commit<'_> {
        Box::pin(async move {
            let batch = std::mem::take(&mut *lock(&self.pending));
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
                    restage(&self.pending, batch);
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
        counts: s.book.counts,
        problems: s.problems,
    }
}

#[cfg(test)]
#[path = "sqlite_tests.rs"]
mod tests;
