//! Node diagnostics on the coordinator's request: a configured command, or the built-in self-check.
//!
//! Each run is its own task, so heartbeats never wait for it; the result goes
//! out as an `AgentEvent` through the [`EventSink`], like any other event.

use std::fmt::Write as _;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{Instrument, info};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{AgentEvent, DiagnosticsResult, GpuInfo, GpuSample};
use vigil_proto::{SampleFault, sample_faults};

use crate::events::EventSink;
use crate::gpu::GpuProbe;
use crate::{error_chain, unix_ms};

/// For a coordinator that leaves `timeout_ms` unset.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// A longer request is capped: a diagnostic that never ends would never answer.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The protocol's bound on `DiagnosticsResult.output`.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

pub struct Diagnostics {
    pub probe: Arc<dyn GpuProbe>,
    /// The inventory at start-up: a GPU missing from it now fails the self-check.
    pub expected: Vec<GpuInfo>,
    /// Program and arguments; empty runs the built-in self-check.
    pub command: Vec<String>,
    pub sink: EventSink,
}

/// What a run found, before it is wrapped in a `DiagnosticsResult`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub passed: bool,
    pub summary: String,
    pub output: String,
}

impl Diagnostics {
    /// Runs in the background and emits the result; returns at once.
    /// `command`: a burn-in's, run instead of the configured one when not empty.
    pub fn spawn(self: &Arc<Self>, command_id: u64, timeout_ms: u64, command: Vec<String>) {
        let timeout = match timeout_ms {
            0 => DEFAULT_TIMEOUT,
            ms => Duration::from_millis(ms).min(MAX_TIMEOUT),
        };
        let this = Arc::clone(self);
        tokio::spawn(
            async move {
                let result = if command.is_empty() {
                    this.run(command_id, timeout).await
                } else {
                    this.run_given(command_id, timeout, &command).await
                };
                this.sink.emit(AgentEvent {
                    at_unix_ms: unix_ms(),
                    kind: Some(Kind::Diagnostics(result)),
                });
            }
            .in_current_span(),
        );
    }

    /// Run `argv` (a burn-in the coordinator names) and report it like diagnostics.
    pub async fn run_given(
        &self,
        command_id: u64,
        timeout: Duration,
        argv: &[String],
    ) -> DiagnosticsResult {
        let started = Instant::now();
        let line = argv.join(" ");
        info!(command_id, command = %line, "running the coordinator's burn-in command");
        let outcome = run_command(argv, timeout).await;
        DiagnosticsResult {
            command_id,
            passed: outcome.passed,
            summary: outcome.summary,
            output: truncate(outcome.output, MAX_OUTPUT_BYTES),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            command: line,
        }
    }

    pub async fn run(&self, command_id: u64, timeout: Duration) -> DiagnosticsResult {
        let started = Instant::now();
        let (command, outcome) = if self.command.is_empty() {
            let name = self.probe.self_check_name();
            info!(command_id, check = name, "running diagnostics");
            (name.to_owned(), self.builtin(timeout).await)
        } else {
            let line = self.command.join(" ");
            info!(command_id, command = %line, "running diagnostics");
            (line, run_command(&self.command, timeout).await)
        };
        DiagnosticsResult {
            command_id,
            passed: outcome.passed,
            summary: outcome.summary,
            output: truncate(outcome.output, MAX_OUTPUT_BYTES),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            command,
        }
    }

    async fn builtin(&self, timeout: Duration) -> Outcome {
        let probe = Arc::clone(&self.probe);
        let read = tokio::task::spawn_blocking(move || {
            let present = probe.inventory()?;
            let samples = probe.sample()?;
            let lasting = probe.lasting_problems();
            Ok::<_, crate::gpu::GpuError>((present, samples, lasting))
        });
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(Ok((present, samples, lasting)))) => {
                self_check(&self.expected, &present, &samples, &lasting)
            }
            Ok(Ok(Err(e))) => failed(format!("cannot read the GPUs: {}", error_chain(&e))),
            Ok(Err(e)) => failed(format!("self-check task failed: {e}")),
            Err(_) => failed(format!(
                "GPUs did not answer within {}",
                humantime::format_duration(timeout)
            )),
        }
    }
}

fn failed(summary: String) -> Outcome {
    Outcome {
        passed: false,
        output: summary.clone(),
        summary,
    }
}

/// The built-in check: every expected GPU present, and none with a health problem: in its
/// sample, or among the backend's `lasting` problems (`(GPU index, what)`).
pub fn self_check(
    expected: &[GpuInfo],
    present: &[GpuInfo],
    samples: &[GpuSample],
    lasting: &[(u32, String)],
) -> Outcome {
    let mut failures = Vec::new();
    let mut output = String::new();
    for gpu in expected {
        let mut problems = Vec::new();
        let sample = samples.iter().find(|s| s.index == gpu.index);
        if !present.iter().any(|p| p.uuid == gpu.uuid) {
            problems.push("missing from the inventory".to_owned());
        } else if let Some(s) = sample {
            problems.extend(
                lasting
                    .iter()
                    .filter(|(index, _)| *index == gpu.index)
                    .map(|(_, what)| what.clone()),
            );
            problems.extend(sample_problems(s));
        } else {
            problems.push("no health sample".to_owned());
        }
        let status = if problems.is_empty() {
            "ok".to_owned()
        } else {
            problems.join("; ")
        };
        let _ = writeln!(output, "GPU {} {}: {status}", gpu.index, gpu.uuid);
        failures.extend(
            problems
                .into_iter()
                .map(|p| format!("GPU {} {p}", gpu.index)),
        );
    }
    let summary = match failures.as_slice() {
        [] => "all checks passed".to_owned(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    };
    Outcome {
        passed: failures.is_empty(),
        summary,
        output,
    }
}

/// The lasting faults the protocol reads from `s` (the ones the coordinator's policy also
/// judges); throttling and a PCIe generation below its max come and go with load, so the
/// self-check leaves them to the coordinator.
fn sample_problems(s: &GpuSample) -> Vec<String> {
    sample_faults(s)
        .into_iter()
        .filter_map(|fault| match fault {
            SampleFault::UncorrectedEcc(n) => Some(format!("has {n} uncorrected ECC errors")),
            SampleFault::RetiredPagesPending => Some("has pages pending retirement".to_owned()),
            SampleFault::RowRemapFailed => Some("failed a row remap".to_owned()),
            SampleFault::NvLinksDown(links) => {
                let down: Vec<String> = links.iter().map(u32::to_string).collect();
                Some(format!("has NVLink {} down", down.join(", ")))
            }
            SampleFault::RowRemapPending => Some("has a row remap pending".to_owned()),
            SampleFault::PcieWidthBelowMax { current, max } => {
                Some(format!("runs PCIe x{current}, below its x{max}"))
            }
            SampleFault::HwSlowdown
            | SampleFault::ThermalThrottle
            | SampleFault::PowerBrake
            | SampleFault::PcieGenBelowMax { .. } => None,
        })
        .collect()
}

/// Runs `argv` (no shell), killing it at `timeout`; passes on exit status 0.
pub async fn run_command(argv: &[String], timeout: Duration) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return failed("no diagnostics command configured".to_owned());
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropping the wait on timeout kills it.
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start {program}: {e}")),
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => failed(format!(
            "{program} did not finish within {}; killed",
            humantime::format_duration(timeout)
        )),
        Ok(Err(e)) => failed(format!("waiting for {program} failed: {e}")),
        Ok(Ok(out)) => {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            let passed = out.status.success();
            let summary = if passed {
                format!("{program} passed")
            } else {
                format!("{program} failed ({})", out.status)
            };
            Outcome {
                passed,
                summary,
                output,
            }
        }
    }
}

/// The last `max` bytes of `s`, a character cut in two at the start dropped.
pub fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

/// At most `max` bytes, cut at a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::SimProbe;
    use crate::metrics::Metrics;

    fn sim(faults: &str) -> Result<(Vec<GpuInfo>, SimProbe), crate::gpu::GpuError> {
        let probe = SimProbe::new("n", 4);
        let expected = probe.inventory()?;
        probe.apply_fault_text(faults);
        Ok((expected, probe))
    }

    fn check(faults: &str) -> Result<Outcome, crate::gpu::GpuError> {
        let (expected, probe) = sim(faults)?;
        Ok(self_check(
            &expected,
            &probe.inventory()?,
            &probe.sample()?,
            &probe.lasting_problems(),
        ))
    }

    #[test]
    fn healthy_gpus_pass() -> Result<(), crate::gpu::GpuError> {
        let o = check("gpu=0 temp=90 ecc_corrected=5 hw_slowdown\n")?;
        assert!(o.passed, "{o:?}");
        assert_eq!(o.summary, "all checks passed");
        assert_eq!(o.output.lines().count(), 4);
        Ok(())
    }

    #[test]
    fn each_health_problem_fails_naming_the_gpu_and_check() -> Result<(), crate::gpu::GpuError> {
        for (fault, words) in [
            ("gpu=2 lost", "GPU 2 missing from the inventory"),
            (
                "gpu=1 ecc_uncorrected=2",
                "GPU 1 has 2 uncorrected ECC errors",
            ),
            (
                "gpu=3 retired_pending",
                "GPU 3 has pages pending retirement",
            ),
            ("gpu=0 remap_failure", "GPU 0 failed a row remap"),
            ("gpu=0 remap_pending", "GPU 0 has a row remap pending"),
            ("gpu=1 nvlink_down=7", "GPU 1 has NVLink 7 down"),
            ("gpu=2 pcie_width=8", "GPU 2 runs PCIe x8, below its x16"),
        ] {
            let o = check(fault)?;
            assert!(!o.passed, "{fault}");
            assert_eq!(o.summary, words, "{fault}");
        }
        let o = check("gpu=0 lost\ngpu=1 remap_failure\n")?;
        assert_eq!(o.summary, "GPU 0 missing from the inventory (and 1 more)");
        Ok(())
    }

    #[test]
    fn a_fatal_xid_fails_diagnostics_until_the_fault_file_says_ok()
    -> Result<(), crate::gpu::GpuError> {
        let (expected, probe) = sim("gpu=3 xid=79\n")?;
        let run = |probe: &SimProbe| -> Result<Outcome, crate::gpu::GpuError> {
            Ok(self_check(
                &expected,
                &probe.inventory()?,
                &probe.sample()?,
                &probe.lasting_problems(),
            ))
        };
        let o = run(&probe)?;
        assert!(!o.passed, "{o:?}");
        assert_eq!(
            o.summary,
            "GPU 3 has not recovered from XID 79 (GPU has fallen off the bus) (simulated: a \
             `gpu=3 ok` line in the fault file repairs it)"
        );
        // The file re-read, another fault added: the GPU is still broken.
        probe.apply_fault_text("gpu=3 xid=79\ngpu=0 temp=60\n");
        assert!(!run(&probe)?.passed);
        probe.apply_fault_text("gpu=3 xid=79\ngpu=0 temp=60\ngpu=3 ok\n");
        let o = run(&probe)?;
        assert!(o.passed, "{o:?}");
        // An application XID is the job's fault: the GPU is fine.
        probe.apply_fault_text("gpu=1 xid=13\n");
        assert!(run(&probe)?.passed);
        Ok(())
    }

    #[tokio::test]
    async fn the_builtin_diagnostic_reports_a_simulated_fatal_xid()
    -> Result<(), Box<dyn std::error::Error>> {
        let (expected, probe) = sim("gpu=2 xid=48\n")?;
        let (sink, _source) = crate::events::channel(Metrics::new("simulated", &[], "h"));
        let diagnostics = Diagnostics {
            probe: Arc::new(probe),
            expected,
            command: Vec::new(),
            sink,
        };
        let d = diagnostics.run(7, Duration::from_secs(5)).await;
        assert!(!d.passed, "{d:?}");
        assert!(
            d.summary.starts_with("GPU 2 has not recovered from XID 48"),
            "{}",
            d.summary
        );
        assert!(d.output.contains("GPU 2 GPU-"), "{}", d.output);
        Ok(())
    }

    /// Only the coordinator used to ignore the links of a GPU that says it has no NVLink.
    #[test]
    fn links_of_a_gpu_without_nvlink_do_not_fail_the_check() {
        let s = GpuSample {
            nvlinks: vec![vigil_proto::v1::NvLinkStatus {
                link: 0,
                active: false,
                ..Default::default()
            }],
            nvlink_supported: Some(false),
            ..Default::default()
        };
        assert_eq!(sample_problems(&s), Vec::<String>::new());
    }

    #[tokio::test]
    async fn configured_command_passes_on_exit_zero_with_its_output() {
        let argv = |s: &str| vec!["sh".to_owned(), "-c".to_owned(), s.to_owned()];
        let ok = run_command(&argv("echo out; echo err >&2"), Duration::from_secs(5)).await;
        assert!(ok.passed);
        assert_eq!(ok.output, "out\nerr\n");
        let bad = run_command(&argv("exit 3"), Duration::from_secs(5)).await;
        assert!(!bad.passed);
        assert!(bad.summary.contains("exit status: 3"), "{}", bad.summary);
        let missing = run_command(&["/nonexistent/diag".to_owned()], Duration::from_secs(5)).await;
        assert!(!missing.passed && missing.summary.contains("cannot start"));
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_and_fails() {
        let started = Instant::now();
        let argv = ["sleep".to_owned(), "30".to_owned()];
        let o = run_command(&argv, Duration::from_millis(200)).await;
        assert!(!o.passed);
        assert!(o.summary.contains("killed"), "{}", o.summary);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn output_is_cut_at_a_character_boundary() {
        assert_eq!(truncate("héllo".to_owned(), 2), "h");
        assert_eq!(truncate("abc".to_owned(), 64), "abc");
        assert_eq!(
            truncate("x".repeat(70_000), MAX_OUTPUT_BYTES).len(),
            MAX_OUTPUT_BYTES
        );
    }

    #[tokio::test]
    async fn a_request_is_answered_with_an_event_naming_its_id()
    -> Result<(), Box<dyn std::error::Error>> {
        let (expected, probe) = sim("gpu=1 nvlink_down=2\n")?;
        let (sink, mut source) = crate::events::channel(Metrics::new("simulated", &[], "h"));
        let diagnostics = Arc::new(Diagnostics {
            probe: Arc::new(probe),
            expected,
            command: Vec::new(),
            sink,
        });
        diagnostics.spawn(42, 0, Vec::new());
        let event = tokio::time::timeout(Duration::from_secs(5), source.next()).await?;
        let Some(Kind::Diagnostics(d)) = event.kind else {
            return Err("not a diagnostics result".into());
        };
        assert_eq!(d.command_id, 42);
        assert!(!d.passed);
        assert_eq!(d.summary, "GPU 1 has NVLink 2 down");
        assert_eq!(d.command, "builtin simulated self-check");
        Ok(())
    }
}
