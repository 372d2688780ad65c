//! One simulated H100's health sample: idle readings that drift, with the injected faults on top.

use vigil_proto::v1::NvLinkStatus;

use super::GpuSample;
use super::faults::{GpuFaults, MAX_NVLINKS};

const IDLE_TEMP_C: (f32, f32) = (30.0, 45.0);
/// HBM runs a little warmer than the GPU die at idle.
const IDLE_MEMORY_TEMP_C: (f32, f32) = (35.0, 50.0);
const IDLE_POWER_W: (f32, f32) = (70.0, 90.0);
/// The driver's own reservation shows as a few MiB used on an idle GPU.
const IDLE_MEMORY_USED_BYTES: u64 = 4 * 1024 * 1024;
/// H100 SXM5: PCIe Gen 5 x16.
const PCIE_GEN: u32 = 5;
const PCIE_WIDTH: u32 = 16;

/// Readings that wander between samples, as real idle GPUs' do.
#[derive(Clone, Copy)]
pub struct Reading {
    temperature_c: f32,
    memory_temperature_c: f32,
    power_w: f32,
}

impl Reading {
    pub fn idle(rng: &mut fastrand::Rng) -> Self {
        Self {
            temperature_c: between(rng, IDLE_TEMP_C),
            memory_temperature_c: between(rng, IDLE_MEMORY_TEMP_C),
            power_w: between(rng, IDLE_POWER_W),
        }
    }

    pub fn drift(&mut self, rng: &mut fastrand::Rng) {
        self.temperature_c = drift(rng, self.temperature_c, 0.5, IDLE_TEMP_C);
        self.memory_temperature_c = drift(rng, self.memory_temperature_c, 0.5, IDLE_MEMORY_TEMP_C);
        self.power_w = drift(rng, self.power_w, 1.5, IDLE_POWER_W);
    }
}

/// What NVML would report for an idle H100 with faults `f`.
///
/// H100s remap rows instead of retiring pages, so retired-page fields are
/// absent ("not supported") unless a fault says a retirement is pending.
pub fn sim_sample(index: u32, r: &Reading, f: &GpuFaults, observed_at_unix_ms: u64) -> GpuSample {
    let ecc_uncorrected = f.ecc_uncorrected.unwrap_or(0);
    let ecc_corrected = f.ecc_corrected.unwrap_or(0);
    GpuSample {
        index,
        temperature_c: Some(f.temp.unwrap_or(round1(r.temperature_c))),
        power_w: Some(f.power.unwrap_or(round1(r.power_w))),
        utilization_pct: Some(0),
        memory_used_bytes: Some(IDLE_MEMORY_USED_BYTES),
        ecc_uncorrected_volatile: Some(ecc_uncorrected),
        ecc_corrected_volatile: Some(ecc_corrected),
        memory_temperature_c: Some(round1(r.memory_temperature_c)),
        ecc_uncorrected_aggregate: Some(ecc_uncorrected),
        ecc_corrected_aggregate: Some(ecc_corrected),
        retired_pages_single_bit: None,
        retired_pages_double_bit: None,
        retired_pages_pending: f.retired_pending.then_some(true),
        remapped_rows_correctable: Some(0),
        remapped_rows_uncorrectable: Some(f.remap_uncorrectable.unwrap_or(0)),
        remapped_rows_pending: Some(f.remap_pending),
        remapped_rows_failure: Some(f.remap_failure),
        throttle_hw_slowdown: Some(f.hw_slowdown),
        throttle_thermal: Some(f.thermal_throttle),
        throttle_power_brake: Some(f.power_brake),
        pcie_link_gen_current: Some(f.pcie_gen.unwrap_or(PCIE_GEN)),
        pcie_link_gen_max: Some(PCIE_GEN),
        pcie_link_width_current: Some(f.pcie_width.unwrap_or(PCIE_WIDTH)),
        pcie_link_width_max: Some(PCIE_WIDTH),
        pcie_replay_counter: Some(f.pcie_replay.unwrap_or(0)),
        nvlinks: (0..MAX_NVLINKS)
            .map(|link| NvLinkStatus {
                link,
                active: !f.nvlink_down.contains(&link),
                crc_errors: Some(0),
                replay_errors: Some(0),
                recovery_errors: Some(0),
            })
            .collect(),
        persistence_mode: Some(true),
        observed_at_unix_ms,
        nvlink_supported: Some(true),
    }
}

fn between(rng: &mut fastrand::Rng, (lo, hi): (f32, f32)) -> f32 {
    lo + rng.f32() * (hi - lo)
}

fn drift(rng: &mut fastrand::Rng, value: f32, step: f32, (lo, hi): (f32, f32)) -> f32 {
    (value + (rng.f32() * 2.0 - 1.0) * step).clamp(lo, hi)
}

fn round1(v: f32) -> f32 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use vigil_proto::v1::AgentEvent;
    use vigil_proto::v1::agent_event::Kind;

    use super::super::{GpuError, GpuProbe, SimProbe};
    use super::*;

    fn gpu(probe: &SimProbe, index: u32) -> Result<GpuSample, GpuError> {
        probe
            .sample()?
            .into_iter()
            .find(|s| s.index == index)
            .ok_or_else(|| panic!("GPU {index} has no sample"))
    }

    fn xids(events: &[AgentEvent]) -> Vec<(u32, u32)> {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Xid(x)) => Some((x.gpu_index, x.xid)),
                _ => None,
            })
            .collect()
    }

    fn lost(events: &[AgentEvent]) -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::GpuLost(l)) => Some(l.gpu_index),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_healthy_sample_has_every_field_an_h100_supports() -> Result<(), GpuError> {
        let s = gpu(&SimProbe::new("n", 2), 1)?;
        assert!(s.observed_at_unix_ms > 0);
        assert!(s.memory_temperature_c.is_some());
        assert_eq!(s.ecc_uncorrected_aggregate, Some(0));
        assert_eq!(s.retired_pages_single_bit, None, "H100 remaps rows instead");
        assert_eq!(s.retired_pages_pending, None);
        assert_eq!(s.remapped_rows_correctable, Some(0));
        assert_eq!(s.remapped_rows_failure, Some(false));
        assert_eq!(s.throttle_thermal, Some(false));
        assert_eq!(
            (s.pcie_link_gen_current, s.pcie_link_gen_max),
            (Some(5), Some(5))
        );
        assert_eq!(
            (s.pcie_link_width_current, s.pcie_link_width_max),
            (Some(16), Some(16))
        );
        assert_eq!(s.pcie_replay_counter, Some(0));
        assert_eq!(s.nvlinks.len(), 18);
        assert!(
            s.nvlinks
                .iter()
                .all(|l| l.active && l.crc_errors == Some(0))
        );
        assert_eq!(s.nvlink_supported, Some(true));
        assert_eq!(s.persistence_mode, Some(true));
        Ok(())
    }

    #[test]
    fn every_fault_key_shows_in_the_sample() -> Result<(), GpuError> {
        let probe = SimProbe::new("n", 8);
        probe.apply_fault_text(
            "gpu=0 ecc_uncorrected=2 ecc_corrected=7 temp=97 power=700\n\
             gpu=1 retired_pending remap_pending remap_failure remap_uncorrectable=3\n\
             gpu=2 hw_slowdown thermal_throttle power_brake\n\
             gpu=3 pcie_width=8 pcie_gen=3 pcie_replay=42 nvlink_down=4 nvlink_down=17\n",
        );
        let s = gpu(&probe, 0)?;
        assert_eq!(s.ecc_uncorrected_volatile, Some(2));
        assert_eq!(s.ecc_uncorrected_aggregate, Some(2));
        assert_eq!(s.ecc_corrected_volatile, Some(7));
        assert_eq!(s.ecc_corrected_aggregate, Some(7));
        assert_eq!(s.temperature_c, Some(97.0));
        assert_eq!(s.power_w, Some(700.0));
        let s = gpu(&probe, 1)?;
        assert_eq!(s.retired_pages_pending, Some(true));
        assert_eq!(s.remapped_rows_pending, Some(true));
        assert_eq!(s.remapped_rows_failure, Some(true));
        assert_eq!(s.remapped_rows_uncorrectable, Some(3));
        let s = gpu(&probe, 2)?;
        assert_eq!(s.throttle_hw_slowdown, Some(true));
        assert_eq!(s.throttle_thermal, Some(true));
        assert_eq!(s.throttle_power_brake, Some(true));
        let s = gpu(&probe, 3)?;
        assert_eq!(s.pcie_link_width_current, Some(8));
        assert_eq!(s.pcie_link_width_max, Some(16));
        assert_eq!(s.pcie_link_gen_current, Some(3));
        assert_eq!(s.pcie_replay_counter, Some(42));
        let down: Vec<u32> = s
            .nvlinks
            .iter()
            .filter(|l| !l.active)
            .map(|l| l.link)
            .collect();
        assert_eq!(down, [4, 17]);
        let s = gpu(&probe, 4)?;
        assert_eq!(
            s.ecc_uncorrected_volatile,
            Some(0),
            "other GPUs stay healthy"
        );
        Ok(())
    }

    #[test]
    fn lost_gpu_leaves_inventory_and_samples_once_and_clear_brings_it_back() -> Result<(), GpuError>
    {
        let probe = SimProbe::new("n", 8);
        let events = probe.apply_fault_text("gpu=5 lost\n");
        assert_eq!(lost(&events), [5]);
        assert_eq!(probe.sample()?.len(), 7);
        assert!(probe.inventory()?.iter().all(|g| g.index != 5));
        let again = probe.apply_fault_text("gpu=5 lost\ngpu=1 temp=80\n");
        assert!(lost(&again).is_empty(), "a GPU is lost once");
        probe.apply_fault_text("gpu=5 lost\ngpu=5 clear\n");
        assert_eq!(probe.sample()?.len(), 8);
        assert_eq!(lost(&probe.apply_fault_text("gpu=5 lost\n")), [5]);
        Ok(())
    }

    #[test]
    fn xid_lines_fire_once_and_removing_a_fault_line_heals() -> Result<(), GpuError> {
        let probe = SimProbe::new("n", 8);
        let events = probe.apply_fault_text("gpu=3 xid=79\ngpu=2 remap_failure\n");
        assert_eq!(xids(&events), [(3, 79)]);
        let Some(Kind::Xid(x)) = &events[0].kind else {
            panic!("not an XID");
        };
        assert_eq!(x.gpu_uuid, probe.inventory()?[3].uuid);
        assert!(xids(&probe.apply_fault_text("gpu=3 xid=79\n")).is_empty());
        assert_eq!(gpu(&probe, 2)?.remapped_rows_failure, Some(false));
        assert_eq!(
            xids(&probe.apply_fault_text("gpu=3 xid=79\ngpu=3 xid=79\n")),
            [(3, 79)]
        );
        Ok(())
    }

    /// The demo: XID 79 injected, and the GPU must not pass for healthy while the line
    /// stays; `gpu=3 ok` repairs it without firing anything.
    #[test]
    fn a_fatal_xid_lasts_until_the_fault_file_clears_it() -> Result<(), GpuError> {
        let probe = SimProbe::new("n", 8);
        assert!(probe.lasting_problems().is_empty());
        assert_eq!(xids(&probe.apply_fault_text("gpu=3 xid=79\n")), [(3, 79)]);
        for _ in 0..3 {
            let problems = probe.lasting_problems();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].0, 3);
            assert!(problems[0].1.contains("XID 79"), "{problems:?}");
            assert!(probe.apply_fault_text("gpu=3 xid=79\n").is_empty());
        }
        assert!(
            probe
                .apply_fault_text("gpu=3 xid=79\ngpu=3 ok\n")
                .is_empty(),
            "a repair fires no event"
        );
        assert!(probe.lasting_problems().is_empty());
        assert_eq!(
            xids(&probe.apply_fault_text("gpu=3 xid=79\ngpu=3 ok\ngpu=3 xid=79\n")),
            [(3, 79)],
            "it can break again"
        );
        assert_eq!(probe.lasting_problems().len(), 1);
        probe.apply_fault_text("gpu=3 xid=79\ngpu=3 ok\ngpu=3 xid=79\ngpu=3 lost\n");
        assert!(
            probe.lasting_problems().is_empty(),
            "a lost GPU is reported as missing instead"
        );
        Ok(())
    }

    #[test]
    fn malformed_lines_are_skipped() -> Result<(), GpuError> {
        let probe = SimProbe::new("n", 2);
        probe.apply_fault_text("gpu=1 melt\ngpu=7 lost\ngpu=0 temp=91\n");
        assert_eq!(probe.sample()?.len(), 2);
        assert_eq!(gpu(&probe, 0)?.temperature_c, Some(91.0));
        Ok(())
    }
}
