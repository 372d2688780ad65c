//! The agent's view of its GPUs: one trait, a real NVML backend and a simulator.
//!
//! - `nvml`: the probe over NVML; `nvml_fields` reads one GPU's sample field
//!   by field; `nvml_events` is the thread that waits for XID and ECC events.
//! - `check`: `--check-gpus`, one read of the backend shown field by field.
//! - `sim`: simulated H100s; `sim_sample` builds their samples, `faults`
//!   parses the fault file and `sim_watch` re-reads it when it changes.

pub mod check;
pub mod faults;
mod nvml;
mod nvml_events;
mod nvml_fields;
mod sim;
mod sim_sample;
mod sim_watch;

use std::sync::Arc;

pub use nvml::NvmlProbe;
pub use nvml_fields::{Unanswered, Unavailable};
pub use sim::SimProbe;
pub use vigil_proto::v1::{GpuBackend, GpuInfo, GpuSample};

use crate::config::{AgentConfig, GpuBackendKind};
use crate::events::EventSink;

/// A source of GPU inventory, health samples and events.
///
/// Calls may block (NVML talks to the driver), so async callers run them on
/// the blocking pool; hence `Send + Sync`.
pub trait GpuProbe: Send + Sync {
    fn backend(&self) -> GpuBackend;
    /// The GPUs present now, ordered by index; identities (UUID, serial) come
    /// from the hardware. A lost GPU is no longer listed.
    fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError>;
    /// One health sample per GPU present; a field the GPU cannot report is
    /// absent. A GPU found lost here is reported once, as an event, and left out.
    fn sample(&self) -> Result<Vec<GpuSample>, GpuError>;
    /// Starts the backend's event sources (NVML's event thread, the fault-file
    /// watcher); they report through `sink` and stop once the agent shuts down.
    /// Call it once, from within the tokio runtime.
    fn start_events(self: Arc<Self>, sink: EventSink);
    /// How the built-in diagnostic names itself in a `DiagnosticsResult`.
    fn self_check_name(&self) -> &'static str;
    /// Problems no sample field shows, that fail the built-in diagnostic: `(GPU index, what)`,
    /// e.g. the simulator's GPU that has not recovered from a fatal XID. NVML has none (a real
    /// GPU in that state fails its queries or leaves the inventory).
    fn lasting_problems(&self) -> Vec<(u32, String)> {
        Vec::new()
    }
    /// For `--check-gpus`: what the backend knows beyond inventory and samples
    /// (driver versions, event support, why fields are absent). Blocking.
    fn check_details(&self) -> check::CheckDetails {
        check::CheckDetails::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML not available: {detail}; use --gpu-backend sim for a simulated host")]
    NvmlUnavailable {
        detail: &'static str,
        source: ::nvml_wrapper::error::NvmlError,
    },
    #[error("NVML query {what} failed for GPU {index}")]
    NvmlQuery {
        index: u32,
        what: &'static str,
        #[source]
        source: ::nvml_wrapper::error::NvmlError,
    },
}

/// Opens the backend the config names; NVML fails here, at start-up, on a host without it.
pub fn open(config: &AgentConfig) -> Result<Arc<dyn GpuProbe>, GpuError> {
    Ok(match config.gpu_backend {
        GpuBackendKind::Nvml => Arc::new(NvmlProbe::init()?),
        GpuBackendKind::Sim => Arc::new(
            SimProbe::new(&config.node_name, config.sim_gpus)
                .with_replaced(&config.node_name, &config.sim_replaced_gpus)
                .with_fault_file(config.sim_fault_file.clone()),
        ),
    })
}

/// The label operators see in metrics and logs.
pub fn backend_label(backend: GpuBackend) -> &'static str {
    match backend {
        GpuBackend::Nvml => "nvml",
        GpuBackend::Simulated => "simulated",
        GpuBackend::Unspecified => "unspecified",
    }
}
