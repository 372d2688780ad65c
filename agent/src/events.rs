//! Events the coordinator must hear at once (XID, lost GPU, diagnostics, workers, checkpoints), queued while no session is up.
//!
//! Producers (the NVML event thread, the sampler, the fault-file watcher, a
//! diagnostics task, the worker supervisor) hold an [`EventSink`]; the reconnect loop holds the one
//! [`EventSource`] and hands it to each session in turn. The channel itself is
//! the queue: while no session reads it, up to [`QUEUE`] events wait there.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};
use vigil_proto::v1::AgentEvent;
use vigil_proto::v1::agent_event::Kind;

use crate::metrics::Metrics;

/// Events kept while the coordinator is out of reach; older ones win, newer ones are dropped.
pub const QUEUE: usize = 256;

/// The producers' end; clones share the queue.
#[derive(Clone)]
pub struct EventSink {
    /// The [`EventSource`] holds the receiving end.
    tx: mpsc::Sender<AgentEvent>,
    /// Wakes the session for an immediate heartbeat; the [`EventSource`] waits on it.
    changed: Arc<Notify>,
    metrics: Metrics,
}

/// The session's end: events in arrival order, and the "GPU state changed" signal.
pub struct EventSource {
    rx: mpsc::Receiver<AgentEvent>,
    /// Taken from the channel but not sent: the session ended first.
    unsent: VecDeque<AgentEvent>,
    changed: Arc<Notify>,
    /// Keeps [`Self::next`] from ever seeing a closed channel.
    _keepalive: mpsc::Sender<AgentEvent>,
}

pub fn channel(metrics: Metrics) -> (EventSink, EventSource) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let changed = Arc::new(Notify::new());
    let source = EventSource {
        rx,
        unsent: VecDeque::new(),
        changed: Arc::clone(&changed),
        _keepalive: tx.clone(),
    };
    (
        EventSink {
            tx,
            changed,
            metrics,
        },
        source,
    )
}

impl EventSink {
    /// The agent's metrics, for what is counted beside the events.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts, logs and queues `event`, and asks for a fresh heartbeat; never blocks.
    pub fn emit(&self, event: AgentEvent) {
        self.metrics.count_event(&event);
        match &event.kind {
            Some(Kind::Xid(x)) => {
                warn!(gpu = x.gpu_index, uuid = %x.gpu_uuid, xid = x.xid, "XID error");
            }
            Some(Kind::GpuLost(l)) => {
                warn!(gpu = l.gpu_index, uuid = %l.gpu_uuid, "GPU lost");
            }
            Some(Kind::Diagnostics(d)) => info!(
                command_id = d.command_id,
                passed = d.passed,
                summary = %d.summary,
                "diagnostics finished"
            ),
            Some(Kind::RemediationResult(r)) => info!(
                step = r.step_id,
                ok = r.ok,
                command = %r.command,
                "remediation result"
            ),
            // The worker supervisor (and the evidence capture, the preflight) log their own
            // decisions.
            Some(
                Kind::WorkerStarted(_)
                | Kind::WorkerExited(_)
                | Kind::Checkpoint(_)
                | Kind::CheckpointScan(_)
                | Kind::LogData(_)
                | Kind::HangEvidence(_)
                | Kind::PreflightResult(_),
            )
            | None => {}
        }
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => warn!(
                queue = QUEUE,
                "event queue full (coordinator out of reach); event dropped"
            ),
            // The agent is shutting down.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        self.changed();
    }

    /// GPU state changed (a fault injected, an ECC event): the session heartbeats now.
    pub fn changed(&self) {
        self.changed.notify_one();
    }

    /// True once the agent has shut down; event sources stop then.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl EventSource {
    /// The next event to send; cancel-safe, so it can sit in a `select!`.
    pub async fn next(&mut self) -> AgentEvent {
        if let Some(event) = self.unsent.pop_front() {
            return event;
        }
        match self.rx.recv().await {
            Some(event) => event,
            // Unreachable while `_keepalive` lives; wait forever rather than spin.
            None => std::future::pending().await,
        }
    }

    /// An event already waiting, if any.
    pub fn try_next(&mut self) -> Option<AgentEvent> {
        self.unsent.pop_front().or_else(|| self.rx.try_recv().ok())
    }

    /// Returns an event the session could not send; it goes first next time.
    pub fn put_back(&mut self, event: AgentEvent) {
        self.unsent.push_front(event);
    }

    /// Notified when a producer signalled a change; a signal sent while no one
    /// waits is kept, so a session that starts later still heartbeats at once.
    pub fn changed_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.changed)
    }
}

#[cfg(test)]
mod tests {
    use vigil_proto::v1::XidError;

    use super::*;

    fn xid(code: u32) -> AgentEvent {
        AgentEvent {
            at_unix_ms: 1,
            kind: Some(Kind::Xid(XidError {
                gpu_index: 0,
                xid: code,
                gpu_uuid: "GPU-0".into(),
            })),
        }
    }

    #[tokio::test]
    async fn events_wait_in_order_and_put_back_events_go_first() {
        let (sink, mut source) = channel(Metrics::new("simulated", &[], "host"));
        sink.emit(xid(79));
        sink.emit(xid(48));
        let first = source.next().await;
        source.put_back(first.clone());
        assert_eq!(source.next().await, first);
        assert_eq!(source.try_next(), Some(xid(48)));
        assert_eq!(source.try_next(), None);
        // Every emit asked for a heartbeat; the permit is kept until someone waits.
        let changed = source.changed_signal();
        let woke =
            tokio::time::timeout(std::time::Duration::from_secs(1), changed.notified()).await;
        assert!(woke.is_ok());
    }

    #[test]
    fn a_full_queue_drops_new_events_instead_of_blocking() {
        let (sink, mut source) = channel(Metrics::new("simulated", &[], "host"));
        for i in 0..(QUEUE as u32 + 10) {
            sink.emit(xid(i + 1));
        }
        let mut n = 0;
        while let Some(e) = source.try_next() {
            n += 1;
            if n == 1 {
                assert_eq!(e, xid(1), "the oldest events are kept");
            }
        }
        assert_eq!(n, QUEUE);
    }

    #[test]
    fn sink_sees_when_the_agent_shut_down() {
        let (sink, source) = channel(Metrics::new("simulated", &[], "host"));
        assert!(!sink.is_closed());
        drop(source);
        assert!(sink.is_closed());
    }
}
