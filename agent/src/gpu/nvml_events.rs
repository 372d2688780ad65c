//! A dedicated thread that waits for NVML events: XIDs become `AgentEvent`s, ECC events a fresh heartbeat.
//!
//! `nvmlEventSetWait` blocks, so it runs on its own thread, never on the
//! runtime; it wakes every [`WAIT_MS`] to notice that the agent shut down.

use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError as NvmlXid;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;
use nvml_wrapper::struct_wrappers::event::EventData;
use tracing::{debug, info, warn};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{AgentEvent, XidError};

use super::GpuInfo;
use crate::events::EventSink;
use crate::unix_ms;

/// How long one wait blocks: also how late the thread notices shutdown.
const WAIT_MS: u32 = 500;
const WANTED: EventTypes = EventTypes::CRITICAL_XID_ERROR
    .union(EventTypes::SINGLE_BIT_ECC_ERROR)
    .union(EventTypes::DOUBLE_BIT_ECC_ERROR);

pub fn spawn(nvml: Arc<Nvml>, gpus: Vec<GpuInfo>, sink: EventSink) {
    let span = tracing::Span::current();
    let spawned = std::thread::Builder::new()
        .name("nvml-events".to_owned())
        .spawn(move || span.in_scope(|| run(&nvml, &gpus, &sink)));
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the NVML event thread; XIDs will not be reported");
    }
}

fn run(nvml: &Nvml, gpus: &[GpuInfo], sink: &EventSink) {
    let Some(set) = register(nvml, gpus) else {
        return;
    };
    let mut last_error = None;
    while !sink.is_closed() {
        match set.wait(WAIT_MS) {
            Ok(data) => handle(data, gpus, sink),
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                let error = e.to_string();
                if last_error.as_ref() != Some(&error) {
                    warn!(%error, "waiting for NVML events failed; retrying");
                    last_error = Some(error);
                }
                std::thread::sleep(Duration::from_millis(u64::from(WAIT_MS)));
            }
        }
    }
    debug!("NVML event thread stopped");
}

/// One event set covering every GPU that supports events.
///
/// Registration consumes the set and frees it on failure, so the event types
/// are checked first; a GPU that still fails is dropped and the set rebuilt.
fn register<'n>(nvml: &'n Nvml, gpus: &[GpuInfo]) -> Option<EventSet<'n>> {
    let mut wanted: Vec<(u32, EventTypes)> =
        gpus.iter().filter_map(|g| supported(nvml, g)).collect();
    loop {
        if wanted.is_empty() {
            info!("no GPU supports NVML events; XIDs will not be reported");
            return None;
        }
        let mut set = match nvml.create_event_set() {
            Ok(set) => Some(set),
            Err(e) => {
                warn!(error = %e, "cannot create an NVML event set; XIDs will not be reported");
                return None;
            }
        };
        let mut failed = None;
        for (i, &(index, types)) in wanted.iter().enumerate() {
            let (Some(s), Ok(dev)) = (set.take(), nvml.device_by_index(index)) else {
                failed = Some(i);
                break;
            };
            match dev.register_events(types, s) {
                Ok(s) => set = Some(s),
                Err(e) => {
                    warn!(gpu = index, error = %e, "cannot register for NVML events; this GPU's XIDs will not be reported");
                    failed = Some(i);
                    break;
                }
            }
        }
        match failed {
            None => {
                info!(gpus = wanted.len(), "waiting for NVML XID events");
                return set;
            }
            Some(i) => {
                wanted.remove(i);
            }
        }
    }
}

/// For `--check-gpus`: the event types of [`WANTED`] this GPU supports, and
/// whether registering for them works (on a set of its own, freed at once).
pub fn check_registration(nvml: &Nvml, dev: &nvml_wrapper::Device<'_>) -> (String, String) {
    let types = match dev.supported_event_types() {
        Ok(t) => t & WANTED,
        Err(e) => {
            let why = format!("error: {e}");
            return (why, "not tried (no supported event types)".to_owned());
        }
    };
    let supported = format!(
        "{types:?} (critical XID {})",
        if types.contains(EventTypes::CRITICAL_XID_ERROR) {
            "supported"
        } else {
            "NOT supported"
        }
    );
    if types.is_empty() {
        return (supported, "not tried (none of the wanted types)".to_owned());
    }
    let registration = match nvml.create_event_set() {
        Err(e) => format!("error creating the event set: {e}"),
        Ok(set) => match dev.register_events(types, set) {
            Ok(_set) => "ok".to_owned(),
            Err(e) => format!("error: {}", e.error),
        },
    };
    (supported, registration)
}

fn supported(nvml: &Nvml, gpu: &GpuInfo) -> Option<(u32, EventTypes)> {
    let types = nvml
        .device_by_index(gpu.index)
        .and_then(|dev| dev.supported_event_types());
    let types = match types {
        Ok(t) => t & WANTED,
        Err(e) => {
            warn!(gpu = gpu.index, error = %e, "GPU reports no NVML event support; its XIDs will not be reported");
            return None;
        }
    };
    if !types.contains(EventTypes::CRITICAL_XID_ERROR) {
        warn!(
            gpu = gpu.index,
            "XID events not supported on this GPU; its XIDs will not be reported"
        );
    }
    (!types.is_empty()).then_some((gpu.index, types))
}

fn handle(data: EventData<'_>, gpus: &[GpuInfo], sink: &EventSink) {
    let uuid = data.device.uuid().ok();
    let gpu = gpus
        .iter()
        .find(|g| Some(&g.uuid) == uuid.as_ref())
        .or_else(|| {
            let index = data.device.index().ok()?;
            gpus.iter().find(|g| g.index == index)
        });
    // An event from a device we cannot name still matters; u32::MAX says "unknown".
    let (gpu_index, gpu_uuid) = gpu.map_or((u32::MAX, uuid.unwrap_or_default()), |g| {
        (g.index, g.uuid.clone())
    });
    if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
        let xid = match data.event_data {
            Some(NvmlXid::Value(v)) => u32::try_from(v).unwrap_or(u32::MAX),
            // NVML could not tell which XID: 0, which no real XID uses.
            Some(NvmlXid::Unknown) | None => 0,
        };
        sink.emit(AgentEvent {
            at_unix_ms: unix_ms(),
            kind: Some(Kind::Xid(XidError {
                gpu_index,
                xid,
                gpu_uuid,
            })),
        });
    } else {
        debug!(gpu = gpu_index, event = ?data.event_type, "ECC event; sampling now");
        sink.changed();
    }
}
