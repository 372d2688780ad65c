//! The job state machine, transition by transition, with simulated time. Every scenario drives
//! the core the way the engine does, and only that way: inputs through `step`, time through
//! `tick`.

use std::time::Duration;

use super::*;
use crate::config::{HealthConfig, LivenessConfig};
use crate::node::GpuRecord;
use crate::state::Registration;
use crate::step::{Answer, Input};
use crate::test_utils::{agent_event, heartbeat, starts, step_ok, step_raw, stops, tick_at};

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

fn tick(s: &mut ClusterState, now: Now) -> Vec<Effect> {
    tick_at(s, now)
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

#[test]
fn a_job_starts_on_exactly_its_gang_with_the_launcher_environment() {
    let now = t0();
    let mut s = cluster(3, now);
    let (id, effects) = submit(&mut s, &spec(2, 1), now);
    assert_eq!(id, "train-1");
    assert_eq!(phase(&s, &id), JobPhase::Running);
    let started = starts(&effects);
    assert_eq!(
        started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n2"],
        "the starts come in the submission's own effects"
    );
    // The scheduler's one pass per step starts the job; it claims its spares on its next pass
    // (the next step or tick, here at the same instant), before any later job is placed.
    let (other, _) = submit(&mut s, &spec(1, 0), now);
    assert_eq!(
        s.jobs[&id].spares,
        ["n3"],
        "the third node is held as a spare"
    );
    assert_eq!(phase(&s, &other), JobPhase::Pending, "n3 is not free");
    let (_, w) = &started[1];
    assert_eq!((w.attempt, w.node_rank, w.nnodes), (1, 1, 2));
    let env = &w.env;
    for (k, v) in [
        ("VIGIL_JOB_ID", "train-1"),
        ("VIGIL_ATTEMPT", "1"),
        ("VIGIL_NNODES", "2"),
        ("VIGIL_NODE_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("NODE_RANK", "1"),
        ("GROUP_RANK", "1"),
        ("PET_NNODES", "2"),
        ("PET_NODE_RANK", "1"),
        ("PET_MASTER_ADDR", "10.0.0.1"),
        ("PET_MASTER_PORT", "29500"),
        ("PET_NPROC_PER_NODE", "8"),
        ("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7"),
    ] {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(!env.contains_key("VIGIL_RESUME_FROM"), "fresh start");
    assert_eq!(
        started[0].1.checkpoint_dir, "/shared/ckpt/train",
        "rank 0 watches checkpoints"
    );
    assert!(started[1].1.checkpoint_dir.is_empty());
    assert!(effects.iter().any(|e| matches!(e, Effect::PersistJob(_))));
}

#[test]
fn a_job_waits_pending_until_enough_nodes_exist() {
    let now = t0();
    let mut s = cluster(1, now);
    step_ok(&mut s, Input::Register(reg("n2", 2, Vec::new())), now);
    step_ok(
        &mut s,
        Input::Cordon {
            node: "n2".into(),
            reason: "maintenance".into(),
        },
        now,
    );
    let (id, effects) = submit(&mut s, &spec(2, 0), now);
    assert_eq!(phase(&s, &id), JobPhase::Pending);
    assert!(starts(&effects).is_empty());
    assert!(
        s.jobs[&id].reason.contains("waiting for 2 eligible nodes"),
        "{}",
        s.jobs[&id].reason
    );
    let effects = step_ok(
        &mut s,
        Input::Uncordon {
            node: "n2".into(),
            force: false,
        },
        at(now, 1.0),
    );
    assert_eq!(starts(&effects).len(), 2);
    assert_eq!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn two_jobs_never_share_a_node() {
    let now = t0();
    let mut s = cluster(3, now);
    let (a, _) = submit(&mut s, &spec(2, 0), now);
    let (b, _) = submit(&mut s, &spec(2, 0), now);
    assert_eq!(phase(&s, &a), JobPhase::Running);
    assert_eq!(phase(&s, &b), JobPhase::Pending);
}

#[test]
fn a_crash_restarts_the_whole_gang_from_the_last_complete_checkpoint() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    from(
        &mut s,
        "n1",
        checkpoint(&id, 1, "/shared/ckpt/train/step_00000200", 200),
        at(now, 10.0),
    );
    // Reports a checkpoint from rank 1, outside the dir, or of another attempt: ignored.
    from(
        &mut s,
        "n2",
        checkpoint(&id, 1, "/shared/ckpt/train/step_00000300", 300),
        at(now, 11.0),
    );
    from(
        &mut s,
        "n1",
        checkpoint(&id, 1, "/tmp/step_00000400", 400),
        at(now, 11.0),
    );
    from(
        &mut s,
        "n1",
        checkpoint(&id, 7, "/shared/ckpt/train/step_00000500", 500),
        at(now, 11.0),
    );
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(200)
    );

    let crash = at(now, 20.0);
    let effects = from(&mut s, "n2", exited(&id, 1, Some(3), false), crash);
    assert_eq!(phase(&s, &id), JobPhase::Stopping);
    // n2's stop (its worker already exited: it confirms the node is clean) comes from the
    // transition, n1's from `commands`: every node of the gang, in the same step.
    assert_eq!(
        sorted(stops(&effects)),
        ["n1", "n2"],
        "every node of the gang is stopped"
    );
    assert!(
        starts(&effects).is_empty(),
        "nothing starts before the old attempt is dead"
    );
    assert!(
        s.jobs[&id]
            .reason
            .contains("n2 (rank 1) exited with code 3"),
        "{}",
        s.jobs[&id].reason
    );
    assert_eq!(s.jobs[&id].attempts[0].culprit_node, "n2");

    // n2's worker reported its own exit (its process group is dead); n1's is confirmed now.
    let e1 = from(&mut s, "n1", exited(&id, 1, None, true), at(now, 21.5));
    assert!(starts(&e1).is_empty());
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    assert!(
        starts(&tick(&mut s, at(now, 25.0))).is_empty(),
        "backoff is 5s"
    );

    let effects = tick(&mut s, at(now, 26.5));
    let started = starts(&effects);
    assert_eq!(started.len(), 2);
    assert_eq!(started[0].0, "n1", "a crash blames no node: same nodes");
    assert_eq!(started[0].1.attempt, 2);
    assert_eq!(
        started[0]
            .1
            .env
            .get("VIGIL_RESUME_FROM")
            .map(String::as_str),
        Some("/shared/ckpt/train/step_00000200")
    );
    let job = &s.jobs[&id];
    assert_eq!((job.restarts, job.attempt), (1, 2));
    assert_eq!(job.lost_ms, 6_500, "from the failure to the relaunch");
    assert_eq!(
        job.attempts[1].resumed_from.as_ref().and_then(|c| c.step),
        Some(200)
    );
    // Late reports of attempt 1 are fenced off.
    from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 27.0));
    assert_eq!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn an_xid_cordons_the_node_and_the_job_moves_to_the_spare() {
    let now = t0();
    let mut s = cluster(3, now);
    let (id, _) = submit(&mut s, &spec(2, 1), now);
    let xid = event(v1::agent_event::Kind::Xid(v1::XidError {
        gpu_index: 3,
        xid: 79,
        gpu_uuid: String::new(),
    }));
    let effects = from(&mut s, "n1", xid, at(now, 5.0));
    assert!(s.nodes["n1"].cordoned(), "the culprit is cordoned");
    assert!(
        !s.nodes["n2"].cordoned() && !s.nodes["n3"].cordoned(),
        "its gang mates are not"
    );
    assert_eq!(stops(&effects), ["n1", "n2"]);
    assert_eq!(s.jobs[&id].attempts[0].culprit_node, "n1");
    let effects = confirm_stops(&mut s, &id, &effects, at(now, 6.0));
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    assert!(starts(&effects).is_empty());
    let effects = tick(&mut s, at(now, 11.0));
    let nodes: Vec<String> = starts(&effects).into_iter().map(|(n, _)| n).collect();
    assert_eq!(nodes, ["n2", "n3"], "the spare replaces the cordoned node");
    assert!(s.jobs[&id].spares.is_empty(), "no spare left");
}

#[test]
fn a_lost_node_fails_the_attempt_and_counts_as_stopped() {
    let now = t0();
    let mut s = cluster_with(3, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(2, 1), now);
    let effects = step_ok(
        &mut s,
        Input::Disconnected {
            node: "n2".into(),
            session: 2,
        },
        at(now, 1.0),
    );
    assert_eq!(
        phase(&s, &id),
        JobPhase::Running,
        "Unreachable is not Lost: its workers may still run"
    );
    assert!(stops(&effects).is_empty());
    // Keep n1 and n3 alive.
    for t in [5.0, 9.0] {
        for n in ["n1", "n3"] {
            heartbeat(&mut s, n, v1::Heartbeat::default(), at(now, t));
        }
    }
    let effects = tick(&mut s, at(now, 11.0));
    assert_eq!(s.jobs[&id].workers["n2"].phase, WorkerPhase::Lost);
    assert_eq!(stops(&effects), ["n1"], "no command to the lost node");
    assert!(
        s.jobs[&id].reason.contains("node n2 lost"),
        "{}",
        s.jobs[&id].reason
    );
    confirm_stops(&mut s, &id, &effects, at(now, 11.5));
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    for n in ["n1", "n3"] {
        heartbeat(&mut s, n, v1::Heartbeat::default(), at(now, 16.0));
    }
    let started = starts(&tick(&mut s, at(now, 17.0)));
    assert_eq!(
        started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n3"]
    );
}

#[test]
fn an_unreachable_node_holds_the_restart_until_it_is_lost() {
    let now = t0();
    let mut s = cluster_with(2, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    step_ok(
        &mut s,
        Input::Disconnected {
            node: "n2".into(),
            session: 2,
        },
        at(now, 1.0),
    );
    let effects = from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 2.0));
    assert_eq!(
        stops(&effects),
        ["n1"],
        "n2 misses its stop: it is not connected (it is sent one when it reconnects)"
    );
    assert_eq!(s.jobs[&id].workers["n2"].phase, WorkerPhase::Stopping);
    from(&mut s, "n1", exited(&id, 1, None, true), at(now, 2.5));
    assert_eq!(
        phase(&s, &id),
        JobPhase::Stopping,
        "n2's worker may still run: wait"
    );
    heartbeat(&mut s, "n1", v1::Heartbeat::default(), at(now, 9.0));
    let effects = tick(&mut s, at(now, 9.5));
    assert!(
        stops(&effects).is_empty(),
        "still no one to send n2's stop to"
    );
    assert_eq!(phase(&s, &id), JobPhase::Stopping);
    tick(&mut s, at(now, 10.0));
    assert_eq!(
        phase(&s, &id),
        JobPhase::Restarting,
        "Lost: the lease has expired"
    );
}

#[test]
fn no_progress_for_hang_timeout_restarts_the_job() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    for (t, step) in [(10.0, 5), (30.0, 9), (50.0, 9), (89.0, 9)] {
        heartbeat(&mut s, "n1", beat(&[(&id, 1, 0, Some(step))]), at(now, t));
        assert!(tick(&mut s, at(now, t)).is_empty(), "at {t}s");
        assert_eq!(phase(&s, &id), JobPhase::Running, "at {t}s");
    }
    let effects = tick(&mut s, at(now, 90.5));
    assert_eq!(stops(&effects), ["n1"]);
    assert!(
        s.jobs[&id].reason.contains("no progress from n1"),
        "{}",
        s.jobs[&id].reason
    );
    assert!(
        s.jobs[&id].reason.contains("last step 9"),
        "{}",
        s.jobs[&id].reason
    );
}

#[test]
fn max_restarts_exhausted_fails_the_job_with_the_reason() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    let mut t = 0.0;
    for attempt in 1..=3 {
        t += 10.0;
        assert_eq!(s.jobs[&id].attempt, attempt);
        let effects = from(
            &mut s,
            "n1",
            exited(&id, attempt, Some(2), false),
            at(now, t),
        );
        confirm_stops(&mut s, &id, &effects, at(now, t + 0.1));
        tick(&mut s, at(now, t + 6.0));
    }
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Failed);
    assert_eq!(job.attempt, 3);
    assert!(
        job.reason
            .contains("gave up after 2 restarts (max_restarts = 2)"),
        "{}",
        job.reason
    );
    assert!(job.reason.contains("exited with code 2"), "{}", job.reason);
    assert!(job.placement.is_empty(), "nodes released");
}

#[test]
fn all_workers_exiting_zero_succeeds() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    from(&mut s, "n1", exited(&id, 1, Some(0), false), at(now, 5.0));
    assert_eq!(phase(&s, &id), JobPhase::Running, "rank 1 still runs");
    from(&mut s, "n2", exited(&id, 1, Some(0), false), at(now, 5.1));
    assert_eq!(phase(&s, &id), JobPhase::Succeeded);
    let (other, _) = submit(&mut s, &spec(2, 0), at(now, 6.0));
    assert_eq!(
        phase(&s, &other),
        JobPhase::Running,
        "the nodes are free again"
    );
}

#[test]
fn cancel_stops_every_worker_then_cancels() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let (p, _) = submit(&mut s, &spec(2, 0), now);
    assert_eq!(phase(&s, &p), JobPhase::Pending);
    let effects = cancel(&mut s, &p, now);
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Refused(_))),
        "{effects:?}"
    );
    assert_eq!(
        phase(&s, &p),
        JobPhase::Cancelled,
        "a pending job cancels at once"
    );
    let effects = cancel(&mut s, &id, at(now, 1.0));
    assert_eq!(stops(&effects), ["n1", "n2"]);
    assert_eq!(s.jobs[&id].phase_name(), "Cancelling");
    confirm_stops(&mut s, &id, &effects, at(now, 2.0));
    assert_eq!(phase(&s, &id), JobPhase::Cancelled);
    assert!(tick(&mut s, at(now, 100.0)).is_empty(), "never restarted");
    assert_eq!(phase(&s, &id), JobPhase::Cancelled);
    assert!(matches!(
        cancel(&mut s, "nope", at(now, 100.0)).as_slice(),
        [Effect::Refused(StateError::UnknownJob(_))]
    ));
}

#[test]
fn a_restarted_coordinator_adopts_running_workers() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let jobs: Vec<Job> = s.jobs.values().cloned().collect();
    let records = s.nodes.values().map(|n| (*n.record).clone()).collect();
    let later = at(now, 30.0);
    let mut s = ClusterState::load(
        records,
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        later,
    )
    .with_jobs(jobs);
    s.rearm_clocks(later);
    let worker = |rank| v1::WorkerInfo {
        job_id: id.clone(),
        attempt: 1,
        node_rank: rank,
        pid: 100 + rank,
        ..Default::default()
    };
    for (i, n) in ["n1", "n2"].into_iter().enumerate() {
        let rank = u32::try_from(i).unwrap_or(0);
        let effects = step_ok(
            &mut s,
            Input::Register(reg(n, 10 + u64::from(rank), vec![worker(rank)])),
            later,
        );
        assert!(
            starts(&effects).is_empty() && stops(&effects).is_empty(),
            "{effects:#?}"
        );
    }
    let job = &s.jobs[&id];
    assert_eq!(
        (job.phase, job.attempt),
        (JobPhase::Running, 1),
        "not restarted"
    );
    assert_eq!(job.workers["n2"].pid, 101);
}

#[test]
fn a_worker_of_a_stale_attempt_is_stopped_and_a_missing_one_fails_the_attempt() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let stale = v1::WorkerInfo {
        job_id: id.clone(),
        attempt: 0,
        node_rank: 0,
        pid: 7,
        ..Default::default()
    };
    let effects = step_ok(
        &mut s,
        Input::Register(reg("n1", 11, vec![stale])),
        at(now, 1.0),
    );
    assert!(
        stop_commands(&effects)
            .iter()
            .any(|(n, w)| n == "n1" && w.job_id == id && w.attempt == 0),
        "the stale worker is stopped: {effects:#?}"
    );
    assert_eq!(
        phase(&s, &id),
        JobPhase::Stopping,
        "and n1 came back without attempt 1's worker"
    );
    assert!(
        s.jobs[&id].reason.contains("worker on n1 is gone"),
        "{}",
        s.jobs[&id].reason
    );
}

#[test]
fn an_operator_cordon_does_not_kill_a_running_job() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let effects = step_ok(
        &mut s,
        Input::Cordon {
            node: "n2".into(),
            reason: "drain later".into(),
        },
        now,
    );
    assert!(s.nodes["n2"].cordoned());
    assert!(stops(&effects).is_empty());
    assert_eq!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn invalid_specs_are_refused_with_the_field() {
    let now = t0();
    let mut s = cluster(1, now);
    let effects = step_raw(
        &mut s,
        Input::SubmitJob {
            spec_toml: spec(2, 0),
            source: "job.toml".into(),
        },
        now,
    );
    let [Effect::Refused(err)] = effects.as_slice() else {
        panic!("too many nodes: refused, and nothing else: {effects:#?}");
    };
    assert!(matches!(err, StateError::InvalidSpec(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("nodes = 2 but the cluster has only 1"),
        "{err}"
    );
    assert!(s.jobs.is_empty());
}

#[test]
fn drain_cordons_and_restarts_the_job_elsewhere_without_blame() {
    let now = t0();
    let mut s = cluster(3, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let effects = step_ok(
        &mut s,
        Input::Drain {
            node: "n2".into(),
            reason: "kernel upgrade".into(),
        },
        at(now, 1.0),
    );
    let jobs = effects
        .iter()
        .find_map(|e| match e {
            Effect::Answer(Answer::Drained { jobs }) => Some(jobs.clone()),
            _ => None,
        })
        .expect("the drain is answered with the jobs it restarts");
    assert_eq!(jobs, std::slice::from_ref(&id));
    assert!(s.nodes["n2"].cordoned());
    assert_eq!(stops(&effects), ["n1", "n2"]);
    assert_eq!(
        s.jobs[&id].attempts[0].culprit_node, "",
        "a drain blames no node"
    );
    confirm_stops(&mut s, &id, &effects, at(now, 2.0));
    let started = starts(&tick(&mut s, at(now, 8.0)));
    assert_eq!(
        started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n3"]
    );
}

#[test]
fn a_coordinator_stall_counts_as_neither_silence_nor_a_hang() {
    let now = t0();
    let mut s = cluster_with(2, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    for (n, rank) in [("n1", 0), ("n2", 1)] {
        heartbeat(
            &mut s,
            n,
            beat(&[("train-1", 1, rank, Some(5))]),
            at(now, 1.0),
        );
    }
    // The coordinator is stopped for 70 s: past lost_after (10 s) and hang_timeout (60 s).
    let woke = at(now, 71.0);
    let mut unforgiven = s.clone();
    tick(&mut unforgiven, woke);
    assert_ne!(
        phase(&unforgiven, &id),
        JobPhase::Running,
        "without it, the job fails"
    );

    let mut effects = step_ok(
        &mut s,
        Input::Stalled {
            gap: Duration::from_secs(70),
        },
        woke,
    );
    effects.extend(tick(&mut s, woke));
    assert!(stops(&effects).is_empty(), "{effects:?}");
    assert_eq!(phase(&s, &id), JobPhase::Running);
    assert!(
        s.nodes
            .values()
            .all(|n| n.availability == crate::node::Availability::Ready)
    );
    // Silence after the stall still counts: lost_after later, the nodes are Lost.
    tick(&mut s, at(now, 82.0));
    assert_ne!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn a_new_coordinator_watches_progress_from_when_it_starts() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    heartbeat(
        &mut s,
        "n1",
        beat(&[("train-1", 1, 0, Some(5))]),
        at(now, 1.0),
    );
    // The state as another coordinator loads it 70 s later (past hang_timeout, 60 s):
    // nobody watched in between, so the worker is not hung yet.
    let loaded = at(now, 71.0);
    let mut taken_over = s.clone();
    taken_over.rearm_clocks(loaded);
    assert!(tick(&mut taken_over, loaded).is_empty());
    assert_eq!(phase(&taken_over, &id), JobPhase::Running);
    let effects = tick(&mut s, loaded);
    assert_eq!(stops(&effects), ["n1"], "without it, the job is hung");
    assert_eq!(phase(&s, &id), JobPhase::Stopping);
    // Silence after the takeover still counts.
    let effects = tick(&mut taken_over, at(now, 132.0));
    assert_eq!(stops(&effects), ["n1"]);
    assert_eq!(phase(&taken_over, &id), JobPhase::Stopping);
}

/// No Unreachable or Lost node, no stop, no failure among `effects`.
fn assert_undisturbed(effects: &[Effect], when: &str) {
    assert!(stops(effects).is_empty(), "{when}: {effects:#?}");
    assert!(
        !effects.iter().any(|e| matches!(
            e,
            Effect::Availability {
                to: crate::node::Availability::Unreachable | crate::node::Availability::Lost,
                ..
            } | Effect::JobLog { warn: true, .. }
        )),
        "{when}: {effects:#?}"
    );
}

#[test]
fn a_wall_clock_step_changes_no_decision() {
    let now = t0();
    let mut s = cluster_with(1, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    // Steady heartbeats with steady progress, each followed half a second later by a tick.
    // The wall clock steps +1 h at 29.5 s and back -1 h at 80.5 s; the monotonic clock
    // runs on. Each step comes right before a tick, with the last progress on the other side.
    let wall = |secs: f64| {
        if (29.5..80.5).contains(&secs) {
            HOUR_MS
        } else {
            0
        }
    };
    for second in 1..=150_u32 {
        let t = f64::from(second);
        let hb = stepped(now, t, wall(t));
        let e = heartbeat(
            &mut s,
            "n1",
            beat(&[(&id, 1, 0, Some(u64::from(second)))]),
            hb,
        );
        assert_undisturbed(&e, &format!("heartbeat at {t}s"));
        let e = tick(&mut s, stepped(now, t + 0.5, wall(t + 0.5)));
        assert_undisturbed(&e, &format!("tick at {t}.5s"));
        assert_eq!(
            s.nodes["n1"].availability,
            crate::node::Availability::Ready,
            "at {t}.5s"
        );
        let job = &s.jobs[&id];
        assert_eq!(
            (job.phase, job.attempt),
            (JobPhase::Running, 1),
            "at {t}.5s"
        );
    }
    // And a silence of 20 s of wall time but 2 s on the monotonic clock is no silence; one of
    // 2 s of wall time but 70 s on the monotonic clock is a hang and a lost node.
    let e = tick(&mut s, stepped(now, 152.0, 20_000 - 2_000));
    assert_undisturbed(&e, "wall +20 s, mono +2 s");
    tick(&mut s, stepped(now, 220.0, 2_000 - 70_000));
    assert_eq!(s.nodes["n1"].availability, crate::node::Availability::Lost);
    assert_ne!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn a_wall_clock_step_neither_shortens_nor_lengthens_a_restart_backoff() {
    let now = t0();
    let mut s = cluster_with(1, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    heartbeat(&mut s, "n1", beat(&[(&id, 1, 0, Some(1))]), at(now, 1.0));
    // The worker crashes at 10 s: the attempt is dead at once (one node), backoff 5 s.
    from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 10.0));
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    // Heartbeats keep n1 Ready; the wall clock steps +1 h while the monotonic one moves 1 s.
    let timeline = [
        (11.0, HOUR_MS, false),
        (12.0, HOUR_MS, false),
        // Then it steps back -1 h below where it was: still before the backoff ends.
        (13.0, -HOUR_MS, false),
        (14.9, -HOUR_MS, false),
        // The backoff ended on the monotonic clock, though the wall says 1 h earlier.
        (15.5, -HOUR_MS, true),
    ];
    for (t, step, starts_now) in timeline {
        let e = heartbeat(
            &mut s,
            "n1",
            v1::Heartbeat::default(),
            stepped(now, t, step),
        );
        let mut all = e;
        all.extend(tick(&mut s, stepped(now, t, step)));
        let started = starts(&all);
        if starts_now {
            assert_eq!(started.len(), 1, "at {t}s: {all:#?}");
            assert_eq!(started[0].1.attempt, 2);
            assert_eq!(
                (phase(&s, &id), s.jobs[&id].attempt),
                (JobPhase::Running, 2)
            );
        } else {
            assert!(started.is_empty(), "at {t}s (wall {step:+} ms): {all:#?}");
            assert_eq!(
                (phase(&s, &id), s.jobs[&id].attempt),
                (JobPhase::Restarting, 1)
            );
        }
    }
}

#[test]
fn a_lost_stop_is_sent_again_with_backoff_until_the_agent_confirms_it() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    for (n, pid) in [("n1", 101), ("n2", 102)] {
        from(&mut s, n, started(&id, 1, pid), at(now, 0.5));
    }
    assert!(
        s.jobs[&id]
            .workers
            .values()
            .all(|w| w.phase == WorkerPhase::Running)
    );
    // n2's worker crashes; the stop to n1 is lost on the way (never delivered).
    let effects = from(&mut s, "n2", exited(&id, 1, Some(1), false), at(now, 10.0));
    let first: Vec<(String, u64)> = stop_commands(&effects)
        .into_iter()
        .map(|(n, w)| (n, w.attempt))
        .collect();
    assert_eq!(
        sorted(first.iter().map(|(n, _)| n.clone()).collect()),
        ["n1", "n2"]
    );
    assert!(first.iter().all(|(_, a)| *a == 1), "{first:?}");
    assert_eq!(phase(&s, &id), JobPhase::Stopping);

    // Time passes in 100 ms ticks: when does n1 get its stop again?
    let mut resent = Vec::new();
    for tenth in 101..=175_u64 {
        let when = at_ms(now, tenth * 100);
        for (node, w) in stop_commands(&tick(&mut s, when)) {
            assert_eq!(
                (node.as_str(), w.job_id.as_str(), w.attempt),
                ("n1", id.as_str(), 1),
                "only n1's stop is re-sent"
            );
            assert_eq!(w.grace_ms, 3_000);
            resent.push(tenth * 100);
        }
    }
    assert_eq!(
        resent,
        [11_000, 13_000, 17_000],
        "re-sent after 1 s, then 2 s, then 4 s"
    );
    assert_eq!(phase(&s, &id), JobPhase::Stopping, "not confirmed yet");

    // The stop arrives at last; the agent confirms it.
    let effects = from(&mut s, "n1", exited(&id, 1, None, true), at(now, 17.5));
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    assert!(stops(&effects).is_empty(), "{effects:#?}");
    for tenth in 176..=400_u64 {
        let effects = tick(&mut s, at_ms(now, tenth * 100));
        assert!(
            stops(&effects).is_empty(),
            "no stop once confirmed, at {} ms: {effects:#?}",
            tenth * 100
        );
    }
    assert_eq!(
        (phase(&s, &id), s.jobs[&id].attempt),
        (JobPhase::Running, 2)
    );
}

#[test]
fn a_start_not_yet_confirmed_is_sent_again_until_a_heartbeat_reports_the_worker() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, effects) = submit(&mut s, &spec(2, 0), now);
    let first = starts(&effects);
    assert_eq!(
        first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n2"]
    );
    let mut sent: Vec<(u64, String)> = Vec::new();
    for tenth in 1..=200_u64 {
        let when = at_ms(now, tenth * 100);
        if tenth == 35 {
            // n1's agent reports its worker: the start arrived after all.
            let e = heartbeat(&mut s, "n1", beat(&[(&id, 1, 0, None)]), when);
            assert!(starts(&e).iter().all(|(n, _)| n != "n1"), "{e:#?}");
            assert_eq!(s.jobs[&id].workers["n1"].phase, WorkerPhase::Running);
        }
        if tenth == 75 {
            let e = heartbeat(&mut s, "n2", beat(&[(&id, 1, 1, None)]), when);
            assert!(starts(&e).is_empty(), "{e:#?}");
        }
        for (node, w) in starts(&tick(&mut s, when)) {
            let original = first.iter().find(|(n, _)| *n == node).map(|(_, w)| w);
            assert_eq!(Some(&w), original, "the same command again, to {node}");
            sent.push((tenth * 100, node));
        }
    }
    let at_times = |node: &str| -> Vec<u64> {
        sent.iter()
            .filter(|(_, n)| n == node)
            .map(|(t, _)| *t)
            .collect()
    };
    assert_eq!(
        at_times("n1"),
        [1_000, 3_000],
        "re-sent after 1 s, 2 s; never once reported"
    );
    assert_eq!(
        at_times("n2"),
        [1_000, 3_000, 7_000],
        "re-sent after 1 s, 2 s, 4 s; never once reported"
    );
    assert!(
        s.jobs[&id]
            .workers
            .values()
            .all(|w| w.phase == WorkerPhase::Running)
    );
}

#[test]
fn a_node_that_reconnects_with_a_worker_of_an_old_attempt_is_sent_its_stop_until_it_is_gone() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    heartbeat(&mut s, "n1", beat(&[(&id, 1, 0, Some(1))]), at(now, 1.0));
    // Attempt 1 fails; attempt 2 starts on n1 again and runs.
    from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 2.0));
    heartbeat(&mut s, "n1", v1::Heartbeat::default(), at(now, 3.0));
    let e = tick(&mut s, at(now, 8.0));
    assert_eq!(starts(&e).len(), 1);
    assert_eq!(s.jobs[&id].attempt, 2);
    heartbeat(&mut s, "n1", beat(&[(&id, 2, 0, Some(1))]), at(now, 9.0));

    // n1's agent reconnects in a new session, reporting attempt 2's worker and one of
    // attempt 1 that survived somehow (a stop it never got).
    let both = [(id.as_str(), 1, 0, Some(1)), (id.as_str(), 2, 0, Some(2))];
    let workers = beat(&both).workers;
    let reconnect = at(now, 20.0);
    let effects = step_ok(&mut s, Input::Register(reg("n1", 11, workers)), reconnect);
    let stray = |effects: &[Effect]| -> Vec<u64> {
        stop_commands(effects)
            .into_iter()
            .map(|(n, w)| {
                assert_eq!((n.as_str(), w.job_id.as_str()), ("n1", id.as_str()));
                w.attempt
            })
            .collect()
    };
    assert_eq!(stray(&effects), [1], "the old attempt's worker is stopped");
    assert_eq!(
        (phase(&s, &id), s.jobs[&id].attempt),
        (JobPhase::Running, 2),
        "the current one is adopted"
    );

    // Reports keep showing it (every second): re-sent with backoff.
    let mut sent = Vec::new();
    for tenth in 201..=400_u64 {
        let when = at_ms(now, tenth * 100);
        let mut e = Vec::new();
        if tenth % 10 == 0 {
            let report: &[(&str, u64, u32, Option<u64>)] =
                if tenth < 300 { &both } else { &both[1..] };
            e.extend(heartbeat(&mut s, "n1", beat(report), when));
        }
        e.extend(tick(&mut s, when));
        for attempt in stray(&e) {
            assert_eq!(attempt, 1, "never a stop to the current attempt");
            sent.push(tenth * 100);
        }
    }
    assert_eq!(
        sent,
        [21_000, 23_000, 27_000],
        "1 s, 2 s, 4 s apart while reported; never again once gone (at 30 s)"
    );
    assert!(
        s.stray_stops.is_empty(),
        "forgotten once no agent reports it"
    );
    assert_eq!(
        (phase(&s, &id), s.jobs[&id].attempt),
        (JobPhase::Running, 2)
    );
}
