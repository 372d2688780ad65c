//! One node in detail: summary, condition, cordon, registration, GPU tables, last diagnostics,
//! workers and events.

use super::gpu::{health_table, inventory_table};
use super::{DETAIL_LABEL_WIDTH, Labelled, or_dash, passed_or_failed};
use crate::model::{GpuBackend, NodeDetail};
use crate::table::{Table, format_age, format_elapsed, format_utc, format_when};
use crate::term::Term;

pub fn node_detail(d: &NodeDetail, now_ms: u64, term: Term) -> String {
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
    out.line("condition", n.condition.as_str());
    for reason in &n.condition_reasons {
        out.line("", format!("- {reason}"));
    }
    match &n.cordon {
        Some(c) => {
            out.line("cordon reason", &c.reason);
            out.line("cordon source", c.source.as_str());
            out.line("cordoned since", format_when(c.since_unix_ms, now_ms));
        }
        None => out.line("cordon", "none"),
    }
    if let Some(h) = &n.held_cordon {
        out.line(
            "cordon held",
            format!("{} (rule {})", super::nodes::HELD, h.rule),
        );
        out.line("held evidence", &h.evidence);
        out.line("held since", format_when(h.since_unix_ms, now_ms));
    }
    if let Some(drain) = &n.slurm_drain {
        out.line("slurm drain", format!("{} (source slurm)", drain.reason));
    }
    if let Some(r) = &d.remediation {
        out.line("remediation", &r.summary);
        for step in &r.steps {
            let gpu = if step.action == "gpu_reset" {
                format!(" GPU {}", step.gpu_index)
            } else {
                String::new()
            };
            out.line(
                "",
                format!(
                    "- {} {}{gpu} after XID {}: {}",
                    format_when(step.at_unix_ms, now_ms),
                    step.action,
                    step.xid,
                    step.outcome
                ),
            );
        }
    }
    out.line("hostname", or_dash(&n.hostname));
    // The host that holds the name: what a name clash or a replaced host is judged by.
    out.line(
        "host identity",
        match (d.machine_id.as_str(), d.boot_id.as_str()) {
            ("", _) => "- (agent predates host identity)".to_owned(),
            (m, "") => format!("machine-id {m}"),
            (m, b) => format!("machine-id {m}, boot {b}"),
        },
    );
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
    for section in [
        inventory_table(d),
        health_table(d, term),
        fabric_table(d),
        diagnostics_block(d, now_ms),
        worker_table(d),
        events_table(d, term),
    ] {
        if !section.is_empty() {
            out.push_str("\n");
            out.push_str(&section);
        }
    }
    out.finish()
}

/// The fabric ports the agent watches, one row each; nothing when none is known.
fn fabric_table(d: &NodeDetail) -> String {
    if d.fabric.is_empty() {
        return String::new();
    }
    let count = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
    let mut t = Table::with_headers(&[
        "PORT",
        "STATE",
        "PHYS",
        "RATE",
        "LINK-DOWNED",
        "ERR-RECOVERY",
        "CARRIER-CHANGES",
    ]);
    for p in &d.fabric {
        let port = if p.kind == "netdev" {
            p.device.clone()
        } else {
            format!("{}/{}", p.device, p.port)
        };
        t.push([
            port,
            or_dash(&p.state).to_string(),
            or_dash(&p.phys_state).to_string(),
            p.rate_mbps.map_or_else(
                || "-".to_string(),
                |m| format!("{} Gb/s", m as f64 / 1000.0),
            ),
            count(p.link_downed),
            count(p.link_error_recovery),
            count(p.carrier_changes),
        ]);
    }
    format!("FABRIC\n{}", t.render())
}

/// The last diagnostic run: result, when, what ran, what it found (the output: `-o json`).
fn diagnostics_block(d: &NodeDetail, now_ms: u64) -> String {
    let Some(diag) = &d.last_diagnostics else {
        return format!(
            "LAST DIAGNOSTICS: none (clusterctl diagnose {} runs them)\n",
            d.node.name
        );
    };
    let mut out = Labelled::new(DETAIL_LABEL_WIDTH);
    out.push_str("LAST DIAGNOSTICS\n");
    out.line(
        "result",
        format!(
            "{} in {}",
            passed_or_failed(diag.passed),
            format_elapsed(diag.duration_ms)
        ),
    );
    out.line("finished", format_when(diag.finished_at_unix_ms, now_ms));
    out.line("command", or_dash(&diag.command));
    out.line("summary", or_dash(&diag.summary));
    out.finish()
}

/// The node's history, newest last, as the coordinator keeps it.
fn events_table(d: &NodeDetail, term: Term) -> String {
    if d.events.is_empty() {
        return "EVENTS: none\n".to_string();
    }
    let mut t = Table::with_headers(&["TIME", "KIND", "GPU", "MESSAGE"]).fit(term.width);
    for e in &d.events {
        t.push([
            format_utc(e.at_unix_ms),
            or_dash(&e.kind).to_string(),
            e.gpu_index
                .map_or_else(|| "-".to_string(), |i| i.to_string()),
            e.message.clone(),
        ]);
    }
    format!("EVENTS (newest last)\n{}", t.render())
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

    fn sim_detail() -> NodeDetail {
        NodeDetail::from_proto(
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
                    ecc_uncorrected_aggregate: Some(0),
                    pcie_link_gen_current: Some(5),
                    pcie_link_width_current: Some(8),
                    pcie_link_width_max: Some(16),
                    ..Default::default()
                }],
                workers: vec![v1::WorkerInfo {
                    job_id: "opt-demo".into(),
                    attempt: 3,
                    node_rank: 0,
                    pid: 4242,
                    ..Default::default()
                }],
                first_registered_unix_ms: 0,
                last_registered_unix_ms: 1_000_000,
                machine_id: "3f2a9c1d".into(),
                boot_id: "b007".into(),
                gpu_health: vec![v1::GpuHealth {
                    index: 0,
                    condition: v1::Condition::Degraded as i32,
                    reasons: vec!["PCIe link x8, expected x16".into()],
                }],
                events: vec![
                    v1::NodeEvent {
                        at_unix_ms: 1_000_000,
                        kind: "cordon".into(),
                        message: "cordoned by operator: bad fan".into(),
                        gpu_index: None,
                    },
                    v1::NodeEvent {
                        at_unix_ms: 1_060_000,
                        kind: "xid".into(),
                        message: "Xid 48: double-bit ECC error".into(),
                        gpu_index: Some(1),
                    },
                ],
                last_diagnostics: Some(v1::DiagnosticsRecord {
                    node: "gpu-003".into(),
                    passed: false,
                    summary: "gpu 1: memory test failed".into(),
                    output: "lots of output".into(),
                    duration_ms: 12_345,
                    command: "builtin NVML self-check".into(),
                    finished_at_unix_ms: 1_000_000,
                }),
                remediation: None,
                fabric: Vec::new(),
            },
            "gpu-003",
        )
    }

    #[test]
    fn node_detail_flags_simulation_and_unsupported_fields() {
        let text = node_detail(&sim_detail(), NOW, Term::PLAIN);
        assert!(text.starts_with("SIMULATED: "), "{text}");
        assert!(text.contains("gpu backend     SIMULATED (no real hardware)\n"));
        assert!(text.contains(
            "condition       Degraded\n                - gpu 7: 3 uncorrectable ECC errors\n"
        ));
        assert!(text.contains("cordon reason   bad fan\n"));
        assert!(text.contains("cordon source   operator\n"));
        assert!(text.contains("cordoned since  1970-01-01 00:16:40Z (12m ago)\n"));
        assert!(text.contains("registered      first -, last 1970-01-01 00:16:40Z (12m ago)\n"));
        assert!(
            text.contains("host identity   machine-id 3f2a9c1d, boot b007\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "GPUS (SIMULATED)\n\
                 INDEX   UUID        NAME             PCI-BUS        MEMORY\n\
                 0       GPU-sim-0   Simulated H100   0000:01:00.0   80.0 GiB\n\
                 1       -           -                -              0.0 GiB\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "GPU HEALTH (SIMULATED)\n\
                 INDEX   UUID        TEMP   POWER   UTIL   ECC   REMAP   THROTTLE   PCIE                NVLINK   CONDITION\n\
                 0       GPU-sim-0   45C    n/a     97%    0/0   n/a     n/a        gen5 x8 (max x16)   n/a      Degraded: PCIe link x8, expected x16\n\
                 1       -           -      -       -      -     -       -          -                   -        -\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "LAST DIAGNOSTICS\n\
                 result          FAILED in 12.3s\n\
                 finished        1970-01-01 00:16:40Z (12m ago)\n\
                 command         builtin NVML self-check\n\
                 summary         gpu 1: memory test failed\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "WORKERS\nJOB        ATTEMPT   NODE-RANK   PID\nopt-demo   3         0           4242\n"
        ));
        assert!(
            text.ends_with(
                "EVENTS (newest last)\n\
                 TIME                   KIND     GPU   MESSAGE\n\
                 1970-01-01 00:16:40Z   cordon   -     cordoned by operator: bad fan\n\
                 1970-01-01 00:17:40Z   xid      1     Xid 48: double-bit ECC error\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn node_detail_shows_the_fabric_ports_only_where_some_are_known() {
        let mut detail = sim_detail();
        assert!(!node_detail(&detail, NOW, Term::PLAIN).contains("FABRIC"));
        detail.fabric = vec![crate::model::node::FabricPort::from(v1::FabricPort {
            kind: v1::FabricKind::Infiniband.into(),
            device: "mlx5_0".into(),
            port: 1,
            state: "DOWN".into(),
            phys_state: "Disabled".into(),
            rate_mbps: Some(400_000),
            link_downed: Some(3),
            ..Default::default()
        })];
        let text = node_detail(&detail, NOW, Term::PLAIN);
        let fabric = text.split("FABRIC\n").nth(1).unwrap_or_default();
        let row = fabric.lines().nth(1).unwrap_or_default();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["mlx5_0/1", "DOWN", "Disabled", "400", "Gb/s", "3", "-", "-"],
            "{text}"
        );
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
        let text = node_detail(&detail, NOW, Term::PLAIN);
        assert!(!text.contains("SIMULATED"));
        assert!(text.contains("condition       Healthy\ncordon          none\n"));
        assert!(text.contains("GPUS: none reported\n"));
        assert!(!text.contains("GPU HEALTH"));
        assert!(text.contains("LAST DIAGNOSTICS: none (clusterctl diagnose n1 runs them)\n"));
        assert!(text.contains("WORKERS: none\n"));
        assert!(text.ends_with("EVENTS: none\n"));
    }

    #[test]
    fn node_detail_shows_a_held_cordon_with_its_evidence() {
        let detail = NodeDetail::from_proto(
            v1::NodeDetail {
                summary: Some(crate::model::fixtures::held_node()),
                ..Default::default()
            },
            "gpu-012",
        );
        let text = node_detail(&detail, NOW, Term::PLAIN);
        assert!(
            text.contains(
                "cordon          none
\
                 cordon held     cordon held: breaker open (rule xid)
\
                 held evidence   XID 79 (GPU has fallen off the bus) on GPU 0 (GPU-held-0)
\
                 held since      1970-01-01 00:16:40Z (12m ago)
"
            ),
            "{text}"
        );
        let plain = node_detail(&sim_detail(), NOW, Term::PLAIN);
        assert!(!plain.contains("cordon held"), "{plain}");
    }

    #[test]
    fn node_detail_shows_the_remediation_ladder_and_needs_repair() {
        let step = |at, action: &str, outcome: &str| v1::RemediationStep {
            at_unix_ms: at,
            action: action.into(),
            gpu_index: 1,
            outcome: outcome.into(),
            xid: 48,
        };
        let detail = NodeDetail::from_proto(
            v1::NodeDetail {
                summary: Some(v1::NodeSummary {
                    needs_repair: true,
                    ..ready_nvml_node("n1")
                }),
                remediation: Some(v1::Remediation {
                    summary: "needs repair: XID 48 on GPU 1 after XID 48 4 times in 24h".into(),
                    needs_repair: true,
                    steps: vec![
                        step(1_000_000, "gpu_reset", "ok"),
                        step(1_060_000, "reboot", "ok"),
                        step(1_120_000, "needs_repair", "cordoned"),
                    ],
                    marks: 4,
                }),
                ..Default::default()
            },
            "n1",
        );
        let text = node_detail(&detail, NOW, Term::PLAIN);
        assert!(
            text.contains(
                "remediation     needs repair: XID 48 on GPU 1 after XID 48 4 times in 24h\n\
                 \x20               - 1970-01-01 00:16:40Z (12m ago) gpu_reset GPU 1 after XID 48: ok\n\
                 \x20               - 1970-01-01 00:17:40Z (11m ago) reboot after XID 48: ok\n\
                 \x20               - 1970-01-01 00:18:40Z (10m ago) needs_repair after XID 48: cordoned\n"
            ),
            "{text}"
        );
        assert!(detail.node.needs_repair);
        let plain = node_detail(&sim_detail(), NOW, Term::PLAIN);
        assert!(!plain.contains("remediation"), "{plain}");
    }
}
