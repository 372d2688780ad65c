//! Reading evidence records beside the engine: a connection of its own per read, reads only
//! (WAL: a reader never blocks the writer), each record checked against its checksum.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};

use super::DB_FILE;
use super::check::{has_evidence, sql_error, sums};
use crate::store::evidence::{Read, Reader};
use crate::store::{Kind, StoreError};

pub struct SqliteReader {
    dir: PathBuf,
}

impl SqliteReader {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }
}

/// How [`read`] treats a record that fails its checksum.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnBad {
    /// The read fails, naming it.
    Fail,
    /// It is left out (`--recover` keeps what is still valid).
    Skip,
}

/// Every evidence record of the store in `dir` whose key starts with `prefix`, by key.
pub fn read(dir: &Path, prefix: &str, on_bad: OnBad) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let io = |e: rusqlite::Error| sql_error(dir, &e);
    // Read-write flags, reads only (as the scrub): a WAL reader needs the shared-memory file.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(dir.join(DB_FILE), flags).map_err(io)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(io)?;
    if !has_evidence(&conn).map_err(io)? {
        return Ok(Vec::new());
    }
    // Keys are text: every key with the prefix lies in [prefix, prefix + U+10FFFF).
    let end = format!("{prefix}\u{10FFFF}");
    let mut stmt = conn
        .prepare("SELECT key, crc, value FROM evidence WHERE key >= ?1 AND key < ?2 ORDER BY key")
        .map_err(io)?;
    let mut rows = stmt.query(params![prefix, end]).map_err(io)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(io)? {
        let key: String = row.get(0).map_err(io)?;
        let crc: i64 = row.get(1).map_err(io)?;
        let value: Vec<u8> = row.get(2).map_err(io)?;
        if i64::from(sums(Kind::Evidence, &key, None, &value).0) != crc {
            if on_bad == OnBad::Skip {
                continue;
            }
            return Err(StoreError::Corrupt {
                path: dir.to_owned(),
                key: format!("{}/{key}", Kind::Evidence.dir()),
                message: "fails its checksum".into(),
            });
        }
        out.push((key, value));
    }
    Ok(out)
}

impl Reader for SqliteReader {
    fn read_prefix(&self, kind: Kind, prefix: String) -> Read<'_> {
        Box::pin(async move {
            if kind != Kind::Evidence {
                return Ok(Vec::new());
            }
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || read(&dir, &prefix, OnBad::Fail))
                .await
                .unwrap_or_else(|e| {
                    Err(StoreError::Io {
                        path: self.dir.clone(),
                        message: format!("the evidence read did not finish: {e}"),
                    })
                })
        })
    }
}
