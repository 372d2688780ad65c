//! How to read a `GpuSample`: which of its fields show a fault, and when its NVLinks count.
//!
//! The coordinator's health policy (vigil-core `health::judge_samples`) and the agent's
//! built-in diagnostic (`agent/src/diagnostics.rs`) both start from [`sample_faults`]; the
//! agent's `vigil_gpu_nvlinks` gauge and clusterctl's NVLINK column from [`has_nvlinks`]. How
//! bad each fault is stays with the reader: the coordinator's policy grades them, the
//! diagnostic fails on the lasting ones and leaves throttling to the policy.

use crate::v1::{GpuSample, NvLinkStatus};

/// Whether a sample's NVLinks are to be read: it lists some, and does not say the GPU has
/// none. A sample that says `nvlink_supported = false` and lists links anyway contradicts
/// itself; its links are ignored rather than judged (or shown) as down.
pub fn has_nvlinks(nvlink_supported: Option<bool>, links_listed: usize) -> bool {
    nvlink_supported != Some(false) && links_listed > 0
}

/// The links of a GPU that has NVLink (see [`has_nvlinks`]); `None` without.
pub fn nvlinks(s: &GpuSample) -> Option<&[NvLinkStatus]> {
    has_nvlinks(s.nvlink_supported, s.nvlinks.len()).then_some(s.nvlinks.as_slice())
}

/// `(current, max)` when a PCIe link runs below what it can (width or generation); `None`
/// when it does not, or when either value is not reported.
pub fn below_max(current: Option<u32>, max: Option<u32>) -> Option<(u32, u32)> {
    match (current, max) {
        (Some(current), Some(max)) if current < max => Some((current, max)),
        _ => None,
    }
}

/// One thing a sample shows wrong, with its evidence. Ungraded: what it means for the node is
/// the reader's policy. Temperature is not here: its limit is the coordinator's setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleFault {
    /// Uncorrected ECC errors since the driver loaded (more than zero).
    UncorrectedEcc(u64),
    /// Pages await retirement at the next reboot (pre-Ampere).
    RetiredPagesPending,
    /// Row remapping failed (Ampere and later): the GPU needs replacing.
    RowRemapFailed,
    /// The links reported down, by link number; only for a GPU that has NVLink.
    NvLinksDown(Vec<u32>),
    /// A row remap waits for the next GPU reset.
    RowRemapPending,
    /// Clock event reasons active now.
    HwSlowdown,
    ThermalThrottle,
    PowerBrake,
    /// The PCIe link trained narrower than it can.
    PcieWidthBelowMax {
        current: u32,
        max: u32,
    },
    /// The PCIe link runs a lower generation than it can; normal while a GPU idles.
    PcieGenBelowMax {
        current: u32,
        max: u32,
    },
}

/// Every fault `s` shows, in this order: the lasting hardware faults (ECC, retired pages,
/// remap failure, NVLinks down, remap pending), throttling, then the PCIe link.
pub fn sample_faults(s: &GpuSample) -> Vec<SampleFault> {
    let mut out = Vec::new();
    if let Some(n) = s.ecc_uncorrected_volatile.filter(|n| *n > 0) {
        out.push(SampleFault::UncorrectedEcc(n));
    }
    if s.retired_pages_pending == Some(true) {
        out.push(SampleFault::RetiredPagesPending);
    }
    if s.remapped_rows_failure == Some(true) {
        out.push(SampleFault::RowRemapFailed);
    }
    let down: Vec<u32> = nvlinks(s)
        .unwrap_or_default()
        .iter()
        .filter(|l| !l.active)
        .map(|l| l.link)
        .collect();
    if !down.is_empty() {
        out.push(SampleFault::NvLinksDown(down));
    }
    if s.remapped_rows_pending == Some(true) {
        out.push(SampleFault::RowRemapPending);
    }
    if s.throttle_hw_slowdown == Some(true) {
        out.push(SampleFault::HwSlowdown);
    }
    if s.throttle_thermal == Some(true) {
        out.push(SampleFault::ThermalThrottle);
    }
    if s.throttle_power_brake == Some(true) {
        out.push(SampleFault::PowerBrake);
    }
    if let Some((current, max)) = below_max(s.pcie_link_width_current, s.pcie_link_width_max) {
        out.push(SampleFault::PcieWidthBelowMax { current, max });
    }
    if let Some((current, max)) = below_max(s.pcie_link_gen_current, s.pcie_link_gen_max) {
        out.push(SampleFault::PcieGenBelowMax { current, max });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(active: &[bool]) -> Vec<NvLinkStatus> {
        active
            .iter()
            .zip(0..)
            .map(|(&active, link)| NvLinkStatus {
                link,
                active,
                ..Default::default()
            })
            .collect()
    }

    /// A healthy H100-like sample: every field reported, nothing wrong.
    fn healthy() -> GpuSample {
        GpuSample {
            ecc_uncorrected_volatile: Some(0),
            retired_pages_pending: Some(false),
            remapped_rows_failure: Some(false),
            remapped_rows_pending: Some(false),
            throttle_hw_slowdown: Some(false),
            throttle_thermal: Some(false),
            throttle_power_brake: Some(false),
            pcie_link_width_current: Some(16),
            pcie_link_width_max: Some(16),
            pcie_link_gen_current: Some(5),
            pcie_link_gen_max: Some(5),
            nvlinks: links(&[true; 18]),
            nvlink_supported: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_sample_shows_no_fault() {
        assert_eq!(sample_faults(&healthy()), []);
    }

    #[test]
    fn an_unreported_field_is_never_a_fault() {
        assert_eq!(sample_faults(&GpuSample::default()), []);
    }

    #[test]
    fn nvlinks_count_when_listed_unless_the_gpu_says_it_has_none() {
        assert!(has_nvlinks(Some(true), 18));
        assert!(
            has_nvlinks(None, 18),
            "an older agent leaves the flag unset"
        );
        assert!(!has_nvlinks(Some(false), 18), "a contradiction is ignored");
        assert!(!has_nvlinks(None, 0));
        assert!(
            !has_nvlinks(Some(true), 0),
            "nothing listed, nothing to read"
        );
    }

    #[test]
    fn links_down_are_a_fault_by_link_number() {
        let mut s = healthy();
        s.nvlinks[4].active = false;
        s.nvlinks[17].active = false;
        assert_eq!(sample_faults(&s), [SampleFault::NvLinksDown(vec![4, 17])]);
    }

    #[test]
    fn links_of_a_gpu_that_says_it_has_no_nvlink_are_not_judged() {
        let s = GpuSample {
            nvlinks: links(&[false, false]),
            nvlink_supported: Some(false),
            ..Default::default()
        };
        assert_eq!(nvlinks(&s), None);
        assert_eq!(sample_faults(&s), []);
    }

    #[test]
    fn links_from_an_agent_that_does_not_say_count() {
        let s = GpuSample {
            nvlinks: links(&[true, false]),
            ..Default::default()
        };
        assert_eq!(nvlinks(&s).map(<[_]>::len), Some(2));
        assert_eq!(sample_faults(&s), [SampleFault::NvLinksDown(vec![1])]);
    }

    #[test]
    fn only_uncorrected_ecc_errors_above_zero_are_a_fault() {
        let mut s = healthy();
        s.ecc_corrected_volatile = Some(1000);
        assert_eq!(sample_faults(&s), []);
        s.ecc_uncorrected_volatile = Some(3);
        assert_eq!(sample_faults(&s), [SampleFault::UncorrectedEcc(3)]);
    }

    #[test]
    fn a_pcie_link_below_its_max_is_a_fault_only_when_both_are_reported() {
        assert_eq!(below_max(Some(8), Some(16)), Some((8, 16)));
        assert_eq!(below_max(Some(16), Some(16)), None);
        assert_eq!(below_max(None, Some(16)), None);
        assert_eq!(below_max(Some(8), None), None);
        let mut s = healthy();
        s.pcie_link_width_current = Some(8);
        s.pcie_link_gen_current = Some(3);
        assert_eq!(
            sample_faults(&s),
            [
                SampleFault::PcieWidthBelowMax {
                    current: 8,
                    max: 16
                },
                SampleFault::PcieGenBelowMax { current: 3, max: 5 },
            ]
        );
    }

    #[test]
    fn faults_come_lasting_first_then_throttling_then_pcie() {
        let s = GpuSample {
            ecc_uncorrected_volatile: Some(1),
            retired_pages_pending: Some(true),
            remapped_rows_failure: Some(true),
            remapped_rows_pending: Some(true),
            throttle_hw_slowdown: Some(true),
            throttle_thermal: Some(true),
            throttle_power_brake: Some(true),
            pcie_link_width_current: Some(4),
            pcie_link_width_max: Some(16),
            pcie_link_gen_current: Some(1),
            pcie_link_gen_max: Some(5),
            nvlinks: links(&[false]),
            ..Default::default()
        };
        assert_eq!(
            sample_faults(&s),
            [
                SampleFault::UncorrectedEcc(1),
                SampleFault::RetiredPagesPending,
                SampleFault::RowRemapFailed,
                SampleFault::NvLinksDown(vec![0]),
                SampleFault::RowRemapPending,
                SampleFault::HwSlowdown,
                SampleFault::ThermalThrottle,
                SampleFault::PowerBrake,
                SampleFault::PcieWidthBelowMax {
                    current: 4,
                    max: 16
                },
                SampleFault::PcieGenBelowMax { current: 1, max: 5 },
            ]
        );
    }
}
