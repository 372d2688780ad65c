//! The SQLite store: commits, the manifest, and each kind of damage found at open.

use super::*;
use crate::store::Store;
use crate::store::test_records::{self, event, randomize_middle, record};

fn node_put(name: &str) -> Put {
    Put {
        kind: Kind::Node,
        key: name.into(),
        value: serde_json::to_vec(&record(name)).expect("encode"),
    }
}

/// A store in `dir` with two nodes (one cordoned) and five history entries, over 6
/// commits; closed (sealed) when it returns.
async fn populated(dir: &Path) {
    drop(test_records::populated(dir).await);
}

fn open_err(dir: &Path) -> String {
    match Store::open(dir) {
        Ok(_) => panic!("a damaged store was opened"),
        Err(e) => {
            assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
            e.to_string()
        }
    }
}

#[tokio::test]
async fn records_and_history_survive_reopen_with_a_rising_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path()).await;
    let store = Store::open(dir.path()).expect("reopen");
    let mark = store.mark().expect("sqlite has a mark");
    assert_eq!(mark.seq, 6, "one per non-empty commit");
    assert_eq!(mark.store().len(), 16);
    let nodes = store.load_nodes().expect("load");
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0], record("gpu-001"));
    assert_eq!(store.load_events().expect("load").len(), 5);
    store.put_node(&record("gpu-003")).expect("put");
    store.flush().await.expect("commit");
    assert_eq!(store.mark().expect("mark").seq, 7);
    assert_eq!(store.mark().expect("mark").store_id, mark.store_id);
}

#[tokio::test]
async fn history_is_pruned_to_the_newest_per_node_and_the_manifest_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        for i in 0..(2 * MAX_EVENTS as u64 + 3) {
            store.put_event("a", &event(i)).expect("put");
            if i % 7 == 0 {
                store.flush().await.expect("commit");
            }
        }
        store.put_event("ab", &event(0)).expect("put");
        store.flush().await.expect("commit");
    }
    let store = Store::open(dir.path()).expect("the manifest matches after pruning");
    let events = store.load_events().expect("load");
    let a: Vec<_> = events.iter().filter(|(n, _)| n == "a").collect();
    assert_eq!(a.len(), MAX_EVENTS);
    assert_eq!(a[0].1.message, format!("e{}", MAX_EVENTS as u64 + 3));
    assert_eq!(
        a.last().map(|e| e.1.message.clone()),
        Some(format!("e{}", 2 * MAX_EVENTS as u64 + 2))
    );
    assert_eq!(events.iter().filter(|(n, _)| n == "ab").count(), 1);
}

#[tokio::test]
async fn an_overwrite_in_the_same_batch_counts_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        let mut old = record("a");
        old.hostname = "old".into();
        store.put_node(&old).expect("put");
        store.put_node(&record("a")).expect("put");
        store.flush().await.expect("commit");
        store.put_node(&old).expect("put");
        store.put_node(&record("a")).expect("put");
        store.flush().await.expect("commit");
    }
    let store = Store::open(dir.path()).expect("manifest counts one record");
    assert_eq!(store.load_nodes().expect("load"), vec![record("a")]);
}

/// Edits the database behind the store's back, as a bad disk or a stray tool would, and
/// drops the clean stop's seal (as after a crash), so that the record checks alone find it.
fn tamper(dir: &Path, sql: &str) {
    let conn = Connection::open(dir.join(DB_FILE)).expect("open");
    conn.execute_batch(sql).expect("tamper");
    drop(conn);
    unseal(dir);
}

/// The marker without its seal: what a crash (no clean stop) leaves.
pub(super) fn unseal(dir: &Path) {
    let path = dir.join(MARKER_FILE);
    let text = std::fs::read_to_string(&path).expect("marker");
    assert!(text.contains("sealed"), "a clean stop sealed it: {text}");
    let kept: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, kept).expect("write");
}

#[tokio::test]
async fn a_clean_stop_seals_the_file_and_any_later_change_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path()).await;
    let marker = std::fs::read_to_string(dir.path().join(MARKER_FILE)).expect("marker");
    assert!(marker.contains("sealed seq 6 bytes"), "{marker}");
    // A byte changed where no record lives (past the last page's records: free space).
    let db = dir.path().join(DB_FILE);
    let mut bytes = std::fs::read(&db).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&db, &bytes).expect("write");
    let err = open_err(dir.path());
    assert!(err.contains("changed after the clean stop"), "{err}");
    // Put back, it opens, and opening removed the seal before anything was written.
    bytes[last] ^= 1;
    std::fs::write(&db, &bytes).expect("write");
    let store = Store::open(dir.path()).expect("sound again");
    let marker = std::fs::read_to_string(dir.path().join(MARKER_FILE)).expect("marker");
    assert!(!marker.contains("sealed"), "{marker}");
    drop(store);
    Store::open(dir.path()).expect("sealed again at the clean stop, and opens");
}

#[tokio::test]
async fn a_record_changed_behind_the_stores_back_fails_its_checksum() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path()).await;
    tamper(
        dir.path(),
        "UPDATE records SET value = CAST(replace(CAST(value AS TEXT), 'bad fan', 'bad fun') AS BLOB) WHERE key = 'gpu-001'",
    );
    let err = open_err(dir.path());
    assert!(err.contains("nodes/gpu-001 fails its checksum"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(
        err.contains("--recover") && err.contains("restore"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_record_is_found_by_the_manifest_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path()).await;
    tamper(dir.path(), "DELETE FROM records WHERE key = 'gpu-002'");
    let err = open_err(dir.path());
    assert!(err.contains("wrote 2 nodes records, 1 are there"), "{err}");
}

#[tokio::test]
async fn an_older_but_valid_version_of_a_record_is_found_by_the_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path()).await;
    // A checksummed, valid record for gpu-001 without its cordon: what a lost write leaves.
    let mut old = record("gpu-001");
    old.cordon = None;
    let value = serde_json::to_vec(&old).expect("encode");
    let (crc, _) = sums(Kind::Node, "gpu-001", None, &value);
    let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
    conn.execute(
        "UPDATE records SET value = ?1, crc = ?2 WHERE key = 'gpu-001'",
        params![value, i64::from(crc)],
    )
    .expect("tamper");
    drop(conn);
    unseal(dir.path());
    let err = open_err(dir.path());
    assert!(err.contains("older or altered version"), "{err}");
}

#[tokio::test]
async fn a_missing_database_or_marker_is_damage_not_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path()).await;
    let db = dir.path().join(DB_FILE);
    std::fs::rename(&db, dir.path().join("elsewhere")).expect("move");
    let err = open_err(dir.path());
    assert!(err.contains("state.sqlite is missing"), "{err}");
    std::fs::rename(dir.path().join("elsewhere"), &db).expect("back");
    std::fs::remove_file(dir.path().join(MARKER_FILE)).expect("rm");
    let err = open_err(dir.path());
    assert!(err.contains("marker vigil-store is missing"), "{err}");
}

#[tokio::test]
async fn a_database_of_another_store_is_refused() {
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    populated(a.path()).await;
    populated(b.path()).await;
    std::fs::copy(a.path().join(DB_FILE), b.path().join(DB_FILE)).expect("copy");
    let err = open_err(b.path());
    assert!(err.contains("belongs to store"), "{err}");
}

#[tokio::test]
async fn random_bytes_or_a_truncation_are_found() {
    for damage in ["random", "truncate"] {
        let dir = tempfile::tempdir().expect("tempdir");
        populated(dir.path()).await;
        let db = dir.path().join(DB_FILE);
        let mut bytes = std::fs::read(&db).expect("read");
        let len = bytes.len();
        assert!(len >= 8192, "a few pages: {len}");
        if damage == "random" {
            for b in &mut bytes[len / 2..len / 2 + 1647] {
                *b = fastrand::u8(..);
            }
        } else {
            bytes.truncate(len / 2);
        }
        std::fs::write(&db, bytes).expect("write");
        let err = open_err(dir.path());
        assert!(err.contains("is damaged"), "{damage}: {err}");
    }
}

#[tokio::test]
async fn recover_keeps_what_is_valid_in_a_new_store_and_lists_the_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path()).await;
    let old_id = Store::open(dir.path())
        .expect("open")
        .mark()
        .expect("mark")
        .store()
        .to_owned();
    tamper(
        dir.path(),
        "UPDATE records SET crc = crc + 1 WHERE key = 'gpu-002'",
    );
    let store = Store::open_recover(dir.path()).expect("recovered");
    let report = store.recovered().expect("a report");
    assert_eq!(report.lost_nodes, ["gpu-002"]);
    assert!(
        report.damage.contains("nodes/gpu-002 fails its checksum"),
        "{report:?}"
    );
    assert!(report.damaged_copy.join(DB_FILE).exists(), "kept aside");
    let nodes = store.load_nodes().expect("load");
    assert_eq!(nodes, vec![record("gpu-001")], "the cordoned node kept");
    assert_eq!(store.load_events().expect("load").len(), 5);
    let mark = store.mark().expect("mark");
    assert_ne!(mark.store(), old_id, "a new store");
    drop(store);
    // The new store is whole: it opens without --recover, and holds what was kept.
    let store = Store::open(dir.path()).expect("the new store opens");
    assert!(store.recovered().is_none());
    assert_eq!(store.load_nodes().expect("load").len(), 1);
}

#[tokio::test]
async fn recover_on_a_sound_store_makes_a_new_store_held_for_review() {
    // A store that checks out may still be an older copy of itself (a rollback an agent
    // exposed): --recover keeps every record under a new id, so agents accept it, and holds.
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path()).await;
    let before = Store::open(dir.path()).expect("open").mark().expect("mark");
    let store = Store::open_recover(dir.path()).expect("open");
    let report = store.recovered().expect("held for review");
    assert!(report.lost.is_empty(), "{report:?}");
    assert!(report.damage.contains("may still be behind"), "{report:?}");
    let after = store.mark().expect("mark");
    assert_ne!(after.store(), before.store(), "a new store");
    assert_eq!(store.load_nodes().expect("load").len(), 2);
    assert_eq!(store.load_events().expect("load").len(), 5);
}

#[tokio::test]
async fn a_second_coordinator_on_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Store::open(dir.path()).expect("open");
    let err = Store::open(dir.path()).err().expect("refused");
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(err.to_string().contains("another"), "{err}");
}

#[tokio::test]
async fn an_old_sled_store_is_moved_over_once_and_its_files_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let old = crate::store::sled::Sled::open(dir.path()).expect("sled");
        let old = Store::new(Box::new(old));
        old.put_node(&record("gpu-001")).expect("put");
        old.put_event("gpu-001", &event(1)).expect("put");
        old.flush().await.expect("commit");
    }
    {
        let store = Store::open(dir.path()).expect("moved over");
        assert_eq!(store.load_nodes().expect("load"), vec![record("gpu-001")]);
        assert_eq!(store.load_events().expect("load").len(), 1);
    }
    let names = entries(dir.path()).expect("ls");
    assert!(!names.iter().any(|n| n == "db" || n == "conf"), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("sled-v1-")), "{names:?}");
    let store = Store::open(dir.path()).expect("now a sqlite store");
    assert_eq!(store.load_nodes().expect("load").len(), 1);
}

#[tokio::test]
async fn a_failed_commit_is_written_with_the_next_and_recover_rereads_the_book() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Sqlite::open(dir.path()).expect("open");
    store.stage(node_put("a"));
    // What a reopen leaves until SQLite opens again.
    let inner = lock(&store.inner).take();
    store.commit().await.expect_err("nothing to write to");
    *lock(&store.inner) = inner;
    assert!(store.recover().expect("reopened"), "after a failure");
    store.stage(node_put("b"));
    store.commit().await.expect("commit");
    drop(store);
    let store = Store::open(dir.path()).expect("whole");
    let names: Vec<String> = store
        .load_nodes()
        .expect("load")
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn a_file_is_not_a_data_dir() {
    let file = tempfile::NamedTempFile::new().expect("file");
    let err = Store::open(file.path()).err().expect("refused");
    assert!(matches!(err, StoreError::NotADirectory { .. }), "{err}");
    assert!(
        err.to_string().contains(&file.path().display().to_string()),
        "{err}"
    );
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
fn garbage_is_damage_or_foreign_never_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(DB_FILE), vec![0xa5u8; 4096]).expect("write");
    let err = Store::open(dir.path()).err().expect("refused");
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    let other = tempfile::tempdir().expect("tempdir");
    std::fs::write(other.path().join("notes.txt"), "hello").expect("write");
    let err = Store::open(other.path()).err().expect("refused");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
}

/// The measurement beside sled's (`store::sled::damage_evidence`): the same damage, 40 seeds,
/// on a sealed store (after a clean stop) and on one without its seal (as after a crash).
#[tokio::test]
#[ignore = "a measurement for the store's design note, not a check; prints a tally"]
async fn random_bytes_in_the_sqlite_store_are_refused() {
    for sealed in [true, false] {
        let (mut refused, mut whole, mut silent_loss) = (0, 0, 0);
        for seed in 0..40u64 {
            let dir = tempfile::tempdir().expect("tempdir");
            populated(dir.path()).await;
            if !sealed {
                unseal(dir.path());
            }
            randomize_middle(&dir.path().join(DB_FILE), seed);
            match Store::open(dir.path()) {
                Err(_) => refused += 1,
                Ok(store) => {
                    let nodes = store.load_nodes().expect("load");
                    let events = store.load_events().expect("load").len();
                    if nodes.len() == 2 && events == 5 {
                        whole += 1;
                    } else {
                        silent_loss += 1;
                    }
                }
            }
        }
        println!(
            "40 damaged SQLite stores (sealed: {sealed}): {refused} refused, {whole} read back \
             whole (the bytes hit space no record uses), {silent_loss} read back with records lost"
        );
    }
}
