//! Real GPUs through NVML, loaded at run time so the agent builds on hosts without a driver.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;

use super::{GpuBackend, GpuError, GpuInfo, GpuProbe, GpuSample};

pub struct NvmlProbe {
    nvml: Nvml,
}

impl NvmlProbe {
    pub fn init() -> Result<Self, GpuError> {
        let nvml = Nvml::init().map_err(|source| GpuError::NvmlUnavailable {
            detail: unavailable_detail(&source),
            source,
        })?;
        Ok(Self { nvml })
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

/// Maps "this GPU or driver cannot tell" to `None`, so absent never reads as zero.
fn optional<T>(
    index: u32,
    what: &'static str,
    result: Result<T, NvmlError>,
) -> Result<Option<T>, GpuError> {
    match result {
        Ok(v) => Ok(Some(v)),
        // An older driver may lack the symbol altogether: unsupported too.
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => Ok(None),
        Err(source) => Err(GpuError::NvmlQuery {
            index,
            what,
            source,
        }),
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
        (0..self.device_count()?)
            .map(|index| {
                let dev = required(index, "device_by_index", self.nvml.device_by_index(index))?;
                Ok(GpuInfo {
                    index,
                    uuid: required(index, "uuid", dev.uuid())?,
                    name: required(index, "name", dev.name())?,
                    pci_bus_id: required(index, "pci_info", dev.pci_info())?.bus_id,
                    memory_total_bytes: required(index, "memory_info", dev.memory_info())?.total,
                    // Consumer boards have no serial; an empty one says "none", not "unknown".
                    serial: optional(index, "serial", dev.serial())?.unwrap_or_default(),
                })
            })
            .collect()
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        (0..self.device_count()?)
            .map(|index| {
                let dev = required(index, "device_by_index", self.nvml.device_by_index(index))?;
                let temp = optional(
                    index,
                    "temperature",
                    dev.temperature(TemperatureSensor::Gpu),
                )?;
                let power_mw = optional(index, "power_usage", dev.power_usage())?;
                let util = optional(index, "utilization_rates", dev.utilization_rates())?;
                let memory = optional(index, "memory_info", dev.memory_info())?;
                let ecc = |kind| dev.total_ecc_errors(kind, EccCounter::Volatile);
                Ok(GpuSample {
                    index,
                    temperature_c: temp.map(|t| t as f32),
                    power_w: power_mw.map(|mw| mw as f32 / 1000.0),
                    utilization_pct: util.map(|u| u.gpu),
                    memory_used_bytes: memory.map(|m| m.used),
                    ecc_uncorrected_volatile: optional(
                        index,
                        "ecc_uncorrected",
                        ecc(MemoryError::Uncorrected),
                    )?,
                    ecc_corrected_volatile: optional(
                        index,
                        "ecc_corrected",
                        ecc(MemoryError::Corrected),
                    )?,
                })
            })
            .collect()
    }
}
