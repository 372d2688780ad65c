//! Nodes: the summary every listing shows, and one node's detail (GPUs, samples, workers).

use serde::Serialize;
use vigil_proto::v1;

use super::enums::{Availability, CordonSource, GpuBackend, Scheduling};

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

/// The last health sample of one GPU; `None` (JSON null) means "not supported", never zero.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSample {
    pub index: u32,
    pub temperature_c: Option<f32>,
    pub power_w: Option<f32>,
    pub utilization_pct: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub ecc_uncorrected_volatile: Option<u64>,
    pub ecc_corrected_volatile: Option<u64>,
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
}

impl NodeDetail {
    /// The sample for GPU `index`, if the node has reported one.
    pub fn sample(&self, index: u32) -> Option<&GpuSample> {
        self.samples.iter().find(|s| s.index == index)
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
            samples: d
                .last_samples
                .into_iter()
                .map(|s| GpuSample {
                    index: s.index,
                    temperature_c: s.temperature_c,
                    power_w: s.power_w,
                    utilization_pct: s.utilization_pct,
                    memory_used_bytes: s.memory_used_bytes,
                    ecc_uncorrected_volatile: s.ecc_uncorrected_volatile,
                    ecc_corrected_volatile: s.ecc_corrected_volatile,
                })
                .collect(),
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
    }

    #[test]
    fn unknown_enum_values_map_to_unknown() {
        let mut raw = fixtures::cordoned_sim_node();
        raw.availability = 42;
        raw.scheduling = 0;
        raw.gpu_backend = -1;
        if let Some(c) = raw.cordon.as_mut() {
            c.source = 9;
        }
        let value = serde_json::to_value(NodeSummary::from(raw)).expect("serializes");
        assert_eq!(value["availability"], json!("Unknown"));
        assert_eq!(value["scheduling"], json!("Unknown"));
        assert_eq!(value["gpu_backend"], json!("unknown"));
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
                }],
                first_registered_unix_ms: 5,
                last_registered_unix_ms: 6,
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
    }

    #[test]
    fn node_detail_without_summary_keeps_the_asked_name() {
        let detail = NodeDetail::from_proto(v1::NodeDetail::default(), "n9");
        assert_eq!(detail.node.name, "n9");
        assert_eq!(detail.node.availability, Availability::Unknown);
    }
}
