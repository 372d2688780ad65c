//! Real GPUs through NVML, loaded at run time so the agent builds on hosts without a driver.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use nvml_wrapper::Device;
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use tracing::warn;
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{AgentEvent, GpuLost};

use super::check::{CheckDetails, GpuDetails};
use super::nvml_fields::{Unavailable, classify, read_sample, read_sample_traced};
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

    fn check_details(&self) -> CheckDetails {
        let nvml = &self.nvml;
        let system = vec![
            ("driver_version".to_owned(), text(nvml.sys_driver_version())),
            ("nvml_version".to_owned(), text(nvml.sys_nvml_version())),
            (
                "cuda_driver_version".to_owned(),
                text(nvml.sys_cuda_driver_version().map(cuda_version)),
            ),
        ];
        let mut gpus = BTreeMap::new();
        for gpu in &self.baseline {
            let details = match nvml.device_by_index(gpu.index) {
                Ok(dev) => gpu_details(nvml, &dev, gpu.index),
                Err(e) => GpuDetails {
                    facts: vec![("device_by_index".to_owned(), describe(&e))],
                    unanswered: Vec::new(),
                },
            };
            gpus.insert(gpu.index, details);
        }
        CheckDetails { system, gpus }
    }
}

/// A value, or why there is none, in the words `--check-gpus` uses.
fn text<T: std::fmt::Display>(result: Result<T, NvmlError>) -> String {
    result.map_or_else(|e| describe(&e), |v| v.to_string())
}

fn describe(e: &NvmlError) -> String {
    match classify(e) {
        Unavailable::Unsupported => format!("{} ({e})", super::check::NOT_SUPPORTED),
        Unavailable::Lost => format!("GPU lost ({e})"),
        Unavailable::Failed => format!("error: {e}"),
    }
}

/// NVML's CUDA driver version, 1000 * major + 10 * minor, as "major.minor".
fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// `--check-gpus` facts of one GPU: modes and limits, XID event support and
/// registration (tried here on a set of its own, dropped at once), and every
/// sample query that gave no value.
fn gpu_details(nvml: &Nvml, dev: &Device<'_>, index: u32) -> GpuDetails {
    let on_off = |v: u32| match v {
        0 => "disabled".to_owned(),
        1 => "enabled".to_owned(),
        v => format!("unknown ({v})"),
    };
    let mut facts = vec![
        ("architecture", text(dev.architecture())),
        (
            "cuda_compute_capability",
            text(
                dev.cuda_compute_capability()
                    .map(|c| format!("{}.{}", c.major, c.minor)),
            ),
        ),
        ("vbios_version", text(dev.vbios_version())),
        (
            "ecc_mode",
            text(dev.is_ecc_enabled().map(|m| {
                format!(
                    "current {}, pending {}",
                    on_off(u32::from(m.currently_enabled)),
                    on_off(u32::from(m.pending_enabled))
                )
            })),
        ),
        (
            "mig_mode",
            text(dev.mig_mode().map(|m| {
                format!(
                    "current {}, pending {}",
                    on_off(m.current),
                    on_off(m.pending)
                )
            })),
        ),
        (
            "compute_mode",
            text(dev.compute_mode().map(|m| format!("{m:?}"))),
        ),
        (
            "enforced_power_limit_w",
            text(
                dev.enforced_power_limit()
                    .map(|mw| format!("{:.1}", f64::from(mw) / 1000.0)),
            ),
        ),
        (
            "throttle_reasons_raw",
            text(dev.current_throttle_reasons().map(|t| format!("{t:?}"))),
        ),
    ];
    let (events, registration) = super::nvml_events::check_registration(nvml, dev);
    facts.push(("xid_event_types", events));
    facts.push(("xid_event_registration", registration));
    let (_, _, unanswered) = read_sample_traced(dev, index, unix_ms());
    GpuDetails {
        facts: facts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        unanswered,
    }
}
