//! Simulated H100s, so the whole system runs on hosts without GPUs.
//!
//! Identities are derived from the node name and index: stable across agent
//! restarts (the coordinator recognises the same GPU) and distinct across
//! nodes (no two simulated GPUs in a cluster share a UUID). Faults come from
//! the fault file ([`super::faults`]), read by [`super::sim_watch`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{Instrument, warn};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{AgentEvent, GpuLost, XidError};

use super::faults::{self, FaultLine, GpuFaults};
use super::sim_sample::{Reading, sim_sample};
use super::{GpuBackend, GpuError, GpuInfo, GpuProbe, GpuSample};
use crate::events::EventSink;
use crate::unix_ms;

const NAME: &str = "NVIDIA H100 80GB HBM3 (simulated)";
const MEMORY_TOTAL_BYTES: u64 = 80 * 1024 * 1024 * 1024;
/// PCI buses of the eight GPUs of a DGX H100, so ids look familiar to operators.
const DGX_BUSES: [u8; 8] = [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb];

pub struct SimProbe {
    inventory: Vec<GpuInfo>,
    fault_file: Option<PathBuf>,
    /// Random walk of each GPU's readings and the faults in force; a mutex
    /// because samples drift from the previous one and the watcher writes faults.
    state: Mutex<SimState>,
}

struct SimState {
    rng: fastrand::Rng,
    readings: Vec<Reading>,
    faults: Vec<GpuFaults>,
    /// The fault file's lines at the last read, so XIDs fire only for new ones.
    lines: Vec<FaultLine>,
}

impl SimProbe {
    pub fn new(node_name: &str, gpus: u32) -> Self {
        let inventory: Vec<GpuInfo> = (0..gpus).map(|i| sim_gpu(node_name, i)).collect();
        let mut rng = fastrand::Rng::with_seed(fnv1a(0, node_name.as_bytes()));
        let readings = inventory.iter().map(|_| Reading::idle(&mut rng)).collect();
        Self {
            inventory,
            fault_file: None,
            state: Mutex::new(SimState {
                rng,
                readings,
                faults: vec![GpuFaults::default(); gpus as usize],
                lines: Vec::new(),
            }),
        }
    }

    /// The GPUs at `indexes` are new boards: another UUID and serial (same model and slot).
    pub fn with_replaced(mut self, node_name: &str, indexes: &[u32]) -> Self {
        for g in &mut self.inventory {
            if indexes.contains(&g.index) {
                let swapped = sim_gpu(&format!("{node_name}\0replaced"), g.index);
                g.uuid = swapped.uuid;
                g.serial = swapped.serial;
            }
        }
        self
    }

    /// Faults come from `path` once [`GpuProbe::start_events`] runs.
    pub fn with_fault_file(mut self, path: Option<PathBuf>) -> Self {
        self.fault_file = path;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `text` (the fault file's content) the faults in force; returns the
    /// events it causes: XIDs of new lines, then GPUs newly lost.
    pub fn apply_fault_text(&self, text: &str) -> Vec<AgentEvent> {
        let (lines, errors) = faults::parse(text, self.inventory.len() as u32);
        let file = self
            .fault_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        for e in &errors {
            warn!(file = %file, line = e.number, "fault file: {}; line skipped", e.message);
        }
        let faults = faults::fold(&lines, self.inventory.len() as u32);
        let at_unix_ms = unix_ms();
        let mut state = self.state();
        let xids = faults::new_xids(&state.lines, &lines);
        let mut events: Vec<AgentEvent> = xids
            .into_iter()
            .map(|(gpu, xid)| AgentEvent {
                at_unix_ms,
                kind: Some(Kind::Xid(XidError {
                    gpu_index: gpu,
                    xid,
                    gpu_uuid: self.uuid(gpu),
                })),
            })
            .collect();
        for (gpu, (old, new)) in (0u32..).zip(state.faults.iter().zip(&faults)) {
            if new.lost && !old.lost {
                events.push(AgentEvent {
                    at_unix_ms,
                    kind: Some(Kind::GpuLost(GpuLost {
                        gpu_index: gpu,
                        gpu_uuid: self.uuid(gpu),
                    })),
                });
            }
        }
        state.faults = faults;
        state.lines = lines;
        events
    }

    fn uuid(&self, index: u32) -> String {
        self.inventory
            .get(index as usize)
            .map(|g| g.uuid.clone())
            .unwrap_or_default()
    }
}

impl GpuProbe for SimProbe {
    fn backend(&self) -> GpuBackend {
        GpuBackend::Simulated
    }

    /// A lost GPU has left the inventory, as it would leave NVML's.
    fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let state = self.state();
        Ok(self
            .inventory
            .iter()
            .zip(&state.faults)
            .filter(|(_, f)| !f.lost)
            .map(|(g, _)| g.clone())
            .collect())
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        let now = unix_ms();
        let mut guard = self.state();
        let SimState {
            rng,
            readings,
            faults,
            ..
        } = &mut *guard;
        Ok(readings
            .iter_mut()
            .zip(faults.iter())
            .zip(&self.inventory)
            .filter(|((_, f), _)| !f.lost)
            .map(|((r, f), gpu)| {
                r.drift(rng);
                sim_sample(gpu.index, r, f, now)
            })
            .collect())
    }

    fn start_events(self: Arc<Self>, sink: EventSink) {
        if let Some(path) = self.fault_file.clone() {
            tokio::spawn(super::sim_watch::watch(self, path, sink).in_current_span());
        }
    }

    fn self_check_name(&self) -> &'static str {
        "builtin simulated self-check"
    }

    /// A fatal XID in force: the real GPU would need a reset, so the simulated one fails its
    /// diagnostics until the fault file says it was repaired.
    fn lasting_problems(&self) -> Vec<(u32, String)> {
        let state = self.state();
        (0u32..)
            .zip(&state.faults)
            .filter(|(_, f)| !f.lost)
            .flat_map(|(gpu, f)| {
                f.fatal_xids.iter().map(move |&xid| {
                    (
                        gpu,
                        format!(
                            "has not recovered from {} (simulated: a `gpu={gpu} ok` line in \
                             the fault file repairs it)",
                            vigil_core::xid::label(xid)
                        ),
                    )
                })
            })
            .collect()
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
    fn a_replaced_gpu_has_a_new_uuid_and_serial_in_the_same_slot() -> Result<(), GpuError> {
        let before = SimProbe::new("node-a", 4).inventory()?;
        let after = SimProbe::new("node-a", 4)
            .with_replaced("node-a", &[2])
            .inventory()?;
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(
                (b.index, &b.pci_bus_id, &b.name),
                (a.index, &a.pci_bus_id, &a.name)
            );
            assert_eq!(b.uuid == a.uuid, b.index != 2, "{b:?} {a:?}");
            assert_eq!(b.serial == a.serial, b.index != 2, "{b:?} {a:?}");
        }
        Ok(())
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
