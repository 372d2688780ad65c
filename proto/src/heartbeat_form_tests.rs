//! The full-or-compact rule, each health field in turn, and the size it saves.

use prost::Message;

use super::*;
use crate::v1::NvLinkStatus;

/// A busy, healthy H100 board as NVML reports it: every field set.
fn board() -> Vec<GpuSample> {
    (0..8)
        .map(|index| GpuSample {
            index,
            temperature_c: Some(61.5),
            power_w: Some(612.25),
            utilization_pct: Some(97),
            memory_used_bytes: Some(61 * (1 << 30) + 123_456_789),
            ecc_uncorrected_volatile: Some(0),
            ecc_corrected_volatile: Some(0),
            memory_temperature_c: Some(66.0),
            ecc_uncorrected_aggregate: Some(0),
            ecc_corrected_aggregate: Some(0),
            retired_pages_single_bit: Some(0),
            retired_pages_double_bit: Some(0),
            retired_pages_pending: Some(false),
            remapped_rows_correctable: Some(0),
            remapped_rows_uncorrectable: Some(0),
            remapped_rows_pending: Some(false),
            remapped_rows_failure: Some(false),
            throttle_hw_slowdown: Some(false),
            throttle_thermal: Some(false),
            throttle_power_brake: Some(false),
            pcie_link_gen_current: Some(5),
            pcie_link_gen_max: Some(5),
            pcie_link_width_current: Some(16),
            pcie_link_width_max: Some(16),
            pcie_replay_counter: Some(0),
            nvlinks: (0..18)
                .map(|link| NvLinkStatus {
                    link,
                    active: true,
                    crc_errors: Some(0),
                    replay_errors: Some(0),
                    recovery_errors: Some(0),
                })
                .collect(),
            persistence_mode: Some(true),
            observed_at_unix_ms: 1_700_000_000_000,
            nvlink_supported: Some(true),
        })
        .collect()
}

type Change = fn(&mut GpuSample);

/// One change of every health-relevant field (every field of `GpuSample` but the telemetry
/// and observed_at), by name.
fn health_changes() -> Vec<(&'static str, Change)> {
    vec![
        ("index", |s| s.index += 100),
        ("ecc_uncorrected_volatile", |s| {
            s.ecc_uncorrected_volatile = Some(1)
        }),
        ("ecc_corrected_volatile", |s| {
            s.ecc_corrected_volatile = Some(1)
        }),
        ("ecc_uncorrected_aggregate", |s| {
            s.ecc_uncorrected_aggregate = Some(1)
        }),
        ("ecc_corrected_aggregate", |s| {
            s.ecc_corrected_aggregate = Some(1)
        }),
        ("retired_pages_single_bit", |s| {
            s.retired_pages_single_bit = Some(1)
        }),
        ("retired_pages_double_bit", |s| {
            s.retired_pages_double_bit = Some(1)
        }),
        ("retired_pages_pending", |s| {
            s.retired_pages_pending = Some(true)
        }),
        ("remapped_rows_correctable", |s| {
            s.remapped_rows_correctable = Some(1)
        }),
        ("remapped_rows_uncorrectable", |s| {
            s.remapped_rows_uncorrectable = Some(1)
        }),
        ("remapped_rows_pending", |s| {
            s.remapped_rows_pending = Some(true)
        }),
        ("remapped_rows_failure", |s| {
            s.remapped_rows_failure = Some(true)
        }),
        ("throttle_hw_slowdown", |s| {
            s.throttle_hw_slowdown = Some(true)
        }),
        ("throttle_thermal", |s| s.throttle_thermal = Some(true)),
        ("throttle_power_brake", |s| {
            s.throttle_power_brake = Some(true)
        }),
        ("pcie_link_gen_current", |s| {
            s.pcie_link_gen_current = Some(3)
        }),
        ("pcie_link_gen_max", |s| s.pcie_link_gen_max = Some(4)),
        ("pcie_link_width_current", |s| {
            s.pcie_link_width_current = Some(8)
        }),
        ("pcie_link_width_max", |s| s.pcie_link_width_max = Some(8)),
        ("pcie_replay_counter", |s| s.pcie_replay_counter = Some(1)),
        ("nvlink active", |s| s.nvlinks[7].active = false),
        ("nvlink crc_errors", |s| s.nvlinks[7].crc_errors = Some(1)),
        ("nvlink replay_errors", |s| {
            s.nvlinks[7].replay_errors = Some(1)
        }),
        ("nvlink recovery_errors", |s| {
            s.nvlinks[7].recovery_errors = Some(1)
        }),
        ("nvlink number", |s| s.nvlinks[7].link = 40),
        ("nvlink gone", |s| {
            s.nvlinks.pop();
        }),
        ("persistence_mode", |s| s.persistence_mode = Some(false)),
        ("nvlink_supported", |s| s.nvlink_supported = None),
        ("a field unreported", |s| s.pcie_replay_counter = None),
    ]
}

/// Every telemetry field changed, and when it was read.
fn telemetry_change(s: &mut GpuSample) {
    s.temperature_c = Some(88.0);
    s.memory_temperature_c = None;
    s.power_w = Some(101.0);
    s.utilization_pct = Some(3);
    s.memory_used_bytes = Some(0);
    s.observed_at_unix_ms += 1000;
}

#[test]
fn every_health_field_that_changes_on_any_gpu_makes_the_heartbeat_full() {
    let last = board();
    assert!(!send_full(true, Some(&last), 0, &last), "nothing changed");
    for (name, change) in health_changes() {
        for gpu in [0, 3, 7] {
            let mut now = board();
            telemetry_change(&mut now[gpu]);
            change(&mut now[gpu]);
            assert!(
                send_full(true, Some(&last), 5, &now),
                "{name} changed on GPU {gpu}"
            );
        }
    }
}

#[test]
fn a_change_of_telemetry_alone_keeps_the_heartbeat_compact() {
    let last = board();
    let mut now = board();
    now.iter_mut().for_each(telemetry_change);
    assert!(!send_full(true, Some(&last), 0, &now));
    assert!(same_health(&last[0], &now[0]));
}

#[test]
fn a_changed_set_of_gpus_makes_the_heartbeat_full() {
    let last = board();
    let fewer = last[..7].to_vec();
    assert!(send_full(true, Some(&last), 0, &fewer));
    assert!(
        send_full(true, Some(&last), 0, &[]),
        "the GPUs could not be read"
    );
    let mut more = board();
    more.push(GpuSample {
        index: 8,
        ..last[0].clone()
    });
    assert!(send_full(true, Some(&last), 0, &more));
    let mut reordered = board();
    reordered.swap(0, 1);
    assert!(send_full(true, Some(&last), 0, &reordered));
}

#[test]
fn the_first_heartbeat_of_a_session_is_full() {
    assert!(send_full(true, None, 0, &board()));
    let mut hb = Heartbeat::default();
    let sent = SessionSamples::new(true).fill(&mut hb, board());
    assert!(matches!(sent, Sent::Full(_)));
    assert!(!hb.gpu_health_unchanged);
    assert_eq!(hb.gpus, board());
}

#[test]
fn a_coordinator_that_does_not_accept_the_compact_form_always_gets_full_samples() {
    let last = board();
    assert!(send_full(false, Some(&last), 0, &last));
    let mut session = SessionSamples::new(false);
    for _ in 0..FULL_SAMPLE_EVERY * 2 {
        let mut hb = Heartbeat::default();
        let sent = session.fill(&mut hb, board());
        assert!(matches!(sent, Sent::Full(_)));
        assert!(!hb.gpu_health_unchanged && hb.telemetry.is_empty());
        session.sent(sent);
    }
}

#[test]
fn every_nth_heartbeat_is_full_even_when_nothing_changed() {
    let mut session = SessionSamples::new(true);
    let mut forms = Vec::new();
    for _ in 0..FULL_SAMPLE_EVERY * 3 {
        let mut hb = Heartbeat::default();
        let sent = session.fill(&mut hb, board());
        forms.push(!hb.gpu_health_unchanged);
        session.sent(sent);
    }
    let full: Vec<usize> = (0..forms.len()).filter(|&i| forms[i]).collect();
    let n = FULL_SAMPLE_EVERY as usize;
    assert_eq!(full, [0, n, 2 * n]);
}

#[test]
fn a_new_session_starts_full_again() {
    let mut session = SessionSamples::new(true);
    let mut hb = Heartbeat::default();
    let sent = session.fill(&mut hb, board());
    session.sent(sent);
    assert_eq!(session.fill(&mut hb, board()), Sent::Compact);
    let next = SessionSamples::new(true);
    assert!(matches!(next.fill(&mut hb, board()), Sent::Full(_)));
}

#[test]
fn a_dropped_full_heartbeat_is_sent_full_again() {
    let mut session = SessionSamples::new(true);
    let mut hb = Heartbeat::default();
    let first = session.fill(&mut hb, board());
    session.sent(first);
    let mut changed = board();
    changed[2].throttle_thermal = Some(true);
    // Filled but never sent (the stream was full): not recorded.
    assert!(matches!(
        session.fill(&mut hb, changed.clone()),
        Sent::Full(_)
    ));
    assert!(matches!(session.fill(&mut hb, changed), Sent::Full(_)));
}

#[test]
fn health_is_compared_with_the_last_full_samples_not_the_last_heartbeat() {
    let mut session = SessionSamples::new(true);
    let mut hb = Heartbeat::default();
    let first = session.fill(&mut hb, board());
    session.sent(first);
    let mut changed = board();
    changed[1].ecc_corrected_volatile = Some(4);
    let sent = session.fill(&mut hb, changed.clone());
    assert!(matches!(sent, Sent::Full(_)));
    session.sent(sent);
    assert_eq!(session.fill(&mut hb, changed), Sent::Compact);
    assert!(
        matches!(session.fill(&mut hb, board()), Sent::Full(_)),
        "back to the first samples: a change from the last full ones"
    );
}

#[test]
fn a_compact_heartbeat_carries_each_gpus_telemetry_and_no_samples() {
    let mut session = SessionSamples::new(true);
    let mut hb = Heartbeat::default();
    let first = session.fill(&mut hb, board());
    session.sent(first);
    let mut now = board();
    telemetry_change(&mut now[5]);
    assert_eq!(session.fill(&mut hb, now.clone()), Sent::Compact);
    assert!(hb.gpu_health_unchanged && hb.gpus.is_empty());
    let expected: Vec<GpuTelemetry> = now.iter().map(telemetry).collect();
    assert_eq!(hb.telemetry, expected);
}

#[test]
fn merged_telemetry_rebuilds_the_samples_the_agent_read() {
    let mut merged = board();
    let mut now = board();
    now.iter_mut().for_each(telemetry_change);
    let telemetry: Vec<GpuTelemetry> = now.iter().rev().map(telemetry).collect();
    merge_telemetry(&mut merged, &telemetry);
    assert_eq!(merged, now, "matched by index, whatever the order");
}

#[test]
fn telemetry_never_adds_or_removes_a_gpu() {
    let mut merged = board();
    let mut t: Vec<GpuTelemetry> = board()[..3].iter().map(telemetry).collect();
    t[0].temperature_c = Some(90.0);
    t.push(GpuTelemetry {
        index: 42,
        ..GpuTelemetry::default()
    });
    merge_telemetry(&mut merged, &t);
    assert_eq!(merged.len(), 8);
    assert_eq!(merged[0].temperature_c, Some(90.0));
    assert_eq!(
        merged[1..],
        board()[1..],
        "GPUs without telemetry keep theirs"
    );
    merge_telemetry(&mut merged, &[]);
    assert_eq!(merged.len(), 8);
}

/// The measurement behind the compact form: 8 GPUs with 18 NVLinks each.
#[test]
fn a_compact_heartbeat_is_a_small_fraction_of_a_full_one() {
    let mut session = SessionSamples::new(true);
    let mut full = Heartbeat {
        sent_at_unix_ms: 1_700_000_000_123,
        ..Heartbeat::default()
    };
    let first = session.fill(&mut full, board());
    session.sent(first);
    let mut compact = full.clone();
    assert_eq!(session.fill(&mut compact, board()), Sent::Compact);
    let (full_len, compact_len) = (full.encoded_len(), compact.encoded_len());
    println!(
        "heartbeat of 8 GPUs x 18 NVLinks: full {full_len} bytes, compact {compact_len} bytes"
    );
    assert!(full_len > 2000, "full: {full_len}");
    assert!(compact_len * 8 < full_len, "compact: {compact_len}");
}
