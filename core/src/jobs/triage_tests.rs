//! Triage with simulated time: the gang is diagnosed after an unexplained
//! failure, failing nodes are cordoned, and only then the job relaunches.
//! Every input goes through `step` and time through `tick`, as the engine drives them.

use crate::test_utils::{diagnostics_at, submit_at, t, tick_at};
use std::time::Duration;

use vigil_proto::v1;

use super::*;

/// Four nodes that never go silent long enough to be Lost here.
fn cluster(cfg: TriageConfig) -> ClusterState {
    let mut s = crate::test_utils::patient_cluster(4, 8);
    s.triage = cfg;
    s
}

const SPEC: &str = r#"name = "train"
nodes = 3
gpus_per_node = 8
command = ["python3", "train.py"]
workdir = "/w"
spare_nodes = 1
[checkpoint]
dir = "/c"
[restart]
max_restarts = 5
backoff = "1s"
[progress]
hang_timeout = "60s"
"#;

use crate::test_utils::event_at as agent_event;

fn confirm_stops(s: &mut ClusterState, job: &str, now: Now) -> Vec<Effect> {
    let attempt = s.jobs[job].attempt;
    let nodes: Vec<String> = s.jobs[job].workers.keys().cloned().collect();
    let mut out = Vec::new();
    for node in nodes {
        let kind = v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
            job_id: job.into(),
            attempt,
            stopped: true,
            ..Default::default()
        });
        out.extend(agent_event(s, &node, kind, now));
    }
    out
}

fn diagnosed(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Command {
                node,
                kind: v1::command::Kind::RunDiagnostics(_),
            } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn tick(s: &mut ClusterState, now: Now) -> Vec<Effect> {
    tick_at(s, now)
}

/// `node`'s diagnostics result, through `step`.
fn result(s: &mut ClusterState, node: &str, passed: bool, now: Now) -> Vec<Effect> {
    let summary = if passed {
        "all checks passed"
    } else {
        "GPU memory test: 12 errors on GPU 2"
    };
    diagnostics_at(s, node, passed, summary, now)
}

/// Submit, then hang at 61 s and confirm every stop at 62 s.
fn hung_and_stopped(s: &mut ClusterState) -> (String, Vec<Effect>) {
    let id = submit_at(s, SPEC, t(0));
    assert_eq!(s.jobs[&id].placement, ["n1", "n2", "n3"]);
    tick(s, t(60));
    assert_eq!(s.jobs[&id].phase, JobPhase::Running, "60 s is not past");
    tick(s, t(61));
    assert_eq!(s.jobs[&id].phase, JobPhase::Stopping);
    let effects = confirm_stops(s, &id, t(62));
    (id, effects)
}

#[test]
fn a_hang_diagnoses_the_whole_gang_and_relaunches_without_the_node_that_fails() {
    let mut s = cluster(TriageConfig::default());
    let (id, effects) = hung_and_stopped(&mut s);
    assert_eq!(diagnosed(&effects), ["n1", "n2", "n3"], "all at once");
    assert_eq!(s.jobs[&id].phase, JobPhase::Restarting);
    tick(&mut s, t(70));
    assert_eq!(
        s.jobs[&id].attempt, 1,
        "no relaunch while triage runs, backoff or not"
    );

    result(&mut s, "n1", true, t(71));
    let e = result(&mut s, "n2", false, t(72));
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::Cordoned { node, rule: crate::kinds::CordonRule::Triage, .. } if node == "n2"))
    );
    let reason = s.nodes["n2"]
        .record
        .cordon
        .as_ref()
        .map(|c| c.reason.clone())
        .unwrap_or_default();
    assert!(
        reason.starts_with("triage: diagnostics failed after job train-1 attempt 1"),
        "{reason}"
    );
    assert_eq!(s.jobs[&id].attempt, 1, "n3 still running its diagnostics");

    result(&mut s, "n3", true, t(73));
    assert_eq!(
        s.jobs[&id].attempt, 2,
        "relaunched once every verdict is in"
    );
    assert_eq!(
        s.jobs[&id].placement,
        ["n1", "n3", "n4"],
        "the spare replaces n2"
    );
    let verdicts = &s.jobs[&id].attempts[0].triage;
    assert_eq!(verdicts["n1"], Verdict::Passed("all checks passed".into()));
    assert!(matches!(verdicts["n2"], Verdict::Failed(_)));
    let history = s.jobs[&id]
        .events
        .iter()
        .filter(|e| e.kind == "triage")
        .count();
    assert_eq!(history, 2, "started, and done with each node's result");
    assert_eq!(
        s.lemons.records["host/n2"].incidents[0].kind, "triage_failed",
        "a triage failure is charged to the host"
    );
}

#[test]
fn a_node_that_does_not_answer_within_the_budget_is_inconclusive() {
    let cfg = TriageConfig {
        budget: Duration::from_secs(30),
        ..TriageConfig::default()
    };
    let mut s = cluster(cfg);
    let (id, _) = hung_and_stopped(&mut s);
    result(&mut s, "n1", true, t(63));
    result(&mut s, "n2", true, t(63));
    tick(&mut s, t(91));
    assert_eq!(s.jobs[&id].attempt, 1, "budget not spent yet");
    tick(&mut s, t(92));
    assert_eq!(s.jobs[&id].attempt, 2);
    assert_eq!(s.jobs[&id].attempts[0].triage["n3"], Verdict::TimedOut);
    assert!(
        s.nodes["n3"].record.cordon.is_none(),
        "no answer is no proof"
    );
    assert_eq!(s.jobs[&id].placement, ["n1", "n2", "n3"]);
}

#[test]
fn triage_can_be_turned_off() {
    let cfg = TriageConfig {
        enabled: false,
        ..TriageConfig::default()
    };
    let mut s = cluster(cfg);
    let (id, effects) = hung_and_stopped(&mut s);
    assert!(diagnosed(&effects).is_empty());
    tick(&mut s, t(63));
    assert_eq!(s.jobs[&id].attempt, 2);
}

#[test]
fn triage_only_from_the_nth_unexplained_failure() {
    let cfg = TriageConfig {
        after_failures: 2,
        ..TriageConfig::default()
    };
    let mut s = cluster(cfg);
    let (id, effects) = hung_and_stopped(&mut s);
    assert!(
        diagnosed(&effects).is_empty(),
        "first failure: relaunch at once"
    );
    tick(&mut s, t(63));
    assert_eq!(s.jobs[&id].attempt, 2);
    let kind = v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
        job_id: id.clone(),
        attempt: 2,
        exit_code: Some(1),
        ..Default::default()
    });
    agent_event(&mut s, "n1", kind, t(70));
    let effects = confirm_stops(&mut s, &id, t(71));
    assert_eq!(
        diagnosed(&effects),
        ["n1", "n2", "n3"],
        "second unexplained failure"
    );
}

#[test]
fn a_failure_with_a_culprit_is_not_triaged() {
    let mut s = cluster(TriageConfig::default());
    let id = submit_at(&mut s, SPEC, t(0));
    let kind = v1::agent_event::Kind::Xid(v1::XidError {
        gpu_index: 3,
        xid: 79,
        gpu_uuid: "GPU-n2-3".into(),
    });
    agent_event(&mut s, "n2", kind, t(5));
    let effects = confirm_stops(&mut s, &id, t(6));
    assert!(diagnosed(&effects).is_empty());
    tick(&mut s, t(8));
    assert_eq!(s.jobs[&id].attempt, 2);
}

#[test]
fn a_worker_its_agent_stopped_unasked_is_not_triaged() {
    // A coordinator paused past the lease: the agent's (or the shim's) fence stopped the worker,
    // and that report may arrive before the agent re-registers without it.
    let mut s = cluster(TriageConfig::default());
    let id = submit_at(&mut s, SPEC, t(0));
    let kind = v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
        job_id: id.clone(),
        attempt: 1,
        signal: Some(15),
        stopped: true,
        reason: "lease expired: no live agent renewed it for 8.1s".into(),
        ..Default::default()
    });
    agent_event(&mut s, "n2", kind, t(5));
    assert_eq!(s.jobs[&id].phase, JobPhase::Stopping);
    let failure = s.jobs[&id].failure_kind;
    assert_eq!(
        failure,
        Some(FailureKind::WorkerGone),
        "explained: the lease"
    );
    let effects = confirm_stops(&mut s, &id, t(6));
    assert!(diagnosed(&effects).is_empty(), "no triage");
    tick(&mut s, t(8));
    assert_eq!(s.jobs[&id].attempt, 2);
}

#[test]
fn the_budget_and_threshold_are_validated() {
    assert!(TriageConfig::default().validate().is_ok());
    let zero = TriageConfig {
        after_failures: 0,
        ..TriageConfig::default()
    };
    assert!(zero.validate().is_err());
    let long = TriageConfig {
        budget: Duration::from_secs(7200),
        ..TriageConfig::default()
    };
    assert!(long.validate().is_err());
}
