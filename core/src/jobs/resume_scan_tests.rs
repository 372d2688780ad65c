//! The checkpoint scan before a relaunch, with simulated time: node rank 0 of the new gang scans
//! first, no worker starts before it answers (or its budget runs out), and a newer complete
//! checkpoint nobody reported is resumed from. Inputs through `step`, time through `tick`.

use std::collections::BTreeMap;

use vigil_proto::v1;

use super::*;
use crate::state::ClusterState;
use crate::step::Input;
use crate::test_utils::{commands, starts, step_ok, submit_at, t, tick_at};

pub(super) const SPEC: &str = r#"name = "train"
nodes = 2
gpus_per_node = 8
command = ["python3", "train.py"]
workdir = "/w"
[checkpoint]
dir = "/c"
[restart]
max_restarts = 5
backoff = "1s"
[progress]
hang_timeout = "3s"
"#;

fn cluster() -> ClusterState {
    let mut s = crate::test_utils::patient_cluster(3, 8);
    s.triage.enabled = false;
    s
}

pub(super) use crate::test_utils::event_at as event;

pub(super) fn seen(id: &str, attempt: u64, step: u64) -> v1::CheckpointSeen {
    v1::CheckpointSeen {
        job_id: id.into(),
        attempt,
        path: format!("/c/step_{step:08}"),
        step: Some(step),
        save_ms: Some(100),
        completed_at_unix_ms: None,
    }
}

pub(super) fn scans(effects: &[Effect]) -> Vec<(String, v1::ScanCheckpoints)> {
    commands(effects)
        .into_iter()
        .filter_map(|(n, k)| match k {
            v1::command::Kind::ScanCheckpoints(c) => Some((n, c)),
            _ => None,
        })
        .collect()
}

pub(super) fn resume_from(start: &v1::StartWorker) -> Option<&str> {
    start.env.get("VIGIL_RESUME_FROM").map(String::as_str)
}

/// A job whose attempt 1 reported checkpoint 100 and then crashed at 2 s (every stop confirmed);
/// returns its id and the effects of the step that ended the stop (the relaunch is due at 3 s).
fn crashed() -> (ClusterState, String) {
    crashed_with(SPEC)
}

/// [`crashed`], with the job submitted as `spec` (a variant of [`SPEC`]).
pub(super) fn crashed_with(spec: &str) -> (ClusterState, String) {
    let mut s = cluster();
    let id = submit_at(&mut s, spec, t(0));
    for n in ["n1", "n2"] {
        event(
            &mut s,
            n,
            v1::agent_event::Kind::WorkerStarted(v1::WorkerStarted {
                job_id: id.clone(),
                attempt: 1,
                pid: 7,
                log_path: String::new(),
            }),
            t(0),
        );
    }
    event(
        &mut s,
        "n1",
        v1::agent_event::Kind::Checkpoint(seen(&id, 1, 100)),
        t(1),
    );
    let exited = |stopped| {
        v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
            job_id: id.clone(),
            attempt: 1,
            exit_code: Some(1),
            stopped,
            ..Default::default()
        })
    };
    event(&mut s, "n2", exited(false), t(2));
    event(&mut s, "n1", exited(true), t(2));
    assert_eq!(s.jobs[&id].phase, JobPhase::Restarting);
    (s, id)
}

#[test]
fn a_relaunch_scans_first_and_resumes_from_a_newer_checkpoint_nobody_reported() {
    let (mut s, id) = crashed();
    let effects = tick_at(&mut s, t(3));
    assert_eq!(s.jobs[&id].attempt, 2);
    assert_eq!(
        starts(&effects).len(),
        0,
        "no worker starts before the scan"
    );
    let sent = scans(&effects);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "n1", "node rank 0 of the new gang scans");
    assert_eq!(
        sent[0].1,
        v1::ScanCheckpoints {
            job_id: id.clone(),
            attempt: 2,
            checkpoint_dir: "/c".into(),
            checkpoint_layout: "marker".into(),
            world_size: 16,
            verify_command: Vec::new(),
            verify_timeout_ms: 300_000,
            workdir: "/w".into(),
            env: Default::default(),
        }
    );
    // 2.5 s later (hang_timeout is 3 s): no hang while nothing was started.
    let effects = tick_at(&mut s, t(5));
    assert_eq!(s.jobs[&id].phase, JobPhase::Running);
    assert_eq!(scans(&effects).len(), 1, "re-sent after 1 s, unanswered");

    let answer = v1::agent_event::Kind::CheckpointScan(v1::CheckpointScan {
        job_id: id.clone(),
        attempt: 2,
        newest: Some(seen(&id, 2, 130)),
        error: String::new(),
        rejected: Vec::new(),
    });
    let effects = event(&mut s, "n1", answer, t(5));
    let started = starts(&effects);
    assert_eq!(started.len(), 2, "both workers start at once");
    for (_, w) in &started {
        assert_eq!(resume_from(w), Some("/c/step_00000130"));
    }
    let job = &s.jobs[&id];
    assert_eq!(job.checkpoint.as_ref().and_then(|c| c.step), Some(130));
    assert_eq!(
        job.attempts[1].resumed_from.as_ref().and_then(|c| c.step),
        Some(130)
    );
    assert!(job.checkpoints.iter().any(|c| c.step == Some(130)));
    let last = job.events.last().map(|e| e.message.as_str()).unwrap_or("");
    assert!(
        last.starts_with("checkpoint scan on n1 found complete checkpoint /c/step_00000130 (step 130) that no agent had reported"),
        "{last}"
    );
    assert!(
        last.ends_with("instead of checkpoint /c/step_00000100 (step 100)"),
        "{last}"
    );
    // The hang clock starts with the workers.
    tick_at(&mut s, t(7));
    assert_eq!(s.jobs[&id].phase, JobPhase::Running, "2 s since the start");
    assert!(s.jobs[&id].resume_scan.is_none());
    assert_eq!(
        scans(&tick_at(&mut s, t(20))).len(),
        0,
        "answered: never re-sent"
    );
}

/// Attempt 2's scan answered with `newest`: the checkpoint its workers resume from, and the
/// event it left (if any).
fn relaunch_with(newest: Option<v1::CheckpointSeen>) -> (Option<String>, Option<String>) {
    let (mut s, id) = crashed();
    tick_at(&mut s, t(3));
    let events = s.jobs[&id].events.len();
    let answer = v1::agent_event::Kind::CheckpointScan(v1::CheckpointScan {
        job_id: id.clone(),
        attempt: 2,
        newest,
        error: String::new(),
        rejected: Vec::new(),
    });
    let effects = event(&mut s, "n1", answer, t(4));
    let started = starts(&effects);
    assert_eq!(started.len(), 2);
    assert_eq!(resume_from(&started[0].1), resume_from(&started[1].1));
    let from = resume_from(&started[0].1).map(str::to_owned);
    let event = s.jobs[&id].events[events..]
        .last()
        .map(|e| e.message.clone());
    (from, event)
}

#[test]
fn the_same_one_or_one_that_cannot_be_ordered_keeps_the_reported_checkpoint_quietly() {
    for (newest, what) in [
        (Some(seen("", 2, 100)), "the same"),
        (
            Some(v1::CheckpointSeen {
                path: "/elsewhere/step_00000500".into(),
                ..seen("", 2, 500)
            }),
            "outside the directory",
        ),
        (
            Some(v1::CheckpointSeen {
                path: "/c/latest".into(),
                step: None,
                ..seen("", 2, 0)
            }),
            "no step",
        ),
    ] {
        let (from, event) = relaunch_with(newest);
        assert_eq!(from.as_deref(), Some("/c/step_00000100"), "{what}");
        assert_eq!(event, None, "{what}: nothing to say");
    }
}

#[test]
fn an_older_newest_means_the_reported_one_is_broken_and_is_not_resumed_from() {
    let (from, event) = relaunch_with(Some(seen("", 2, 90)));
    assert_eq!(from.as_deref(), Some("/c/step_00000090"));
    let event = event.unwrap_or_default();
    assert!(
        event.contains(
            "(step 90) the newest complete one on disk: the one reported is no longer complete"
        ),
        "{event}"
    );
}

#[test]
fn no_complete_checkpoint_at_all_keeps_the_reported_one_and_says_so() {
    let (from, event) = relaunch_with(None);
    assert_eq!(
        from.as_deref(),
        Some("/c/step_00000100"),
        "never a fresh start"
    );
    let event = event.unwrap_or_default();
    assert!(
        event.starts_with(
            "checkpoint scan on n1 found no complete checkpoint in /c (is it mounted there?)"
        ),
        "{event}"
    );
}

#[test]
fn an_unanswered_scan_is_resent_with_backoff_and_the_relaunch_goes_on_after_its_budget() {
    let (mut s, id) = crashed();
    let mut sent_at = Vec::new();
    let mut started = Vec::new();
    for tenth in 30..=140u64 {
        let now = t(0).after(std::time::Duration::from_millis(tenth * 100));
        let effects = tick_at(&mut s, now);
        if !scans(&effects).is_empty() {
            sent_at.push(tenth);
        }
        started.extend(starts(&effects).into_iter().map(|(_, w)| (tenth, w)));
    }
    assert_eq!(
        sent_at,
        [30, 40, 60, 100],
        "1 s, then 2 s, then 4 s between sends"
    );
    // At 3 s + 10 s; unconfirmed, each start is sent again 1 s later.
    started.retain(|(at, _)| *at < 140);
    assert_eq!(started.len(), 2);
    assert!(started.iter().all(|(at, _)| *at == 130), "at 3 s + 10 s");
    assert!(
        started
            .iter()
            .all(|(_, w)| resume_from(w) == Some("/c/step_00000100"))
    );
    let last = s.jobs[&id].events.last().map(|e| e.message.clone());
    assert!(
        last.is_some_and(|m| m.starts_with("no checkpoint scan answer from n1 within 10s")),
        "{:?}",
        s.jobs[&id].events.last()
    );
    assert_eq!(s.jobs[&id].phase, JobPhase::Running);
}

#[test]
fn a_failed_scan_says_why_and_keeps_the_reported_checkpoint() {
    let (mut s, id) = crashed();
    tick_at(&mut s, t(3));
    let answer = v1::agent_event::Kind::CheckpointScan(v1::CheckpointScan {
        job_id: id.clone(),
        attempt: 2,
        newest: None,
        error: "checkpoint_dir \"/c\" is outside workers.allowed_roots".into(),
        rejected: Vec::new(),
    });
    let effects = event(&mut s, "n1", answer, t(4));
    assert!(
        starts(&effects)
            .iter()
            .all(|(_, w)| resume_from(w) == Some("/c/step_00000100"))
    );
    let last = s.jobs[&id]
        .events
        .last()
        .map(|e| e.message.as_str())
        .unwrap_or("");
    assert!(
        last.starts_with("checkpoint scan on n1 failed: checkpoint_dir \"/c\" is outside"),
        "{last}"
    );
}

#[test]
fn answers_from_another_node_or_attempt_change_nothing() {
    let (mut s, id) = crashed();
    tick_at(&mut s, t(3));
    for (node, attempt) in [("n2", 2), ("n1", 1), ("n3", 2)] {
        let answer = v1::agent_event::Kind::CheckpointScan(v1::CheckpointScan {
            job_id: id.clone(),
            attempt,
            newest: Some(seen(&id, attempt, 999)),
            error: String::new(),
            rejected: Vec::new(),
        });
        let effects = event(&mut s, node, answer, t(4));
        assert!(starts(&effects).is_empty(), "{node} attempt {attempt}");
        assert!(s.jobs[&id].resume_scan.is_some());
    }
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(100)
    );
}

#[test]
fn a_first_attempt_or_one_after_a_rollback_starts_without_a_scan() {
    let mut s = cluster();
    let id = submit_at(&mut s, SPEC, t(0));
    assert!(s.jobs[&id].resume_scan.is_none());
    assert_eq!(s.jobs[&id].attempt, 1);

    // An operator's restart from checkpoint 100 while 130 is on disk: 100 it is.
    let (mut s, id) = crashed();
    tick_at(&mut s, t(3));
    let answer = v1::agent_event::Kind::CheckpointScan(v1::CheckpointScan {
        job_id: id.clone(),
        attempt: 2,
        newest: Some(seen(&id, 2, 100)),
        error: String::new(),
        rejected: Vec::new(),
    });
    event(&mut s, "n1", answer, t(4));
    event(
        &mut s,
        "n1",
        v1::agent_event::Kind::Checkpoint(seen(&id, 2, 130)),
        t(5),
    );
    step_ok(
        &mut s,
        Input::RestartJob {
            id: id.clone(),
            from_step: Some(100),
            env: BTreeMap::new(),
        },
        t(6),
    );
    for n in ["n1", "n2"] {
        event(
            &mut s,
            n,
            v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
                job_id: id.clone(),
                attempt: 2,
                stopped: true,
                ..Default::default()
            }),
            t(6),
        );
    }
    let effects = tick_at(&mut s, t(8));
    assert_eq!(s.jobs[&id].attempt, 3);
    assert!(scans(&effects).is_empty());
    let started = starts(&effects);
    assert_eq!(started.len(), 2);
    assert!(
        started
            .iter()
            .all(|(_, w)| resume_from(w) == Some("/c/step_00000100"))
    );
}
