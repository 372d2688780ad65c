use std::time::Duration;

use vigil_proto::v1::{self, FabricKind, FabricPort};

use super::*;
use crate::config::FabricHealthConfig;
use crate::health::Condition;
use crate::node::CordonSource;
use crate::state::Effect;
use crate::step::Input;
use crate::test_utils::{heartbeat, patient_state, reg, step_ok, t};

const MIN: u64 = 60_000;

fn ib(device: &str, port: u32) -> FabricPort {
    FabricPort {
        kind: FabricKind::Infiniband.into(),
        device: device.into(),
        port,
        state: "ACTIVE".into(),
        phys_state: "LinkUp".into(),
        rate_mbps: Some(400_000),
        link_downed: Some(0),
        link_error_recovery: Some(0),
        symbol_error: Some(0),
        port_rcv_errors: Some(0),
        port_xmit_discards: Some(0),
        carrier_changes: None,
    }
}

fn netdev(device: &str) -> FabricPort {
    FabricPort {
        kind: FabricKind::Netdev.into(),
        device: device.into(),
        state: "up".into(),
        rate_mbps: Some(100_000),
        carrier_changes: Some(2),
        ..FabricPort::default()
    }
}

fn down(mut p: FabricPort) -> FabricPort {
    if p.kind() == FabricKind::Netdev {
        p.state = "down".into();
    } else {
        p.state = "DOWN".into();
        p.phys_state = "Disabled".into();
    }
    p
}

fn registered(ports: &[FabricPort]) -> FabricHealth {
    let mut f = FabricHealth::default();
    f.register(ports, 0, &FabricHealthConfig::default());
    f
}

fn judge_at(
    f: &mut FabricHealth,
    ports: &[FabricPort],
    now_ms: u64,
) -> Vec<(Condition, &'static str, String)> {
    f.judge(ports, true, 7, now_ms, &FabricHealthConfig::default());
    f.findings
        .iter()
        .map(|x| (x.condition, x.rule, x.message.clone()))
        .collect()
}

#[test]
fn a_healthy_fabric_has_no_findings() {
    let ports = [ib("mlx5_0", 1), ib("mlx5_1", 1), netdev("eth0")];
    let mut f = registered(&ports);
    assert_eq!(f.required.len(), 3);
    assert_eq!(judge_at(&mut f, &ports, 1000), []);
}

#[test]
fn a_required_port_down_is_unhealthy_and_named() {
    let mut f = registered(&[ib("mlx5_0", 1), ib("mlx5_1", 1)]);
    let found = judge_at(&mut f, &[down(ib("mlx5_0", 1)), ib("mlx5_1", 1)], 1000);
    assert_eq!(
        found,
        [(
            Condition::Unhealthy,
            "fabric_port_down",
            "port mlx5_0/1 is DOWN (was ACTIVE, 400 Gb/sec)".to_owned()
        )]
    );
    assert_eq!(
        f.findings[0].observed_at_ms, 7,
        "the agent's observation time"
    );
    assert_eq!(f.findings[0].gpu, None);
}

#[test]
fn an_active_port_whose_physical_link_is_not_up_is_unhealthy() {
    let mut f = registered(&[ib("mlx5_0", 1)]);
    let polling = FabricPort {
        phys_state: "Polling".into(),
        ..ib("mlx5_0", 1)
    };
    let found = judge_at(&mut f, &[polling], 1000);
    assert_eq!(
        found[0].2,
        "port mlx5_0/1 is Polling (was ACTIVE, 400 Gb/sec)"
    );
}

#[test]
fn a_netdev_down_is_unhealthy() {
    let mut f = registered(&[netdev("eth0")]);
    let found = judge_at(&mut f, &[down(netdev("eth0"))], 1000);
    assert_eq!(
        found,
        [(
            Condition::Unhealthy,
            "fabric_port_down",
            "interface eth0 is down (was up, 100 Gb/sec)".to_owned()
        )]
    );
}

#[test]
fn a_port_down_at_registration_is_not_required() {
    // Boards with unused ports must not be cordoned for them.
    let mut f = registered(&[ib("mlx5_0", 1), down(ib("mlx5_1", 1))]);
    assert_eq!(f.required.len(), 1);
    assert_eq!(
        judge_at(&mut f, &[ib("mlx5_0", 1), down(ib("mlx5_1", 1))], 1000),
        []
    );
}

#[test]
fn a_required_port_missing_from_a_read_is_unhealthy() {
    let mut f = registered(&[ib("mlx5_0", 1), ib("mlx5_1", 1)]);
    let found = judge_at(&mut f, &[ib("mlx5_0", 1)], 1000);
    assert_eq!(
        found[0].2,
        "port mlx5_1/1 is missing (was ACTIVE, 400 Gb/sec)"
    );
    // An agent that reads the fabric and finds nothing: every port is gone.
    assert_eq!(judge_at(&mut f, &[], 2000).len(), 2);
}

#[test]
fn no_fabric_data_is_no_evidence() {
    // An agent of the previous version sends no ports and no `fabric_read`.
    let mut f = registered(&[ib("mlx5_0", 1)]);
    judge_at(&mut f, &[down(ib("mlx5_0", 1))], 1000);
    assert_eq!(f.findings.len(), 1);
    f.judge(&[], false, 0, 2000, &FabricHealthConfig::default());
    assert_eq!(f.findings, []);
    // And a node that registered no fabric has nothing to judge.
    let mut none = registered(&[]);
    assert_eq!(judge_at(&mut none, &[down(ib("mlx5_0", 1))], 1000), []);
}

#[test]
fn a_rate_below_the_registered_rate_is_degraded() {
    let mut f = registered(&[ib("mlx5_0", 1)]);
    let slow = FabricPort {
        rate_mbps: Some(200_000),
        ..ib("mlx5_0", 1)
    };
    let found = judge_at(&mut f, std::slice::from_ref(&slow), 1000);
    assert_eq!(
        found,
        [(
            Condition::Degraded,
            "fabric_rate",
            "port mlx5_0/1 at 200 Gb/sec, below its registered 400 Gb/sec".to_owned()
        )]
    );
    let off = FabricHealthConfig {
        rate_below_registered: false,
        ..FabricHealthConfig::default()
    };
    f.judge(&[slow], true, 0, 2000, &off);
    assert_eq!(f.findings, []);
}

#[test]
fn rate_text_reads_like_sysfs() {
    assert_eq!(rate_text(400_000), "400 Gb/sec");
    assert_eq!(rate_text(2_500), "2.5 Gb/sec");
    assert_eq!(rate_text(0), "0 Gb/sec");
}

fn flapped(p: FabricPort, link_downed: u64) -> FabricPort {
    FabricPort {
        link_downed: Some(link_downed),
        ..p
    }
}

#[test]
fn one_flap_degrades_and_five_within_the_window_make_the_node_unhealthy() {
    let mut f = registered(&[ib("mlx5_0", 1)]);
    let found = judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 1)], MIN);
    assert_eq!(
        found,
        [(
            Condition::Degraded,
            "fabric_flap",
            "port mlx5_0/1 flapped 1 times within 1h (link down, error recovery or carrier change)"
                .to_owned()
        )]
    );
    let found = judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 4)], 2 * MIN);
    assert_eq!(found[0].0, Condition::Degraded);
    let found = judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 5)], 3 * MIN);
    assert_eq!(found[0].0, Condition::Unhealthy);
    assert!(found[0].2.contains("flapped 5 times"), "{found:?}");
}

#[test]
fn error_recovery_and_carrier_changes_are_flaps_too() {
    let mut f = registered(&[ib("mlx5_0", 1), netdev("eth0")]);
    let recovered = FabricPort {
        link_error_recovery: Some(2),
        ..ib("mlx5_0", 1)
    };
    let carrier = FabricPort {
        carrier_changes: Some(4),
        ..netdev("eth0")
    };
    let found = judge_at(&mut f, &[recovered, carrier], MIN);
    let messages: Vec<&str> = found.iter().map(|x| x.2.as_str()).collect();
    assert!(
        messages[0].starts_with("port mlx5_0/1 flapped 2 times"),
        "{messages:?}"
    );
    assert!(
        messages[1].starts_with("interface eth0 flapped 2 times"),
        "{messages:?}"
    );
}

#[test]
fn flaps_age_out_of_the_window() {
    let mut f = registered(&[ib("mlx5_0", 1)]);
    assert_eq!(
        judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 3)], MIN).len(),
        1
    );
    // Still within the hour.
    assert_eq!(
        judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 3)], 60 * MIN).len(),
        1
    );
    // The flaps happened at minute 1: past minute 61 they no longer count.
    assert_eq!(
        judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 3)], 62 * MIN),
        []
    );
    // A new one counts alone.
    let found = judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 4)], 63 * MIN);
    assert!(found[0].2.contains("flapped 1 times"), "{found:?}");
}

#[test]
fn a_counter_that_goes_back_starts_over_without_a_finding() {
    let mut f = registered(&[flapped(ib("mlx5_0", 1), 100)]);
    assert_eq!(judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 100)], MIN), []);
    // A driver reload zeroes the counters: no flap, and no underflow.
    assert_eq!(
        judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 0)], 2 * MIN),
        []
    );
    let found = judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 1)], 3 * MIN);
    assert!(found[0].2.contains("flapped 1 times"), "{found:?}");
}

#[test]
fn the_history_stays_bounded_under_a_storm_of_flaps() {
    let mut f = registered(&[ib("mlx5_0", 1)]);
    for i in 1..=1000 {
        judge_at(&mut f, &[flapped(ib("mlx5_0", 1), i)], i * 100);
    }
    let kept = f.flaps[0].as_ref().map_or(0, CounterWindow::changes);
    assert!(kept <= crate::counter_window::MAX_POINTS);
    assert_eq!(f.findings[0].condition, Condition::Unhealthy);
}

#[test]
fn zero_thresholds_turn_the_flap_rules_off() {
    let cfg = FabricHealthConfig {
        flaps_degraded: 0,
        flaps_unhealthy: 0,
        ..FabricHealthConfig::default()
    };
    let mut f = FabricHealth::default();
    f.register(&[ib("mlx5_0", 1)], 0, &cfg);
    f.judge(&[flapped(ib("mlx5_0", 1), 50)], true, 0, MIN, &cfg);
    assert_eq!(f.findings, []);
}

#[test]
fn forgetting_flaps_makes_the_latest_count_the_baseline() {
    let mut f = registered(&[ib("mlx5_0", 1)]);
    judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 9)], MIN);
    f.forget_flaps();
    assert_eq!(
        judge_at(&mut f, &[flapped(ib("mlx5_0", 1), 9)], 2 * MIN),
        []
    );
}

#[test]
fn the_config_refuses_thresholds_in_the_wrong_order_and_an_empty_window() {
    let cfg = FabricHealthConfig {
        flaps_degraded: 5,
        flaps_unhealthy: 2,
        ..FabricHealthConfig::default()
    };
    let err = cfg.validate().expect_err("unhealthy below degraded");
    assert!(err.contains("health.fabric.flaps_unhealthy"), "{err}");
    let cfg = FabricHealthConfig {
        flap_window: Duration::ZERO,
        ..FabricHealthConfig::default()
    };
    let err = cfg.validate().expect_err("empty window");
    assert!(err.contains("health.fabric.flap_window"), "{err}");
    assert_eq!(FabricHealthConfig::default().validate(), Ok(()));
}

fn reg_with_fabric(node: &str, session: u64, ports: Vec<FabricPort>) -> crate::Registration {
    crate::Registration {
        fabric: ports,
        ..reg(node, session)
    }
}

/// A cluster of one node, `n1`, registered at `t(0)` with `ports`.
fn with_fabric(ports: Vec<FabricPort>) -> crate::ClusterState {
    let mut s = patient_state();
    step_ok(
        &mut s,
        Input::Register(reg_with_fabric("n1", 1, ports)),
        t(0),
    );
    s
}

fn fabric_beat(ports: Vec<FabricPort>) -> v1::Heartbeat {
    v1::Heartbeat {
        fabric: ports,
        fabric_read: true,
        ..v1::Heartbeat::default()
    }
}

#[test]
fn a_port_down_cordons_the_node_through_the_health_policy() {
    let mut s = with_fabric(vec![ib("mlx5_0", 1)]);
    heartbeat(&mut s, "n1", fabric_beat(vec![ib("mlx5_0", 1)]), t(1));
    assert!(!s.nodes["n1"].cordoned());
    let effects = heartbeat(&mut s, "n1", fabric_beat(vec![down(ib("mlx5_0", 1))]), t(2));
    let cordon = s.nodes["n1"].record.cordon.clone().expect("cordoned");
    assert_eq!(cordon.source, CordonSource::Auto);
    assert_eq!(
        cordon.reason,
        "port mlx5_0/1 is DOWN (was ACTIVE, 400 Gb/sec)"
    );
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Cordoned {
            rule: crate::kinds::CordonRule::Health("fabric_port_down"),
            ..
        }
    )));
}

#[test]
fn a_flapping_port_marks_the_node_degraded_and_it_stays_schedulable() {
    let mut s = with_fabric(vec![ib("mlx5_0", 1)]);
    heartbeat(
        &mut s,
        "n1",
        fabric_beat(vec![flapped(ib("mlx5_0", 1), 2)]),
        t(1),
    );
    let n = &s.nodes["n1"];
    assert_eq!(n.condition, Condition::Degraded);
    assert!(!n.cordoned());
    assert_eq!(n.display_state(), crate::node::NodeState::Degraded);
}

/// n1 registers again (session `session`, at `t(at)`) with `ports`; its effects.
fn re_register(
    s: &mut crate::ClusterState,
    session: u64,
    ports: Vec<FabricPort>,
    at: u64,
) -> Vec<Effect> {
    step_ok(
        s,
        Input::Register(reg_with_fabric("n1", session, ports)),
        t(at),
    )
}

fn cordoned_now(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Cordoned { .. }))
}

#[test]
fn a_port_down_at_a_re_registration_is_a_fault_charged_once() {
    // The port went down while the agent was away (a reboot, an agent restart): the node's
    // record remembers it was up, so the node does not come back healthy without it.
    let mut s = with_fabric(vec![ib("mlx5_0", 1), ib("mlx5_1", 1)]);
    assert_eq!(s.nodes["n1"].record.fabric_ports.len(), 2);
    let first = re_register(&mut s, 2, vec![down(ib("mlx5_0", 1)), ib("mlx5_1", 1)], 1);
    assert!(cordoned_now(&first), "{first:?}");
    let cordon = s.nodes["n1"].record.cordon.clone().expect("cordoned");
    assert_eq!(
        cordon.reason,
        "port mlx5_0/1 is DOWN at registration (was ACTIVE, 400 Gb/sec when the node last \
         registered)"
    );
    // Heartbeats no longer require it (it was not up at this registration), and the record
    // remembers only the ports up now: registering again changes nothing.
    heartbeat(
        &mut s,
        "n1",
        fabric_beat(vec![down(ib("mlx5_0", 1)), ib("mlx5_1", 1)]),
        t(2),
    );
    assert_eq!(s.nodes["n1"].health.fabric.required.len(), 1);
    let reasons = s.nodes["n1"].health.reasons();
    for session in 3..6 {
        let again = re_register(
            &mut s,
            session,
            vec![down(ib("mlx5_0", 1)), ib("mlx5_1", 1)],
            session,
        );
        assert!(!cordoned_now(&again), "{again:?}");
    }
    assert_eq!(s.nodes["n1"].health.reasons(), reasons, "charged once");
    assert_eq!(s.nodes["n1"].condition, Condition::Unhealthy);
}

#[test]
fn only_a_registration_that_read_the_port_down_judges_it() {
    let mut s = with_fabric(vec![ib("mlx5_0", 1), netdev("eth2")]);
    // No fabric data (an older agent, a failed read): no evidence, and the memory stays.
    let blind = re_register(&mut s, 2, Vec::new(), 1);
    assert!(!cordoned_now(&blind), "{blind:?}");
    assert_eq!(s.nodes["n1"].record.fabric_ports.len(), 2);
    // A port missing from the read (its device left [fabric] devices): not judged here.
    let fewer = re_register(&mut s, 3, vec![netdev("eth2")], 2);
    assert!(!cordoned_now(&fewer), "{fewer:?}");
    assert_eq!(s.nodes["n1"].condition, Condition::Healthy);
    // The interface read down at the next one: a fault, named.
    let mut s = with_fabric(vec![ib("mlx5_0", 1), netdev("eth2")]);
    let effects = re_register(&mut s, 2, vec![ib("mlx5_0", 1), down(netdev("eth2"))], 1);
    assert!(cordoned_now(&effects), "{effects:?}");
    assert_eq!(
        s.nodes["n1"]
            .record
            .cordon
            .clone()
            .expect("cordoned")
            .reason,
        "interface eth2 is down at registration (was up, 100 Gb/sec when the node last \
         registered)"
    );
}

#[test]
fn a_port_that_comes_back_up_is_required_again() {
    let mut s = with_fabric(vec![ib("mlx5_0", 1)]);
    re_register(&mut s, 2, vec![down(ib("mlx5_0", 1))], 1);
    assert!(s.nodes["n1"].record.fabric_ports.is_empty());
    re_register(&mut s, 3, vec![ib("mlx5_0", 1)], 2);
    assert_eq!(s.nodes["n1"].record.fabric_ports.len(), 1);
    assert_eq!(s.nodes["n1"].health.fabric.required.len(), 1);
}
