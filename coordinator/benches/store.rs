//! The state store's commit, on this machine's disk: what one engine turn waits for before it
//! answers (group commit, docs/architecture.md), and what a start costs to check every record.
//!
//! Run: `cargo bench -p vigil-coordinator --bench store`
//! (results and what they mean: docs/microbenchmarks.md, "State store").
//!
//! Each commit is durable when it returns (SQLite: WAL, synchronous=FULL: one fsync; sled: a
//! transaction and a flush), so these numbers are mostly the disk's fsync.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use vigil_coordinator::node::{Cordon, CordonSource, NodeEvent, NodeRecord};
use vigil_coordinator::store::Store;
use vigil_coordinator::store::sled::Sled;

fn record(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        hostname: name.into(),
        address: "10.0.0.1".into(),
        agent_version: "0.1.0".into(),
        simulated: true,
        gpus: Vec::new(),
        cordon: Some(Cordon {
            reason: "bad fan".into(),
            source: CordonSource::Operator,
            since_unix_ms: 42,
        }),
        first_registered_unix_ms: 1,
        last_registered_unix_ms: 2,
        last_diagnostics: None,
        burn_in: None,
        remediation: None,
        machine_id: format!("machine-{name}"),
        boot_id: "boot-1".into(),
        fabric_ports: Vec::new(),
    }
}

fn event(i: u64) -> NodeEvent {
    NodeEvent {
        at_unix_ms: i,
        kind: "xid".into(),
        message: format!("XID 79 on GPU 3 (fallen off the bus), event {i}"),
        gpu_index: Some(3),
    }
}

/// One turn's writes: `nodes` node records and one event each.
fn stage(store: &Store, nodes: usize, round: u64) {
    for i in 0..nodes {
        let name = format!("gpu-{i:05}");
        let mut r = record(&name);
        r.last_registered_unix_ms = round;
        store.put_node(&r).expect("stage");
        store.put_event(&name, &event(round)).expect("stage");
    }
}

fn bench_commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("store_commit");
    for (engine, batch) in [("sqlite", 1), ("sqlite", 100), ("sled", 1), ("sled", 100)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = match engine {
            "sqlite" => Store::open(dir.path()).expect("open"),
            _ => Store::new(Box::new(Sled::open(dir.path()).expect("open"))),
        };
        let mut round = 0;
        g.bench_function(format!("{engine}_{batch}_nodes_and_events"), |b| {
            b.iter(|| {
                round += 1;
                stage(&store, batch, round);
                rt.block_on(store.commit()).expect("commit");
            });
        });
    }
    g.finish();
}

/// Opening (so checking the seal and every record) a store of 10,000 nodes with 100 events
/// each, then closing it cleanly (sealing it): what a restart adds.
fn bench_open(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        for round in 0..100 {
            stage(&store, 10_000, round);
            rt.block_on(store.commit()).expect("commit");
        }
    }
    let bytes = std::fs::metadata(dir.path().join("state.sqlite")).map_or(0, |m| m.len());
    println!("store of 10,000 nodes and 1,000,000 events: {bytes} bytes");
    let mut g = c.benchmark_group("store_open");
    g.sample_size(10);
    g.bench_function("sqlite_open_check_close_seal_10k_nodes_1m_events", |b| {
        b.iter(|| {
            let store = Store::open(dir.path()).expect("open");
            assert_eq!(store.load_nodes().expect("load").len(), 10_000);
        });
    });
    g.finish();
}

fn criterion() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = store;
    config = criterion();
    targets = bench_commit, bench_open
}
criterion_main!(store);
