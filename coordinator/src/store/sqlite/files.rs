//! The files of a data dir beside the database: the marker and its seal, the lock, and
//! writing a small file durably.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::check::damaged;
use super::{DB_FILE, LOCK_FILE, MARKER_FILE, MARKER_HEAD};
use crate::store::StoreError;

pub(crate) fn new_store_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Now, as the names of kept-aside folders and backups carry it.
pub(crate) fn unix_ms() -> u64 {
    crate::metrics::unix_ms(std::time::SystemTime::now())
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
    pub(super) seq: u64,
    pub(super) len: u64,
    pub(super) crc: u32,
}

impl Seal {
    pub(crate) fn line(self) -> String {
        format!(
            "sealed seq {} bytes {} crc {:08x}\n",
            self.seq, self.len, self.crc
        )
    }

    pub(crate) fn parse(line: &str) -> Option<Self> {
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
pub(crate) fn file_sum(path: &Path) -> std::io::Result<(u64, u32)> {
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
pub(crate) fn check_seal(dir: &Path, seal: Seal) -> Option<String> {
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
