//! Stragglers with simulated time: steps fed through heartbeats, one node slower. Every input
//! goes through `step` and time through `tick`, as the engine drives them.

use crate::test_utils::{T0, agent_event, heartbeat, reg, register_at, submit_at, t, tick_at};
use std::collections::VecDeque;

use vigil_proto::v1;

use super::*;
use crate::config::{HealthConfig, LivenessConfig};
use crate::job::WorkerPhase;
use crate::time::Instant;

const SPEC: &str = r#"name = "train"
nodes = 3
gpus_per_node = 1
command = ["python3", "train.py"]
workdir = "/w"
[checkpoint]
dir = "/c"
[progress]
hang_timeout = "10m"
"#;

fn cluster() -> (ClusterState, String) {
    let liveness = LivenessConfig {
        unreachable_after: std::time::Duration::from_secs(3600),
        lost_after: std::time::Duration::from_secs(7200),
        ..LivenessConfig::default()
    };
    let mut s = ClusterState::load(
        Vec::new(),
        Vec::new(),
        liveness,
        HealthConfig::default(),
        t(0),
    );
    for i in 1..=3u64 {
        register_at(&mut s, reg(&format!("n{i}"), i), t(0));
    }
    let id = submit_at(&mut s, SPEC, t(0));
    assert_eq!(s.jobs[&id].placement, ["n1", "n2", "n3"]);
    (s, id)
}

/// At `secs`, every node reports `rate(node) x secs` steps; then a tick.
fn second(s: &mut ClusterState, id: &str, secs: u64, rate: impl Fn(&str) -> u64) -> Vec<Effect> {
    let mut effects = Vec::new();
    for node in ["n1", "n2", "n3"] {
        let hb = v1::Heartbeat {
            workers: vec![v1::WorkerInfo {
                job_id: id.into(),
                attempt: 1,
                progress_step: Some(rate(node) * secs),
                ..Default::default()
            }],
            ..Default::default()
        };
        effects.extend(heartbeat(s, node, hb, t(secs)));
    }
    effects.extend(tick_at(s, t(secs)));
    effects
}

fn degraded(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Condition {
                node,
                to: Condition::Degraded,
                ..
            } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn half_speed_n3(node: &str) -> u64 {
    if node == "n3" { 5 } else { 10 }
}

#[test]
fn a_node_consistently_slower_than_the_gang_is_flagged_degraded_straggler() {
    let (mut s, id) = cluster();
    let mut flagged_at = None;
    for secs in 1..=70 {
        let e = second(&mut s, &id, secs, half_speed_n3);
        if !degraded(&e).is_empty() {
            assert_eq!(degraded(&e), ["n3"]);
            flagged_at.get_or_insert(secs);
        }
    }
    assert_eq!(
        flagged_at,
        Some(62),
        "slow from second 2 (two samples), flagged 60 s later"
    );
    assert_eq!(s.nodes["n3"].condition, Condition::Degraded);
    let reasons = s.nodes["n3"].health.reasons();
    assert!(
        reasons[0].starts_with("straggler: 5.0 steps/s, 50% below the gang's median 10.0 steps/s"),
        "{reasons:?}"
    );
    assert!(s.jobs[&id].stragglers.contains("n3"));
    assert!(
        crate::jobs::eligible(&s.nodes["n3"], 1),
        "a straggler stays schedulable"
    );
    assert_eq!(
        s.jobs[&id].phase,
        JobPhase::Running,
        "the run is not killed"
    );
    assert_eq!(s.nodes["n1"].condition, Condition::Healthy);
}

#[test]
fn a_brief_slowdown_is_not_a_straggler() {
    let (mut s, id) = cluster();
    for secs in 1..=20 {
        second(&mut s, &id, secs, half_speed_n3);
    }
    // n3 catches up: from now on its steps match the others'.
    for secs in 21..=120 {
        let e = second(&mut s, &id, secs, |_| 10);
        assert!(degraded(&e).is_empty(), "second {secs}");
    }
    assert!(s.jobs[&id].stragglers.is_empty());
}

#[test]
fn a_straggler_that_keeps_up_again_or_whose_attempt_ends_is_unflagged() {
    let (mut s, id) = cluster();
    for secs in 1..=70 {
        second(&mut s, &id, secs, half_speed_n3);
    }
    assert_eq!(s.nodes["n3"].condition, Condition::Degraded);
    // Keeping up: the same absolute steps per second as the others, from its own step.
    let base = 5 * 70;
    for secs in 71..=110 {
        second(&mut s, &id, secs, |n| {
            if n == "n3" {
                (base + 10 * (secs - 70)) / secs
            } else {
                10
            }
        });
    }
    finish(&mut s, &id, 111);
    assert_eq!(s.jobs[&id].phase, JobPhase::Succeeded);
    let e = tick_at(&mut s, t(111));
    assert!(s.jobs[&id].stragglers.is_empty(), "{e:?}");
    assert_eq!(s.nodes["n3"].condition, Condition::Healthy);
}

/// Every worker of attempt 1 exits 0 at `secs`: the job succeeds.
fn finish(s: &mut ClusterState, id: &str, secs: u64) {
    for node in ["n1", "n2", "n3"] {
        let ev = v1::AgentEvent {
            at_unix_ms: 0,
            kind: Some(v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
                job_id: id.into(),
                attempt: 1,
                exit_code: Some(0),
                ..Default::default()
            })),
        };
        agent_event(s, node, ev, t(secs));
    }
}

#[test]
fn a_straggler_whose_attempt_ends_is_unflagged() {
    let (mut s, id) = cluster();
    for secs in 1..=70 {
        second(&mut s, &id, secs, half_speed_n3);
    }
    assert!(s.jobs[&id].stragglers.contains("n3"));
    assert_eq!(s.nodes["n3"].condition, Condition::Degraded);
    finish(&mut s, &id, 71);
    assert_eq!(s.jobs[&id].phase, JobPhase::Succeeded);
    let e = tick_at(&mut s, t(72));
    assert!(s.jobs[&id].stragglers.is_empty(), "{e:?}");
    assert_eq!(s.nodes["n3"].condition, Condition::Healthy);
    assert!(s.nodes["n3"].health.straggler.is_none());
}

#[test]
fn rates_come_from_the_window_and_need_two_samples() {
    let mut w = Worker {
        node_rank: 0,
        phase: WorkerPhase::Running,
        pid: 1,
        exit_code: None,
        signal: None,
        progress_step: Some(0),
        progress_at_ms: T0,
        log_path: String::new(),
        progress_mono: Instant::ZERO,
        sent: None,
        rate_samples: VecDeque::new(),
    };
    sample(&mut w, ms(0));
    assert_eq!(rate(&w, ms(0), Duration::from_secs(30)), None);
    for (secs, step) in [(10, 100), (20, 300)] {
        w.progress_step = Some(step);
        sample(&mut w, ms(secs * 1000));
    }
    assert_eq!(rate(&w, ms(20_000), Duration::from_secs(30)), Some(15.0));
    assert_eq!(
        rate(&w, ms(35_000), Duration::from_secs(30)),
        Some(20.0),
        "the first sample aged out"
    );
    assert_eq!(rate(&w, ms(45_000), Duration::from_secs(30)), None);
    for i in 0..100 {
        sample(&mut w, ms(100_000 + i));
    }
    assert_eq!(w.rate_samples.len(), MAX_SAMPLES);
}

#[test]
fn the_median_and_the_config_are_sound() {
    assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
    assert_eq!(median(Vec::new()), None);
    assert!(StragglerConfig::default().validate().is_ok());
    for bad in [0.0, 1.0, -0.5] {
        let cfg = StragglerConfig {
            slower_than: bad,
            ..StragglerConfig::default()
        };
        assert!(cfg.validate().is_err());
    }
}

#[test]
fn with_swap_at_checkpoint_a_straggler_is_swapped_for_the_spare_at_the_next_checkpoint() {
    let liveness = LivenessConfig {
        unreachable_after: std::time::Duration::from_secs(3600),
        lost_after: std::time::Duration::from_secs(7200),
        ..LivenessConfig::default()
    };
    let mut s = ClusterState::load(
        Vec::new(),
        Vec::new(),
        liveness,
        HealthConfig::default(),
        t(0),
    );
    s.stragglers.swap_at_checkpoint = true;
    for i in 1..=4u64 {
        register_at(&mut s, reg(&format!("n{i}"), i), t(0));
    }
    let spec = SPEC.replace("workdir = \"/w\"", "workdir = \"/w\"\nspare_nodes = 1");
    let id = submit_at(&mut s, &spec, t(0));
    assert_eq!(s.jobs[&id].placement, ["n1", "n2", "n3"]);
    // The pass that starts a job takes no spares for it; the next one (a tick) does.
    tick_at(&mut s, t(0));
    assert_eq!(s.jobs[&id].spares, ["n4"]);
    for secs in 1..=70 {
        second(&mut s, &id, secs, half_speed_n3);
    }
    assert!(s.jobs[&id].stragglers.contains("n3"));
    assert_eq!(
        s.jobs[&id].phase,
        JobPhase::Running,
        "not killed before a checkpoint"
    );
    let ev = v1::AgentEvent {
        at_unix_ms: 0,
        kind: Some(v1::agent_event::Kind::Checkpoint(v1::CheckpointSeen {
            job_id: id.clone(),
            attempt: 1,
            path: "/c/step_00000700".into(),
            step: Some(700),
            ..Default::default()
        })),
    };
    agent_event(&mut s, "n1", ev, t(71));
    assert_eq!(s.jobs[&id].phase, JobPhase::Stopping);
    assert_eq!(
        s.jobs[&id].attempts[0].failure_kind,
        Some(crate::kinds::FailureKind::StragglerSwap)
    );
    for node in ["n1", "n2", "n3"] {
        let ev = v1::AgentEvent {
            at_unix_ms: 0,
            kind: Some(v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
                job_id: id.clone(),
                attempt: 1,
                stopped: true,
                ..Default::default()
            })),
        };
        agent_event(&mut s, node, ev, t(72));
    }
    assert_eq!(s.jobs[&id].phase, JobPhase::Restarting, "backoff");
    tick_at(&mut s, t(90));
    let job = &s.jobs[&id];
    assert_eq!(job.attempt, 2);
    assert_eq!(
        job.placement,
        ["n1", "n2", "n4"],
        "the spare replaces the straggler"
    );
    assert_eq!(
        job.attempts[1].resumed_from.as_ref().and_then(|c| c.step),
        Some(700)
    );
}

/// As `second`, every node at the same pace (10 steps/s), the GPU of the
/// nodes in `throttled` reporting thermal throttling; `n4`, outside the
/// job, reports throttling too when it is in `throttled`.
fn throttled_second(s: &mut ClusterState, id: &str, secs: u64, throttled: &[&str]) -> Vec<Effect> {
    let gpus = |node: &str| {
        vec![v1::GpuSample {
            index: 0,
            throttle_thermal: Some(throttled.contains(&node)),
            throttle_hw_slowdown: Some(false),
            ..Default::default()
        }]
    };
    let mut effects = Vec::new();
    for node in ["n1", "n2", "n3"] {
        let hb = v1::Heartbeat {
            gpus: gpus(node),
            workers: vec![v1::WorkerInfo {
                job_id: id.into(),
                attempt: 1,
                progress_step: Some(10 * secs),
                ..Default::default()
            }],
            ..Default::default()
        };
        effects.extend(heartbeat(s, node, hb, t(secs)));
    }
    if s.nodes.contains_key("n4") {
        let hb = v1::Heartbeat {
            gpus: gpus("n4"),
            ..Default::default()
        };
        effects.extend(heartbeat(s, "n4", hb, t(secs)));
    }
    effects.extend(tick_at(s, t(secs)));
    effects
}

fn straggler_events(s: &ClusterState, id: &str) -> Vec<String> {
    s.jobs[id]
        .events
        .iter()
        .filter(|e| e.kind == "straggler")
        .map(|e| e.message.clone())
        .collect()
}

#[test]
fn a_node_throttling_while_it_runs_the_job_is_a_straggler_even_at_the_gangs_pace() {
    let (mut s, id) = cluster();
    for secs in 1..=60 {
        throttled_second(&mut s, &id, secs, &["n2"]);
        assert!(s.jobs[&id].stragglers.is_empty(), "second {secs}");
    }
    // Degraded all along by the sample rule; a straggler of the job only now.
    assert_eq!(s.nodes["n2"].condition, Condition::Degraded);
    throttled_second(&mut s, &id, 61, &["n2"]);
    assert!(s.jobs[&id].stragglers.contains("n2"));
    let reasons = s.nodes["n2"].health.reasons();
    let flag = reasons
        .iter()
        .find(|r| r.starts_with("straggler: "))
        .unwrap_or_else(|| panic!("no straggler reason: {reasons:?}"));
    assert!(flag.contains("thermal throttling on GPU 0"), "{flag}");
    assert!(
        flag.contains(&format!("while it runs job {id} for 1m")),
        "{flag}"
    );
    assert_eq!(straggler_events(&s, &id).len(), 1);
    assert_eq!(
        s.jobs[&id].phase,
        JobPhase::Running,
        "the run is not killed"
    );
    assert!(
        crate::jobs::eligible(&s.nodes["n2"], 1),
        "a straggler stays schedulable"
    );

    // The throttling ends: the flag goes with it.
    throttled_second(&mut s, &id, 62, &[]);
    assert!(s.jobs[&id].stragglers.is_empty());
    assert_eq!(s.nodes["n2"].condition, Condition::Healthy);
    assert_eq!(
        straggler_events(&s, &id).len(),
        2,
        "flagged, then unflagged"
    );
}

#[test]
fn throttling_that_is_brief_or_on_a_node_outside_the_job_flags_no_straggler() {
    let (mut s, id) = cluster();
    register_at(&mut s, reg("n4", 4), t(0));
    for secs in 1..=30 {
        throttled_second(&mut s, &id, secs, &["n3", "n4"]);
    }
    for secs in 31..=120 {
        throttled_second(&mut s, &id, secs, &["n4"]);
    }
    assert!(s.jobs[&id].stragglers.is_empty());
    assert!(straggler_events(&s, &id).is_empty());
    assert_eq!(
        s.nodes["n4"].condition,
        Condition::Degraded,
        "n4 throttles, but runs no job: the sample rule only"
    );
    assert!(s.nodes["n4"].health.straggler.is_none());
}

#[test]
fn with_stragglers_disabled_throttling_flags_nothing() {
    let (mut s, id) = cluster();
    s.stragglers.enabled = false;
    for secs in 1..=120 {
        throttled_second(&mut s, &id, secs, &["n1"]);
    }
    assert!(s.jobs[&id].stragglers.is_empty());
}

/// `ms` milliseconds after the monotonic clock's origin.
fn ms(ms: u64) -> Instant {
    Instant::from_origin(Duration::from_millis(ms))
}
