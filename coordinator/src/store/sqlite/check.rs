//! Reading the SQLite store back and checking it: every record against its checksum, the
//! counts and the digest against the manifest of the last commit.

use std::path::Path;

use rusqlite::{Connection, params};

use super::{Book, DB_FILE, EvidenceSums, KINDS, Loaded, Manifest, SCHEMA};
use crate::store::{Kind, StoreError};

pub(crate) fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Node => 0,
        Kind::Job => 1,
        Kind::Lemon => 2,
        Kind::Event => 3,
        Kind::Cluster => 4,
        // Counted apart (`Book::evidence`); never asked for.
        Kind::Evidence => 5,
    }
}

pub(crate) fn kind_of(dir: &str) -> Option<Kind> {
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

pub(crate) fn meta_sum(key: &str, value: &[u8]) -> u32 {
    sums(Kind::Cluster, &format!("meta/{key}"), None, value).0
}

pub(crate) fn sql_error(dir: &Path, e: &rusqlite::Error) -> StoreError {
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

pub(crate) fn damaged(dir: &Path, what: impl Into<String>) -> StoreError {
    StoreError::Damaged {
        path: dir.to_owned(),
        what: what.into(),
    }
}

/// What reading the whole store back found.
#[derive(Default)]
pub(crate) struct Scan {
    pub(super) book: Book,
    pub(super) loaded: Loaded,
    pub(super) store_id: Option<String>,
    pub(super) manifest: Option<Manifest>,
    /// Everything that is not as committed, each said once.
    pub(super) problems: Vec<String>,
    pub(super) lost_nodes: Vec<String>,
    pub(super) lost_jobs: Vec<String>,
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
pub(crate) fn scan(conn: &Connection) -> Scan {
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
    if let Err(e) = scan_evidence(conn, &mut s) {
        s.problems.push(format!(
            "{DB_FILE} cannot be read past some evidence records ({e})"
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
    if let Some(want) = &manifest.evidence {
        if want.count != s.book.evidence {
            s.problems.push(format!(
                "commit {} wrote {} evidence records, {} are there",
                manifest.seq, want.count, s.book.evidence
            ));
        } else if want.digest != format!("{:016x}", s.book.evidence_digest) {
            s.problems.push(format!(
                "the evidence records are not those commit {} wrote: some hold an older or \
                 altered version",
                manifest.seq
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

pub(crate) fn scan_meta(conn: &Connection, s: &mut Scan) -> rusqlite::Result<()> {
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

pub(crate) fn scan_records(conn: &Connection, s: &mut Scan) -> rusqlite::Result<()> {
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

pub(crate) fn scan_events(conn: &Connection, s: &mut Scan) -> rusqlite::Result<()> {
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

/// Whether the store has the evidence table (the previous release's has not).
pub(crate) fn has_evidence(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'evidence'",
        [],
        |row| row.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

pub(crate) fn scan_evidence(conn: &Connection, s: &mut Scan) -> rusqlite::Result<()> {
    if !has_evidence(conn)? {
        return Ok(());
    }
    let mut stmt = conn.prepare("SELECT key, crc, value FROM evidence")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let key: String = row.get(0)?;
        let crc: i64 = row.get(1)?;
        let value: Vec<u8> = row.get(2)?;
        let (sum, hash) = sums(Kind::Evidence, &key, None, &value);
        if i64::from(sum) != crc {
            s.problems.push(format!(
                "evidence/{key} (a hang's evidence) fails its checksum"
            ));
            continue;
        }
        // Not kept in `loaded`: evidence is read on demand, never loaded at start (a store may
        // hold megabytes of it per job).
        s.book.evidence += 1;
        s.book.evidence_digest ^= hash;
        s.book.hashes.insert((Kind::Evidence, key), hash);
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

pub(crate) fn manifest_of(book: &Book) -> Manifest {
    Manifest {
        seq: book.seq,
        counts: book.counts,
        digest: format!("{:016x}", book.digest),
        evidence: Some(EvidenceSums {
            count: book.evidence,
            digest: format!("{:016x}", book.evidence_digest),
        }),
    }
}
