//! The lemon ledger and its cluster rules, with simulated time. Every input goes through `step`
//! and time through `tick`, as the engine drives them.

use std::time::Duration;

use vigil_proto::v1;

use super::*;
use crate::config::{HealthConfig, LivenessConfig};
use crate::job::JobPhase;
use crate::node::{Availability, CordonSource, GpuRecord};
use crate::state::{ClusterState, Effect, Now, Registration, StateError};
use crate::step::{Answer, Input};
use crate::test_utils::{
    agent_event, heartbeat, refusal, register_at, starts, step_ok, step_raw, submit_at, tick_at,
};

const T0: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;

fn t(ms: u64) -> Now {
    Now {
        mono: crate::time::Instant::ZERO + Duration::from_millis(ms),
        wall_ms: T0 + ms,
    }
}

fn gpus(node: &str, serial_of_3: &str) -> Vec<GpuRecord> {
    (0..4)
        .map(|i| GpuRecord {
            index: i,
            uuid: format!("GPU-{node}-{i}"),
            name: "sim".into(),
            pci_bus_id: String::new(),
            memory_total_bytes: 80 << 30,
            serial: if i == 3 {
                serial_of_3.to_owned()
            } else {
                format!("{node}-serial-{i}")
            },
        })
        .collect()
}

fn reg(node: &str, session: u64, serial_of_3: &str) -> Registration {
    Registration {
        identity: crate::identity::HostIdentity {
            machine_id: format!("machine-{node}"),
            boot_id: "boot-1".into(),
        },
        session,
        node: node.to_owned(),
        hostname: node.to_owned(),
        address: "10.0.0.1".into(),
        agent_version: "0.1.0".into(),
        simulated: true,
        gpus: gpus(node, serial_of_3),
        workers: Vec::new(),
        fabric: Vec::new(),
    }
}

fn cluster(cfg: LemonConfig) -> ClusterState {
    let mut s = ClusterState::load(
        Vec::new(),
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        t(0),
    );
    s.lemons = Ledger::new(cfg, Vec::new());
    for (i, n) in ["n1", "n2"].iter().enumerate() {
        register_at(&mut s, reg(n, i as u64 + 1, &format!("{n}-serial-3")), t(0));
    }
    s
}

/// [`cluster`] whose n2 closed its stream at 1 s and was not heard from since.
fn cluster_with_n2_gone() -> ClusterState {
    let mut s = cluster(LemonConfig::default());
    step_ok(
        &mut s,
        Input::Disconnected {
            node: "n2".into(),
            session: 2,
        },
        t(1_000),
    );
    s
}

fn xid79(s: &mut ClusterState, node: &str, now: Now) -> Vec<Effect> {
    let ev = v1::AgentEvent {
        at_unix_ms: now.wall_ms,
        kind: Some(v1::agent_event::Kind::Xid(v1::XidError {
            gpu_index: 3,
            xid: 79,
            gpu_uuid: format!("GPU-{node}-3"),
        })),
    };
    agent_event(s, node, ev, now)
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

/// An operator clears `subject`: what was cleared, and the effects.
fn clear_lemon(s: &mut ClusterState, subject: &str, now: Now) -> (Vec<LemonRecord>, Vec<Effect>) {
    let effects = step_ok(
        s,
        Input::ClearLemon {
            subject: subject.to_owned(),
        },
        now,
    );
    let cleared = effects
        .iter()
        .find_map(|e| match e {
            Effect::Answer(Answer::LemonsCleared(c)) => Some(c.clone()),
            _ => None,
        })
        .expect("an answer");
    (cleared, effects)
}

fn persisted_lemons(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::PersistLemon(r) => Some(r.key()),
            _ => None,
        })
        .collect()
}

fn reason(s: &ClusterState, node: &str) -> String {
    s.nodes[node]
        .record
        .cordon
        .as_ref()
        .map_or_else(String::new, |c| c.reason.clone())
}

/// XID 79 on n1's GPU 3, then the operator forces it back into service.
/// (A lemon's uncordon is refused; then it simply stays cordoned.)
fn fail_and_force_back(s: &mut ClusterState, now: Now) -> Vec<Effect> {
    let effects = xid79(s, "n1", now);
    uncordon(s, "n1", true, now);
    effects
}

#[test]
fn three_gpu_faults_within_the_window_make_a_lemon_and_cordon_it_as_repeat_offender() {
    let mut s = cluster(LemonConfig::default());
    fail_and_force_back(&mut s, t(HOUR));
    fail_and_force_back(&mut s, t(2 * HOUR));
    assert_eq!(reason(&s, "n1"), "", "two failures: still in service");
    let effects = xid79(&mut s, "n1", t(3 * HOUR));
    let why = reason(&s, "n1");
    assert!(why.starts_with("repeat-offender: "), "{why}");
    assert!(why.contains("host n1 blocklisted (3 failures)"), "{why}");
    assert!(
        why.contains("GPU 3 serial n1-serial-3 blocklisted"),
        "{why}"
    );
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Cordoned { rule: crate::kinds::CordonRule::RepeatOffender, cordon, .. } if cordon.source == CordonSource::Auto
    )));
    assert_eq!(persisted_lemons(&effects), ["host/n1", "gpu/n1-serial-3"]);
    let host = &s.lemons.records["host/n1"];
    assert_eq!(host.kinds(T0 + 3 * HOUR, &s.lemons.cfg), "unhealthy x3");
    assert!(host.incidents[0].detail.contains("XID 79"), "{host:?}");
    assert!(
        !s.lemons.records.contains_key("gpu/n1-serial-0"),
        "healthy GPUs are not charged"
    );
    assert_eq!(reason(&s, "n2"), "", "other nodes are untouched");
}

#[test]
fn a_lemon_cannot_be_uncordoned_even_by_force_until_cleared() {
    let mut s = cluster(LemonConfig::default());
    for h in 1..=3 {
        fail_and_force_back(&mut s, t(h * HOUR));
    }
    let err = refusal(&uncordon(&mut s, "n1", true, t(4 * HOUR)));
    assert!(matches!(err, StateError::Blocklisted { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("clusterctl uncordon n1 --clear-lemon"),
        "{err}"
    );
    let (cleared, effects) = clear_lemon(&mut s, "n1", t(4 * HOUR));
    assert_eq!(cleared.len(), 2, "the host and its GPU 3 entry");
    assert_eq!(persisted_lemons(&effects), ["host/n1", "gpu/n1-serial-3"]);
    assert!(
        reason(&s, "n1").starts_with("repeat-offender"),
        "still cordoned"
    );
    let e = uncordon(&mut s, "n1", true, t(4 * HOUR));
    assert!(!refused(&e), "allowed now: {e:?}");
    assert_eq!(reason(&s, "n1"), "");
    fail_and_force_back(&mut s, t(5 * HOUR));
    assert_eq!(
        s.lemons.records["host/n1"]
            .recent(T0 + 5 * HOUR, &s.lemons.cfg)
            .count(),
        1,
        "only failures after the clear count"
    );
}

#[test]
fn failures_outside_the_window_do_not_count() {
    let cfg = LemonConfig {
        max_failures: 3,
        window: Duration::from_secs(3600),
    };
    let mut s = cluster(cfg);
    for h in [1, 3, 5] {
        fail_and_force_back(&mut s, t(h * HOUR));
    }
    assert_eq!(reason(&s, "n1"), "", "never 3 within an hour");
    assert_eq!(s.lemons.records["host/n1"].incidents.len(), 3);
}

#[test]
fn a_node_rejoining_with_a_blocklisted_gpu_serial_is_cordoned_at_once() {
    let mut s = cluster(LemonConfig::default());
    for h in 1..=3 {
        fail_and_force_back(&mut s, t(h * HOUR));
    }
    // The bad GPU moves to a new host n3 (the cloud hands it back).
    register_at(&mut s, reg("n3", 3, "n1-serial-3"), t(5 * HOUR));
    let why = reason(&s, "n3");
    assert!(
        why.contains("GPU 3 serial n1-serial-3 blocklisted"),
        "{why}"
    );
    assert!(matches!(
        refusal(&uncordon(&mut s, "n3", true, t(5 * HOUR))),
        StateError::Blocklisted { .. }
    ));
    let (cleared, _) = clear_lemon(&mut s, "gpu/n1-serial-3", t(6 * HOUR));
    assert_eq!(cleared.len(), 1);
    let e = uncordon(&mut s, "n3", true, t(6 * HOUR));
    assert!(!refused(&e), "{e:?}");
    assert_eq!(reason(&s, "n3"), "");
}

const SPEC: &str = r#"name = "train"
nodes = 1
gpus_per_node = 1
command = ["python3", "train.py"]
workdir = "/w"
[checkpoint]
dir = "/c"
"#;

#[test]
fn a_node_rejoining_with_a_lemon_is_cordoned_before_a_pending_job_can_land_on_it() {
    let mut s = cluster(LemonConfig::default());
    for h in 1..=3 {
        fail_and_force_back(&mut s, t(h * HOUR));
    }
    assert!(reason(&s, "n1").starts_with("repeat-offender"));
    // n2 goes away; meanwhile n1's bad GPU is moved into it.
    heartbeat(&mut s, "n2", v1::Heartbeat::default(), t(4 * HOUR));
    step_ok(
        &mut s,
        Input::Disconnected {
            node: "n2".into(),
            session: 2,
        },
        t(4 * HOUR),
    );
    assert_eq!(s.nodes["n2"].availability, Availability::Unreachable);
    let id = submit_at(&mut s, SPEC, t(4 * HOUR));
    assert_eq!(s.jobs[&id].phase, JobPhase::Pending, "no eligible node");

    let e = register_at(&mut s, reg("n2", 3, "n1-serial-3"), t(4 * HOUR + 1_000));
    assert_eq!(s.nodes["n2"].availability, Availability::Ready);
    assert!(
        e.iter().any(|e| matches!(
            e,
            Effect::Cordoned { node, rule: crate::kinds::CordonRule::RepeatOffender, .. } if node == "n2"
        )),
        "cordoned in the same step: {e:?}"
    );
    let why = reason(&s, "n2");
    assert!(
        why.contains("GPU 3 serial n1-serial-3 blocklisted"),
        "{why}"
    );
    assert!(starts(&e).is_empty(), "nothing starts on it: {e:?}");
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Pending, "not placed on the lemon");
    assert!(job.placement.is_empty());
    assert_eq!(job.attempt, 0);

    // Once the operator clears the GPU and uncordons n2, the job lands there.
    clear_lemon(&mut s, "gpu/n1-serial-3", t(5 * HOUR));
    let e = uncordon(&mut s, "n2", true, t(5 * HOUR));
    assert!(!refused(&e), "{e:?}");
    assert_eq!(s.jobs[&id].phase, JobPhase::Running);
    assert_eq!(s.jobs[&id].placement, ["n2"]);
    let started: Vec<String> = starts(&e).into_iter().map(|(n, _)| n).collect();
    assert_eq!(started, ["n2"]);
}

#[test]
fn a_lost_node_is_charged_to_its_host_only() {
    let mut s = cluster_with_n2_gone();
    tick_at(&mut s, t(60_000));
    let host = &s.lemons.records["host/n2"];
    assert_eq!(host.incidents.len(), 1);
    assert_eq!(host.incidents[0].kind, "node_lost");
    assert!(s.lemons.records.keys().all(|k| !k.starts_with("gpu/n2")));
}

#[test]
fn max_failures_zero_records_but_never_blocklists() {
    let cfg = LemonConfig {
        max_failures: 0,
        ..LemonConfig::default()
    };
    let mut s = cluster(cfg);
    for h in 1..=5 {
        fail_and_force_back(&mut s, t(h * HOUR));
    }
    assert_eq!(s.lemons.records["host/n1"].incidents.len(), 5);
    assert_eq!(s.lemons.records["host/n1"].blocklisted_at_ms, None);
}

#[test]
fn incidents_are_bounded_and_the_listing_puts_lemons_first() {
    let mut ledger = Ledger::new(LemonConfig::default(), Vec::new());
    for i in 0..(MAX_INCIDENTS as u64 + 5) {
        let f = Failure {
            node: "a",
            kind: "node_lost",
            detail: "",
            gpus: Vec::new(),
        };
        ledger.charge(&f, T0 + i);
    }
    let f = Failure {
        node: "b",
        kind: "unhealthy",
        detail: "",
        gpus: vec![(0, "SER".into())],
    };
    ledger.charge(&f, T0);
    assert_eq!(ledger.records["host/a"].incidents.len(), MAX_INCIDENTS);
    let keys: Vec<String> = ledger.listing(T0 + 100).iter().map(|r| r.key()).collect();
    assert_eq!(keys, ["host/a", "gpu/SER", "host/b"]);
    assert!(ledger.clear("nothing", T0).is_empty());
    assert_eq!(
        ledger.clear("SER", T0).len(),
        1,
        "a bare serial finds gpu/SER"
    );
}

#[test]
fn an_unknown_subject_cannot_be_cleared() {
    let mut s = cluster(LemonConfig::default());
    let e = step_raw(
        &mut s,
        Input::ClearLemon {
            subject: "gpu/none".into(),
        },
        t(0),
    );
    assert!(matches!(refusal(&e), StateError::UnknownLemon(_)));
}

#[test]
fn gpu_identity_falls_back_to_the_uuid() {
    assert_eq!(gpu_identity("", "GPU-1"), "GPU-1");
    assert_eq!(gpu_identity("1650", "GPU-1"), "1650");
}

#[test]
fn the_window_must_be_at_least_a_second() {
    let cfg = LemonConfig {
        window: Duration::from_millis(10),
        ..LemonConfig::default()
    };
    assert!(cfg.validate().is_err());
    assert!(LemonConfig::default().validate().is_ok());
}

#[test]
fn a_node_that_never_came_back_after_a_coordinator_restart_is_not_charged_again() {
    let s = cluster(LemonConfig::default());
    let record = (*s.nodes["n1"].record).clone();
    let mut restarted = ClusterState::load(
        vec![record],
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        t(0),
    );
    let e = tick_at(&mut restarted, t(60_000));
    assert!(e.iter().any(|e| matches!(
        e,
        Effect::Availability {
            to: Availability::Lost,
            ..
        }
    )));
    assert!(persisted_lemons(&e).is_empty(), "{e:?}");
    assert!(restarted.lemons.records.is_empty());
}

/// A coordinator behind its queue (a reconnect storm on too few cores) holds heartbeats it has
/// not stepped yet: judged as of when it last had every message in hand, their senders stay
/// Ready and no host is charged for the coordinator's own backlog.
#[test]
fn a_coordinator_behind_its_queue_charges_no_host_for_its_own_backlog() {
    let mut s = cluster(LemonConfig::default());
    for n in ["n1", "n2"] {
        heartbeat(&mut s, n, v1::Heartbeat::default(), t(1_000));
    }
    // 12 s later the engine last found its queue empty at 9 s: n2's heartbeats since are
    // still queued. Judged at 9 s, n2 has been silent 8 s: unreachable, not lost.
    let e = crate::step::tick_heard_until(&mut s, t(12_000), t(9_000).mono);
    assert_eq!(
        s.nodes["n2"].availability,
        Availability::Unreachable,
        "{e:?}"
    );
    assert!(
        s.lemons.records.is_empty(),
        "nobody charged: {:?}",
        s.lemons.records
    );
    // The queued heartbeat arrives: Ready again, no incident.
    heartbeat(&mut s, "n2", v1::Heartbeat::default(), t(12_100));
    assert_eq!(s.nodes["n2"].availability, Availability::Ready);
    assert!(s.lemons.records.is_empty());
}

/// However far behind the coordinator is, it forgives at most `lost_after` of silence: a dead
/// node is still found lost (and charged), one `lost_after` late at worst.
#[test]
fn the_backlog_forgiven_is_capped_so_a_dead_node_is_still_lost() {
    let mut s = cluster(LemonConfig::default());
    heartbeat(&mut s, "n2", v1::Heartbeat::default(), t(1_000));
    let lost_after = LivenessConfig::default().lost_after;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    // Never caught up since the start, and n2 silent for 2 x lost_after + 1 s.
    let now = t(1_000 + 2 * ms(lost_after) + 1_000);
    crate::step::tick_heard_until(&mut s, now, t(0).mono);
    assert_eq!(s.nodes["n2"].availability, Availability::Lost);
    assert_eq!(s.lemons.records["host/n2"].incidents[0].kind, "node_lost");
    // A `heard_until` later than now (a clock read before another) judges as of now.
    let mut s = cluster(LemonConfig::default());
    heartbeat(&mut s, "n2", v1::Heartbeat::default(), t(1_000));
    crate::step::tick_heard_until(&mut s, t(1_000 + ms(lost_after)), t(99_000_000).mono);
    assert_eq!(s.nodes["n2"].availability, Availability::Lost);
}

fn contact(s: &mut ClusterState, node: &str, session: u64, machine: &str, now: Now) -> bool {
    let effects = step_raw(
        s,
        Input::Contact {
            node: node.into(),
            session,
            machine_id: machine.into(),
        },
        now,
    );
    let renewed = effects.iter().any(
        |e| matches!(e, Effect::LeaseRenewal { node: n, session: x } if n == node && *x == session),
    );
    assert!(
        effects.len() == usize::from(renewed),
        "a contact yields a renewal or nothing: {effects:?}"
    );
    renewed
}

/// After a restart the agent's stream reaches the coordinator long before its registration is
/// stepped: the contact renews its lease at once and starts its silence again, so the node
/// cannot be Lost (its work given away) while that lease lives.
#[test]
fn a_contact_renews_the_lease_and_holds_off_lost_for_lost_after() {
    let mut s = cluster_with_n2_gone();
    let lost_after = LivenessConfig::default().lost_after;
    let lost_ms = u64::try_from(lost_after.as_millis()).unwrap_or(u64::MAX);
    let heard = s.nodes["n2"].heard_since_start;
    assert!(contact(&mut s, "n2", 7, "machine-n2", t(9_000)));
    assert_eq!(
        s.nodes["n2"].heard_since_start, heard,
        "a contact is no registration"
    );
    // Without the contact n2 would be Lost at 11 s; with it, not before 9 s + lost_after.
    tick_at(&mut s, t(9_000 + lost_ms - 1));
    assert_eq!(s.nodes["n2"].availability, Availability::Unreachable);
    tick_at(&mut s, t(9_000 + lost_ms));
    assert_eq!(s.nodes["n2"].availability, Availability::Lost);
    assert!(lost_after > LivenessConfig::default().agent_lease);
}

/// No renewal where the node's work is given away or was never this host's.
#[test]
fn no_renewal_for_a_lost_node_another_host_a_new_node_or_a_registered_session() {
    let mut s = cluster_with_n2_gone();
    // Another host claiming the name: no renewal, and the owner's silence runs on.
    let before = s.nodes["n2"].silent_since;
    assert!(!contact(&mut s, "n2", 7, "machine-other", t(5_000)));
    assert_eq!(s.nodes["n2"].silent_since, before);
    // A node nobody knows has no work to keep.
    assert!(!contact(&mut s, "n9", 8, "machine-n9", t(5_000)));
    // Lost: its work has been given away; its agent must let the lease run out.
    heartbeat(&mut s, "n1", v1::Heartbeat::default(), t(59_000));
    tick_at(&mut s, t(60_000));
    assert_eq!(s.nodes["n2"].availability, Availability::Lost);
    assert!(!contact(&mut s, "n2", 9, "machine-n2", t(60_100)));
    assert_eq!(s.nodes["n2"].availability, Availability::Lost);
    // A session already registered: its Registered renewed the lease.
    let live = s.nodes["n1"].session.expect("n1 is connected");
    assert!(!contact(&mut s, "n1", live, "machine-n1", t(60_100)));
    // n1's next session (a reconnect while the old one is not closed yet) is renewed.
    assert!(contact(&mut s, "n1", live + 100, "machine-n1", t(60_100)));
}
