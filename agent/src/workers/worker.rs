//! One worker's task: waits for its process, stops it on order, polls its progress, reports its end.
//!
//! The task owns the process (or, for an orphan of an earlier agent, only its
//! group id). It reports to the supervisor exactly once, after the whole
//! process group is dead: a training script's children must not outlive it.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{Instrument, info, warn};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::{AgentEvent, CheckpointSeen, WorkerExited};

use super::Key;
use super::group;
use super::progress::Progress;
use crate::checkpoint::{self, Watcher};
use crate::events::EventSink;
use crate::shim;
use crate::unix_ms;

/// How often the progress file is read.
pub const PROGRESS_POLL: Duration = Duration::from_millis(200);
/// How often node rank 0 scans the checkpoint dir.
pub const CHECKPOINT_POLL: Duration = Duration::from_secs(1);
/// After SIGKILL, how long the group may take to vanish before the report goes out anyway.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// The protocol's bound on `WorkerExited.log_tail`.
pub const LOG_TAIL_BYTES: u64 = 4 * 1024;

/// Stop this worker: SIGTERM now, SIGKILL after `grace`. A second order may shorten the grace.
#[derive(Debug, Clone)]
pub struct StopOrder {
    pub reason: String,
    pub grace: Duration,
}

/// What the task reports once the group is dead.
#[derive(Debug)]
pub struct Exit {
    pub key: Key,
    pub report: WorkerExited,
}

/// The process a task watches.
pub enum Proc {
    /// The worker's shim: it owns the worker, stops it on order and records its exit.
    Shim(Box<Shim>),
    /// Left by an agent from before shims: only its group can be watched.
    Orphan,
}

/// How long past a stop's grace the agent waits for a shim before it kills the shim and the
/// worker's group itself.
pub const SHIM_STOP_MARGIN: Duration = Duration::from_secs(3);

/// A worker's shim, started by this agent (`child`) or by an earlier one (re-adopted).
pub struct Shim {
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat`): a recycled pid is not our shim.
    pub start_time: Option<u64>,
    /// The attempt dir: the shim's status and stop files.
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl Shim {
    /// True while the shim runs (a zombie has ended).
    pub fn alive(&self) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        match group::read_stat(pid) {
            None => false,
            Some(stat) => stat.live() && self.start_time.is_none_or(|t| t == stat.start_time),
        }
    }

    /// Sends `signal` to the shim, if it is still ours.
    pub fn signal(&self, signal: Signal) {
        if self.alive()
            && let Ok(pid) = i32::try_from(self.pid)
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Asks the shim to stop its worker: the order on disk first, then SIGTERM.
    fn order_stop(&self, order: &StopOrder) {
        let request = shim::StopRequest {
            reason: order.reason.clone(),
            grace_ms: u64::try_from(order.grace.as_millis()).unwrap_or(u64::MAX),
        };
        if let Err(e) = shim::write_json(&self.dir.join(shim::STOP_FILE), &request, false) {
            warn!(dir = %self.dir.display(), error = %e, "cannot write the stop order for the shim; signalling it anyway");
        }
        self.signal(Signal::SIGTERM);
    }

    /// How the worker ended, once the shim is gone.
    pub fn ended(&self, shim_status: Option<ExitStatus>) -> Ended {
        let status = shim::read_json::<shim::Status>(&self.dir.join(shim::STATUS_FILE));
        match status {
            Ok(Some(shim::Status {
                exit: Some(exit), ..
            })) => Ended {
                exit_code: exit.exit_code,
                signal: exit.signal,
                stopped: (exit.stopped && !exit.reason.is_empty()).then_some(exit.reason),
                note: None,
            },
            _ => {
                let how = shim_status.map_or_else(
                    || "while no agent was running".to_owned(),
                    |s| format!("({})", describe(Some(s))),
                );
                Ended {
                    note: Some(format!(
                        "its shim (pid {}) died {how} before the worker ended; the shim's guard \
                         killed the worker",
                        self.pid
                    )),
                    ..Ended::default()
                }
            }
        }
    }
}

/// How a worker ended, as far as the agent can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ended {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when its shim stopped it (asked to, or the lease ran out): why.
    pub stopped: Option<String>,
    /// Set when the exit is unknown but its cause is not (the shim died): what happened.
    pub note: Option<String>,
}

impl Ended {
    /// Whether it was stopped, and the reason line: the shim's stop reason, else what happened
    /// (the note), else its exit code or signal.
    pub fn outcome(self) -> (bool, String) {
        match (self.stopped, self.note) {
            (Some(reason), _) => (true, reason),
            (None, Some(note)) => (false, note),
            (None, None) => (false, describe_exit(self.exit_code, self.signal)),
        }
    }
}

/// Everything one worker task needs; the supervisor keeps the other ends.
pub struct Task {
    pub key: Key,
    pub pgid: i32,
    pub log_path: PathBuf,
    pub progress_path: PathBuf,
    pub proc: Proc,
    /// The supervisor holds the sender.
    pub stops: mpsc::UnboundedReceiver<StopOrder>,
    /// The supervisor reads it for heartbeats.
    pub progress: watch::Sender<Progress>,
    /// The supervisor's mailbox.
    pub exits: mpsc::UnboundedSender<Exit>,
    pub checkpoints: Option<Watcher>,
    pub sink: EventSink,
}

impl Task {
    pub fn spawn(self) {
        tokio::spawn(self.run().in_current_span());
    }

    async fn run(mut self) {
        let watcher = self.checkpoints.take().map(|w| {
            let key = self.key.clone();
            let sink = self.sink.clone();
            let (stop_tx, stop_rx) = oneshot::channel();
            let task = tokio::spawn(watch_checkpoints(w, key, sink, stop_rx).in_current_span());
            (stop_tx, task)
        });
        let (ended, stop) = self.wait_or_stop().await;
        // Stragglers of a leader that exited (or was killed) go too.
        group::signal_group(self.pgid, Signal::SIGKILL);
        if !group::wait_gone(self.pgid, REAP_TIMEOUT).await {
            warn!(
                job_id = %self.key.job_id,
                attempt = self.key.attempt,
                pgid = self.pgid,
                "process group still has live members after SIGKILL; reporting the worker gone anyway"
            );
        }
        // One last look once nothing can write any more: a checkpoint completed
        // since the last poll is reported before the exit, so the next attempt
        // resumes from it (the event queue keeps this order).
        if let Some((stop_tx, task)) = watcher {
            let _ = stop_tx.send(());
            if let Ok(Ok(mut w)) = tokio::time::timeout(FINAL_SCAN_TIMEOUT, task).await {
                let scan = tokio::time::timeout(FINAL_SCAN_TIMEOUT, scan(&w)).await;
                if let Ok(scan) = scan {
                    report(&mut w, scan, &self.key, &self.sink);
                }
            }
        }
        self.poll_progress().await;
        let log_path = self.log_path.clone();
        let log_tail = tokio::task::spawn_blocking(move || log_tail(&log_path))
            .await
            .unwrap_or_default();
        let (exit_code, signal) = (ended.exit_code, ended.signal);
        let (stopped, reason) = match stop {
            Some(reason) => (true, reason),
            None => ended.outcome(),
        };
        let report = WorkerExited {
            job_id: self.key.job_id.clone(),
            attempt: self.key.attempt,
            exit_code,
            signal,
            stopped,
            reason,
            log_path: self.log_path.display().to_string(),
            log_tail,
        };
        let _ = self.exits.send(Exit {
            key: self.key,
            report,
        });
    }

    /// Runs until the worker is gone; returns how it ended and the stop reason (if stopped).
    async fn wait_or_stop(&mut self) -> (Ended, Option<String>) {
        let mut stop: Option<String> = None;
        let mut kill_at: Option<Instant> = None;
        let mut ticker = tokio::time::interval(PROGRESS_POLL);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ended = wait(&mut self.proc, self.pgid) => return (ended, stop),
                Some(order) = self.stops.recv() => {
                    let margin = match &self.proc {
                        Proc::Shim(shim) => {
                            shim.order_stop(&order);
                            SHIM_STOP_MARGIN
                        }
                        Proc::Orphan => {
                            if stop.is_none() {
                                group::signal_group(self.pgid, Signal::SIGTERM);
                            }
                            Duration::ZERO
                        }
                    };
                    if stop.is_none() {
                        stop = Some(order.reason);
                    }
                    let at = Instant::now() + order.grace + margin;
                    kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                }
                () = crate::sleep_until(kill_at), if kill_at.is_some() => {
                    if let Proc::Shim(shim) = &self.proc {
                        warn!(
                            job_id = %self.key.job_id,
                            attempt = self.key.attempt,
                            shim_pid = shim.pid,
                            "the shim did not stop its worker within the grace; killing the shim and the worker's process group"
                        );
                        shim.signal(Signal::SIGKILL);
                    } else {
                        warn!(
                            job_id = %self.key.job_id,
                            attempt = self.key.attempt,
                            pgid = self.pgid,
                            "worker did not exit within its stop grace; sending SIGKILL to its process group"
                        );
                    }
                    group::signal_group(self.pgid, Signal::SIGKILL);
                    kill_at = None;
                }
                _ = ticker.tick() => self.poll_progress().await,
            }
        }
    }

    async fn poll_progress(&self) {
        if let Ok(text) = read_progress(&self.progress_path).await {
            let now = unix_ms();
            self.progress.send_if_modified(|p| p.observe(&text, now));
        }
    }
}

/// Resolves when the shim is gone (the worker with it), or the whole group is (an orphan).
async fn wait(proc: &mut Proc, pgid: i32) -> Ended {
    match proc {
        Proc::Shim(shim) => {
            let status = match &mut shim.child {
                Some(child) => child.wait().await.ok(),
                None => {
                    while shim.alive() {
                        tokio::time::sleep(group::POLL).await;
                    }
                    None
                }
            };
            shim.ended(status)
        }
        Proc::Orphan => {
            while group::group_alive(pgid) {
                tokio::time::sleep(group::POLL).await;
            }
            Ended::default()
        }
    }
}

/// The reason line of a worker that ended by itself.
pub fn describe(status: Option<ExitStatus>) -> String {
    describe_exit(
        status.and_then(|s| s.code()),
        status.and_then(|s| s.signal()),
    )
}

/// [`describe`], from an exit code or a signal number.
pub fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(0), _) => "exited successfully".to_owned(),
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(name) => format!("killed by signal {sig} ({name})"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "exited (status unknown)".to_owned(),
    }
}

/// The last lines of a log, at most [`LOG_TAIL_BYTES`]; empty if it cannot be read.
/// Most bytes of a progress file read: a step number and a newline.
const MAX_PROGRESS_BYTES: u64 = 64;

/// The progress file's text, read as the job cannot abuse: not through a symlink (the job may
/// own the directory), never blocking on a FIFO, only a regular file, and at most
/// [`MAX_PROGRESS_BYTES`].
pub async fn read_progress(path: &Path) -> std::io::Result<String> {
    use nix::fcntl::OFlag;
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)
        .await?;
    if !file.metadata().await?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_PROGRESS_BYTES)
        .read_to_string(&mut text)
        .await?;
    Ok(text)
}

pub fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(LOG_TAIL_BYTES);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
        // Cut mid-file: start at the next whole line, if there is one.
        let first_newline = bytes.iter().position(|&b| b == b'\n');
        match first_newline {
            Some(nl) if start > 0 && nl + 1 < bytes.len() => drop(bytes.drain(..=nl)),
            _ => {}
        }
        Ok(bytes)
    };
    let bytes = read().unwrap_or_default();
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    // Replacement characters may have grown it past the bound.
    let max = usize::try_from(LOG_TAIL_BYTES).unwrap_or(usize::MAX);
    while text.len() > max {
        let cut = text.len() - max;
        let at = (cut..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text.drain(..at);
    }
    text
}

/// Longest wait for the last checkpoint scan after a worker is gone.
const FINAL_SCAN_TIMEOUT: Duration = Duration::from_secs(2);

/// Node rank 0's checkpoint poller: each newly complete checkpoint is reported
/// once. Returns the watcher (and what it has reported) when told to stop.
async fn watch_checkpoints(
    mut watcher: Watcher,
    key: Key,
    sink: EventSink,
    mut stop: oneshot::Receiver<()>,
) -> Watcher {
    let mut ticker = tokio::time::interval(CHECKPOINT_POLL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return watcher,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            _ = &mut stop => return watcher,
            r = scan(&watcher) => r,
        };
        report(&mut watcher, result, &key, &sink);
    }
}

/// What one scan found: the newest complete checkpoint, and how long its
/// save took (when measurable).
type Scan = (
    std::io::Result<Option<checkpoint::Checkpoint>>,
    Option<(u64, u64)>,
);

/// Scan the checkpoint dir off the async threads: a hung network file
/// system blocks a blocking thread, not the worker's stop path.
async fn scan(watcher: &Watcher) -> Option<Scan> {
    let (dir, layout, world) = (watcher.dir.clone(), watcher.layout, watcher.world_size);
    tokio::task::spawn_blocking(move || {
        let found = checkpoint::latest_complete_with(&dir, layout, world);
        let save_ms = match &found {
            Ok(Some(c)) => checkpoint::save_timing(&dir, c, layout),
            _ => None,
        };
        (found, save_ms)
    })
    .await
    .ok()
}

fn report(watcher: &mut Watcher, scan: Option<Scan>, key: &Key, sink: &EventSink) {
    let Some((scan, timing)) = scan else { return };
    let save_ms = timing.map(|(ms, _)| ms);
    {
        if let Some(found) = watcher.observe(scan) {
            info!(
                job_id = %key.job_id,
                attempt = key.attempt,
                path = %found.path.display(),
                step = found.step,
                save_ms,
                "checkpoint seen"
            );
            sink.emit(AgentEvent {
                at_unix_ms: unix_ms(),
                kind: Some(Kind::Checkpoint(CheckpointSeen {
                    job_id: key.job_id.clone(),
                    attempt: key.attempt,
                    path: found.path.display().to_string(),
                    step: found.step,
                    save_ms,
                    completed_at_unix_ms: timing.map(|(_, at)| at),
                })),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_name_the_code_or_signal() {
        assert_eq!(
            describe(Some(ExitStatus::from_raw(0))),
            "exited successfully"
        );
        assert_eq!(
            describe(Some(ExitStatus::from_raw(3 << 8))),
            "exited with code 3"
        );
        assert_eq!(
            describe(Some(ExitStatus::from_raw(9))),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(describe(None), "exited (status unknown)");
    }

    #[tokio::test]
    async fn progress_is_read_bounded_and_never_through_a_link_or_a_fifo() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let progress = tmp.path().join("progress");
        std::fs::write(&progress, "42\n")?;
        assert_eq!(read_progress(&progress).await?, "42\n");
        std::fs::write(&progress, "7".repeat(1 << 20))?;
        assert_eq!(read_progress(&progress).await?.len(), 64, "bounded");
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, "13")?;
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&secret, &link)?;
        assert!(
            read_progress(&link).await.is_err(),
            "a symlink is not followed"
        );
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).map_err(std::io::Error::from)?;
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), read_progress(&fifo));
        assert!(
            read.await.is_ok_and(|r| r.is_err()),
            "a FIFO neither blocks nor counts"
        );
        Ok(())
    }

    #[test]
    fn log_tail_keeps_the_last_whole_lines_within_4_kib() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("rank0.log");
        assert_eq!(log_tail(&path), "", "missing log: empty tail");
        std::fs::write(&path, "short\nlog\n")?;
        assert_eq!(log_tail(&path), "short\nlog\n");
        let long: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &long)?;
        let tail = log_tail(&path);
        assert!(tail.len() <= 4096);
        assert!(tail.ends_with("line 999\n"));
        assert!(
            tail.starts_with("line "),
            "starts at a whole line: {:?}",
            &tail[..20]
        );
        Ok(())
    }

    #[test]
    fn log_tail_of_binary_garbage_stays_within_bounds() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("rank0.log");
        std::fs::write(&path, vec![0xffu8; 10_000])?;
        let tail = log_tail(&path);
        assert!(!tail.is_empty());
        assert!(tail.len() <= 4096);
        Ok(())
    }
}
