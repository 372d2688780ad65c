//! The last health sample of one GPU, field for field as the agent reported it.

use serde::Serialize;
use vigil_proto::v1;

/// One health sample; `None` (JSON null) means "not supported by this GPU or driver", never zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuSample {
    pub index: u32,
    pub temperature_c: Option<f32>,
    pub power_w: Option<f32>,
    pub utilization_pct: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub ecc_uncorrected_volatile: Option<u64>,
    pub ecc_corrected_volatile: Option<u64>,
    pub memory_temperature_c: Option<f32>,
    pub ecc_uncorrected_aggregate: Option<u64>,
    pub ecc_corrected_aggregate: Option<u64>,
    pub retired_pages_single_bit: Option<u64>,
    pub retired_pages_double_bit: Option<u64>,
    pub retired_pages_pending: Option<bool>,
    pub remapped_rows_correctable: Option<u64>,
    pub remapped_rows_uncorrectable: Option<u64>,
    pub remapped_rows_pending: Option<bool>,
    pub remapped_rows_failure: Option<bool>,
    pub throttle_hw_slowdown: Option<bool>,
    pub throttle_thermal: Option<bool>,
    pub throttle_power_brake: Option<bool>,
    pub pcie_link_gen_current: Option<u32>,
    pub pcie_link_gen_max: Option<u32>,
    pub pcie_link_width_current: Option<u32>,
    pub pcie_link_width_max: Option<u32>,
    pub pcie_replay_counter: Option<u64>,
    /// One entry per NVLink; empty when the GPU has none or the driver cannot tell.
    pub nvlinks: Vec<NvLink>,
    pub nvlink_supported: Option<bool>,
    pub persistence_mode: Option<bool>,
    /// When the agent read the sample; null when the agent did not say (older agents).
    pub observed_at_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NvLink {
    pub link: u32,
    pub active: bool,
    pub crc_errors: Option<u64>,
    pub replay_errors: Option<u64>,
    pub recovery_errors: Option<u64>,
}

impl From<v1::GpuSample> for GpuSample {
    fn from(s: v1::GpuSample) -> Self {
        Self {
            index: s.index,
            temperature_c: s.temperature_c,
            power_w: s.power_w,
            utilization_pct: s.utilization_pct,
            memory_used_bytes: s.memory_used_bytes,
            ecc_uncorrected_volatile: s.ecc_uncorrected_volatile,
            ecc_corrected_volatile: s.ecc_corrected_volatile,
            memory_temperature_c: s.memory_temperature_c,
            ecc_uncorrected_aggregate: s.ecc_uncorrected_aggregate,
            ecc_corrected_aggregate: s.ecc_corrected_aggregate,
            retired_pages_single_bit: s.retired_pages_single_bit,
            retired_pages_double_bit: s.retired_pages_double_bit,
            retired_pages_pending: s.retired_pages_pending,
            remapped_rows_correctable: s.remapped_rows_correctable,
            remapped_rows_uncorrectable: s.remapped_rows_uncorrectable,
            remapped_rows_pending: s.remapped_rows_pending,
            remapped_rows_failure: s.remapped_rows_failure,
            throttle_hw_slowdown: s.throttle_hw_slowdown,
            throttle_thermal: s.throttle_thermal,
            throttle_power_brake: s.throttle_power_brake,
            pcie_link_gen_current: s.pcie_link_gen_current,
            pcie_link_gen_max: s.pcie_link_gen_max,
            pcie_link_width_current: s.pcie_link_width_current,
            pcie_link_width_max: s.pcie_link_width_max,
            pcie_replay_counter: s.pcie_replay_counter,
            nvlinks: s
                .nvlinks
                .into_iter()
                .map(|l| NvLink {
                    link: l.link,
                    active: l.active,
                    crc_errors: l.crc_errors,
                    replay_errors: l.replay_errors,
                    recovery_errors: l.recovery_errors,
                })
                .collect(),
            nvlink_supported: s.nvlink_supported,
            persistence_mode: s.persistence_mode,
            observed_at_unix_ms: (s.observed_at_unix_ms != 0).then_some(s.observed_at_unix_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_sample_field_is_in_the_json_and_unsupported_ones_are_null() {
        let sample = GpuSample::from(v1::GpuSample {
            index: 2,
            remapped_rows_correctable: Some(3),
            remapped_rows_pending: Some(true),
            throttle_thermal: Some(false),
            pcie_link_width_current: Some(8),
            nvlinks: vec![v1::NvLinkStatus {
                link: 0,
                active: true,
                crc_errors: Some(5),
                replay_errors: None,
                recovery_errors: Some(0),
            }],
            observed_at_unix_ms: 1_700_000_000_000,
            ..Default::default()
        });
        let value = serde_json::to_value(&sample).expect("serializes");
        let object = value.as_object().expect("an object");
        assert_eq!(object.len(), 29, "{value}");
        assert_eq!(value["remapped_rows_correctable"], json!(3));
        assert_eq!(value["remapped_rows_pending"], json!(true));
        assert_eq!(value["remapped_rows_failure"], json!(null));
        assert_eq!(value["throttle_thermal"], json!(false));
        assert_eq!(value["pcie_link_width_current"], json!(8));
        assert_eq!(value["pcie_link_width_max"], json!(null));
        assert_eq!(value["memory_temperature_c"], json!(null));
        assert_eq!(value["nvlink_supported"], json!(null));
        assert_eq!(
            value["nvlinks"],
            json!([{"link": 0, "active": true, "crc_errors": 5, "replay_errors": null, "recovery_errors": 0}])
        );
        assert_eq!(value["observed_at_unix_ms"], json!(1_700_000_000_000_u64));
        let unset =
            serde_json::to_value(GpuSample::from(v1::GpuSample::default())).expect("serializes");
        assert_eq!(unset["observed_at_unix_ms"], json!(null));
        assert_eq!(unset["nvlinks"], json!([]));
    }
}
