//! Starting a worker under its shim, and the lease file the shims enforce.

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};
use vigil_proto::v1::StartWorker;

use super::super::Key;
use super::super::confine;
use super::super::group::start_time;
use super::super::record::Record;
use super::super::spawn::{self, Launched, Paths, ShimSettings};
use super::super::worker::{Proc, Shim};
use super::{LEASE_WRITE_EVERY, Supervisor, exited, started};
use crate::checkpoint::Watcher;
use crate::shim::LeaseFile;
use crate::{error_chain, unix_ms};

impl Supervisor {
    pub(super) async fn launch(&mut self, start: StartWorker) {
        let key = Key {
            job_id: start.job_id.clone(),
            attempt: start.attempt,
        };
        let paths = Paths::new(
            &self.config.state_dir,
            &key.job_id,
            key.attempt,
            start.node_rank,
        );
        let confined = match self.config.confine.check(&start, confine::agent_uid()) {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("refused: {e}");
                warn!(job_id = %key.job_id, attempt = key.attempt, %reason, "worker not started: outside this node's limits");
                return self.emit(exited(&key, false, reason, None));
            }
        };
        let layout = match spawn::validate(&start) {
            Ok(layout) => layout,
            Err(e) => return self.cannot_start(&key, &e, &paths),
        };
        let grace = match start.stop_grace_ms {
            0 => self.config.stop_grace,
            ms => Duration::from_millis(ms),
        };
        // The new shim must find the lease this start came with.
        self.write_lease(true);
        let settings = ShimSettings {
            program: self.config.shim_program.clone(),
            lease_file: self.lease_file(),
            lease_stop_grace: self.config.lease_stop_grace,
            stop_grace: grace,
        };
        let starting = match spawn::spawn(&start, &paths, &confined, &settings).await {
            Ok(starting) => starting,
            Err(e) => return self.cannot_start(&key, &e, &paths),
        };
        // Recorded before its answer: an agent that dies now leaves a shim the next one finds.
        self.starting = Some(Record {
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            node_rank: start.node_rank,
            pid: 0,
            pgid: 0,
            log_path: paths.log.clone(),
            started_at_unix_ms: unix_ms(),
            start_time: None,
            shim_pid: Some(starting.shim_pid),
            shim_start_time: start_time(starting.shim_pid),
            checkpoint_dir: layout.and(confined.checkpoint_dir.clone()),
            checkpoint_layout: layout.map(|l| l.to_string()),
            world_size: crate::checkpoint::world_size(start.nnodes, &start.env),
            stop_grace_ms: Some(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)),
        });
        self.persist();
        let answer = starting.handshake().await;
        let provisional = self.starting.take();
        let Launched { shim, running } = match answer {
            Ok(launched) => launched,
            Err(e) => {
                self.persist();
                return self.cannot_start(&key, &e, &paths);
            }
        };
        let Some(provisional) = provisional else {
            return;
        };
        let record = Record {
            pid: running.worker_pid,
            pgid: running.pgid,
            start_time: start_time(running.worker_pid),
            shim_pid: Some(running.shim_pid),
            shim_start_time: provisional
                .shim_start_time
                .or_else(|| start_time(running.shim_pid)),
            ..provisional
        };
        let world = crate::checkpoint::world_size(start.nnodes, &start.env);
        let watcher = layout.and_then(|l| {
            Some(Watcher::new(confined.checkpoint_dir.clone()?, l).with_world_size(world))
        });
        info!(
            job_id = %key.job_id,
            attempt = key.attempt,
            rank = start.node_rank,
            pid = running.worker_pid,
            shim_pid = running.shim_pid,
            log = %paths.log.display(),
            "started worker of job {} attempt {} rank {} pid {} under shim pid {}",
            key.job_id, key.attempt, start.node_rank, running.worker_pid, running.shim_pid
        );
        let proc = Proc::Shim(Box::new(Shim {
            pid: running.shim_pid,
            start_time: record.shim_start_time,
            dir: paths.dir.clone(),
            child: Some(shim),
        }));
        self.add(record, paths.progress, proc, watcher, grace);
        self.persist();
        let event = self.workers.get(&key).map(|e| started(&e.record));
        if let Some(event) = event {
            self.emit(event);
        }
    }

    fn cannot_start(&self, key: &Key, e: &spawn::SpawnError, paths: &Paths) {
        let reason = error_chain(e);
        warn!(job_id = %key.job_id, attempt = key.attempt, %reason, "cannot start worker");
        let log = paths.log.exists().then_some(paths.log.as_path());
        self.emit(exited(key, false, reason, log));
    }

    fn lease_file(&self) -> PathBuf {
        self.config.state_dir.join(crate::shim::LEASE_FILE)
    }

    /// Tells the shims how long the lease runs: on every renewal (at most every
    /// [`LEASE_WRITE_EVERY`] unless `now`), and before a shim starts.
    pub(super) fn write_lease(&mut self, now: bool) {
        let Some(lease) = self.lease else { return };
        let at = Instant::now();
        if !now
            && self
                .lease_written
                .is_some_and(|w| at < w + LEASE_WRITE_EVERY)
        {
            return;
        }
        let file = LeaseFile::from_now(
            lease.deadline().saturating_duration_since(at),
            lease.duration(),
        );
        match crate::shim::write_json(&self.lease_file(), &file, false) {
            Ok(()) => {
                self.lease_written = Some(at);
                self.lease_write_failed = false;
            }
            Err(e) => {
                self.sink.metrics().lease_file_errors.inc();
                if !self.lease_write_failed {
                    error!(
                        path = %self.lease_file().display(),
                        error = %e,
                        "cannot renew the lease for the shims: they will stop their workers when the last lease they read runs out"
                    );
                }
                self.lease_write_failed = true;
            }
        }
    }
}
