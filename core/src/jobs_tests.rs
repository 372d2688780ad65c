//! The job state machine, transition by transition, with simulated time.

use std::time::Duration;

use super::*;
use crate::config::{HealthConfig, LivenessConfig};
use crate::node::{CordonSource, GpuRecord};
use crate::state::Registration;

fn t0() -> Now {
    Now {
        mono: crate::time::Instant::ZERO,
        wall_ms: 1_700_000_000_000,
    }
}

fn at(start: Now, secs: f64) -> Now {
    let d = Duration::from_secs_f64(secs);
    Now {
        mono: start.mono + d,
        wall_ms: start.wall_ms + ms(d),
    }
}

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

/// What the engine does: an input's effects plus the jobs' reaction.
fn run(s: &mut ClusterState, mut effects: Vec<Effect>, now: Now) -> Vec<Effect> {
    if !effects.is_empty() {
        let more = s.react(&effects, now);
        effects.extend(more);
    }
    effects
}

fn cluster(nodes: u32, now: Now) -> ClusterState {
    let mut s = ClusterState::load(
        Vec::new(),
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        now,
    );
    // These tests pin the restart mechanics; triage_tests covers triage.
    s.triage.enabled = false;
    for i in 1..=nodes {
        let e = s.register(reg(&format!("n{i}"), u64::from(i), Vec::new()), now);
        run(&mut s, e, now);
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

fn starts(effects: &[Effect]) -> Vec<(String, v1::StartWorker)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Command {
                node,
                kind: v1::command::Kind::StartWorker(w),
            } => Some((node.clone(), w.clone())),
            _ => None,
        })
        .collect()
}

fn stops(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Command {
                node,
                kind: v1::command::Kind::StopWorkers(_),
            } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn event(kind: v1::agent_event::Kind) -> v1::AgentEvent {
    v1::AgentEvent {
        at_unix_ms: 0,
        kind: Some(kind),
    }
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

/// Feed an agent event from `node` (session = node number) the way the engine does.
fn from(s: &mut ClusterState, node: &str, ev: v1::AgentEvent, now: Now) -> Vec<Effect> {
    let session = s.nodes[node].session.expect("connected");
    let e = s
        .agent_event(node, session, &ev, now)
        .expect("live session");
    run(s, e, now)
}

/// Confirm the stop on every node that was asked to stop.
fn confirm_stops(s: &mut ClusterState, job: &str, effects: &[Effect], now: Now) -> Vec<Effect> {
    let attempt = s.jobs[job].attempt;
    let mut out = Vec::new();
    for node in stops(effects) {
        out.extend(from(s, &node, exited(job, attempt, None, true), now));
    }
    out
}

fn phase(s: &ClusterState, job: &str) -> JobPhase {
    s.jobs[job].phase
}

fn submit(s: &mut ClusterState, text: &str, now: Now) -> (String, Vec<Effect>) {
    let (id, e) = s.submit_job(text, "job.toml", now).expect("valid spec");
    (id, run(s, e, now))
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
        ["n1", "n2"]
    );
    assert_eq!(
        s.jobs[&id].spares,
        ["n3"],
        "the third node is held as a spare"
    );
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
    let e = s.register(reg("n2", 2, Vec::new()), now);
    run(&mut s, e, now);
    s.cordon("n2", "maintenance".into(), CordonSource::Operator, now)
        .expect("known");
    let (id, effects) = submit(&mut s, &spec(2, 0), now);
    assert_eq!(phase(&s, &id), JobPhase::Pending);
    assert!(starts(&effects).is_empty());
    assert!(
        s.jobs[&id].reason.contains("waiting for 2 eligible nodes"),
        "{}",
        s.jobs[&id].reason
    );
    let e = s.uncordon("n2", false, at(now, 1.0)).expect("known");
    let effects = run(&mut s, e, at(now, 1.0));
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
    assert_eq!(
        stops(&effects),
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
        starts(&s.jobs_tick(at(now, 25.0))).is_empty(),
        "backoff is 5s"
    );

    let effects = s.jobs_tick(at(now, 26.5));
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
    let effects = s.jobs_tick(at(now, 11.0));
    let nodes: Vec<String> = starts(&effects).into_iter().map(|(n, _)| n).collect();
    assert_eq!(nodes, ["n2", "n3"], "the spare replaces the cordoned node");
    assert!(s.jobs[&id].spares.is_empty(), "no spare left");
}

#[test]
fn a_lost_node_fails_the_attempt_and_counts_as_stopped() {
    let now = t0();
    let mut s = cluster(3, now);
    let (id, _) = submit(&mut s, &spec(2, 1), now);
    let e = s.disconnected("n2", 2, at(now, 1.0));
    let effects = run(&mut s, e, at(now, 1.0));
    assert_eq!(
        phase(&s, &id),
        JobPhase::Running,
        "Unreachable is not Lost: its workers may still run"
    );
    assert!(stops(&effects).is_empty());
    // Keep n1 and n3 alive.
    for t in [5.0, 9.0] {
        for (n, sess) in [("n1", 1), ("n3", 3)] {
            let e = s
                .heartbeat(n, sess, v1::Heartbeat::default(), at(now, t))
                .expect("live");
            run(&mut s, e, at(now, t));
        }
    }
    let e = s.tick(at(now, 11.0));
    let effects = run(&mut s, e, at(now, 11.0));
    assert_eq!(s.jobs[&id].workers["n2"].phase, WorkerPhase::Lost);
    assert_eq!(stops(&effects), ["n1"], "no command to the lost node");
    assert!(
        s.jobs[&id].reason.contains("node n2 lost"),
        "{}",
        s.jobs[&id].reason
    );
    confirm_stops(&mut s, &id, &effects, at(now, 11.5));
    let started = starts(&s.jobs_tick(at(now, 17.0)));
    assert_eq!(
        started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n3"]
    );
}

#[test]
fn an_unreachable_node_holds_the_restart_until_it_is_lost() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let e = s.disconnected("n2", 2, at(now, 1.0));
    run(&mut s, e, at(now, 1.0));
    let effects = from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 2.0));
    assert_eq!(
        stops(&effects),
        ["n1", "n2"],
        "n2 misses its stop: it is not connected"
    );
    from(&mut s, "n1", exited(&id, 1, None, true), at(now, 2.5));
    assert_eq!(
        phase(&s, &id),
        JobPhase::Stopping,
        "n2's worker may still run: wait"
    );
    let e = s
        .heartbeat("n1", 1, v1::Heartbeat::default(), at(now, 9.0))
        .expect("live");
    run(&mut s, e, at(now, 9.0));
    let e = s.tick(at(now, 10.0));
    run(&mut s, e, at(now, 10.0));
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
    let progress = |step| v1::Heartbeat {
        workers: vec![v1::WorkerInfo {
            job_id: "train-1".into(),
            attempt: 1,
            node_rank: 0,
            pid: 42,
            progress_step: Some(step),
            ..Default::default()
        }],
        ..Default::default()
    };
    for (t, step) in [(10.0, 5), (30.0, 9), (50.0, 9), (89.0, 9)] {
        let e = s
            .heartbeat("n1", 1, progress(step), at(now, t))
            .expect("live");
        run(&mut s, e, at(now, t));
        assert!(s.jobs_tick(at(now, t)).is_empty(), "at {t}s");
    }
    let effects = s.jobs_tick(at(now, 90.5));
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
        let effects = from(
            &mut s,
            "n1",
            exited(&id, attempt, Some(2), false),
            at(now, t),
        );
        confirm_stops(&mut s, &id, &effects, at(now, t + 0.1));
        s.jobs_tick(at(now, t + 6.0));
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
    s.cancel_job(&p, now).expect("known");
    assert_eq!(
        phase(&s, &p),
        JobPhase::Cancelled,
        "a pending job cancels at once"
    );
    let e = s.cancel_job(&id, at(now, 1.0)).expect("known");
    let effects = run(&mut s, e, at(now, 1.0));
    assert_eq!(stops(&effects), ["n1", "n2"]);
    assert_eq!(s.jobs[&id].phase_name(), "Cancelling");
    confirm_stops(&mut s, &id, &effects, at(now, 2.0));
    assert_eq!(phase(&s, &id), JobPhase::Cancelled);
    assert!(s.jobs_tick(at(now, 100.0)).is_empty(), "never restarted");
    assert!(matches!(
        s.cancel_job("nope", now),
        Err(StateError::UnknownJob(_))
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
    let worker = |rank| v1::WorkerInfo {
        job_id: id.clone(),
        attempt: 1,
        node_rank: rank,
        pid: 100 + rank,
        ..Default::default()
    };
    for (i, n) in ["n1", "n2"].into_iter().enumerate() {
        let rank = u32::try_from(i).unwrap_or(0);
        let e = s.register(reg(n, 10 + u64::from(rank), vec![worker(rank)]), later);
        let effects = run(&mut s, e, later);
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
    let e = s.register(reg("n1", 11, vec![stale]), at(now, 1.0));
    let effects = run(&mut s, e, at(now, 1.0));
    assert!(
        stops(&effects).contains(&"n1".to_owned()),
        "the stale worker is stopped"
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
    let e = s
        .cordon("n2", "drain later".into(), CordonSource::Operator, now)
        .expect("known");
    let effects = run(&mut s, e, now);
    assert!(stops(&effects).is_empty());
    assert_eq!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn invalid_specs_are_refused_with_the_field() {
    let now = t0();
    let mut s = cluster(1, now);
    let err = s
        .submit_job(&spec(2, 0), "job.toml", now)
        .expect_err("too many nodes");
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
    let (jobs, e) = s
        .drain_node("n2", "kernel upgrade", at(now, 1.0))
        .expect("known");
    let effects = run(&mut s, e, at(now, 1.0));
    assert_eq!(jobs, std::slice::from_ref(&id));
    assert!(s.nodes["n2"].cordoned());
    assert_eq!(stops(&effects), ["n1", "n2"]);
    assert_eq!(
        s.jobs[&id].attempts[0].culprit_node, "",
        "a drain blames no node"
    );
    confirm_stops(&mut s, &id, &effects, at(now, 2.0));
    let started = starts(&s.jobs_tick(at(now, 8.0)));
    assert_eq!(
        started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n3"]
    );
}

#[test]
fn a_coordinator_stall_counts_as_neither_silence_nor_a_hang() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let progress = |rank| v1::Heartbeat {
        workers: vec![v1::WorkerInfo {
            job_id: "train-1".into(),
            attempt: 1,
            node_rank: rank,
            pid: 42,
            progress_step: Some(5),
            ..Default::default()
        }],
        ..Default::default()
    };
    for (n, sess, rank) in [("n1", 1, 0), ("n2", 2, 1)] {
        let e = s
            .heartbeat(n, sess, progress(rank), at(now, 1.0))
            .expect("live");
        run(&mut s, e, at(now, 1.0));
    }
    // The coordinator is stopped for 70 s: past lost_after (10 s) and hang_timeout (60 s).
    let woke = at(now, 71.0);
    let mut unforgiven = s.clone();
    let mut e = unforgiven.tick(woke);
    e.extend(unforgiven.jobs_tick(woke));
    run(&mut unforgiven, e, woke);
    assert_ne!(
        phase(&unforgiven, &id),
        JobPhase::Running,
        "without it, the job fails"
    );

    s.forgive_stall(Duration::from_secs(70), woke);
    let mut e = s.tick(woke);
    e.extend(s.jobs_tick(woke));
    let effects = run(&mut s, e, woke);
    assert!(stops(&effects).is_empty(), "{effects:?}");
    assert_eq!(phase(&s, &id), JobPhase::Running);
    assert!(
        s.nodes
            .values()
            .all(|n| n.availability == crate::node::Availability::Ready)
    );
    // Silence after the stall still counts: lost_after later, the nodes are Lost.
    let e = s.tick(at(now, 82.0));
    run(&mut s, e, at(now, 82.0));
    assert_ne!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn a_new_coordinator_watches_progress_from_when_it_starts() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    let beat = v1::Heartbeat {
        workers: vec![v1::WorkerInfo {
            job_id: "train-1".into(),
            attempt: 1,
            node_rank: 0,
            pid: 42,
            progress_step: Some(5),
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = s.heartbeat("n1", 1, beat, at(now, 1.0)).expect("live");
    run(&mut s, e, at(now, 1.0));
    // The state as another coordinator loads it 70 s later (past hang_timeout, 60 s):
    // nobody watched in between, so the worker is not hung yet.
    let loaded = at(now, 71.0);
    let mut taken_over = s.clone();
    taken_over.rearm_clocks(loaded);
    assert!(taken_over.jobs_tick(loaded).is_empty());
    assert_eq!(phase(&taken_over, &id), JobPhase::Running);
    assert!(
        !s.jobs_tick(loaded).is_empty(),
        "without it, the job is hung"
    );
    // Silence after the takeover still counts.
    assert!(!taken_over.jobs_tick(at(now, 132.0)).is_empty());
}
