//! Scenario tests of the pure cluster state: simulated time, no sockets.

use std::time::Duration;

use super::*;

fn t0() -> Now {
    Now {
        mono: Instant::now(),
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
        session,
        node: node.to_owned(),
        hostname: format!("{node}.example"),
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
    }
}

fn empty_state() -> ClusterState {
    ClusterState::load(Vec::new(), LivenessConfig::default(), t0())
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

#[test]
fn first_registration_makes_a_ready_node_and_persists_it() {
    let start = t0();
    let mut s = empty_state();
    let effects = s.register(registration("gpu-001", 1), start);
    assert_eq!(persisted(&effects).len(), 1);
    assert!(
        matches!(effects[0], Effect::Persist(_)),
        "persist comes first"
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
    s.register(registration("gpu-001", 1), start);
    assert!(s.tick(after(start, 2.9)).is_empty());
    assert_eq!(
        transitions(&s.tick(after(start, 3.0))),
        vec![(Some(Availability::Ready), Availability::Unreachable)]
    );
    assert!(s.tick(after(start, 9.9)).is_empty());
    assert_eq!(
        transitions(&s.tick(after(start, 10.0))),
        vec![(Some(Availability::Unreachable), Availability::Lost)]
    );
    assert!(
        s.tick(after(start, 100.0)).is_empty(),
        "Lost is reported once"
    );
    assert_eq!(s.nodes["gpu-001"].gpus_healthy(), 0);
}

#[test]
fn heartbeats_keep_a_node_ready() {
    let start = t0();
    let mut s = empty_state();
    s.register(registration("gpu-001", 1), start);
    for i in 1..=30 {
        let now = after(start, f64::from(i));
        s.heartbeat("gpu-001", 1, v1::Heartbeat::default(), now)
            .expect("live session");
        assert!(s.tick(now).is_empty());
    }
    assert_eq!(availability_of(&s, "gpu-001"), Availability::Ready);
}

#[test]
fn closed_stream_is_unreachable_at_once_and_lost_after_lost_after() {
    let start = t0();
    let mut s = empty_state();
    s.register(registration("gpu-001", 1), start);
    let hb = after(start, 1.0);
    s.heartbeat("gpu-001", 1, v1::Heartbeat::default(), hb)
        .expect("live");
    let effects = s.disconnected("gpu-001", 1, after(start, 1.5));
    assert_eq!(
        transitions(&effects),
        vec![(Some(Availability::Ready), Availability::Unreachable)]
    );
    assert!(s.tick(after(start, 10.9)).is_empty());
    assert_eq!(
        transitions(&s.tick(after(start, 11.0))),
        vec![(Some(Availability::Unreachable), Availability::Lost)],
        "lost_after counts from the last heartbeat"
    );
}

#[test]
fn reconnect_recovers_a_lost_node() {
    let start = t0();
    let mut s = empty_state();
    s.register(registration("gpu-001", 1), start);
    s.disconnected("gpu-001", 1, start);
    s.tick(after(start, 20.0));
    assert_eq!(availability_of(&s, "gpu-001"), Availability::Lost);
    let effects = s.register(registration("gpu-001", 2), after(start, 21.0));
    assert_eq!(
        transitions(&effects),
        vec![(Some(Availability::Lost), Availability::Ready)]
    );
    assert!(s.tick(after(start, 23.9)).is_empty());
}

#[test]
fn heartbeat_after_silence_recovers_an_unreachable_node() {
    let start = t0();
    let mut s = empty_state();
    s.register(registration("gpu-001", 1), start);
    s.tick(after(start, 5.0));
    assert_eq!(availability_of(&s, "gpu-001"), Availability::Unreachable);
    let effects = s
        .heartbeat("gpu-001", 1, v1::Heartbeat::default(), after(start, 5.5))
        .expect("live");
    assert_eq!(
        transitions(&effects),
        vec![(Some(Availability::Unreachable), Availability::Ready)]
    );
}

#[test]
fn messages_of_a_superseded_session_are_ignored() {
    let start = t0();
    let mut s = empty_state();
    s.register(registration("gpu-001", 1), start);
    let effects = s.register(registration("gpu-001", 2), after(start, 1.0));
    assert!(effects.contains(&Effect::CloseSession {
        node: "gpu-001".into(),
        session: 1
    }));
    assert!(matches!(
        s.heartbeat("gpu-001", 1, v1::Heartbeat::default(), after(start, 2.0)),
        Err(StateError::StaleSession { .. })
    ));
    assert!(s.disconnected("gpu-001", 1, after(start, 2.0)).is_empty());
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
    s.register(registration("gpu-001", 1), start);
    let effects = s
        .cordon(
            "gpu-001",
            "bad fan".into(),
            CordonSource::Operator,
            after(start, 1.0),
        )
        .expect("known node");
    assert_eq!(
        persisted(&effects)[0]
            .cordon
            .as_ref()
            .map(|c| c.reason.as_str()),
        Some("bad fan")
    );
    s.disconnected("gpu-001", 1, after(start, 2.0));
    s.tick(after(start, 30.0));
    s.register(registration("gpu-001", 2), after(start, 31.0));
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
    apply(s.register(registration("gpu-001", 1), start), &mut store);
    apply(s.register(registration("gpu-002", 2), start), &mut store);
    apply(
        s.cordon("gpu-002", "xid 79".into(), CordonSource::Operator, start)
            .expect("known"),
        &mut store,
    );

    let restart = after(start, 60.0);
    let mut s = ClusterState::load(
        store.values().cloned().collect(),
        LivenessConfig::default(),
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

    s.register(registration("gpu-002", 3), after(restart, 0.5));
    assert_eq!(availability_of(&s, "gpu-002"), Availability::Ready);
    assert_eq!(s.nodes["gpu-002"].display_state(), "Cordoned");
    s.heartbeat("gpu-002", 3, v1::Heartbeat::default(), after(restart, 9.0))
        .expect("live");
    assert_eq!(
        transitions(&s.tick(after(restart, 10.0))),
        vec![(Some(Availability::Unreachable), Availability::Lost)],
        "a node that never returns is Lost lost_after past the restart"
    );
}

#[test]
fn uncordon_clears_and_persists_and_is_idempotent() {
    let start = t0();
    let mut s = empty_state();
    s.register(registration("gpu-001", 1), start);
    s.cordon(
        "gpu-001",
        "maintenance".into(),
        CordonSource::Operator,
        start,
    )
    .expect("known");
    let effects = s.uncordon("gpu-001").expect("known");
    assert_eq!(persisted(&effects)[0].cordon, None);
    assert!(s.uncordon("gpu-001").expect("known").is_empty());
    assert_eq!(s.nodes["gpu-001"].display_state(), "Ready");
}

#[test]
fn recordon_with_a_new_reason_keeps_the_original_since() {
    let start = t0();
    let mut s = empty_state();
    s.register(registration("gpu-001", 1), start);
    s.cordon("gpu-001", "a".into(), CordonSource::Operator, start)
        .expect("known");
    assert!(
        s.cordon(
            "gpu-001",
            "a".into(),
            CordonSource::Operator,
            after(start, 5.0)
        )
        .expect("known")
        .is_empty()
    );
    s.cordon(
        "gpu-001",
        "b".into(),
        CordonSource::Operator,
        after(start, 9.0),
    )
    .expect("known");
    let c = s.nodes["gpu-001"].record.cordon.clone().expect("cordoned");
    assert_eq!((c.reason.as_str(), c.since_unix_ms), ("b", start.wall_ms));
}

#[test]
fn unknown_nodes_are_refused_by_name() {
    let mut s = empty_state();
    let err = s
        .cordon("nope", "x".into(), CordonSource::Operator, t0())
        .expect_err("unknown");
    assert!(err.to_string().contains("\"nope\" not found"), "{err}");
    assert!(s.uncordon("nope").is_err());
}
