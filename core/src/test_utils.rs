//! Fixtures shared by the coordinator's scenario tests: simulated time and registrations.

use std::time::Duration;

use crate::node::GpuRecord;
use crate::state::{Now, Registration};

/// The wall clock at `t(0)`.
pub const T0: u64 = 1_700_000_000_000;

/// `secs` after the start of a scenario, on both clocks.
pub fn t(secs: u64) -> Now {
    Now {
        mono: crate::time::Instant::ZERO + Duration::from_secs(secs),
        wall_ms: T0 + secs * 1000,
    }
}

/// Node `node` registering in `session` with one simulated GPU.
pub fn reg(node: &str, session: u64) -> Registration {
    reg_with_gpus(node, session, 1)
}

/// Node `node` registering in `session` with `gpus` simulated GPUs.
pub fn reg_with_gpus(node: &str, session: u64, gpus: u32) -> Registration {
    Registration {
        session,
        node: node.to_owned(),
        hostname: node.to_owned(),
        address: "10.0.0.1".into(),
        agent_version: "0.1.0".into(),
        simulated: true,
        gpus: (0..gpus)
            .map(|i| GpuRecord {
                index: i,
                uuid: format!("GPU-{node}-{i}"),
                name: "sim".into(),
                pci_bus_id: String::new(),
                memory_total_bytes: 80 << 30,
                serial: String::new(),
            })
            .collect(),
        workers: Vec::new(),
    }
}
