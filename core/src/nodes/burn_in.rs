//! Burn-in before a node (re)joins, pure: a new node, or one an operator
//! uncordons, can be required (config) to pass a burn-in diagnostic (a
//! configurable command, e.g. `dcgmi diag -r 3`) before it is schedulable.
//! Meanwhile it is `Validating` (cordoned, source auto); a pass makes it
//! schedulable, a failure keeps it cordoned with the output attached (its
//! last diagnostics).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vigil_proto::v1;

use crate::node::{Availability, Cordon, CordonSource, NodeEvent};
use crate::state::{ClusterState, Effect, Now};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// `[burn_in]` in the coordinator's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BurnInConfig {
    /// A node registering for the first time is validated before use.
    pub on_join: bool,
    /// An operator's uncordon validates the node before it is schedulable.
    pub on_uncordon: bool,
    /// What the agent runs; empty: the agent's own `diagnostics_command`
    /// (or its built-in self-check).
    pub command: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for BurnInConfig {
    fn default() -> Self {
        Self {
            on_join: false,
            on_uncordon: false,
            command: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl BurnInConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout < Duration::from_secs(1) || self.timeout > Duration::from_secs(24 * 3600) {
            return Err(format!(
                "burn_in.timeout = {} must be between 1s and 24h",
                humantime::format_duration(self.timeout)
            ));
        }
        if self.command.first().is_some_and(String::is_empty) {
            return Err("burn_in.command starts with an empty program name; write e.g. [\"dcgmi\", \"diag\", \"-r\", \"3\"]".into());
        }
        Ok(())
    }
}

/// A node's pending burn-in (persisted on its record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurnIn {
    /// join or uncordon.
    pub why: String,
    pub requested_at_ms: u64,
    /// When the command went to the agent; `None` until the node is
    /// connected (and again after it disconnects: it is re-sent).
    pub sent_at_ms: Option<u64>,
    /// The same moment on the monotonic clock, which the timeout is measured on. Not
    /// persisted: after a coordinator restart a sent burn-in is timed from the restart.
    #[serde(skip)]
    pub sent_at: Option<crate::time::Instant>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ClusterState {
    /// New nodes get a burn-in when the config asks for one.
    pub fn burn_in_react(&mut self, effects: &[Effect], now: Now) -> Vec<Effect> {
        if !self.burn_in.on_join {
            return Vec::new();
        }
        let joined: Vec<String> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Availability {
                    node,
                    from: None,
                    to: Availability::Ready,
                    ..
                } => Some(node.clone()),
                _ => None,
            })
            .collect();
        joined
            .iter()
            .flat_map(|n| self.start_burn_in(n, "join", now))
            .collect()
    }

    /// Put `node` in `Validating`: cordoned until its burn-in passes.
    pub fn start_burn_in(&mut self, name: &str, why: &str, now: Now) -> Vec<Effect> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Vec::new();
        };
        if node.record.cordon.is_some() && why == "join" {
            // Already held back (a lemon, say): that decides.
            return Vec::new();
        }
        let what = if self.burn_in.command.is_empty() {
            "the agent's diagnostics".to_owned()
        } else {
            self.burn_in.command.join(" ")
        };
        let cordon = Cordon {
            reason: format!(
                "validating: burn-in ({what}) before it {}",
                if why == "join" { "joins" } else { "rejoins" }
            ),
            source: CordonSource::Auto,
            since_unix_ms: now.wall_ms,
        };
        let record = Arc::make_mut(&mut node.record);
        record.cordon = Some(cordon.clone());
        record.burn_in = Some(BurnIn {
            why: why.to_owned(),
            requested_at_ms: now.wall_ms,
            sent_at_ms: None,
            sent_at: None,
        });
        let event = NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: "burn-in".into(),
            message: format!("validating ({why}): {}", cordon.reason),
            gpu_index: None,
        };
        node.push_event(event.clone());
        vec![
            Effect::Persist((*node.record).clone()),
            Effect::Record {
                node: name.to_owned(),
                event,
            },
            Effect::Cordoned {
                node: name.to_owned(),
                cordon,
                rule: crate::kinds::CordonRule::BurnIn,
                observed_at_ms: None,
            },
        ]
    }

    /// Send pending burn-ins to connected nodes; fail those past the timeout.
    pub fn burn_in_tick(&mut self, now: Now) -> Vec<Effect> {
        let timeout = ms(self.burn_in.timeout);
        let deadline = self.burn_in.timeout + Duration::from_secs(10);
        let command = self.burn_in.command.clone();
        let mut effects = Vec::new();
        let mut expired = Vec::new();
        for (name, node) in self.nodes.iter_mut() {
            let Some(b) = node.record.burn_in.clone() else {
                continue;
            };
            let connected = node.availability == Availability::Ready && node.session.is_some();
            match b.sent_at_ms {
                None if connected => {
                    Arc::make_mut(&mut node.record).burn_in = Some(BurnIn {
                        sent_at_ms: Some(now.wall_ms),
                        sent_at: Some(now.mono),
                        ..b
                    });
                    effects.push(Effect::Command {
                        node: name.clone(),
                        kind: v1::command::Kind::RunDiagnostics(v1::RunDiagnostics {
                            timeout_ms: timeout,
                            command: command.clone(),
                        }),
                    });
                }
                Some(_) if !connected => {
                    // The result would be lost with the session: send again later.
                    Arc::make_mut(&mut node.record).burn_in = Some(BurnIn {
                        sent_at_ms: None,
                        sent_at: None,
                        ..b
                    });
                }
                Some(_) => match b.sent_at {
                    Some(sent) if now.mono.saturating_duration_since(sent) > deadline => {
                        expired.push(name.clone());
                    }
                    Some(_) => {}
                    // Loaded from the store: time it from now.
                    None => {
                        Arc::make_mut(&mut node.record).burn_in = Some(BurnIn {
                            sent_at: Some(now.mono),
                            ..b
                        });
                    }
                },
                _ => {}
            }
        }
        for name in expired {
            let why = format!(
                "no result within burn_in.timeout ({})",
                humantime::format_duration(self.burn_in.timeout)
            );
            effects.extend(self.finish_burn_in(&name, false, &why, now));
        }
        effects
    }

    /// A diagnostics result from `node`: the burn-in's, if one was sent.
    pub fn burn_in_result(
        &mut self,
        node: &str,
        passed: bool,
        summary: &str,
        now: Now,
    ) -> Vec<Effect> {
        let sent = self
            .nodes
            .get(node)
            .and_then(|n| n.record.burn_in.as_ref())
            .is_some_and(|b| b.sent_at_ms.is_some());
        if !sent {
            return Vec::new();
        }
        self.finish_burn_in(node, passed, summary, now)
    }

    fn finish_burn_in(&mut self, name: &str, passed: bool, summary: &str, now: Now) -> Vec<Effect> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Vec::new();
        };
        let record = Arc::make_mut(&mut node.record);
        record.burn_in = None;
        let previous = record.cordon.take();
        let mut effects = Vec::new();
        let message = if passed {
            if let Some(previous) = previous {
                effects.push(Effect::Uncordoned {
                    node: name.to_owned(),
                    previous,
                });
            }
            format!("burn-in passed ({summary}); schedulable")
        } else {
            let cordon = Cordon {
                reason: format!(
                    "burn-in failed: {summary} (clusterctl node {name} shows the output)"
                ),
                source: CordonSource::Auto,
                since_unix_ms: now.wall_ms,
            };
            record.cordon = Some(cordon.clone());
            effects.push(Effect::Cordoned {
                node: name.to_owned(),
                cordon,
                rule: crate::kinds::CordonRule::BurnIn,
                observed_at_ms: None,
            });
            format!("burn-in FAILED ({summary}); stays cordoned")
        };
        let event = NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: "burn-in".into(),
            message,
            gpu_index: None,
        };
        node.push_event(event.clone());
        effects.insert(0, Effect::Persist((*node.record).clone()));
        effects.insert(
            1,
            Effect::Record {
                node: name.to_owned(),
                event,
            },
        );
        effects
    }
}

#[cfg(test)]
#[path = "burn_in_tests.rs"]
mod tests;
