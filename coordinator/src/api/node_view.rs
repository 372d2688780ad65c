//! Nodes as clusterctl sees them: the summary every listing shows (with a held cordon, if the
//! cordon breaker holds one) and one node's detail.

use vigil_proto::v1;

use crate::breaker::Held;
use crate::health::Condition;
use crate::node::{Availability, CordonSource, DiagnosticsRecord, Node};

pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn summary(n: &Node, held: Option<&Held>, now: vigil_core::time::Instant) -> v1::NodeSummary {
    let availability = match n.availability {
        Availability::Ready => v1::Availability::Ready,
        Availability::Unreachable => v1::Availability::Unreachable,
        Availability::Lost => v1::Availability::Lost,
    };
    let (scheduling, cordon) = match &n.record.cordon {
        Some(c) => (
            v1::Scheduling::Cordoned,
            Some(v1::Cordon {
                reason: c.reason.clone(),
                source: match c.source {
                    CordonSource::Auto => v1::CordonSource::Auto,
                    CordonSource::Operator => v1::CordonSource::Operator,
                    CordonSource::Recovery => v1::CordonSource::Recovery,
                } as i32,
                since_unix_ms: c.since_unix_ms,
            }),
        ),
        None => (v1::Scheduling::Schedulable, None),
    };
    v1::NodeSummary {
        name: n.record.name.clone(),
        state: n.display_state().as_str().to_owned(),
        availability: availability as i32,
        scheduling: scheduling as i32,
        cordon,
        gpus_healthy: n.gpus_healthy(),
        gpus_total: n.gpus_total(),
        last_heartbeat_age_ms: n
            .heard_since_start
            .then(|| millis(now.saturating_duration_since(n.silent_since))),
        hostname: n.record.hostname.clone(),
        agent_version: n.record.agent_version.clone(),
        gpu_backend: if n.record.simulated {
            v1::GpuBackend::Simulated
        } else {
            v1::GpuBackend::Nvml
        } as i32,
        availability_since_unix_ms: n.availability_since_unix_ms,
        condition: condition(n.condition) as i32,
        condition_reasons: n.health.reasons(),
        held_cordon: held.map(|h| crate::breaker_view::held(&n.record.name, h)),
        slurm_drain_reason: String::new(),
        needs_repair: n
            .record
            .remediation
            .as_ref()
            .is_some_and(|l| l.needs_repair.is_some()),
    }
}

fn remediation(l: &vigil_core::remediation::Ladder) -> v1::Remediation {
    v1::Remediation {
        summary: l.summary(),
        needs_repair: l.needs_repair.is_some(),
        steps: l
            .steps
            .iter()
            .map(|s| v1::RemediationStep {
                at_unix_ms: s.at_unix_ms,
                action: s.step.as_str().to_owned(),
                gpu_index: s.gpu,
                outcome: s.outcome.clone(),
                xid: s.xid,
            })
            .collect(),
        marks: u32::try_from(l.marks.len()).unwrap_or(u32::MAX),
    }
}

fn condition(c: Condition) -> v1::Condition {
    match c {
        Condition::Healthy => v1::Condition::Healthy,
        Condition::Degraded => v1::Condition::Degraded,
        Condition::Unhealthy => v1::Condition::Unhealthy,
    }
}

pub fn diagnostics(node: &str, d: &DiagnosticsRecord) -> v1::DiagnosticsRecord {
    v1::DiagnosticsRecord {
        node: node.to_owned(),
        passed: d.passed,
        summary: d.summary.clone(),
        output: d.output.clone(),
        duration_ms: d.duration_ms,
        command: d.command.clone(),
        finished_at_unix_ms: d.finished_at_unix_ms,
    }
}

pub fn detail(n: &Node, held: Option<&Held>, now: vigil_core::time::Instant) -> v1::NodeDetail {
    v1::NodeDetail {
        summary: Some(summary(n, held, now)),
        gpus: n
            .record
            .gpus
            .iter()
            .map(|g| v1::GpuInfo {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                pci_bus_id: g.pci_bus_id.clone(),
                memory_total_bytes: g.memory_total_bytes,
                serial: g.serial.clone(),
            })
            .collect(),
        last_samples: n.last_samples.to_vec(),
        fabric: n.last_fabric.to_vec(),
        workers: n.workers.to_vec(),
        first_registered_unix_ms: n.record.first_registered_unix_ms,
        last_registered_unix_ms: n.record.last_registered_unix_ms,
        machine_id: n.record.machine_id.clone(),
        boot_id: n.record.boot_id.clone(),
        gpu_health: n
            .record
            .gpus
            .iter()
            .map(|g| {
                let (c, reasons) = n.health.gpu_condition(g.index);
                v1::GpuHealth {
                    index: g.index,
                    condition: condition(c) as i32,
                    reasons,
                }
            })
            .collect(),
        events: n
            .events
            .iter()
            .map(|e| v1::NodeEvent {
                at_unix_ms: e.at_unix_ms,
                kind: e.kind.clone(),
                message: e.message.clone(),
                gpu_index: e.gpu_index,
            })
            .collect(),
        last_diagnostics: n
            .record
            .last_diagnostics
            .as_ref()
            .map(|d| diagnostics(&n.record.name, d)),
        remediation: n.record.remediation.as_deref().map(remediation),
    }
}
