//! Per-GPU Prometheus gauges, named and labelled so dcgm-exporter users recognise them.
//!
//! A collector, not registered gauges: each scrape encodes the latest
//! sample as it is, so a field a GPU cannot report is simply not exported
//! (never a stale value or a fake zero) and a lost GPU's series disappear.
//! The list, with dcgm-exporter equivalents, is in `agent/METRICS.md`.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use vigil_proto::v1::{GpuInfo, GpuSample};

/// `gpu`, `UUID`, `modelName`, `Hostname`, `simulated`, as dcgm-exporter labels a GPU.
type Labels = Vec<(&'static str, String)>;

/// Reads one value of a sample; `None` means "not exported for this GPU".
type Read = fn(&GpuSample) -> Option<f64>;

/// One gauge: a name, its help, and one series per extra label value (or a single unlabelled one).
struct Gauge {
    name: &'static str,
    help: &'static str,
    label: Option<&'static str>,
    series: &'static [(&'static str, Read)],
}

const fn single(
    name: &'static str,
    help: &'static str,
    series: &'static [(&'static str, Read)],
) -> Gauge {
    Gauge {
        name,
        help,
        label: None,
        series,
    }
}

fn flag(v: Option<bool>) -> Option<f64> {
    v.map(|b| if b { 1.0 } else { 0.0 })
}

/// The f32 as the decimal it prints as: NVML's 81184 mW is 81.184 W, not the
/// 81.18399810791016 a plain widening shows (seen on an H200's /metrics).
fn float(v: Option<f32>) -> Option<f64> {
    v.map(|x| x.to_string().parse().unwrap_or(f64::from(x)))
}

fn count(v: Option<u64>) -> Option<f64> {
    v.map(|n| n as f64)
}

/// Only for a GPU with NVLink (the protocol's `gpu_sample::nvlinks`).
fn nvlinks(s: &GpuSample, active: bool) -> Option<f64> {
    vigil_proto::gpu_sample::nvlinks(s)
        .map(|links| links.iter().filter(|l| l.active == active).count() as f64)
}

const GAUGES: &[Gauge] = &[
    single(
        "vigil_gpu_temp_celsius",
        "GPU temperature (DCGM_FI_DEV_GPU_TEMP)",
        &[("", |s| float(s.temperature_c))],
    ),
    single(
        "vigil_gpu_memory_temp_celsius",
        "GPU memory (HBM) temperature (DCGM_FI_DEV_MEMORY_TEMP)",
        &[("", |s| float(s.memory_temperature_c))],
    ),
    single(
        "vigil_gpu_power_usage_watts",
        "Power draw (DCGM_FI_DEV_POWER_USAGE)",
        &[("", |s| float(s.power_w))],
    ),
    single(
        "vigil_gpu_utilization_ratio",
        "GPU utilization, 0 to 1 (DCGM_FI_DEV_GPU_UTIL / 100)",
        &[("", |s| s.utilization_pct.map(|p| f64::from(p) / 100.0))],
    ),
    single(
        "vigil_gpu_memory_used_bytes",
        "Frame buffer used (DCGM_FI_DEV_FB_USED, in bytes)",
        &[("", |s| count(s.memory_used_bytes))],
    ),
    single(
        "vigil_gpu_ecc_uncorrected_volatile",
        "Uncorrected ECC errors since the last driver load (DCGM_FI_DEV_ECC_DBE_VOL_TOTAL)",
        &[("", |s| count(s.ecc_uncorrected_volatile))],
    ),
    single(
        "vigil_gpu_ecc_corrected_volatile",
        "Corrected ECC errors since the last driver load (DCGM_FI_DEV_ECC_SBE_VOL_TOTAL)",
        &[("", |s| count(s.ecc_corrected_volatile))],
    ),
    single(
        "vigil_gpu_ecc_uncorrected_aggregate",
        "Uncorrected ECC errors over the GPU's life (DCGM_FI_DEV_ECC_DBE_AGG_TOTAL)",
        &[("", |s| count(s.ecc_uncorrected_aggregate))],
    ),
    single(
        "vigil_gpu_ecc_corrected_aggregate",
        "Corrected ECC errors over the GPU's life (DCGM_FI_DEV_ECC_SBE_AGG_TOTAL)",
        &[("", |s| count(s.ecc_corrected_aggregate))],
    ),
    Gauge {
        name: "vigil_gpu_retired_pages",
        help: "Retired memory pages by cause (DCGM_FI_DEV_RETIRED_SBE / DCGM_FI_DEV_RETIRED_DBE)",
        label: Some("type"),
        series: &[
            ("single_bit", |s| count(s.retired_pages_single_bit)),
            ("double_bit", |s| count(s.retired_pages_double_bit)),
        ],
    },
    single(
        "vigil_gpu_retired_pages_pending",
        "1 if pages await retirement at the next reboot (DCGM_FI_DEV_RETIRED_PENDING)",
        &[("", |s| flag(s.retired_pages_pending))],
    ),
    Gauge {
        name: "vigil_gpu_remapped_rows",
        help: "Remapped memory rows by cause (DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS / DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS)",
        label: Some("type"),
        series: &[
            ("correctable", |s| count(s.remapped_rows_correctable)),
            ("uncorrectable", |s| count(s.remapped_rows_uncorrectable)),
        ],
    },
    single(
        "vigil_gpu_row_remap_pending",
        "1 if a row remap awaits a GPU reset (DCGM_FI_DEV_ROW_REMAP_PENDING)",
        &[("", |s| flag(s.remapped_rows_pending))],
    ),
    single(
        "vigil_gpu_row_remap_failure",
        "1 if a row remap failed: the GPU needs service (DCGM_FI_DEV_ROW_REMAP_FAILURE)",
        &[("", |s| flag(s.remapped_rows_failure))],
    ),
    Gauge {
        name: "vigil_gpu_throttle",
        help: "1 while clocks are held down for this reason (DCGM_FI_DEV_CLOCK_THROTTLE_REASONS bits)",
        label: Some("reason"),
        series: &[
            ("hw_slowdown", |s| flag(s.throttle_hw_slowdown)),
            ("thermal", |s| flag(s.throttle_thermal)),
            ("power_brake", |s| flag(s.throttle_power_brake)),
        ],
    },
    Gauge {
        name: "vigil_gpu_pcie_link_gen",
        help: "PCIe link generation, current and maximum (DCGM_FI_DEV_PCIE_LINK_GEN / DCGM_FI_DEV_PCIE_MAX_LINK_GEN)",
        label: Some("kind"),
        series: &[
            ("current", |s| s.pcie_link_gen_current.map(f64::from)),
            ("max", |s| s.pcie_link_gen_max.map(f64::from)),
        ],
    },
    Gauge {
        name: "vigil_gpu_pcie_link_width",
        help: "PCIe link width in lanes, current and maximum (DCGM_FI_DEV_PCIE_LINK_WIDTH / DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH)",
        label: Some("kind"),
        series: &[
            ("current", |s| s.pcie_link_width_current.map(f64::from)),
            ("max", |s| s.pcie_link_width_max.map(f64::from)),
        ],
    },
    single(
        "vigil_gpu_pcie_replay_counter",
        "PCIe replays, NVML's counter (DCGM_FI_DEV_PCIE_REPLAY_COUNTER)",
        &[("", |s| count(s.pcie_replay_counter))],
    ),
    Gauge {
        name: "vigil_gpu_nvlinks",
        help: "NVLinks by state (cf. DCGM_FI_DEV_NVLINK_LINK_STATUS / dcgmi nvlink -s)",
        label: Some("state"),
        series: &[
            ("active", |s| nvlinks(s, true)),
            ("down", |s| nvlinks(s, false)),
        ],
    },
    single(
        "vigil_gpu_persistence_mode",
        "1 if persistence mode is on (DCGM_FI_DEV_PERSISTENCE_MODE)",
        &[("", |s| flag(s.persistence_mode))],
    ),
];

/// The latest sample of every GPU, encoded at each scrape.
#[derive(Debug)]
pub struct GpuCollector {
    /// (labels, sample) per GPU present in the last sample.
    latest: Mutex<Vec<(Labels, GpuSample)>>,
    inventory: Vec<GpuInfo>,
    hostname: String,
    simulated: bool,
}

impl GpuCollector {
    pub fn new(inventory: &[GpuInfo], hostname: &str, simulated: bool) -> Arc<Self> {
        Arc::new(Self {
            latest: Mutex::new(Vec::new()),
            inventory: inventory.to_vec(),
            hostname: hostname.to_owned(),
            simulated,
        })
    }

    /// Replaces the previous sample: GPUs missing from `samples` stop being exported.
    pub fn observe(&self, samples: &[GpuSample]) {
        let latest = samples
            .iter()
            .filter_map(|s| {
                let gpu = self.inventory.iter().find(|g| g.index == s.index)?;
                let labels = vec![
                    ("gpu", s.index.to_string()),
                    ("UUID", gpu.uuid.clone()),
                    ("modelName", gpu.name.clone()),
                    ("Hostname", self.hostname.clone()),
                    ("simulated", self.simulated.to_string()),
                ];
                Some((labels, s.clone()))
            })
            .collect();
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = latest;
    }
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        for gauge in GAUGES {
            let values: Vec<_> = latest
                .iter()
                .flat_map(|(labels, sample)| {
                    gauge
                        .series
                        .iter()
                        .filter_map(move |(extra, read)| Some((labels, *extra, read(sample)?)))
                })
                .collect();
            if values.is_empty() {
                continue;
            }
            let mut metric =
                encoder.encode_descriptor(gauge.name, gauge.help, None, MetricType::Gauge)?;
            for (labels, extra, value) in values {
                let extra: Vec<(&str, &str)> =
                    gauge.label.map(|key| (key, extra)).into_iter().collect();
                let label_set = (labels.as_slice(), extra);
                ConstGauge::new(value).encode(metric.encode_family(&label_set)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_gauges_keep_the_value_nvml_gave() {
        // NVML gave 81184 mW on an H200; the sample holds 81.184_f32.
        let mw: u32 = 81_184;
        let w = mw as f32 / 1000.0;
        assert_eq!(float(Some(w)), Some(81.184));
        assert_eq!(float(Some(37.0)), Some(37.0));
        assert_eq!(float(None), None);
    }

    #[test]
    fn nvlink_gauges_are_left_out_for_a_gpu_without_nvlink() {
        let link = |active| vigil_proto::v1::NvLinkStatus {
            active,
            ..Default::default()
        };
        let mut s = GpuSample {
            nvlinks: vec![link(true), link(false)],
            nvlink_supported: Some(true),
            ..Default::default()
        };
        assert_eq!(
            (nvlinks(&s, true), nvlinks(&s, false)),
            (Some(1.0), Some(1.0))
        );
        s.nvlink_supported = Some(false);
        assert_eq!((nvlinks(&s, true), nvlinks(&s, false)), (None, None));
        assert_eq!(nvlinks(&GpuSample::default(), true), None);
    }
}
