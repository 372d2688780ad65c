//! The simulated hardware of one load-generator agent: 8 SIMULATED H100s whose UUIDs and
//! serials are its own (the lemon ledger charges serials, so shared ones would make every
//! node a repeat offender), and the health sample a busy, healthy board reports.

use vigil_proto::v1::{GpuInfo, GpuSample, NvLinkStatus};

pub const GPUS: u32 = 8;
const NVLINKS: u32 = 18;

/// Stable per (node, index): FNV-1a of the name and index.
fn gpu_hash(node: &str, index: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain(index.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The GPU's UUID, formatted as NVIDIA's, unique per (node, index).
pub fn gpu_uuid(node: &str, index: u32) -> String {
    let h = gpu_hash(node, index);
    let lo = h.rotate_left(17) ^ 0x5bd1_e995;
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

pub fn inventory(node: &str, index: u64) -> Vec<GpuInfo> {
    (0..GPUS)
        .map(|i| GpuInfo {
            index: i,
            uuid: gpu_uuid(node, i),
            name: "NVIDIA H100 80GB HBM3 (SIMULATED)".into(),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i * 0x10),
            memory_total_bytes: 80 * 1024 * 1024 * 1024,
            // Thirteen digits like a real board's, unique per (agent, GPU) for up to a million
            // agents: the lemon ledger charges serials, so shared ones would make every node a
            // repeat offender.
            serial: format!("165{:06}{:04}", index % 1_000_000, i),
        })
        .collect()
}

/// A busy, healthy H100: what a training node reports every heartbeat.
pub fn sample_template(seed: u64) -> Vec<GpuSample> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..GPUS)
        .map(|index| GpuSample {
            index,
            temperature_c: Some(55.0 + rng.f32() * 15.0),
            power_w: Some(550.0 + rng.f32() * 150.0),
            utilization_pct: Some(90 + rng.u32(0..10)),
            memory_used_bytes: Some(60 * 1024 * 1024 * 1024 + rng.u64(0..1 << 30)),
            ecc_uncorrected_volatile: Some(0),
            ecc_corrected_volatile: Some(0),
            memory_temperature_c: Some(60.0 + rng.f32() * 10.0),
            ecc_uncorrected_aggregate: Some(0),
            ecc_corrected_aggregate: Some(0),
            retired_pages_single_bit: None,
            retired_pages_double_bit: None,
            retired_pages_pending: None,
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
            nvlinks: (0..NVLINKS)
                .map(|link| NvLinkStatus {
                    link,
                    active: true,
                    crc_errors: Some(0),
                    replay_errors: Some(0),
                    recovery_errors: Some(0),
                })
                .collect(),
            persistence_mode: Some(true),
            observed_at_unix_ms: 0,
            nvlink_supported: Some(true),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_agents_gpus_have_their_own_serials_and_uuids() {
        let mut serials = std::collections::HashSet::new();
        let mut uuids = std::collections::HashSet::new();
        for index in 0..10_000u64 {
            let name = format!("load-{:05}", index + 1);
            for g in inventory(&name, index) {
                assert_eq!(g.serial.len(), 13, "{}", g.serial);
                assert!(serials.insert(g.serial), "serial repeats at agent {index}");
                assert!(uuids.insert(g.uuid), "uuid repeats at agent {index}");
            }
        }
    }
}
