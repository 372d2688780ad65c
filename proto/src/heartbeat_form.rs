//! When a heartbeat carries full GPU samples and when only their telemetry: the rule the agent
//! and the load generator share, and how the coordinator reads the compact form back.
//!
//! A GPU's health (ECC, retired pages, row remapping, throttle reasons, PCIe, NVLink state and
//! counters, persistence mode) almost never changes, while temperature, power, utilisation and
//! memory use change every second. Full samples of 8 GPUs with 18 NVLinks each cost a
//! coordinator most of its CPU at scale (docs/scale-analysis.md), so a heartbeat whose GPUs'
//! health is as last sent in full says so (`Heartbeat.gpu_health_unchanged`) and carries one
//! small [`GpuTelemetry`] per GPU instead. [`send_full`] decides; [`SessionSamples`] keeps
//! what it needs across one session; [`merge_telemetry`] rebuilds the samples on the
//! coordinator.

use crate::v1::{GpuSample, GpuTelemetry, Heartbeat};

/// A heartbeat carries full samples at least this often (at most `FULL_SAMPLE_EVERY - 1`
/// compact ones in a row), even when nothing changed. The coordinator's reading of a node's
/// GPUs rests on the last full samples of the session; this bounds how long a state that was
/// lost or misapplied on either side (a bug, a coordinator that restored another copy of
/// the node) could persist unseen: 30 heartbeats, 30 s at the default pace, well inside the
/// time an operator would act on a node.
pub const FULL_SAMPLE_EVERY: u32 = 30;

/// Whether the next heartbeat of a session must carry full samples: always when the
/// coordinator does not accept the compact form (`accepted`, from `Registered`), on the
/// session's first heartbeat (`last_full` is `None`), when the set of GPUs or any
/// health-relevant field of any GPU differs from `last_full` (the last full samples this
/// session sent; see [`same_health`]), and when `compact_since_full` compact heartbeats have
/// been sent since then and one more would exceed [`FULL_SAMPLE_EVERY`].
pub fn send_full(
    accepted: bool,
    last_full: Option<&[GpuSample]>,
    compact_since_full: u32,
    samples: &[GpuSample],
) -> bool {
    let Some(last) = last_full.filter(|_| accepted) else {
        return true;
    };
    compact_since_full.saturating_add(1) >= FULL_SAMPLE_EVERY
        || last.len() != samples.len()
        || last.iter().zip(samples).any(|(a, b)| !same_health(a, b))
}

/// Whether two samples agree on everything but their telemetry (the fields of
/// [`GpuTelemetry`]) and `observed_at_unix_ms`: the same GPU index and the same health.
/// Destructured in full, so that a field added to `GpuSample` must be classified here.
pub fn same_health(a: &GpuSample, b: &GpuSample) -> bool {
    let GpuSample {
        index,
        temperature_c: _,
        power_w: _,
        utilization_pct: _,
        memory_used_bytes: _,
        memory_temperature_c: _,
        observed_at_unix_ms: _,
        ecc_uncorrected_volatile,
        ecc_corrected_volatile,
        ecc_uncorrected_aggregate,
        ecc_corrected_aggregate,
        retired_pages_single_bit,
        retired_pages_double_bit,
        retired_pages_pending,
        remapped_rows_correctable,
        remapped_rows_uncorrectable,
        remapped_rows_pending,
        remapped_rows_failure,
        throttle_hw_slowdown,
        throttle_thermal,
        throttle_power_brake,
        pcie_link_gen_current,
        pcie_link_gen_max,
        pcie_link_width_current,
        pcie_link_width_max,
        pcie_replay_counter,
        nvlinks,
        persistence_mode,
        nvlink_supported,
    } = a;
    *index == b.index
        && *ecc_uncorrected_volatile == b.ecc_uncorrected_volatile
        && *ecc_corrected_volatile == b.ecc_corrected_volatile
        && *ecc_uncorrected_aggregate == b.ecc_uncorrected_aggregate
        && *ecc_corrected_aggregate == b.ecc_corrected_aggregate
        && *retired_pages_single_bit == b.retired_pages_single_bit
        && *retired_pages_double_bit == b.retired_pages_double_bit
        && *retired_pages_pending == b.retired_pages_pending
        && *remapped_rows_correctable == b.remapped_rows_correctable
        && *remapped_rows_uncorrectable == b.remapped_rows_uncorrectable
        && *remapped_rows_pending == b.remapped_rows_pending
        && *remapped_rows_failure == b.remapped_rows_failure
        && *throttle_hw_slowdown == b.throttle_hw_slowdown
        && *throttle_thermal == b.throttle_thermal
        && *throttle_power_brake == b.throttle_power_brake
        && *pcie_link_gen_current == b.pcie_link_gen_current
        && *pcie_link_gen_max == b.pcie_link_gen_max
        && *pcie_link_width_current == b.pcie_link_width_current
        && *pcie_link_width_max == b.pcie_link_width_max
        && *pcie_replay_counter == b.pcie_replay_counter
        && *nvlinks == b.nvlinks
        && *persistence_mode == b.persistence_mode
        && *nvlink_supported == b.nvlink_supported
}

/// The telemetry of one sample.
pub fn telemetry(s: &GpuSample) -> GpuTelemetry {
    GpuTelemetry {
        index: s.index,
        temperature_c: s.temperature_c,
        memory_temperature_c: s.memory_temperature_c,
        power_w: s.power_w,
        utilization_pct: s.utilization_pct,
        memory_used_bytes: s.memory_used_bytes,
        observed_at_unix_ms: s.observed_at_unix_ms,
    }
}

/// Put `t` into the sample of the same GPU. Destructured in full: a field added to
/// `GpuTelemetry` must be merged here.
fn apply(s: &mut GpuSample, t: &GpuTelemetry) {
    let GpuTelemetry {
        index: _,
        temperature_c,
        memory_temperature_c,
        power_w,
        utilization_pct,
        memory_used_bytes,
        observed_at_unix_ms,
    } = *t;
    s.temperature_c = temperature_c;
    s.memory_temperature_c = memory_temperature_c;
    s.power_w = power_w;
    s.utilization_pct = utilization_pct;
    s.memory_used_bytes = memory_used_bytes;
    s.observed_at_unix_ms = observed_at_unix_ms;
}

/// The samples a compact heartbeat stands for: `samples` (the last full ones, or what an
/// earlier merge made of them) with each GPU's telemetry put in, matched by index. A GPU
/// without telemetry keeps its sample as it was, and telemetry of a GPU that has no sample is
/// dropped: the set of GPUs is the full samples' (a compact heartbeat never says a GPU is gone).
pub fn merge_telemetry(samples: &mut [GpuSample], telemetry: &[GpuTelemetry]) {
    for (i, t) in telemetry.iter().enumerate() {
        // The agent sends telemetry in its samples' order: try that place first.
        let at = match samples.get(i) {
            Some(s) if s.index == t.index => Some(i),
            _ => samples.iter().position(|s| s.index == t.index),
        };
        if let Some(s) = at.and_then(|at| samples.get_mut(at)) {
            apply(s, t);
        }
    }
}

/// Which form a heartbeat went out in; hand it to [`SessionSamples::sent`] once the heartbeat
/// is on the stream (a dropped heartbeat sent nothing).
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// Full samples: a copy, what later heartbeats are compared with.
    Full(Vec<GpuSample>),
    Compact,
}

/// One session's memory for [`send_full`]. Made new for every session (a new session's first
/// heartbeat is always full).
#[derive(Debug, Clone, Default)]
pub struct SessionSamples {
    /// The coordinator's `Registered.accepts_gpu_health_unchanged`.
    accepted: bool,
    last_full: Option<Vec<GpuSample>>,
    compact_since_full: u32,
}

impl SessionSamples {
    pub fn new(accepted: bool) -> Self {
        Self {
            accepted,
            ..Self::default()
        }
    }

    /// Fill `hb`'s GPU part from `samples`: full, or (by [`send_full`]) the health-unchanged
    /// flag and the telemetry. Record the answer with [`Self::sent`] once `hb` is sent.
    pub fn fill(&self, hb: &mut Heartbeat, samples: Vec<GpuSample>) -> Sent {
        let full = send_full(
            self.accepted,
            self.last_full.as_deref(),
            self.compact_since_full,
            &samples,
        );
        if full {
            hb.gpu_health_unchanged = false;
            hb.telemetry = Vec::new();
            hb.gpus = samples.clone();
            Sent::Full(samples)
        } else {
            hb.gpu_health_unchanged = true;
            hb.telemetry = samples.iter().map(telemetry).collect();
            hb.gpus = Vec::new();
            Sent::Compact
        }
    }

    /// A heartbeat filled by [`Self::fill`] is on the stream.
    pub fn sent(&mut self, sent: Sent) {
        match sent {
            Sent::Full(samples) => {
                self.last_full = Some(samples);
                self.compact_since_full = 0;
            }
            Sent::Compact => self.compact_since_full = self.compact_since_full.saturating_add(1),
        }
    }
}

#[cfg(test)]
#[path = "heartbeat_form_tests.rs"]
mod tests;
