//! What a starting agent does with the workers an earlier agent recorded: re-adopt each whose
//! shim still runs, report each that ended meanwhile, stop the orphans of an agent from before
//! shims (see the module doc of [`super::super`]).

use std::time::Duration;

use tracing::{error, info, warn};
use vigil_proto::v1::agent_event::Kind;

use super::super::record::{self, Record};
use super::super::spawn::Paths;
use super::super::worker::{Proc, Shim};
use super::super::{Key, ORPHAN_REASON};
use super::{Supervisor, exited};
use crate::checkpoint::Watcher;

impl Supervisor {
    /// Takes over the workers an earlier agent left running (see the module doc of [`super`]):
    /// re-adopts each one whose shim still runs, reports each that ended meanwhile, and stops
    /// the orphans of an agent from before shims.
    pub(super) fn adopt(&mut self) {
        let records = match record::load(&self.config.state_dir) {
            Ok(records) => records,
            Err(e) => {
                let path = record::path(&self.config.state_dir);
                error!(
                    path = %path.display(),
                    error = %e,
                    "cannot read the worker record; workers of an earlier agent may still be running (their shims stop them when the lease runs out)"
                );
                return;
            }
        };
        for r in records {
            let key = Key {
                job_id: r.job_id.clone(),
                attempt: r.attempt,
            };
            let paths = Paths::new(&self.config.state_dir, &r.job_id, r.attempt, r.node_rank);
            if let Some(shim_pid) = r.shim_pid {
                let shim = Shim {
                    pid: shim_pid,
                    start_time: r.shim_start_time,
                    dir: paths.dir.clone(),
                    child: None,
                };
                let mut r = r;
                let cut_short = shim.alive() && r.pid == 0 && !fill_in_started(&mut r, &shim);
                if cut_short {
                    // Its start was cut short by the agent's end: no one ever learned of it.
                    warn!(job_id = %key.job_id, attempt = key.attempt, shim_pid, "a shim still starting when the agent ended never said its worker runs; stopping it");
                    shim.signal(nix::sys::signal::Signal::SIGKILL);
                    for _ in 0..100 {
                        if !shim.alive() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                if !cut_short && shim.alive() {
                    info!(
                        job_id = %key.job_id,
                        attempt = key.attempt,
                        pid = r.pid,
                        shim_pid,
                        "re-adopted worker of job {} attempt {} (pid {}) from its shim (pid {shim_pid}): it keeps running",
                        key.job_id, key.attempt, r.pid
                    );
                    let watcher = r
                        .checkpoint_dir
                        .clone()
                        .zip(r.checkpoint_layout.as_deref().and_then(|l| l.parse().ok()))
                        .map(|(dir, layout)| {
                            Watcher::new(dir, layout).with_world_size(r.world_size)
                        });
                    let grace = r
                        .stop_grace_ms
                        .map_or(self.config.stop_grace, Duration::from_millis);
                    self.add(
                        r,
                        paths.progress,
                        Proc::Shim(Box::new(shim)),
                        watcher,
                        grace,
                    );
                    self.sink.metrics().count_adopted("running");
                    continue;
                }
                // Its shim ended while no agent ran; the guard took any straggler with it.
                super::super::group::signal_group(r.pgid, nix::sys::signal::Signal::SIGKILL);
                let ended = shim.ended(None);
                let (exit_code, signal) = (ended.exit_code, ended.signal);
                let (stopped, reason) = if cut_short {
                    (
                        true,
                        format!(
                            "the agent ended while starting it: its shim (pid {shim_pid}) never \
                             said the worker runs; stopped it"
                        ),
                    )
                } else {
                    let (stopped, how) = ended.outcome();
                    (stopped, format!("while the agent was down: {how}"))
                };
                info!(job_id = %key.job_id, attempt = key.attempt, pid = r.pid, "worker of an earlier agent ended {reason}");
                let mut event = exited(&key, stopped, reason, Some(&r.log_path));
                if let Some(Kind::WorkerExited(report)) = &mut event.kind {
                    report.exit_code = exit_code;
                    report.signal = signal;
                }
                self.emit(event);
                self.sink.metrics().count_adopted("ended");
                continue;
            }
            if !r.still_running() {
                info!(job_id = %key.job_id, attempt = key.attempt, pid = r.pid, "worker recorded by an earlier agent is already gone");
                let reason =
                    "agent restarted; the worker had already exited (status unknown)".to_owned();
                self.emit(exited(&key, false, reason, Some(&r.log_path)));
                self.sink.metrics().count_adopted("ended");
                continue;
            }
            self.sink.metrics().count_adopted("orphan");
            let grace = self.config.stop_grace;
            self.add(r, paths.progress, Proc::Orphan, None, grace);
            self.order_stop(&key, ORPHAN_REASON, None);
        }
        self.persist();
    }
}

/// A record made while its shim was starting has no worker yet: takes the worker's pids from the
/// shim's status, which the shim writes before it answers (waiting a little for a shim that is
/// just starting); false when they never come.
fn fill_in_started(r: &mut Record, shim: &Shim) -> bool {
    let path = shim.dir.join(crate::shim::STATUS_FILE);
    for _ in 0..50 {
        if let Ok(Some(status)) = crate::shim::read_json::<crate::shim::Status>(&path)
            && status.running.shim_pid == shim.pid
        {
            r.pid = status.running.worker_pid;
            r.pgid = status.running.pgid;
            r.start_time = super::super::group::start_time(r.pid);
            return true;
        }
        if !shim.alive() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
