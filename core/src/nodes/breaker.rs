//! The cordon circuit breaker, pure: a bad rule, a driver update or a flapping sensor must not
//! empty the fleet.
//!
//! Automatic cordons that take a schedulable node out of service (a health finding, a failed
//! triage, a lemon blocklisting) are counted in a sliding window on the monotonic clock, each
//! node once. The cap is the lower of `max_fraction` of the known nodes and `max_nodes`, but
//! never below one node. A cordon that would go past the cap opens the breaker; while it is open,
//! every further automatic cordon is *held*: the node is not cordoned, it carries a [`Held`]
//! record (rule, evidence, since) that `clusterctl` shows, and its history says
//! `cordon held: breaker open (...)`.
//!
//! What is never counted nor held: operator cordons; the recovery hold; burn-in (a node under
//! burn-in is being tested before it takes work, not evicted from it); a new reason on a node
//! that is already cordoned (it is out of service already).
//!
//! The breaker never closes by itself: a burst large enough to open it is exactly the case a
//! person must look at (is it the fleet, or the rule?), and a breaker that closed on a timer
//! would let the same bad rule cordon the next batch of nodes, window after window. An operator
//! closes it (`clusterctl breaker reset`, [`ClusterState::reset_breaker`]): a fresh window begins,
//! the held records are dropped, and the held nodes are judged again on fresh evidence only:
//! the evidence they were held on (their event findings and last samples) is forgotten, so
//! nothing from before the reset is replayed; a new XID, or the next heartbeat's samples, may
//! cordon them, within the cap.
//!
//! The breaker is persisted as one cluster-wide record (`Effect::PersistBreaker`), so a restart
//! does not close it. Monotonic instants mean nothing in another process: the cordons in the
//! window are reloaded as if made at the restart, so a restart can only lengthen the window by
//! the time the coordinator was down, never shorten it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kinds::CordonRule;
use crate::node::{CordonSource, Node, NodeEvent};
use crate::state::{ClusterState, Effect, Now, record};
use crate::time::Instant;

pub const DEFAULT_MAX_FRACTION: f64 = 0.1;
pub const DEFAULT_MAX_NODES: u32 = 50;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// The kind of the node events a hold records.
pub const EVENT_KIND: &str = "cordon-held";
/// The name of the persisted cluster-wide record.
pub const RECORD: &str = "cordon_breaker";

/// `[cordon_breaker]` in the coordinator's config.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// The cap as a fraction of the known nodes (rounded down).
    pub max_fraction: f64,
    /// The cap as a number of nodes, whatever the fleet's size.
    pub max_nodes: u32,
    /// How far back automatic cordons count.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            max_fraction: DEFAULT_MAX_FRACTION,
            max_nodes: DEFAULT_MAX_NODES,
            window: DEFAULT_WINDOW,
        }
    }
}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.max_fraction.is_finite() || self.max_fraction <= 0.0 || self.max_fraction > 1.0 {
            return Err(format!(
                "cordon_breaker.max_fraction = {} must be above 0 and at most 1 (0.1: a tenth of the nodes)",
                self.max_fraction
            ));
        }
        if self.max_nodes == 0 {
            return Err(
                "cordon_breaker.max_nodes = 0: use 1 or more (the cap is never below one node)"
                    .into(),
            );
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(7 * 86_400) {
            return Err(format!(
                "cordon_breaker.window = {} must be between 1s and 7d",
                humantime::format_duration(self.window)
            ));
        }
        Ok(())
    }

    /// How many automatic cordons the window allows with `known` nodes.
    pub fn cap(&self, known: usize) -> usize {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let by_fraction = (self.max_fraction * known as f64).floor() as usize;
        by_fraction
            .min(usize::try_from(self.max_nodes).unwrap_or(usize::MAX))
            .max(1)
    }

    /// "cap of 1 node (10% of 8 nodes, max_nodes 50)".
    pub fn describe_cap(&self, known: usize) -> String {
        let cap = self.cap(known);
        format!(
            "cap of {cap} node{} ({}% of {known} nodes, max_nodes {})",
            if cap == 1 { "" } else { "s" },
            self.max_fraction * 100.0,
            self.max_nodes
        )
    }
}

/// An automatic cordon applied, counted in the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counted {
    pub node: String,
    /// For display; the window is measured on `at`.
    pub at_unix_ms: u64,
    /// On this process's monotonic clock; a reload puts it at the restart.
    #[serde(skip)]
    pub at: Instant,
}

/// An automatic cordon the open breaker held: the node is not cordoned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The rule that would have cordoned it (`xid`, `triage`, `repeat_offender`, ...).
    pub rule: String,
    /// The evidence the cordon would have given as its reason.
    pub evidence: String,
    pub since_unix_ms: u64,
    /// The line recorded in the node's history.
    pub message: String,
}

/// When and why the breaker opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    pub since_unix_ms: u64,
    pub why: String,
}

/// The last operator reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    pub by: String,
    pub at_unix_ms: u64,
}

/// The breaker's state; all of it but `cfg` is persisted (the cluster record [`RECORD`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Breaker {
    #[serde(skip)]
    pub cfg: BreakerConfig,
    /// `Some` while open.
    pub open: Option<Opened>,
    /// The automatic cordons applied within the window, oldest first, each node once.
    pub window: Vec<Counted>,
    /// Nodes whose automatic cordon is held, by name.
    pub held: BTreeMap<String, Held>,
    pub last_reset: Option<Reset>,
}

/// What the breaker decided about one automatic cordon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Apply the cordon (it is counted).
    Apply,
    /// Hold it; `opened` is the log line when this cordon opened the breaker.
    Hold { opened: Option<String> },
    /// Held already: nothing new to say.
    HeldAlready,
}

impl Breaker {
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Drop the cordons that left the window; whether any did.
    pub fn prune(&mut self, now: Now) -> bool {
        let before = self.window.len();
        let window = self.cfg.window;
        self.window
            .retain(|c| now.mono.saturating_duration_since(c.at) < window);
        self.window.len() != before
    }

    /// "2 automatic cordons in the last 10m, cap 1".
    pub fn describe_window(&self, known: usize) -> String {
        let n = self.window.len();
        format!(
            "{n} automatic cordon{} in the last {}, cap {}",
            if n == 1 { "" } else { "s" },
            humantime::format_duration(self.cfg.window),
            self.cfg.cap(known)
        )
    }

    /// May an automatic cordon of `node` (not cordoned now) be applied at `now`, with `known`
    /// nodes in the cluster? Counts it if so; records the hold if not.
    pub fn admit(
        &mut self,
        node: &str,
        rule: CordonRule,
        evidence: &str,
        known: usize,
        now: Now,
    ) -> Admission {
        self.prune(now);
        if self.held.contains_key(node) {
            return Admission::HeldAlready;
        }
        let mut opened = None;
        if self.open.is_none() {
            if self.window.iter().any(|c| c.node == node) {
                return Admission::Apply;
            }
            if self.window.len() < self.cfg.cap(known) {
                self.window.push(Counted {
                    node: node.to_owned(),
                    at_unix_ms: now.wall_ms,
                    at: now.mono,
                });
                return Admission::Apply;
            }
            let why = format!(
                "cordon breaker opened: a cordon of {node} would make {} automatic cordons in {}, past the {}; holding further automatic cordons until clusterctl breaker reset",
                self.window.len() + 1,
                humantime::format_duration(self.cfg.window),
                self.cfg.describe_cap(known)
            );
            self.open = Some(Opened {
                since_unix_ms: now.wall_ms,
                why: why.clone(),
            });
            opened = Some(why);
        }
        let message = format!(
            "cordon held: breaker open ({}): {evidence}",
            self.describe_window(known)
        );
        self.held.insert(
            node.to_owned(),
            Held {
                rule: rule.as_str().to_owned(),
                evidence: evidence.to_owned(),
                since_unix_ms: now.wall_ms,
                message,
            },
        );
        Admission::Hold { opened }
    }

    /// Take the state loaded from the store, keeping this one's config; the counted cordons
    /// are put at `now` (see the module doc).
    pub fn restore(&mut self, stored: Breaker, now: Now) {
        let cfg = self.cfg;
        *self = stored;
        self.cfg = cfg;
        for c in &mut self.window {
            c.at = now.mono;
        }
    }

    /// Close it, begin a fresh window and drop the held records (returned).
    pub fn reset(&mut self, by: &str, now: Now) -> BTreeMap<String, Held> {
        self.open = None;
        self.window.clear();
        self.last_reset = Some(Reset {
            by: by.to_owned(),
            at_unix_ms: now.wall_ms,
        });
        std::mem::take(&mut self.held)
    }
}

/// Gate an automatic cordon of `node` (not cordoned now) through `breaker`: whether to apply it.
/// A hold is recorded in the node's history and persisted, with its effects, into `effects`.
pub(crate) fn gate(
    breaker: &mut Breaker,
    node: &mut Node,
    known: usize,
    rule: CordonRule,
    evidence: &str,
    now: Now,
    effects: &mut Vec<Effect>,
) -> bool {
    let name = node.record.name.clone();
    let counted = breaker.window.len();
    match breaker.admit(&name, rule, evidence, known, now) {
        Admission::Apply => {
            if breaker.window.len() != counted {
                effects.push(Effect::PersistBreaker(Box::new(breaker.clone())));
            }
            true
        }
        Admission::HeldAlready => false,
        Admission::Hold { opened } => {
            if let Some(message) = opened {
                effects.push(Effect::BreakerLog {
                    message,
                    warn: true,
                });
            }
            let message = breaker
                .held
                .get(&name)
                .map(|h| h.message.clone())
                .unwrap_or_default();
            effects.push(Effect::PersistBreaker(Box::new(breaker.clone())));
            effects.push(record(
                node,
                NodeEvent {
                    at_unix_ms: now.wall_ms,
                    kind: EVENT_KIND.into(),
                    message,
                    gpu_index: None,
                },
            ));
            effects.push(Effect::CordonHeld {
                node: name,
                rule,
                evidence: evidence.to_owned(),
            });
            false
        }
    }
}

impl ClusterState {
    /// An automatic cordon from a policy outside the health judgement (triage, the lemon
    /// blocklist), through the breaker when it would take a schedulable node out of service.
    pub(crate) fn auto_cordon(
        &mut self,
        name: &str,
        reason: String,
        rule: CordonRule,
        now: Now,
    ) -> Vec<Effect> {
        let known = self.nodes.len();
        let mut effects = Vec::new();
        if let Some(node) = self
            .nodes
            .get_mut(name)
            .filter(|n| n.record.cordon.is_none())
            && !gate(
                &mut self.breaker,
                node,
                known,
                rule,
                &reason,
                now,
                &mut effects,
            )
        {
            return effects;
        }
        let mut cordon = self
            .cordon(name, reason, CordonSource::Auto, now)
            .unwrap_or_default();
        for e in &mut cordon {
            if let Effect::Cordoned { rule: r, .. } = e {
                *r = rule;
            }
        }
        effects.extend(cordon);
        effects
    }

    /// Drop the cordons that left the window, and store the breaker when any did.
    pub fn breaker_tick(&mut self, now: Now) -> Vec<Effect> {
        if self.breaker.prune(now) {
            vec![Effect::PersistBreaker(Box::new(self.breaker.clone()))]
        } else {
            Vec::new()
        }
    }

    /// An operator closes the breaker (see the module doc): a fresh window, no held records,
    /// and every held node judged again with the evidence it was held on forgotten.
    pub fn reset_breaker(&mut self, by: &str, now: Now) -> Vec<Effect> {
        let was = match &self.breaker.open {
            Some(o) => format!(
                "open since {}",
                crate::recovery::format_time(o.since_unix_ms)
            ),
            None => "closed".to_owned(),
        };
        let held = self.breaker.reset(by, now);
        let mut effects = vec![
            Effect::PersistBreaker(Box::new(self.breaker.clone())),
            Effect::BreakerLog {
                message: format!(
                    "cordon breaker reset by {by} (was {was}): closed, a fresh window begins, {} held node(s) judged again on fresh evidence only",
                    held.len()
                ),
                warn: false,
            },
        ];
        let known = self.nodes.len();
        for (name, h) in held {
            let Some(node) = self.nodes.get_mut(&name) else {
                continue;
            };
            node.health.clear_events();
            node.health.clear_samples();
            effects.push(record(
                node,
                NodeEvent {
                    at_unix_ms: now.wall_ms,
                    kind: EVENT_KIND.into(),
                    message: format!(
                        "cordon hold released by breaker reset ({by}); not replayed: {}",
                        h.evidence
                    ),
                    gpu_index: None,
                },
            ));
            effects.extend(super::transitions::judge(
                node,
                &mut self.breaker,
                known,
                now,
                &self.health,
            ));
        }
        effects
    }
}

#[cfg(test)]
#[path = "breaker_tests.rs"]
mod tests;
