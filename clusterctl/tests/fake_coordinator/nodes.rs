//! The fake's nodes: one cordoned by an operator, one cordoned automatically, one degraded.

use tonic::Status;
use vigil_proto::v1;

pub fn sim_node() -> v1::NodeSummary {
    v1::NodeSummary {
        name: "gpu-003".into(),
        state: "Cordoned".into(),
        availability: v1::Availability::Ready as i32,
        scheduling: v1::Scheduling::Cordoned as i32,
        cordon: Some(v1::Cordon {
            reason: "bad fan".into(),
            source: v1::CordonSource::Operator as i32,
            since_unix_ms: 1_700_000_000_000,
        }),
        gpus_healthy: 7,
        gpus_total: 8,
        last_heartbeat_age_ms: Some(400),
        hostname: "host-3".into(),
        agent_version: "0.1.0".into(),
        gpu_backend: v1::GpuBackend::Simulated as i32,
        availability_since_unix_ms: 1_700_000_000_000,
        condition: v1::Condition::Healthy as i32,
        condition_reasons: vec![],
        held_cordon: None,
        needs_repair: false,
        slurm_drain_reason: String::new(),
    }
}

/// Cordoned automatically: uncordoning it needs passed diagnostics or `--force`.
pub fn auto_node() -> v1::NodeSummary {
    v1::NodeSummary {
        name: "gpu-auto".into(),
        state: "Cordoned".into(),
        cordon: Some(v1::Cordon {
            reason: "gpu 2: Xid 79 (fell off the bus)".into(),
            source: v1::CordonSource::Auto as i32,
            since_unix_ms: 1_700_000_000_000,
        }),
        condition: v1::Condition::Unhealthy as i32,
        condition_reasons: vec!["gpu 2: Xid 79 (fell off the bus)".into()],
        gpu_backend: v1::GpuBackend::Nvml as i32,
        ..sim_node()
    }
}

pub fn hot_node() -> v1::NodeSummary {
    v1::NodeSummary {
        name: "gpu-hot".into(),
        state: "Degraded".into(),
        scheduling: v1::Scheduling::Schedulable as i32,
        cordon: None,
        condition: v1::Condition::Degraded as i32,
        condition_reasons: vec!["gpu 1: thermal throttling".into()],
        ..sim_node()
    }
}

pub fn diagnostics(node: &str, passed: bool, timeout_ms: u64) -> v1::DiagnosticsRecord {
    v1::DiagnosticsRecord {
        node: node.into(),
        passed,
        summary: if passed {
            format!("all checks passed (timeout_ms={timeout_ms})")
        } else {
            "gpu 2: not found by NVML".into()
        },
        output: "checked 8 GPUs\n".into(),
        duration_ms: 1_500,
        command: "builtin NVML self-check".into(),
        finished_at_unix_ms: 1_700_000_100_000,
    }
}

pub fn not_found(name: &str) -> Status {
    Status::not_found(format!(
        "node {name:?} not found (clusterctl nodes lists known nodes)"
    ))
}
