//! Burn-in with simulated time: Validating until the command passes. Every input goes through
//! `step` and time through `tick`, as the engine drives them.

use crate::test_utils::{
    T0, cordon_reason, diagnostics_at, refusal, reg, register_at, starts, step_ok, step_raw,
    submit_at, t, tick_at,
};
use std::time::Duration;

use super::*;
use crate::job::JobPhase;
use crate::lemons::{Ledger, LemonConfig, LemonRecord, SubjectKind};
use crate::state::StateError;
use crate::step::Input;

fn cfg(on_join: bool, on_uncordon: bool) -> BurnInConfig {
    BurnInConfig {
        on_join,
        on_uncordon,
        command: vec!["dcgmi".into(), "diag".into(), "-r".into(), "3".into()],
        timeout: Duration::from_secs(60),
    }
}

fn state(burn_in: BurnInConfig) -> ClusterState {
    let mut s = crate::test_utils::patient_state();
    s.burn_in = burn_in;
    s
}

/// Register `node` through `step`.
fn join(s: &mut ClusterState, node: &str, session: u64, now: Now) -> Vec<Effect> {
    register_at(s, reg(node, session), now)
}

fn cordon(s: &mut ClusterState, node: &str, reason: &str, now: Now) -> Vec<Effect> {
    step_ok(
        s,
        Input::Cordon {
            node: node.to_owned(),
            reason: reason.to_owned(),
        },
        now,
    )
}

fn uncordon(s: &mut ClusterState, node: &str, force: bool, now: Now) -> Vec<Effect> {
    step_raw(
        s,
        Input::Uncordon {
            node: node.to_owned(),
            force,
        },
        now,
    )
}

fn sent(effects: &[Effect]) -> Vec<(String, Vec<String>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Command {
                node,
                kind: v1::command::Kind::RunDiagnostics(r),
            } => Some((node.clone(), r.command.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_node_is_validating_until_its_burn_in_passes() {
    let mut s = state(cfg(true, false));
    let e = join(&mut s, "n1", 1, t(0));
    assert!(e.iter().any(|e| matches!(
        e,
        Effect::Cordoned {
            rule: crate::kinds::CordonRule::BurnIn,
            ..
        }
    )));
    assert_eq!(s.nodes["n1"].display_state(), "Validating");
    assert!(!crate::jobs::eligible(&s.nodes["n1"], 1), "not schedulable");
    let e = tick_at(&mut s, t(1));
    assert_eq!(sent(&e), [("n1".to_owned(), cfg(true, false).command)]);
    assert!(sent(&tick_at(&mut s, t(2))).is_empty(), "sent once");
    let e = diagnostics_at(&mut s, "n1", true, "dcgmi passed", t(30));
    assert!(e.iter().any(|e| matches!(e, Effect::Uncordoned { .. })));
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
    assert!(crate::jobs::eligible(&s.nodes["n1"], 1));
    let history: Vec<&str> = s.nodes["n1"]
        .events
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    // Validating, the diagnostics' own record, then the burn-in's verdict.
    assert!(
        history.ends_with(&["burn-in", "diagnostics", "burn-in"]),
        "{history:?}"
    );
}

#[test]
fn a_node_joining_is_cordoned_for_burn_in_before_the_scheduler_sees_it() {
    let mut s = state(cfg(true, false));
    // n0 is validating too: the cluster knows a node, and none is eligible.
    join(&mut s, "n0", 1, t(0));
    let spec = r#"name = "train"
nodes = 1
gpus_per_node = 1
command = ["python3", "train.py"]
workdir = "/w"
[checkpoint]
dir = "/c"
"#;
    let id = submit_at(&mut s, spec, t(1));
    assert_eq!(s.jobs[&id].phase, JobPhase::Pending);

    let e = join(&mut s, "n1", 2, t(2));
    assert!(
        e.iter().any(|e| matches!(
            e,
            Effect::Cordoned { node, rule: crate::kinds::CordonRule::BurnIn, .. } if node == "n1"
        )),
        "{e:?}"
    );
    assert_eq!(s.nodes["n1"].display_state(), "Validating");
    assert!(starts(&e).is_empty(), "nothing starts on it: {e:?}");
    let job = &s.jobs[&id];
    assert_eq!(
        job.phase,
        JobPhase::Pending,
        "not placed on a node in burn-in"
    );
    assert!(job.placement.is_empty());
    assert_eq!(job.attempt, 0);

    let e = tick_at(&mut s, t(3));
    assert!(sent(&e).contains(&("n1".to_owned(), cfg(true, false).command)));
    assert_eq!(s.jobs[&id].phase, JobPhase::Pending, "still validating");

    let e = diagnostics_at(&mut s, "n1", true, "dcgmi passed", t(30));
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
    let job = &s.jobs[&id];
    assert_eq!(
        job.phase,
        JobPhase::Running,
        "starts once the burn-in passed"
    );
    assert_eq!(job.placement, ["n1"]);
    let started: Vec<String> = starts(&e).into_iter().map(|(n, _)| n).collect();
    assert_eq!(started, ["n1"], "in the same step");
}

#[test]
fn a_failed_burn_in_keeps_the_node_cordoned_with_the_reason() {
    let mut s = state(cfg(true, false));
    join(&mut s, "n1", 1, t(0));
    tick_at(&mut s, t(1));
    diagnostics_at(
        &mut s,
        "n1",
        false,
        "dcgmi failed (exit status: 226)",
        t(30),
    );
    let n = &s.nodes["n1"];
    assert_eq!(n.display_state(), "Cordoned");
    let reason = cordon_reason(&s, "n1");
    assert!(
        reason.starts_with("burn-in failed: dcgmi failed"),
        "{reason}"
    );
    assert!(reason.contains("clusterctl node n1"), "{reason}");
    assert!(n.record.burn_in.is_none());
}

#[test]
fn an_uncordon_runs_the_burn_in_first_when_configured() {
    let mut s = state(cfg(false, true));
    join(&mut s, "n1", 1, t(0));
    assert_eq!(
        s.nodes["n1"].display_state(),
        "Ready",
        "joining needs no burn-in here"
    );
    cordon(&mut s, "n1", "fan replaced", t(1));
    let e = uncordon(&mut s, "n1", false, t(2));
    assert!(
        !e.iter().any(|e| matches!(e, Effect::Refused(_))),
        "accepted: {e:?}"
    );
    assert_eq!(s.nodes["n1"].display_state(), "Validating");
    assert_eq!(sent(&tick_at(&mut s, t(3))).len(), 1);
    diagnostics_at(&mut s, "n1", true, "dcgmi passed", t(40));
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
}

#[test]
fn without_burn_in_nodes_join_and_uncordon_at_once() {
    let mut s = state(BurnInConfig::default());
    join(&mut s, "n1", 1, t(0));
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
    cordon(&mut s, "n1", "x", t(1));
    let e = uncordon(&mut s, "n1", false, t(2));
    assert!(
        e.iter().any(|e| matches!(e, Effect::Uncordoned { .. })),
        "{e:?}"
    );
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
    assert!(sent(&tick_at(&mut s, t(3))).is_empty());
    // Other diagnostics are recorded, and the burn-in does nothing with them.
    let e = diagnostics_at(&mut s, "n1", false, "other diagnostics", t(4));
    assert!(
        !e.iter().any(
            |e| matches!(e, Effect::Cordoned { .. } | Effect::Uncordoned { .. })
                || matches!(e, Effect::Record { event, .. } if event.kind == "burn-in")
        ),
        "{e:?}"
    );
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
}

#[test]
fn no_result_within_the_timeout_fails_the_burn_in() {
    let mut s = state(cfg(true, false));
    join(&mut s, "n1", 1, t(0));
    tick_at(&mut s, t(1));
    tick_at(&mut s, t(70));
    assert_eq!(
        s.nodes["n1"].display_state(),
        "Validating",
        "timeout plus a grace"
    );
    tick_at(&mut s, t(72));
    let reason = cordon_reason(&s, "n1");
    assert!(
        reason.starts_with("burn-in failed: no result within"),
        "{reason}"
    );
}

#[test]
fn a_disconnect_before_the_result_sends_the_burn_in_again() {
    let mut s = state(cfg(true, false));
    join(&mut s, "n1", 1, t(0));
    tick_at(&mut s, t(1));
    step_ok(
        &mut s,
        Input::Disconnected {
            node: "n1".into(),
            session: 1,
        },
        t(2),
    );
    assert!(sent(&tick_at(&mut s, t(3))).is_empty());
    join(&mut s, "n1", 2, t(4));
    assert_eq!(
        sent(&tick_at(&mut s, t(5))).len(),
        1,
        "again, to the new session"
    );
}

#[test]
fn a_lemon_joining_is_not_burned_in_and_the_node_must_exist() {
    let mut s = state(cfg(true, false));
    // n2's host was blocklisted before (the ledger is persisted): it joins a lemon.
    s.lemons = Ledger::new(
        LemonConfig::default(),
        vec![LemonRecord {
            kind: SubjectKind::Host,
            id: "n2".into(),
            node: "n2".into(),
            incidents: Vec::new(),
            blocklisted_at_ms: Some(T0),
            cleared_at_ms: None,
        }],
    );
    join(&mut s, "n1", 1, t(0));
    tick_at(&mut s, t(1));
    diagnostics_at(&mut s, "n1", true, "ok", t(1));
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
    let e = join(&mut s, "n2", 2, t(2));
    assert!(
        !e.iter().any(|e| matches!(
            e,
            Effect::Cordoned {
                rule: crate::kinds::CordonRule::BurnIn,
                ..
            }
        )),
        "the cordon decides: {e:?}"
    );
    assert!(
        cordon_reason(&s, "n2").starts_with("repeat-offender: "),
        "{}",
        cordon_reason(&s, "n2")
    );
    assert!(s.nodes["n2"].record.burn_in.is_none());
    assert_eq!(s.nodes["n2"].display_state(), "Cordoned");
    assert!(sent(&tick_at(&mut s, t(3))).is_empty());
    assert!(matches!(
        refusal(&uncordon(&mut s, "nope", true, t(4))),
        StateError::UnknownNode(_)
    ));
}

#[test]
fn the_timeout_and_command_are_validated() {
    assert!(BurnInConfig::default().validate().is_ok());
    let bad = BurnInConfig {
        timeout: Duration::ZERO,
        ..BurnInConfig::default()
    };
    assert!(bad.validate().is_err());
    let empty = BurnInConfig {
        command: vec![String::new()],
        ..BurnInConfig::default()
    };
    assert!(empty.validate().is_err());
}
