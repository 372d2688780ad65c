//! Crash loops with simulated time: identical failures with no hardware culprit end the job;
//! anything that points at a node, changes the signature or moves the step on does not.
//! Every input goes through `step` and time through `tick`, as the engine drives them.

use vigil_proto::v1;

use super::*;
use crate::job::JobPhase;
use crate::state::ClusterState;
use crate::test_utils::{diagnostics_at, heartbeat, submit_at, t, tick_at};
use crate::triage::TriageConfig;

fn cluster(triage: bool) -> ClusterState {
    let mut s = crate::test_utils::patient_cluster(4, 8);
    s.triage = TriageConfig {
        enabled: triage,
        ..TriageConfig::default()
    };
    s
}

fn spec(crash_loop: &str) -> String {
    format!(
        r#"name = "train"
nodes = 2
gpus_per_node = 8
command = ["python3", "train.py"]
workdir = "/w"
[checkpoint]
dir = "/c"
[restart]
max_restarts = 10
backoff = "1s"
[progress]
hang_timeout = "60s"
{crash_loop}"#
    )
}

fn event(s: &mut ClusterState, node: &str, kind: v1::agent_event::Kind, secs: u64) {
    crate::test_utils::event_at(s, node, kind, t(secs));
}

fn progress(s: &mut ClusterState, id: &str, step: u64, secs: u64) {
    let (attempt, nodes) = (s.jobs[id].attempt, s.jobs[id].placement.clone());
    for node in nodes {
        let hb = v1::Heartbeat {
            workers: vec![v1::WorkerInfo {
                job_id: id.into(),
                attempt,
                progress_step: Some(step),
                ..Default::default()
            }],
            ..Default::default()
        };
        heartbeat(s, &node, hb, t(secs));
    }
}

/// How the failing worker ends.
#[derive(Clone, Copy)]
enum End {
    Code(i32),
    Signal(i32),
}

/// The worker of rank 0 fails at `step` (None: before any step), every other worker is
/// confirmed stopped, and triage (when one runs) passes `passing` nodes and fails the rest.
/// Takes 10 s of simulated time from `secs`; returns the time after it.
fn fail(s: &mut ClusterState, id: &str, step: Option<u64>, end: End, secs: u64) -> u64 {
    if let Some(step) = step {
        progress(s, id, step, secs);
    }
    let attempt = s.jobs[id].attempt;
    let nodes = s.jobs[id].placement.clone();
    let (exit_code, signal) = match end {
        End::Code(c) => (Some(c), None),
        End::Signal(sig) => (None, Some(sig)),
    };
    let log_tail = format!(
        "epoch 0\nstep {}\nTraceback (most recent call last):\nValueError: bad batch shape\n",
        step.unwrap_or(0)
    );
    event(
        s,
        &nodes[0],
        v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
            job_id: id.into(),
            attempt,
            exit_code,
            signal,
            log_tail,
            ..Default::default()
        }),
        secs + 1,
    );
    assert_eq!(s.jobs[id].phase, JobPhase::Stopping);
    for node in &nodes[1..] {
        event(
            s,
            node,
            v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
                job_id: id.into(),
                attempt,
                stopped: true,
                ..Default::default()
            }),
            secs + 2,
        );
    }
    secs + 10
}

/// Triage passes every node diagnosed for the current attempt, except `bad`.
fn triage(s: &mut ClusterState, id: &str, bad: Option<&str>, secs: u64) {
    let pending: Vec<String> = s.jobs[id]
        .triage
        .as_ref()
        .map(|t| t.verdicts.keys().cloned().collect())
        .unwrap_or_default();
    for node in pending {
        let passed = Some(node.as_str()) != bad;
        diagnostics_at(s, &node, passed, "dcgmi diag -r 1", t(secs));
    }
}

/// Crash, triage passes, backoff runs out: the next attempt starts (or the job fails).
fn crash_and_restart(
    s: &mut ClusterState,
    id: &str,
    step: Option<u64>,
    end: End,
    secs: u64,
) -> u64 {
    let secs = fail(s, id, step, end, secs);
    tick_at(s, t(secs));
    triage(s, id, None, secs);
    let effects = tick_at(s, t(secs + 2));
    crate::test_utils::with_scans_answered(s, effects, t(secs + 2));
    secs + 3
}

/// A fresh cluster and job (`[crash_loop]` lines in `extra`), then one crash per step given, each
/// ending `end` and followed by its relaunch (or the job's end).
fn crashes(extra: &str, triage: bool, steps: &[Option<u64>], end: End) -> (ClusterState, String) {
    let mut s = cluster(triage);
    let id = submit_at(&mut s, &spec(extra), t(0));
    let mut now = 1;
    for step in steps {
        now = crash_and_restart(&mut s, &id, *step, end, now);
    }
    (s, id)
}

#[test]
fn a_program_that_crashes_at_the_same_step_every_time_fails_as_a_crash_loop_after_three() {
    let mut s = cluster(true);
    let id = submit_at(&mut s, &spec(""), t(0));
    let mut now = 1;
    for attempt in 1..=2 {
        now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
        assert_eq!(s.jobs[&id].phase, JobPhase::Running, "attempt {attempt}");
        assert_eq!(s.jobs[&id].attempt, attempt + 1);
    }
    crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Failed, "{}", job.reason);
    assert_eq!(
        job.attempt, 3,
        "no fourth attempt although max_restarts = 10"
    );
    assert!(job.reason.starts_with("crash loop: attempts 1, 2, 3 failed the same way, worker exited with code 1 at step 5 (last on n1), with no hardware culprit"), "{}", job.reason);
    assert!(
        job.reason
            .ends_with("last output: epoch 0 | step 5 | Traceback (most recent call last): | ValueError: bad batch shape"),
        "{}",
        job.reason
    );
    assert!(
        job.placement.is_empty() && job.spares.is_empty(),
        "nodes freed"
    );
    assert!(job.events.iter().any(|e| e.kind == "crash-loop"));
    let tail = &job.attempts[2]
        .worker_end
        .as_ref()
        .map(|e| e.log_tail.clone());
    assert!(
        tail.as_deref()
            .is_some_and(|t| t.ends_with("bad batch shape"))
    );
    for a in &job.attempts {
        assert_eq!(
            a.crash_loop,
            Some(Judged::Counts("worker exited with code 1".into()))
        );
    }
    assert_eq!(
        tick_at(&mut s, t(now + 60)).len(),
        0,
        "nothing more happens"
    );
}

#[test]
fn crashes_before_the_first_step_loop_too_and_so_do_signals() {
    let (s, id) = crashes("", true, &[None; 3], End::Signal(11));
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Failed);
    assert!(
        job.reason
            .contains("worker killed by signal 11 before its first reported step"),
        "{}",
        job.reason
    );
}

#[test]
fn different_exit_codes_or_steps_far_apart_are_not_a_loop() {
    let mut s = cluster(true);
    let id = submit_at(&mut s, &spec(""), t(0));
    let mut now = 1;
    for code in [1, 2, 1, 2] {
        now = crash_and_restart(&mut s, &id, Some(5), End::Code(code), now);
    }
    assert_eq!(
        s.jobs[&id].phase,
        JobPhase::Running,
        "{}",
        s.jobs[&id].reason
    );

    let (s, id) = crashes(
        "",
        true,
        &[Some(5), Some(100), Some(400), Some(900)],
        End::Code(1),
    );
    assert_eq!(s.jobs[&id].phase, JobPhase::Running, "it makes progress");

    // Within the tolerance (50 steps) it is the same place.
    let (s, id) = crashes("", true, &[Some(95), Some(140), Some(105)], End::Code(1));
    assert_eq!(s.jobs[&id].phase, JobPhase::Failed);
    assert!(s.jobs[&id].reason.contains("at step 105"));

    // With no step reported, a fresh start failed at step 0: a crash a few steps in is often
    // never reported at all.
    let (s, id) = crashes("", true, &[None, Some(3), None], End::Code(1));
    assert_eq!(s.jobs[&id].phase, JobPhase::Failed);
    assert!(
        s.jobs[&id]
            .reason
            .contains("before its first reported step"),
        "{}",
        s.jobs[&id].reason
    );

    let (s, id) = crashes(
        "[crash_loop]\nstep_tolerance = 2\n",
        true,
        &[None, Some(3), None, Some(3)],
        End::Code(1),
    );
    assert_eq!(
        s.jobs[&id].phase,
        JobPhase::Running,
        "3 steps apart, tolerance 2"
    );
}

#[test]
fn a_crash_that_triage_pins_on_a_node_breaks_the_chain() {
    let mut s = cluster(true);
    let id = submit_at(&mut s, &spec(""), t(0));
    let mut now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), 1);
    now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
    // Attempt 3: triage fails n2, which is cordoned.
    now = fail(&mut s, &id, Some(5), End::Code(1), now);
    tick_at(&mut s, t(now));
    triage(&mut s, &id, Some("n2"), now);
    tick_at(&mut s, t(now + 2));
    now += 3;
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Running, "{}", job.reason);
    assert_eq!(
        job.attempts[2].crash_loop,
        Some(Judged::Excused("triage failed n2".into()))
    );
    assert!(!job.placement.contains(&"n2".to_owned()));
    // Two more identical crashes are two, not five.
    now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
    now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
    assert_eq!(s.jobs[&id].phase, JobPhase::Running);
    crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
    assert_eq!(s.jobs[&id].phase, JobPhase::Failed);
    assert!(
        s.jobs[&id]
            .reason
            .starts_with("crash loop: attempts 4, 5, 6 ")
    );
}

#[test]
fn a_crash_whose_node_was_cordoned_does_not_count() {
    let mut s = cluster(false);
    let id = submit_at(&mut s, &spec(""), t(0));
    let mut now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), 1);
    now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
    // The third crash comes with an XID on its node: cordoned automatically.
    let culprit = s.jobs[&id].placement[0].clone();
    now = fail(&mut s, &id, Some(5), End::Code(1), now);
    let xid = v1::agent_event::Kind::Xid(v1::XidError {
        gpu_index: 0,
        xid: 79,
        ..Default::default()
    });
    event(&mut s, &culprit, xid, now);
    assert!(s.nodes[&culprit].record.cordon.is_some());
    tick_at(&mut s, t(now + 2));
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Running, "{}", job.reason);
    assert_eq!(
        job.attempts[2].crash_loop,
        Some(Judged::Excused(format!(
            "{culprit} was cordoned automatically"
        )))
    );
}

#[test]
fn hangs_with_no_culprit_loop_too() {
    let mut s = cluster(false);
    let id = submit_at(&mut s, &spec(""), t(0));
    let mut now = 0;
    for _ in 0..3 {
        progress(&mut s, &id, 7, now);
        now += 61;
        tick_at(&mut s, t(now));
        assert_eq!(s.jobs[&id].phase, JobPhase::Stopping, "hung");
        let attempt = s.jobs[&id].attempt;
        for node in s.jobs[&id].placement.clone() {
            event(
                &mut s,
                &node,
                v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
                    job_id: id.clone(),
                    attempt,
                    stopped: true,
                    ..Default::default()
                }),
                now,
            );
        }
        now += 2;
        let effects = tick_at(&mut s, t(now));
        crate::test_utils::with_scans_answered(&mut s, effects, t(now));
    }
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Failed);
    assert!(
        job.reason
            .contains("hang (no progress for hang_timeout) at step 7"),
        "{}",
        job.reason
    );
}

#[test]
fn an_attempt_ended_by_something_else_excuses_it() {
    let mut s = cluster(false);
    let id = submit_at(&mut s, &spec(""), t(0));
    let mut now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), 1);
    now = crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
    // Attempt 3's worker is stopped by its own agent (the lease ran out): not the program.
    let attempt = s.jobs[&id].attempt;
    let nodes = s.jobs[&id].placement.clone();
    for node in &nodes {
        event(
            &mut s,
            node,
            v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
                job_id: id.clone(),
                attempt,
                stopped: true,
                reason: "lease expired".into(),
                ..Default::default()
            }),
            now,
        );
    }
    let effects = tick_at(&mut s, t(now + 2));
    crate::test_utils::with_scans_answered(&mut s, effects, t(now + 2));
    now += 3;
    assert_eq!(s.jobs[&id].phase, JobPhase::Running);
    assert_eq!(
        s.jobs[&id].attempts[2].crash_loop,
        Some(Judged::Excused(
            "ended by worker_gone, not by the program".into()
        ))
    );
    crash_and_restart(&mut s, &id, Some(5), End::Code(1), now);
    assert_eq!(s.jobs[&id].phase, JobPhase::Running, "1 since the break");
}

#[test]
fn after_sets_the_count_and_zero_turns_the_rail_off() {
    let (s, id) = crashes(
        "[crash_loop]\nafter = 0\n",
        false,
        &[Some(5); 10],
        End::Code(1),
    );
    assert_eq!(s.jobs[&id].phase, JobPhase::Running, "restart 10 of 10");
    let (s, id) = crashes(
        "[crash_loop]\nafter = 0\n",
        false,
        &[Some(5); 11],
        End::Code(1),
    );
    assert!(s.jobs[&id].reason.starts_with("gave up after 10 restarts"));

    let (s, id) = crashes(
        "[crash_loop]\nafter = 2\n",
        false,
        &[Some(5); 2],
        End::Code(1),
    );
    assert_eq!(s.jobs[&id].phase, JobPhase::Failed);
    assert!(s.jobs[&id].reason.starts_with("crash loop: attempts 1, 2 "));
}

#[test]
fn the_spec_is_validated_with_the_field_and_the_fix() {
    let err =
        crate::jobspec::parse(&spec("[crash_loop]\nafter = 1\n"), "", 4).expect_err("refused");
    assert!(
        err.starts_with("crash_loop.after = 1 would end the job"),
        "{err}"
    );
    let err =
        crate::jobspec::parse(&spec("[crash_loop]\nafter = 5000\n"), "", 4).expect_err("refused");
    assert!(err.contains("crash_loop.after = 5000"), "{err}");
    let err =
        crate::jobspec::parse(&spec("[crash_loop]\nafterr = 3\n"), "", 4).expect_err("refused");
    assert!(err.contains("unknown field `afterr`"), "{err}");
    let ok = crate::jobspec::parse(&spec("[crash_loop]\nstep_tolerance = 0\n"), "", 4)
        .expect("accepted");
    assert_eq!(
        ok.crash_loop,
        CrashLoopSpec {
            after: 3,
            step_tolerance: 0
        }
    );
}

#[test]
fn the_kept_output_is_the_last_whole_lines_within_the_cap() {
    assert_eq!(keep_tail("a\nb\n\n", 10), "a\nb");
    let long: String = (0..1000).map(|i| format!("line {i}\n")).collect();
    let kept = keep_tail(&long, MAX_KEPT_TAIL);
    assert!(kept.len() <= MAX_KEPT_TAIL);
    assert!(
        kept.starts_with("line ") && kept.ends_with("line 999"),
        "{kept}"
    );
    assert_eq!(keep_tail("ééééé", 3), "é", "never split a character");
    assert_eq!(quote("x\n\n  \ny\n"), "x | y");
}
