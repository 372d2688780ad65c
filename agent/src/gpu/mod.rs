//! The agent's view of its GPUs: one trait, a real NVML backend and a simulator.

mod nvml;
mod sim;

use std::sync::Arc;

pub use nvml::NvmlProbe;
pub use sim::SimProbe;
pub use vigil_proto::v1::{GpuBackend, GpuInfo, GpuSample};

use crate::config::{AgentConfig, GpuBackendKind};

/// A source of GPU inventory and health samples.
///
/// Calls may block (NVML talks to the driver), so async callers run them on
/// the blocking pool; hence `Send + Sync`.
pub trait GpuProbe: Send + Sync {
    fn backend(&self) -> GpuBackend;
    /// The GPUs present now, ordered by index; identities (UUID, serial) come from the hardware.
    fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError>;
    /// One health sample per GPU in the inventory.
    fn sample(&self) -> Result<Vec<GpuSample>, GpuError>;
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
        GpuBackendKind::Sim => Arc::new(SimProbe::new(&config.node_name, config.sim_gpus)),
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
