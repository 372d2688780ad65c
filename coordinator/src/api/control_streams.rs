//! The long-lived clusterctl streams: `events [--follow]` and `job logs`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::debug;
use vigil_proto::v1;

use crate::engine::{EngineHandle, Event, Snapshot};
use crate::error::ControlError;
use crate::metrics::Metrics;

pub type EventStream = ReceiverStream<Result<v1::ClusterEvent, Status>>;
pub type LogStream = ReceiverStream<Result<v1::LogChunk, Status>>;

const DEFAULT_BACKLOG: usize = 50;
const MAX_BACKLOG: usize = 1000;
const DEFAULT_TAIL: u64 = 8 * 1024;
const MAX_TAIL: u64 = 1024 * 1024;
/// Largest piece asked of an agent at once.
const READ_CHUNK: u32 = 64 * 1024;
/// How often a followed log is read again.
const FOLLOW_POLL: Duration = Duration::from_millis(500);
const STREAM_QUEUE: usize = 256;

/// Counts an open stream for `vigil_control_streams` while it lives.
struct StreamGuard(Arc<Metrics>);

impl StreamGuard {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.control_streams.inc();
        Self(metrics)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.control_streams.dec();
    }
}

fn matches(e: &v1::ClusterEvent, req: &v1::WatchEventsRequest) -> bool {
    (req.node.is_empty() || e.node == req.node) && (req.job.is_empty() || e.job == req.job)
}

/// Past events of the snapshot, oldest first, filtered.
fn backlog(snap: &Snapshot, req: &v1::WatchEventsRequest) -> Vec<v1::ClusterEvent> {
    let nodes = snap.nodes.iter().flat_map(|n| {
        n.events.iter().map(|e| v1::ClusterEvent {
            at_unix_ms: e.at_unix_ms,
            kind: e.kind.clone(),
            node: n.record.name.clone(),
            job: String::new(),
            message: e.message.clone(),
        })
    });
    let jobs = snap.jobs.iter().flat_map(|j| {
        j.events.iter().map(|e| v1::ClusterEvent {
            at_unix_ms: e.at_ms,
            kind: e.kind.clone(),
            node: String::new(),
            job: j.id.clone(),
            message: e.message.clone(),
        })
    });
    let mut all: Vec<v1::ClusterEvent> = nodes.chain(jobs).filter(|e| matches(e, req)).collect();
    all.sort_by_key(|e| e.at_unix_ms);
    let n = match req.backlog as usize {
        0 => DEFAULT_BACKLOG,
        n => n.min(MAX_BACKLOG),
    };
    all.split_off(all.len().saturating_sub(n))
}

/// What tells two copies of one event apart from two events.
type EventKey = (u64, String, String, String, String);

fn key(e: &v1::ClusterEvent) -> EventKey {
    (
        e.at_unix_ms,
        e.kind.clone(),
        e.node.clone(),
        e.job.clone(),
        e.message.clone(),
    )
}

pub fn watch_events(
    engine: &EngineHandle,
    metrics: Arc<Metrics>,
    req: v1::WatchEventsRequest,
) -> EventStream {
    // Subscribe before reading the snapshot, so nothing falls between them.
    let mut live = engine.subscribe();
    let past = backlog(&engine.snapshot(), &req);
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    tokio::spawn(async move {
        let _guard = StreamGuard::new(metrics);
        // An event published between the subscription and the snapshot is in both: skip the
        // live copy of what the backlog already sent. (Not by timestamp: the coordinator's
        // wall clock may step back, and later events would look older.)
        let mut sent: std::collections::HashSet<EventKey> = past.iter().map(key).collect();
        for e in past {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        if !req.follow {
            return;
        }
        loop {
            match live.recv().await {
                Ok(e) if matches(&e, &req) && !sent.remove(&key(&e)) => {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let gap = v1::ClusterEvent {
                        kind: "gap".into(),
                        message: format!("{n} events were dropped: this reader fell behind"),
                        ..Default::default()
                    };
                    if tx.send(Ok(gap)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

/// One node's worker log of the job's current attempt.
struct Source {
    node: String,
    rank: u32,
    attempt: u64,
    offset: i64,
}

pub fn job_logs(
    engine: &EngineHandle,
    metrics: Arc<Metrics>,
    req: v1::JobLogsRequest,
) -> Result<LogStream, ControlError> {
    crate::limits::check_job_id_arg(&req.id).map_err(ControlError::InvalidArgument)?;
    let snap = engine.snapshot();
    let job =
        snap.jobs.iter().find(|j| j.id == req.id).ok_or_else(|| {
            ControlError::State(crate::state::StateError::UnknownJob(req.id.clone()))
        })?;
    if !req.node.is_empty() && !job.workers.contains_key(&req.node) {
        return Err(ControlError::InvalidArgument(format!(
            "node {:?} runs no worker of job {} (attempt {}); clusterctl job show {} lists its nodes",
            req.node, job.id, job.attempt, job.id
        )));
    }
    let tail = match req.tail_bytes {
        0 => DEFAULT_TAIL,
        n => n.min(MAX_TAIL),
    };
    let tail = i64::try_from(tail).unwrap_or(i64::MAX);
    let mut sources: Vec<Source> = job
        .workers
        .iter()
        .filter(|(n, _)| req.node.is_empty() || **n == req.node)
        .map(|(n, w)| Source {
            node: n.clone(),
            rank: w.node_rank,
            attempt: job.attempt,
            offset: -tail,
        })
        .collect();
    sources.sort_by_key(|s| s.rank);
    let job_id = job.id.clone();
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let engine = engine.clone();
    tokio::spawn(async move {
        let _guard = StreamGuard::new(metrics);
        loop {
            for s in &mut sources {
                if let Err(status) = pump(&engine, &job_id, s, &tx).await {
                    if tx.send(Err(status)).await.is_err() {
                        return;
                    }
                    return;
                }
            }
            if !req.follow || tx.is_closed() {
                return;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Read what is new in one source and send it on.
async fn pump(
    engine: &EngineHandle,
    job_id: &str,
    s: &mut Source,
    tx: &mpsc::Sender<Result<v1::LogChunk, Status>>,
) -> Result<(), Status> {
    loop {
        let read = v1::ReadLog {
            job_id: job_id.to_owned(),
            attempt: s.attempt,
            offset: s.offset,
            max_bytes: READ_CHUNK,
        };
        let node = s.node.clone();
        let data = engine
            .ask(|reply| Event::ReadLog { node, read, reply })
            .await
            .map_err(Status::from)?;
        if !data.found {
            debug!(node = %s.node, job = %job_id, "no log yet");
            return Ok(());
        }
        s.offset = i64::try_from(data.next_offset).unwrap_or(i64::MAX);
        let full = data.data.len() >= READ_CHUNK as usize;
        if !data.data.is_empty() {
            let chunk = v1::LogChunk {
                node: s.node.clone(),
                node_rank: s.rank,
                attempt: s.attempt,
                data: data.data,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(());
            }
        }
        if !full {
            return Ok(());
        }
    }
}
