//! The whole interface of the core: `step` (an input) and `tick` (the passage of time).
//!
//! They own the order of every policy, so no caller can get it wrong:
//! 1. the input's own transition (a registration, a heartbeat, an operator's cordon, ...);
//! 2. jobs react to what it changed on nodes (a node Lost or Unhealthy fails its attempt);
//! 3. admission: the lemon ledger charges failures and cordons lemons, the recovery hold
//!    cordons nodes that join while it holds, then burn-in cordons nodes that join;
//! 4. one `schedule`, after every policy, so a job is never placed on a node that this same
//!    step cordons (a burn-in, a lemon);
//! 5. commands follow the state (`commands`): what the state still needs done on agents,
//!    including the starts of what was just scheduled.
//!
//! A refused request comes back as [`Effect::Refused`] and changes nothing; a stale or foreign
//! agent message as [`Effect::Ignored`], which the shell counts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use vigil_proto::v1;

use crate::input::assigned;
use crate::node::{CordonSource, DiagnosticsRecord};
use crate::state::{ClusterState, Effect, Ignored, Registration, StateError};
use crate::time::{Instant, Now};

/// Who an operator's call was about (owned: inputs cross a channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSubject {
    Node(String),
    Job(String),
    /// The cluster as a whole (the recovery hold).
    Cluster,
}

impl AuditSubject {
    pub fn as_subject(&self) -> crate::audit::Subject<'_> {
        match self {
            AuditSubject::Node(n) => crate::audit::Subject::Node(n),
            AuditSubject::Job(j) => crate::audit::Subject::Job(j),
            AuditSubject::Cluster => crate::audit::Subject::Cluster,
        }
    }
}

/// Everything that can change the state, besides time.
#[derive(Debug, Clone)]
pub enum Input {
    /// An agent session registered (validated by the shell).
    Register(Registration),
    Heartbeat {
        node: String,
        session: u64,
        heartbeat: v1::Heartbeat,
    },
    /// An immediate event: XID, lost GPU, worker started or exited, checkpoint, progress.
    AgentEvent {
        node: String,
        session: u64,
        event: v1::AgentEvent,
    },
    /// An agent's stream was accepted and its `Register` read, before the registration itself
    /// is stepped (it may wait behind thousands in a reconnect storm). Yields
    /// [`Effect::LeaseRenewal`] when the shell may renew that agent's lease at once: see
    /// `ClusterState::contact`.
    Contact {
        node: String,
        session: u64,
        machine_id: String,
    },
    /// Any other message of a session: it proves the agent alive, nothing more.
    Heard {
        node: String,
        session: u64,
    },
    /// A diagnostics result (an operator's `diagnose`, a triage's or a burn-in's).
    Diagnostics {
        node: String,
        session: u64,
        record: DiagnosticsRecord,
    },
    Disconnected {
        node: String,
        session: u64,
    },
    /// The shell noticed something about a live session (e.g. `throttled`).
    Flag {
        node: String,
        session: u64,
        kind: String,
        message: String,
    },
    Cordon {
        node: String,
        reason: String,
    },
    Uncordon {
        node: String,
        force: bool,
    },
    Drain {
        node: String,
        reason: String,
    },
    SubmitJob {
        spec_toml: String,
        source: String,
    },
    CancelJob {
        id: String,
    },
    RestartJob {
        id: String,
        from_step: Option<u64>,
        env: BTreeMap<String, String>,
    },
    ClearLemon {
        subject: String,
    },
    /// Record an operator's call and how it ended in its subject's history.
    Audit {
        subject: AuditSubject,
        actor: String,
        what: String,
        outcome: String,
    },
    /// The shell itself did not run for `gap` (SIGSTOP, a paused VM): not the agents' silence.
    Stalled {
        gap: Duration,
    },
    /// The coordinator started from what was still valid in a damaged store (`--recover`):
    /// hold the cluster for review (see `recovery`).
    BeginRecovery(crate::recovery::Recovered),
    /// An operator confirms the recovery hold: jobs may be scheduled again.
    ConfirmRecovery {
        by: String,
    },
    /// An operator closes the cordon breaker (see `breaker`).
    ResetBreaker {
        by: String,
    },
    /// An operator drops a node name's host binding (see `identity`): any host may claim it.
    ForgetNode {
        node: String,
        by: String,
    },
    /// The Slurm adapter carried a decision out on the node (drained or resumed it in Slurm,
    /// requeued a Slurm job that ran on it): recorded in its history (see `slurm`).
    Slurm {
        node: String,
        message: String,
    },
    /// The Slurm adapter's `squeue` listing of this round (`complete`: every line parsed), with
    /// vigil's node names: the records of Slurm jobs follow it (see `slurm::jobs`).
    SlurmJobs {
        jobs: Vec<crate::slurm::SlurmJob>,
        complete: bool,
    },
    /// The Slurm adapter requeued Slurm job `job` for a fault on vigil node `node`.
    SlurmRequeued {
        job: String,
        node: String,
        reason: String,
    },
}

/// What a request produced besides effects, for the caller's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Submitted { id: String },
    Drained { jobs: Vec<String> },
    LemonsCleared(Vec<crate::lemons::LemonRecord>),
}

/// Apply `input` at `now`: its transition, then every policy in order (see the module doc).
pub fn step(state: &mut ClusterState, input: Input, now: Now) -> Vec<Effect> {
    let from_agent = matches!(
        input,
        Input::Heartbeat { .. }
            | Input::AgentEvent { .. }
            | Input::Heard { .. }
            | Input::Diagnostics { .. }
            | Input::Flag { .. }
    );
    // Reports about work not assigned to the reporting node change nothing (the transitions
    // fence them); they are named here, before the state moves on, for the shell to count.
    let foreign = unassigned(state, &input);
    // A node that (re)joins is told at once to stop what it runs that is no longer its.
    let joined = match &input {
        Input::Register(reg) => Some(reg.node.clone()),
        _ => None,
    };
    let mut effects = match transition(state, input, now) {
        Ok(effects) => effects,
        Err(e) if from_agent => {
            return vec![Effect::Ignored {
                reason: e.to_string(),
                why: Ignored::StaleSession,
            }];
        }
        Err(e) => return vec![Effect::Refused(e)],
    };
    if effects.iter().any(|e| {
        matches!(
            e,
            Effect::IdentityConflict { .. } | Effect::LeaseRenewal { .. }
        )
    }) {
        // A refused claim to a node name, or a contact: nothing for any policy to react to.
        return effects;
    }
    effects.extend(foreign);
    follow(state, &mut effects, now, joined.as_deref());
    effects
}

/// `Ignored` effects for the reports in `input` that are not its node's to make.
fn unassigned(state: &ClusterState, input: &Input) -> Vec<Effect> {
    match input {
        Input::Heartbeat {
            node, heartbeat, ..
        } => {
            let reports = heartbeat
                .workers
                .iter()
                .map(|w| (w.job_id.as_str(), w.attempt, "heartbeat"));
            assigned::ignored(&state.jobs, node, reports)
        }
        Input::AgentEvent { node, event, .. } => {
            assigned::ignored(&state.jobs, node, assigned::subject(event))
        }
        _ => Vec::new(),
    }
}

/// Apply the passage of time: the cordon breaker's window, liveness, GPU findings aging out, hangs, triage, burn-in
/// and remediation budgets, stragglers, restart backoffs; then every policy in order.
pub fn tick(state: &mut ClusterState, now: Now) -> Vec<Effect> {
    tick_heard_until(state, now, now.mono)
}

/// [`tick`], judging agents' silence as of `heard_until`: the last moment every agent
/// message received before it had been taken in (`ClusterState::tick_heard_until`).
pub fn tick_heard_until(state: &mut ClusterState, now: Now, heard_until: Instant) -> Vec<Effect> {
    let mut effects = state.breaker_tick(now);
    effects.extend(state.tick_heard_until(now, heard_until));
    effects.extend(state.jobs_tick(now));
    effects.extend(state.burn_in_tick(now));
    effects.extend(state.remediation_tick(now));
    react(state, &mut effects, now);
    // Every tick schedules (backoffs end with time) and derives every command that is due.
    let scheduled = state.schedule(now);
    effects.extend(scheduled);
    let commands = state.commands(now, None);
    effects.extend(commands);
    effects
}

/// Steps 2 to 5 of the module doc, after a transition produced `effects`. An input that
/// changed nothing (most heartbeats) costs nothing more: the scheduler runs only after a
/// change, and commands are derived for the jobs this step changed (their starts and stops
/// go out at once); the tick, every 100 ms, derives everything else that is due.
fn follow(state: &mut ClusterState, effects: &mut Vec<Effect>, now: Now, joined: Option<&str>) {
    if effects.is_empty() {
        return;
    }
    react(state, effects, now);
    let scheduled = state.schedule(now);
    effects.extend(scheduled);
    let changed: BTreeSet<String> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::PersistJob(job) => Some(job.id.clone()),
            _ => None,
        })
        .collect();
    let commands = state.commands(now, Some((&changed, joined)));
    effects.extend(commands);
}

/// Steps 2 and 3: jobs react to node changes, then admission (lemons, the recovery hold,
/// burn-in: a node the recovery hold cordons is not burned in on joining; its uncordon may be),
/// then the remediation ladder (an XID a rule matches may fire a step or needs-repair, whose
/// cordon reason then wins over a lemon's).
fn react(state: &mut ClusterState, effects: &mut Vec<Effect>, now: Now) {
    if effects.is_empty() {
        return;
    }
    let jobs = state.react(effects, now);
    effects.extend(jobs);
    let lemons = state.lemon_react(effects, now);
    effects.extend(lemons);
    let recovery = state.recovery_react(effects, now);
    effects.extend(recovery);
    let burn_in = state.burn_in_react(effects, now);
    effects.extend(burn_in);
    let remediation = state.remediation_react(effects, now);
    effects.extend(remediation);
}

fn transition(state: &mut ClusterState, input: Input, now: Now) -> Result<Vec<Effect>, StateError> {
    match input {
        Input::Register(reg) => Ok(state.register(reg, now)),
        Input::Contact {
            node,
            session,
            machine_id,
        } => Ok(state.contact(&node, session, &machine_id, now)),
        Input::Heartbeat {
            node,
            session,
            heartbeat,
        } => state.heartbeat(&node, session, heartbeat, now),
        Input::AgentEvent {
            node,
            session,
            event,
        } => state.agent_event(&node, session, &event, now),
        Input::Heard { node, session } => state.heard(&node, session, now),
        Input::Diagnostics {
            node,
            session,
            record,
        } => {
            let mut effects = state.heard(&node, session, now).unwrap_or_default();
            let (passed, summary) = (record.passed, record.summary.clone());
            effects.extend(state.record_diagnostics(&node, record)?);
            effects.extend(state.triage_result(&node, passed, &summary, now));
            effects.extend(state.burn_in_result(&node, passed, &summary, now));
            Ok(effects)
        }
        Input::Disconnected { node, session } => Ok(state.disconnected(&node, session, now)),
        Input::Flag {
            node,
            session,
            kind,
            message,
        } => state.flag(&node, session, &kind, message, now),
        Input::Cordon { node, reason } => state.cordon(&node, reason, CordonSource::Operator, now),
        Input::Uncordon { node, force } => state.uncordon(&node, force, now),
        Input::Drain { node, reason } => {
            let (jobs, mut effects) = state.drain_node(&node, &reason, now)?;
            effects.push(Effect::Answer(Answer::Drained { jobs }));
            Ok(effects)
        }
        Input::SubmitJob { spec_toml, source } => {
            let (id, mut effects) = state.submit_job(&spec_toml, &source, now)?;
            effects.push(Effect::Answer(Answer::Submitted { id }));
            Ok(effects)
        }
        Input::CancelJob { id } => state.cancel_job(&id, now),
        Input::RestartJob { id, from_step, env } => state.restart_job(&id, from_step, env, now),
        Input::ClearLemon { subject } => {
            let (cleared, mut effects) = state.clear_lemon(&subject, now)?;
            effects.push(Effect::Answer(Answer::LemonsCleared(cleared)));
            Ok(effects)
        }
        Input::Audit {
            subject,
            actor,
            what,
            outcome,
        } => Ok(state.audit(subject.as_subject(), &actor, &what, &outcome, now)),
        Input::Stalled { gap } => {
            state.forgive_stall(gap, now);
            Ok(Vec::new())
        }
        Input::BeginRecovery(report) => Ok(state.begin_recovery(report, now)),
        Input::ConfirmRecovery { by } => state.confirm_recovery(&by, now),
        Input::ResetBreaker { by } => Ok(state.reset_breaker(&by, now)),
        Input::ForgetNode { node, by } => state.forget_identity(&node, &by, now),
        Input::Slurm { node, message } => Ok(state.slurm_record(&node, message, now)),
        Input::SlurmJobs { jobs, complete } => Ok(state.slurm_jobs(&jobs, complete, now)),
        Input::SlurmRequeued { job, node, reason } => {
            Ok(state.slurm_requeued(&job, &node, &reason, now))
        }
    }
}
