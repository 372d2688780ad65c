//! Goodput accounting with simulated time: scenarios driven through the job
//! state machine, and hand-built records for the edge cases.

use std::time::Duration;

use vigil_proto::v1;

use super::*;
use crate::config::{HealthConfig, LivenessConfig};
use crate::job::JobPhase;
use crate::state::{ClusterState, Effect, Now, Registration};
use crate::step::{Answer, Input};
use crate::test_utils::{T0, agent_event, heartbeat, step_ok, tick_at};

fn t0() -> Now {
    Now {
        mono: crate::time::Instant::ZERO,
        wall_ms: T0,
    }
}

fn at(start: Now, secs: u64) -> Now {
    start.after(Duration::from_secs(secs))
}

fn reg(node: &str, session: u64) -> Registration {
    crate::test_utils::reg_with_gpus(node, session, 8)
}

/// A cluster whose nodes never go silent for long enough to be Lost in
/// these scenarios (they send no heartbeats between steps).
fn cluster(nodes: u64, now: Now) -> ClusterState {
    let patient = LivenessConfig {
        unreachable_after: Duration::from_secs(3600),
        lost_after: Duration::from_secs(7200),
        ..LivenessConfig::default()
    };
    cluster_with(nodes, now, patient)
}

fn cluster_with(nodes: u64, now: Now, liveness: LivenessConfig) -> ClusterState {
    let mut s = ClusterState::load(
        Vec::new(),
        Vec::new(),
        liveness,
        HealthConfig::default(),
        now,
    );
    s.triage.enabled = false;
    for i in 1..=nodes {
        step_ok(&mut s, Input::Register(reg(&format!("n{i}"), i)), now);
    }
    s
}

const SPEC: &str = r#"name = "train"
nodes = 2
gpus_per_node = 8
command = ["python3", "train.py"]
workdir = "/shared/runs/train"
spare_nodes = 1
[checkpoint]
dir = "/shared/ckpt/train"
[restart]
max_restarts = 5
backoff = "5s"
[progress]
hang_timeout = "60s"
"#;

/// Submit `spec` through `step`; the job's id comes back in the answer.
fn submit(s: &mut ClusterState, spec: &str, now: Now) -> String {
    let effects = step_ok(
        s,
        Input::SubmitJob {
            spec_toml: spec.to_owned(),
            source: "job.toml".into(),
        },
        now,
    );
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Answer(Answer::Submitted { id }) => Some(id.clone()),
            _ => None,
        })
        .expect("the submission is answered with its id")
}

/// Every node of the current attempt reports `step`.
fn progress(s: &mut ClusterState, job: &str, step: u64, now: Now) {
    let (attempt, nodes) = (s.jobs[job].attempt, s.jobs[job].placement.clone());
    for node in nodes {
        let hb = v1::Heartbeat {
            workers: vec![v1::WorkerInfo {
                job_id: job.into(),
                attempt,
                progress_step: Some(step),
                ..Default::default()
            }],
            ..Default::default()
        };
        heartbeat(s, &node, hb, now);
    }
}

/// An agent event from `node`, which the agent saw at `at_ms` (0: when it arrives).
fn event_from(s: &mut ClusterState, node: &str, kind: v1::agent_event::Kind, at_ms: u64, now: Now) {
    let ev = v1::AgentEvent {
        at_unix_ms: at_ms,
        kind: Some(kind),
    };
    agent_event(s, node, ev, now);
}

fn checkpoint(s: &mut ClusterState, job: &str, step: u64, save_ms: u64, now: Now) {
    let attempt = s.jobs[job].attempt;
    let node = s.jobs[job].placement[0].clone();
    let kind = v1::agent_event::Kind::Checkpoint(v1::CheckpointSeen {
        job_id: job.into(),
        attempt,
        path: format!("/shared/ckpt/train/step_{step:08}"),
        step: Some(step),
        save_ms: Some(save_ms),
        completed_at_unix_ms: None,
    });
    event_from(s, &node, kind, 0, now);
}

/// A worker on `node` exits `code`; the agent saw it at `seen_ms`.
fn exit(
    s: &mut ClusterState,
    job: &str,
    node: &str,
    code: Option<i32>,
    stopped: bool,
    seen_ms: u64,
    now: Now,
) {
    let kind = v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
        job_id: job.into(),
        attempt: s.jobs[job].attempt,
        exit_code: code,
        stopped,
        ..Default::default()
    });
    event_from(s, node, kind, seen_ms, now);
}

/// Every still-running worker of the attempt confirms its stop.
fn confirm_stops(s: &mut ClusterState, job: &str, now: Now) {
    let nodes: Vec<String> = s.jobs[job]
        .workers
        .iter()
        .filter(|(_, w)| !w.phase.is_dead() || w.exit_code.is_some())
        .map(|(n, _)| n.clone())
        .collect();
    for node in nodes {
        exit(s, job, &node, None, true, 0, now);
    }
}

fn tick(s: &mut ClusterState, now: Now) {
    tick_at(s, now);
}

fn assert_adds_up(g: &Goodput) {
    assert_eq!(g.productive_ms + g.lost_ms, g.wall_ms, "{g:#?}");
    let phases = g.queued_ms
        + g.detection_ms
        + g.teardown_ms
        + g.waiting_ms
        + g.startup_ms
        + g.recomputation_ms;
    assert_eq!(phases, g.lost_ms, "lost phases sum to lost: {g:#?}");
    let mut cursor = g.segments.first().map_or(0, |s| s.from_ms);
    for seg in &g.segments {
        assert_eq!(seg.from_ms, cursor, "segments are contiguous: {g:#?}");
        assert!(seg.to_ms > seg.from_ms, "no empty segment: {seg:?}");
        cursor = seg.to_ms;
    }
    let covered: u64 = g.segments.iter().map(|s| s.to_ms - s.from_ms).sum();
    assert_eq!(covered, g.wall_ms);
}

#[test]
fn a_crash_splits_lost_time_into_its_five_phases_and_everything_adds_up() {
    let now = t0();
    let mut s = cluster(3, now);
    let id = submit(&mut s, SPEC, now);
    progress(&mut s, &id, 10, at(now, 2));
    checkpoint(&mut s, &id, 100, 500, at(now, 10));
    checkpoint(&mut s, &id, 200, 700, at(now, 20));
    progress(&mut s, &id, 250, at(now, 25));
    // The agent saw the crash at 29 s; the coordinator hears of it at 30 s.
    exit(&mut s, &id, "n2", Some(1), false, T0 + 29_000, at(now, 30));
    confirm_stops(&mut s, &id, at(now, 31));
    assert_eq!(s.jobs[&id].phase, JobPhase::Restarting);
    tick(&mut s, at(now, 36));
    assert_eq!(
        (s.jobs[&id].phase, s.jobs[&id].attempt),
        (JobPhase::Running, 2)
    );
    progress(&mut s, &id, 210, at(now, 40));
    progress(&mut s, &id, 260, at(now, 45));

    let g = account(&s.jobs[&id], T0 + 60_000);
    assert_adds_up(&g);
    assert_eq!(g.wall_ms, 60_000);
    assert_eq!(g.productive_ms, 27_000 + 15_000, "2..29 s and 45..60 s");
    assert_eq!(g.queued_ms, 0);
    assert_eq!(
        g.startup_ms,
        2_000 + 4_000,
        "first step after 2 s, then 4 s after the relaunch"
    );
    let f = &g.failures[0];
    assert_eq!(
        (f.attempt, f.kind.as_str(), f.culprit_node.as_str()),
        (1, "crash", "n2")
    );
    assert_eq!(
        (
            f.detection_ms,
            f.teardown_ms,
            f.waiting_ms,
            f.startup_ms,
            f.recomputation_ms
        ),
        (1_000, 1_000, 5_000, 4_000, 5_000)
    );
    assert_eq!(f.steps_lost, Some(50), "steps 201..250 were redone");
    assert_eq!(
        f.total_ms(),
        g.lost_ms - 2_000,
        "all but the first start-up"
    );
    assert!((g.ettr - 42.0 / 60.0).abs() < 1e-9);
    assert_eq!(g.checkpoint_interval_ms, Some(10_000));
    assert_eq!(
        g.checkpoint_save_ms,
        Some(700),
        "median of 500 and 700 (upper)"
    );
    assert_eq!(
        g.mtbf_ms,
        Some(30_000 + 24_000),
        "ran 30 s, then 24 s, one failure"
    );
    assert_eq!(g.suggested_interval_ms, Some(young(700, 54_000)));
}

#[test]
fn a_hang_is_detected_from_its_last_step_not_from_the_timeout() {
    let now = t0();
    let mut s = cluster(3, now);
    let id = submit(&mut s, SPEC, now);
    progress(&mut s, &id, 50, at(now, 5));
    tick(&mut s, at(now, 66));
    assert_eq!(s.jobs[&id].phase, JobPhase::Stopping);
    let g = account(&s.jobs[&id], T0 + 66_000);
    assert_adds_up(&g);
    assert_eq!(g.failures[0].kind, "hang");
    assert_eq!(
        g.failures[0].detection_ms, 61_000,
        "last step at 5 s, detected at 66 s"
    );
    assert_eq!(
        g.productive_ms, 0,
        "its only step came at 5 s, when it hung"
    );
}

#[test]
fn a_lost_node_is_charged_from_its_last_message() {
    let now = t0();
    let mut s = cluster_with(3, now, LivenessConfig::default());
    let id = submit(&mut s, SPEC, now);
    progress(&mut s, &id, 10, at(now, 1));
    // n1 and n3 keep talking; n2 falls silent after 1 s.
    for t in 2..=12 {
        for n in ["n1", "n3"] {
            heartbeat(&mut s, n, v1::Heartbeat::default(), at(now, t));
        }
        tick(&mut s, at(now, t));
    }
    assert_eq!(s.jobs[&id].phase, JobPhase::Stopping);
    let g = account(&s.jobs[&id], T0 + 12_000);
    assert_adds_up(&g);
    let f = &g.failures[0];
    assert_eq!(f.kind, "node_lost");
    assert_eq!(f.fault_at_ms, T0 + 1_000, "n2's last message");
    assert!(f.detection_ms >= 10_000, "lost_after of silence: {f:?}");
}

fn job_with(attempts: Vec<Attempt>, finished: Option<u64>) -> Job {
    let now = t0();
    let mut s = cluster(1, now);
    let spec = SPEC
        .replace("nodes = 2", "nodes = 1")
        .replace("spare_nodes = 1", "spare_nodes = 0");
    let id = submit(&mut s, &spec, now);
    let mut job = s.jobs[&id].clone();
    job.attempts = attempts;
    job.finished_at_ms = finished;
    job
}

fn attempt(n: u64, start_s: u64) -> Attempt {
    Attempt {
        attempt: n,
        nodes: vec!["n1".into()],
        started_at_ms: T0 + start_s * 1000,
        ended_at_ms: 0,
        outcome: "running".into(),
        reason: String::new(),
        culprit_node: String::new(),
        resumed_from: None,
        last_step: None,
        fault_at_ms: 0,
        detected_at_ms: 0,
        failure_kind: None,
        first_progress_at_ms: None,
        catch_up_step: None,
        caught_up_at_ms: None,
        triage: Default::default(),
        worker_end: None,
        crash_loop: None,
        evidence: Vec::new(),
        evidence_from: Default::default(),
        suspect: String::new(),
        preflight: None,
    }
}

#[test]
fn a_pending_job_is_all_queued() {
    let g = account(&job_with(Vec::new(), None), T0 + 7_000);
    assert_adds_up(&g);
    assert_eq!((g.wall_ms, g.queued_ms, g.productive_ms), (7_000, 7_000, 0));
    assert_eq!(g.ettr, 0.0);
    assert!(g.failures.is_empty());
    assert_eq!(g.mtbf_ms, None, "no failure, no MTBF");
    assert_eq!(g.suggested_interval_ms, None);
}

#[test]
fn a_finished_job_stops_the_clock() {
    let mut a = attempt(1, 3);
    a.first_progress_at_ms = Some(T0 + 4_000);
    a.ended_at_ms = T0 + 20_000;
    a.outcome = "succeeded".into();
    let g = account(&job_with(vec![a], Some(T0 + 20_000)), T0 + 999_000);
    assert_adds_up(&g);
    assert_eq!(
        (g.wall_ms, g.queued_ms, g.startup_ms, g.productive_ms),
        (20_000, 3_000, 1_000, 16_000)
    );
}

#[test]
fn a_failure_during_start_up_charges_the_start_up_to_the_previous_failure() {
    let mut a1 = attempt(1, 0);
    a1.first_progress_at_ms = Some(T0 + 1_000);
    a1.fault_at_ms = T0 + 10_000;
    a1.detected_at_ms = T0 + 10_000;
    a1.ended_at_ms = T0 + 11_000;
    a1.failure_kind = Some(crate::kinds::FailureKind::Crash);
    let mut a2 = attempt(2, 12);
    a2.fault_at_ms = T0 + 15_000;
    a2.detected_at_ms = T0 + 16_000;
    a2.ended_at_ms = T0 + 16_000;
    a2.failure_kind = Some(crate::kinds::FailureKind::Crash);
    let a3 = attempt(3, 17);
    let g = account(&job_with(vec![a1, a2, a3], None), T0 + 20_000);
    assert_adds_up(&g);
    assert_eq!(g.failures.len(), 2);
    assert_eq!(
        g.failures[0].startup_ms, 3_000,
        "12..15 s: attempt 2 never got going"
    );
    assert_eq!(g.failures[1].startup_ms, 3_000, "17..20 s, still starting");
    assert_eq!(g.productive_ms, 9_000);
    assert_eq!(g.mtbf_ms, Some((10_000 + 4_000 + 3_000) / 2));
}

#[test]
fn operator_drains_cost_time_but_are_not_failures_for_the_mtbf() {
    let mut a1 = attempt(1, 0);
    a1.first_progress_at_ms = Some(T0);
    a1.fault_at_ms = T0 + 10_000;
    a1.detected_at_ms = T0 + 10_000;
    a1.ended_at_ms = T0 + 12_000;
    a1.failure_kind = Some(crate::kinds::FailureKind::Drain);
    let mut a2 = attempt(2, 12);
    a2.first_progress_at_ms = Some(T0 + 12_000);
    let g = account(&job_with(vec![a1, a2], None), T0 + 20_000);
    assert_adds_up(&g);
    assert_eq!(g.failures[0].teardown_ms, 2_000);
    assert_eq!(g.mtbf_ms, None);
}

#[test]
fn out_of_order_marks_never_make_time_run_backwards() {
    let mut a1 = attempt(1, 5);
    // A fault seen before the attempt started (clock skew between hosts).
    a1.fault_at_ms = T0 + 1_000;
    a1.detected_at_ms = T0 + 8_000;
    a1.ended_at_ms = T0 + 7_000;
    a1.failure_kind = Some(crate::kinds::FailureKind::Crash);
    let g = account(&job_with(vec![a1], None), T0 + 9_000);
    assert_adds_up(&g);
    assert_eq!(g.wall_ms, 9_000);
}

#[test]
fn youngs_interval_is_the_square_root_of_twice_save_time_times_mtbf() {
    assert_eq!(young(30_000, 3_600_000 * 24), 2_276_840);
    assert_eq!(young(0, 1_000), 0);
    assert_eq!(young(50, 100), 100);
}

#[test]
fn the_checkpoint_history_is_bounded_and_intervals_ignore_attempt_boundaries() {
    let mut job = job_with(Vec::new(), None);
    for i in 0..(MAX_CHECKPOINT_HISTORY as u64 + 10) {
        on_checkpoint(
            &mut job,
            Checkpoint {
                path: format!("/c/{i}"),
                step: Some(i),
                seen_at_ms: T0 + i * 1_000 + if i >= 40 { 500_000 } else { 0 },
                attempt: if i >= 40 { 2 } else { 1 },
                save_ms: None,
                completed_at_ms: None,
            },
        );
    }
    assert_eq!(job.checkpoints.len(), MAX_CHECKPOINT_HISTORY);
    assert_eq!(job.checkpoints[0].step, Some(10));
    assert_eq!(checkpoint_interval(&job.checkpoints), Some(1_000));
    assert_eq!(account(&job, T0).checkpoint_save_ms, None);
}

/// A checkpoint every second whose reports reach the coordinator in bunches, 0.1 s apart (the
/// agent reports what one scan found): the interval is read from when each save completed.
#[test]
fn the_checkpoint_interval_is_measured_between_saves_not_between_arrivals() {
    let now = t0();
    let mut s = cluster(3, now);
    let id = submit(&mut s, SPEC, now);
    progress(&mut s, &id, 10, at(now, 1));
    let node = s.jobs[&id].placement[0].clone();
    let attempt = s.jobs[&id].attempt;
    for (i, arrives_ms) in [5_000, 5_100, 5_200, 9_000, 9_100].into_iter().enumerate() {
        let step = 20 * (i as u64 + 1);
        let kind = v1::agent_event::Kind::Checkpoint(v1::CheckpointSeen {
            job_id: id.clone(),
            attempt,
            path: format!("/shared/ckpt/train/step_{step:08}"),
            step: Some(step),
            save_ms: Some(50),
            completed_at_unix_ms: Some(T0 + 2_000 + i as u64 * 1_000),
        });
        let arrives = now.after(Duration::from_millis(arrives_ms));
        event_from(&mut s, &node, kind, 0, arrives);
    }
    assert_eq!(s.jobs[&id].checkpoints.len(), 5);
    let g = account(&s.jobs[&id], T0 + 10_000);
    assert_eq!(g.checkpoint_interval_ms, Some(1_000), "not 0.1 s: {g:#?}");
}

/// An agent that cannot time a save (its files' times are equal) reports 0: Young's formula
/// would then suggest checkpointing continuously, so there is no suggestion.
#[test]
fn no_interval_is_suggested_until_a_save_was_measured() {
    let mut a1 = attempt(1, 0);
    a1.first_progress_at_ms = Some(T0);
    a1.fault_at_ms = T0 + 3_300;
    a1.detected_at_ms = T0 + 3_300;
    a1.ended_at_ms = T0 + 3_400;
    a1.failure_kind = Some(crate::kinds::FailureKind::Crash);
    let mut job = job_with(vec![a1], None);
    let saved = |save_ms| Checkpoint {
        path: "/c/1".into(),
        step: Some(1),
        seen_at_ms: T0 + 1_000,
        attempt: 1,
        save_ms,
        completed_at_ms: None,
    };
    job.checkpoints = vec![saved(Some(0))];
    let g = account(&job, T0 + 4_000);
    assert_eq!(g.mtbf_ms, Some(3_300));
    assert_eq!(g.checkpoint_save_ms, Some(0));
    assert_eq!(
        g.suggested_interval_ms, None,
        "a save of 0 is no measurement"
    );
    job.checkpoints = vec![saved(None)];
    assert_eq!(account(&job, T0 + 4_000).suggested_interval_ms, None);
    job.checkpoints = vec![saved(Some(200))];
    assert_eq!(
        account(&job, T0 + 4_000).suggested_interval_ms,
        Some(young(200, 3_300))
    );
}

#[test]
fn steps_lost_and_recomputation_agree_when_progress_arrives_after_the_stop() {
    // Attempt 1 stopped at step 40 as known then; a report that came in after the stop
    // raised the gang's high-water mark to 45. Attempt 2 resumes from checkpoint 40 and must
    // redo 41-45: it has recomputation time, so the failure lost steps (not 0).
    let mut a1 = attempt(1, 0);
    a1.first_progress_at_ms = Some(T0 + 1_000);
    a1.fault_at_ms = T0 + 10_000;
    a1.detected_at_ms = T0 + 10_000;
    a1.ended_at_ms = T0 + 11_000;
    a1.failure_kind = Some(crate::kinds::FailureKind::Crash);
    a1.last_step = Some(40);
    let mut a2 = attempt(2, 12);
    a2.resumed_from = Some(Checkpoint {
        path: "/ckpt/step_40".into(),
        step: Some(40),
        seen_at_ms: T0 + 9_000,
        attempt: 1,
        save_ms: None,
        completed_at_ms: None,
    });
    a2.first_progress_at_ms = Some(T0 + 13_000);
    a2.catch_up_step = Some(45);
    a2.caught_up_at_ms = Some(T0 + 14_000);
    let g = account(&job_with(vec![a1.clone(), a2.clone()], None), T0 + 20_000);
    assert_adds_up(&g);
    let f = &g.failures[0];
    assert_eq!(f.steps_lost, Some(5), "{f:?}");
    assert_eq!(f.recomputation_ms, 1_000, "{f:?}");
    // Nothing to redo (the high-water mark is the checkpoint): neither lost steps nor time.
    a2.catch_up_step = None;
    a2.caught_up_at_ms = None;
    let g = account(&job_with(vec![a1, a2], None), T0 + 20_000);
    let f = &g.failures[0];
    assert_eq!((f.steps_lost, f.recomputation_ms), (Some(0), 0), "{f:?}");
}
