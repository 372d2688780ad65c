//! `[checkpoint] verify_command`, with simulated time: checkpoints the agent's verification
//! rejected are marked bad and never resumed from again, a verified older one is adopted, and a
//! relaunch where every candidate failed ends the job instead of looping.

use vigil_proto::v1;

use super::tests::{SPEC, crashed_with, event, resume_from, scans, seen};
use super::*;
use crate::state::ClusterState;
use crate::test_utils::{starts, t, tick_at};

fn verifying_spec() -> String {
    SPEC.replace("[checkpoint]", "env = { A = \"1\" }\n[checkpoint]")
        .replace(
            "dir = \"/c\"\n",
            "dir = \"/c\"\nverify_command = [\"sh\", \"/w/verify.sh\"]\nverify_timeout = \"2s\"\n",
        )
}

fn rejected(step: u64, why: &str) -> v1::RejectedCheckpoint {
    v1::RejectedCheckpoint {
        path: format!("/c/step_{step:08}"),
        step: Some(step),
        output: format!("shard 3 of step {step}: bad checksum\n"),
        why: why.into(),
    }
}

fn answer(
    id: &str,
    newest: Option<v1::CheckpointSeen>,
    rejected: Vec<v1::RejectedCheckpoint>,
) -> v1::agent_event::Kind {
    let error = if newest.is_none() {
        "no checkpoint passed verify_command".to_owned()
    } else {
        String::new()
    };
    v1::agent_event::Kind::CheckpointScan(v1::CheckpointScan {
        job_id: id.into(),
        attempt: 2,
        newest,
        error,
        rejected,
    })
}

fn events_of(s: &ClusterState, id: &str, kind: &str) -> Vec<String> {
    s.jobs[id]
        .events
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.message.clone())
        .collect()
}

#[test]
fn the_scan_carries_the_verify_command_and_its_budget_grows_by_three_verifications() {
    let (mut s, id) = crashed_with(&verifying_spec());
    let effects = tick_at(&mut s, t(3));
    let sent = scans(&effects);
    assert_eq!(sent.len(), 1);
    let scan = &sent[0].1;
    assert_eq!(scan.verify_command, ["sh", "/w/verify.sh"]);
    assert_eq!(scan.verify_timeout_ms, 2000);
    assert_eq!(scan.workdir, "/w");
    assert_eq!(scan.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(budget(&s.jobs[&id]), Duration::from_secs(16));
    // 10 s + 3 x 2 s: still waiting 15 s after the relaunch, never a start meanwhile.
    for secs in 4..=18 {
        assert!(starts(&tick_at(&mut s, t(secs))).is_empty(), "at {secs} s");
    }
    assert!(pending(&s.jobs[&id]));
    let effects = tick_at(&mut s, t(19));
    assert_eq!(
        starts(&effects).len(),
        2,
        "the budget ran out: the workers start"
    );
    let last = s.jobs[&id].events.last().map(|e| e.message.clone());
    assert!(
        last.as_deref().is_some_and(|m| m.contains("within 16s")),
        "{last:?}"
    );
}

#[test]
fn a_rejected_checkpoint_is_marked_bad_and_an_older_verified_one_is_resumed_from() {
    let (mut s, id) = crashed_with(&verifying_spec());
    tick_at(&mut s, t(3));
    // 130 (nobody reported it) and 100 (the one reported) fail; 90 passes.
    let rejects = vec![
        rejected(130, "exited with code 3"),
        rejected(100, "timed out after 2s"),
    ];
    let effects = event(
        &mut s,
        "n1",
        answer(&id, Some(seen(&id, 2, 90)), rejects),
        t(4),
    );
    let started = starts(&effects);
    assert_eq!(started.len(), 2);
    for (_, w) in &started {
        assert_eq!(
            resume_from(w),
            Some("/c/step_00000090"),
            "older, but verified"
        );
    }
    let job = &s.jobs[&id];
    assert_eq!(job.checkpoint.as_ref().and_then(|c| c.step), Some(90));
    assert_eq!(
        job.bad_checkpoints.iter().cloned().collect::<Vec<_>>(),
        ["/c/step_00000100", "/c/step_00000130"]
    );
    let bad = events_of(&s, &id, "checkpoint-bad");
    assert_eq!(bad.len(), 2);
    assert!(
        bad[0].starts_with("checkpoint /c/step_00000130 (step 130) failed verify_command on n1 (exited with code 3)")
            && bad[0].ends_with("output: shard 3 of step 130: bad checksum"),
        "{}",
        bad[0]
    );
    assert!(bad[1].contains("(timed out after 2s)"), "{}", bad[1]);
    let last = s.jobs[&id]
        .events
        .last()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(
        last.contains("that passed verify_command: the one reported failed it"),
        "{last}"
    );

    // Attempt 2's rank 0 reports the bad one (its directory still holds it): ignored.
    event(
        &mut s,
        "n1",
        v1::agent_event::Kind::Checkpoint(seen(&id, 2, 130)),
        t(5),
    );
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(90)
    );
    // A good newer one is taken as usual.
    event(
        &mut s,
        "n1",
        v1::agent_event::Kind::Checkpoint(seen(&id, 2, 140)),
        t(6),
    );
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(140)
    );
    // A rollback to before step 120 skips the bad 100 for 90.
    let before = crate::training_health::checkpoint_before(&s.jobs[&id], 120);
    assert_eq!(before.and_then(|c| c.step), Some(90));
}

#[test]
fn a_later_scan_that_finds_a_bad_checkpoint_does_not_resume_from_it() {
    let (mut s, id) = crashed_with(&verifying_spec());
    tick_at(&mut s, t(3));
    let rejects = vec![rejected(130, "exited with code 3")];
    event(
        &mut s,
        "n1",
        answer(&id, Some(seen(&id, 2, 100)), rejects),
        t(4),
    );
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(100)
    );
    // The verdict alone: a (flaky) verification passing 130 later changes nothing.
    assert_eq!(
        verdict(&s.jobs[&id], Some(&seen(&id, 3, 130))),
        Verdict::Bad
    );
    assert_eq!(
        verdict(&s.jobs[&id], Some(&seen(&id, 3, 150))),
        Verdict::Newer
    );
}

#[test]
fn when_every_candidate_fails_verification_the_job_fails_naming_them() {
    let (mut s, id) = crashed_with(&verifying_spec());
    tick_at(&mut s, t(3));
    let rejects = vec![
        rejected(130, "exited with code 3"),
        rejected(100, "exited with code 3"),
    ];
    let effects = event(&mut s, "n1", answer(&id, None, rejects), t(4));
    assert!(
        starts(&effects).is_empty(),
        "neither resumed from a bad one nor started afresh"
    );
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Failed);
    assert_eq!(
        job.reason,
        "no checkpoint passed verify_command on n1 before attempt 2: tried /c/step_00000130 (exited with code 3), /c/step_00000100 (exited with code 3); fix or remove them (or the verify_command), then resubmit"
    );
    assert_eq!(job.bad_checkpoints.len(), 2);
    assert!(job.placement.is_empty());
    let last = job
        .attempts
        .last()
        .map(|a| (a.attempt, a.outcome.as_str(), a.ended_at_ms));
    assert_eq!(last, Some((2, "failed", t(4).wall_ms)));
    assert_eq!(events_of(&s, &id, "checkpoint-bad").len(), 2);
    // No relaunch, no loop.
    for secs in [10, 30, 60] {
        let effects = tick_at(&mut s, t(secs));
        assert!(starts(&effects).is_empty() && scans(&effects).is_empty());
    }
    assert_eq!(s.jobs[&id].phase, JobPhase::Failed);
    assert_eq!(s.jobs[&id].attempt, 2);
}

#[test]
fn without_a_verify_command_rejections_and_errors_keep_todays_behaviour() {
    let (mut s, id) = crashed_with(SPEC);
    tick_at(&mut s, t(3));
    let rejects = vec![rejected(100, "exited with code 3")];
    let effects = event(&mut s, "n1", answer(&id, None, rejects), t(4));
    let started = starts(&effects);
    assert_eq!(started.len(), 2, "resumes as before");
    assert_eq!(resume_from(&started[0].1), Some("/c/step_00000100"));
    assert!(s.jobs[&id].bad_checkpoints.is_empty());
    assert_eq!(s.jobs[&id].phase, JobPhase::Running);
}
