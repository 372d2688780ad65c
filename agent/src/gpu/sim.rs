//! Simulated H100s, so the whole system runs on hosts without GPUs.
//!
//! Identities are derived from the node name and index: stable across agent
//! restarts (the coordinator recognises the same GPU) and distinct across
//! nodes (no two simulated GPUs in a cluster share a UUID).

use std::sync::{Mutex, PoisonError};

use super::{GpuBackend, GpuError, GpuInfo, GpuProbe, GpuSample};

const NAME: &str = "NVIDIA H100 80GB HBM3 (simulated)";
const MEMORY_TOTAL_BYTES: u64 = 80 * 1024 * 1024 * 1024;
/// PCI buses of the eight GPUs of a DGX H100, so ids look familiar to operators.
const DGX_BUSES: [u8; 8] = [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb];
const IDLE_TEMP_C: (f32, f32) = (30.0, 45.0);
const IDLE_POWER_W: (f32, f32) = (70.0, 90.0);
/// The driver's own reservation shows as a few MiB used on an idle GPU.
const IDLE_MEMORY_USED_BYTES: u64 = 4 * 1024 * 1024;

pub struct SimProbe {
    inventory: Vec<GpuInfo>,
    /// Random walk of each GPU's readings; a mutex because samples drift from the previous one.
    state: Mutex<SimState>,
}

struct SimState {
    rng: fastrand::Rng,
    readings: Vec<Reading>,
}

#[derive(Clone, Copy)]
struct Reading {
    temperature_c: f32,
    power_w: f32,
}

impl SimProbe {
    pub fn new(node_name: &str, gpus: u32) -> Self {
        let inventory: Vec<GpuInfo> = (0..gpus).map(|i| sim_gpu(node_name, i)).collect();
        let mut rng = fastrand::Rng::with_seed(fnv1a(0, node_name.as_bytes()));
        let readings = inventory
            .iter()
            .map(|_| Reading {
                temperature_c: between(&mut rng, IDLE_TEMP_C),
                power_w: between(&mut rng, IDLE_POWER_W),
            })
            .collect();
        Self {
            inventory,
            state: Mutex::new(SimState { rng, readings }),
        }
    }
}

impl GpuProbe for SimProbe {
    fn backend(&self) -> GpuBackend {
        GpuBackend::Simulated
    }

    fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.inventory.clone())
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let SimState { rng, readings } = &mut *guard;
        Ok(readings
            .iter_mut()
            .zip(&self.inventory)
            .map(|(r, gpu)| {
                r.temperature_c = drift(rng, r.temperature_c, 0.5, IDLE_TEMP_C);
                r.power_w = drift(rng, r.power_w, 1.5, IDLE_POWER_W);
                GpuSample {
                    index: gpu.index,
                    temperature_c: Some(round1(r.temperature_c)),
                    power_w: Some(round1(r.power_w)),
                    utilization_pct: Some(0),
                    memory_used_bytes: Some(IDLE_MEMORY_USED_BYTES),
                    ecc_uncorrected_volatile: Some(0),
                    ecc_corrected_volatile: Some(0),
                }
            })
            .collect())
    }
}

fn sim_gpu(node_name: &str, index: u32) -> GpuInfo {
    let key = format!("{node_name}\0{index}");
    let hi = fnv1a(1, key.as_bytes());
    let lo = fnv1a(2, key.as_bytes());
    GpuInfo {
        index,
        uuid: format_uuid(hi, lo),
        name: NAME.to_owned(),
        pci_bus_id: pci_bus_id(index),
        memory_total_bytes: MEMORY_TOTAL_BYTES,
        serial: format!("165{:010}", fnv1a(3, key.as_bytes()) % 10_000_000_000),
    }
}

/// Indexes past eight move to the next PCI domain, keeping every id distinct.
fn pci_bus_id(index: u32) -> String {
    let bus = DGX_BUSES[index as usize % DGX_BUSES.len()];
    let domain = index / DGX_BUSES.len() as u32;
    format!("{domain:08X}:{bus:02X}:00.0")
}

fn format_uuid(hi: u64, lo: u64) -> String {
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// FNV-1a: tiny, dependency-free, and stable across Rust releases (unlike `DefaultHasher`).
fn fnv1a(salt: u8, bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    std::iter::once(salt)
        .chain(bytes.iter().copied())
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
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
    use std::collections::HashSet;

    use super::*;

    fn uuids(node: &str, n: u32) -> Vec<String> {
        (0..n).map(|i| sim_gpu(node, i).uuid).collect()
    }

    #[test]
    fn uuids_are_stable_across_restarts() -> Result<(), GpuError> {
        let a = SimProbe::new("node-a", 8).inventory()?;
        let b = SimProbe::new("node-a", 8).inventory()?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn uuids_are_distinct_across_indices_and_nodes() {
        let mut all = uuids("node-a", 64);
        all.extend(uuids("node-b", 64));
        all.extend(uuids("node-a1", 64));
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
    }

    #[test]
    fn uuids_look_like_nvidia_uuids() {
        let uuid = sim_gpu("node-a", 0).uuid;
        let parts: Vec<_> = uuid.trim_start_matches("GPU-").split('-').collect();
        assert!(uuid.starts_with("GPU-"));
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(
            parts
                .iter()
                .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
        );
    }

    #[test]
    fn pci_bus_ids_are_distinct() {
        let ids: HashSet<_> = (0..64).map(pci_bus_id).collect();
        assert_eq!(ids.len(), 64);
        assert_eq!(pci_bus_id(0), "00000000:18:00.0");
        assert_eq!(pci_bus_id(9), "00000001:2A:00.0");
    }

    #[test]
    fn serials_are_stable_and_thirteen_digits() {
        let s = sim_gpu("node-a", 3).serial;
        assert_eq!(s, sim_gpu("node-a", 3).serial);
        assert_eq!(s.len(), 13);
        assert_ne!(s, sim_gpu("node-a", 4).serial);
    }

    #[test]
    fn inventory_looks_like_an_h100() -> Result<(), GpuError> {
        let inv = SimProbe::new("node-a", 2).inventory()?;
        assert_eq!(inv[1].index, 1);
        assert!(inv[0].name.contains("H100") && inv[0].name.contains("simulated"));
        assert_eq!(inv[0].memory_total_bytes, 85_899_345_920);
        Ok(())
    }

    #[test]
    fn one_sample_per_gpu_each_plausible_while_drifting() -> Result<(), GpuError> {
        let probe = SimProbe::new("node-a", 8);
        let first = probe.sample()?;
        let mut last = first.clone();
        for _ in 0..500 {
            last = probe.sample()?;
            assert_eq!(last.len(), probe.inventory()?.len());
            for s in &last {
                let t = s.temperature_c.unwrap_or(f32::NAN);
                let p = s.power_w.unwrap_or(f32::NAN);
                assert!((30.0..=45.0).contains(&t), "temperature {t}");
                assert!((70.0..=90.0).contains(&p), "power {p}");
                assert_eq!(s.utilization_pct, Some(0));
                assert_eq!(s.ecc_uncorrected_volatile, Some(0));
            }
        }
        assert_ne!(first, last, "readings should drift");
        Ok(())
    }
}
