//! Requests that wait for an agent's answer: an operator's diagnostics and log reads. Their
//! timeouts run on tokio's monotonic clock; a request whose session ends is answered at once.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};
use vigil_proto::v1;

use super::{Engine, millis};
use crate::error::ControlError;
use crate::node::DiagnosticsRecord;

/// How long an agent gets to answer a log read.
const LOG_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time an agent gets past the diagnostic's own timeout to report it.
const DIAGNOSTICS_GRACE: Duration = Duration::from_secs(5);

type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// A diagnostic run an operator waits for.
struct PendingDiagnostics {
    node: String,
    session: u64,
    deadline: Instant,
    timeout: Duration,
    reply: Reply<DiagnosticsRecord>,
}

/// A log read an operator waits for.
struct PendingLog {
    session: u64,
    node: String,
    deadline: Instant,
    reply: Reply<v1::LogData>,
}

/// Every request waiting for an agent, by command id.
#[derive(Default)]
pub(super) struct Pending {
    next_command: u64,
    diagnostics: HashMap<u64, PendingDiagnostics>,
    logs: HashMap<u64, PendingLog>,
}

impl Pending {
    /// A fresh command id (ids start at 1).
    pub(super) fn next_id(&mut self) -> u64 {
        self.next_command += 1;
        self.next_command
    }

    /// Answer every request past its deadline.
    pub(super) fn expire(&mut self, now: Instant) {
        for (id, p) in take_where(&mut self.diagnostics, |p| p.deadline <= now) {
            warn!(node = %p.node, command_id = id, "diagnostics not reported in time");
            let secs = p.timeout.as_secs();
            p.reply
                .send(Err(ControlError::DiagnosticsTimeout { node: p.node, secs }))
                .ok();
        }
        for (_, p) in take_where(&mut self.logs, |p| p.deadline <= now) {
            p.reply.send(Err(ControlError::NotConnected(p.node))).ok();
        }
    }

    /// Answer every request of a session that ended.
    pub(super) fn session_ended(&mut self, session: u64) {
        for (_, p) in take_where(&mut self.diagnostics, |p| p.session == session) {
            p.reply.send(Err(ControlError::NotConnected(p.node))).ok();
        }
        for (_, p) in take_where(&mut self.logs, |p| p.session == session) {
            p.reply.send(Err(ControlError::NotConnected(p.node))).ok();
        }
    }

    /// A log read's answer, if it is the one waited for on this session.
    pub(super) fn log_data(&mut self, session: u64, data: &v1::LogData) {
        if let Some(p) = self.logs.remove(&data.command_id) {
            if p.session == session {
                p.reply.send(Ok(data.clone())).ok();
            } else {
                self.logs.insert(data.command_id, p);
            }
        }
    }

    /// The operator waiting for diagnostics `command_id` from `node`'s `session`, if any.
    pub(super) fn diagnostics_reply(
        &mut self,
        node: &str,
        session: u64,
        command_id: u64,
    ) -> Option<Reply<DiagnosticsRecord>> {
        let pending = self.diagnostics.remove(&command_id)?;
        if pending.node != node || pending.session != session {
            warn!(node = %node, command_id, "diagnostics result from the wrong session; not the one waited for");
            self.diagnostics.insert(command_id, pending);
            return None;
        }
        Some(pending.reply)
    }
}

impl Engine {
    pub(super) fn start_log_read(
        &mut self,
        node: String,
        read: v1::ReadLog,
        reply: Reply<v1::LogData>,
    ) {
        let Some((session, id)) = self.try_command(&node, v1::command::Kind::ReadLog(read)) else {
            reply.send(Err(ControlError::NotConnected(node))).ok();
            return;
        };
        self.pending.logs.insert(
            id,
            PendingLog {
                session,
                node,
                deadline: Instant::now() + LOG_READ_TIMEOUT,
                reply,
            },
        );
    }

    pub(super) fn start_diagnostics(
        &mut self,
        node: String,
        timeout: Duration,
        reply: Reply<DiagnosticsRecord>,
    ) {
        if !self.state.nodes.contains_key(&node) {
            reply
                .send(Err(crate::state::StateError::UnknownNode(node).into()))
                .ok();
            return;
        }
        let run = v1::command::Kind::RunDiagnostics(v1::RunDiagnostics {
            timeout_ms: millis(timeout),
            command: Vec::new(),
        });
        let Some((session, id)) = self.try_command(&node, run) else {
            reply.send(Err(ControlError::NotConnected(node))).ok();
            return;
        };
        info!(node = %node, command_id = id, timeout_s = timeout.as_secs(), "asked agent to run diagnostics");
        self.pending.diagnostics.insert(
            id,
            PendingDiagnostics {
                node,
                session,
                deadline: Instant::now() + timeout + DIAGNOSTICS_GRACE,
                timeout,
                reply,
            },
        );
    }
}

/// Remove and return the entries of `map` that `pred` selects.
fn take_where<P>(map: &mut HashMap<u64, P>, pred: impl Fn(&P) -> bool) -> Vec<(u64, P)> {
    let ids: Vec<u64> = map
        .iter()
        .filter(|(_, p)| pred(p))
        .map(|(id, _)| *id)
        .collect();
    ids.into_iter()
        .filter_map(|id| map.remove(&id).map(|p| (id, p)))
        .collect()
}
