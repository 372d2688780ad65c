//! The remediation ladder across a coordinator restart, on simulated time: the node's ladder is
//! persisted on its record and its monotonic instants are put at the restart.

use super::tests::{
    HOUR, answer, at_reboot, cluster, counted, fault, ladder, remediates, runs_out_of_budget,
};
use super::*;
use crate::node::NodeRecord;
use crate::state::ClusterState;
use crate::test_utils::{reg_with_gpus, register_at, t, tick_at};

#[test]
fn the_window_survives_a_coordinator_restart() {
    let mut s = cluster(1);
    fault(&mut s, "n0", 0, 48, 10);
    let mut s = restarted(&s);
    assert_eq!(ladder(&s, "n0").marks.len(), 1, "the mark is persisted");
    register_at(&mut s, reg_with_gpus("n0", 1, 2), t(5));
    let sent = fault(&mut s, "n0", 0, 48, 20 * HOUR);
    assert_eq!(
        sent.len(),
        1,
        "the mark from before the restart still counts"
    );
}

/// `s` as a new coordinator process loads it from the store (its monotonic clock at zero).
fn restarted(s: &ClusterState) -> ClusterState {
    let records: Vec<NodeRecord> = s
        .nodes
        .values()
        .map(|n| {
            let text = serde_json::to_string(&*n.record).expect("encodes");
            serde_json::from_str(&text).expect("decodes")
        })
        .collect();
    let mut s = ClusterState::load(records, Vec::new(), s.liveness, s.health.clone(), t(0));
    s.remediation = RemediationConfig::default();
    s
}

#[test]
fn a_step_sent_before_a_restart_is_re_sent_once_and_timed_from_the_restart() {
    let mut s = cluster(1);
    fault(&mut s, "n0", 0, 48, 10);
    let before = fault(&mut s, "n0", 0, 48, 20).remove(0).1;
    let mut s = restarted(&s);
    register_at(&mut s, reg_with_gpus("n0", 3, 2), t(5));
    let sent = remediates(&tick_at(&mut s, t(6)));
    assert_eq!(sent.len(), 1, "re-sent on the new session: {sent:?}");
    assert_eq!(
        sent[0].1.step_id, before.step_id,
        "the same step: the agent runs it once"
    );
    let why = runs_out_of_budget(&mut s, 6, Step::GpuReset);
    assert!(why.contains("no answer"), "{why}");
}

#[test]
fn a_reboot_issued_before_a_restart_ends_when_the_node_comes_back() {
    let (mut s, reboot) = at_reboot();
    answer(&mut s, "n0", &reboot, true, "reboot issued", 31);
    let mut s = restarted(&s);
    let e = register_at(&mut s, reg_with_gpus("n0", 3, 2), t(5));
    assert_eq!(counted(&e), [(Step::Reboot, "ok")]);
    assert!(
        remediates(&tick_at(&mut s, t(6))).is_empty(),
        "never sent again"
    );
    assert_eq!(s.nodes["n0"].display_state(), "Validating");
}
