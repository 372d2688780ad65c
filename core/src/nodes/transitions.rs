//! Node transitions, pure (a registration is in `register`): a heartbeat, an agent's event (an XID, a lost GPU),
//! silence, a coordinator's stall, an operator's cordon and uncordon; each judges the node's
//! health again and cordons one that turns Unhealthy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use vigil_proto::{heartbeat_form, v1};

use crate::breaker::{Breaker, gate};
use crate::config::{HealthConfig, LivenessConfig};
use crate::health;
use crate::liveness;
use crate::node::{
    Availability, Cordon, CordonSource, DiagnosticsRecord, Node, NodeEvent, SampleBase,
};
use crate::state::{ClusterState, Effect, Ignored, Now, StateError, record};
use crate::time::Instant;

impl ClusterState {
    pub fn heartbeat(
        &mut self,
        node_name: &str,
        session: u64,
        mut hb: v1::Heartbeat,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let cfg = self.health.clone();
        let known = self.nodes.len();
        let node = live_session(&mut self.nodes, node_name, session)?;
        let mut effects = Vec::new();
        if hb.gpu_health_unchanged {
            compact_samples(node, &hb.telemetry, now, &cfg, &mut effects);
        } else {
            full_samples(node, std::mem::take(&mut hb.gpus), now, &cfg);
        }
        node.health.fabric.judge(
            &hb.fabric,
            hb.fabric_read,
            hb.sent_at_unix_ms,
            now.mono_ms(),
            &cfg.fabric,
        );
        if hb.fabric_read || !hb.fabric.is_empty() {
            node.last_fabric = Arc::new(hb.fabric);
        }
        node.workers = Arc::new(hb.workers);
        hear_from(node, now, "heartbeat resumed", &mut effects);
        effects.extend(judge(node, &mut self.breaker, known, now, &cfg));
        let workers = node.workers.clone();
        effects.extend(self.worker_progress(node_name, &workers, now));
        Ok(effects)
    }

    /// An immediate event from the agent: an XID or a lost GPU.
    pub fn agent_event(
        &mut self,
        node_name: &str,
        session: u64,
        event: &v1::AgentEvent,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let cfg = self.health.clone();
        let known = self.nodes.len();
        let node = live_session(&mut self.nodes, node_name, session)?;
        let mut effects = Vec::new();
        hear_from(node, now, "agent spoke again", &mut effects);
        let observed = if event.at_unix_ms == 0 {
            now.wall_ms
        } else {
            event.at_unix_ms
        };
        let (gpu, reported_uuid, what) = match &event.kind {
            Some(v1::agent_event::Kind::Xid(x)) => (x.gpu_index, &x.gpu_uuid, Some(x.xid)),
            Some(v1::agent_event::Kind::GpuLost(g)) => (g.gpu_index, &g.gpu_uuid, None),
            Some(
                v1::agent_event::Kind::WorkerStarted(_)
                | v1::agent_event::Kind::WorkerExited(_)
                | v1::agent_event::Kind::Checkpoint(_)
                | v1::agent_event::Kind::CheckpointScan(_),
            ) => {
                if let Some(v1::agent_event::Kind::WorkerExited(x)) = &event.kind {
                    // What the agent runs is its last report, less what has exited since.
                    Arc::make_mut(&mut node.workers)
                        .retain(|w| !(w.job_id == x.job_id && w.attempt == x.attempt));
                }
                effects.extend(self.worker_event(node_name, event, now));
                return Ok(effects);
            }
            Some(v1::agent_event::Kind::RemediationResult(r)) => {
                effects.extend(self.remediation_result(node_name, r, now));
                return Ok(effects);
            }
            Some(v1::agent_event::Kind::HangEvidence(e)) => {
                effects.extend(self.hang_evidence(node_name, e, now));
                return Ok(effects);
            }
            Some(v1::agent_event::Kind::PreflightResult(r)) => {
                effects.extend(self.preflight_result(node_name, r, now));
                return Ok(effects);
            }
            Some(v1::agent_event::Kind::Diagnostics(_) | v1::agent_event::Kind::LogData(_))
            | None => return Ok(effects),
        };
        let uuid = if reported_uuid.is_empty() {
            node.record
                .gpus
                .iter()
                .find(|g| g.index == gpu)
                .map(|g| g.uuid.clone())
                .unwrap_or_default()
        } else {
            reported_uuid.clone()
        };
        let event = match what {
            Some(xid) => {
                let class = node
                    .health
                    .on_xid(gpu, &uuid, xid, observed, now.mono_ms(), &cfg);
                effects.push(Effect::Xid {
                    node: node_name.to_owned(),
                    gpu,
                    xid,
                    class,
                });
                let class_name = format!("{class:?}").to_lowercase();
                NodeEvent {
                    at_unix_ms: observed,
                    kind: "xid".into(),
                    message: format!(
                        "{} on GPU {gpu} ({uuid}), class {class_name}",
                        crate::xid::label(xid)
                    ),
                    gpu_index: Some(gpu),
                }
            }
            None => {
                node.health.on_gpu_lost(gpu, &uuid, observed);
                NodeEvent {
                    at_unix_ms: observed,
                    kind: "gpu-lost".into(),
                    message: format!("GPU {gpu} ({uuid}) lost"),
                    gpu_index: Some(gpu),
                }
            }
        };
        effects.push(record(node, event));
        effects.extend(judge(node, &mut self.breaker, known, now, &cfg));
        Ok(effects)
    }

    /// Any other message of a live session also proves the agent alive.
    pub fn heard(
        &mut self,
        node_name: &str,
        session: u64,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let node = self.live_session(node_name, session)?;
        let mut effects = Vec::new();
        hear_from(node, now, "agent spoke again", &mut effects);
        Ok(effects)
    }

    /// Record something the agent service noticed about a live session (e.g. `throttled`) in
    /// the node's history, where `clusterctl node` and `events` show it.
    pub fn flag(
        &mut self,
        node_name: &str,
        session: u64,
        kind: &str,
        message: String,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let node = self.live_session(node_name, session)?;
        let event = NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: kind.to_owned(),
            message,
            gpu_index: None,
        };
        Ok(vec![record(node, event)])
    }

    /// Keep a diagnostic result: it decides whether an auto cordon may be lifted.
    pub fn record_diagnostics(
        &mut self,
        name: &str,
        result: DiagnosticsRecord,
    ) -> Result<Vec<Effect>, StateError> {
        let node = self.node_mut(name)?;
        let verdict = if result.passed { "passed" } else { "FAILED" };
        let event = NodeEvent {
            at_unix_ms: result.finished_at_unix_ms,
            kind: "diagnostics".into(),
            message: format!(
                "diagnostics {verdict} ({}): {}",
                result.command, result.summary
            ),
            gpu_index: None,
        };
        Arc::make_mut(&mut node.record).last_diagnostics = Some(result);
        let persist = Effect::Persist((*node.record).clone());
        Ok(vec![persist, record(node, event)])
    }

    pub fn disconnected(&mut self, node_name: &str, session: u64, now: Now) -> Vec<Effect> {
        let cfg = self.liveness;
        let Ok(node) = self.live_session(node_name, session) else {
            return Vec::new();
        };
        node.session = None;
        let mut effects = Vec::new();
        reevaluate(node, now, &cfg, "agent stream closed", &mut effects);
        effects
    }

    /// Apply the passage of time: silent nodes become Unreachable, then
    /// Lost; health warnings age out of their window.
    pub fn tick(&mut self, now: Now) -> Vec<Effect> {
        self.tick_heard_until(now, now.mono)
    }

    /// [`Self::tick`], judging silence as of `heard_until`: the last moment the coordinator
    /// had taken in every agent message received before it. A coordinator that fell behind
    /// its queue (a reconnect storm on too few cores) has not read the heartbeats of the last
    /// seconds yet; their senders are not silent, and must not go `Unreachable`, `Lost`
    /// (their work given away) or into the lemon ledger for the coordinator's own backlog.
    /// The backlog forgiven is capped at `lost_after`, so a dead node is still found, at
    /// worst one `lost_after` late, however far behind the coordinator is. Forgiving only
    /// delays a `Lost` verdict, never advances one: the agent's lease is unaffected.
    pub fn tick_heard_until(&mut self, now: Now, heard_until: Instant) -> Vec<Effect> {
        let floor = now.mono.saturating_sub(self.liveness.lost_after);
        let judged_at = heard_until.min(now.mono).max(floor);
        let judged = Now {
            mono: judged_at,
            wall_ms: now.wall_ms,
        };
        let mut effects = Vec::new();
        let known = self.nodes.len();
        for node in self.nodes.values_mut() {
            reevaluate(node, judged, &self.liveness, "no heartbeat", &mut effects);
            if !node.health.event_findings.is_empty() {
                effects.extend(judge(node, &mut self.breaker, known, now, &self.health));
            }
        }
        effects
    }

    /// An agent's stream was accepted with a `Register` for `node` from host `machine_id`
    /// (session `session`), not stepped yet. Its lease may be renewed at once only if no
    /// decision has given, or can soon give, the node's work away:
    /// - the node is known (a new node has no work to keep) and not `Lost` (a `Lost` node's
    ///   work has been given away: its agent must let its lease run out);
    /// - the host is the one the name is bound to (another host's contact must not keep the
    ///   name's owner from being found lost, nor renew anything of it);
    /// - this session has not registered yet (its `Registered` renewed the lease already).
    ///
    /// Then the node's silence starts again now: it cannot go `Lost` before `lost_after` from
    /// now, and the agent's lease (shorter than `lost_after`) runs out first. Its availability
    /// is left as it is (no session yet) and it does not count as heard since start (a node
    /// that never registers is spared in the lemon ledger as before). The engine steps
    /// contacts and ticks in one task, so a renewal and a `Lost` verdict never cross.
    pub fn contact(&mut self, node: &str, session: u64, machine_id: &str, now: Now) -> Vec<Effect> {
        let Some(n) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        let same_host = crate::identity::same_host(&n.record.machine_id, machine_id);
        if !same_host || n.availability == Availability::Lost || n.session == Some(session) {
            return Vec::new();
        }
        n.silent_since = n.silent_since.max(now.mono);
        vec![Effect::LeaseRenewal {
            node: node.to_owned(),
            session,
        }]
    }

    /// This coordinator did not run for `gap` (SIGSTOP, a paused VM, a
    /// blocked disk): the silence and the missing progress in that time are
    /// its own, so shift every clock by the gap, as a restart would. No node
    /// is `Lost` and no job hung for it; an agent whose lease ran out in the
    /// meantime re-registers without its workers, and its jobs restart once.
    pub fn forgive_stall(&mut self, gap: Duration, now: Now) {
        for node in self.nodes.values_mut() {
            node.silent_since = (node.silent_since + gap).min(now.mono);
        }
        for worker in self.jobs.values_mut().flat_map(|j| j.workers.values_mut()) {
            worker.progress_mono = (worker.progress_mono + gap).min(now.mono);
        }
    }

    pub fn cordon(
        &mut self,
        name: &str,
        reason: String,
        source: CordonSource,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        // A cordon that is applied supersedes a held one: the node is out of service now.
        let mut effects = Vec::new();
        if self.nodes.contains_key(name) && self.breaker.held.remove(name).is_some() {
            effects.push(Effect::PersistBreaker(Box::new(self.breaker.clone())));
        }
        let node = self.node_mut(name)?;
        let since_unix_ms = node
            .record
            .cordon
            .as_ref()
            .map_or(now.wall_ms, |c| c.since_unix_ms);
        let cordon = Cordon {
            reason,
            source,
            since_unix_ms,
        };
        if node.record.cordon.as_ref() == Some(&cordon) {
            return Ok(effects);
        }
        Arc::make_mut(&mut node.record).cordon = Some(cordon.clone());
        let event = cordon_event(&cordon, now.wall_ms);
        effects.extend([
            Effect::Persist((*node.record).clone()),
            record(node, event),
            Effect::Cordoned {
                node: name.to_owned(),
                cordon,
                rule: crate::kinds::CordonRule::Manual,
                observed_at_ms: None,
            },
        ]);
        Ok(effects)
    }

    /// Lift a cordon. An automatic one needs diagnostics that passed after
    /// it was set, or `force`; a node that needs repair (the remediation ladder's end) needs
    /// `force` whatever its diagnostics, and a forced uncordon clears its ladder. The policy
    /// forgets the event evidence (the operator says the node is fixed); sample rules still
    /// apply.
    pub fn uncordon(
        &mut self,
        name: &str,
        force: bool,
        now: Now,
    ) -> Result<Vec<Effect>, StateError> {
        let cfg = self.health.clone();
        self.refuse_needs_repair(name, force)?;
        if let Some(why) = self
            .nodes
            .get(name)
            .and_then(|n| self.lemons.blocks(&n.record))
        {
            return Err(StateError::Blocklisted {
                node: name.to_owned(),
                why,
            });
        }
        let burn_in = self.burn_in.on_uncordon;
        let known = self.nodes.len();
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownNode(name.to_owned()))?;
        let repaired = super::remediation_steps::forget_needs_repair(node);
        let Some(previous) = node.record.cordon.clone() else {
            return Ok(if repaired {
                vec![Effect::Persist((*node.record).clone())]
            } else {
                Vec::new()
            });
        };
        let diagnosed = node
            .record
            .last_diagnostics
            .as_ref()
            .is_some_and(|d| d.passed && d.finished_at_unix_ms >= previous.since_unix_ms);
        if previous.source == CordonSource::Auto && !diagnosed && !force {
            return Err(StateError::NeedsDiagnostics {
                node: name.to_owned(),
                reason: previous.reason,
            });
        }
        if burn_in {
            // The operator says it is fixed; the burn-in decides.
            node.health.clear_events();
            return Ok(self.start_burn_in(name, "uncordon", now));
        }
        Arc::make_mut(&mut node.record).cordon = None;
        node.health.clear_events();
        let how = match (force && !diagnosed, repaired) {
            (_, true) => " (forced; needs-repair cleared)",
            (true, false) => " (forced)",
            (false, false) => "",
        };
        let event = NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: "uncordon".into(),
            message: format!("uncordoned{how}; was: {}", previous.reason),
            gpu_index: None,
        };
        let mut effects = vec![Effect::Persist((*node.record).clone()), record(node, event)];
        effects.push(Effect::Uncordoned {
            node: name.to_owned(),
            previous,
        });
        effects.extend(judge(node, &mut self.breaker, known, now, &cfg));
        Ok(effects)
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut Node, StateError> {
        self.nodes
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownNode(name.to_owned()))
    }

    fn live_session(&mut self, name: &str, session: u64) -> Result<&mut Node, StateError> {
        live_session(&mut self.nodes, name, session)
    }
}

/// `name`'s node if `session` is its live one (a free function, so that the caller may borrow
/// the state's other fields beside it).
fn live_session<'a>(
    nodes: &'a mut BTreeMap<String, Node>,
    name: &str,
    session: u64,
) -> Result<&'a mut Node, StateError> {
    let node = nodes
        .get_mut(name)
        .ok_or_else(|| StateError::UnknownNode(name.to_owned()))?;
    if node.session != Some(session) {
        return Err(StateError::StaleSession {
            node: name.to_owned(),
            session,
        });
    }
    Ok(node)
}

/// Judge a heartbeat's full GPU samples: they are the node's samples from now on, and what
/// the session's compact heartbeats are read against.
fn full_samples(node: &mut Node, samples: Vec<v1::GpuSample>, now: Now, cfg: &HealthConfig) {
    let used = node.health.counters.used_links(&samples);
    node.health.sample_findings = health::judge_samples(&node.record.gpus, &used, cfg);
    node.health
        .counters
        .judge(&samples, now.mono_ms(), &cfg.rates);
    node.last_samples = Arc::new(samples);
    node.sample_base = SampleBase::Held;
}

/// Judge a heartbeat that says the GPUs' health is as in the session's last full samples:
/// the node's samples become those with `telemetry` merged in, judged as a full heartbeat
/// with those samples would be, less what provably gives the same answer (which NVLinks are
/// in use). Without full samples this session (an agent must send them first) the node's GPU
/// state stays as it is, GPU count unjudged, reported once per session.
fn compact_samples(
    node: &mut Node,
    telemetry: &[v1::GpuTelemetry],
    now: Now,
    cfg: &HealthConfig,
    effects: &mut Vec<Effect>,
) {
    match node.sample_base {
        SampleBase::Held => {
            let samples = Arc::make_mut(&mut node.last_samples);
            heartbeat_form::merge_telemetry(samples, telemetry);
            let used = node.health.counters.used_links_again(samples);
            node.health.sample_findings = health::judge_samples(&node.record.gpus, &used, cfg);
            node.health
                .counters
                .judge(samples, now.mono_ms(), &cfg.rates);
        }
        SampleBase::Missing => {
            node.sample_base = SampleBase::MissingReported;
            effects.push(Effect::Ignored {
                reason: format!(
                    "node {}: a heartbeat said GPU health is unchanged before any full GPU \
                     sample of its session; its GPU state is kept as it was",
                    node.record.name
                ),
                why: Ignored::GpuTelemetryWithoutSamples,
            });
        }
        SampleBase::MissingReported => {}
    }
}

/// The agent just spoke: restart its silence clock and, if it was not Ready, say so.
pub(super) fn hear_from(node: &mut Node, now: Now, why: &'static str, effects: &mut Vec<Effect>) {
    node.silent_since = now.mono;
    node.heard_since_start = true;
    if node.availability != Availability::Ready {
        let from = node.availability;
        node.availability = Availability::Ready;
        node.availability_since_unix_ms = now.wall_ms;
        effects.push(Effect::Availability {
            node: node.record.name.clone(),
            from: Some(from),
            to: Availability::Ready,
            why,
        });
    }
}

fn reevaluate(
    node: &mut Node,
    now: Now,
    cfg: &LivenessConfig,
    why: &'static str,
    effects: &mut Vec<Effect>,
) {
    let to = liveness::availability(node.silent_since, node.session.is_some(), now.mono, cfg);
    if to != node.availability {
        let from = node.availability;
        node.availability = to;
        node.availability_since_unix_ms = now.wall_ms;
        effects.push(Effect::Availability {
            node: node.record.name.clone(),
            from: Some(from),
            to,
            why,
        });
    }
}

fn cordon_event(cordon: &Cordon, at_unix_ms: u64) -> NodeEvent {
    NodeEvent {
        at_unix_ms,
        kind: "cordon".into(),
        message: format!("cordoned ({}): {}", cordon.source.as_str(), cordon.reason),
        gpu_index: None,
    }
}

impl ClusterState {
    /// Judge `node` again after a finding outside the health policy changed
    /// (a straggler flag).
    pub fn rejudge(&mut self, name: &str, now: Now) -> Vec<Effect> {
        let cfg = self.health.clone();
        let known = self.nodes.len();
        let mut effects = Vec::new();
        if let Some(node) = self.nodes.get_mut(name) {
            effects.extend(judge(node, &mut self.breaker, known, now, &cfg));
        }
        effects
    }
}

/// Re-judge a node's health: report a changed condition, and cordon a node that is Unhealthy
/// and not cordoned yet (source `auto`) unless the cordon breaker holds it (`known`: how many
/// nodes the cluster has, for the breaker's cap).
pub(crate) fn judge(
    node: &mut Node,
    breaker: &mut Breaker,
    known: usize,
    now: Now,
    cfg: &HealthConfig,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    node.health.expire(now.mono_ms(), cfg);
    let to = node.health.condition();
    if to != node.condition {
        let reasons = node.health.reasons();
        let from = std::mem::replace(&mut node.condition, to);
        let message = match reasons.first() {
            Some(r) => format!("condition {} -> {}: {r}", from.as_str(), to.as_str()),
            None => format!("condition {} -> {}", from.as_str(), to.as_str()),
        };
        effects.push(record(
            node,
            NodeEvent {
                at_unix_ms: now.wall_ms,
                kind: "condition".into(),
                message,
                gpu_index: None,
            },
        ));
        effects.push(Effect::Condition {
            node: node.record.name.clone(),
            from,
            to,
            reasons,
        });
    }
    if node.record.cordon.is_some() {
        return effects;
    }
    let Some(finding) = node.health.first_unhealthy().cloned() else {
        return effects;
    };
    let rule = crate::kinds::CordonRule::Health(finding.rule);
    if !gate(
        breaker,
        node,
        known,
        rule,
        &finding.message,
        now,
        &mut effects,
    ) {
        return effects;
    }
    let cordon = Cordon {
        reason: finding.message.clone(),
        source: CordonSource::Auto,
        since_unix_ms: now.wall_ms,
    };
    Arc::make_mut(&mut node.record).cordon = Some(cordon.clone());
    effects.push(Effect::Persist((*node.record).clone()));
    effects.push(record(node, cordon_event(&cordon, now.wall_ms)));
    effects.push(Effect::Cordoned {
        node: node.record.name.clone(),
        cordon,
        rule,
        observed_at_ms: Some(finding.observed_at_ms),
    });
    effects
}

#[cfg(test)]
#[path = "transitions_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "compact_heartbeat_tests.rs"]
mod compact_heartbeat_tests;
