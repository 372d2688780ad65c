//! Micro-benchmarks of the coordinator's hot pure functions: the GPU-health
//! judgement of one heartbeat, the per-heartbeat state transition, the
//! liveness sweep the engine runs every 100 ms, and the gang scheduler.
//!
//! Run: `cargo bench -p vigil-coordinator --bench hot_paths`
//! (results and what they mean: docs/benchmarks.md, "Micro-benchmarks").
//!
//! Everything here is pure (no store, no sockets), so the numbers are the
//! engine task's CPU cost per input, without the flush or gRPC around it.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tokio::time::Instant;
use vigil_coordinator::config::{HealthConfig, LivenessConfig};
use vigil_coordinator::health::judge_samples;
use vigil_coordinator::node::GpuRecord;
use vigil_coordinator::state::{ClusterState, Effect, Now, Registration};
use vigil_proto::{heartbeat_form, v1};

/// Nodes in the "large cluster" benchmarks.
const CLUSTER_NODES: u32 = 10_000;
/// GPUs per node.
const GPUS: u32 = 8;

fn t0() -> Now {
    Now {
        mono: vigil_core::time::Instant::ZERO,
        wall_ms: 1_700_000_000_000,
    }
}

fn at(start: Now, secs: f64) -> Now {
    let d = Duration::from_secs_f64(secs);
    Now {
        mono: start.mono + d,
        wall_ms: start.wall_ms + u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    }
}

fn node_name(i: u32) -> String {
    format!("gpu-{i:05}")
}

fn gpus(node: &str) -> Vec<GpuRecord> {
    (0..GPUS)
        .map(|i| GpuRecord {
            index: i,
            uuid: format!("GPU-{node}-{i:08x}-0000-0000-000000000000"),
            name: "NVIDIA H100 80GB HBM3".into(),
            pci_bus_id: format!("00000000:{:02x}:00.0", 0x18 + i),
            memory_total_bytes: 80 << 30,
            serial: format!("16520230{i:05}"),
        })
        .collect()
}

/// A healthy H100-like sample with every field supported (18 NVLinks up).
fn healthy(index: u32) -> v1::GpuSample {
    v1::GpuSample {
        index,
        temperature_c: Some(40.0),
        power_w: Some(80.0),
        ecc_uncorrected_volatile: Some(0),
        ecc_corrected_volatile: Some(0),
        remapped_rows_pending: Some(false),
        remapped_rows_failure: Some(false),
        throttle_hw_slowdown: Some(false),
        throttle_thermal: Some(false),
        throttle_power_brake: Some(false),
        pcie_link_gen_current: Some(5),
        pcie_link_gen_max: Some(5),
        pcie_link_width_current: Some(16),
        pcie_link_width_max: Some(16),
        nvlink_supported: Some(true),
        nvlinks: (0..18)
            .map(|l| v1::NvLinkStatus {
                link: l,
                active: true,
                ..Default::default()
            })
            .collect(),
        observed_at_unix_ms: 1_700_000_000_000,
        ..Default::default()
    }
}

fn healthy_samples() -> Vec<v1::GpuSample> {
    (0..GPUS).map(healthy).collect()
}

/// GPU 3 reports uncorrected ECC errors and one NVLink down: two Unhealthy findings.
fn faulty_samples() -> Vec<v1::GpuSample> {
    let mut samples = healthy_samples();
    samples[3].ecc_uncorrected_volatile = Some(2);
    samples[3].nvlinks[7].active = false;
    samples
}

fn registration(i: u32) -> Registration {
    let node = node_name(i);
    Registration {
        identity: vigil_core::identity::HostIdentity {
            machine_id: format!("machine-{node}"),
            boot_id: "boot-1".into(),
        },
        session: u64::from(i),
        hostname: format!("{node}.example"),
        address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff),
        agent_version: "0.1.0".into(),
        simulated: false,
        gpus: gpus(&node),
        node,
        workers: Vec::new(),
        fabric: Vec::new(),
    }
}

/// `nodes` nodes registered at `now`, each Ready with 8 healthy GPUs, no jobs.
fn cluster(nodes: u32, now: Now) -> ClusterState {
    let mut s = ClusterState::load(
        Vec::new(),
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        now,
    );
    for i in 0..nodes {
        s.register(registration(i), now);
    }
    s
}

fn spec(name: &str, nodes: u32, spares: u32) -> String {
    format!(
        r#"name = "{name}"
nodes = {nodes}
gpus_per_node = 8
command = ["python3", "train.py"]
workdir = "/shared/runs/{name}"
spare_nodes = {spares}
[checkpoint]
dir = "/shared/ckpt/{name}"
[restart]
max_restarts = 2
backoff = "5s"
stop_grace = "3s"
[progress]
hang_timeout = "60s"
"#
    )
}

fn starts(effects: &[Effect]) -> usize {
    effects
        .iter()
        .filter(|e| {
            matches!(
                e,
                Effect::Command {
                    kind: v1::command::Kind::StartWorker(_),
                    ..
                }
            )
        })
        .count()
}

/// 1. `health::judge_samples` on one 8-GPU heartbeat.
fn bench_judge_samples(c: &mut Criterion) {
    let inventory = gpus(&node_name(42));
    let cfg = HealthConfig::default();
    let ok = healthy_samples();
    let bad = faulty_samples();
    assert!(judge_samples(&inventory, &ok, &cfg).is_empty());
    assert_eq!(judge_samples(&inventory, &bad, &cfg).len(), 2);
    let mut g = c.benchmark_group("judge_samples");
    g.bench_function("8_gpus_healthy", |b| {
        b.iter(|| judge_samples(black_box(&inventory), black_box(&ok), &cfg));
    });
    g.bench_function("8_gpus_one_faulty", |b| {
        b.iter(|| judge_samples(black_box(&inventory), black_box(&bad), &cfg));
    });
    g.finish();
}

/// 2. `ClusterState::heartbeat` of one Ready node in a 10,000-node cluster.
fn bench_heartbeat(c: &mut Criterion) {
    let start = t0();
    let mut s = cluster(CLUSTER_NODES, start);
    let now = at(start, 0.5);
    let name = node_name(4_242);
    let session = 4_242;
    let hb = v1::Heartbeat {
        sent_at_unix_ms: now.wall_ms,
        gpus: healthy_samples(),
        workers: Vec::new(),
        ..v1::Heartbeat::default()
    };
    let effects = s
        .heartbeat(&name, session, hb.clone(), now)
        .expect("live session");
    assert!(effects.is_empty(), "steady state: {effects:?}");
    let mut g = c.benchmark_group("state");
    // The heartbeat is moved in; cloning it is setup, not measured.
    g.bench_function("heartbeat_1_node_of_10k", |b| {
        b.iter_batched(
            || hb.clone(),
            |hb| s.heartbeat(black_box(&name), session, hb, now),
            BatchSize::SmallInput,
        );
    });
    // The same heartbeat through the core's whole interface, as the engine sends it: the
    // transition, then every policy (which a steady heartbeat, changing nothing, skips).
    let step_input = |hb: v1::Heartbeat| vigil_core::Input::Heartbeat {
        node: name.clone(),
        session,
        heartbeat: hb,
    };
    g.bench_function("step_heartbeat_1_node_of_10k", |b| {
        b.iter_batched(
            || step_input(hb.clone()),
            |input| vigil_core::step(&mut s, black_box(input), now),
            BatchSize::SmallInput,
        );
    });
    // The same heartbeat in the compact form a current agent sends between full ones: GPU
    // health unchanged, the telemetry alone.
    let compact = v1::Heartbeat {
        gpus: Vec::new(),
        gpu_health_unchanged: true,
        telemetry: hb.gpus.iter().map(heartbeat_form::telemetry).collect(),
        ..hb.clone()
    };
    g.bench_function("compact_heartbeat_1_node_of_10k", |b| {
        b.iter_batched(
            || compact.clone(),
            |hb| s.heartbeat(black_box(&name), session, hb, now),
            BatchSize::SmallInput,
        );
    });
    // As the engine runs it: a snapshot holds the node's samples, so they are copied before
    // the telemetry is merged in (the copy held is dropped outside the measurement).
    g.bench_function("compact_heartbeat_samples_shared_1_node_of_10k", |b| {
        b.iter_batched(
            || compact.clone(),
            |hb| {
                let held = s.nodes[&name].last_samples.clone();
                (s.heartbeat(black_box(&name), session, hb, now), held)
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

/// 3. `ClusterState::tick` over 10,000 Ready nodes, none due a transition.
fn bench_tick(c: &mut Criterion) {
    let start = t0();
    let mut s = cluster(CLUSTER_NODES, start);
    let now = at(start, 0.5);
    assert!(s.tick(now).is_empty());
    let mut g = c.benchmark_group("state");
    g.bench_function("tick_10k_nodes", |b| {
        b.iter(|| s.tick(black_box(now)));
    });
    // The core's whole tick: liveness, hangs, budgets, burn-in, the scheduler and every
    // command that is due (none here: no jobs).
    g.bench_function("core_tick_10k_nodes", |b| {
        b.iter(|| vigil_core::tick(&mut s, black_box(now)));
    });
    g.finish();
}

/// 4. The gang scheduler.
fn bench_scheduler(c: &mut Criterion) {
    let start = t0();
    let now = at(start, 0.5);
    let mut g = c.benchmark_group("scheduler");

    // submit_job: a 512-node job with 8 spares into an idle 10,000-node
    // cluster: parse + validate the spec, then `schedule` places it.
    // Each iteration removes the job again (untimed): placing a job only
    // changes the job, not the nodes.
    let mut s = cluster(CLUSTER_NODES, start);
    let seq = s.next_job_seq;
    let text = spec("train", 512, 8);
    let (id, effects) = s.submit_job(&text, "bench", now).expect("valid spec");
    assert_eq!(starts(&effects), 512, "the job starts at once");
    s.jobs.remove(&id);
    s.next_job_seq = seq;
    g.bench_function("submit_job_512_nodes_8_spares_into_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let began = Instant::now();
                let (id, effects) = s
                    .submit_job(black_box(&text), "bench", now)
                    .expect("valid spec");
                total += began.elapsed();
                drop(black_box(effects));
                s.jobs.remove(&id);
                s.next_job_seq = seq;
            }
            total
        });
    });

    // schedule with 50 pending jobs that cannot fit: a running 9,000-node
    // job leaves 1,000 free nodes; 50 jobs of 2,000 nodes wait. The engine
    // calls `schedule` on every tick (jobs_tick) and after every job event.
    let mut s = cluster(CLUSTER_NODES, start);
    let (_, effects) = s
        .submit_job(&spec("big", 9_000, 0), "bench", now)
        .expect("valid spec");
    assert_eq!(starts(&effects), 9_000);
    for j in 0..50 {
        let (_, effects) = s
            .submit_job(&spec(&format!("wait{j}"), 2_000, 2), "bench", now)
            .expect("valid spec");
        assert_eq!(starts(&effects), 0, "cannot fit");
    }
    assert!(s.schedule(now).is_empty(), "steady state");
    g.bench_function("schedule_50_pending_10k_nodes", |b| {
        b.iter(|| s.schedule(black_box(now)));
    });
    g.finish();
}

fn criterion() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = hot_paths;
    config = criterion();
    targets = bench_judge_samples, bench_heartbeat, bench_tick, bench_scheduler
}
criterion_main!(hot_paths);
