//! Evidence from a hung attempt (Command.capture_evidence): before the worker is stopped, what
//! each of its processes is doing (Python stacks through `py-spy dump` where it is installed;
//! the kernel's view otherwise and besides: state, `wchan`, `/proc/PID/stack`), the last lines
//! of its log, and how the fabric counters rose since the attempt started on this node.
//!
//! The coordinator sends the capture just before the attempt's stop; a stop of a job with a
//! capture under way waits for it (at most [`HOLD_STOP`]), so the evidence is of the hung
//! processes, not of their shutdown. Everything read is bounded; what cannot be read is said.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{
    AgentEvent, CaptureEvidence, FabricDelta, FabricPort, HangEvidence, ProcessEvidence, ReadLog,
    StartWorker, StopWorkers,
};

use crate::events::EventSink;
use crate::fabric::FabricReader;
use crate::workers::Workers;

/// The longest a stop waits for a capture of its job.
pub const HOLD_STOP: Duration = Duration::from_secs(20);
/// Each `py-spy dump`.
const PY_SPY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PROCESSES: usize = 32;
/// Processes `py-spy dump` is run on (it takes a while each).
const MAX_PY_SPY: usize = 8;
const MAX_STACK: usize = 16 * 1024;
const MAX_LOG_TAIL: u32 = 4 * 1024;
/// Fabric baselines kept (one per attempt started here, newest kept).
const MAX_BASELINES: usize = 16;

/// The captures under way (by job) and each attempt's fabric counters at its start.
#[derive(Clone)]
pub struct Evidence {
    workers: Workers,
    fabric: FabricReader,
    state_dir: PathBuf,
    sink: EventSink,
    /// Job id -> a receiver that turns true when its capture ended.
    pending: Arc<Mutex<HashMap<String, watch::Receiver<bool>>>>,
    baselines: Arc<Mutex<Vec<Baseline>>>,
}

/// The fabric read when a (job, attempt) started here.
type Baseline = ((String, u64), Vec<FabricPort>);

impl Evidence {
    pub fn new(
        workers: Workers,
        fabric: FabricReader,
        state_dir: PathBuf,
        sink: EventSink,
    ) -> Self {
        Self {
            workers,
            fabric,
            state_dir,
            sink,
            pending: Arc::default(),
            baselines: Arc::default(),
        }
    }

    /// A worker of `start` is about to start: keep the fabric counters as its baseline (the
    /// first time: the coordinator re-sends a start until it is confirmed).
    pub fn on_start(&self, start: &StartWorker) {
        let key = (start.job_id.clone(), start.attempt);
        let known = |b: &[Baseline]| b.iter().any(|(k, _)| *k == key);
        if known(
            &self
                .baselines
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ) {
            return;
        }
        let fabric = self.fabric.clone();
        let baselines = Arc::clone(&self.baselines);
        tokio::task::spawn_blocking(move || {
            let ports = fabric.read();
            let mut b = baselines.lock().unwrap_or_else(PoisonError::into_inner);
            if b.iter().any(|(k, _)| *k == key) {
                return;
            }
            b.push((key, ports));
            if b.len() > MAX_BASELINES {
                b.remove(0);
            }
        });
    }

    /// Stop `stop`'s workers, once a capture of that job under way has ended.
    pub fn stop(&self, stop: StopWorkers) {
        let waiting = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&stop.job_id)
            .cloned();
        let Some(mut done) = waiting else {
            self.workers.stop_workers(stop);
            return;
        };
        let workers = self.workers.clone();
        tokio::spawn(async move {
            let ended = tokio::time::timeout(HOLD_STOP, done.wait_for(|d| *d)).await;
            if ended.is_err() {
                warn!(job_id = %stop.job_id, "evidence capture still running after {}; stopping anyway", humantime::format_duration(HOLD_STOP));
            }
            workers.stop_workers(stop);
        });
    }

    /// Capture the evidence of `cmd`'s attempt and send it as a `HangEvidence` event.
    pub fn capture(&self, cmd: CaptureEvidence) {
        let (done_tx, done_rx) = watch::channel(false);
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.get(&cmd.job_id).is_some_and(|d| !*d.borrow()) {
                return; // already under way
            }
            pending.insert(cmd.job_id.clone(), done_rx);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let evidence = this.collect(&cmd).await;
            info!(
                job_id = %cmd.job_id,
                attempt = cmd.attempt,
                processes = evidence.processes.len(),
                fabric_ports_with_rises = evidence.fabric.len(),
                error = %evidence.error,
                "captured evidence of a hung attempt"
            );
            this.sink.emit(AgentEvent {
                at_unix_ms: crate::unix_ms(),
                kind: Some(Kind::HangEvidence(evidence)),
            });
            let _ = done_tx.send(true);
            this.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&cmd.job_id);
        });
    }

    async fn collect(&self, cmd: &CaptureEvidence) -> HangEvidence {
        let mut out = HangEvidence {
            job_id: cmd.job_id.clone(),
            attempt: cmd.attempt,
            ..HangEvidence::default()
        };
        let worker = self
            .workers
            .list()
            .await
            .into_iter()
            .find(|w| w.job_id == cmd.job_id && w.attempt == cmd.attempt);
        let baseline = self
            .baselines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(k, _)| k.0 == cmd.job_id && k.1 == cmd.attempt)
            .map(|(_, ports)| ports.clone());
        let (fabric, state_dir, job, attempt) = (
            self.fabric.clone(),
            self.state_dir.clone(),
            cmd.job_id.clone(),
            cmd.attempt,
        );
        let pid = worker.as_ref().map(|w| w.pid);
        let read = tokio::task::spawn_blocking(move || {
            let processes = pid
                .map(|p| processes(Path::new("/proc"), p))
                .unwrap_or_default();
            let log = crate::workers::logs::read(
                &state_dir,
                0,
                &ReadLog {
                    job_id: job,
                    attempt,
                    offset: -i64::from(MAX_LOG_TAIL),
                    max_bytes: MAX_LOG_TAIL,
                },
            );
            let now = fabric.read();
            (
                processes,
                log.data,
                deltas(baseline.as_deref().unwrap_or(&[]), &now),
            )
        })
        .await;
        match read {
            Ok((processes, log_tail, fabric)) => {
                out.processes = processes;
                out.log_tail = log_tail;
                out.fabric = fabric;
            }
            Err(e) => out.error = format!("the capture task failed: {e}"),
        }
        if worker.is_none() {
            out.error = "no worker of this attempt runs on this node".into();
        }
        if let Some(py_spy) = find_on_path("py-spy") {
            for p in out.processes.iter_mut().take(MAX_PY_SPY) {
                p.python_stacks = py_spy_dump(&py_spy, p.pid).await;
            }
        }
        out
    }
}

/// Every process of `pid`'s process group (the worker's whole group), at most
/// [`MAX_PROCESSES`], read under `proc` (a fake tree in tests).
pub fn processes(proc: &Path, pid: u32) -> Vec<ProcessEvidence> {
    let pgid = process_group(proc, pid).unwrap_or(pid);
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| process_group(proc, *pid) == Some(pgid))
        .collect();
    pids.sort_unstable();
    pids.truncate(MAX_PROCESSES);
    pids.into_iter().map(|pid| process(proc, pid)).collect()
}

/// Field 5 of `/proc/PID/stat` (after the parenthesised command, which may hold spaces).
fn process_group(proc: &Path, pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok()
}

fn process(proc: &Path, pid: u32) -> ProcessEvidence {
    let dir = proc.join(pid.to_string());
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let state = read("status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("State:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default();
    ProcessEvidence {
        pid,
        comm: read("comm")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        state,
        wchan: read("wchan")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        kernel_stack: match read("stack") {
            Ok(s) => crate::diagnostics::truncate(s, MAX_STACK),
            Err(e) => format!("unreadable: {e}"),
        },
        python_stacks: String::new(),
    }
}

/// The rises of each port's counters from `before` to `now`; ports without any rise and
/// still up are left out, a port that is down now is kept (with its rises, if any).
pub fn deltas(before: &[FabricPort], now: &[FabricPort]) -> Vec<FabricDelta> {
    now.iter()
        .filter_map(|p| {
            let was = before
                .iter()
                .find(|b| b.kind == p.kind && b.device == p.device && b.port == p.port);
            let rise = |f: fn(&FabricPort) -> Option<u64>| {
                let (n, b) = (f(p).unwrap_or(0), was.and_then(f).unwrap_or(0));
                n.saturating_sub(b)
            };
            let d = FabricDelta {
                port: vigil_proto::fabric_port::port_name(p),
                state: p.state.clone(),
                link_downed: rise(|p| p.link_downed),
                link_error_recovery: rise(|p| p.link_error_recovery),
                symbol_error: rise(|p| p.symbol_error),
                port_rcv_errors: rise(|p| p.port_rcv_errors),
                port_xmit_discards: rise(|p| p.port_xmit_discards),
                carrier_changes: rise(|p| p.carrier_changes),
            };
            let rose = d.link_downed
                + d.link_error_recovery
                + d.symbol_error
                + d.port_rcv_errors
                + d.port_xmit_discards
                + d.carrier_changes
                > 0;
            (rose || !vigil_proto::fabric_port::is_up(p)).then_some(d)
        })
        .collect()
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

async fn py_spy_dump(py_spy: &Path, pid: u32) -> String {
    let run = tokio::process::Command::new(py_spy)
        .args(["dump", "--pid", &pid.to_string()])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(PY_SPY_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => crate::diagnostics::truncate(
            String::from_utf8_lossy(&out.stdout).into_owned(),
            MAX_STACK,
        ),
        Ok(Ok(out)) => format!(
            "py-spy dump failed ({}): {}",
            out.status,
            crate::diagnostics::tail(&String::from_utf8_lossy(&out.stderr), 512)
        ),
        Ok(Err(e)) => format!("py-spy dump could not run: {e}"),
        Err(_) => format!(
            "py-spy dump gave no answer within {}",
            humantime::format_duration(PY_SPY_TIMEOUT)
        ),
    }
}

#[cfg(test)]
#[path = "evidence_tests.rs"]
mod tests;
