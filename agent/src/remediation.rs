//! Remediation steps on the coordinator's request (`Command.remediate`): the node's own GPU
//! reset or reboot command, from `[remediation]` in this agent's config (admin-owned, run as
//! the agent's user, root in production). The coordinator only names the step and the GPU; it
//! never sends a command line.
//!
//! Each step id runs once: the coordinator re-sends a step until it is answered, so a repeat
//! of a step that still runs is ignored, and a repeat of one that finished is answered again
//! with the same result. A command runs in its own process group, killed whole at `timeout`.
//! A reboot is answered `ok` ("reboot issued") before its command runs: the answer could not
//! get out afterwards.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use tracing::{Instrument, info, warn};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{AgentEvent, Remediate, RemediationAction, RemediationResult};

use crate::events::EventSink;
use crate::unix_ms;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The protocol's bound on `RemediationResult.output` (the end of the output is kept).
pub const MAX_OUTPUT_BYTES: usize = vigil_core::limits::MAX_REMEDIATION_OUTPUT;
/// Finished steps remembered, to answer repeats.
const REMEMBERED: usize = 16;
/// How long a reboot's answer gets to leave before the reboot command runs.
const ANSWER_HEAD_START: Duration = Duration::from_secs(1);

/// `[remediation]` in the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemediationSection {
    /// argv of a GPU reset; `{gpu}` in any argument becomes the GPU's index.
    pub gpu_reset_command: Vec<String>,
    /// argv of a reboot.
    pub reboot_command: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RemediationSection {
    fn default() -> Self {
        Self {
            gpu_reset_command: Vec::new(),
            reboot_command: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl RemediationSection {
    /// The first problem, as (field, problem).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        for (field, argv) in [
            ("remediation.gpu_reset_command", &self.gpu_reset_command),
            ("remediation.reboot_command", &self.reboot_command),
        ] {
            if argv.first().is_some_and(|p| p.trim().is_empty()) {
                return Some((field, "the program (first element) is empty".to_owned()));
            }
        }
        if self.timeout < Duration::from_secs(1) || self.timeout > Duration::from_secs(3600) {
            return Some((
                "remediation.timeout",
                format!(
                    "{} is out of range",
                    humantime::format_duration(self.timeout)
                ),
            ));
        }
        None
    }

    /// The argv for `action` on `gpu`, or why there is none.
    pub fn argv(&self, action: RemediationAction, gpu: u32) -> Result<Vec<String>, String> {
        let (key, argv) = match action {
            RemediationAction::GpuReset => ("gpu_reset_command", &self.gpu_reset_command),
            RemediationAction::Reboot => ("reboot_command", &self.reboot_command),
            RemediationAction::Unspecified => {
                return Err("unknown remediation action; upgrade this agent".into());
            }
        };
        if argv.is_empty() {
            return Err(format!("remediation.{key} is not set on this node"));
        }
        let gpu = gpu.to_string();
        Ok(argv.iter().map(|a| a.replace("{gpu}", &gpu)).collect())
    }
}

/// A step's state on this agent.
enum Run {
    Running,
    Done(RemediationResult),
}

pub struct Remediator {
    pub cfg: RemediationSection,
    pub sink: EventSink,
    /// By step id; the oldest finished ones are forgotten first.
    runs: Mutex<BTreeMap<u64, Run>>,
}

impl Remediator {
    pub fn new(cfg: RemediationSection, sink: EventSink) -> Self {
        Self {
            cfg,
            sink,
            runs: Mutex::new(BTreeMap::new()),
        }
    }

    /// Run `step` in the background (once per step id) and answer it; returns at once.
    pub fn spawn(self: &Arc<Self>, step: Remediate) {
        {
            let Ok(mut runs) = self.runs.lock() else {
                return;
            };
            match runs.get(&step.step_id) {
                Some(Run::Running) => return,
                Some(Run::Done(result)) => {
                    self.answer(result.clone());
                    return;
                }
                None => {}
            }
            runs.insert(step.step_id, Run::Running);
            while runs.len() > REMEMBERED {
                let Some(oldest) = runs.keys().next().copied() else {
                    break;
                };
                runs.remove(&oldest);
            }
        }
        let this = Arc::clone(self);
        tokio::spawn(
            async move {
                let result = this.run(&step).await;
                if let Ok(mut runs) = this.runs.lock() {
                    runs.insert(step.step_id, Run::Done(result));
                }
            }
            .in_current_span(),
        );
    }

    async fn run(&self, step: &Remediate) -> RemediationResult {
        let action = RemediationAction::try_from(step.action).unwrap_or_default();
        let mut result = RemediationResult {
            step_id: step.step_id,
            action: step.action,
            gpu_index: step.gpu_index,
            ..Default::default()
        };
        let argv = match self.cfg.argv(action, step.gpu_index) {
            Ok(argv) => argv,
            Err(why) => {
                warn!(step = step.step_id, reason = %step.reason, "remediation refused: {why}");
                result.output = why;
                self.answer(result.clone());
                return result;
            }
        };
        result.command = argv.join(" ");
        info!(step = step.step_id, command = %result.command, reason = %step.reason, "running remediation step");
        if action == RemediationAction::Reboot {
            result.ok = true;
            result.output = format!("reboot issued: {}", result.command);
            self.answer(result.clone());
            tokio::time::sleep(ANSWER_HEAD_START).await;
            let (ok, output) = run_in_group(&argv, self.cfg.timeout).await;
            info!(step = step.step_id, ok, output = %output, "reboot command returned");
            return result;
        }
        let (ok, output) = run_in_group(&argv, self.cfg.timeout).await;
        info!(step = step.step_id, ok, "remediation step finished");
        result.ok = ok;
        result.output = output;
        self.answer(result.clone());
        result
    }

    fn answer(&self, result: RemediationResult) {
        self.sink.emit(AgentEvent {
            at_unix_ms: unix_ms(),
            kind: Some(Kind::RemediationResult(result)),
        });
    }
}

/// Run `argv` (no shell) as the leader of its own process group, killing the whole group at
/// `timeout`: whether it exited 0, and its output (the end of it, bounded).
pub async fn run_in_group(argv: &[String], timeout: Duration) -> (bool, String) {
    let Some((program, args)) = argv.split_first() else {
        return (false, "no command".to_owned());
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot start {program}: {e}")),
    };
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            if let Some(pgid) = pgid.filter(|p| *p > 1) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            (
                false,
                format!(
                    "{program} did not finish within {}; killed",
                    humantime::format_duration(timeout)
                ),
            )
        }
        Ok(Err(e)) => (false, format!("waiting for {program} failed: {e}")),
        Ok(Ok(out)) => {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            if !out.status.success() {
                output.push_str(&format!("\n{program} failed ({})", out.status));
            }
            (
                out.status.success(),
                crate::diagnostics::tail(&output, MAX_OUTPUT_BYTES),
            )
        }
    }
}

#[cfg(test)]
#[path = "remediation_tests.rs"]
mod tests;
