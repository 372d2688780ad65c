//! Scenario tests of the name binding: simulated time, every input through `step`.

use super::*;
use crate::config::{HealthConfig, LivenessConfig};
use crate::node::NodeRecord;
use crate::step::Input;
use crate::test_utils::{
    default_state, heartbeat, node_events, patient_state, reg_with_gpus, register_at, step_raw, t,
    tick_at,
};

/// Host `machine` registering node `node` in `session` with `gpus` GPUs of its own.
fn claim(node: &str, machine: &str, session: u64, gpus: u32) -> Registration {
    let mut reg = reg_with_gpus(node, session, gpus);
    reg.hostname = format!("host-{machine}");
    reg.address = format!("10.0.0.{session}");
    for g in &mut reg.gpus {
        g.uuid = format!("GPU-{machine}-{}", g.index);
    }
    reg.identity = HostIdentity {
        machine_id: machine.to_owned(),
        boot_id: "boot-1".into(),
    };
    reg
}

fn conflicts(effects: &[Effect]) -> Vec<(u64, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::IdentityConflict {
                session, message, ..
            } => Some((*session, message.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_second_host_claiming_a_live_name_is_refused_and_nothing_changes() {
    let mut s = default_state();
    register_at(&mut s, claim("n1", "3f2a9d00aa", 1, 4), t(0));
    heartbeat(&mut s, "n1", Default::default(), t(1));
    let before = s.nodes["n1"].clone();
    let effects = step_raw(&mut s, Input::Register(claim("n1", "9c1d77bb", 2, 2)), t(2));
    let refused = conflicts(&effects);
    assert_eq!(refused.len(), 1, "{effects:?}");
    assert_eq!(refused[0].0, 2);
    assert_eq!(
        refused[0].1,
        "node \"n1\" is already connected from 10.0.0.1 (machine-id 3f2a9d00…, host \
         host-3f2a9d00aa); this host is host-9c1d77bb (machine-id 9c1d77bb): give it its own \
         node name"
    );
    // Nothing else: no session closed, nothing persisted, no cordon, no availability change.
    let others: Vec<_> = effects
        .iter()
        .filter(|e| !matches!(e, Effect::IdentityConflict { .. } | Effect::Record { .. }))
        .collect();
    assert!(others.is_empty(), "{others:?}");
    let after = &s.nodes["n1"];
    assert_eq!(after.record, before.record);
    assert_eq!(after.session, Some(1));
    assert_eq!(after.record.gpus.len(), 4);
    assert_eq!(after.condition, before.condition);
    assert!(after.record.cordon.is_none());
    assert!(s.lemons.records.is_empty());
    assert_eq!(
        node_events(&s, "n1", "identity-conflict"),
        vec![refused[0].1.clone()]
    );
}

#[test]
fn a_refused_host_retrying_is_recorded_once_per_ten_minutes() {
    let mut s = patient_state();
    register_at(&mut s, claim("n1", "aaaa", 1, 4), t(0));
    let mut refusals = 0;
    for (i, secs) in [10, 40, 70, 599].into_iter().enumerate() {
        let reg = claim("n1", "bbbb", 10 + i as u64, 2);
        refusals += conflicts(&step_raw(&mut s, Input::Register(reg), t(secs))).len();
    }
    assert_eq!(
        refusals, 4,
        "every retry is refused (and counted by the shell)"
    );
    assert_eq!(node_events(&s, "n1", "identity-conflict").len(), 1);
    // A third host is another conflict, recorded at once.
    step_raw(&mut s, Input::Register(claim("n1", "cccc", 20, 2)), t(600));
    assert_eq!(node_events(&s, "n1", "identity-conflict").len(), 2);
    // Ten minutes after the first record, the same host is recorded again.
    step_raw(&mut s, Input::Register(claim("n1", "bbbb", 21, 2)), t(610));
    assert_eq!(node_events(&s, "n1", "identity-conflict").len(), 3);
    assert_eq!(s.nodes["n1"].session, Some(1));
}

#[test]
fn the_same_host_after_a_reboot_takes_over_at_once() {
    let mut s = default_state();
    register_at(&mut s, claim("n1", "aaaa", 1, 4), t(0));
    let mut rebooted = claim("n1", "aaaa", 2, 4);
    rebooted.identity.boot_id = "boot-2".into();
    let effects = register_at(&mut s, rebooted, t(1));
    assert!(conflicts(&effects).is_empty());
    assert!(effects.contains(&Effect::CloseSession {
        node: "n1".into(),
        session: 1
    }));
    let node = &s.nodes["n1"];
    assert_eq!(node.session, Some(2));
    assert_eq!(node.record.boot_id, "boot-2");
    assert!(node_events(&s, "n1", "identity-changed").is_empty());
}

#[test]
fn a_replacement_host_is_accepted_only_once_the_old_one_is_lost_and_is_burned_in() {
    let mut s = default_state();
    register_at(&mut s, claim("n1", "aaaa", 1, 4), t(0));
    step_raw(
        &mut s,
        Input::Disconnected {
            node: "n1".into(),
            session: 1,
        },
        t(1),
    );
    // Silent, but not for lost_after (10 s) yet: still the old host's name.
    let early = step_raw(&mut s, Input::Register(claim("n1", "bbbb", 2, 2)), t(5));
    let refused = conflicts(&early);
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0].1.contains("belongs to the host at 10.0.0.1"),
        "{}",
        refused[0].1
    );
    assert_eq!(s.nodes["n1"].record.machine_id, "aaaa");
    tick_at(&mut s, t(11));
    assert_eq!(s.nodes["n1"].availability, Availability::Lost);
    let effects = register_at(&mut s, claim("n1", "bbbb", 3, 2), t(12));
    assert!(conflicts(&effects).is_empty());
    let node = &s.nodes["n1"];
    assert_eq!(node.session, Some(3));
    assert_eq!(node.record.machine_id, "bbbb");
    assert_eq!(node.record.gpus.len(), 2);
    let changed = node_events(&s, "n1", "identity-changed");
    assert_eq!(changed.len(), 1);
    assert!(changed[0].contains("aaaa -> bbbb"), "{}", changed[0]);
    // The old host's GPUs are not the new one's lost GPUs: no finding, no GPU-lost event.
    assert!(node_events(&s, "n1", "gpu-lost").is_empty());
    assert!(node.health.first_unhealthy().is_none());
    // The new host is validated before it takes work.
    let burn_in = node.record.burn_in.as_ref().expect("burn-in started");
    assert_eq!(burn_in.why, "identity-changed");
    assert!(node.record.cordon.is_some());
    assert!(
        !node
            .record
            .cordon
            .as_ref()
            .is_some_and(|c| c.reason.contains("GPU"))
    );
}

#[test]
fn a_forgotten_name_binds_to_the_next_host_that_registers_it() {
    let mut s = default_state();
    register_at(&mut s, claim("n1", "aaaa", 1, 4), t(0));
    let effects = step_raw(
        &mut s,
        Input::ForgetNode {
            node: "n1".into(),
            by: "admin".into(),
        },
        t(1),
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Persist(r) if r.machine_id.is_empty()))
    );
    assert_eq!(node_events(&s, "n1", "identity-forgotten").len(), 1);
    let effects = register_at(&mut s, claim("n1", "bbbb", 2, 2), t(2));
    assert!(conflicts(&effects).is_empty());
    assert_eq!(s.nodes["n1"].record.machine_id, "bbbb");
    // Now the old host is the stranger.
    let back = step_raw(&mut s, Input::Register(claim("n1", "aaaa", 3, 4)), t(3));
    assert_eq!(conflicts(&back).len(), 1);
    assert_eq!(s.nodes["n1"].session, Some(2));
}

#[test]
fn forgetting_an_unknown_node_is_refused() {
    let mut s = default_state();
    let effects = step_raw(
        &mut s,
        Input::ForgetNode {
            node: "nope".into(),
            by: "admin".into(),
        },
        t(1),
    );
    assert!(matches!(
        effects.as_slice(),
        [Effect::Refused(StateError::UnknownNode(_))]
    ));
}

#[test]
fn a_record_from_before_binding_binds_on_its_next_registration() {
    // A record as stored before this change: no machine_id, no boot_id.
    let stored = r#"{"name":"n1","hostname":"h","address":"10.0.0.1","agent_version":"0.1.0",
        "simulated":true,"gpus":[],"cordon":null,"first_registered_unix_ms":1,
        "last_registered_unix_ms":1}"#;
    let record: NodeRecord = serde_json::from_str(stored).expect("old record loads");
    assert!(record.machine_id.is_empty());
    let mut s = ClusterState::load(
        vec![record],
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        t(0),
    );
    let effects = register_at(&mut s, claim("n1", "aaaa", 1, 2), t(1));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Persist(r) if r.machine_id == "aaaa"))
    );
    let other = step_raw(&mut s, Input::Register(claim("n1", "bbbb", 2, 2)), t(2));
    assert_eq!(conflicts(&other).len(), 1);
}

#[test]
fn an_agent_without_identity_neither_binds_nor_is_refused() {
    let mut s = default_state();
    let mut old = claim("n1", "", 1, 2);
    old.identity = HostIdentity::default();
    register_at(&mut s, old, t(0));
    assert!(s.nodes["n1"].record.machine_id.is_empty());
    register_at(&mut s, claim("n1", "aaaa", 2, 2), t(1));
    assert_eq!(s.nodes["n1"].record.machine_id, "aaaa");
    let mut older = claim("n1", "", 3, 2);
    older.identity = HostIdentity::default();
    let effects = register_at(&mut s, older, t(2));
    assert!(conflicts(&effects).is_empty());
    assert_eq!(s.nodes["n1"].record.machine_id, "aaaa", "kept");
}

#[test]
fn a_registration_with_a_bad_machine_id_is_invalid() {
    let register = |machine_id: &str| vigil_proto::v1::Register {
        protocol_version: vigil_proto::PROTOCOL_VERSION,
        node_name: "n1".into(),
        gpu_backend: vigil_proto::v1::GpuBackend::Simulated as i32,
        machine_id: machine_id.into(),
        ..Default::default()
    };
    let ok = crate::validate::validate_register(register("3f2a-9c_1d.x"), 1, String::new());
    assert_eq!(ok.expect("valid").identity.machine_id, "3f2a-9c_1d.x");
    let spaced = crate::validate::validate_register(register("3f2a 9c1d"), 1, String::new());
    assert!(spaced.expect_err("space").contains("machine_id"));
    let long = crate::validate::validate_register(register(&"a".repeat(65)), 1, String::new());
    assert!(long.expect_err("too long").contains("machine_id"));
}

#[test]
fn short_cuts_long_ids_only() {
    assert_eq!(short("0123456789abcdef"), "01234567…");
    assert_eq!(short("01234567"), "01234567");
    assert_eq!(short(""), "");
}

#[test]
fn conflict_events_remember_few_hosts() {
    let mut s = patient_state();
    register_at(&mut s, claim("n1", "aaaa", 1, 1), t(0));
    for i in 0..40u64 {
        step_raw(
            &mut s,
            Input::Register(claim("n1", &format!("m{i}"), 100 + i, 1)),
            t(1),
        );
    }
    assert!(s.nodes["n1"].identity_conflicts.len() <= 16);
}
