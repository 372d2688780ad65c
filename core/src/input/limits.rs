//! Every bound the coordinator puts on what agents and operators send it, in one place.
//!
//! docs/security.md ("Input limits") lists each with its value and the reason; keep them in step.
//! Whatever crosses these bounds is refused with an error naming the field, the limit and the
//! fix, counted in `vigil_agent_messages_rejected_total{reason}`, and changes nothing.

/// Largest gRPC message either side accepts, on every service and client (4 MiB).
pub use vigil_proto::MAX_MESSAGE_BYTES;

/// Node names: DNS-label-like, 1 to 63 bytes of `[A-Za-z0-9._-]`, alphanumeric first. The rule
/// is the protocol's (the agent checks its own name by it); kept at this path for callers here.
pub use vigil_proto::names::{MAX_NODE_NAME, valid_node_name};
/// GPUs a node may register or sample in one heartbeat (an HGX board has 8; 64 leaves room).
pub const MAX_GPUS: usize = 64;
/// NVLinks per GPU sample (NVML's maximum is 18).
pub const MAX_NVLINKS: usize = 32;
/// Fabric ports (InfiniBand ports and network interfaces) in a registration or heartbeat.
pub const MAX_FABRIC_PORTS: usize = 64;
/// Processes in one node's evidence of a hung attempt (the agent sends at most 32).
pub const MAX_EVIDENCE_PROCESSES: usize = 64;
/// Workers an agent may list in a registration or heartbeat.
pub const MAX_WORKERS: usize = 1024;
/// Short free-text fields: hostname, agent version, GPU uuid/name/PCI id/serial.
pub const MAX_TEXT: usize = 255;
/// Job ids (`NAME-SEQ`: a 48-byte name plus a sequence number fits easily).
pub const MAX_JOB_ID: usize = 128;
/// Paths an agent reports (log files, checkpoints) and a job spec's directories.
pub const MAX_PATH: usize = 4096;
/// Why a worker stopped, a diagnostic's summary and command line.
pub const MAX_REASON: usize = 4096;
/// A worker's log tail in WorkerExited (the agent sends at most 4 KiB).
pub const MAX_LOG_TAIL: usize = 16 * 1024;
/// A diagnostic's output (the agent truncates it to 64 KiB).
pub const MAX_DIAGNOSTICS_OUTPUT: usize = 256 * 1024;
/// One log read's data: 256 KiB of log, which lossy UTF-8 decoding may triple.
/// The output of a remediation step an agent sends (the agent keeps the end of longer output).
pub const MAX_REMEDIATION_OUTPUT: usize = 16 * 1024;
pub const MAX_LOG_DATA: usize = 1024 * 1024;

/// A job spec's TOML text.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Arguments in a job's `command` (program included).
pub const MAX_ARGV: usize = 256;
/// Bytes of a job's `command`, all arguments together.
pub const MAX_COMMAND_BYTES: usize = 32 * 1024;
/// Variables in a job's `env`.
pub const MAX_ENV_VARS: usize = 128;
/// Bytes of a job's `env`, keys and values together.
pub const MAX_ENV_BYTES: usize = 32 * 1024;

/// Cordon and drain reasons given by an operator.
pub const MAX_OPERATOR_REASON: usize = 1024;

/// Agent stream rate, by default: messages per second a session may sustain.
pub const DEFAULT_AGENT_MESSAGES_PER_SECOND: u32 = 100;
/// ... and how many it may send at once above that rate.
pub const DEFAULT_AGENT_MESSAGE_BURST: u32 = 400;
/// Agent stream rate, by default: bytes per second a session may sustain.
pub const DEFAULT_AGENT_BYTES_PER_SECOND: u64 = 8 * 1024 * 1024;
/// ... and how many it may send at once above that rate.
pub const DEFAULT_AGENT_BYTES_BURST: u64 = 16 * 1024 * 1024;

/// `[limits]` in the coordinator's config: the per-agent stream rate. Every other limit above is
/// fixed (a protocol property, not a tuning knob).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Messages per second one agent stream may sustain; faster agents are slowed down.
    pub agent_messages_per_second: u32,
    /// Messages one agent may send at once above that rate.
    pub agent_message_burst: u32,
    /// Bytes per second one agent stream may sustain.
    pub agent_bytes_per_second: u64,
    /// Bytes one agent may send at once above that rate.
    pub agent_bytes_burst: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            agent_messages_per_second: DEFAULT_AGENT_MESSAGES_PER_SECOND,
            agent_message_burst: DEFAULT_AGENT_MESSAGE_BURST,
            agent_bytes_per_second: DEFAULT_AGENT_BYTES_PER_SECOND,
            agent_bytes_burst: DEFAULT_AGENT_BYTES_BURST,
        }
    }
}

impl LimitsConfig {
    /// The error names the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.agent_messages_per_second < 10 {
            return Err(format!(
                "limits.agent_messages_per_second = {} is too low: an agent heartbeats and reports \
                 events several times a second; use at least 10 (default {DEFAULT_AGENT_MESSAGES_PER_SECOND})",
                self.agent_messages_per_second
            ));
        }
        if self.agent_message_burst < 1 {
            return Err("limits.agent_message_burst must be at least 1".into());
        }
        if self.agent_bytes_per_second < 64 * 1024 {
            return Err(format!(
                "limits.agent_bytes_per_second = {} is too low; use at least 65536 (default {DEFAULT_AGENT_BYTES_PER_SECOND})",
                self.agent_bytes_per_second
            ));
        }
        if self.agent_bytes_burst < MAX_MESSAGE_BYTES as u64 {
            return Err(format!(
                "limits.agent_bytes_burst = {} is below the largest message ({MAX_MESSAGE_BYTES} bytes); raise it",
                self.agent_bytes_burst
            ));
        }
        Ok(())
    }

    pub fn rates(&self) -> Rates {
        Rates {
            messages_per_second: f64::from(self.agent_messages_per_second),
            message_burst: f64::from(self.agent_message_burst),
            bytes_per_second: self.agent_bytes_per_second as f64,
            bytes_burst: self.agent_bytes_burst as f64,
        }
    }
}

/// Rates a session may sustain, and bursts it may send above them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub messages_per_second: f64,
    pub message_burst: f64,
    pub bytes_per_second: f64,
    pub bytes_burst: f64,
}

/// The error for an invalid node name, naming the field, the rule and the fix.
pub fn node_name_error(field: &str, name: &str) -> String {
    let shown: String = name.chars().take(80).collect();
    format!(
        "{field} {shown:?} is invalid: use {}",
        vigil_proto::NODE_NAME_RULE
    )
}

/// A job id given by an operator: refused before lookup when over [`MAX_JOB_ID`], so an error
/// never echoes megabytes back.
pub fn check_job_id_arg(id: &str) -> Result<(), String> {
    if id.len() > MAX_JOB_ID {
        return Err(format!(
            "job id is {} bytes; job ids are at most {MAX_JOB_ID} (clusterctl jobs lists them)",
            id.len()
        ));
    }
    Ok(())
}

/// `value` is at most `max` bytes; the error names the field, the limit and the fix.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes; the limit is {max} bytes: shorten it",
            value.len()
        ));
    }
    Ok(())
}

/// `count` items at most `max`; the error names the field, the limit and the fix.
pub fn check_count(field: &str, count: usize, max: usize) -> Result<(), String> {
    if count > max {
        return Err(format!(
            "{field} lists {count} entries; the limit is {max}: send fewer"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_the_limit() {
        let e = check_len("hostname", &"h".repeat(300), MAX_TEXT).expect_err("too long");
        assert!(e.contains("hostname") && e.contains("255"), "{e}");
        let e = check_count("gpus", 65, MAX_GPUS).expect_err("too many");
        assert!(e.contains("gpus") && e.contains("64"), "{e}");
        let e = node_name_error("node_name", &"y".repeat(10_000));
        assert!(
            e.len() < 300,
            "a huge name is not echoed whole: {}",
            e.len()
        );
    }
}
