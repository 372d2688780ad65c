//! Heartbeats that say GPU health is unchanged (`Heartbeat.gpu_health_unchanged`): judged as
//! the full heartbeat they stand for, never read as "no GPUs".

use vigil_proto::heartbeat_form::{SessionSamples, telemetry};
use vigil_proto::v1::{GpuSample, Heartbeat, NvLinkStatus};

use crate::health::Condition;
use crate::node::SampleBase;
use crate::state::{ClusterState, Effect, Ignored};
use crate::test_utils::{heartbeat, patient_state, reg_with_gpus, register_at, t};

const GPUS: u32 = 8;

/// A healthy board of 8 GPUs with 18 NVLinks each, read at `at_ms`.
fn board(at_ms: u64) -> Vec<GpuSample> {
    (0..GPUS)
        .map(|index| GpuSample {
            index,
            temperature_c: Some(60.0),
            power_w: Some(600.0),
            utilization_pct: Some(95),
            memory_used_bytes: Some(60 << 30),
            memory_temperature_c: Some(65.0),
            ecc_uncorrected_volatile: Some(0),
            remapped_rows_pending: Some(false),
            remapped_rows_failure: Some(false),
            throttle_thermal: Some(false),
            pcie_link_width_current: Some(16),
            pcie_link_width_max: Some(16),
            pcie_replay_counter: Some(0),
            nvlinks: (0..18)
                .map(|link| NvLinkStatus {
                    link,
                    active: true,
                    crc_errors: Some(0),
                    ..Default::default()
                })
                .collect(),
            nvlink_supported: Some(true),
            observed_at_unix_ms: at_ms,
            ..Default::default()
        })
        .collect()
}

/// A change to a board, for one scenario.
type Vary = fn(&mut [GpuSample]);

/// Boards the health policy judges differently: healthy, Degraded, Unhealthy, one with links
/// unused since registration, one whose counters rise.
fn variations() -> Vec<(&'static str, Vary)> {
    vec![
        ("healthy", |_| {}),
        ("row remap pending", |b| {
            b[2].remapped_rows_pending = Some(true)
        }),
        ("uncorrected ECC", |b| {
            b[5].ecc_uncorrected_volatile = Some(2)
        }),
        ("links unused since registration", |b| {
            b[1].nvlinks[3].active = false;
            b[6].nvlinks[17].active = false;
        }),
        ("PCIe below its width", |b| {
            b[0].pcie_link_width_current = Some(8)
        }),
        ("PCIe replays", |b| b[4].pcie_replay_counter = Some(7)),
    ]
}

/// What heartbeat `i` of a sequence reads: telemetry that moves every time (temperature across
/// the limit now and then), and, at two points, a change of health.
fn reading(i: u64, vary: Vary) -> Vec<GpuSample> {
    let mut b = board(crate::test_utils::T0 + i * 1000);
    vary(&mut b);
    for (g, s) in (0..).zip(b.iter_mut()) {
        let wave = ((i + g) % 7) as f32;
        s.temperature_c = Some(70.0 + wave * 5.0);
        s.power_w = Some(500.0 + wave);
        s.utilization_pct = Some(u32::try_from(i % 100).unwrap_or(0));
        s.memory_used_bytes = Some(i << 20);
    }
    if (12..20).contains(&i) {
        b[3].throttle_thermal = Some(true);
    }
    if i >= 25 {
        // Replays keep rising: the rate rule's window moves with time, not with the form.
        let replays = b[4].pcie_replay_counter.unwrap_or(0);
        b[4].pcie_replay_counter = Some(replays + 200);
    }
    b
}

fn registered() -> ClusterState {
    let mut s = patient_state();
    register_at(&mut s, reg_with_gpus("n1", 1, GPUS), t(0));
    s
}

fn beat(gpus: Vec<GpuSample>) -> Heartbeat {
    Heartbeat {
        gpus,
        ..Heartbeat::default()
    }
}

fn compact(gpus: &[GpuSample]) -> Heartbeat {
    Heartbeat {
        gpu_health_unchanged: true,
        telemetry: gpus.iter().map(telemetry).collect(),
        ..Heartbeat::default()
    }
}

#[test]
fn a_compact_heartbeat_yields_what_the_equivalent_full_heartbeat_yields() {
    for (name, vary) in variations() {
        let mut full = registered();
        let mut lighter = registered();
        let mut agent = SessionSamples::new(true);
        let mut forms = (0, 0);
        for i in 1..70u64 {
            let now = t(i);
            let samples = reading(i, vary);
            let mut hb = Heartbeat::default();
            let sent = agent.fill(&mut hb, samples.clone());
            if hb.gpu_health_unchanged {
                forms.1 += 1;
            } else {
                forms.0 += 1;
            }
            agent.sent(sent);
            let expected = heartbeat(&mut full, "n1", beat(samples), now);
            let got = heartbeat(&mut lighter, "n1", hb, now);
            assert_eq!(got, expected, "{name}: effects of heartbeat {i}");
            let (a, b) = (&full.nodes["n1"], &lighter.nodes["n1"]);
            assert_eq!(b.last_samples, a.last_samples, "{name}: samples at {i}");
            assert_eq!(b.health, a.health, "{name}: findings at {i}");
            assert_eq!(b.condition, a.condition, "{name}: condition at {i}");
            assert_eq!(b.record, a.record, "{name}: record at {i}");
        }
        assert!(forms.1 > 50, "{name}: mostly compact ({forms:?})");
    }
}

#[test]
fn a_compact_heartbeat_without_full_samples_this_session_changes_no_gpu_state() {
    let mut s = registered();
    let effects = heartbeat(&mut s, "n1", compact(&board(1)[..3]), t(1));
    let ignored = |effects: &[Effect]| {
        effects
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Ignored {
                        why: Ignored::GpuTelemetryWithoutSamples,
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(ignored(&effects), 1, "{effects:?}");
    let n = &s.nodes["n1"];
    assert!(n.last_samples.is_empty());
    assert!(n.health.sample_findings.is_empty(), "no GPU judged missing");
    assert_eq!(n.condition, Condition::Healthy);
    assert!(n.record.cordon.is_none());
    let again = heartbeat(&mut s, "n1", compact(&[]), t(2));
    assert_eq!(ignored(&again), 0, "reported once per session");
    assert_eq!(s.nodes["n1"].sample_base, SampleBase::MissingReported);
    // The full samples come: from then on compact heartbeats are read.
    heartbeat(&mut s, "n1", beat(board(3)), t(3));
    let mut hot = board(4);
    hot[0].temperature_c = Some(99.0);
    let read = heartbeat(&mut s, "n1", compact(&hot), t(4));
    assert_eq!(ignored(&read), 0);
    assert_eq!(s.nodes["n1"].last_samples[0].temperature_c, Some(99.0));
}

#[test]
fn full_samples_of_an_earlier_session_do_not_anchor_a_new_one() {
    let mut s = registered();
    let mut bad = board(1);
    bad[2].ecc_uncorrected_volatile = Some(1);
    heartbeat(&mut s, "n1", beat(board(1)), t(1));
    register_at(&mut s, reg_with_gpus("n1", 2, GPUS), t(2));
    let effects = heartbeat(&mut s, "n1", compact(&bad), t(3));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Ignored {
            why: Ignored::GpuTelemetryWithoutSamples,
            ..
        }
    )));
    assert!(s.nodes["n1"].last_samples.is_empty());
    assert!(s.nodes["n1"].record.cordon.is_none());
}

#[test]
fn a_compact_heartbeat_is_never_read_as_gpus_gone() {
    let mut s = registered();
    heartbeat(&mut s, "n1", beat(board(1)), t(1));
    for (i, telemetry_of) in [0usize, 3, 8].into_iter().enumerate() {
        let now = t(2 + i as u64);
        heartbeat(&mut s, "n1", compact(&board(2)[..telemetry_of]), now);
        let n = &s.nodes["n1"];
        assert_eq!(n.last_samples.len(), GPUS as usize);
        assert!(
            n.health.sample_findings.is_empty(),
            "{telemetry_of} GPUs' telemetry"
        );
        assert!(n.record.cordon.is_none());
        assert_eq!(n.gpus_healthy(), GPUS);
    }
}

#[test]
fn temperature_in_telemetry_is_judged_by_the_thermal_rule() {
    let mut s = registered();
    heartbeat(&mut s, "n1", beat(board(1)), t(1));
    let mut hot = board(2);
    hot[6].temperature_c = Some(s.health.temperature_max_c + 1.0);
    let effects = heartbeat(&mut s, "n1", compact(&hot), t(2));
    let n = &s.nodes["n1"];
    assert_eq!(n.condition, Condition::Degraded);
    assert_eq!(n.health.sample_findings.len(), 1);
    assert_eq!(n.health.sample_findings[0].rule, "temperature");
    assert_eq!(n.health.sample_findings[0].gpu, Some(6));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Condition {
            to: Condition::Degraded,
            ..
        }
    )));
    heartbeat(&mut s, "n1", compact(&board(3)), t(3));
    assert_eq!(s.nodes["n1"].condition, Condition::Healthy, "cooled down");
}
