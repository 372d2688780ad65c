//! Backups of a single coordinator's SQLite store, and restoring one.
//!
//! - [`backup`] (`vigil-coordinator backup --data-dir D --to FILE`) and [`backup_into`] (the
//!   `[backup]` schedule): `VACUUM INTO` a temporary file inside one read transaction of the
//!   live store, so the copy is one commit's state even while the coordinator writes (WAL: the
//!   reader never blocks the writer, and it takes no lock). The copy is made a self-contained
//!   file (no `-wal`), fsynced, read back whole and checked as the coordinator checks its store
//!   at start (every record's CRC, the manifest's counts and digest) before it gets its name.
//! - [`restore`] (`vigil-coordinator restore --from FILE --data-dir D`): the backup is checked
//!   whole first; D's lock must be free (no coordinator runs on it); whatever store (or damaged
//!   store) D holds is moved to `D/replaced-<unix ms>/`, never deleted; the backup is installed
//!   with a **new store id**. Agents remember the highest commit seq of each store id to expose
//!   a data dir replaced by an older copy of itself; a restore is exactly such a copy, made on
//!   purpose, so it must not carry the old id (docs/operations.md, "Backing up and restoring
//!   the state").
//! - [`schedule`]: the running coordinator's periodic backups (`[backup]`), on a blocking
//!   thread, named `vigil-backup-<unix ms>-seq<seq>.sqlite`, the newest `keep` kept.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::Kind;
use super::sqlite::{
    DB_FILE, KINDS, MARKER_FILE, entries, marker_text, new_store_id, put_meta, read_marker,
    summary, take_lock, unix_ms, verify, write_durably,
};
use crate::metrics::Metrics;

/// What [`verify`] found in one SQLite file: the store's id, its last commit and every problem.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    pub store_id: Option<String>,
    /// The manifest's commit seq.
    pub seq: u64,
    /// Records per kind, in [`KINDS`] order, then evidence records.
    pub counts: [u64; 6],
    pub problems: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "data dir {dir} holds no vigil state store (no {DB_FILE}); point --data-dir at the \
         coordinator's data dir (data_dir in its config, /var/lib/vigil by default)"
    )]
    NoStore { dir: PathBuf },
    #[error("{path} already exists; choose another file, or pass --force to replace it")]
    Exists { path: PathBuf },
    /// The live store's snapshot fails the checks: the store itself is damaged.
    #[error(
        "the state store in {dir} is damaged: {what}; no backup was written. Restore the last \
         good backup (vigil-coordinator restore --from FILE --data-dir {dir}: \
         docs/operations.md, \"Restoring\"), or start from what is still valid \
         (vigil-coordinator --recover)"
    )]
    StoreDamaged { dir: PathBuf, what: String },
    #[error("backup {path} is damaged: {what}; nothing was restored: use another backup")]
    Damaged { path: PathBuf, what: String },
    #[error(
        "a vigil-coordinator holds {dir}/lock ({message}): stop vigil-coordinator first \
         (systemctl stop vigil-coordinator), then restore"
    )]
    Locked { dir: PathBuf, message: String },
    #[error(
        "{dir} holds files but no vigil state store ({found}); restore into the coordinator's \
         data dir or an empty directory"
    )]
    Foreign { dir: PathBuf, found: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

impl BackupError {
    /// A damaged backup or store: the command exits 65 (EX_DATAERR), as a damaged store does.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            BackupError::Damaged { .. } | BackupError::StoreDamaged { .. }
        )
    }
}

fn io(path: &Path, what: &str, e: impl fmt::Display) -> BackupError {
    BackupError::Io {
        path: path.to_owned(),
        message: format!("{what}: {e}"),
    }
}

/// Records per kind, as `nodes=2 jobs=1 lemons=0 events=40 cluster=0 evidence=0`.
fn counts_text(counts: &[u64; 6]) -> String {
    KINDS
        .iter()
        .chain([&Kind::Evidence])
        .zip(counts)
        .map(|(k, n)| format!("{}={n}", k.dir()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A backup written and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub path: PathBuf,
    pub store_id: String,
    pub seq: u64,
    pub counts: [u64; 6],
    pub bytes: u64,
}

impl fmt::Display for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backup {}: store {}, commit seq {}, records {}, {} bytes, checked",
            self.path.display(),
            self.store_id,
            self.seq,
            counts_text(&self.counts),
            self.bytes
        )
    }
}

/// A backup installed as a data dir's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub from: PathBuf,
    pub dir: PathBuf,
    /// The store the backup was taken of.
    pub backup_store_id: String,
    /// The restored store's own, new id.
    pub store_id: String,
    pub seq: u64,
    pub counts: [u64; 6],
    /// Where what the data dir held went, and what that was; `None` when it held nothing.
    pub replaced: Option<(PathBuf, Vec<String>)>,
}

impl fmt::Display for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restored {} into {}: commit seq {}, records {}, new store id {} (the backup was of \
             store {}); ",
            self.from.display(),
            self.dir.display(),
            self.seq,
            counts_text(&self.counts),
            self.store_id,
            self.backup_store_id
        )?;
        match &self.replaced {
            Some((aside, names)) => write!(
                f,
                "moved aside to {}: {}",
                aside.display(),
                names.join(", ")
            ),
            None => write!(f, "the data dir held no store, nothing moved aside"),
        }
    }
}

/// Escapes a path for an SQLite URI filename (`%`, `?` and `#` are special there).
fn uri_path(path: &Path) -> Result<String, BackupError> {
    let text = path.to_str().ok_or_else(|| BackupError::Io {
        path: path.to_owned(),
        message: "the path is not UTF-8; use another name".into(),
    })?;
    Ok(text
        .replace('%', "%25")
        .replace('?', "%3f")
        .replace('#', "%23"))
}

/// Reads `file` whole and checks it as the coordinator checks its store at start, without
/// writing anything next to it (`immutable`: no `-wal`, `-shm` or journal is created).
pub fn check(file: &Path) -> Result<Verified, BackupError> {
    let meta = std::fs::metadata(file).map_err(|e| io(file, "cannot read it", e))?;
    if !meta.is_file() {
        return Err(BackupError::Io {
            path: file.to_owned(),
            message: "not a file".into(),
        });
    }
    let uri = format!("file:{}?immutable=1", uri_path(file)?);
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut found = match Connection::open_with_flags(&uri, flags) {
        Ok(conn) => {
            // Damage is an error, never a wild read (as the live store is opened).
            conn.pragma_update(None, "cell_size_check", "ON").ok();
            let mut found = verify(&conn);
            // The file's structure too (pages, b-trees, free list), beyond every record.
            found.problems.extend(integrity(&conn));
            found
        }
        Err(e) => Verified {
            problems: vec![format!("cannot be opened as an SQLite file ({e})")],
            ..Verified::default()
        },
    };
    if found.problems.is_empty() && found.store_id.is_none() {
        found
            .problems
            .push("the store's id is missing from its meta table".into());
    }
    Ok(found)
}

/// SQLite's own check of the whole file: nothing when it is sound.
fn integrity(conn: &Connection) -> Option<String> {
    let lines = (|| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare("PRAGMA integrity_check(5)")?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
        rows.collect()
    })();
    match lines {
        Ok(lines) if lines == ["ok"] => None,
        Ok(lines) => Some(format!("SQLite's integrity check: {}", lines.join("; "))),
        Err(e) => Some(format!("SQLite's integrity check cannot read it ({e})")),
    }
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, "cannot fsync the directory", e))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// One consistent snapshot of the live store in `data_dir`, written to `tmp` (fsynced,
/// self-contained) and checked. `tmp` is removed unless the snapshot passes.
fn snapshot(data_dir: &Path, tmp: &Path) -> Result<Verified, BackupError> {
    let db = data_dir.join(DB_FILE);
    if !db.is_file() {
        return Err(BackupError::NoStore {
            dir: data_dir.to_owned(),
        });
    }
    let marker = read_marker(data_dir).map_err(|e| BackupError::StoreDamaged {
        dir: data_dir.to_owned(),
        what: e.to_string(),
    })?;
    let tmp_text = tmp.to_str().ok_or_else(|| BackupError::Io {
        path: tmp.to_owned(),
        message: "the path is not UTF-8; use another name".into(),
    })?;
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io(tmp, "cannot remove a leftover temporary file", e));
        }
        _ => {}
    }
    let written = (|| -> rusqlite::Result<()> {
        // No lock of ours: a running coordinator keeps writing meanwhile. VACUUM INTO only
        // reads the store; the connection is read-write so that, when no coordinator runs,
        // closing it (the last one) folds the log back and removes the -wal and -shm files
        // it needed, as a coordinator would; a read-only one would leave them behind, owned
        // by whoever ran the backup.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let src = Connection::open_with_flags(&db, flags)?;
        src.busy_timeout(Duration::from_secs(10))?;
        src.execute("VACUUM INTO ?1", [tmp_text])?;
        src.close().map_err(|(_, e)| e)?;
        // A single file, whatever journal mode the copy came with.
        let out = Connection::open_with_flags(tmp, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        out.pragma_update(None, "journal_mode", "DELETE")?;
        out.close().map_err(|(_, e)| e)
    })();
    let checked = written
        .map_err(|e| match e.sqlite_error_code() {
            // SQLite could not read the store itself: damage, as at open.
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
                BackupError::StoreDamaged {
                    dir: data_dir.to_owned(),
                    what: format!("{DB_FILE} cannot be read ({e})"),
                }
            }
            _ => io(tmp, &format!("cannot copy {}", db.display()), e),
        })
        .and_then(|()| {
            File::open(tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(tmp, "cannot fsync", e))
        })
        .and_then(|()| check(tmp));
    let found = match checked {
        Ok(found) if found.problems.is_empty() => found,
        Ok(found) => {
            std::fs::remove_file(tmp).ok();
            return Err(BackupError::StoreDamaged {
                dir: data_dir.to_owned(),
                what: summary(&found.problems),
            });
        }
        Err(e) => {
            std::fs::remove_file(tmp).ok();
            return Err(e);
        }
    };
    let id = found.store_id.clone().unwrap_or_default();
    if let Some(m) = marker.map(|(m, _)| m).filter(|m| *m != id) {
        std::fs::remove_file(tmp).ok();
        return Err(BackupError::StoreDamaged {
            dir: data_dir.to_owned(),
            what: format!(
                "{DB_FILE} belongs to store {id}, the marker {MARKER_FILE} names store {m}"
            ),
        });
    }
    Ok(found)
}

fn finish(tmp: &Path, to: &Path, found: Verified) -> Result<Backup, BackupError> {
    std::fs::rename(tmp, to).map_err(|e| {
        std::fs::remove_file(tmp).ok();
        io(to, &format!("cannot rename {} to it", tmp.display()), e)
    })?;
    sync_dir(&parent_of(to))?;
    let bytes = std::fs::metadata(to).map_or(0, |m| m.len());
    Ok(Backup {
        path: to.to_owned(),
        store_id: found.store_id.unwrap_or_default(),
        seq: found.seq,
        counts: found.counts,
        bytes,
    })
}

/// `vigil-coordinator backup`: a checked snapshot of the store in `data_dir` at `to`.
pub fn backup(data_dir: &Path, to: &Path, force: bool) -> Result<Backup, BackupError> {
    if to.is_dir() {
        return Err(BackupError::Io {
            path: to.to_owned(),
            message: "is a directory; name the backup file, e.g. --to /backup/vigil.sqlite".into(),
        });
    }
    if to.exists() && !force {
        return Err(BackupError::Exists {
            path: to.to_owned(),
        });
    }
    let dir = parent_of(to);
    if !dir.is_dir() {
        return Err(BackupError::Io {
            path: dir,
            message: "directory does not exist; create it first".into(),
        });
    }
    let name = to
        .file_name()
        .map_or_else(|| "backup".to_owned(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp"));
    let found = snapshot(data_dir, &tmp)?;
    let done = finish(&tmp, to, found)?;
    info!(
        data_dir = %data_dir.display(),
        path = %done.path.display(),
        store_id = %done.store_id,
        seq = done.seq,
        bytes = done.bytes,
        "backup written and checked"
    );
    Ok(done)
}

const PREFIX: &str = "vigil-backup-";

/// `vigil-backup-<unix ms>-seq<seq>.sqlite`: (unix ms, seq).
pub fn parse_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(PREFIX)?.strip_suffix(".sqlite")?;
    let (ms, seq) = rest.split_once("-seq")?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The scheduled backups in `dir`, newest first, as (unix ms, path).
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let (ms, _) = parse_name(&e.file_name().to_string_lossy())?;
            Some((ms, e.path()))
        })
        .collect();
    found.sort_unstable_by(|a, b| b.cmp(a));
    found
}

/// A scheduled backup into `dir`, named `vigil-backup-<unix ms>-seq<seq>.sqlite`.
pub fn backup_into(data_dir: &Path, dir: &Path) -> Result<Backup, BackupError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, "cannot create the backup dir", e))?;
    let ms = unix_ms();
    let tmp = dir.join(format!(".{PREFIX}{ms}.tmp"));
    let found = snapshot(data_dir, &tmp)?;
    let to = dir.join(format!("{PREFIX}{ms}-seq{}.sqlite", found.seq));
    finish(&tmp, &to, found)
}

/// Removes the scheduled backups in `dir` beyond the newest `keep`, and temporary files of
/// backups that never finished (older than `before_ms`); returns what it removed.
pub fn prune(dir: &Path, keep: usize, before_ms: u64) -> Result<Vec<PathBuf>, BackupError> {
    let mut removed = Vec::new();
    for (_, path) in list(dir).into_iter().skip(keep) {
        std::fs::remove_file(&path).map_err(|e| io(&path, "cannot remove an old backup", e))?;
        removed.push(path);
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let leftover = name
            .strip_prefix(&format!(".{PREFIX}"))
            .and_then(|r| r.strip_suffix(".tmp"))
            .and_then(|ms| ms.parse::<u64>().ok())
            .is_some_and(|ms| ms < before_ms);
        if leftover && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Names a vigil data dir holds: the store and what belongs to it (moved aside by a restore).
fn is_store_file(name: &str) -> bool {
    let db = name
        .strip_prefix(DB_FILE)
        .is_some_and(|rest| ["", "-wal", "-shm", "-journal"].contains(&rest));
    db || name == MARKER_FILE
        || name == format!(".{MARKER_FILE}.tmp")
        // An old sled store, never moved over.
        || ["conf", "db", "blobs"].contains(&name)
        || name.starts_with("snap.")
}

/// What earlier recoveries, migrations and restores kept aside: left where they are.
fn is_kept_aside(name: &str) -> bool {
    ["damaged-", "sled-v1-", "replaced-"]
        .iter()
        .any(|p| name.starts_with(p))
}

const RESTORE_TMP: &str = ".state.sqlite.restore";

/// `vigil-coordinator restore`: installs the backup `from` as the store of `data_dir`, with a
/// new store id; what the data dir held is moved to `data_dir/replaced-<unix ms>/`.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Restored, BackupError> {
    let wal = PathBuf::from(format!("{}-wal", from.display()));
    if wal.exists() {
        return Err(BackupError::Damaged {
            path: from.to_owned(),
            what: format!(
                "{} exists next to it: this is a live store's file, not a backup (its last \
                 commits may be in that log); take one with vigil-coordinator backup",
                wal.display()
            ),
        });
    }
    let found = check(from)?;
    if !found.problems.is_empty() {
        return Err(BackupError::Damaged {
            path: from.to_owned(),
            what: summary(&found.problems),
        });
    }
    let backup_store_id = found.store_id.clone().unwrap_or_default();
    if data_dir.exists() && !data_dir.is_dir() {
        return Err(BackupError::Io {
            path: data_dir.to_owned(),
            message: "not a directory; point --data-dir at the coordinator's data dir".into(),
        });
    }
    std::fs::create_dir_all(data_dir).map_err(|e| io(data_dir, "cannot create", e))?;
    let mut names = entries(data_dir).map_err(|e| io(data_dir, "cannot list", e))?;
    // A restore's own leftover: overwritten below.
    names.retain(|n| n != RESTORE_TMP);
    let mut ours: Vec<String> = names.iter().filter(|n| is_store_file(n)).cloned().collect();
    ours.sort_unstable();
    let foreign: Vec<&str> = names
        .iter()
        .filter(|n| !is_store_file(n) && !is_kept_aside(n))
        .map(String::as_str)
        .collect();
    if ours.is_empty() && !foreign.is_empty() && !names.iter().any(|n| is_kept_aside(n)) {
        let mut shown: Vec<&str> = foreign.iter().copied().take(3).collect();
        shown.sort_unstable();
        return Err(BackupError::Foreign {
            dir: data_dir.to_owned(),
            found: format!("found {}", shown.join(", ")),
        });
    }
    // Held to the end: no coordinator starts on a half-restored dir.
    let _lock = take_lock(data_dir).map_err(|e| BackupError::Locked {
        dir: data_dir.to_owned(),
        message: match e {
            super::StoreError::Open { message, .. } => message,
            other => other.to_string(),
        },
    })?;
    // The copy first, with its new id, checked again: only then is anything moved.
    let store_id = new_store_id();
    let tmp = data_dir.join(RESTORE_TMP);
    std::fs::copy(from, &tmp)
        .map_err(|e| io(&tmp, &format!("cannot copy {}", from.display()), e))?;
    let renamed = (|| -> rusqlite::Result<()> {
        let conn = Connection::open_with_flags(&tmp, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.pragma_update(None, "journal_mode", "DELETE")?;
        put_meta(&conn, "store_id", store_id.as_bytes())?;
        conn.close().map_err(|(_, e)| e)
    })();
    let installed = renamed
        .map_err(|e| io(&tmp, "cannot give the restored store its new id", e))
        .and_then(|()| {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&tmp, "cannot fsync", e))
        })
        .and_then(|()| check(&tmp));
    let installed = match installed {
        Ok(found) if found.problems.is_empty() && found.store_id.as_deref() == Some(&store_id) => {
            found
        }
        Ok(found) => {
            std::fs::remove_file(&tmp).ok();
            return Err(BackupError::Damaged {
                path: from.to_owned(),
                what: format!(
                    "its copy in {} fails the checks ({})",
                    data_dir.display(),
                    summary(&found.problems)
                ),
            });
        }
        Err(e) => {
            std::fs::remove_file(&tmp).ok();
            return Err(e);
        }
    };
    let replaced = if ours.is_empty() {
        None
    } else {
        let aside = data_dir.join(format!("replaced-{}", unix_ms()));
        std::fs::create_dir_all(&aside).map_err(|e| io(&aside, "cannot create", e))?;
        for name in &ours {
            std::fs::rename(data_dir.join(name), aside.join(name))
                .map_err(|e| io(&aside, &format!("cannot move {name} here"), e))?;
        }
        sync_dir(&aside)?;
        info!(
            data_dir = %data_dir.display(),
            aside = %aside.display(),
            files = %ours.join(","),
            "restore: moved what the data dir held aside"
        );
        Some((aside, ours))
    };
    let db = data_dir.join(DB_FILE);
    std::fs::rename(&tmp, &db).map_err(|e| io(&db, "cannot install the restored store", e))?;
    // The marker last, as when a store is created (it fsyncs the dir: both renames with it).
    write_durably(data_dir, MARKER_FILE, marker_text(&store_id).as_bytes())
        .map_err(|e| io(&data_dir.join(MARKER_FILE), "cannot write", e))?;
    let done = Restored {
        from: from.to_owned(),
        dir: data_dir.to_owned(),
        backup_store_id,
        store_id,
        seq: installed.seq,
        counts: installed.counts,
        replaced,
    };
    info!(
        data_dir = %data_dir.display(),
        from = %from.display(),
        store_id = %done.store_id,
        backup_store_id = %done.backup_store_id,
        seq = done.seq,
        "restore: the backup is the data dir's store, under a new store id"
    );
    Ok(done)
}

/// `[backup]`: scheduled backups of a single coordinator's store (absent: none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// How often a backup is taken.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Where the backups go (created if missing).
    pub dir: PathBuf,
    /// How many of the newest backups to keep.
    pub keep: usize,
}

pub const DEFAULT_BACKUP_INTERVAL: Duration = Duration::from_secs(3600);
pub const DEFAULT_BACKUP_KEEP: usize = 24;

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_BACKUP_INTERVAL,
            dir: PathBuf::new(),
            keep: DEFAULT_BACKUP_KEEP,
        }
    }
}

impl BackupConfig {
    pub fn validate(&self, data_dir: &Path) -> Result<(), String> {
        if self.dir.as_os_str().is_empty() {
            return Err(
                "backup.dir is missing: set it to the directory backups go to, e.g. \
                 \"/var/lib/vigil-backups\" (better on another disk than data_dir)"
                    .into(),
            );
        }
        if self.dir == data_dir {
            return Err(format!(
                "backup.dir is data_dir ({}): put backups in a directory of their own",
                data_dir.display()
            ));
        }
        if self.interval < Duration::from_secs(1) {
            return Err(format!(
                "backup.interval = {} is too short; use at least 1s (e.g. \"1h\")",
                humantime::format_duration(self.interval)
            ));
        }
        if self.keep == 0 {
            return Err("backup.keep = 0 would delete every backup; keep at least 1".into());
        }
        Ok(())
    }
}

/// One scheduled backup and its pruning, on a blocking thread.
fn take_scheduled(data_dir: &Path, config: &BackupConfig, metrics: &Metrics) {
    let started = unix_ms();
    match backup_into(data_dir, &config.dir) {
        Ok(b) => {
            metrics.backup.succeeded(started);
            let pruned = match prune(&config.dir, config.keep, started) {
                Ok(p) => p.len(),
                Err(e) => {
                    warn!(error = %e, "scheduled backup: cannot prune old backups");
                    0
                }
            };
            info!(
                path = %b.path.display(),
                store_id = %b.store_id,
                seq = b.seq,
                records = b.counts.iter().sum::<u64>(),
                bytes = b.bytes,
                pruned,
                keep = config.keep,
                "scheduled backup written and checked"
            );
        }
        Err(e) => {
            metrics.backup.failed();
            warn!(
                error = %e,
                dir = %config.dir.display(),
                next_in = %humantime::format_duration(config.interval),
                "scheduled backup failed"
            );
        }
    }
}

/// Takes a backup every `config.interval` until `stop` turns true, never on the engine's
/// threads. The first is due one interval after the newest backup already in `config.dir`
/// (at once if there is none).
pub fn schedule(
    config: BackupConfig,
    data_dir: PathBuf,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    metrics.backup.configured(config.interval);
    let newest = list(&config.dir).first().map(|(ms, _)| *ms);
    if let Some(ms) = newest {
        metrics.backup.found(ms);
    }
    let age = Duration::from_millis(newest.map_or(u64::MAX, |ms| unix_ms().saturating_sub(ms)));
    let mut wait = config.interval.saturating_sub(age);
    info!(
        dir = %config.dir.display(),
        interval = %humantime::format_duration(config.interval),
        keep = config.keep,
        first_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())),
        "scheduled backups on"
    );
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let (dir, cfg, m) = (data_dir.clone(), config.clone(), metrics.clone());
            if let Err(e) =
                tokio::task::spawn_blocking(move || take_scheduled(&dir, &cfg, &m)).await
            {
                metrics.backup.failed();
                warn!(error = %e, "scheduled backup did not finish");
            }
            wait = config.interval;
        }
    })
}

#[cfg(test)]
#[path = "backup_tests.rs"]
mod tests;
