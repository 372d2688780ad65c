//! The gang preflight's spec (`[preflight]`) and records (a preflight, its rounds, groups and
//! results, persisted with the job), and how they read in the job's history and `clusterctl job
//! show`. The state machine is in `preflight`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::preflight_plan::{Outcome, Run};
use crate::commands::Sent;
use crate::time::Instant;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long past the command's own timeout (the agent kills it then) a round waits for answers.
pub const ANSWER_SLACK: Duration = Duration::from_secs(10);
/// Most bytes of a failed run's output kept in the record (the agent sends at most 4 KiB; a
/// passed run's is not kept): a gang of hundreds stays well inside one store value.
pub const MAX_OUTPUT_KEPT: usize = 512;
/// The variable telling the command which round it runs in.
pub const ROUND_VAR: &str = "VIGIL_PREFLIGHT_ROUND";

/// When the preflight runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum When {
    /// Before every attempt after the first.
    #[default]
    Restart,
    /// Before every attempt.
    Always,
}

/// `[preflight]` in the job spec; no command: none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreflightSpec {
    pub command: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub when: When,
}

impl Default for PreflightSpec {
    fn default() -> Self {
        Self {
            command: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            when: When::Restart,
        }
    }
}

impl PreflightSpec {
    pub fn is_off(&self) -> bool {
        self.command.is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.is_off() {
            return Ok(());
        }
        if self.command[0].trim().is_empty() {
            return Err("preflight.command names no program: give the program and its arguments, e.g. command = [\"torchrun\", \"/shared/allreduce.py\"], or remove [preflight]".into());
        }
        super::spec::check_command("preflight.command", &self.command)?;
        if self.timeout < MIN_TIMEOUT || self.timeout > MAX_TIMEOUT {
            return Err(format!(
                "preflight.timeout = {} must be between 1s and 1h",
                humantime::format_duration(self.timeout)
            ));
        }
        Ok(())
    }
}

/// A preflight of one attempt, persisted with the job (and kept on the attempt when done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preflight {
    pub attempt: u64,
    /// The gang, then the spares (from round 1, when they join).
    pub pool: Vec<String>,
    pub rounds: Vec<Round>,
    pub started_at_ms: u64,
    /// What it decided; empty while it runs.
    #[serde(default)]
    pub verdict: String,
    /// Nodes it proved good in groups: the next placement skips its preflight when made of them.
    #[serde(default)]
    pub cleared: BTreeSet<String>,
    /// Nodes it cordoned.
    #[serde(default)]
    pub bad: BTreeSet<String>,
    /// When the current round gives up on answers, unix ms (its record, for display and to
    /// re-arm `deadline` when a coordinator starts).
    pub deadline_ms: u64,
    #[serde(skip)]
    pub deadline: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    pub round: u32,
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// By rank within the group.
    pub nodes: Vec<String>,
    pub results: BTreeMap<String, NodeResult>,
    /// When each member's command last went out (not stored).
    #[serde(skip)]
    pub sent: BTreeMap<String, Sent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResult {
    pub passed: bool,
    pub why: String,
    pub duration_ms: u64,
    pub output: String,
}

impl Preflight {
    pub fn done(&self) -> bool {
        !self.verdict.is_empty()
    }

    pub(super) fn runs(&self) -> Vec<Vec<Run>> {
        self.rounds
            .iter()
            .map(|r| {
                r.groups
                    .iter()
                    .map(|g| Run {
                        nodes: g.nodes.clone(),
                        outcomes: g
                            .results
                            .iter()
                            .map(|(n, r)| {
                                let o = if r.passed {
                                    Outcome::Passed
                                } else {
                                    Outcome::Failed {
                                        why: r.why.clone(),
                                        output: r.output.clone(),
                                    }
                                };
                                (n.clone(), o)
                            })
                            .collect(),
                    })
                    .collect()
            })
            .collect()
    }

    pub(super) fn current(&self) -> Option<&Round> {
        self.rounds.last()
    }

    /// Every member of the current round answered.
    pub(super) fn round_complete(&self) -> bool {
        self.current().is_none_or(|r| {
            r.groups
                .iter()
                .all(|g| g.nodes.iter().all(|n| g.results.contains_key(n)))
        })
    }
}

/// How the current round ended, group by group, for the job's history.
pub(super) fn round_summary(p: &Preflight) -> Option<String> {
    p.current().map(|round| {
        format!(
            "preflight round {} ended: {}",
            round.round,
            groups_of(round)
        )
    })
}

/// The preflight as `clusterctl job show` prints it: a line per round, then the verdict.
pub fn describe(p: &Preflight) -> Vec<String> {
    let mut lines: Vec<String> = p
        .rounds
        .iter()
        .map(|r| format!("round {}: {}", r.round, groups_of(r)))
        .collect();
    if p.done() {
        lines.push(format!("verdict: {}", p.verdict));
    }
    lines
}

/// `[a,b] passed, [c] failed (c: why)`; a member yet to answer is `running`.
fn groups_of(round: &Round) -> String {
    let groups: Vec<String> = round
        .groups
        .iter()
        .map(|g| {
            let failed: Vec<String> = g
                .nodes
                .iter()
                .filter_map(|n| match g.results.get(n) {
                    None => Some(format!("{n}: no answer yet")),
                    Some(r) if !r.passed => Some(format!("{n}: {}", r.why)),
                    Some(_) => None,
                })
                .collect();
            let verdict = if failed.is_empty() {
                "passed".to_owned()
            } else {
                format!("failed ({})", failed.join("; "))
            };
            format!("[{}] {verdict}", g.nodes.join(","))
        })
        .collect();
    groups.join(", ")
}

/// At most `max` bytes of the end of `text`, on a character boundary.
pub(super) fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}
