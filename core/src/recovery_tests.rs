//! The recovery hold, rule by rule, driven the way the engine drives the core: inputs through
//! `step`, time through `tick`.

use vigil_proto::v1;

use super::*;
use crate::job::JobPhase;
use crate::node::Cordon;
use crate::state::StateError;
use crate::step::Input;
use crate::test_utils::{
    T0, agent_event, patient_state, refusal, reg, register_at, starts, step_ok, step_raw, stops,
    submit_at, t, tick_at,
};

/// A one-node job of one GPU (the test nodes have one each).
fn spec() -> String {
    r#"name = "train"
nodes = 1
gpus_per_node = 1
command = ["python3", "train.py"]
workdir = "/w"
[checkpoint]
dir = "/c"
[restart]
max_restarts = 5
backoff = "5s"
"#
    .to_owned()
}

fn report(lost_nodes: &[&str]) -> Recovered {
    Recovered {
        damage: "nodes tree checksum mismatch".into(),
        lost: vec![
            "nodes/n9: checksum mismatch".into(),
            "jobs/j-7: unreadable".into(),
        ],
        lost_nodes: lost_nodes.iter().map(|n| (*n).to_owned()).collect(),
        lost_jobs: vec!["j-7".into()],
        damaged_copy: "/var/lib/vigil/damaged-1".into(),
    }
}

fn begin(s: &mut ClusterState, lost_nodes: &[&str], now: Now) -> Vec<Effect> {
    step_ok(s, Input::BeginRecovery(report(lost_nodes)), now)
}

fn confirm(s: &mut ClusterState, now: Now) -> Vec<Effect> {
    step_raw(
        s,
        Input::ConfirmRecovery {
            by: "alice (admin)".into(),
        },
        now,
    )
}

fn uncordon(s: &mut ClusterState, node: &str, now: Now) -> Vec<Effect> {
    step_raw(
        s,
        Input::Uncordon {
            node: node.into(),
            force: false,
        },
        now,
    )
}

fn cordon_of(s: &ClusterState, node: &str) -> Option<Cordon> {
    s.nodes[node].record.cordon.clone()
}

fn persisted_hold(effects: &[Effect]) -> Option<RecoveryHold> {
    effects.iter().find_map(|e| match e {
        Effect::PersistRecovery(h) => Some((**h).clone()),
        _ => None,
    })
}

/// Two connected nodes, n0 and n1.
fn two_nodes() -> ClusterState {
    let mut s = patient_state();
    register_at(&mut s, reg("n0", 1), t(0));
    register_at(&mut s, reg("n1", 2), t(0));
    s
}

#[test]
fn beginning_cordons_every_known_node_for_review_and_persists_the_hold() {
    let mut s = two_nodes();
    let effects = begin(&mut s, &[], t(10));
    let hold = persisted_hold(&effects).expect("the hold is persisted");
    assert_eq!(hold.since_unix_ms, T0 + 10_000);
    assert_eq!(hold.lost.len(), 2);
    assert_eq!(hold.lost_jobs, ["j-7"]);
    assert_eq!(hold.damaged_copy, "/var/lib/vigil/damaged-1");
    assert!(hold.holds_jobs() && !hold.confirmed());
    assert_eq!(s.recovery.as_ref(), Some(&hold));
    assert!(s.jobs_held());
    for node in ["n0", "n1"] {
        let cordon = cordon_of(&s, node).expect("cordoned");
        assert_eq!(cordon.source, CordonSource::Recovery);
        assert_eq!(
            cordon.reason,
            format!(
                "state store recovered at 2023-11-14T22:13:30Z: review this node (clusterctl \
                 node {node}), then clusterctl uncordon {node}"
            )
        );
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Cordoned { node: n, rule: CordonRule::Recovery, .. } if n == node
        )));
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Persist(r) if r.name == node && r.cordon.as_ref() == Some(&cordon)
        )));
        assert_eq!(
            s.nodes[node].events.back().map(|e| e.message.clone()),
            Some(format!("cordoned (recovery): {}", cordon.reason))
        );
    }
}

#[test]
fn a_node_already_cordoned_keeps_its_cordon() {
    let mut s = two_nodes();
    step_ok(
        &mut s,
        Input::Cordon {
            node: "n1".into(),
            reason: "bad fan".into(),
        },
        t(1),
    );
    let effects = begin(&mut s, &[], t(10));
    let kept = cordon_of(&s, "n1").expect("still cordoned");
    assert_eq!(
        (kept.source, kept.reason.as_str()),
        (CordonSource::Operator, "bad fan")
    );
    assert!(!effects.iter().any(|e| matches!(
        e,
        Effect::Cordoned { node, .. } if node == "n1"
    )));
    assert_eq!(
        cordon_of(&s, "n0").map(|c| c.source),
        Some(CordonSource::Recovery)
    );
}

#[test]
fn a_known_node_whose_record_was_lost_gets_an_event() {
    let mut s = two_nodes();
    begin(&mut s, &["n1"], t(10));
    let last_two: Vec<&str> = s.nodes["n1"]
        .events
        .iter()
        .rev()
        .take(2)
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(last_two, ["cordon", EVENT_KIND]);
    assert!(!s.nodes["n0"].events.iter().any(|e| e.kind == EVENT_KIND));
}

#[test]
fn an_unconfirmed_hold_starts_no_job_and_says_why() {
    let mut s = two_nodes();
    begin(&mut s, &[], t(10));
    // Even on a node an operator has reviewed and uncordoned.
    uncordon(&mut s, "n0", t(11));
    assert!(cordon_of(&s, "n0").is_none());
    let id = submit_at(&mut s, &spec(), t(12));
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Pending);
    assert_eq!(job.reason, JOBS_HELD);
    assert!(starts(&tick_at(&mut s, t(20))).is_empty());
    assert_eq!(s.jobs[&id].phase, JobPhase::Pending);
}

#[test]
fn a_job_waiting_when_the_hold_begins_is_held_with_the_reason_persisted() {
    let mut s = two_nodes();
    for node in ["n0", "n1"] {
        step_ok(
            &mut s,
            Input::Cordon {
                node: node.into(),
                reason: "maintenance".into(),
            },
            t(1),
        );
    }
    let id = submit_at(&mut s, &spec(), t(2));
    assert_eq!(s.jobs[&id].phase, JobPhase::Pending);
    assert_ne!(s.jobs[&id].reason, JOBS_HELD);
    let effects = begin(&mut s, &[], t(10));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::PersistJob(j) if j.id == id && j.reason == JOBS_HELD
    )));
}

#[test]
fn running_jobs_are_not_stopped_by_the_hold_and_restarts_wait_for_the_confirmation() {
    let mut s = two_nodes();
    // A crash would otherwise be triaged first; this is about the restart.
    s.triage.enabled = false;
    let id = submit_at(&mut s, &spec(), t(1));
    let node = s.jobs[&id].placement[0].clone();
    agent_event(
        &mut s,
        &node,
        v1::AgentEvent {
            at_unix_ms: 0,
            kind: Some(v1::agent_event::Kind::WorkerStarted(v1::WorkerStarted {
                job_id: id.clone(),
                attempt: 1,
                pid: 7,
                log_path: String::new(),
            })),
        },
        t(2),
    );
    let effects = begin(&mut s, &[], t(10));
    assert!(stops(&effects).is_empty(), "{effects:?}");
    assert!(stops(&tick_at(&mut s, t(11))).is_empty());
    assert_eq!(s.jobs[&id].phase, JobPhase::Running);
    assert_eq!(
        cordon_of(&s, &node).map(|c| c.source),
        Some(CordonSource::Recovery)
    );
    // The worker crashes: the job would restart after its backoff, but the hold keeps it.
    agent_event(
        &mut s,
        &node,
        v1::AgentEvent {
            at_unix_ms: 0,
            kind: Some(v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
                job_id: id.clone(),
                attempt: 1,
                exit_code: Some(1),
                ..Default::default()
            })),
        },
        t(12),
    );
    assert_eq!(s.jobs[&id].phase, JobPhase::Restarting);
    uncordon(&mut s, "n0", t(13));
    uncordon(&mut s, "n1", t(13));
    let effects = tick_at(&mut s, t(30));
    assert!(starts(&effects).is_empty());
    let job = &s.jobs[&id];
    assert_eq!(
        (job.phase, job.reason.as_str()),
        (JobPhase::Pending, JOBS_HELD)
    );
    assert!(job.placement.is_empty(), "a held job holds no node");
    assert_eq!(
        job.events
            .last()
            .map(|e| (e.kind.as_str(), e.message.as_str())),
        Some(("pending", JOBS_HELD))
    );
    // Confirmed: it starts at once, attempt 2 (once node rank 0 scanned its checkpoints).
    let effects = confirm(&mut s, t(31));
    let effects = crate::test_utils::with_scans_answered(&mut s, effects, t(31));
    assert_eq!(starts(&effects).len(), 1, "{effects:?}");
    assert_eq!(
        (s.jobs[&id].phase, s.jobs[&id].attempt),
        (JobPhase::Running, 2)
    );
}

#[test]
fn a_node_registering_for_the_first_time_during_the_hold_is_cordoned() {
    let mut s = two_nodes();
    begin(&mut s, &[], t(10));
    let effects = register_at(&mut s, reg("n2", 3), t(11));
    let cordon = cordon_of(&s, "n2").expect("cordoned on registration");
    assert_eq!(cordon.source, CordonSource::Recovery);
    assert!(cordon.reason.contains("clusterctl uncordon n2"));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Persist(r) if r.name == "n2" && r.cordon.is_some()
    )));
    // A known node coming back is not cordoned again once reviewed.
    uncordon(&mut s, "n0", t(12));
    register_at(&mut s, reg("n0", 4), t(13));
    assert!(cordon_of(&s, "n0").is_none());
}

#[test]
fn a_recovery_cordon_wins_over_the_join_burn_in() {
    let mut s = two_nodes();
    s.burn_in.on_join = true;
    begin(&mut s, &[], t(10));
    register_at(&mut s, reg("n2", 3), t(11));
    let n2 = &s.nodes["n2"];
    assert_eq!(
        n2.record.cordon.as_ref().map(|c| c.source),
        Some(CordonSource::Recovery)
    );
    assert!(n2.record.burn_in.is_none());
}

#[test]
fn after_the_confirmation_only_nodes_whose_records_were_lost_are_cordoned_on_joining() {
    let mut s = two_nodes();
    begin(&mut s, &["n9"], t(10));
    confirm(&mut s, t(11));
    register_at(&mut s, reg("n2", 3), t(12));
    assert!(cordon_of(&s, "n2").is_none(), "a new node joins as usual");
    register_at(&mut s, reg("n9", 4), t(13));
    let cordon = cordon_of(&s, "n9").expect("a lost node is reviewed");
    assert_eq!(cordon.source, CordonSource::Recovery);
    let kinds: Vec<&str> = s.nodes["n9"]
        .events
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(kinds, ["registered", EVENT_KIND, "cordon"]);
}

#[test]
fn confirming_lets_jobs_start_on_uncordoned_nodes_and_keeps_the_cordons() {
    let mut s = two_nodes();
    begin(&mut s, &[], t(10));
    let id = submit_at(&mut s, &spec(), t(11));
    let effects = confirm(&mut s, t(12));
    let hold = persisted_hold(&effects).expect("the confirmation is persisted");
    assert_eq!(hold.confirmed_by.as_deref(), Some("alice (admin)"));
    assert_eq!(hold.confirmed_at_unix_ms, Some(T0 + 12_000));
    assert!(!s.jobs_held());
    assert!(starts(&effects).is_empty(), "every node is still cordoned");
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Pending);
    assert!(
        job.reason.starts_with("waiting for 1 eligible nodes"),
        "{}",
        job.reason
    );
    for node in ["n0", "n1"] {
        assert_eq!(
            cordon_of(&s, node).map(|c| c.source),
            Some(CordonSource::Recovery)
        );
    }
    // A recovery cordon is lifted like an operator's: no diagnostics, no --force.
    let effects = uncordon(&mut s, "n1", t(13));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Uncordoned { node, previous } if node == "n1" && previous.source == CordonSource::Recovery))
    );
    assert_eq!(starts(&effects).len(), 1);
    assert_eq!(s.jobs[&id].placement, ["n1"]);
}

#[test]
fn confirming_without_a_hold_or_twice_is_refused_with_a_clear_message() {
    let mut s = two_nodes();
    let err = refusal(&confirm(&mut s, t(1)));
    assert!(matches!(err, StateError::NoRecoveryHold(_)));
    assert_eq!(
        err.to_string(),
        "no recovery hold to confirm: this coordinator has not been recovered from a damaged \
         store (it was not started with --recover on one); nothing is held"
    );
    begin(&mut s, &[], t(10));
    confirm(&mut s, t(11));
    let err = refusal(&confirm(&mut s, t(12)));
    assert_eq!(
        err.to_string(),
        "no recovery hold to confirm: the recovery of 2023-11-14T22:13:30Z was already confirmed \
         by alice (admin) at 2023-11-14T22:13:31Z"
    );
    assert_eq!(
        s.recovery.as_ref().and_then(|h| h.confirmed_at_unix_ms),
        Some(T0 + 11_000),
        "a refusal changes nothing"
    );
}

#[test]
fn a_second_recovery_before_the_confirmation_keeps_what_the_first_lost() {
    let mut s = two_nodes();
    begin(&mut s, &["n8"], t(10));
    let mut second = report(&["n9"]);
    second.damage = "jobs tree truncated".into();
    second.lost = vec!["jobs/j-9: unreadable".into(), "jobs/j-7: unreadable".into()];
    step_ok(&mut s, Input::BeginRecovery(second), t(20));
    let hold = s.recovery.clone().expect("hold");
    assert_eq!(hold.since_unix_ms, T0 + 10_000);
    assert_eq!(
        hold.damage,
        "nodes tree checksum mismatch; then: jobs tree truncated"
    );
    assert_eq!(
        hold.lost,
        [
            "nodes/n9: checksum mismatch",
            "jobs/j-7: unreadable",
            "jobs/j-9: unreadable"
        ]
    );
    assert_eq!(hold.lost_nodes, ["n8", "n9"]);
    // After a confirmation, a new recovery is a new hold.
    confirm(&mut s, t(21));
    step_ok(&mut s, Input::BeginRecovery(report(&[])), t(30));
    let hold = s.recovery.clone().expect("hold");
    assert_eq!(hold.since_unix_ms, T0 + 30_000);
    assert!(hold.holds_jobs());
    assert!(hold.lost_nodes.is_empty());
}

#[test]
fn the_hold_and_the_cordon_source_keep_their_stored_spelling() {
    let hold = RecoveryHold {
        since_unix_ms: 5,
        damage: "d".into(),
        lost: vec!["x".into()],
        lost_nodes: Vec::new(),
        lost_jobs: Vec::new(),
        damaged_copy: String::new(),
        confirmed_by: None,
        confirmed_at_unix_ms: None,
    };
    let text = serde_json::to_string(&hold).expect("encodes");
    let back: RecoveryHold = serde_json::from_str(&text).expect("decodes");
    assert_eq!(back, hold);
    let minimal: RecoveryHold =
        serde_json::from_str(r#"{"since_unix_ms":5,"damage":"d","lost":["x"]}"#)
            .expect("optional fields default");
    assert_eq!(minimal, hold);
    assert_eq!(
        serde_json::to_string(&CordonSource::Recovery).expect("encodes"),
        r#""recovery""#
    );
    assert_eq!(CordonSource::Recovery.as_str(), "recovery");
    assert_eq!(CordonRule::Recovery.as_str(), "recovery");
}
