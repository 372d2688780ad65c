//! One test per health rule, the XID classes, recurrence, and "not supported".

use std::time::Duration;

use super::*;

fn gpus(n: u32) -> Vec<GpuRecord> {
    (0..n)
        .map(|i| GpuRecord {
            index: i,
            uuid: format!("GPU-{i:08x}-0000-0000-0000-000000000000"),
            name: "H100".into(),
            pci_bus_id: String::new(),
            memory_total_bytes: 80 << 30,
            serial: String::new(),
        })
        .collect()
}

/// A healthy H100-like sample with every field supported.
fn healthy(index: u32) -> v1::GpuSample {
    v1::GpuSample {
        index,
        temperature_c: Some(40.0),
        power_w: Some(80.0),
        ecc_uncorrected_volatile: Some(0),
        ecc_corrected_volatile: Some(0),
        remapped_rows_pending: Some(false),
        remapped_rows_failure: Some(false),
        throttle_hw_slowdown: Some(false),
        throttle_thermal: Some(false),
        throttle_power_brake: Some(false),
        pcie_link_gen_current: Some(5),
        pcie_link_gen_max: Some(5),
        pcie_link_width_current: Some(16),
        pcie_link_width_max: Some(16),
        nvlink_supported: Some(true),
        nvlinks: (0..18)
            .map(|l| v1::NvLinkStatus {
                link: l,
                active: true,
                ..Default::default()
            })
            .collect(),
        observed_at_unix_ms: 1000,
        ..Default::default()
    }
}

fn judge_one(change: impl FnOnce(&mut v1::GpuSample)) -> Vec<Finding> {
    let mut samples: Vec<v1::GpuSample> = (0..8).map(healthy).collect();
    change(&mut samples[3]);
    judge_samples(&gpus(8), &samples, &HealthConfig::default())
}

fn only(findings: &[Finding]) -> (&'static str, Condition, Option<u32>) {
    assert_eq!(findings.len(), 1, "{findings:#?}");
    (findings[0].rule, findings[0].condition, findings[0].gpu)
}

#[test]
fn healthy_samples_find_nothing() {
    assert!(judge_one(|_| {}).is_empty());
}

#[test]
fn uncorrected_volatile_ecc_is_unhealthy() {
    let f = judge_one(|s| s.ecc_uncorrected_volatile = Some(2));
    assert_eq!(only(&f), ("ecc_uncorrected", Condition::Unhealthy, Some(3)));
    assert!(
        f[0].message.contains("2 uncorrected ECC"),
        "{}",
        f[0].message
    );
    assert!(
        f[0].message.contains("GPU 3 (GPU-00000003"),
        "{}",
        f[0].message
    );
}

#[test]
fn corrected_ecc_alone_is_fine() {
    assert!(judge_one(|s| s.ecc_corrected_volatile = Some(1000)).is_empty());
}

#[test]
fn retired_pages_pending_is_unhealthy() {
    let f = judge_one(|s| s.retired_pages_pending = Some(true));
    assert_eq!(
        only(&f),
        ("retired_pages_pending", Condition::Unhealthy, Some(3))
    );
}

#[test]
fn remap_failure_is_unhealthy() {
    let f = judge_one(|s| s.remapped_rows_failure = Some(true));
    assert_eq!(only(&f), ("remap_failure", Condition::Unhealthy, Some(3)));
}

#[test]
fn remap_pending_is_degraded() {
    let f = judge_one(|s| s.remapped_rows_pending = Some(true));
    assert_eq!(only(&f), ("remap_pending", Condition::Degraded, Some(3)));
}

#[test]
fn nvlink_down_is_unhealthy() {
    let f = judge_one(|s| s.nvlinks[7].active = false);
    assert_eq!(only(&f), ("nvlink_down", Condition::Unhealthy, Some(3)));
    assert!(f[0].message.contains("NVLink 7 down"), "{}", f[0].message);
}

#[test]
fn hot_gpu_is_degraded() {
    let f = judge_one(|s| s.temperature_c = Some(95.0));
    assert_eq!(only(&f), ("temperature", Condition::Degraded, Some(3)));
    assert!(judge_one(|s| s.temperature_c = Some(89.9)).is_empty());
}

#[test]
fn throttling_is_degraded() {
    assert_eq!(
        only(&judge_one(|s| s.throttle_hw_slowdown = Some(true))).0,
        "hw_slowdown"
    );
    assert_eq!(
        only(&judge_one(|s| s.throttle_thermal = Some(true))).0,
        "thermal_throttle"
    );
    assert_eq!(
        only(&judge_one(|s| s.throttle_power_brake = Some(true))).0,
        "power_brake"
    );
}

#[test]
fn narrow_pcie_link_is_degraded_but_a_slower_gen_only_when_configured() {
    let f = judge_one(|s| s.pcie_link_width_current = Some(8));
    assert_eq!(only(&f), ("pcie_width", Condition::Degraded, Some(3)));
    assert!(
        judge_one(|s| s.pcie_link_gen_current = Some(1)).is_empty(),
        "idle GPUs drop their gen"
    );
    let cfg = HealthConfig {
        pcie_gen_below_max: true,
        ..HealthConfig::default()
    };
    let mut samples: Vec<_> = (0..8).map(healthy).collect();
    samples[2].pcie_link_gen_current = Some(3);
    assert_eq!(only(&judge_samples(&gpus(8), &samples, &cfg)).0, "pcie_gen");
}

#[test]
fn a_gpu_missing_from_the_samples_is_unhealthy() {
    let samples: Vec<_> = (0..8).filter(|i| *i != 5).map(healthy).collect();
    let f = judge_samples(&gpus(8), &samples, &HealthConfig::default());
    assert_eq!(only(&f), ("gpu_missing", Condition::Unhealthy, Some(5)));
    assert!(f[0].message.contains("7 of 8"), "{}", f[0].message);
}

#[test]
fn no_samples_at_all_is_no_evidence() {
    assert!(judge_samples(&gpus(8), &[], &HealthConfig::default()).is_empty());
}

#[test]
fn unsupported_fields_are_never_read_as_faults() {
    let bare: Vec<_> = (0..8)
        .map(|i| v1::GpuSample {
            index: i,
            ..Default::default()
        })
        .collect();
    assert!(judge_samples(&gpus(8), &bare, &HealthConfig::default()).is_empty());
    // NVLink not supported: an empty or inactive list proves nothing.
    assert!(
        judge_one(|s| {
            s.nvlink_supported = Some(false);
            s.nvlinks[0].active = false;
        })
        .is_empty()
    );
}

#[test]
fn fatal_xid_makes_the_gpu_unhealthy_until_cleared() {
    let cfg = HealthConfig::default();
    let mut h = NodeHealth::default();
    assert_eq!(h.on_xid(3, "GPU-abc", 79, 900, 1000, &cfg), XidClass::Fatal);
    assert_eq!(h.condition(), Condition::Unhealthy);
    let f = h.first_unhealthy().expect("finding");
    assert_eq!(
        f.message,
        "XID 79 (GPU has fallen off the bus) on GPU 3 (GPU-abc)"
    );
    assert_eq!((f.rule, f.observed_at_ms), ("xid", 900));
    h.expire(1000 + 48 * 3600 * 1000, &cfg);
    assert_eq!(
        h.condition(),
        Condition::Unhealthy,
        "fatal findings do not age out"
    );
    assert_eq!(h.gpu_condition(3).0, Condition::Unhealthy);
    assert_eq!(h.gpu_condition(2).0, Condition::Healthy);
    for gpu in 0..8 {
        assert_eq!(h.gpu_worst(gpu), h.gpu_condition(gpu).0, "GPU {gpu}");
    }
    h.clear_events();
    assert_eq!(h.gpu_worst(3), Condition::Healthy);
    assert_eq!(h.condition(), Condition::Healthy);
}

#[test]
fn every_named_fatal_xid_cordons() {
    for code in [
        48, 61, 62, 64, 74, 79, 95, 109, 119, 120, 140, 143, 144, 145, 146, 147, 148, 149, 150,
    ] {
        let mut h = NodeHealth::default();
        h.on_xid(0, "u", code, 0, 0, &HealthConfig::default());
        assert_eq!(h.condition(), Condition::Unhealthy, "XID {code}");
    }
}

#[test]
fn application_xids_blame_the_job_until_the_gpu_repeats_them() {
    let cfg = HealthConfig::default();
    for code in [13, 31, 43, 45, 68] {
        let mut h = NodeHealth::default();
        assert_eq!(h.on_xid(1, "u", code, 0, 0, &cfg), XidClass::Application);
        assert_eq!(h.condition(), Condition::Healthy, "XID {code} once");
    }
    let mut h = NodeHealth::default();
    h.on_xid(1, "u", 13, 0, 0, &cfg);
    h.on_xid(2, "u", 13, 0, 1, &cfg);
    h.on_xid(1, "u", 13, 0, 2, &cfg);
    assert_eq!(
        h.condition(),
        Condition::Healthy,
        "two on GPU 1, one on GPU 2"
    );
    h.on_xid(1, "u", 13, 0, 3, &cfg);
    assert_eq!(h.condition(), Condition::Unhealthy, "third on GPU 1");
    assert_eq!(h.first_unhealthy().map(|f| f.rule), Some("xid_recurrence"));
}

#[test]
fn warning_xids_degrade_then_cordon_on_recurrence() {
    let cfg = HealthConfig::default();
    for code in [63, 92, 94] {
        let mut h = NodeHealth::default();
        assert_eq!(h.on_xid(2, "u", code, 0, 0, &cfg), XidClass::Degrade);
        assert_eq!(h.condition(), Condition::Degraded, "XID {code} once");
        assert!(h.reasons()[0].contains("reset at next job boundary"));
        h.on_xid(2, "u", code, 0, 10, &cfg);
        assert_eq!(h.condition(), Condition::Unhealthy, "XID {code} twice");
    }
}

#[test]
fn recurrence_only_counts_within_the_window() {
    let cfg = HealthConfig {
        recurrence_window: Duration::from_secs(60),
        ..HealthConfig::default()
    };
    let mut h = NodeHealth::default();
    h.on_xid(2, "u", 92, 0, 0, &cfg);
    h.expire(61_000, &cfg);
    assert_eq!(h.condition(), Condition::Healthy, "the warning aged out");
    h.on_xid(2, "u", 92, 0, 61_000, &cfg);
    assert_eq!(
        h.condition(),
        Condition::Degraded,
        "first within the new window"
    );
}

#[test]
fn unknown_xids_degrade() {
    let mut h = NodeHealth::default();
    assert_eq!(
        h.on_xid(0, "u", 4000, 0, 0, &HealthConfig::default()),
        XidClass::Degrade
    );
    assert_eq!(h.condition(), Condition::Degraded);
    assert!(
        h.reasons()[0].contains("not in NVIDIA's catalog"),
        "{:?}",
        h.reasons()
    );
}

#[test]
fn ignored_xids_change_nothing() {
    let mut h = NodeHealth::default();
    // 43 is named as an application XID; 161 is IGNORE in the catalog.
    assert_eq!(
        h.on_xid(0, "u", 161, 0, 0, &HealthConfig::default()),
        XidClass::Ignore
    );
    assert_eq!(h.condition(), Condition::Healthy);
}

#[test]
fn a_lost_gpu_is_unhealthy_once() {
    let mut h = NodeHealth::default();
    h.on_gpu_lost(5, "GPU-x", 10);
    h.on_gpu_lost(5, "GPU-x", 20);
    assert_eq!(h.event_findings.len(), 1);
    assert_eq!(h.first_unhealthy().map(|f| f.rule), Some("gpu_lost"));
}

#[test]
fn reasons_list_the_worst_first() {
    let cfg = HealthConfig::default();
    let mut h = NodeHealth {
        sample_findings: judge_one(|s| s.temperature_c = Some(99.0)),
        ..NodeHealth::default()
    };
    h.on_xid(3, "u", 79, 0, 0, &cfg);
    let r = h.reasons();
    assert!(r[0].starts_with("XID 79"), "{r:?}");
    assert!(r[1].contains("99 °C"), "{r:?}");
}
