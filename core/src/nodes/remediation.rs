//! The remediation ladder, pure: per rule, escalating with recurrence, a node whose fault keeps
//! coming back is repaired step by step by its own agent: a GPU reset, then a reboot, then a
//! terminal `needs-repair` cordon that only an operator clears.
//!
//! A rule matches an XID code. Each match is remembered on the node (persisted on its record);
//! when `after` matches fall within `window` (the default: XID 48, double-bit ECC, twice in
//! 24 h), the rule fires the next step of its ladder: the first step when no step of that rule
//! ran within the window, the second when one did, and so on (the last step repeats once the
//! ladder is exhausted). So with the default, XID 48 twice resets the GPU, a third XID 48
//! within the window reboots the node and a fourth makes it `needs-repair`; a node quiet for a
//! whole window starts the ladder afresh.
//!
//! One step at a time, and only on a drained node: a fired step cordons the node (an automatic
//! cordon, through the breaker) and waits, pending on the record, until no job holds the node
//! (placement or spare) and its agent reports no worker. Then `Remediate` goes out, re-sent like
//! every command until the agent's `RemediationResult` answers it (the agent runs each step id
//! once). The command that runs is the agent's own (`[remediation]` in its config, run as root),
//! never sent by the coordinator.
//!
//! - ok: the node's GPU-health evidence is forgotten (the step addressed it) and the node goes
//!   through burn-in (`Validating`) before it is schedulable again. A reboot's ok only says it was
//!   issued: the step ends, and the burn-in starts, when the node re-registers (a burn-in run
//!   before the reboot would judge the old boot); a node that re-registers after a reboot was
//!   sent counts as rebooted even if its answer died with the connection. An issued reboot is
//!   never sent again; a node that does not come back within `answer_timeout` needs repair.
//! - failed, or no answer within `answer_timeout` (an agent too old to know the command, or
//!   stuck): needs-repair at once. Automation does not escalate on a step that did not run: a
//!   node that cannot be reset or rebooted by its agent needs a person.
//!
//! Needs-repair cordons the node (source auto, reason `needs repair: ...` with the evidence and
//! the steps tried, through the cordon breaker like any automatic cordon) and stops the ladder:
//! no burn-in, no diagnostics pass lifts it; only `clusterctl uncordon NODE --force` does, and
//! that clears the node's ladder too.
//!
//! Time: the window and the step budget are measured on the monotonic clock. The marks and steps
//! are persisted with their wall-clock time for display; after a coordinator restart their
//! monotonic instants are put at the restart (as the cordon breaker does with its window), so a
//! restart can only lengthen the window by the time the coordinator was down, never shorten it:
//! a recurrence is never missed because the coordinator restarted.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vigil_proto::v1;

use crate::commands::Sent;
use crate::time::{Instant, Now};

pub const DEFAULT_XID: u32 = 48;
pub const DEFAULT_AFTER: u32 = 2;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How long an agent has to answer a step (above the agent's own default command timeout, 5m),
/// and a node whose reboot was issued has to re-register (a GPU server can take 10m to boot).
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(900);
/// The kind of the node events the ladder records.
pub const EVENT_KIND: &str = "remediation";
/// The needs-repair cordon reason's first words, as operators and alerts match them.
pub const NEEDS_REPAIR: &str = "needs repair";
/// Marks and steps kept per node (the window decides which count).
pub const MAX_KEPT: usize = 32;
/// How much of a step's output a node event keeps.
pub const MAX_EVENT_OUTPUT: usize = 1024;

/// One rung of a ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    GpuReset,
    Reboot,
    NeedsRepair,
}

impl Step {
    /// The config's and the metric label's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::GpuReset => "gpu_reset",
            Step::Reboot => "reboot",
            Step::NeedsRepair => "needs_repair",
        }
    }

    /// What the agent is asked to do, for the steps an agent runs.
    pub fn action(self) -> Option<v1::RemediationAction> {
        match self {
            Step::GpuReset => Some(v1::RemediationAction::GpuReset),
            Step::Reboot => Some(v1::RemediationAction::Reboot),
            Step::NeedsRepair => None,
        }
    }
}

fn default_after() -> u32 {
    DEFAULT_AFTER
}

fn default_window() -> Duration {
    DEFAULT_WINDOW
}

fn default_ladder() -> Vec<Step> {
    vec![Step::GpuReset, Step::Reboot, Step::NeedsRepair]
}

/// `[[remediation.rule]]` in the coordinator's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The XID code the rule matches.
    pub xid: u32,
    /// Matches within `window` that fire the next step.
    #[serde(default = "default_after")]
    pub after: u32,
    #[serde(with = "humantime_serde", default = "default_window")]
    pub window: Duration,
    #[serde(default = "default_ladder")]
    pub ladder: Vec<Step>,
}

impl Rule {
    /// XID 48 (double-bit ECC) twice in 24 h: reset, reboot, needs-repair.
    pub fn default_xid_48() -> Self {
        Self {
            xid: DEFAULT_XID,
            after: DEFAULT_AFTER,
            window: DEFAULT_WINDOW,
            ladder: default_ladder(),
        }
    }

    /// "XID 48 twice in 24h".
    pub fn describe(&self, count: usize) -> String {
        let times = match count {
            1 => "once".to_owned(),
            2 => "twice".to_owned(),
            n => format!("{n} times"),
        };
        format!("XID {} {times} in {}", self.xid, short(self.window))
    }
}

/// `[remediation]` in the coordinator's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemediationConfig {
    pub enabled: bool,
    /// How long an agent has to answer a step before it counts as failed ("no answer").
    #[serde(with = "humantime_serde")]
    pub answer_timeout: Duration,
    /// The rules; naming any replaces the default (XID 48).
    pub rule: Vec<Rule>,
}

impl Default for RemediationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            rule: vec![Rule::default_xid_48()],
        }
    }
}

impl RemediationConfig {
    pub fn validate(&self) -> Result<(), String> {
        let hours = |d: Duration| humantime::format_duration(d).to_string();
        if self.answer_timeout < Duration::from_secs(1)
            || self.answer_timeout > Duration::from_secs(24 * 3600)
        {
            return Err(format!(
                "remediation.answer_timeout = {} must be between 1s and 24h",
                hours(self.answer_timeout)
            ));
        }
        for (i, r) in self.rule.iter().enumerate() {
            let at = format!("remediation.rule[{i}] (xid {})", r.xid);
            if r.after == 0 {
                return Err(format!(
                    "{at}: after = 0; use 1 or more (how many XIDs within the window fire a step)"
                ));
            }
            if r.window < Duration::from_secs(1) || r.window > Duration::from_secs(30 * 86_400) {
                return Err(format!(
                    "{at}: window = {} must be between 1s and 30d",
                    hours(r.window)
                ));
            }
            if r.ladder.is_empty() {
                return Err(format!(
                    "{at}: ladder is empty; write e.g. [\"gpu_reset\", \"reboot\", \"needs_repair\"]"
                ));
            }
            if let Some(p) = r.ladder.iter().position(|s| *s == Step::NeedsRepair)
                && p + 1 != r.ladder.len()
            {
                return Err(format!(
                    "{at}: needs_repair is terminal; it can only be the ladder's last step"
                ));
            }
            if self.rule[..i].iter().any(|o| o.xid == r.xid) {
                return Err(format!(
                    "{at}: a second rule for XID {}; keep one rule per XID",
                    r.xid
                ));
            }
        }
        Ok(())
    }

    /// The rule for `xid`, if the ladder is on and one matches.
    pub fn rule_for(&self, xid: u32) -> Option<&Rule> {
        if !self.enabled {
            return None;
        }
        self.rule.iter().find(|r| r.xid == xid)
    }
}

/// One match of a rule on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub xid: u32,
    pub gpu: u32,
    pub at_unix_ms: u64,
    /// On this process's monotonic clock; a reload puts it at the restart.
    #[serde(skip)]
    pub at: Instant,
}

/// A step the ladder took, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    pub xid: u32,
    pub step: Step,
    pub gpu: u32,
    pub at_unix_ms: u64,
    #[serde(skip)]
    pub at: Instant,
    /// pending, ok, failed, no_answer, cordoned, held.
    pub outcome: String,
}

/// A step waiting for the node to drain, or for its agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Unique on the node (the agent runs each id once).
    pub id: u64,
    pub step: Step,
    pub gpu: u32,
    pub xid: u32,
    /// "GPU reset of GPU 2 on gpu-017 after XID 48 twice in 24h (step 1 of 3)".
    pub reason: String,
    pub requested_at_ms: u64,
    /// When it first went to the agent; `None` while the node drains.
    pub sent_at_ms: Option<u64>,
    /// The same moment on the monotonic clock, which the budget is measured on. Not persisted:
    /// after a coordinator restart a sent step is timed from the restart.
    #[serde(skip)]
    pub first_sent: Option<Instant>,
    #[serde(skip)]
    pub sent: Option<Sent>,
    /// A reboot the agent said it issued: never sent again; it ends when the node re-registers.
    #[serde(default)]
    pub issued: bool,
}

/// The terminal state: cordoned until an operator forces an uncordon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedsRepair {
    pub since_unix_ms: u64,
    pub evidence: String,
}

/// A node's ladder (persisted on its record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ladder {
    /// Rule matches, oldest first, at most [`MAX_KEPT`].
    pub marks: Vec<Mark>,
    /// Steps taken, oldest first, at most [`MAX_KEPT`].
    pub steps: Vec<Taken>,
    pub pending: Option<Pending>,
    pub needs_repair: Option<NeedsRepair>,
    /// The last step id given out on this node.
    pub last_id: u64,
}

/// What a match decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fired {
    /// Fewer than `after` matches in the window, or a step is in progress, or the node needs
    /// repair already: nothing to do.
    Nothing,
    /// Take this step (`number` of `of`), for this many matches in the window.
    Step {
        step: Step,
        number: usize,
        of: usize,
        count: usize,
    },
}

impl Ladder {
    /// Put every monotonic instant at `now`: the record was just loaded (see the module doc).
    pub fn restore(&mut self, now: Instant) {
        for m in &mut self.marks {
            m.at = now;
        }
        for s in &mut self.steps {
            s.at = now;
        }
    }

    /// Whether anything is worth keeping on the record.
    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
            && self.steps.is_empty()
            && self.pending.is_none()
            && self.needs_repair.is_none()
    }

    /// Remember a match of `rule` on `gpu` at `now` and say which step, if any, it fires.
    pub fn matched(&mut self, rule: &Rule, gpu: u32, now: Now) -> Fired {
        let within = |at: Instant| now.mono.saturating_duration_since(at) < rule.window;
        self.marks.retain(|m| m.xid != rule.xid || within(m.at));
        self.marks.push(Mark {
            xid: rule.xid,
            gpu,
            at_unix_ms: now.wall_ms,
            at: now.mono,
        });
        trim(&mut self.marks);
        if self.needs_repair.is_some() || self.pending.is_some() {
            return Fired::Nothing;
        }
        let count = self.marks.iter().filter(|m| m.xid == rule.xid).count();
        if count < rule.after as usize {
            return Fired::Nothing;
        }
        let taken = self
            .steps
            .iter()
            .filter(|s| s.xid == rule.xid && within(s.at))
            .count();
        let of = rule.ladder.len();
        let index = taken.min(of.saturating_sub(1));
        let Some(step) = rule.ladder.get(index).copied() else {
            return Fired::Nothing;
        };
        Fired::Step {
            step,
            number: index + 1,
            of,
            count,
        }
    }

    /// Record that `step` was taken at `now` (its outcome follows with [`Ladder::outcome`]).
    pub fn take(&mut self, xid: u32, step: Step, gpu: u32, outcome: &str, now: Now) {
        self.steps.push(Taken {
            xid,
            step,
            gpu,
            at_unix_ms: now.wall_ms,
            at: now.mono,
            outcome: outcome.to_owned(),
        });
        trim(&mut self.steps);
    }

    /// Set the outcome of the newest step.
    pub fn outcome(&mut self, outcome: &str) {
        if let Some(last) = self.steps.last_mut() {
            last.outcome = outcome.to_owned();
        }
    }

    /// "gpu_reset GPU 2 ok, reboot failed": the steps kept, for a needs-repair reason.
    pub fn tried(&self) -> String {
        let tried: Vec<String> = self
            .steps
            .iter()
            .filter(|s| s.step != Step::NeedsRepair)
            .map(|s| match s.step {
                Step::GpuReset => format!("gpu_reset GPU {} {}", s.gpu, s.outcome),
                _ => format!("{} {}", s.step.as_str(), s.outcome),
            })
            .collect();
        if tried.is_empty() {
            "none".to_owned()
        } else {
            tried.join(", ")
        }
    }

    /// One line for `clusterctl node`: "needs repair since ...", "gpu_reset of GPU 2 pending", ...
    pub fn summary(&self) -> String {
        if let Some(n) = &self.needs_repair {
            return format!("needs repair: {}", n.evidence);
        }
        if let Some(p) = &self.pending {
            let state = match (p.sent_at_ms, p.issued) {
                (_, true) => "reboot issued, waiting for the node to re-register",
                (Some(_), false) => "running on the agent",
                (None, false) => "waiting for the node to drain",
            };
            return format!("{} ({state})", p.reason);
        }
        match self.steps.last() {
            Some(s) => format!(
                "last step: {} GPU {} {} ({} step(s) kept, {} match(es) kept)",
                s.step.as_str(),
                s.gpu,
                s.outcome,
                self.steps.len(),
                self.marks.len()
            ),
            None => format!("{} match(es) kept, no step taken", self.marks.len()),
        }
    }
}

/// "24h", "90m", "45s": whole hours or minutes as such, anything else as humantime writes it.
fn short(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    match (secs % 3600, secs % 60) {
        (0, _) => format!("{}h", secs / 3600),
        (_, 0) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

fn trim<T>(v: &mut Vec<T>) {
    if v.len() > MAX_KEPT {
        let extra = v.len() - MAX_KEPT;
        v.drain(..extra);
    }
}

/// `text` cut to at most `max` bytes on a character boundary, marked when cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
#[path = "remediation_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "remediation_restart_tests.rs"]
mod restart_tests;
