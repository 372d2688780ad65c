use vigil_proto::v1::{self, GpuSample, NvLinkStatus};

use super::*;
use crate::step::Input;
use crate::test_utils::{heartbeat, patient_state, reg_with_gpus, step_ok, t};

const MIN: u64 = 60_000;

fn sample(index: u32, links: &[bool]) -> GpuSample {
    GpuSample {
        index,
        nvlink_supported: Some(true),
        nvlinks: links
            .iter()
            .zip(0..)
            .map(|(&active, link)| NvLinkStatus {
                link,
                active,
                crc_errors: Some(0),
                replay_errors: Some(0),
                recovery_errors: Some(0),
            })
            .collect(),
        pcie_replay_counter: Some(0),
        observed_at_unix_ms: 5,
        ..Default::default()
    }
}

fn with_replays(mut s: GpuSample, n: u64) -> GpuSample {
    s.pcie_replay_counter = Some(n);
    s
}

fn with_nvlink_errors(mut s: GpuSample, crc: u64, replay: u64, recovery: u64) -> GpuSample {
    s.nvlinks[0].crc_errors = Some(crc);
    s.nvlinks[0].replay_errors = Some(replay);
    s.nvlinks[0].recovery_errors = Some(recovery);
    s
}

fn judged(
    c: &mut GpuCounters,
    samples: &[GpuSample],
    now_ms: u64,
) -> Vec<(Condition, &'static str, String)> {
    c.judge(samples, now_ms, &RateConfig::default());
    c.findings
        .iter()
        .map(|f| (f.condition, f.rule, f.message.clone()))
        .collect()
}

#[test]
fn pcie_replays_rising_past_the_threshold_within_the_window_degrade() {
    let mut c = GpuCounters::default();
    assert_eq!(judged(&mut c, &[sample(0, &[])], 0), []);
    assert_eq!(judged(&mut c, &[with_replays(sample(0, &[]), 99)], MIN), []);
    let found = judged(&mut c, &[with_replays(sample(0, &[]), 100)], 2 * MIN);
    assert_eq!(
        found,
        [(
            Condition::Degraded,
            "pcie_replay_rate",
            "100 PCIe replays on GPU 0 within 10m".to_owned()
        )]
    );
    assert_eq!(c.findings[0].gpu, Some(0));
    // Ten minutes after the replays, they no longer count.
    assert_eq!(
        judged(&mut c, &[with_replays(sample(0, &[]), 100)], 13 * MIN),
        []
    );
}

#[test]
fn a_high_replay_count_from_before_the_first_sample_is_only_a_baseline() {
    let mut c = GpuCounters::default();
    assert_eq!(
        judged(&mut c, &[with_replays(sample(0, &[]), 1_000_000)], 0),
        []
    );
    assert_eq!(
        judged(&mut c, &[with_replays(sample(0, &[]), 1_000_001)], MIN),
        []
    );
}

#[test]
fn nvlink_errors_of_every_kind_add_up_per_gpu() {
    let mut c = GpuCounters::default();
    judged(&mut c, &[sample(2, &[true, true])], 0);
    let found = judged(
        &mut c,
        &[with_nvlink_errors(sample(2, &[true, true]), 50, 30, 20)],
        MIN,
    );
    assert_eq!(
        found,
        [(
            Condition::Degraded,
            "nvlink_error_rate",
            "100 NVLink CRC/replay/recovery errors on GPU 2 within 10m".to_owned()
        )]
    );
}

#[test]
fn unhealthy_thresholds_cordon_where_they_are_set() {
    let cfg = RateConfig {
        pcie_replays_unhealthy: 1000,
        ..RateConfig::default()
    };
    let mut c = GpuCounters::default();
    c.judge(&[sample(0, &[])], 0, &cfg);
    c.judge(&[with_replays(sample(0, &[]), 1000)], MIN, &cfg);
    assert_eq!(c.findings[0].condition, Condition::Unhealthy);
    let off = RateConfig {
        pcie_replays_degraded: 0,
        nvlink_errors_degraded: 0,
        ..RateConfig::default()
    };
    let mut c = GpuCounters::default();
    c.judge(&[sample(0, &[])], 0, &off);
    c.judge(&[with_replays(sample(0, &[]), 1000)], MIN, &off);
    assert_eq!(c.findings, []);
}

#[test]
fn counters_a_gpu_does_not_report_are_not_judged() {
    let mut c = GpuCounters::default();
    let mut bare = sample(0, &[]);
    bare.pcie_replay_counter = None;
    assert_eq!(judged(&mut c, &[bare.clone()], 0), []);
    assert_eq!(judged(&mut c, &[bare], MIN), []);
    assert!(c.windows.is_empty());
}

#[test]
fn forgetting_makes_the_latest_value_the_baseline() {
    let mut c = GpuCounters::default();
    judged(&mut c, &[sample(0, &[])], 0);
    assert_eq!(
        judged(&mut c, &[with_replays(sample(0, &[]), 500)], MIN).len(),
        1
    );
    c.forget();
    assert_eq!(
        judged(&mut c, &[with_replays(sample(0, &[]), 500)], 2 * MIN),
        []
    );
}

#[test]
fn links_inactive_in_the_first_sample_are_left_out_and_the_rest_kept() {
    let mut c = GpuCounters::default();
    let first = [sample(0, &[true, false, true])];
    // The baseline sample itself: link 1 is unused from the start.
    let used = c.used_links(&first);
    assert_eq!(used[0].nvlinks.len(), 2);
    assert_eq!(
        c.nvlink_baseline.as_ref().map(|b| b[&0].clone()),
        Some(vec![0, 2])
    );
    // Link 2 goes down later: it was in use, so it is judged.
    let later = [sample(0, &[true, false, false])];
    let used = c.used_links(&later);
    let links: Vec<(u32, bool)> = used[0].nvlinks.iter().map(|l| (l.link, l.active)).collect();
    assert_eq!(links, [(0, true), (2, false)]);
    // Nothing to leave out: the samples are borrowed, not copied.
    let all_used = [sample(0, &[true, true, true])];
    let mut c = GpuCounters::default();
    assert!(matches!(c.used_links(&all_used), Cow::Borrowed(_)));
}

#[test]
fn an_unused_nvlink_does_not_cordon_a_node_but_a_used_one_going_down_does() {
    let mut s = patient_state();
    step_ok(&mut s, Input::Register(reg_with_gpus("n1", 1, 1)), t(0));
    let beat = |links: &[bool]| v1::Heartbeat {
        gpus: vec![sample(0, links)],
        ..v1::Heartbeat::default()
    };
    heartbeat(&mut s, "n1", beat(&[true, false]), t(1));
    heartbeat(&mut s, "n1", beat(&[true, false]), t(2));
    assert!(!s.nodes["n1"].cordoned(), "link 1 was never in use");
    heartbeat(&mut s, "n1", beat(&[false, false]), t(3));
    let cordon = s.nodes["n1"].record.cordon.clone().expect("cordoned");
    assert!(
        cordon.reason.starts_with("NVLink 0 down on GPU 0"),
        "{}",
        cordon.reason
    );
}

#[test]
fn the_config_refuses_unhealthy_below_degraded_and_an_empty_window() {
    let cfg = RateConfig {
        nvlink_errors_unhealthy: 10,
        ..RateConfig::default()
    };
    let err = cfg.validate().expect_err("10 < 100");
    assert!(
        err.contains("health.rates.nvlink_errors_unhealthy"),
        "{err}"
    );
    let cfg = RateConfig {
        window: std::time::Duration::ZERO,
        ..RateConfig::default()
    };
    assert!(
        cfg.validate()
            .expect_err("zero")
            .contains("health.rates.window")
    );
    assert_eq!(RateConfig::default().validate(), Ok(()));
}
