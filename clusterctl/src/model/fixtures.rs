//! Test fixtures shared by the model and rendering tests.

use vigil_proto::v1;

pub fn cordoned_sim_node() -> v1::NodeSummary {
    v1::NodeSummary {
        name: "gpu-003".into(),
        state: "Cordoned".into(),
        availability: v1::Availability::Ready as i32,
        scheduling: v1::Scheduling::Cordoned as i32,
        cordon: Some(v1::Cordon {
            reason: "bad fan".into(),
            source: v1::CordonSource::Operator as i32,
            since_unix_ms: 1_000_000,
        }),
        gpus_healthy: 7,
        gpus_total: 8,
        last_heartbeat_age_ms: Some(400),
        hostname: "host-3".into(),
        agent_version: "0.1.0".into(),
        gpu_backend: v1::GpuBackend::Simulated as i32,
        availability_since_unix_ms: 900_000,
        condition: v1::Condition::Degraded as i32,
        condition_reasons: vec!["gpu 7: 3 uncorrectable ECC errors".into()],
    }
}

pub fn ready_nvml_node(name: &str) -> v1::NodeSummary {
    v1::NodeSummary {
        name: name.into(),
        state: "Ready".into(),
        availability: v1::Availability::Ready as i32,
        scheduling: v1::Scheduling::Schedulable as i32,
        cordon: None,
        gpus_healthy: 8,
        gpus_total: 8,
        last_heartbeat_age_ms: None,
        hostname: name.into(),
        agent_version: "0.1.0".into(),
        gpu_backend: v1::GpuBackend::Nvml as i32,
        availability_since_unix_ms: 0,
        condition: v1::Condition::Healthy as i32,
        condition_reasons: vec![],
    }
}
