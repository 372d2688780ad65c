//! One GPU's health sample read from NVML, field by field: a field NVML cannot give is absent.
//!
//! Each field is read on its own, so one failing query never costs the rest
//! of the sample. "Not supported" (by this GPU or this driver) is simply
//! absent; any other error is absent too, with a debug line; `GpuLost`
//! marks the whole GPU lost.

use std::cell::{Cell, RefCell};

use nvml_wrapper::Device;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{
    EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE,
    NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_REMAPPED_UNC,
};
use tracing::debug;
use vigil_proto::v1::NvLinkStatus;

use super::GpuSample;
use super::faults::MAX_NVLINKS;

/// Why a field is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// This GPU or driver cannot report it: absent, silently.
    Unsupported,
    /// The GPU has fallen off the bus.
    Lost,
    /// Anything else: absent this time, with a debug line.
    Failed,
}

pub fn classify(e: &NvmlError) -> Unavailable {
    match e {
        // An older driver may lack the symbol altogether: unsupported too.
        NvmlError::NotSupported
        | NvmlError::FunctionNotFound
        | NvmlError::FailedToLoadSymbol(_) => Unavailable::Unsupported,
        NvmlError::GpuLost => Unavailable::Lost,
        _ => Unavailable::Failed,
    }
}

/// A query that gave no value, and why: what `--check-gpus` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    pub query: String,
    pub why: Unavailable,
    pub error: String,
}

/// Reads fields of one GPU, remembering whether any query found it lost,
/// and every query that gave no value.
struct Reader {
    index: u32,
    lost: Cell<bool>,
    unanswered: RefCell<Vec<Unanswered>>,
}

impl Reader {
    fn new(index: u32) -> Self {
        Self {
            index,
            lost: Cell::new(false),
            unanswered: RefCell::new(Vec::new()),
        }
    }

    fn get<T>(&self, what: &str, result: Result<T, NvmlError>) -> Option<T> {
        let e = match result {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let why = classify(&e);
        self.unanswered.borrow_mut().push(Unanswered {
            query: what.to_owned(),
            why,
            error: e.to_string(),
        });
        match why {
            Unavailable::Unsupported => {}
            Unavailable::Lost => self.lost.set(true),
            Unavailable::Failed => {
                debug!(gpu = self.index, what, error = %e, "NVML query failed; field left out");
            }
        }
        None
    }
}

/// The sample, and whether the GPU turned out to be lost (then the sample is worthless).
pub fn read_sample(dev: &Device<'_>, index: u32, observed_at_unix_ms: u64) -> (GpuSample, bool) {
    let (sample, lost, _) = read_sample_traced(dev, index, observed_at_unix_ms);
    (sample, lost)
}

/// [`read_sample`], with every query that gave no value and why (for `--check-gpus`).
pub fn read_sample_traced(
    dev: &Device<'_>,
    index: u32,
    observed_at_unix_ms: u64,
) -> (GpuSample, bool, Vec<Unanswered>) {
    let r = Reader::new(index);
    let sample = read_fields(&r, dev, index, observed_at_unix_ms);
    let lost = r.lost.get();
    (sample, lost, r.unanswered.into_inner())
}

fn read_fields(r: &Reader, dev: &Device<'_>, index: u32, observed_at_unix_ms: u64) -> GpuSample {
    let temperature = r.get("temperature", dev.temperature(TemperatureSensor::Gpu));
    if r.lost.get() {
        return GpuSample::default();
    }
    let ecc = |what, error, counter| r.get(what, dev.total_ecc_errors(error, counter));
    let retired = |what, cause| {
        r.get(what, dev.retired_pages(cause))
            .map(|p| p.len() as u64)
    };
    let throttle = r.get("throttle_reasons", dev.current_throttle_reasons());
    let has = |reasons: ThrottleReasons| throttle.map(|t| t.intersects(reasons));
    let [
        memory_temp,
        remap_cor,
        remap_unc,
        remap_pending,
        remap_failure,
    ] = field_values(r, dev);
    let (nvlinks, nvlink_supported) = nvlinks(r, dev);
    GpuSample {
        index,
        temperature_c: temperature.map(|t| t as f32),
        power_w: r
            .get("power_usage", dev.power_usage())
            .map(|mw| mw as f32 / 1000.0),
        utilization_pct: r
            .get("utilization_rates", dev.utilization_rates())
            .map(|u| u.gpu),
        memory_used_bytes: r.get("memory_info", dev.memory_info()).map(|m| m.used),
        ecc_uncorrected_volatile: ecc(
            "ecc_uncorrected_volatile",
            MemoryError::Uncorrected,
            EccCounter::Volatile,
        ),
        ecc_corrected_volatile: ecc(
            "ecc_corrected_volatile",
            MemoryError::Corrected,
            EccCounter::Volatile,
        ),
        // 0 °C is no HBM reading: boards without a memory sensor report it so.
        memory_temperature_c: memory_temp.filter(|t| *t > 0).map(|t| t as f32),
        ecc_uncorrected_aggregate: ecc(
            "ecc_uncorrected_aggregate",
            MemoryError::Uncorrected,
            EccCounter::Aggregate,
        ),
        ecc_corrected_aggregate: ecc(
            "ecc_corrected_aggregate",
            MemoryError::Corrected,
            EccCounter::Aggregate,
        ),
        retired_pages_single_bit: retired(
            "retired_pages_sbe",
            RetirementCause::MultipleSingleBitEccErrors,
        ),
        retired_pages_double_bit: retired("retired_pages_dbe", RetirementCause::DoubleBitEccError),
        retired_pages_pending: r.get("retired_pages_pending", dev.are_pages_pending_retired()),
        remapped_rows_correctable: remap_cor,
        remapped_rows_uncorrectable: remap_unc,
        remapped_rows_pending: remap_pending.map(|v| v != 0),
        remapped_rows_failure: remap_failure.map(|v| v != 0),
        throttle_hw_slowdown: has(ThrottleReasons::HW_SLOWDOWN),
        throttle_thermal: has(
            ThrottleReasons::SW_THERMAL_SLOWDOWN | ThrottleReasons::HW_THERMAL_SLOWDOWN
        ),
        throttle_power_brake: has(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN),
        pcie_link_gen_current: r.get("pcie_link_gen", dev.current_pcie_link_gen()),
        pcie_link_gen_max: r.get("max_pcie_link_gen", dev.max_pcie_link_gen()),
        pcie_link_width_current: r.get("pcie_link_width", dev.current_pcie_link_width()),
        pcie_link_width_max: r.get("max_pcie_link_width", dev.max_pcie_link_width()),
        pcie_replay_counter: r
            .get("pcie_replay_counter", dev.pcie_replay_counter())
            .map(u64::from),
        nvlinks,
        persistence_mode: r.get("persistence_mode", dev.is_in_persistent_mode()),
        observed_at_unix_ms,
        nvlink_supported,
    }
}

/// The field values read in one call, named as NVML's `NVML_FI_DEV_*` constants.
const FIELDS: [(u32, &str); 5] = [
    (NVML_FI_DEV_MEMORY_TEMP, "field MEMORY_TEMP"),
    (NVML_FI_DEV_REMAPPED_COR, "field REMAPPED_COR"),
    (NVML_FI_DEV_REMAPPED_UNC, "field REMAPPED_UNC"),
    (NVML_FI_DEV_REMAPPED_PENDING, "field REMAPPED_PENDING"),
    (NVML_FI_DEV_REMAPPED_FAILURE, "field REMAPPED_FAILURE"),
];

/// Memory temperature and row remapping, which nvml-wrapper exposes only as field values.
fn field_values(r: &Reader, dev: &Device<'_>) -> [Option<u64>; 5] {
    let ids = FIELDS.map(|(id, _)| FieldId(id));
    let mut out = [None; 5];
    let Some(values) = r.get("field_values", dev.field_values_for(&ids)) else {
        return out;
    };
    for ((slot, value), (_, name)) in out.iter_mut().zip(values).zip(FIELDS) {
        *slot = r.get(name, value.and_then(|v| v.value)).and_then(as_u64);
    }
    out
}

fn as_u64(v: SampleValue) -> Option<u64> {
    match v {
        SampleValue::U32(x) => Some(u64::from(x)),
        SampleValue::U64(x) => Some(x),
        SampleValue::I64(x) => u64::try_from(x).ok(),
        SampleValue::F64(x) if x.is_finite() && x >= 0.0 => Some(x as u64),
        SampleValue::F64(_) => None,
    }
}

/// Links 0.. until NVML says there are no more; `nvlink_supported` is
/// `Some(false)` for a GPU without NVLink, `None` when NVML could not tell.
fn nvlinks(r: &Reader, dev: &Device<'_>) -> (Vec<NvLinkStatus>, Option<bool>) {
    let mut links = Vec::new();
    let mut first_error = None;
    for link in 0..MAX_NVLINKS {
        let wrapper = dev.link_wrapper_for(link);
        let active = match wrapper.is_active() {
            Ok(active) => active,
            // Past this GPU's last link.
            Err(NvmlError::InvalidArg) => break,
            Err(e) => {
                let why = classify(&e);
                r.unanswered.borrow_mut().push(Unanswered {
                    query: format!("nvlink {link} state"),
                    why,
                    error: e.to_string(),
                });
                if link == 0 {
                    first_error = Some(why);
                }
                match why {
                    Unavailable::Unsupported => break,
                    Unavailable::Lost => {
                        r.lost.set(true);
                        break;
                    }
                    Unavailable::Failed => {
                        debug!(gpu = r.index, link, error = %e, "NVLink state unreadable; link left out");
                        continue;
                    }
                }
            }
        };
        let count = |c: ErrorCounter| {
            r.get(
                &format!("nvlink {link} error counter {c:?}"),
                wrapper.error_counter(c),
            )
        };
        let crc_errors = match (
            count(ErrorCounter::DlCrcFlit),
            count(ErrorCounter::DlCrcData),
        ) {
            (Some(flit), Some(data)) => Some(flit.saturating_add(data)),
            (flit, data) => flit.or(data),
        };
        links.push(NvLinkStatus {
            link,
            active,
            crc_errors,
            replay_errors: count(ErrorCounter::DlReplay),
            recovery_errors: count(ErrorCounter::DlRecovery),
        });
    }
    let supported = match (links.is_empty(), first_error) {
        (false, _) => Some(true),
        (true, None | Some(Unavailable::Unsupported)) => Some(false),
        (true, Some(_)) => None,
    };
    (links, supported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_supported_and_missing_symbols_mean_absent() {
        for e in [
            NvmlError::NotSupported,
            NvmlError::FunctionNotFound,
            NvmlError::FailedToLoadSymbol("nvmlDeviceGetRemappedRows".into()),
        ] {
            assert_eq!(classify(&e), Unavailable::Unsupported, "{e:?}");
        }
        assert_eq!(classify(&NvmlError::GpuLost), Unavailable::Lost);
        for e in [
            NvmlError::Unknown,
            NvmlError::NoPermission,
            NvmlError::Timeout,
        ] {
            assert_eq!(classify(&e), Unavailable::Failed, "{e:?}");
        }
    }

    #[test]
    fn a_failed_field_is_absent_and_only_gpu_lost_marks_the_gpu() {
        let r = Reader::new(0);
        assert_eq!(r.get("x", Ok(3)), Some(3));
        assert_eq!(r.get::<u32>("x", Err(NvmlError::NotSupported)), None);
        assert_eq!(r.get::<u32>("x", Err(NvmlError::Unknown)), None);
        assert!(!r.lost.get());
        assert_eq!(r.get::<u32>("x", Err(NvmlError::GpuLost)), None);
        assert!(r.lost.get());
    }

    #[test]
    fn field_values_convert_without_inventing_numbers() {
        assert_eq!(as_u64(SampleValue::U32(7)), Some(7));
        assert_eq!(as_u64(SampleValue::U64(8)), Some(8));
        assert_eq!(as_u64(SampleValue::I64(-1)), None);
        assert_eq!(as_u64(SampleValue::F64(f64::NAN)), None);
        assert_eq!(as_u64(SampleValue::F64(41.0)), Some(41));
    }
}
