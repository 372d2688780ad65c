//! Validation of every agent message, pure: the agent service and the fuzz targets call it.
//!
//! A message that fails is refused before it reaches the engine, so it changes nothing; the
//! [`Rejection`] says which limit it broke (`reason`, the metric label) and how (`message`,
//! naming the field, the limit and the fix).

use std::path::{Component, Path};

use vigil_proto::v1::{self, agent_event::Kind, agent_message::Body};

use crate::limits::{
    MAX_DIAGNOSTICS_OUTPUT, MAX_EVIDENCE_PROCESSES, MAX_FABRIC_PORTS, MAX_GPUS, MAX_JOB_ID,
    MAX_LOG_DATA, MAX_LOG_TAIL, MAX_NVLINKS, MAX_PATH, MAX_REASON, MAX_REMEDIATION_OUTPUT,
    MAX_TEXT, MAX_WORKERS, check_count, check_len, node_name_error, valid_node_name,
};
use crate::node::GpuRecord;
use crate::state::Registration;

/// Most rejected checkpoints one scan may name (the agent verifies at most 3).
pub const MAX_REJECTED: usize = 8;
/// Most bytes of a verify_command's output one rejected checkpoint may carry.
pub const MAX_VERIFY_OUTPUT: usize = 4096;

/// Why an agent message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Label of `vigil_agent_messages_rejected_total`: `invalid_register`, `invalid_heartbeat`,
    /// `invalid_event` (and, from the agent service, `oversized`, `malformed`, ...).
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Check one decoded agent message against every limit. An empty body (a oneof case from a
/// newer protocol revision) passes: unknown fields are ignored, as the protocol promises.
pub fn validate(msg: &v1::AgentMessage) -> Result<(), Rejection> {
    let (reason, result) = match &msg.body {
        Some(Body::Register(reg)) => ("invalid_register", check_register(reg)),
        Some(Body::Heartbeat(hb)) => ("invalid_heartbeat", check_heartbeat(hb)),
        Some(Body::Event(ev)) => ("invalid_event", check_event(ev)),
        None => return Ok(()),
    };
    result.map_err(|message| Rejection { reason, message })
}

/// Check a Register against every limit; the error names the field.
pub fn check_register(reg: &v1::Register) -> Result<(), String> {
    if reg.protocol_version != vigil_proto::PROTOCOL_VERSION {
        return Err(format!(
            "protocol_version {} is not supported (this coordinator speaks {}); upgrade the agent or the coordinator",
            reg.protocol_version,
            vigil_proto::PROTOCOL_VERSION
        ));
    }
    if !valid_node_name(&reg.node_name) {
        return Err(node_name_error("node_name", &reg.node_name));
    }
    check_len("hostname", &reg.hostname, MAX_TEXT)?;
    check_len("agent_version", &reg.agent_version, MAX_TEXT)?;
    check_len("last_store_id", &reg.last_store_id, MAX_TEXT)?;
    check_host_id("machine_id", &reg.machine_id)?;
    check_host_id("boot_id", &reg.boot_id)?;
    match v1::GpuBackend::try_from(reg.gpu_backend) {
        Ok(v1::GpuBackend::Nvml | v1::GpuBackend::Simulated) => {}
        _ => {
            return Err(format!(
                "gpu_backend {} is not nvml (1) or simulated (2)",
                reg.gpu_backend
            ));
        }
    }
    check_count("gpus", reg.gpus.len(), MAX_GPUS)?;
    let mut seen = Vec::with_capacity(reg.gpus.len());
    for g in &reg.gpus {
        for (field, value) in [
            ("gpus.uuid", &g.uuid),
            ("gpus.name", &g.name),
            ("gpus.pci_bus_id", &g.pci_bus_id),
            ("gpus.serial", &g.serial),
        ] {
            check_len(field, value, MAX_TEXT)?;
        }
        if seen.contains(&g.index) {
            return Err(format!("gpus lists index {} twice", g.index));
        }
        seen.push(g.index);
    }
    check_fabric("fabric", &reg.fabric)?;
    check_workers("workers", &reg.workers)
}

/// Fabric ports: bounded in number and text; each port named once.
fn check_fabric(field: &str, ports: &[v1::FabricPort]) -> Result<(), String> {
    check_count(field, ports.len(), MAX_FABRIC_PORTS)?;
    let mut seen = Vec::with_capacity(ports.len());
    for p in ports {
        for (name, value) in [
            ("device", &p.device),
            ("state", &p.state),
            ("phys_state", &p.phys_state),
        ] {
            check_len(&format!("{field}.{name}"), value, MAX_TEXT)?;
        }
        let key = (p.kind, p.device.as_str(), p.port);
        if seen.contains(&key) {
            return Err(format!("{field} lists {} port {} twice", p.device, p.port));
        }
        seen.push(key);
    }
    Ok(())
}

fn check_workers(field: &str, workers: &[v1::WorkerInfo]) -> Result<(), String> {
    check_count(field, workers.len(), MAX_WORKERS)?;
    for w in workers {
        check_job_id(&format!("{field}.job_id"), &w.job_id)?;
    }
    Ok(())
}

fn check_job_id(field: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{field} is empty: name the job"));
    }
    check_len(field, id, MAX_JOB_ID)
}

/// A checkpoint path an agent reports: bounded, absolute, without `..` (so it cannot leave the
/// job's checkpoint dir it claims to be in) and without NUL.
fn check_path(field: &str, path: &str) -> Result<(), String> {
    check_len(field, path, MAX_PATH)?;
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) || path.contains('\0')
    {
        return Err(format!(
            "{field} {:?} must be an absolute path without '..' or NUL",
            path.chars().take(200).collect::<String>()
        ));
    }
    Ok(())
}

/// Check a Heartbeat: sample, telemetry and worker counts, NVLinks per GPU, job ids; a
/// heartbeat that says GPU health is unchanged carries telemetry, not samples.
pub fn check_heartbeat(hb: &v1::Heartbeat) -> Result<(), String> {
    check_count("heartbeat.gpus", hb.gpus.len(), MAX_GPUS)?;
    check_count("heartbeat.telemetry", hb.telemetry.len(), MAX_GPUS)?;
    if hb.gpu_health_unchanged && !hb.gpus.is_empty() {
        return Err(
            "heartbeat.gpus must be empty when heartbeat.gpu_health_unchanged is set: send \
             either full samples or telemetry"
                .into(),
        );
    }
    for s in &hb.gpus {
        check_count("heartbeat.gpus.nvlinks", s.nvlinks.len(), MAX_NVLINKS)?;
    }
    check_fabric("heartbeat.fabric", &hb.fabric)?;
    check_workers("heartbeat.workers", &hb.workers)
}

/// Check an AgentEvent: every string bounded, every path confined, GPU indexes in range.
pub fn check_event(ev: &v1::AgentEvent) -> Result<(), String> {
    let gpu = |field: &str, index: u32| {
        if index as usize >= MAX_GPUS {
            Err(format!(
                "{field} {index} is out of range: a node has at most {MAX_GPUS} GPUs"
            ))
        } else {
            Ok(())
        }
    };
    match &ev.kind {
        Some(Kind::Xid(x)) => {
            gpu("xid.gpu_index", x.gpu_index)?;
            check_len("xid.gpu_uuid", &x.gpu_uuid, MAX_TEXT)
        }
        Some(Kind::GpuLost(g)) => {
            gpu("gpu_lost.gpu_index", g.gpu_index)?;
            check_len("gpu_lost.gpu_uuid", &g.gpu_uuid, MAX_TEXT)
        }
        Some(Kind::Diagnostics(d)) => {
            check_len("diagnostics.summary", &d.summary, MAX_REASON)?;
            check_len("diagnostics.command", &d.command, MAX_REASON)?;
            check_len("diagnostics.output", &d.output, MAX_DIAGNOSTICS_OUTPUT)
        }
        Some(Kind::WorkerStarted(w)) => {
            check_job_id("worker_started.job_id", &w.job_id)?;
            check_len("worker_started.log_path", &w.log_path, MAX_PATH)
        }
        Some(Kind::WorkerExited(w)) => {
            check_job_id("worker_exited.job_id", &w.job_id)?;
            check_len("worker_exited.reason", &w.reason, MAX_REASON)?;
            check_len("worker_exited.log_path", &w.log_path, MAX_PATH)?;
            check_len("worker_exited.log_tail", &w.log_tail, MAX_LOG_TAIL)
        }
        Some(Kind::Checkpoint(c)) => {
            check_job_id("checkpoint.job_id", &c.job_id)?;
            if c.path.is_empty() {
                return Err("checkpoint.path is empty: name the checkpoint".into());
            }
            check_path("checkpoint.path", &c.path)
        }
        Some(Kind::CheckpointScan(c)) => {
            check_job_id("checkpoint_scan.job_id", &c.job_id)?;
            check_len("checkpoint_scan.error", &c.error, MAX_REASON)?;
            check_count("checkpoint_scan.rejected", c.rejected.len(), MAX_REJECTED)?;
            for r in &c.rejected {
                check_path("checkpoint_scan.rejected.path", &r.path)?;
                check_len(
                    "checkpoint_scan.rejected.output",
                    &r.output,
                    MAX_VERIFY_OUTPUT,
                )?;
                check_len("checkpoint_scan.rejected.why", &r.why, MAX_TEXT)?;
            }
            match &c.newest {
                Some(n) if n.path.is_empty() => {
                    Err("checkpoint_scan.newest.path is empty: name the checkpoint".into())
                }
                Some(n) => check_path("checkpoint_scan.newest.path", &n.path),
                None => Ok(()),
            }
        }
        Some(Kind::LogData(l)) => check_len("log_data.data", &l.data, MAX_LOG_DATA),
        Some(Kind::HangEvidence(e)) => check_hang_evidence(e),
        Some(Kind::PreflightResult(r)) => {
            check_job_id("preflight_result.job_id", &r.job_id)?;
            check_len("preflight_result.why", &r.why, MAX_REASON)?;
            check_len("preflight_result.output", &r.output, MAX_VERIFY_OUTPUT)
        }
        Some(Kind::RemediationResult(r)) => {
            gpu("remediation_result.gpu_index", r.gpu_index)?;
            if v1::RemediationAction::try_from(r.action)
                .map_or(true, |a| a == v1::RemediationAction::Unspecified)
            {
                return Err(format!(
                    "remediation_result.action {} is not a known action (gpu_reset, reboot)",
                    r.action
                ));
            }
            check_len("remediation_result.command", &r.command, MAX_REASON)?;
            check_len(
                "remediation_result.output",
                &r.output,
                MAX_REMEDIATION_OUTPUT,
            )
        }
        None => Ok(()),
    }
}

/// A hang's evidence: bounded counts, and every text bounded.
fn check_hang_evidence(e: &v1::HangEvidence) -> Result<(), String> {
    check_job_id("hang_evidence.job_id", &e.job_id)?;
    check_count(
        "hang_evidence.processes",
        e.processes.len(),
        MAX_EVIDENCE_PROCESSES,
    )?;
    check_count("hang_evidence.fabric", e.fabric.len(), MAX_FABRIC_PORTS)?;
    check_len("hang_evidence.log_tail", &e.log_tail, MAX_LOG_TAIL)?;
    check_len("hang_evidence.error", &e.error, MAX_REASON)?;
    for p in &e.processes {
        check_len("hang_evidence.processes.comm", &p.comm, MAX_TEXT)?;
        check_len("hang_evidence.processes.state", &p.state, MAX_TEXT)?;
        check_len("hang_evidence.processes.wchan", &p.wchan, MAX_TEXT)?;
        check_len(
            "hang_evidence.processes.kernel_stack",
            &p.kernel_stack,
            MAX_LOG_TAIL,
        )?;
        check_len(
            "hang_evidence.processes.python_stacks",
            &p.python_stacks,
            MAX_LOG_TAIL,
        )?;
    }
    for d in &e.fabric {
        check_len("hang_evidence.fabric.port", &d.port, MAX_TEXT)?;
        check_len("hang_evidence.fabric.state", &d.state, MAX_TEXT)?;
    }
    Ok(())
}

/// A machine-id or boot id (the rule lives in `vigil_proto`, shared with the agent's config).
fn check_host_id(field: &str, value: &str) -> Result<(), String> {
    vigil_proto::check_host_id(value)
        .map_err(|problem| format!("{field} {problem}; fix the agent's [identity] machine_id"))
}

/// Check a Register and turn it into the engine's form; the error names the field.
pub fn validate_register(
    reg: v1::Register,
    session: u64,
    address: String,
) -> Result<Registration, String> {
    check_register(&reg)?;
    let simulated = reg.gpu_backend == v1::GpuBackend::Simulated as i32;
    let mut gpus: Vec<GpuRecord> = reg
        .gpus
        .into_iter()
        .map(|g| GpuRecord {
            index: g.index,
            uuid: g.uuid,
            name: g.name,
            pci_bus_id: g.pci_bus_id,
            memory_total_bytes: g.memory_total_bytes,
            serial: g.serial,
        })
        .collect();
    gpus.sort_by_key(|g| g.index);
    Ok(Registration {
        session,
        node: reg.node_name,
        hostname: reg.hostname,
        address,
        agent_version: reg.agent_version,
        simulated,
        gpus,
        workers: reg.workers,
        identity: crate::identity::HostIdentity {
            machine_id: reg.machine_id,
            boot_id: reg.boot_id,
        },
        fabric: reg.fabric,
    })
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
