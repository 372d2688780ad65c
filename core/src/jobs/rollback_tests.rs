//! Rollbacks with simulated time: a loss spike, and an operator's restart. Every input goes
//! through `step`, as the engine drives it.

use crate::test_utils::{
    T0, agent_event, heartbeat, refusal, reg, register_at, starts, step_ok, step_raw, submit_at, t,
};

use super::*;
use crate::step::Input;

const SPEC: &str = r#"name = "train"
nodes = 1
gpus_per_node = 1
command = ["python3", "train.py"]
workdir = "/w"
[checkpoint]
dir = "/c"
[restart]
backoff = "0s"
[progress]
hang_timeout = "10m"
[training_health]
spike_factor = 3.0
spike_reports = 3
median_window = 10
"#;

fn cluster() -> (ClusterState, String) {
    cluster_with(SPEC)
}

/// n1, and a job of `spec` running on it.
fn cluster_with(spec: &str) -> (ClusterState, String) {
    let mut s = crate::test_utils::patient_state();
    s.triage.enabled = false;
    register_at(&mut s, reg("n1", 1), t(0));
    let id = submit_at(&mut s, spec, t(0));
    assert_eq!(s.jobs[&id].phase, JobPhase::Running);
    (s, id)
}

fn progress(s: &mut ClusterState, id: &str, step: u64, loss: f64, secs: u64) -> Vec<Effect> {
    let hb = v1::Heartbeat {
        workers: vec![v1::WorkerInfo {
            job_id: id.into(),
            attempt: s.jobs[id].attempt,
            progress_step: Some(step),
            loss: Some(loss),
            ..Default::default()
        }],
        ..Default::default()
    };
    heartbeat(s, "n1", hb, t(secs))
}

fn event(s: &mut ClusterState, kind: v1::agent_event::Kind, secs: u64) -> Vec<Effect> {
    let ev = v1::AgentEvent {
        at_unix_ms: 0,
        kind: Some(kind),
    };
    agent_event(s, "n1", ev, t(secs))
}

fn checkpoint(s: &mut ClusterState, id: &str, step: u64, completed_s: u64, secs: u64) {
    let kind = v1::agent_event::Kind::Checkpoint(v1::CheckpointSeen {
        job_id: id.into(),
        attempt: s.jobs[id].attempt,
        path: format!("/c/step_{step:08}"),
        step: Some(step),
        save_ms: Some(10),
        completed_at_unix_ms: Some(T0 + completed_s * 1000),
    });
    event(s, kind, secs);
}

fn stopped(s: &mut ClusterState, id: &str, secs: u64) -> Vec<Effect> {
    let kind = v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
        job_id: id.into(),
        attempt: s.jobs[id].attempt,
        stopped: true,
        ..Default::default()
    });
    event(s, kind, secs)
}

fn resume_from(effects: &[Effect]) -> Option<String> {
    starts(effects)
        .first()
        .map(|(_, w)| w.env.get("VIGIL_RESUME_FROM").cloned().unwrap_or_default())
}

fn restart_job(
    s: &mut ClusterState,
    id: &str,
    from_step: Option<u64>,
    env: BTreeMap<String, String>,
    secs: u64,
) -> Vec<Effect> {
    step_raw(
        s,
        Input::RestartJob {
            id: id.to_owned(),
            from_step,
            env,
        },
        t(secs),
    )
}

/// Steps 1..=70, a checkpoint every 10, the loss spiking from step 55.
fn spike(s: &mut ClusterState, id: &str) -> Vec<Effect> {
    let mut out = Vec::new();
    for step in 1..=70 {
        let loss = if step >= 55 { 40.0 } else { 2.0 };
        out = progress(s, id, step, loss, step);
        if step % 10 == 0 && s.jobs[id].phase == JobPhase::Running {
            checkpoint(s, id, step, step, step);
        }
        if s.jobs[id].phase != JobPhase::Running {
            break;
        }
    }
    out
}

#[test]
fn a_loss_spike_rolls_back_to_the_newest_checkpoint_before_it() {
    let (mut s, id) = cluster();
    spike(&mut s, &id);
    let job = &s.jobs[&id];
    assert_eq!(
        job.phase,
        JobPhase::Stopping,
        "stopped at step 57, the third high report"
    );
    let a = &job.attempts[0];
    assert_eq!(a.failure_kind, Some(crate::kinds::FailureKind::LossSpike));
    assert!(a.reason.contains("since step 55"), "{}", a.reason);
    assert!(
        a.reason
            .contains("rolling back to checkpoint /c/step_00000050 (step 50)"),
        "{}",
        a.reason
    );
    assert!(
        a.reason.contains("40@55, 40@56, 40@57"),
        "the evidence: {}",
        a.reason
    );
    assert!(job.events.iter().any(|e| e.kind == "rollback"));
    let e = stopped(&mut s, &id, 58);
    assert_eq!(resume_from(&e).as_deref(), Some("/c/step_00000050"));
    assert_eq!(
        s.jobs[&id].attempts[1]
            .resumed_from
            .as_ref()
            .and_then(|c| c.step),
        Some(50)
    );
}

#[test]
fn a_checkpoint_the_rolled_back_attempt_reports_while_stopping_is_not_resumed_from() {
    // Regression: the final checkpoint scan of a worker stopped by the rollback reported a
    // checkpoint written during the spike, which replaced the rollback's target.
    let (mut s, id) = cluster();
    spike(&mut s, &id);
    assert_eq!(s.jobs[&id].phase, JobPhase::Stopping);
    checkpoint(&mut s, &id, 70, 70, 58);
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(50),
        "the rollback's target stays"
    );
    let e = stopped(&mut s, &id, 59);
    assert_eq!(resume_from(&e).as_deref(), Some("/c/step_00000050"));
}

#[test]
fn the_newer_checkpoint_written_during_the_spike_is_not_resumed_from_later() {
    // Checkpoint 60 is complete before the spike is detected (M = 5 reports).
    let (mut s, id) = cluster_with(&SPEC.replace("spike_reports = 3", "spike_reports = 7"));
    assert_eq!(s.jobs[&id].spec.training_health.spike_reports, 7);
    spike(&mut s, &id);
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(50),
        "not 60"
    );
    stopped(&mut s, &id, 62);
    assert_eq!(s.jobs[&id].attempt, 2);
    // Attempt 2's agent reports checkpoint 60 at once: completed before attempt 2 began.
    checkpoint(&mut s, &id, 60, 60, 64);
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(50)
    );
    // Attempt 2 writes its own checkpoint 60 later.
    checkpoint(&mut s, &id, 60, 80, 80);
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(60)
    );
}

#[test]
fn an_operator_restarts_from_a_chosen_checkpoint_with_an_env_override() {
    let (mut s, id) = cluster();
    for step in 1..=40 {
        progress(&mut s, &id, step, 2.0, step);
        if step % 10 == 0 {
            checkpoint(&mut s, &id, step, step, step);
        }
    }
    let env = BTreeMap::from([("LR".to_owned(), "1e-4".to_owned())]);
    let e = restart_job(&mut s, &id, Some(20), env, 41);
    assert!(
        !e.iter().any(|e| matches!(e, Effect::Refused(_))),
        "accepted: {e:?}"
    );
    assert_eq!(s.jobs[&id].phase, JobPhase::Stopping);
    assert_eq!(
        s.jobs[&id].attempts[0].failure_kind,
        Some(crate::kinds::FailureKind::OperatorRestart)
    );
    let e = stopped(&mut s, &id, 42);
    assert_eq!(resume_from(&e).as_deref(), Some("/c/step_00000020"));
    let env = starts(&e)
        .first()
        .map(|(_, w)| w.env.clone())
        .unwrap_or_default();
    assert_eq!(env.get("LR").map(String::as_str), Some("1e-4"));
    let history: Vec<&str> = s.jobs[&id]
        .events
        .iter()
        .filter(|e| e.kind == "restart")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(
        history,
        ["restarted by an operator from checkpoint /c/step_00000020 (step 20) with LR=1e-4"]
    );
}

#[test]
fn an_operator_restart_is_checked() {
    let (mut s, id) = cluster();
    checkpoint(&mut s, &id, 10, 10, 10);
    let err = refusal(&restart_job(&mut s, &id, Some(15), BTreeMap::new(), 11));
    assert!(err.to_string().contains("known steps: 10"), "{err}");
    let bad = BTreeMap::from([("VIGIL_ATTEMPT".to_owned(), "9".to_owned())]);
    refusal(&restart_job(&mut s, &id, None, bad, 11));
    assert!(matches!(
        refusal(&restart_job(&mut s, "nope", None, BTreeMap::new(), 11)),
        StateError::UnknownJob(_)
    ));
    assert_eq!(s.jobs[&id].phase, JobPhase::Running, "nothing changed");
    step_ok(&mut s, Input::CancelJob { id: id.clone() }, t(12));
    let _ = stopped(&mut s, &id, 13);
    assert_eq!(s.jobs[&id].phase, JobPhase::Cancelled);
    refusal(&restart_job(&mut s, &id, None, BTreeMap::new(), 14));
}
