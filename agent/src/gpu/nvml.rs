//! Real GPUs through NVML, loaded at run time so the agent builds on hosts without a driver.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use nvml_wrapper::Device;
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use tracing::warn;
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{AgentEvent, GpuLost};

use super::nvml_fields::{Unavailable, classify, read_sample};
use super::{GpuBackend, GpuError, GpuInfo, GpuProbe, GpuSample};
use crate::events::EventSink;
use crate::unix_ms;

pub struct NvmlProbe {
    /// Shared with the event thread, which borrows its event set from it.
    nvml: Arc<Nvml>,
    /// The inventory at start-up: a GPU of it that NVML stops answering for is lost.
    baseline: Vec<GpuInfo>,
    /// GPUs already reported lost; NVML does not bring one back without a driver reload.
    lost: Mutex<BTreeSet<u32>>,
    /// Set by [`GpuProbe::start_events`]; GPUs found lost while sampling are reported through it.
    sink: OnceLock<EventSink>,
}

impl NvmlProbe {
    pub fn init() -> Result<Self, GpuError> {
        let nvml = Nvml::init().map_err(|source| GpuError::NvmlUnavailable {
            detail: unavailable_detail(&source),
            source,
        })?;
        let mut probe = Self {
            nvml: Arc::new(nvml),
            baseline: Vec::new(),
            lost: Mutex::new(BTreeSet::new()),
            sink: OnceLock::new(),
        };
        probe.baseline = probe.read_inventory()?;
        Ok(probe)
    }

    fn device_count(&self) -> Result<u32, GpuError> {
        self.nvml
            .device_count()
            .map_err(|source| GpuError::NvmlQuery {
                index: 0,
                what: "device_count",
                source,
            })
    }

    fn is_lost(&self, index: u32) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&index)
    }

    /// Reports `gpu` lost the first time only.
    fn report_lost(&self, gpu: &GpuInfo) {
        let first = self
            .lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(gpu.index);
        if !first {
            return;
        }
        let event = AgentEvent {
            at_unix_ms: unix_ms(),
            kind: Some(Kind::GpuLost(GpuLost {
                gpu_index: gpu.index,
                gpu_uuid: gpu.uuid.clone(),
            })),
        };
        match self.sink.get() {
            Some(sink) => sink.emit(event),
            None => warn!(gpu = gpu.index, uuid = %gpu.uuid, "GPU lost before events started"),
        }
    }

    /// Every GPU NVML can still talk to; one that has fallen off the bus is left out.
    fn read_inventory(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let mut gpus = Vec::new();
        for index in 0..self.device_count()? {
            let info = required(index, "device_by_index", self.nvml.device_by_index(index))
                .and_then(|dev| gpu_info(index, &dev));
            match info {
                Ok(info) => gpus.push(info),
                Err(GpuError::NvmlQuery {
                    source: NvmlError::GpuLost,
                    ..
                }) => warn!(
                    gpu = index,
                    "GPU has fallen off the bus; left out of the inventory"
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(gpus)
    }
}

fn gpu_info(index: u32, dev: &Device<'_>) -> Result<GpuInfo, GpuError> {
    Ok(GpuInfo {
        index,
        uuid: required(index, "uuid", dev.uuid())?,
        name: required(index, "name", dev.name())?,
        pci_bus_id: required(index, "pci_info", dev.pci_info())?.bus_id,
        memory_total_bytes: required(index, "memory_info", dev.memory_info())?.total,
        // Consumer boards have no serial; an empty one says "none", not "unknown".
        serial: match dev.serial() {
            Ok(s) => s,
            Err(e) if matches!(classify(&e), Unavailable::Unsupported) => String::new(),
            Err(source) => {
                return Err(GpuError::NvmlQuery {
                    index,
                    what: "serial",
                    source,
                });
            }
        },
    })
}

/// Names the usual causes in words an operator can act on.
fn unavailable_detail(e: &NvmlError) -> &'static str {
    match e {
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => "libnvidia-ml.so.1 not found",
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded",
        NvmlError::NoPermission => "no permission to open the NVIDIA devices",
        _ => "initialisation failed",
    }
}

fn required<T>(
    index: u32,
    what: &'static str,
    result: Result<T, NvmlError>,
) -> Result<T, GpuError> {
    result.map_err(|source| GpuError::NvmlQuery {
        index,
        what,
        source,
    })
}

impl GpuProbe for NvmlProbe {
    fn backend(&self) -> GpuBackend {
        GpuBackend::Nvml
    }

    fn inventory(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let mut gpus = self.read_inventory()?;
        gpus.retain(|g| !self.is_lost(g.index));
        Ok(gpus)
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        let count = self.device_count()?;
        let now = unix_ms();
        let mut samples = Vec::with_capacity(self.baseline.len());
        for gpu in &self.baseline {
            if self.is_lost(gpu.index) {
                continue;
            }
            let lost = if gpu.index >= count {
                true
            } else {
                match self.nvml.device_by_index(gpu.index) {
                    Ok(dev) => {
                        let (sample, lost) = read_sample(&dev, gpu.index, now);
                        if !lost {
                            samples.push(sample);
                        }
                        lost
                    }
                    Err(NvmlError::GpuLost) => true,
                    Err(e) => {
                        warn!(gpu = gpu.index, error = %e, "cannot open GPU; no sample from it this time");
                        false
                    }
                }
            };
            if lost {
                self.report_lost(gpu);
            }
        }
        Ok(samples)
    }

    fn start_events(self: Arc<Self>, sink: EventSink) {
        super::nvml_events::spawn(Arc::clone(&self.nvml), self.baseline.clone(), sink.clone());
        if self.sink.set(sink).is_err() {
            warn!("NVML events started twice; the first sink is kept");
        }
    }

    fn self_check_name(&self) -> &'static str {
        "builtin NVML self-check"
    }
}
