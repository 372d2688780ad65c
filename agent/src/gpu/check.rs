//! `vigil-agent --check-gpus`: one read of the configured backend, shown field by field.
//!
//! Every field the agent reads is listed, with its value or "not supported"
//! (the GPU or driver gave no value); the backend may add facts of its own
//! (driver versions, XID event registration) and, for each field without a
//! value, the query and the error NVML gave.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use super::nvml_fields::{Unanswered, Unavailable};
use super::{GpuBackend, GpuError, GpuInfo, GpuProbe, GpuSample, backend_label};

/// What a backend knows beyond inventory and samples; empty by default.
#[derive(Debug, Clone, Default)]
pub struct CheckDetails {
    /// Host-wide facts (driver, NVML and CUDA versions), in order.
    pub system: Vec<(String, String)>,
    /// Per GPU index.
    pub gpus: BTreeMap<u32, GpuDetails>,
}

#[derive(Debug, Clone, Default)]
pub struct GpuDetails {
    /// Facts outside the sample (modes, VBIOS, XID event support), in order.
    pub facts: Vec<(String, String)>,
    /// Every query that gave no value, and why.
    pub unanswered: Vec<Unanswered>,
}

/// One read of the backend: inventory, one sample per GPU, and the details.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub backend: GpuBackend,
    pub inventory: Vec<GpuInfo>,
    pub samples: Vec<GpuSample>,
    pub details: CheckDetails,
}

/// Reads `probe` once. Blocking (NVML talks to the driver).
pub fn run(probe: &dyn GpuProbe) -> Result<CheckReport, GpuError> {
    let inventory = probe.inventory()?;
    let samples = probe.sample()?;
    let details = probe.check_details();
    Ok(CheckReport {
        backend: probe.backend(),
        inventory,
        samples,
        details,
    })
}

/// Shown for a field without a value.
pub const NOT_SUPPORTED: &str = "not supported";

/// Every field of a sample, in the proto's order, units in the name; `None` = absent.
pub fn sample_fields(s: &GpuSample) -> Vec<(&'static str, Option<Value>)> {
    let f = |v: Option<f32>| v.map(|x| json!((f64::from(x) * 10.0).round() / 10.0));
    vec![
        ("temperature_c", f(s.temperature_c)),
        ("memory_temperature_c", f(s.memory_temperature_c)),
        ("power_w", f(s.power_w)),
        ("utilization_pct", s.utilization_pct.map(Value::from)),
        ("memory_used_bytes", s.memory_used_bytes.map(Value::from)),
        (
            "ecc_uncorrected_volatile",
            s.ecc_uncorrected_volatile.map(Value::from),
        ),
        (
            "ecc_corrected_volatile",
            s.ecc_corrected_volatile.map(Value::from),
        ),
        (
            "ecc_uncorrected_aggregate",
            s.ecc_uncorrected_aggregate.map(Value::from),
        ),
        (
            "ecc_corrected_aggregate",
            s.ecc_corrected_aggregate.map(Value::from),
        ),
        (
            "retired_pages_single_bit",
            s.retired_pages_single_bit.map(Value::from),
        ),
        (
            "retired_pages_double_bit",
            s.retired_pages_double_bit.map(Value::from),
        ),
        (
            "retired_pages_pending",
            s.retired_pages_pending.map(Value::from),
        ),
        (
            "remapped_rows_correctable",
            s.remapped_rows_correctable.map(Value::from),
        ),
        (
            "remapped_rows_uncorrectable",
            s.remapped_rows_uncorrectable.map(Value::from),
        ),
        (
            "remapped_rows_pending",
            s.remapped_rows_pending.map(Value::from),
        ),
        (
            "remapped_rows_failure",
            s.remapped_rows_failure.map(Value::from),
        ),
        (
            "throttle_hw_slowdown",
            s.throttle_hw_slowdown.map(Value::from),
        ),
        ("throttle_thermal", s.throttle_thermal.map(Value::from)),
        (
            "throttle_power_brake",
            s.throttle_power_brake.map(Value::from),
        ),
        (
            "pcie_link_gen_current",
            s.pcie_link_gen_current.map(Value::from),
        ),
        ("pcie_link_gen_max", s.pcie_link_gen_max.map(Value::from)),
        (
            "pcie_link_width_current",
            s.pcie_link_width_current.map(Value::from),
        ),
        (
            "pcie_link_width_max",
            s.pcie_link_width_max.map(Value::from),
        ),
        (
            "pcie_replay_counter",
            s.pcie_replay_counter.map(Value::from),
        ),
        ("persistence_mode", s.persistence_mode.map(Value::from)),
        ("nvlink_supported", s.nvlink_supported.map(Value::from)),
    ]
}

fn simulated(report: &CheckReport) -> bool {
    report.backend == GpuBackend::Simulated
}

/// The human-readable report.
pub fn render_text(report: &CheckReport) -> String {
    let mut out = String::new();
    let label = backend_label(report.backend);
    if simulated(report) {
        let _ = writeln!(
            out,
            "backend: {label} (SIMULATED: no real hardware was read; values are made up)"
        );
    } else {
        let _ = writeln!(out, "backend: {label}");
    }
    for (key, value) in &report.details.system {
        let _ = writeln!(out, "{key}: {value}");
    }
    let _ = writeln!(out, "gpus: {}", report.inventory.len());
    for gpu in &report.inventory {
        let _ = writeln!(out);
        let _ = writeln!(out, "GPU {}: {}", gpu.index, gpu.name);
        let serial = if gpu.serial.is_empty() {
            "none (the board has no serial)"
        } else {
            &gpu.serial
        };
        let rows = [
            ("uuid", gpu.uuid.clone()),
            ("serial", serial.to_owned()),
            ("pci_bus_id", gpu.pci_bus_id.clone()),
            ("memory_total_bytes", gpu.memory_total_bytes.to_string()),
        ];
        for (key, value) in rows {
            let _ = writeln!(out, "  {key:<28} {value}");
        }
        let details = report.details.gpus.get(&gpu.index);
        for (key, value) in details.map(|d| d.facts.as_slice()).unwrap_or_default() {
            let _ = writeln!(out, "  {key:<28} {value}");
        }
        let Some(sample) = report.samples.iter().find(|s| s.index == gpu.index) else {
            let _ = writeln!(out, "  no health sample (the GPU did not answer)");
            continue;
        };
        let _ = writeln!(out, "  health sample:");
        for (key, value) in sample_fields(sample) {
            let value = value.map_or_else(|| NOT_SUPPORTED.to_owned(), |v| v.to_string());
            let _ = writeln!(out, "    {key:<28} {value}");
        }
        if sample.nvlinks.is_empty() {
            let _ = writeln!(out, "    nvlinks                      none read");
        } else {
            let active = sample.nvlinks.iter().filter(|l| l.active).count();
            let _ = writeln!(
                out,
                "    nvlinks                      {} links, {active} active",
                sample.nvlinks.len()
            );
            let opt =
                |v: Option<u64>| v.map_or_else(|| NOT_SUPPORTED.to_owned(), |v| v.to_string());
            for l in &sample.nvlinks {
                let _ = writeln!(
                    out,
                    "      link {:<2} {:<8} crc_errors {} replay_errors {} recovery_errors {}",
                    l.link,
                    if l.active { "active" } else { "inactive" },
                    opt(l.crc_errors),
                    opt(l.replay_errors),
                    opt(l.recovery_errors),
                );
            }
        }
        let unanswered = details.map(|d| d.unanswered.as_slice()).unwrap_or_default();
        if !unanswered.is_empty() {
            let _ = writeln!(out, "  NVML queries without a value:");
            for u in unanswered {
                let _ = writeln!(out, "    {:<40} {}", u.query, why_text(u));
            }
        }
    }
    out
}

fn why_text(u: &Unanswered) -> String {
    match u.why {
        Unavailable::Unsupported => format!("{NOT_SUPPORTED} ({})", u.error),
        Unavailable::Lost => format!("GPU lost ({})", u.error),
        Unavailable::Failed => format!("error: {}", u.error),
    }
}

/// The machine-readable report: one JSON document; absent fields are `null`.
pub fn render_json(report: &CheckReport) -> Value {
    let system: Map<String, Value> = report
        .details
        .system
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    let gpus: Vec<Value> = report
        .inventory
        .iter()
        .map(|gpu| {
            let details = report.details.gpus.get(&gpu.index);
            let facts: Map<String, Value> = details
                .map(|d| d.facts.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect();
            let unanswered: Vec<Value> = details
                .map(|d| d.unanswered.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|u| {
                    json!({
                        "query": u.query,
                        "why": match u.why {
                            Unavailable::Unsupported => "not_supported",
                            Unavailable::Lost => "gpu_lost",
                            Unavailable::Failed => "error",
                        },
                        "error": u.error,
                    })
                })
                .collect();
            let sample = report.samples.iter().find(|s| s.index == gpu.index);
            let sample = sample.map_or(Value::Null, |s| {
                let mut fields: Map<String, Value> = sample_fields(s)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.unwrap_or(Value::Null)))
                    .collect();
                let links: Vec<Value> = s
                    .nvlinks
                    .iter()
                    .map(|l| {
                        json!({
                            "link": l.link,
                            "active": l.active,
                            "crc_errors": l.crc_errors,
                            "replay_errors": l.replay_errors,
                            "recovery_errors": l.recovery_errors,
                        })
                    })
                    .collect();
                fields.insert("nvlinks".to_owned(), Value::Array(links));
                fields.insert(
                    "observed_at_unix_ms".to_owned(),
                    Value::from(s.observed_at_unix_ms),
                );
                Value::Object(fields)
            });
            json!({
                "index": gpu.index,
                "name": gpu.name,
                "uuid": gpu.uuid,
                "serial": gpu.serial,
                "pci_bus_id": gpu.pci_bus_id,
                "memory_total_bytes": gpu.memory_total_bytes,
                "facts": facts,
                "sample": sample,
                "unanswered": unanswered,
            })
        })
        .collect();
    json!({
        "backend": backend_label(report.backend),
        "simulated": simulated(report),
        "system": system,
        "gpus": gpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::SimProbe;

    #[test]
    fn sim_report_is_labelled_and_lists_every_field() -> Result<(), GpuError> {
        let probe = SimProbe::new("check-node", 2);
        let report = run(&probe)?;
        let text = render_text(&report);
        assert!(text.contains("SIMULATED"), "{text}");
        assert!(text.contains("GPU 1: "), "{text}");
        for (name, _) in sample_fields(&GpuSample::default()) {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        let json = render_json(&report);
        assert_eq!(json["simulated"], Value::Bool(true));
        assert_eq!(json["gpus"].as_array().map(Vec::len), Some(2));
        assert!(json["gpus"][0]["sample"]["temperature_c"].is_number());
        Ok(())
    }

    #[test]
    fn absent_fields_read_not_supported_and_name_the_error() {
        let report = CheckReport {
            backend: GpuBackend::Nvml,
            inventory: vec![GpuInfo {
                index: 0,
                name: "GPU".into(),
                ..GpuInfo::default()
            }],
            samples: vec![GpuSample {
                index: 0,
                temperature_c: Some(31.0),
                ..GpuSample::default()
            }],
            details: CheckDetails {
                system: vec![("driver_version".into(), "580.1".into())],
                gpus: BTreeMap::from([(
                    0,
                    GpuDetails {
                        facts: Vec::new(),
                        unanswered: vec![Unanswered {
                            query: "retired_pages_sbe".into(),
                            why: Unavailable::Unsupported,
                            error: "not supported".into(),
                        }],
                    },
                )]),
            },
        };
        let text = render_text(&report);
        assert!(!text.contains("SIMULATED"), "{text}");
        assert!(text.contains("driver_version: 580.1"), "{text}");
        assert!(text.contains("temperature_c                31.0"), "{text}");
        assert!(
            text.contains("power_w                      not supported"),
            "{text}"
        );
        assert!(text.contains("retired_pages_sbe"), "{text}");
        assert!(text.contains("none (the board has no serial)"), "{text}");
        let json = render_json(&report);
        assert_eq!(json["gpus"][0]["sample"]["power_w"], Value::Null);
        assert_eq!(json["gpus"][0]["unanswered"][0]["why"], "not_supported");
    }
}
