//! Evidence records in the SQLite store, and one write per record in its pending batch.

use super::*;
use crate::store::Store;
use crate::store::test_records::record;
use vigil_core::jobs::evidence::NodeEvidence;

fn evidence(node: &str, tail: &str) -> NodeEvidence {
    NodeEvidence {
        node: node.into(),
        at_ms: 7,
        processes: Vec::new(),
        log_tail: tail.into(),
        fabric: Vec::new(),
        error: String::new(),
    }
}

fn shown(found: &[(u64, NodeEvidence)]) -> Vec<String> {
    found
        .iter()
        .map(|(a, e)| format!("{a}/{}={}", e.node, e.log_tail))
        .collect()
}

#[tokio::test]
async fn evidence_is_stored_apart_read_by_job_deleted_and_checked_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        let reader = store.evidence_reader();
        store
            .put_evidence("j-1", 2, &evidence("n2", "b"))
            .expect("put");
        store
            .put_evidence("j-1", 2, &evidence("n1", "a"))
            .expect("put");
        store
            .put_evidence("j-1", 10, &evidence("n1", "c"))
            .expect("put");
        store
            .put_evidence("j-10", 1, &evidence("n1", "other job"))
            .expect("put");
        assert!(
            reader.of_job("j-1").await.expect("read").is_empty(),
            "staged only"
        );
        store.flush().await.expect("commit");
        let found = reader.of_job("j-1").await.expect("read");
        assert_eq!(shown(&found), ["2/n1=a", "2/n2=b", "10/n1=c"]);
        store.drop_evidence("j-1", 2, "n2");
        store.drop_evidence("j-1", 2, "never-stored");
        store
            .put_evidence("j-1", 10, &evidence("n1", "c2"))
            .expect("put");
        store.flush().await.expect("commit");
        let found = reader.of_job("j-1").await.expect("read");
        assert_eq!(shown(&found), ["2/n1=a", "10/n1=c2"]);
        assert!(store.load_jobs().expect("load").is_empty(), "not a job");
    }
    // Counted and digested: a clean reopen checks them.
    let store = Store::open(dir.path()).expect("reopen");
    let found = store.evidence_reader().of_job("j-1").await.expect("read");
    assert_eq!(found.len(), 2);
}

#[tokio::test]
async fn a_changed_or_missing_evidence_record_is_damage() {
    for sql in [
        "UPDATE evidence SET value = CAST('{}' AS BLOB) WHERE key LIKE 'j-1/%'",
        "DELETE FROM evidence",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .put_evidence("j-1", 1, &evidence("n1", "a"))
                .expect("put");
            store.flush().await.expect("commit");
        }
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
        conn.execute_batch(sql).expect("tamper");
        drop(conn);
        super::tests::unseal(dir.path());
        match Store::open(dir.path()) {
            Ok(_) => panic!("{sql}: a damaged store was opened"),
            Err(e) => assert!(e.to_string().contains("evidence"), "{sql}: {e}"),
        }
    }
}

#[tokio::test]
async fn a_store_the_previous_release_wrote_last_opens_with_its_evidence() {
    // The previous release rewrites the manifest without the evidence sums and knows nothing
    // of the table: an upgrade after a rollback checks the records one by one.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        store
            .put_evidence("j-1", 1, &evidence("n1", "a"))
            .expect("put");
        store.put_node(&record("gpu-001")).expect("put");
        store.flush().await.expect("commit");
    }
    let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
    let value: Vec<u8> = conn
        .query_row("SELECT value FROM meta WHERE key = 'manifest'", [], |r| {
            r.get(0)
        })
        .expect("manifest");
    let mut manifest: serde_json::Value = serde_json::from_slice(&value).expect("json");
    assert!(manifest["evidence"]["count"] == 1, "{manifest}");
    manifest.as_object_mut().expect("object").remove("evidence");
    let old = serde_json::to_vec(&manifest).expect("json");
    check::put_meta(&conn, "manifest", &old).expect("write");
    drop(conn);
    super::tests::unseal(dir.path());
    let store = Store::open(dir.path()).expect("opens");
    assert_eq!(store.load_nodes().expect("load").len(), 1);
    assert_eq!(
        store
            .evidence_reader()
            .of_job("j-1")
            .await
            .expect("read")
            .len(),
        1
    );
    // And its own manifest, old-style, still reads as this release's.
    let m: Manifest = serde_json::from_slice(&old).expect("an old manifest reads");
    assert_eq!(m.evidence, None);
}

#[tokio::test]
async fn a_record_staged_many_times_in_one_turn_is_written_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Sqlite::open(dir.path()).expect("open");
    let mut old = record("a");
    for i in 0..100 {
        old.hostname = format!("h{i}");
        store.stage(Put {
            kind: Kind::Node,
            key: "a".into(),
            value: serde_json::to_vec(&old).expect("encode"),
        });
    }
    store.stage_delete(Kind::Evidence, "j/1/n1".into());
    assert_eq!(lock(&store.pending).len(), 2, "one write per record");
    store.commit().await.expect("commit");
    drop(store);
    let store = Store::open(dir.path()).expect("reopen");
    let nodes = store.load_nodes().expect("load");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].hostname, "h99", "the last version");
}

#[tokio::test]
async fn a_failed_commit_restages_one_write_per_record_and_keeps_newer_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Sqlite::open(dir.path()).expect("open");
    let (mut a1, mut a2) = (record("a"), record("a"));
    a1.hostname = "first".into();
    a2.hostname = "second".into();
    let put = |r: &crate::node::NodeRecord| Put {
        kind: Kind::Node,
        key: r.name.clone(),
        value: serde_json::to_vec(r).expect("encode"),
    };
    store.stage(put(&a1));
    store.stage(put(&record("b")));
    let inner = lock(&store.inner).take();
    store.commit().await.expect_err("nothing to write to");
    *lock(&store.inner) = inner;
    // Staged after the failure: a newer `a` wins over the restaged one.
    store.stage(put(&a2));
    assert_eq!(lock(&store.pending).len(), 2);
    assert!(store.recover().expect("reopened"));
    store.commit().await.expect("commit");
    drop(store);
    let store = Store::open(dir.path()).expect("whole");
    let nodes = store.load_nodes().expect("load");
    let names: Vec<(&str, &str)> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.hostname.as_str()))
        .collect();
    assert_eq!(names, [("a", "second"), ("b", "h")]);
}

#[tokio::test]
async fn recover_keeps_the_valid_evidence_of_a_damaged_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        store.put_node(&record("gpu-001")).expect("put");
        store
            .put_evidence("j-1", 1, &evidence("n1", "a"))
            .expect("put");
        store
            .put_evidence("j-1", 1, &evidence("n2", "b"))
            .expect("put");
        store.flush().await.expect("commit");
    }
    let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
    conn.execute_batch(
        "UPDATE records SET crc = crc + 1 WHERE kind = 'nodes'; \
         UPDATE evidence SET crc = crc + 1 WHERE key LIKE '%/n2'",
    )
    .expect("tamper");
    drop(conn);
    super::tests::unseal(dir.path());
    let store = Store::open_recover(dir.path()).expect("recovered");
    assert!(store.recovered().is_some());
    let kept = store.evidence_reader().of_job("j-1").await.expect("read");
    assert_eq!(
        shown(&kept),
        ["1/n1=a"],
        "the valid one kept, the rotten one lost"
    );
}
