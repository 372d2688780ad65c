//! One node in detail: summary, cordon, registration, per-GPU table, workers.

use super::{DETAIL_LABEL_WIDTH, Labelled, or_dash};
use crate::model::{GpuBackend, GpuSample, NodeDetail};
use crate::table::{Table, format_age, format_gib, format_when};

/// Shown for a field the GPU or driver does not support.
const NOT_SUPPORTED: &str = "n/a";

pub fn node_detail(d: &NodeDetail, now_ms: u64) -> String {
    let n = &d.node;
    let mut out = Labelled::new(DETAIL_LABEL_WIDTH);
    if n.simulated {
        out.push_str("SIMULATED: this node's GPUs are simulated, not real hardware\n\n");
    }
    out.line("node", &n.name);
    out.line("state", or_dash(&n.state));
    out.line(
        "availability",
        format!(
            "{} since {}",
            n.availability.as_str(),
            format_when(n.availability_since_unix_ms, now_ms)
        ),
    );
    out.line("scheduling", n.scheduling.as_str());
    match &n.cordon {
        Some(c) => {
            out.line("cordon reason", &c.reason);
            out.line("cordon source", c.source.as_str());
            out.line("cordoned since", format_when(c.since_unix_ms, now_ms));
        }
        None => out.line("cordon", "none"),
    }
    out.line("hostname", or_dash(&n.hostname));
    out.line("agent version", or_dash(&n.agent_version));
    let backend = match n.gpu_backend {
        GpuBackend::Nvml => "nvml",
        GpuBackend::Simulated => "SIMULATED (no real hardware)",
        GpuBackend::Unknown => "unknown",
    };
    out.line("gpu backend", backend);
    out.line(
        "gpus",
        format!("{}/{} healthy", n.gpus_healthy, n.gpus_total),
    );
    let heartbeat = match n.last_heartbeat_age_ms {
        Some(ms) => format!("{} ago", format_age(ms)),
        None => "- (not heard from since the coordinator started)".to_string(),
    };
    out.line("last heartbeat", heartbeat);
    out.line(
        "registered",
        format!(
            "first {}, last {}",
            format_when(d.first_registered_unix_ms, now_ms),
            format_when(d.last_registered_unix_ms, now_ms)
        ),
    );
    out.push_str("\n");
    out.push_str(&gpu_table(d));
    out.push_str("\n");
    out.push_str(&worker_table(d));
    out.finish()
}

fn gpu_table(d: &NodeDetail) -> String {
    if d.gpus.is_empty() {
        return "GPUS: none reported\n".to_string();
    }
    let title = if d.node.simulated {
        "GPUS (SIMULATED)\n"
    } else {
        "GPUS\n"
    };
    let mut t = Table::with_headers(&[
        "INDEX",
        "UUID",
        "NAME",
        "PCI-BUS",
        "MEMORY",
        "TEMP",
        "POWER",
        "UTIL",
        "ECC-UNCORR",
    ]);
    for g in &d.gpus {
        let [temp, power, util, ecc] = sample_cells(d.sample(g.index));
        t.push([
            g.index.to_string(),
            or_dash(&g.uuid).to_string(),
            or_dash(&g.name).to_string(),
            or_dash(&g.pci_bus_id).to_string(),
            format_gib(g.memory_total_bytes),
            temp,
            power,
            util,
            ecc,
        ]);
    }
    format!("{title}{}", t.render())
}

/// TEMP, POWER, UTIL and ECC-UNCORR: `n/a` where unsupported, `-` where no sample arrived yet.
fn sample_cells(sample: Option<&GpuSample>) -> [String; 4] {
    match sample {
        None => std::array::from_fn(|_| "-".to_string()),
        Some(s) => [
            opt(s.temperature_c, |v| format!("{v:.0}C")),
            opt(s.power_w, |v| format!("{v:.0}W")),
            opt(s.utilization_pct, |v| format!("{v}%")),
            opt(s.ecc_uncorrected_volatile, |v| v.to_string()),
        ],
    }
}

fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| NOT_SUPPORTED.to_string(), show)
}

fn worker_table(d: &NodeDetail) -> String {
    if d.workers.is_empty() {
        return "WORKERS: none\n".to_string();
    }
    let mut t = Table::with_headers(&["JOB", "ATTEMPT", "NODE-RANK", "PID"]);
    for w in &d.workers {
        t.push([
            w.job_id.clone(),
            w.attempt.to_string(),
            w.node_rank.to_string(),
            w.pid.to_string(),
        ]);
    }
    format!("WORKERS\n{}", t.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{cordoned_sim_node, ready_nvml_node};
    use vigil_proto::v1;

    const NOW: u64 = 1_000_000 + 12 * 60_000;

    #[test]
    fn node_detail_flags_simulation_and_unsupported_fields() {
        let detail = NodeDetail::from_proto(
            v1::NodeDetail {
                summary: Some(cordoned_sim_node()),
                gpus: vec![
                    v1::GpuInfo {
                        index: 0,
                        uuid: "GPU-sim-0".into(),
                        name: "Simulated H100".into(),
                        pci_bus_id: "0000:01:00.0".into(),
                        memory_total_bytes: 80 << 30,
                        serial: String::new(),
                    },
                    v1::GpuInfo {
                        index: 1,
                        ..Default::default()
                    },
                ],
                last_samples: vec![v1::GpuSample {
                    index: 0,
                    temperature_c: Some(45.4),
                    power_w: None,
                    utilization_pct: Some(97),
                    ecc_uncorrected_volatile: Some(0),
                    ..Default::default()
                }],
                workers: vec![v1::WorkerInfo {
                    job_id: "opt-demo".into(),
                    attempt: 3,
                    node_rank: 0,
                    pid: 4242,
                }],
                first_registered_unix_ms: 0,
                last_registered_unix_ms: 1_000_000,
            },
            "gpu-003",
        );
        let text = node_detail(&detail, NOW);
        assert!(text.starts_with("SIMULATED: "), "{text}");
        assert!(text.contains("gpu backend     SIMULATED (no real hardware)\n"));
        assert!(text.contains("cordon reason   bad fan\n"));
        assert!(text.contains("cordon source   operator\n"));
        assert!(text.contains("cordoned since  1970-01-01 00:16:40Z (12m ago)\n"));
        assert!(text.contains("registered      first -, last 1970-01-01 00:16:40Z (12m ago)\n"));
        assert!(text.contains("GPUS (SIMULATED)\n"));
        assert!(text.contains(
            "0       GPU-sim-0   Simulated H100   0000:01:00.0   80.0 GiB   45C    n/a     97%    0\n"
        ), "{text}");
        assert!(text.contains("1       -           -                -              0.0 GiB    -      -       -      -\n"), "{text}");
        assert!(text.contains(
            "WORKERS\nJOB        ATTEMPT   NODE-RANK   PID\nopt-demo   3         0           4242\n"
        ));
    }

    #[test]
    fn node_detail_of_real_hardware_has_no_simulation_banner() {
        let detail = NodeDetail::from_proto(
            v1::NodeDetail {
                summary: Some(ready_nvml_node("n1")),
                ..Default::default()
            },
            "n1",
        );
        let text = node_detail(&detail, NOW);
        assert!(!text.contains("SIMULATED"));
        assert!(text.contains("cordon          none\n"));
        assert!(text.contains("GPUS: none reported\n"));
        assert!(text.contains("WORKERS: none\n"));
    }
}
