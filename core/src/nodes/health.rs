//! The GPU-health policy, pure: samples and events -> per-GPU findings ->
//! node condition. Nothing here reads a clock; times are unix milliseconds
//! passed in. What a sample shows wrong is the protocol's reading
//! (`vigil_proto::sample_faults`, shared with the agent's diagnostic); how bad it is,
//! and the temperature limit, are this policy's.

use vigil_proto::{SampleFault, sample_faults, v1};

use crate::config::HealthConfig;
use crate::node::GpuRecord;
use crate::xid::{self, XidClass};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Condition {
    #[default]
    Healthy,
    /// Warning signs; the node stays schedulable.
    Degraded,
    /// The node must not run work: it is cordoned automatically.
    Unhealthy,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Healthy => "Healthy",
            Condition::Degraded => "Degraded",
            Condition::Unhealthy => "Unhealthy",
        }
    }
}

/// One rule that fired, with its evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub condition: Condition,
    /// Stable rule name, used as a metric label (`vigil_cordons_total{rule}`).
    pub rule: &'static str,
    pub gpu: Option<u32>,
    /// "XID 79 (GPU has fallen off the bus) on GPU 3 (GPU-5f1e...)"
    pub message: String,
    /// When the agent observed the evidence, unix ms.
    pub observed_at_ms: u64,
}

/// A finding from an event, kept after the event itself is gone.
#[derive(Debug, Clone, PartialEq)]
pub struct EventFinding {
    pub finding: Finding,
    /// When it stops counting; `None`: until the operator uncordons the node.
    /// On the monotonic clock (`Now::mono_ms`), not the wall clock.
    pub expires_at_ms: Option<u64>,
}

/// Everything the policy remembers about one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeHealth {
    /// From the latest heartbeat; replaced by every heartbeat.
    pub sample_findings: Vec<Finding>,
    /// From XIDs and lost GPUs.
    pub event_findings: Vec<EventFinding>,
    /// Recent XIDs as (gpu, xid, class, at_ms), for recurrence.
    pub xid_history: Vec<(u32, u32, XidClass, u64)>,
    /// Set while the node straggles in a job (see `stragglers`): Degraded.
    pub straggler: Option<Finding>,
    /// The fabric ports' policy and its findings (see `fabric`).
    pub fabric: crate::fabric::FabricHealth,
    /// The GPU error counters' rate rules and the NVLinks in use (see `gpu_counters`).
    pub counters: crate::gpu_counters::GpuCounters,
}

fn gpu_label(index: u32, uuid: &str) -> String {
    if uuid.is_empty() {
        format!("GPU {index}")
    } else {
        format!("GPU {index} ({uuid})")
    }
}

impl NodeHealth {
    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.sample_findings
            .iter()
            .chain(self.event_findings.iter().map(|e| &e.finding))
            .chain(self.straggler.iter())
            .chain(self.fabric.findings.iter())
            .chain(self.counters.findings.iter())
    }

    pub fn condition(&self) -> Condition {
        self.findings()
            .map(|f| f.condition)
            .max()
            .unwrap_or_default()
    }

    /// The reasons, worst first.
    pub fn reasons(&self) -> Vec<String> {
        let mut all: Vec<&Finding> = self.findings().collect();
        all.sort_by_key(|f| std::cmp::Reverse(f.condition));
        all.into_iter().map(|f| f.message.clone()).collect()
    }

    /// The worst finding that makes the node Unhealthy, if any: it names the cordon.
    pub fn first_unhealthy(&self) -> Option<&Finding> {
        self.findings()
            .find(|f| f.condition == Condition::Unhealthy)
    }

    /// The worst condition the findings give GPU `gpu`, without their messages: what the
    /// scheduler asks of every GPU of every node, so it allocates nothing.
    pub fn gpu_worst(&self, gpu: u32) -> Condition {
        self.findings()
            .filter(|f| f.gpu == Some(gpu))
            .map(|f| f.condition)
            .max()
            .unwrap_or_default()
    }

    /// [`Self::gpu_worst`], and the findings' messages (for views).
    pub fn gpu_condition(&self, gpu: u32) -> (Condition, Vec<String>) {
        let messages = self
            .findings()
            .filter(|f| f.gpu == Some(gpu))
            .map(|f| f.message.clone())
            .collect();
        (self.gpu_worst(gpu), messages)
    }

    /// Drop what has aged out of the recurrence window. Times here are milliseconds on the
    /// monotonic clock (`Now::mono_ms`): the window never moves with a wall-clock step.
    pub fn expire(&mut self, now_ms: u64, cfg: &HealthConfig) {
        self.event_findings
            .retain(|e| e.expires_at_ms.is_none_or(|t| t > now_ms));
        let window = u64::try_from(cfg.recurrence_window.as_millis()).unwrap_or(u64::MAX);
        self.xid_history
            .retain(|(_, _, _, at)| now_ms.saturating_sub(*at) < window);
    }

    /// The operator says the node is fixed: forget event evidence. Sample
    /// rules still apply at the next heartbeat.
    pub fn clear_events(&mut self) {
        self.event_findings.clear();
        self.xid_history.clear();
        self.fabric.forget_flaps();
        self.counters.forget();
    }

    /// Forget what the latest heartbeat showed (GPU samples, fabric, counter rates): only
    /// fresh evidence counts from here.
    pub fn clear_samples(&mut self) {
        self.sample_findings.clear();
        self.fabric.findings.clear();
        self.counters.findings.clear();
    }

    /// Judge an XID. Returns its class so the caller can record it.
    pub fn on_xid(
        &mut self,
        gpu: u32,
        uuid: &str,
        code: u32,
        observed_at_ms: u64,
        now_ms: u64,
        cfg: &HealthConfig,
    ) -> XidClass {
        let class = cfg.xid_class(code);
        self.xid_history.push((gpu, code, class, now_ms));
        let on = gpu_label(gpu, uuid);
        let label = xid::label(code);
        let window = humantime::format_duration(cfg.recurrence_window);
        let repeats = self
            .xid_history
            .iter()
            .filter(|(g, x, _, _)| *g == gpu && *x == code)
            .count();
        let expires = now_ms
            .saturating_add(u64::try_from(cfg.recurrence_window.as_millis()).unwrap_or(u64::MAX));
        let finding = |condition, rule, message: String, expires_at_ms| EventFinding {
            finding: Finding {
                condition,
                rule,
                gpu: Some(gpu),
                message,
                observed_at_ms,
            },
            expires_at_ms,
        };
        let new = match class {
            XidClass::Fatal => Some(finding(
                Condition::Unhealthy,
                "xid",
                format!("{label} on {on}"),
                None,
            )),
            XidClass::Degrade if repeats >= cfg.degrade_recurrence as usize => Some(finding(
                Condition::Unhealthy,
                "xid_recurrence",
                format!("{label} on {on} {repeats} times within {window}"),
                None,
            )),
            XidClass::Degrade => Some(finding(
                Condition::Degraded,
                "xid_warning",
                format!("{label} on {on}: reset at next job boundary"),
                Some(expires),
            )),
            XidClass::Application if repeats >= cfg.application_recurrence as usize => {
                Some(finding(
                    Condition::Unhealthy,
                    "xid_recurrence",
                    format!(
                        "{label} on {on} {repeats} times within {window}: the GPU, not the job, is suspect"
                    ),
                    None,
                ))
            }
            XidClass::Application | XidClass::Ignore => None,
        };
        if let Some(new) = new {
            self.event_findings.retain(|e| {
                !(e.finding.gpu == Some(gpu) && e.finding.message == new.finding.message)
            });
            self.event_findings.push(new);
        }
        class
    }

    /// A fabric port the node's last registration had up is down at this one
    /// ([`crate::fabric::down_since_last_registration`]): Unhealthy until the operator
    /// uncordons, like a lost GPU (the next heartbeats no longer require that port).
    pub fn on_fabric_port_down_at_registration(&mut self, message: String, observed_at_ms: u64) {
        self.keep_until_uncordon(Finding {
            condition: Condition::Unhealthy,
            rule: "fabric_port_down",
            gpu: None,
            message,
            observed_at_ms,
        });
    }

    /// An Unhealthy finding that holds until the operator uncordons the node, once however
    /// often it is seen.
    fn keep_until_uncordon(&mut self, finding: Finding) {
        if self
            .event_findings
            .iter()
            .any(|e| e.finding.message == finding.message)
        {
            return;
        }
        self.event_findings.push(EventFinding {
            finding,
            expires_at_ms: None,
        });
    }

    pub fn on_gpu_lost(&mut self, gpu: u32, uuid: &str, observed_at_ms: u64) {
        let message = format!(
            "{} lost: it fell out of the driver's view",
            gpu_label(gpu, uuid)
        );
        self.keep_until_uncordon(Finding {
            condition: Condition::Unhealthy,
            rule: "gpu_lost",
            gpu: Some(gpu),
            message,
            observed_at_ms,
        });
    }
}

/// Findings from one heartbeat's GPU samples against the registered inventory.
pub fn judge_samples(
    gpus: &[GpuRecord],
    samples: &[v1::GpuSample],
    cfg: &HealthConfig,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if samples.is_empty() {
        // The agent could not sample at all: no evidence either way.
        return out;
    }
    for g in gpus {
        let on = gpu_label(g.index, &g.uuid);
        let Some(s) = samples.iter().find(|s| s.index == g.index) else {
            out.push(Finding {
                condition: Condition::Unhealthy,
                rule: "gpu_missing",
                gpu: Some(g.index),
                message: format!(
                    "{on} missing: the agent reports {} of {} registered GPUs",
                    samples.len(),
                    gpus.len()
                ),
                observed_at_ms: samples
                    .iter()
                    .map(|s| s.observed_at_unix_ms)
                    .max()
                    .unwrap_or(0),
            });
            continue;
        };
        let mut add = |condition, rule, message: String| {
            out.push(Finding {
                condition,
                rule,
                gpu: Some(g.index),
                message,
                observed_at_ms: s.observed_at_unix_ms,
            });
        };
        for fault in sample_faults(s) {
            if let Some((condition, rule, message)) = judge_fault(fault, &on, cfg) {
                add(condition, rule, message);
            }
        }
        if let Some(t) = s.temperature_c.filter(|t| *t >= cfg.temperature_max_c) {
            add(
                Condition::Degraded,
                "temperature",
                format!("{on} at {t:.0} °C (limit {:.0} °C)", cfg.temperature_max_c),
            );
        }
    }
    out
}

/// What one fault the protocol reads from a sample means for the node: its condition, rule
/// name (a metric label) and message; `None` for a fault this policy lets pass.
fn judge_fault(
    fault: SampleFault,
    on: &str,
    cfg: &HealthConfig,
) -> Option<(Condition, &'static str, String)> {
    use Condition::{Degraded, Unhealthy};
    Some(match fault {
        SampleFault::UncorrectedEcc(n) => (
            Unhealthy,
            "ecc_uncorrected",
            format!("{n} uncorrected ECC errors (volatile) on {on}"),
        ),
        SampleFault::RetiredPagesPending => (
            Unhealthy,
            "retired_pages_pending",
            format!("retired pages pending on {on}"),
        ),
        SampleFault::RowRemapFailed => (
            Unhealthy,
            "remap_failure",
            format!("row remapping failed on {on}"),
        ),
        SampleFault::NvLinksDown(links) => {
            let down: Vec<String> = links.iter().map(u32::to_string).collect();
            (
                Unhealthy,
                "nvlink_down",
                format!("NVLink {} down on {on}", down.join(",")),
            )
        }
        SampleFault::RowRemapPending => (
            Degraded,
            "remap_pending",
            format!("row remap pending on {on}: reset at next job boundary"),
        ),
        SampleFault::HwSlowdown => (
            Degraded,
            "hw_slowdown",
            format!("HW slowdown throttling on {on}"),
        ),
        SampleFault::ThermalThrottle => (
            Degraded,
            "thermal_throttle",
            format!("thermal throttling on {on}"),
        ),
        SampleFault::PowerBrake => (
            Degraded,
            "power_brake",
            format!("power brake throttling on {on}"),
        ),
        SampleFault::PcieWidthBelowMax { current, max } => (
            Degraded,
            "pcie_width",
            format!("PCIe link x{current} below its max x{max} on {on}"),
        ),
        SampleFault::PcieGenBelowMax { current, max } => {
            if !cfg.pcie_gen_below_max {
                return None;
            }
            (
                Degraded,
                "pcie_gen",
                format!("PCIe gen{current} below its max gen{max} on {on}"),
            )
        }
    })
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod tests;
