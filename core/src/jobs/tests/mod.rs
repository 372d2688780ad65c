//! The job state machine, transition by transition, with simulated time. Every scenario drives
//! the core the way the engine does, and only that way: inputs through `step`, time through
//! `tick`.
//!
//! The fixtures are here; the scenarios, by theme: `lifecycle` (a job's start, failures,
//! restarts and end), `clocks` (time no job loses: a coordinator's stall or failover, a
//! wall-clock step), `commands` (starts and stops re-sent until an agent confirms them).

use std::time::Duration;

use vigil_proto::v1;

use crate::config::{HealthConfig, LivenessConfig};
use crate::job::{Job, JobPhase, WorkerPhase};
use crate::node::GpuRecord;
use crate::state::{ClusterState, Effect, Now, Registration, StateError};
use crate::step::{Answer, Input};
use crate::test_utils::{agent_event, heartbeat, starts, step_ok, step_raw, stops, tick_at};

mod clocks;
mod commands;
mod evidence;
mod fabric;
mod lifecycle;

fn t0() -> Now {
    Now {
        mono: crate::time::Instant::ZERO,
        wall_ms: 1_700_000_000_000,
    }
}

fn at(start: Now, secs: f64) -> Now {
    start.after(Duration::from_secs_f64(secs))
}

/// `millis` after `start` on both clocks (exact, for timelines).
fn at_ms(start: Now, millis: u64) -> Now {
    start.after(Duration::from_millis(millis))
}

/// `secs` after `start` on the monotonic clock, with the wall clock stepped by `wall_step_ms`.
fn stepped(start: Now, secs: f64, wall_step_ms: i64) -> Now {
    let normal = at(start, secs);
    Now {
        mono: normal.mono,
        wall_ms: normal.wall_ms.saturating_add_signed(wall_step_ms),
    }
}

const HOUR_MS: i64 = 3_600_000;

fn reg(node: &str, session: u64, workers: Vec<v1::WorkerInfo>) -> Registration {
    Registration {
        identity: crate::identity::HostIdentity {
            machine_id: format!("machine-{node}"),
            boot_id: "boot-1".into(),
        },
        session,
        node: node.to_owned(),
        hostname: node.to_owned(),
        address: format!("10.0.0.{}", node.trim_start_matches("n")),
        agent_version: "0.1.0".into(),
        simulated: true,
        gpus: (0..8)
            .map(|i| GpuRecord {
                index: i,
                uuid: format!("GPU-{node}-{i}"),
                name: "sim".into(),
                pci_bus_id: String::new(),
                memory_total_bytes: 80 << 30,
                serial: String::new(),
            })
            .collect(),
        workers,
        fabric: Vec::new(),
    }
}

/// Nodes that never go silent for long enough to be Unreachable or Lost in these scenarios
/// (most send no heartbeats between steps): the restart mechanics, not liveness.
fn patient() -> LivenessConfig {
    LivenessConfig {
        unreachable_after: Duration::from_secs(3600),
        lost_after: Duration::from_secs(7200),
        ..LivenessConfig::default()
    }
}

fn cluster(nodes: u32, now: Now) -> ClusterState {
    cluster_with(nodes, now, patient())
}

fn cluster_with(nodes: u32, now: Now, liveness: LivenessConfig) -> ClusterState {
    let mut s = ClusterState::load(
        Vec::new(),
        Vec::new(),
        liveness,
        HealthConfig::default(),
        now,
    );
    // These tests pin the restart mechanics; triage_tests covers triage.
    s.triage.enabled = false;
    for i in 1..=nodes {
        let node = format!("n{i}");
        step_ok(
            &mut s,
            Input::Register(reg(&node, u64::from(i), Vec::new())),
            now,
        );
    }
    s
}

fn spec(nodes: u32, spares: u32) -> String {
    format!(
        r#"name = "train"
nodes = {nodes}
gpus_per_node = 8
command = ["python3", "train.py"]
workdir = "/shared/runs/train"
spare_nodes = {spares}
[checkpoint]
dir = "/shared/ckpt/train"
[restart]
max_restarts = 2
backoff = "5s"
stop_grace = "3s"
[progress]
hang_timeout = "60s"
"#
    )
}

/// The `StopWorkers` among `effects`, with their nodes.
fn stop_commands(effects: &[Effect]) -> Vec<(String, v1::StopWorkers)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Command {
                node,
                kind: v1::command::Kind::StopWorkers(w),
            } => Some((node.clone(), w.clone())),
            _ => None,
        })
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn event(kind: v1::agent_event::Kind) -> v1::AgentEvent {
    v1::AgentEvent {
        at_unix_ms: 0,
        kind: Some(kind),
    }
}

fn started(job: &str, attempt: u64, pid: u32) -> v1::AgentEvent {
    event(v1::agent_event::Kind::WorkerStarted(v1::WorkerStarted {
        job_id: job.into(),
        attempt,
        pid,
        log_path: String::new(),
    }))
}

fn exited(job: &str, attempt: u64, code: Option<i32>, stopped: bool) -> v1::AgentEvent {
    event(v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
        job_id: job.into(),
        attempt,
        exit_code: code,
        stopped,
        ..Default::default()
    }))
}

fn checkpoint(job: &str, attempt: u64, path: &str, step: u64) -> v1::AgentEvent {
    event(v1::agent_event::Kind::Checkpoint(v1::CheckpointSeen {
        job_id: job.into(),
        attempt,
        path: path.into(),
        step: Some(step),
        save_ms: None,
        completed_at_unix_ms: None,
    }))
}

/// A heartbeat reporting `workers` as (job, attempt, rank, progress step).
fn beat(workers: &[(&str, u64, u32, Option<u64>)]) -> v1::Heartbeat {
    v1::Heartbeat {
        workers: workers
            .iter()
            .map(|&(job, attempt, rank, step)| v1::WorkerInfo {
                job_id: job.into(),
                attempt,
                node_rank: rank,
                pid: 42 + rank,
                progress_step: step,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// An agent event from `node`'s live session, through `step`.
fn from(s: &mut ClusterState, node: &str, ev: v1::AgentEvent, now: Now) -> Vec<Effect> {
    agent_event(s, node, ev, now)
}

/// A tick; a relaunch's checkpoint scan it sends is answered at once with "nothing newer"
/// (its own scenarios are in `resume_scan_tests`), so the workers' starts are among its effects.
fn tick(s: &mut ClusterState, now: Now) -> Vec<Effect> {
    let effects = tick_at(s, now);
    crate::test_utils::with_scans_answered(s, effects, now)
}

/// Confirm the stop on every node that was asked to stop.
fn confirm_stops(s: &mut ClusterState, job: &str, effects: &[Effect], now: Now) -> Vec<Effect> {
    let attempt = s.jobs[job].attempt;
    let mut nodes = sorted(stops(effects));
    nodes.dedup();
    let mut out = Vec::new();
    for node in nodes {
        out.extend(from(s, &node, exited(job, attempt, None, true), now));
    }
    out
}

fn phase(s: &ClusterState, job: &str) -> JobPhase {
    s.jobs[job].phase
}

/// The id an `Answer::Submitted` among `effects` names.
fn submitted(effects: &[Effect]) -> String {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Answer(Answer::Submitted { id }) => Some(id.clone()),
            _ => None,
        })
        .expect("the submission is answered with its id")
}

fn submit(s: &mut ClusterState, text: &str, now: Now) -> (String, Vec<Effect>) {
    let effects = step_ok(
        s,
        Input::SubmitJob {
            spec_toml: text.to_owned(),
            source: "job.toml".into(),
        },
        now,
    );
    (submitted(&effects), effects)
}

fn cancel(s: &mut ClusterState, id: &str, now: Now) -> Vec<Effect> {
    step_raw(s, Input::CancelJob { id: id.to_owned() }, now)
}
