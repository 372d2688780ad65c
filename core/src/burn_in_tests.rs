//! Burn-in with simulated time: Validating until the command passes.

use crate::test_utils::{reg, t};
use std::time::Duration;

use super::*;
use crate::config::{HealthConfig, LivenessConfig};
use crate::state::StateError;

fn cfg(on_join: bool, on_uncordon: bool) -> BurnInConfig {
    BurnInConfig {
        on_join,
        on_uncordon,
        command: vec!["dcgmi".into(), "diag".into(), "-r".into(), "3".into()],
        timeout: Duration::from_secs(60),
    }
}

fn state(burn_in: BurnInConfig) -> ClusterState {
    let liveness = LivenessConfig {
        unreachable_after: Duration::from_secs(3600),
        lost_after: Duration::from_secs(7200),
        ..LivenessConfig::default()
    };
    let mut s = ClusterState::load(
        Vec::new(),
        Vec::new(),
        liveness,
        HealthConfig::default(),
        t(0),
    );
    s.burn_in = burn_in;
    s
}

/// Register `node` the way the engine applies it.
fn join(s: &mut ClusterState, node: &str, session: u64, now: Now) -> Vec<Effect> {
    let mut e = s.register(reg(node, session), now);
    let more = s.burn_in_react(&e, now);
    e.extend(more);
    e
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
            rule: "burn_in",
            ..
        }
    )));
    assert_eq!(s.nodes["n1"].display_state(), "Validating");
    assert!(!crate::jobs::eligible(&s.nodes["n1"], 1), "not schedulable");
    let e = s.burn_in_tick(t(1));
    assert_eq!(sent(&e), [("n1".to_owned(), cfg(true, false).command)]);
    assert!(sent(&s.burn_in_tick(t(2))).is_empty(), "sent once");
    let e = s.burn_in_result("n1", true, "dcgmi passed", t(30));
    assert!(e.iter().any(|e| matches!(e, Effect::Uncordoned { .. })));
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
    assert!(crate::jobs::eligible(&s.nodes["n1"], 1));
    let history: Vec<&str> = s.nodes["n1"]
        .events
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert!(history.ends_with(&["burn-in", "burn-in"]), "{history:?}");
}

#[test]
fn a_failed_burn_in_keeps_the_node_cordoned_with_the_reason() {
    let mut s = state(cfg(true, false));
    join(&mut s, "n1", 1, t(0));
    s.burn_in_tick(t(1));
    s.burn_in_result("n1", false, "dcgmi failed (exit status: 226)", t(30));
    let n = &s.nodes["n1"];
    assert_eq!(n.display_state(), "Cordoned");
    let reason = n
        .record
        .cordon
        .as_ref()
        .map(|c| c.reason.clone())
        .unwrap_or_default();
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
    s.cordon("n1", "fan replaced".into(), CordonSource::Operator, t(1))
        .expect("cordons");
    s.uncordon("n1", false, t(2)).expect("accepted");
    assert_eq!(s.nodes["n1"].display_state(), "Validating");
    assert_eq!(sent(&s.burn_in_tick(t(3))).len(), 1);
    s.burn_in_result("n1", true, "dcgmi passed", t(40));
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
}

#[test]
fn without_burn_in_nodes_join_and_uncordon_at_once() {
    let mut s = state(BurnInConfig::default());
    join(&mut s, "n1", 1, t(0));
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
    s.cordon("n1", "x".into(), CordonSource::Operator, t(1))
        .expect("cordons");
    s.uncordon("n1", false, t(2)).expect("uncordons");
    assert_eq!(s.nodes["n1"].display_state(), "Ready");
    assert!(sent(&s.burn_in_tick(t(3))).is_empty());
    assert!(
        s.burn_in_result("n1", false, "other diagnostics", t(4))
            .is_empty()
    );
}

#[test]
fn no_result_within_the_timeout_fails_the_burn_in() {
    let mut s = state(cfg(true, false));
    join(&mut s, "n1", 1, t(0));
    s.burn_in_tick(t(1));
    s.burn_in_tick(t(70));
    assert_eq!(
        s.nodes["n1"].display_state(),
        "Validating",
        "timeout plus a grace"
    );
    s.burn_in_tick(t(72));
    let reason = s.nodes["n1"]
        .record
        .cordon
        .as_ref()
        .map(|c| c.reason.clone())
        .unwrap_or_default();
    assert!(
        reason.starts_with("burn-in failed: no result within"),
        "{reason}"
    );
}

#[test]
fn a_disconnect_before_the_result_sends_the_burn_in_again() {
    let mut s = state(cfg(true, false));
    join(&mut s, "n1", 1, t(0));
    s.burn_in_tick(t(1));
    s.disconnected("n1", 1, t(2));
    assert!(sent(&s.burn_in_tick(t(3))).is_empty());
    join(&mut s, "n1", 2, t(4));
    assert_eq!(
        sent(&s.burn_in_tick(t(5))).len(),
        1,
        "again, to the new session"
    );
}

#[test]
fn a_lemon_joining_is_not_burned_in_and_the_node_must_exist() {
    let mut s = state(cfg(true, false));
    join(&mut s, "n1", 1, t(0));
    s.burn_in_result("n1", true, "ok", t(1));
    assert!(s.start_burn_in("nope", "join", t(2)).is_empty());
    s.cordon("n1", "repeat-offender: x".into(), CordonSource::Auto, t(2))
        .expect("cordons");
    assert!(
        s.start_burn_in("n1", "join", t(3)).is_empty(),
        "the cordon decides"
    );
    assert!(matches!(
        s.uncordon("n2", true, t(4)),
        Err(StateError::UnknownNode(_))
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
