//! The cordon breaker on simulated time: every input through `step`, time through `tick`, as the
//! engine drives them.

use std::time::Duration;

use vigil_proto::v1;

use super::*;
use crate::node::CordonSource;
use crate::state::ClusterState;
use crate::step::Input;
use crate::test_utils::{agent_event, heartbeat, patient_state, reg, register_at, step_ok, t, xid};

fn name(i: usize) -> String {
    format!("gpu-{i:03}")
}

/// `n` registered nodes under `cfg`.
fn cluster(n: usize, cfg: BreakerConfig) -> ClusterState {
    let mut s = patient_state();
    s.breaker.cfg = cfg;
    for i in 0..n {
        register_at(&mut s, reg(&name(i), 1), t(0));
    }
    s
}

/// 8 nodes under the defaults (cap 1): gpu-000 cordoned, gpu-001 held, the breaker open.
fn tripped() -> ClusterState {
    let mut s = cluster(8, BreakerConfig::default());
    fall_off_bus(&mut s, &name(0), t(0));
    fall_off_bus(&mut s, &name(1), t(1));
    assert!(s.breaker.is_open());
    assert_eq!(held(&s), [name(1)]);
    s
}

fn quarter() -> BreakerConfig {
    BreakerConfig {
        max_fraction: 0.25,
        ..BreakerConfig::default()
    }
}

/// XID 79 on `node` at `now`.
fn fall_off_bus(s: &mut ClusterState, node: &str, now: Now) -> Vec<Effect> {
    agent_event(s, node, xid(0, 79, now.wall_ms), now)
}

fn cordoned(s: &ClusterState) -> Vec<String> {
    s.nodes
        .values()
        .filter(|n| n.record.cordon.is_some())
        .map(|n| n.record.name.clone())
        .collect()
}

fn held(s: &ClusterState) -> Vec<String> {
    s.breaker.held.keys().cloned().collect()
}

fn reset(s: &mut ClusterState, now: Now) -> Vec<Effect> {
    step_ok(
        s,
        Input::ResetBreaker {
            by: "alice (admin)".into(),
        },
        now,
    )
}

fn count<F: Fn(&Effect) -> bool>(effects: &[Effect], f: F) -> usize {
    effects.iter().filter(|e| f(e)).count()
}

#[test]
fn cap_is_the_lower_of_fraction_and_max_nodes_but_never_below_one() {
    let d = BreakerConfig::default();
    assert_eq!(d.cap(8), 1, "10% of 8 is 0.8, rounded down, raised to one");
    assert_eq!(d.cap(0), 1);
    assert_eq!(d.cap(100), 10);
    assert_eq!(d.cap(1000), 50, "max_nodes caps a large fleet");
    assert_eq!(quarter().cap(8), 2);
    assert_eq!(quarter().cap(9), 2, "rounded down");
    let one = BreakerConfig {
        max_nodes: 3,
        max_fraction: 1.0,
        ..BreakerConfig::default()
    };
    assert_eq!(one.cap(8), 3);
    assert_eq!(
        d.describe_cap(8),
        "cap of 1 node (10% of 8 nodes, max_nodes 50)"
    );
    assert_eq!(
        quarter().describe_cap(8),
        "cap of 2 nodes (25% of 8 nodes, max_nodes 50)"
    );
}

#[test]
fn validate_names_the_field_and_the_fix() {
    assert!(BreakerConfig::default().validate().is_ok());
    for bad in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        let cfg = BreakerConfig {
            max_fraction: bad,
            ..BreakerConfig::default()
        };
        let err = cfg.validate().expect_err("invalid fraction");
        assert!(err.contains("cordon_breaker.max_fraction"), "{err}");
    }
    let zero = BreakerConfig {
        max_nodes: 0,
        ..BreakerConfig::default()
    };
    assert!(
        zero.validate()
            .expect_err("zero nodes")
            .contains("cordon_breaker.max_nodes = 0: use 1")
    );
    for window in [Duration::ZERO, Duration::from_secs(30 * 86_400)] {
        let cfg = BreakerConfig {
            window,
            ..BreakerConfig::default()
        };
        assert!(
            cfg.validate()
                .expect_err("window out of range")
                .contains("cordon_breaker.window")
        );
    }
}

#[test]
fn xid_79_on_five_of_eight_nodes_cordons_the_cap_and_holds_the_rest() {
    let mut s = cluster(8, quarter());
    let mut all = Vec::new();
    for i in 0..5 {
        all.extend(fall_off_bus(&mut s, &name(i), t(10)));
    }
    assert_eq!(cordoned(&s), [name(0), name(1)]);
    assert_eq!(held(&s), [name(2), name(3), name(4)]);
    assert!(s.breaker.is_open());
    assert_eq!(
        count(&all, |e| matches!(e, Effect::BreakerLog { warn: true, .. })),
        1,
        "one line when it opens"
    );
    assert_eq!(count(&all, |e| matches!(e, Effect::CordonHeld { .. })), 3);
    assert_eq!(count(&all, |e| matches!(e, Effect::Cordoned { .. })), 2);
    let opened = &s.breaker.open.as_ref().expect("open").why;
    assert!(
        opened.contains("a cordon of gpu-002 would make 3 automatic cordons in 10m, past the cap of 2 nodes (25% of 8 nodes, max_nodes 50)"),
        "{opened}"
    );
    let node = &s.nodes[&name(3)];
    assert!(node.record.cordon.is_none(), "a held node is not cordoned");
    let event = node.events.back().expect("an event");
    assert_eq!(event.kind, EVENT_KIND);
    assert!(
        event.message.starts_with(
            "cordon held: breaker open (2 automatic cordons in the last 10m, cap 2): XID 79"
        ),
        "{}",
        event.message
    );
    assert_eq!(s.breaker.held[&name(3)].rule, "xid");
    // The held node is still Unhealthy, so unschedulable while the evidence stands.
    assert_eq!(node.condition, crate::health::Condition::Unhealthy);
}

#[test]
fn a_held_node_is_held_once_however_often_it_is_judged() {
    let mut s = cluster(8, BreakerConfig::default());
    fall_off_bus(&mut s, &name(0), t(1));
    fall_off_bus(&mut s, &name(1), t(2));
    let again = fall_off_bus(&mut s, &name(1), t(3));
    let ticked = crate::test_utils::tick_at(&mut s, t(4));
    for effects in [again, ticked] {
        assert_eq!(
            count(&effects, |e| matches!(e, Effect::CordonHeld { .. })),
            0
        );
        assert_eq!(
            count(&effects, |e| matches!(e, Effect::PersistBreaker(_))),
            0
        );
    }
}

#[test]
fn each_node_counts_once_in_the_window() {
    let mut s = cluster(8, quarter());
    fall_off_bus(&mut s, &name(0), t(1));
    step_ok(
        &mut s,
        Input::Uncordon {
            node: name(0),
            force: true,
        },
        t(2),
    );
    fall_off_bus(&mut s, &name(0), t(3));
    assert_eq!(cordoned(&s), [name(0)]);
    assert_eq!(
        s.breaker.window.len(),
        1,
        "the same node again is not a new one"
    );
    fall_off_bus(&mut s, &name(1), t(4));
    assert_eq!(cordoned(&s), [name(0), name(1)]);
    assert!(
        !s.breaker.is_open(),
        "two nodes reach the cap of two, no further"
    );
}

#[test]
fn the_window_slides_on_the_monotonic_clock_and_a_wall_step_changes_nothing() {
    let mut s = cluster(8, BreakerConfig::default());
    fall_off_bus(&mut s, &name(0), t(0));
    // Ten minutes later on the monotonic clock, but the wall clock was stepped back a day.
    let stepped_back = Now {
        mono: t(601).mono,
        wall_ms: t(0).wall_ms - 86_400_000,
    };
    let ticked = crate::test_utils::tick_at(&mut s, stepped_back);
    assert_eq!(
        count(&ticked, |e| matches!(e, Effect::PersistBreaker(_))),
        1
    );
    assert!(s.breaker.window.is_empty(), "out of the window");
    fall_off_bus(&mut s, &name(1), stepped_back);
    assert!(!s.breaker.is_open());
    assert_eq!(cordoned(&s), [name(0), name(1)]);
    // Within the window, a wall clock stepped a day ahead does not age the cordon out.
    let stepped_ahead = Now {
        mono: t(602).mono,
        wall_ms: t(0).wall_ms + 86_400_000,
    };
    fall_off_bus(&mut s, &name(2), stepped_ahead);
    assert!(s.breaker.is_open());
    assert_eq!(held(&s), [name(2)]);
}

#[test]
fn the_breaker_never_closes_by_itself() {
    let mut s = tripped();
    crate::test_utils::tick_at(&mut s, t(7200));
    assert!(s.breaker.is_open());
    assert!(s.breaker.window.is_empty());
    fall_off_bus(&mut s, &name(2), t(7201));
    assert_eq!(held(&s), [name(1), name(2)], "still holding, hours later");
}

#[test]
fn operator_cordons_are_never_held_and_supersede_a_hold() {
    let mut s = tripped();
    for i in [1, 5] {
        step_ok(
            &mut s,
            Input::Cordon {
                node: name(i),
                reason: "bad cable".into(),
            },
            t(2),
        );
    }
    assert_eq!(cordoned(&s), [name(0), name(1), name(5)]);
    assert_eq!(
        s.nodes[&name(5)].record.cordon.as_ref().map(|c| c.source),
        Some(CordonSource::Operator)
    );
    assert!(
        held(&s).is_empty(),
        "the operator's cordon replaced the hold"
    );
    assert_eq!(
        s.breaker.window.len(),
        1,
        "operator cordons are not counted"
    );
}

#[test]
fn burn_in_is_neither_counted_nor_held() {
    let mut s = tripped();
    s.start_burn_in(&name(6), "join", t(2));
    assert!(s.nodes[&name(6)].record.cordon.is_some());
    assert_eq!(held(&s), [name(1)]);
}

#[test]
fn triage_and_lemon_cordons_go_through_the_same_breaker() {
    let mut s = cluster(8, BreakerConfig::default());
    let first = s.auto_cordon(&name(0), "triage: failed".into(), CordonRule::Triage, t(0));
    assert!(first.iter().any(|e| matches!(
        e,
        Effect::Cordoned {
            rule: CordonRule::Triage,
            ..
        }
    )));
    let lemon = s.auto_cordon(
        &name(1),
        "GPU serial S1 is a lemon".into(),
        CordonRule::RepeatOffender,
        t(1),
    );
    assert_eq!(cordoned(&s), [name(0)]);
    assert!(lemon.iter().any(|e| matches!(
        e,
        Effect::CordonHeld {
            rule: CordonRule::RepeatOffender,
            ..
        }
    )));
    assert_eq!(
        s.breaker.held[&name(1)].evidence,
        "GPU serial S1 is a lemon"
    );
    // A new reason on a node already cordoned takes no one else out: never held.
    s.auto_cordon(
        &name(0),
        "lemon too".into(),
        CordonRule::RepeatOffender,
        t(2),
    );
    assert_eq!(
        s.nodes[&name(0)]
            .record
            .cordon
            .as_ref()
            .map(|c| c.reason.as_str()),
        Some("lemon too")
    );
}

#[test]
fn reset_closes_it_and_replays_no_stale_evidence() {
    let mut s = cluster(8, quarter());
    for i in 0..5 {
        fall_off_bus(&mut s, &name(i), t(10));
    }
    let effects = reset(&mut s, t(20));
    assert!(!s.breaker.is_open());
    assert!(s.breaker.window.is_empty(), "a fresh window");
    assert!(held(&s).is_empty());
    assert_eq!(
        s.breaker.last_reset,
        Some(Reset {
            by: "alice (admin)".into(),
            at_unix_ms: t(20).wall_ms
        })
    );
    assert_eq!(
        count(&effects, |e| matches!(
            e,
            Effect::BreakerLog { warn: false, .. }
        )),
        1
    );
    assert_eq!(count(&effects, |e| matches!(e, Effect::Cordoned { .. })), 0);
    // Time passes and the held nodes report healthy samples: the XIDs from before the reset
    // are not replayed.
    for i in 2..5 {
        heartbeat(&mut s, &name(i), v1::Heartbeat::default(), t(30));
    }
    crate::test_utils::tick_at(&mut s, t(40));
    assert_eq!(cordoned(&s), [name(0), name(1)]);
    assert!(!s.breaker.is_open());
    // Fresh evidence after the reset cordons within the (new) cap.
    fall_off_bus(&mut s, &name(3), t(50));
    fall_off_bus(&mut s, &name(4), t(51));
    assert_eq!(cordoned(&s), [name(0), name(1), name(3), name(4)]);
    fall_off_bus(&mut s, &name(2), t(52));
    assert!(s.breaker.is_open(), "the cap still applies after a reset");
    assert_eq!(held(&s), [name(2)]);
}

#[test]
fn reset_judges_held_nodes_on_fresh_samples() {
    let mut s = cluster(8, BreakerConfig::default());
    let bad = v1::Heartbeat {
        gpus: vec![v1::GpuSample {
            index: 0,
            ecc_uncorrected_volatile: Some(2),
            ..Default::default()
        }],
        ..Default::default()
    };
    heartbeat(&mut s, &name(0), bad.clone(), t(1));
    heartbeat(&mut s, &name(1), bad.clone(), t(2));
    assert_eq!(held(&s), [name(1)]);
    reset(&mut s, t(3));
    assert_eq!(cordoned(&s), [name(0)], "the reset itself cordons nothing");
    heartbeat(&mut s, &name(1), bad, t(4));
    assert_eq!(
        cordoned(&s),
        [name(0), name(1)],
        "a fresh sample still shows it"
    );
}

#[test]
fn a_restart_keeps_the_breaker_open_and_its_window() {
    let mut s = cluster(8, quarter());
    let mut stored = None;
    for i in 0..3 {
        for e in fall_off_bus(&mut s, &name(i), t(10)) {
            if let Effect::PersistBreaker(b) = e {
                stored = Some(*b);
            }
        }
    }
    let stored = stored.expect("the breaker was stored");
    let json = serde_json::to_string(&stored).expect("serialises");
    let loaded: Breaker = serde_json::from_str(&json).expect("reads back");
    // A new process: its monotonic clock starts again at zero.
    let mut fresh = cluster(8, quarter());
    let restart = Now {
        mono: crate::time::Instant::ZERO,
        wall_ms: t(100).wall_ms,
    };
    fresh.breaker.restore(loaded, restart);
    assert!(fresh.breaker.is_open());
    assert_eq!(
        fresh.breaker.held.keys().cloned().collect::<Vec<_>>(),
        [name(2)]
    );
    assert_eq!(fresh.breaker.cfg, quarter(), "the config is this process's");
    assert_eq!(fresh.breaker.window.len(), 2);
    let before = Now {
        mono: crate::time::Instant::ZERO + Duration::from_secs(599),
        wall_ms: t(700).wall_ms,
    };
    assert!(!fresh.breaker.prune(before), "counted from the restart on");
    let after = Now {
        mono: crate::time::Instant::ZERO + Duration::from_secs(600),
        wall_ms: t(701).wall_ms,
    };
    assert!(fresh.breaker.prune(after));
}
