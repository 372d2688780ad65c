//! The scrub: a background pass over every record of the SQLite store, checking each one's
//! checksum, paced so that it never competes with the engine's commits. Rot is found (logged,
//! counted, alerted on) while the coordinator runs, before a restart needs the data.
//!
//! It reads through its own connection (WAL: readers never block the writer) in pages of
//! [`PAGE`] records, [`PAUSE`] apart (about 10,000 records a second), and starts a pass every
//! [`EVERY`]. The manifest is not checked here: it moves with every commit; open checks it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::watch;
use tracing::{debug, error, info};

use super::Kind;
use super::sqlite::{DB_FILE, kind_of, sums};
use crate::metrics::Metrics;

/// Records read at a time.
pub const PAGE: i64 = 500;
/// Pause between pages.
pub const PAUSE: Duration = Duration::from_millis(50);
/// From the start of one pass to the start of the next.
pub const EVERY: Duration = Duration::from_secs(3600);
/// Before the first pass: the start's own check has just read everything.
const FIRST_AFTER: Duration = Duration::from_secs(600);

/// What one pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub records: u64,
    /// One line per record that fails its checksum (or could not be read).
    pub bad: Vec<String>,
}

/// Where a paged read goes on from: the last (table key, second key) read.
enum Cursor {
    Records(String, String),
    Events(String, i64),
    /// Hung attempts' evidence (a store without any has no such table).
    Evidence(String),
}

/// One paged step: reads up to [`PAGE`] records after `from`, checks them into `pass`, and
/// says where to go on (`None`: the pass is done).
fn step(conn: &Connection, from: Cursor, pass: &mut Pass) -> rusqlite::Result<Option<Cursor>> {
    match from {
        Cursor::Records(kind, key) => {
            let mut stmt = conn.prepare_cached(
                "SELECT kind, key, crc, value FROM records WHERE (kind, key) > (?1, ?2) \
                 ORDER BY kind, key LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![kind, key, PAGE])?;
            let mut last = None;
            while let Some(row) = rows.next()? {
                let (dir, key): (String, String) = (row.get(0)?, row.get(1)?);
                let (crc, value): (i64, Vec<u8>) = (row.get(2)?, row.get(3)?);
                pass.records += 1;
                let kind = kind_of(&dir).filter(|k| *k != Kind::Event);
                let sound = kind.is_some_and(|k| i64::from(sums(k, &key, None, &value).0) == crc);
                if !sound {
                    pass.bad.push(format!("{dir}/{key} fails its checksum"));
                }
                last = Some((dir, key));
            }
            Ok(Some(match last {
                Some((dir, key)) => Cursor::Records(dir, key),
                None => Cursor::Events(String::new(), -1),
            }))
        }
        Cursor::Events(node, id) => {
            let mut stmt = conn.prepare_cached(
                "SELECT node, id, crc, value FROM events WHERE (node, id) > (?1, ?2) \
                 ORDER BY node, id LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![node, id, PAGE])?;
            let mut last = None;
            while let Some(row) = rows.next()? {
                let (node, id): (String, i64) = (row.get(0)?, row.get(1)?);
                let (crc, value): (i64, Vec<u8>) = (row.get(2)?, row.get(3)?);
                pass.records += 1;
                let event_id = u64::try_from(id).unwrap_or(0);
                if i64::from(sums(Kind::Event, &node, Some(event_id), &value).0) != crc {
                    pass.bad.push(format!(
                        "events/{node}/{id} (a history entry) fails its checksum"
                    ));
                }
                last = Some((node, id));
            }
            Ok(Some(match last {
                Some((node, id)) => Cursor::Events(node, id),
                None => Cursor::Evidence(String::new()),
            }))
        }
        Cursor::Evidence(key) => {
            if !super::sqlite::has_evidence(conn)? {
                return Ok(None);
            }
            let mut stmt = conn.prepare_cached(
                "SELECT key, crc, value FROM evidence WHERE key > ?1 ORDER BY key LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![key, PAGE])?;
            let mut last = None;
            while let Some(row) = rows.next()? {
                let key: String = row.get(0)?;
                let (crc, value): (i64, Vec<u8>) = (row.get(1)?, row.get(2)?);
                pass.records += 1;
                if i64::from(sums(Kind::Evidence, &key, None, &value).0) != crc {
                    pass.bad.push(format!(
                        "evidence/{key} (a hang's evidence) fails its checksum"
                    ));
                }
                last = Some(key);
            }
            Ok(last.map(Cursor::Evidence))
        }
    }
}

fn connect(db: &Path) -> rusqlite::Result<Connection> {
    // Read-write flags, reads only: a WAL reader needs the shared-memory file.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(db, flags)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "cell_size_check", "ON")?;
    Ok(conn)
}

/// A whole pass over the store in `data_dir`, `pause` between pages (blocking).
pub fn pass(data_dir: &Path, pause: Duration) -> Pass {
    let mut found = Pass::default();
    let conn = match connect(&data_dir.join(DB_FILE)) {
        Ok(c) => c,
        Err(e) => {
            found.bad.push(format!("{DB_FILE} cannot be opened ({e})"));
            return found;
        }
    };
    let mut at = Some(Cursor::Records(String::new(), String::new()));
    while let Some(from) = at.take() {
        match step(&conn, from, &mut found) {
            Ok(next) => at = next,
            Err(e) => {
                found.bad.push(format!("{DB_FILE} cannot be read ({e})"));
                return found;
            }
        }
        if at.is_some() && !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    found
}

/// Scrubs the store in `data_dir` every [`EVERY`] until `stop` turns true.
pub fn schedule(
    data_dir: PathBuf,
    metrics: std::sync::Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut wait = FIRST_AFTER;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            wait = EVERY;
            let dir = data_dir.clone();
            let started = tokio::time::Instant::now();
            let Ok(found) = tokio::task::spawn_blocking(move || pass(&dir, PAUSE)).await else {
                continue;
            };
            metrics.scrub.observe(&found);
            if found.bad.is_empty() {
                info!(
                    data_dir = %data_dir.display(),
                    records = found.records,
                    took = ?started.elapsed(),
                    "state store scrubbed: every record matches its checksum"
                );
            } else {
                for line in &found.bad {
                    error!(data_dir = %data_dir.display(), "state store scrub: {line}");
                }
                error!(
                    data_dir = %data_dir.display(),
                    records = found.records,
                    bad = found.bad.len(),
                    "state store scrub found damaged records: the disk under the data dir \
                     returns altered data. This coordinator keeps running on the state it holds, \
                     but its next start will refuse the store (exit 65): check the disk, and plan \
                     that restart with --recover or a restore of the last good backup \
                     (docs/operations.md, \"Store scrub found damage\")"
                );
            }
            debug!(next_in = ?EVERY, "next scrub");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::test_records::{event, record};

    #[tokio::test]
    async fn a_pass_checks_every_record_of_a_live_store_and_names_the_rotten_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for i in 0..1200 {
            store
                .put_node(&record(&format!("gpu-{i:04}")))
                .expect("put");
        }
        for i in 0..3 {
            store.put_event("gpu-0001", &event(i)).expect("put");
        }
        store.flush().await.expect("commit");
        // Several pages, while the store is open (its lock held), as under a coordinator.
        let clean = pass(dir.path(), Duration::ZERO);
        assert_eq!(
            clean,
            Pass {
                records: 1203,
                bad: Vec::new()
            }
        );
        // Rot: a value changed under the store, its checksum not.
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
        conn.execute_batch(
            "UPDATE records SET value = CAST(replace(CAST(value AS TEXT), 'bad fan', 'bad fun') AS BLOB) WHERE key = 'gpu-0777'; \
             UPDATE events SET crc = crc + 1 WHERE id = (SELECT max(id) FROM events)",
        )
        .expect("rot");
        let found = pass(dir.path(), Duration::ZERO);
        assert_eq!(found.records, 1203);
        assert_eq!(found.bad.len(), 2, "{:?}", found.bad);
        assert_eq!(found.bad[0], "nodes/gpu-0777 fails its checksum");
        assert!(
            found.bad[1].starts_with("events/gpu-0001/"),
            "{:?}",
            found.bad
        );
        let metrics = Metrics::new(1);
        metrics.scrub.observe(&found);
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains("\nvigil_store_scrub_damaged_records 2\n"),
            "{text}"
        );
        assert!(
            text.contains("\nvigil_store_scrub_records_total 1203\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_pass_checks_evidence_records_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.put_node(&record("gpu-0001")).expect("put");
        store.flush().await.expect("commit");
        assert_eq!(
            pass(dir.path(), Duration::ZERO).records,
            1,
            "no evidence table yet"
        );
        for i in 0..3 {
            let e = vigil_core::jobs::evidence::NodeEvidence {
                node: format!("n{i}"),
                at_ms: 1,
                processes: Vec::new(),
                log_tail: "step 5".into(),
                fabric: Vec::new(),
                error: String::new(),
            };
            store.put_evidence("j-1", 1, &e).expect("put");
        }
        store.flush().await.expect("commit");
        assert_eq!(pass(dir.path(), Duration::ZERO).records, 4);
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
        conn.execute_batch("UPDATE evidence SET crc = crc + 1 WHERE key LIKE '%/n1'")
            .expect("rot");
        let found = pass(dir.path(), Duration::ZERO);
        assert_eq!(
            found.bad,
            ["evidence/j-1/00000000000000000001/n1 (a hang's evidence) fails its checksum"]
        );
    }

    #[test]
    fn a_missing_store_is_reported_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let found = pass(dir.path(), Duration::ZERO);
        assert_eq!(found.records, 0);
        assert_eq!(found.bad.len(), 1, "{found:?}");
    }
}
