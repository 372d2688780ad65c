//! Backups and restores of the SQLite store, the retention of scheduled ones, their metrics.

use super::*;
use crate::store::Store;
use crate::store::sqlite::LOCK_FILE;
use crate::store::test_records::record;

use crate::store::test_records::populated;

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

#[tokio::test]
async fn a_backup_of_a_running_store_restores_under_a_new_id() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    // Open (locked, WAL) while the backup is taken, as under a running coordinator.
    let live = populated(&data).await;
    let mark = live.mark().expect("mark");
    let file = tmp.path().join("b.sqlite");
    let b = backup(&data, &file, false).expect("backup");
    assert_eq!(b.store_id, mark.store().to_owned());
    assert_eq!(b.seq, 6);
    assert_eq!(b.counts, [2, 0, 0, 5, 0, 0]);
    assert_eq!(b.bytes, std::fs::metadata(&file).expect("file").len());
    let line = b.to_string();
    for part in [
        &file.display().to_string(),
        mark.store(),
        "commit seq 6",
        "nodes=2",
        "events=5",
        "bytes",
    ] {
        assert!(line.contains(part), "{line} should say {part}");
    }
    // One self-contained file, nothing left beside it.
    assert_eq!(names(tmp.path()), ["b.sqlite", "data"]);
    // The live store carries on.
    live.put_node(&record("gpu-003")).expect("put");
    live.flush().await.expect("commit after the backup");

    let restored_dir = tmp.path().join("restored");
    let r = restore(&file, &restored_dir).expect("restore");
    assert_ne!(
        r.store_id,
        mark.store().to_owned(),
        "a restored store gets a new id"
    );
    assert_eq!(r.backup_store_id, mark.store().to_owned());
    assert_eq!((r.seq, r.replaced.clone()), (6, None));
    assert!(r.to_string().contains("nothing moved aside"), "{r}");
    let store = Store::open(&restored_dir).expect("the restored store opens");
    let m = store.mark().expect("mark");
    assert_eq!((m.store().to_owned(), m.seq), (r.store_id.clone(), 6));
    let nodes = store.load_nodes().expect("load");
    assert_eq!(nodes.len(), 2, "the backup predates gpu-003");
    assert_eq!(nodes[0], record("gpu-001"));
    assert_eq!(store.load_events().expect("events").len(), 5);
    let marker = std::fs::read_to_string(restored_dir.join(MARKER_FILE)).expect("marker");
    assert!(marker.contains(&r.store_id), "{marker}");
}

#[tokio::test]
async fn backup_refuses_an_existing_file_unless_forced_and_a_dir_without_a_store() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    drop(populated(&data).await);
    let file = tmp.path().join("b.sqlite");
    backup(&data, &tmp.path().join("a.sqlite"), false).expect("backup");
    assert_eq!(
        names(&data),
        [LOCK_FILE, DB_FILE, MARKER_FILE],
        "no -wal or -shm left in the data dir of a stopped coordinator"
    );
    std::fs::write(&file, "precious").expect("write");
    let e = backup(&data, &file, false).expect_err("exists");
    assert!(matches!(e, BackupError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(std::fs::read(&file).expect("read"), b"precious");
    backup(&data, &file, true).expect("--force replaces it");
    assert!(check(&file).expect("check").problems.is_empty());

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let e = backup(&empty, &tmp.path().join("c.sqlite"), false).expect_err("no store");
    assert!(matches!(e, BackupError::NoStore { .. }), "{e}");
    assert!(e.to_string().contains(&empty.display().to_string()), "{e}");
    let e = backup(&data, &tmp.path().join("nowhere/c.sqlite"), false).expect_err("no dir");
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!tmp.path().join("c.sqlite").exists());
}

#[tokio::test]
async fn a_damaged_store_is_not_backed_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    drop(populated(&data).await);
    let conn = Connection::open(data.join(DB_FILE)).expect("open");
    conn.execute_batch("DELETE FROM records WHERE key = 'gpu-002'")
        .expect("tamper");
    drop(conn);
    let e = backup(&data, &tmp.path().join("b.sqlite"), false).expect_err("damaged");
    assert!(e.is_damage(), "{e}");
    assert!(
        e.to_string().contains("wrote 2 nodes records, 1 are there"),
        "{e}"
    );
    assert_eq!(names(tmp.path()), ["data"], "no backup, no temporary file");

    // Random bytes over its pages: SQLite itself cannot read it, or the checks find it.
    let data = tmp.path().join("data2");
    drop(populated(&data).await);
    let db = data.join(DB_FILE);
    let mut bytes = std::fs::read(&db).expect("read");
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 1647] {
        *b = fastrand::u8(..);
    }
    std::fs::write(&db, bytes).expect("write");
    let e = backup(&data, &tmp.path().join("b.sqlite"), false).expect_err("damaged");
    assert!(e.is_damage(), "{e}");
    assert_eq!(
        names(tmp.path()),
        ["data", "data2"],
        "no backup, no temporary file"
    );
}

/// A backup file whose bytes were changed: in a record, and at random in the middle.
#[tokio::test]
async fn restore_refuses_a_damaged_backup_and_leaves_the_data_dir_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    drop(populated(&data).await);
    let file = tmp.path().join("b.sqlite");
    backup(&data, &file, false).expect("backup");
    let good = std::fs::read(&file).expect("read");
    let at = good
        .windows(7)
        .position(|w| w == b"bad fan")
        .expect("the cordon reason is in the file");
    let mut in_record = good.clone();
    in_record[at..at + 3].copy_from_slice(b"sad");
    let mut random = good.clone();
    let mid = good.len() / 2;
    for b in &mut random[mid..mid + 1647] {
        *b = fastrand::u8(..);
    }
    let target = tmp.path().join("target");
    let before_id = {
        let s = populated(&target).await;
        s.mark().expect("mark").store().to_owned()
    };
    let before = names(&target);
    for (what, bytes) in [("a record", in_record), ("random bytes", random)] {
        std::fs::write(&file, bytes).expect("write");
        let e = restore(&file, &target).expect_err(what);
        assert!(matches!(e, BackupError::Damaged { .. }), "{what}: {e}");
        assert!(e.is_damage());
        let text = e.to_string();
        assert!(text.contains(&file.display().to_string()), "{text}");
        assert!(text.contains("nothing was restored"), "{text}");
        assert_eq!(names(&target), before, "{what}: the data dir is untouched");
    }
    let again = Store::open(&target).expect("still opens");
    assert_eq!(again.mark().expect("mark").store().to_owned(), before_id);
}

#[tokio::test]
async fn restore_refuses_a_data_dir_a_coordinator_holds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let live = populated(&data).await;
    let file = tmp.path().join("b.sqlite");
    backup(&data, &file, false).expect("backup");
    let before = names(&data);
    let e = restore(&file, &data).expect_err("locked");
    assert!(matches!(e, BackupError::Locked { .. }), "{e}");
    assert!(
        e.to_string().contains("stop vigil-coordinator first"),
        "{e}"
    );
    assert_eq!(names(&data), before, "nothing moved, nothing installed");
    drop(live);
    let r = restore(&file, &data).expect("restore once stopped");
    let (aside, moved) = r.replaced.clone().expect("the old store moved aside");
    assert_eq!(moved, [DB_FILE, MARKER_FILE].map(String::from).to_vec());
    assert!(aside.starts_with(&data) && aside.join(DB_FILE).is_file());
    assert!(r.to_string().contains(&aside.display().to_string()), "{r}");
    let store = Store::open(&data).expect("opens");
    assert_eq!(store.load_nodes().expect("nodes").len(), 2);
}

#[tokio::test]
async fn restore_moves_a_damaged_store_aside_and_keeps_earlier_asides() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    drop(populated(&data).await);
    let file = tmp.path().join("b.sqlite");
    backup(&data, &file, false).expect("backup");
    // The store is damaged (its marker garbled, a stray -wal), and an earlier --recover's
    // files are there.
    std::fs::write(data.join(MARKER_FILE), "garbage").expect("write");
    std::fs::write(data.join(format!("{DB_FILE}-wal")), "junk").expect("write");
    std::fs::create_dir(data.join("damaged-1")).expect("mkdir");
    let r = restore(&file, &data).expect("restore");
    let (aside, moved) = r.replaced.clone().expect("moved");
    assert_eq!(
        moved,
        [DB_FILE, "state.sqlite-wal", MARKER_FILE]
            .map(String::from)
            .to_vec()
    );
    assert_eq!(
        std::fs::read_to_string(aside.join(MARKER_FILE)).expect("kept"),
        "garbage"
    );
    assert!(data.join("damaged-1").is_dir(), "earlier asides stay");
    let store = Store::open(&data).expect("opens");
    assert_eq!(store.mark().expect("mark").store().to_owned(), r.store_id);
    assert!(data.join(LOCK_FILE).exists());
}

#[test]
fn restore_refuses_a_foreign_dir_a_live_file_and_a_missing_backup() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let foreign = tmp.path().join("home");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::write(foreign.join("notes.txt"), "mine").expect("write");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let data = tmp.path().join("data");
    drop(rt.block_on(populated(&data)));
    let file = tmp.path().join("b.sqlite");
    backup(&data, &file, false).expect("backup");
    let e = restore(&file, &foreign).expect_err("foreign");
    assert!(matches!(e, BackupError::Foreign { .. }), "{e}");
    assert_eq!(
        names(&foreign),
        ["notes.txt"],
        "untouched, not even a lock file"
    );

    std::fs::write(tmp.path().join("b.sqlite-wal"), "log").expect("write");
    let e = restore(&file, &tmp.path().join("new")).expect_err("live file");
    assert!(
        e.to_string()
            .contains("take one with vigil-coordinator backup"),
        "{e}"
    );
    let e = restore(&tmp.path().join("none.sqlite"), &tmp.path().join("new")).expect_err("missing");
    assert!(e.to_string().contains("none.sqlite"), "{e}");
    assert!(!tmp.path().join("new").exists());
}

#[test]
fn scheduled_names_and_pruning_keep_the_newest() {
    assert_eq!(
        parse_name("vigil-backup-1700-seq42.sqlite"),
        Some((1700, 42))
    );
    for bad in [
        "vigil-backup-1700.sqlite",
        "vigil-backup-x-seq1.sqlite",
        "other-1700-seq1.sqlite",
        ".vigil-backup-1700.tmp",
    ] {
        assert_eq!(parse_name(bad), None, "{bad}");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    for ms in [100, 300, 200, 400] {
        std::fs::write(
            tmp.path().join(format!("vigil-backup-{ms}-seq1.sqlite")),
            "",
        )
        .expect("write");
    }
    for name in [".vigil-backup-50.tmp", ".vigil-backup-999.tmp", "notes.txt"] {
        std::fs::write(tmp.path().join(name), "").expect("write");
    }
    assert_eq!(list(tmp.path())[0].0, 400);
    let removed = prune(tmp.path(), 2, 500).expect("prune");
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert_eq!(
        names(tmp.path()),
        [
            ".vigil-backup-999.tmp",
            "notes.txt",
            "vigil-backup-300-seq1.sqlite",
            "vigil-backup-400-seq1.sqlite"
        ]
    );
}

#[test]
fn backup_config_is_checked() {
    let ok = BackupConfig {
        dir: "/b".into(),
        ..BackupConfig::default()
    };
    assert_eq!(ok.validate(Path::new("/var/lib/vigil")), Ok(()));
    for (bad, key) in [
        (BackupConfig::default(), "backup.dir"),
        (
            BackupConfig {
                dir: "/var/lib/vigil".into(),
                ..ok.clone()
            },
            "backup.dir",
        ),
        (
            BackupConfig {
                interval: Duration::from_millis(10),
                ..ok.clone()
            },
            "backup.interval",
        ),
        (
            BackupConfig {
                keep: 0,
                ..ok.clone()
            },
            "backup.keep",
        ),
    ] {
        let e = bad.validate(Path::new("/var/lib/vigil")).expect_err(key);
        assert!(e.contains(key), "{e}");
    }
}

fn sample(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_backs_up_prunes_counts_and_stops() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let live = populated(&data).await;
    let metrics = Arc::new(Metrics::new(0));
    let before = metrics.encode().expect("encode");
    assert_eq!(
        sample(&before, "vigil_store_backup_age_seconds").as_deref(),
        Some("NaN")
    );
    assert_eq!(
        sample(&before, "vigil_store_backups_total{result=\"ok\"}").as_deref(),
        Some("0")
    );
    assert_eq!(
        sample(&before, "vigil_store_backup_interval_seconds").as_deref(),
        Some("0.0")
    );
    let config = BackupConfig {
        interval: Duration::from_millis(150),
        dir: tmp.path().join("backups"),
        keep: 2,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = schedule(config.clone(), data.clone(), metrics.clone(), stop_rx);
    let mut taken = 0.0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = metrics.encode().expect("encode");
        taken = sample(&text, "vigil_store_backups_total{result=\"ok\"}")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if taken >= 4.0 {
            break;
        }
    }
    stop_tx.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops")
        .expect("joins");
    assert!(taken >= 4.0, "{taken} backups");
    let kept = list(&config.dir);
    assert_eq!(kept.len(), 2, "{kept:?}");
    for (_, path) in &kept {
        assert!(check(path).expect("check").problems.is_empty());
    }
    assert_eq!(names(&config.dir).len(), 2, "no temporary file left");
    let text = metrics.encode().expect("encode");
    let age: f64 = sample(&text, "vigil_store_backup_age_seconds")
        .and_then(|v| v.parse().ok())
        .expect("an age");
    assert!((0.0..5.0).contains(&age), "{age}");
    assert_eq!(
        sample(&text, "vigil_store_backup_interval_seconds").as_deref(),
        Some("0.15")
    );
    assert_eq!(
        sample(&text, "vigil_store_backups_total{result=\"error\"}").as_deref(),
        Some("0")
    );
    drop(live);

    // A restart finds the newest backup: the age carries on, the first backup waits.
    let metrics = Arc::new(Metrics::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let config = BackupConfig {
        interval: Duration::from_secs(3600),
        ..config
    };
    let task = schedule(config.clone(), data.clone(), metrics.clone(), stop_rx);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = metrics.encode().expect("encode");
    assert!(sample(&text, "vigil_store_backup_age_seconds").is_some_and(|v| v != "NaN"));
    assert_eq!(
        sample(&text, "vigil_store_backups_total{result=\"ok\"}").as_deref(),
        Some("0"),
        "nothing due yet"
    );
    stop_tx.send(true).expect("stop");
    task.await.expect("joins");

    // A data dir without a store: counted as an error, nothing written.
    let metrics = Metrics::new(0);
    take_scheduled(&tmp.path().join("nothing"), &config, &metrics);
    let text = metrics.encode().expect("encode");
    assert_eq!(
        sample(&text, "vigil_store_backups_total{result=\"error\"}").as_deref(),
        Some("1")
    );
    assert_eq!(list(&config.dir).len(), 2);
}

#[tokio::test]
async fn a_backup_of_a_stopped_store_leaves_its_seal_intact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    drop(populated(&data).await);
    let marker = std::fs::read_to_string(data.join(MARKER_FILE)).expect("marker");
    assert!(
        marker.contains("sealed"),
        "a clean stop sealed it: {marker}"
    );
    backup(&data, &tmp.path().join("b.sqlite"), false).expect("backup");
    // The backup read the file without changing a byte: the seal still holds, it opens.
    let store = Store::open(&data).expect("still opens after an offline backup");
    assert_eq!(store.load_nodes().expect("load").len(), 2);
}
