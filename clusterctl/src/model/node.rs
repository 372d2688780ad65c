//! Nodes: the summary every listing shows, and one node's detail (GPUs, samples, health, workers).

use serde::Serialize;
use vigil_proto::v1;

use super::breaker::HeldCordon;
use super::enums::{Availability, Condition, CordonSource, GpuBackend, Scheduling};
use super::health::{Diagnostics, GpuHealth, NodeEvent};
use super::sample::GpuSample;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cordon {
    pub reason: String,
    pub source: CordonSource,
    pub since_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeSummary {
    pub name: String,
    pub state: String,
    pub availability: Availability,
    pub scheduling: Scheduling,
    pub cordon: Option<Cordon>,
    /// Set while the cordon breaker holds an automatic cordon of this node (it is not
    /// cordoned); `null` otherwise.
    pub held_cordon: Option<HeldCordon>,
    /// The remediation ladder ended in needs-repair: only `uncordon --force` lifts the cordon.
    pub needs_repair: bool,
    /// With `[slurm]`: a drain an administrator set in Slurm (source `slurm`, Slurm's reason),
    /// which vigil never lifts; `null` otherwise.
    pub slurm_drain: Option<SlurmDrain>,
    /// Worst condition of the node's GPUs (and of the node itself).
    pub condition: Condition,
    /// One line per rule that made the condition what it is.
    pub condition_reasons: Vec<String>,
    pub gpus_healthy: u32,
    pub gpus_total: u32,
    pub last_heartbeat_age_ms: Option<u64>,
    pub hostname: String,
    pub agent_version: String,
    pub gpu_backend: GpuBackend,
    /// Redundant with `gpu_backend`, so a script cannot miss simulated hardware.
    pub simulated: bool,
    pub availability_since_unix_ms: u64,
}

/// A drain set in Slurm, not by vigil.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlurmDrain {
    /// Always `slurm`: who set it.
    pub source: &'static str,
    pub reason: String,
}

impl From<v1::NodeSummary> for NodeSummary {
    fn from(n: v1::NodeSummary) -> Self {
        let gpu_backend = GpuBackend::from(n.gpu_backend);
        Self {
            name: n.name,
            state: n.state,
            availability: n.availability.into(),
            scheduling: n.scheduling.into(),
            cordon: n.cordon.map(|c| Cordon {
                reason: c.reason,
                source: c.source.into(),
                since_unix_ms: c.since_unix_ms,
            }),
            held_cordon: n.held_cordon.map(HeldCordon::from),
            needs_repair: n.needs_repair,
            slurm_drain: (!n.slurm_drain_reason.is_empty()).then_some(SlurmDrain {
                source: "slurm",
                reason: n.slurm_drain_reason,
            }),
            condition: n.condition.into(),
            condition_reasons: n.condition_reasons,
            gpus_healthy: n.gpus_healthy,
            gpus_total: n.gpus_total,
            last_heartbeat_age_ms: n.last_heartbeat_age_ms,
            hostname: n.hostname,
            agent_version: n.agent_version,
            gpu_backend,
            simulated: gpu_backend == GpuBackend::Simulated,
            availability_since_unix_ms: n.availability_since_unix_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeList {
    pub nodes: Vec<NodeSummary>,
}

impl From<v1::ListNodesResponse> for NodeList {
    fn from(r: v1::ListNodesResponse) -> Self {
        Self {
            nodes: r.nodes.into_iter().map(NodeSummary::from).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    pub memory_total_bytes: u64,
    pub serial: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Worker {
    pub job_id: String,
    pub attempt: u64,
    pub node_rank: u32,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeDetail {
    pub node: NodeSummary,
    pub gpus: Vec<Gpu>,
    pub samples: Vec<GpuSample>,
    pub workers: Vec<Worker>,
    pub first_registered_unix_ms: u64,
    pub last_registered_unix_ms: u64,
    /// The host holding the node name (`/etc/machine-id`) and its boot; empty for an agent
    /// that predates them.
    pub machine_id: String,
    pub boot_id: String,
    pub gpu_health: Vec<GpuHealth>,
    /// Newest last; the coordinator keeps the last 100.
    pub events: Vec<NodeEvent>,
    pub last_diagnostics: Option<Diagnostics>,
    /// The node's remediation ladder; `null` when it has none.
    pub remediation: Option<Remediation>,
    /// The fabric ports its agent watches, as last read; `[]` when none is known.
    pub fabric: Vec<FabricPort>,
}

/// One InfiniBand port or network interface; a value sysfs did not give is `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FabricPort {
    /// `infiniband` or `netdev`.
    pub kind: &'static str,
    pub device: String,
    /// The InfiniBand port number; 0 for a netdev.
    pub port: u32,
    pub state: String,
    pub phys_state: String,
    pub rate_mbps: Option<u64>,
    pub link_downed: Option<u64>,
    pub link_error_recovery: Option<u64>,
    pub symbol_error: Option<u64>,
    pub port_rcv_errors: Option<u64>,
    pub port_xmit_discards: Option<u64>,
    pub carrier_changes: Option<u64>,
}

impl From<v1::FabricPort> for FabricPort {
    fn from(p: v1::FabricPort) -> Self {
        Self {
            kind: match p.kind() {
                v1::FabricKind::Netdev => "netdev",
                _ => "infiniband",
            },
            device: p.device,
            port: p.port,
            state: p.state,
            phys_state: p.phys_state,
            rate_mbps: p.rate_mbps,
            link_downed: p.link_downed,
            link_error_recovery: p.link_error_recovery,
            symbol_error: p.symbol_error,
            port_rcv_errors: p.port_rcv_errors,
            port_xmit_discards: p.port_xmit_discards,
            carrier_changes: p.carrier_changes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Remediation {
    pub summary: String,
    pub needs_repair: bool,
    /// Oldest first.
    pub steps: Vec<RemediationStep>,
    pub marks: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemediationStep {
    pub at_unix_ms: u64,
    /// gpu_reset, reboot, needs_repair.
    pub action: String,
    pub gpu_index: u32,
    /// pending, ok, failed, no_answer, cordoned, held.
    pub outcome: String,
    pub xid: u32,
}

impl From<v1::Remediation> for Remediation {
    fn from(r: v1::Remediation) -> Self {
        Self {
            summary: r.summary,
            needs_repair: r.needs_repair,
            steps: r
                .steps
                .into_iter()
                .map(|s| RemediationStep {
                    at_unix_ms: s.at_unix_ms,
                    action: s.action,
                    gpu_index: s.gpu_index,
                    outcome: s.outcome,
                    xid: s.xid,
                })
                .collect(),
            marks: r.marks,
        }
    }
}

impl NodeDetail {
    /// The sample for GPU `index`, if the node has reported one.
    pub fn sample(&self, index: u32) -> Option<&GpuSample> {
        self.samples.iter().find(|s| s.index == index)
    }

    /// The coordinator's judgement of GPU `index`, if it sent one.
    pub fn health(&self, index: u32) -> Option<&GpuHealth> {
        self.gpu_health.iter().find(|h| h.index == index)
    }

    /// Maps a `GetNode` answer; `name` fills the summary if a server ever omits it.
    pub fn from_proto(d: v1::NodeDetail, name: &str) -> Self {
        let summary = d.summary.unwrap_or_else(|| v1::NodeSummary {
            name: name.to_string(),
            ..Default::default()
        });
        Self {
            node: summary.into(),
            gpus: d
                .gpus
                .into_iter()
                .map(|g| Gpu {
                    index: g.index,
                    uuid: g.uuid,
                    name: g.name,
                    pci_bus_id: g.pci_bus_id,
                    memory_total_bytes: g.memory_total_bytes,
                    serial: g.serial,
                })
                .collect(),
            samples: d.last_samples.into_iter().map(GpuSample::from).collect(),
            workers: d
                .workers
                .into_iter()
                .map(|w| Worker {
                    job_id: w.job_id,
                    attempt: w.attempt,
                    node_rank: w.node_rank,
                    pid: w.pid,
                })
                .collect(),
            first_registered_unix_ms: d.first_registered_unix_ms,
            last_registered_unix_ms: d.last_registered_unix_ms,
            machine_id: d.machine_id,
            boot_id: d.boot_id,
            gpu_health: d.gpu_health.into_iter().map(GpuHealth::from).collect(),
            events: d.events.into_iter().map(NodeEvent::from).collect(),
            last_diagnostics: d.last_diagnostics.map(Diagnostics::from),
            remediation: d.remediation.map(Remediation::from),
            fabric: d.fabric.into_iter().map(FabricPort::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures;
    use serde_json::json;

    #[test]
    fn node_summary_json_has_the_documented_shape() {
        let node = NodeSummary::from(fixtures::cordoned_sim_node());
        let value = serde_json::to_value(&node).expect("serializes");
        assert_eq!(
            value,
            json!({
                "name": "gpu-003",
                "state": "Cordoned",
                "availability": "Ready",
                "scheduling": "Cordoned",
                "cordon": {"reason": "bad fan", "source": "operator", "since_unix_ms": 1_000_000},
                "held_cordon": null,
                "needs_repair": false,
                "slurm_drain": null,
                "condition": "Degraded",
                "condition_reasons": ["gpu 7: 3 uncorrectable ECC errors"],
                "gpus_healthy": 7,
                "gpus_total": 8,
                "last_heartbeat_age_ms": 400,
                "hostname": "host-3",
                "agent_version": "0.1.0",
                "gpu_backend": "simulated",
                "simulated": true,
                "availability_since_unix_ms": 900_000,
            })
        );
    }

    #[test]
    fn absent_cordon_and_heartbeat_are_null() {
        let value = serde_json::to_value(NodeSummary::from(fixtures::ready_nvml_node("n1")))
            .expect("serializes");
        assert_eq!(value["cordon"], json!(null));
        assert_eq!(value["last_heartbeat_age_ms"], json!(null));
        assert_eq!(value["gpu_backend"], json!("nvml"));
        assert_eq!(value["simulated"], json!(false));
        assert_eq!(value["condition"], json!("Healthy"));
        assert_eq!(value["condition_reasons"], json!([]));
    }

    #[test]
    fn a_held_cordon_carries_its_rule_and_evidence() {
        let value =
            serde_json::to_value(NodeSummary::from(fixtures::held_node())).expect("serializes");
        assert_eq!(value["cordon"], json!(null));
        assert_eq!(value["held_cordon"]["node"], json!("gpu-012"));
        assert_eq!(value["held_cordon"]["rule"], json!("xid"));
        assert_eq!(value["held_cordon"]["since_unix_ms"], json!(1_000_000));
        assert!(
            value["held_cordon"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("cordon held: breaker open (")),
            "{value}"
        );
    }

    #[test]
    fn unknown_enum_values_map_to_unknown() {
        let mut raw = fixtures::cordoned_sim_node();
        raw.availability = 42;
        raw.scheduling = 0;
        raw.gpu_backend = -1;
        raw.condition = 7;
        if let Some(c) = raw.cordon.as_mut() {
            c.source = 9;
        }
        let value = serde_json::to_value(NodeSummary::from(raw)).expect("serializes");
        assert_eq!(value["availability"], json!("Unknown"));
        assert_eq!(value["scheduling"], json!("Unknown"));
        assert_eq!(value["gpu_backend"], json!("unknown"));
        assert_eq!(value["condition"], json!("Unknown"));
        assert_eq!(value["cordon"]["source"], json!("unknown"));
    }

    #[test]
    fn node_detail_json_keeps_unsupported_samples_null() {
        let detail = NodeDetail::from_proto(
            v1::NodeDetail {
                summary: Some(fixtures::ready_nvml_node("n1")),
                gpus: vec![v1::GpuInfo {
                    index: 0,
                    uuid: "GPU-0".into(),
                    name: "H100".into(),
                    pci_bus_id: "0000:01:00.0".into(),
                    memory_total_bytes: 80 << 30,
                    serial: "S0".into(),
                }],
                last_samples: vec![v1::GpuSample {
                    index: 0,
                    temperature_c: Some(45.5),
                    utilization_pct: Some(90),
                    ..Default::default()
                }],
                workers: vec![v1::WorkerInfo {
                    job_id: "j1".into(),
                    attempt: 2,
                    node_rank: 1,
                    pid: 4242,
                    ..Default::default()
                }],
                first_registered_unix_ms: 5,
                last_registered_unix_ms: 6,
                machine_id: "3f2a".into(),
                boot_id: "b1".into(),
                gpu_health: vec![v1::GpuHealth {
                    index: 0,
                    condition: v1::Condition::Degraded as i32,
                    reasons: vec!["temperature 91C above 85C".into()],
                }],
                events: vec![v1::NodeEvent {
                    at_unix_ms: 7,
                    kind: "xid".into(),
                    message: "Xid 79: GPU fell off the bus".into(),
                    gpu_index: Some(0),
                }],
                last_diagnostics: None,
                remediation: None,
                fabric: Vec::new(),
            },
            "n1",
        );
        let value = serde_json::to_value(&detail).expect("serializes");
        assert_eq!(value["node"]["name"], json!("n1"));
        assert_eq!(value["gpus"][0]["pci_bus_id"], json!("0000:01:00.0"));
        assert_eq!(value["samples"][0]["temperature_c"], json!(45.5));
        assert_eq!(value["samples"][0]["power_w"], json!(null));
        assert_eq!(value["samples"][0]["ecc_uncorrected_volatile"], json!(null));
        assert_eq!(
            value["workers"][0],
            json!({"job_id": "j1", "attempt": 2, "node_rank": 1, "pid": 4242})
        );
        assert_eq!(value["first_registered_unix_ms"], json!(5));
        assert_eq!(value["last_registered_unix_ms"], json!(6));
        assert_eq!(value["machine_id"], json!("3f2a"));
        assert_eq!(value["boot_id"], json!("b1"));
        assert_eq!(
            value["gpu_health"],
            json!([{"index": 0, "condition": "Degraded", "reasons": ["temperature 91C above 85C"]}])
        );
        assert_eq!(
            value["events"],
            json!([{"at_unix_ms": 7, "kind": "xid", "message": "Xid 79: GPU fell off the bus", "gpu_index": 0}])
        );
        assert_eq!(value["last_diagnostics"], json!(null));
    }

    #[test]
    fn node_detail_without_summary_keeps_the_asked_name() {
        let detail = NodeDetail::from_proto(v1::NodeDetail::default(), "n9");
        assert_eq!(detail.node.name, "n9");
        assert_eq!(detail.node.availability, Availability::Unknown);
    }
}
