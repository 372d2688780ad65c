//! Scenario tests of the node transitions: simulated time, no sockets. Every input goes
//! through `step` and time through `tick`, as the engine drives them.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::config::HealthConfig;
use crate::health::Condition;
use crate::node::{GpuRecord, NodeRecord};
use crate::state::Registration;
use crate::step::Input;
use crate::test_utils::{
    agent_event, diagnostics_record, heartbeat, refusal, register_at, session, step_ok, step_raw,
    tick_at, xid,
};
use crate::time::Instant;

fn t0() -> Now {
    Now {
        mono: Instant::ZERO,
        wall_ms: 1_700_000_000_000,
    }
}

fn after(start: Now, secs: f64) -> Now {
    let d = Duration::from_secs_f64(secs);
    Now {
        mono: start.mono + d,
        wall_ms: start.wall_ms + u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    }
}

fn registration(node: &str, session: u64) -> Registration {
    Registration {
        identity: crate::identity::HostIdentity {
            machine_id: format!("machine-{node}"),
            boot_id: "boot-1".into(),
        },
        session,
        node: node.to_owned(),
        hostname: format!("{node}.example"),
        address: format!("10.0.0.{}", node.len()),
        agent_version: "0.1.0".into(),
        simulated: true,
        gpus: (0..8)
            .map(|i| GpuRecord {
                index: i,
                uuid: format!("GPU-{node}-{i}"),
                name: "sim".into(),
                pci_bus_id: format!("00000000:{i:02x}:00.0"),
                memory_total_bytes: 80 << 30,
                serial: String::new(),
            })
            .collect(),
        workers: Vec::new(),
        fabric: Vec::new(),
    }
}

fn empty_state() -> ClusterState {
    ClusterState::load(
        Vec::new(),
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        t0(),
    )
}

/// Persisted records, as the store would hold them after these effects.
fn persisted(effects: &[Effect]) -> Vec<NodeRecord> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Persist(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn availability_of(state: &ClusterState, node: &str) -> Availability {
    state.nodes[node].availability
}

fn transitions(effects: &[Effect]) -> Vec<(Option<Availability>, Availability)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Availability { from, to, .. } => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

fn hb(s: &mut ClusterState, node: &str, now: Now) -> Vec<Effect> {
    heartbeat(s, node, v1::Heartbeat::default(), now)
}

fn disconnected(s: &mut ClusterState, node: &str, session: u64, now: Now) -> Vec<Effect> {
    step_ok(
        s,
        Input::Disconnected {
            node: node.to_owned(),
            session,
        },
        now,
    )
}

fn cordon(s: &mut ClusterState, node: &str, reason: &str, now: Now) -> Vec<Effect> {
    step_raw(
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

fn refused(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Refused(_)))
}

/// A diagnostics result that finished at `finished_at_ms`, handled at `now`.
fn diagnosed(s: &mut ClusterState, node: &str, passed: bool, finished_at_ms: u64, now: Now) {
    let summary = if passed {
        "all checks passed"
    } else {
        "GPU 3 missing"
    };
    let record = DiagnosticsRecord {
        finished_at_unix_ms: finished_at_ms,
        ..diagnostics_record(passed, summary, now)
    };
    let session = session(s, node);
    step_ok(
        s,
        Input::Diagnostics {
            node: node.to_owned(),
            session,
            record,
        },
        now,
    );
}

#[test]
fn first_registration_makes_a_ready_node_and_persists_it() {
    let start = t0();
    let mut s = empty_state();
    let effects = register_at(&mut s, registration("gpu-001", 1), start);
    assert_eq!(persisted(&effects).len(), 1);
    assert!(
        matches!(effects[0], Effect::Persist(_)),
        "the record comes first"
    );
    assert_eq!(transitions(&effects), vec![(None, Availability::Ready)]);
    assert_eq!(s.nodes["gpu-001"].gpus_total(), 8);
    assert_eq!(s.nodes["gpu-001"].gpus_healthy(), 8);
    assert_eq!(s.nodes["gpu-001"].display_state(), "Ready");
}

#[test]
fn silent_node_goes_unreachable_then_lost_at_the_configured_times() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    assert!(tick_at(&mut s, after(start, 2.9)).is_empty());
    assert_eq!(
        transitions(&tick_at(&mut s, after(start, 3.0))),
        vec![(Some(Availability::Ready), Availability::Unreachable)]
    );
    assert!(tick_at(&mut s, after(start, 9.9)).is_empty());
    assert_eq!(
        transitions(&tick_at(&mut s, after(start, 10.0))),
        vec![(Some(Availability::Unreachable), Availability::Lost)]
    );
    assert!(
        tick_at(&mut s, after(start, 100.0)).is_empty(),
        "Lost is reported once"
    );
    assert_eq!(s.nodes["gpu-001"].gpus_healthy(), 0);
}

#[test]
fn heartbeats_keep_a_node_ready() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    for i in 1..=30 {
        let now = after(start, f64::from(i));
        hb(&mut s, "gpu-001", now);
        assert!(tick_at(&mut s, now).is_empty());
    }
    assert_eq!(availability_of(&s, "gpu-001"), Availability::Ready);
}

#[test]
fn closed_stream_is_unreachable_at_once_and_lost_after_lost_after() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    hb(&mut s, "gpu-001", after(start, 1.0));
    let effects = disconnected(&mut s, "gpu-001", 1, after(start, 1.5));
    assert_eq!(
        transitions(&effects),
        vec![(Some(Availability::Ready), Availability::Unreachable)]
    );
    assert!(tick_at(&mut s, after(start, 10.9)).is_empty());
    assert_eq!(
        transitions(&tick_at(&mut s, after(start, 11.0))),
        vec![(Some(Availability::Unreachable), Availability::Lost)],
        "lost_after counts from the last heartbeat"
    );
}

#[test]
fn reconnect_recovers_a_lost_node() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    disconnected(&mut s, "gpu-001", 1, start);
    tick_at(&mut s, after(start, 20.0));
    assert_eq!(availability_of(&s, "gpu-001"), Availability::Lost);
    let effects = register_at(&mut s, registration("gpu-001", 2), after(start, 21.0));
    assert_eq!(
        transitions(&effects),
        vec![(Some(Availability::Lost), Availability::Ready)]
    );
    assert!(tick_at(&mut s, after(start, 23.9)).is_empty());
}

#[test]
fn heartbeat_after_silence_recovers_an_unreachable_node() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    tick_at(&mut s, after(start, 5.0));
    assert_eq!(availability_of(&s, "gpu-001"), Availability::Unreachable);
    let effects = hb(&mut s, "gpu-001", after(start, 5.5));
    assert_eq!(
        transitions(&effects),
        vec![(Some(Availability::Unreachable), Availability::Ready)]
    );
}

#[test]
fn messages_of_a_superseded_session_are_ignored() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    let effects = register_at(&mut s, registration("gpu-001", 2), after(start, 1.0));
    assert!(effects.contains(&Effect::CloseSession {
        node: "gpu-001".into(),
        session: 1
    }));
    let stale = step_raw(
        &mut s,
        Input::Heartbeat {
            node: "gpu-001".into(),
            session: 1,
            heartbeat: v1::Heartbeat::default(),
        },
        after(start, 2.0),
    );
    assert!(
        matches!(stale.as_slice(), [Effect::Ignored { reason, .. }] if reason.contains("superseded session 1")),
        "{stale:?}"
    );
    assert!(disconnected(&mut s, "gpu-001", 1, after(start, 2.0)).is_empty());
    assert_eq!(
        availability_of(&s, "gpu-001"),
        Availability::Ready,
        "old stream closing changes nothing"
    );
}

#[test]
fn cordoned_node_stays_cordoned_across_reconnects() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    let effects = cordon(&mut s, "gpu-001", "bad fan", after(start, 1.0));
    assert_eq!(
        persisted(&effects)[0]
            .cordon
            .as_ref()
            .map(|c| c.reason.as_str()),
        Some("bad fan")
    );
    disconnected(&mut s, "gpu-001", 1, after(start, 2.0));
    tick_at(&mut s, after(start, 30.0));
    register_at(&mut s, registration("gpu-001", 2), after(start, 31.0));
    let node = &s.nodes["gpu-001"];
    assert_eq!(node.availability, Availability::Ready);
    assert_eq!(node.display_state(), "Cordoned");
    let cordon = node.record.cordon.as_ref().expect("still cordoned");
    assert_eq!(cordon.reason, "bad fan");
    assert_eq!(cordon.source, CordonSource::Operator);
    assert_eq!(cordon.since_unix_ms, after(start, 1.0).wall_ms);
}

#[test]
fn cordoned_node_stays_cordoned_across_a_coordinator_restart() {
    let start = t0();
    let mut s = empty_state();
    let mut store: BTreeMap<String, NodeRecord> = BTreeMap::new();
    let apply = |effects: Vec<Effect>, store: &mut BTreeMap<String, NodeRecord>| {
        for r in persisted(&effects) {
            store.insert(r.name.clone(), r);
        }
    };
    apply(
        register_at(&mut s, registration("gpu-001", 1), start),
        &mut store,
    );
    apply(
        register_at(&mut s, registration("gpu-002", 2), start),
        &mut store,
    );
    let effects = cordon(&mut s, "gpu-002", "xid 79", start);
    assert!(!refused(&effects), "known: {effects:?}");
    apply(effects, &mut store);

    let restart = after(start, 60.0);
    let mut s = ClusterState::load(
        store.values().cloned().collect(),
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        restart,
    );
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(
        availability_of(&s, "gpu-001"),
        Availability::Unreachable,
        "unheard since restart"
    );
    assert_eq!(
        s.nodes["gpu-002"]
            .record
            .cordon
            .as_ref()
            .map(|c| c.reason.as_str()),
        Some("xid 79")
    );

    register_at(&mut s, registration("gpu-002", 3), after(restart, 0.5));
    assert_eq!(availability_of(&s, "gpu-002"), Availability::Ready);
    assert_eq!(s.nodes["gpu-002"].display_state(), "Cordoned");
    hb(&mut s, "gpu-002", after(restart, 9.0));
    assert_eq!(
        transitions(&tick_at(&mut s, after(restart, 10.0))),
        vec![(Some(Availability::Unreachable), Availability::Lost)],
        "a node that never returns is Lost lost_after past the restart"
    );
}

#[test]
fn uncordon_clears_and_persists_and_is_idempotent() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    cordon(&mut s, "gpu-001", "maintenance", start);
    let effects = uncordon(&mut s, "gpu-001", false, start);
    assert_eq!(persisted(&effects)[0].cordon, None);
    assert!(uncordon(&mut s, "gpu-001", false, start).is_empty());
    assert_eq!(s.nodes["gpu-001"].display_state(), "Ready");
}

#[test]
fn recordon_with_a_new_reason_keeps_the_original_since() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    cordon(&mut s, "gpu-001", "a", start);
    assert!(cordon(&mut s, "gpu-001", "a", after(start, 5.0)).is_empty());
    cordon(&mut s, "gpu-001", "b", after(start, 9.0));
    let c = s.nodes["gpu-001"].record.cordon.clone().expect("cordoned");
    assert_eq!((c.reason.as_str(), c.since_unix_ms), ("b", start.wall_ms));
}

#[test]
fn unknown_nodes_are_refused_by_name() {
    let mut s = empty_state();
    let err = refusal(&cordon(&mut s, "nope", "x", t0()));
    assert!(err.to_string().contains("\"nope\" not found"), "{err}");
    assert!(matches!(
        refusal(&uncordon(&mut s, "nope", false, t0())),
        StateError::UnknownNode(_)
    ));
}

fn cordon_of(s: &ClusterState, node: &str) -> Option<Cordon> {
    s.nodes[node].record.cordon.clone()
}

#[test]
fn fatal_xid_cordons_the_node_automatically_with_evidence() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    let now = after(start, 1.0);
    let effects = agent_event(&mut s, "gpu-001", xid(3, 79, now.wall_ms - 20), now);
    let cordon = cordon_of(&s, "gpu-001").expect("cordoned");
    assert_eq!(cordon.source, CordonSource::Auto);
    assert_eq!(
        cordon.reason,
        "XID 79 (GPU has fallen off the bus) on GPU 3 (GPU-gpu-001-3)"
    );
    let persist_at = effects.iter().position(|e| matches!(e, Effect::Persist(_)));
    let cordoned_at = effects
        .iter()
        .position(|e| matches!(e, Effect::Cordoned { .. }));
    assert!(
        persist_at < cordoned_at,
        "persisted before it is acted on: {effects:#?}"
    );
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Cordoned { rule: crate::kinds::CordonRule::Health("xid"), observed_at_ms: Some(t), .. } if *t == now.wall_ms - 20
    )));
    let node = &s.nodes["gpu-001"];
    assert_eq!(node.condition, Condition::Unhealthy);
    assert_eq!(node.gpus_healthy(), 7);
    assert_eq!(node.display_state(), "Cordoned");
    let kinds: Vec<&str> = node.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["registered", "xid", "condition", "cordon"]);
}

#[test]
fn application_xid_does_not_cordon() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    agent_event(&mut s, "gpu-001", xid(1, 13, 0), start);
    assert_eq!(cordon_of(&s, "gpu-001"), None);
    assert_eq!(s.nodes["gpu-001"].display_state(), "Ready");
}

#[test]
fn hot_gpu_degrades_the_node_but_keeps_it_schedulable() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    let hot = v1::Heartbeat {
        gpus: (0..8)
            .map(|i| v1::GpuSample {
                index: i,
                temperature_c: Some(if i == 0 { 95.0 } else { 40.0 }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let effects = heartbeat(&mut s, "gpu-001", hot, after(start, 1.0));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Condition {
            to: Condition::Degraded,
            ..
        }
    )));
    assert_eq!(cordon_of(&s, "gpu-001"), None);
    assert_eq!(s.nodes["gpu-001"].display_state(), "Degraded");
    assert_eq!(
        s.nodes["gpu-001"].gpus_healthy(),
        8,
        "degraded GPUs still count"
    );
    // Cooling down: Healthy again at the next heartbeat.
    let cool = v1::Heartbeat {
        gpus: (0..8)
            .map(|i| v1::GpuSample {
                index: i,
                temperature_c: Some(40.0),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    heartbeat(&mut s, "gpu-001", cool, after(start, 2.0));
    assert_eq!(s.nodes["gpu-001"].display_state(), "Ready");
}

#[test]
fn lost_gpu_cordons() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    let lost = v1::AgentEvent {
        at_unix_ms: start.wall_ms,
        kind: Some(v1::agent_event::Kind::GpuLost(v1::GpuLost {
            gpu_index: 5,
            gpu_uuid: String::new(),
        })),
    };
    agent_event(&mut s, "gpu-001", lost, start);
    let cordon = cordon_of(&s, "gpu-001").expect("cordoned");
    assert!(
        cordon.reason.contains("GPU 5 (GPU-gpu-001-5) lost"),
        "{}",
        cordon.reason
    );
}

#[test]
fn an_operator_cordon_is_not_replaced_by_an_automatic_one() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    cordon(&mut s, "gpu-001", "maintenance", start);
    agent_event(&mut s, "gpu-001", xid(0, 48, 0), start);
    let cordon = cordon_of(&s, "gpu-001").expect("cordoned");
    assert_eq!(
        (cordon.source, cordon.reason.as_str()),
        (CordonSource::Operator, "maintenance")
    );
    assert_eq!(s.nodes["gpu-001"].condition, Condition::Unhealthy);
}

#[test]
fn auto_cordon_lifts_only_after_passing_diagnostics_or_force() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    agent_event(&mut s, "gpu-001", xid(3, 79, 0), after(start, 1.0));
    let err = refusal(&uncordon(&mut s, "gpu-001", false, after(start, 2.0)));
    assert!(matches!(err, StateError::NeedsDiagnostics { .. }), "{err}");
    assert!(
        err.to_string().contains("clusterctl diagnose gpu-001"),
        "{err}"
    );

    diagnosed(
        &mut s,
        "gpu-001",
        false,
        after(start, 3.0).wall_ms,
        after(start, 3.0),
    );
    assert!(
        refused(&uncordon(&mut s, "gpu-001", false, after(start, 4.0))),
        "failed diagnostics"
    );

    // A pass from before the cordon does not count.
    diagnosed(&mut s, "gpu-001", true, start.wall_ms, after(start, 4.0));
    assert!(
        refused(&uncordon(&mut s, "gpu-001", false, after(start, 4.0))),
        "stale pass"
    );

    diagnosed(
        &mut s,
        "gpu-001",
        true,
        after(start, 5.0).wall_ms,
        after(start, 5.0),
    );
    let effects = uncordon(&mut s, "gpu-001", false, after(start, 6.0));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Uncordoned { .. })),
        "diagnosed: {effects:?}"
    );
    assert_eq!(
        s.nodes["gpu-001"].condition,
        Condition::Healthy,
        "event evidence forgotten"
    );
    assert_eq!(s.nodes["gpu-001"].display_state(), "Ready");

    agent_event(&mut s, "gpu-001", xid(3, 79, 0), after(start, 7.0));
    assert!(cordon_of(&s, "gpu-001").is_some(), "cordoned again");
    let forced = uncordon(&mut s, "gpu-001", true, after(start, 8.0));
    assert!(!refused(&forced), "forced: {forced:?}");
    assert_eq!(cordon_of(&s, "gpu-001"), None);
    let last = s.nodes["gpu-001"]
        .events
        .back()
        .expect("event")
        .message
        .clone();
    assert!(
        s.nodes["gpu-001"]
            .events
            .iter()
            .any(|e| e.message.contains("(forced)")),
        "{last}"
    );
}

#[test]
fn operator_cordons_need_no_diagnostics() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    cordon(&mut s, "gpu-001", "maintenance", start);
    let effects = uncordon(&mut s, "gpu-001", false, start);
    assert!(!refused(&effects), "{effects:?}");
    assert_eq!(cordon_of(&s, "gpu-001"), None);
}

#[test]
fn a_gpu_missing_at_reregistration_cordons() {
    let start = t0();
    let mut s = empty_state();
    register_at(&mut s, registration("gpu-001", 1), start);
    let mut fewer = registration("gpu-001", 2);
    fewer.gpus.retain(|g| g.index != 6);
    register_at(&mut s, fewer, after(start, 5.0));
    let cordon = cordon_of(&s, "gpu-001").expect("cordoned");
    assert!(
        cordon.reason.contains("GPU 6 (GPU-gpu-001-6) lost"),
        "{}",
        cordon.reason
    );
}
