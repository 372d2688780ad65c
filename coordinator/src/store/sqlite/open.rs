//! Opening a data dir: a new store, a sound one checked, a damaged one refused or salvaged
//! (`--recover`), an old sled store moved over.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use nix::fcntl::Flock;
use rusqlite::Connection;
use tracing::{info, warn};

use super::check::{Scan, damaged, manifest_of, put_meta, scan, sql_error};
use super::files::{
    check_seal, entries, marker_text, new_store_id, read_marker, take_lock, unix_ms, write_durably,
};
use super::{
    Book, CREATE_TABLES, DB_FILE, Inner, KINDS, Loaded, MARKER_FILE, OLD_SLED, OnDamage, SCHEMA,
    Sqlite, open_conn, summary, write,
};
use crate::leadership::Leadership;
use crate::store::{Backend, Kind, Put, RecoveryReport, StoreError, Write};

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
            pending: Mutex::new(crate::store::Pending::default()),
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
            let writes: Vec<Write> = records.iter().cloned().map(Write::Put).collect();
            write(&mut inner, &writes).map_err(io)?;
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
        // Evidence is not kept by the scan: what is still valid is read before the file moves.
        let evidence =
            super::reader::read(&dir, "", super::reader::OnBad::Skip).unwrap_or_default();
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
        for (key, value) in evidence {
            records.push(Put {
                kind: Kind::Evidence,
                key,
                value,
            });
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
            let old = crate::store::sled::Sled::open(&dir)?;
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
