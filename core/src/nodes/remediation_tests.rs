//! The remediation ladder on simulated time: every input goes through `step` and time through
//! `tick`, as the engine drives them.

use std::time::Duration;

use vigil_proto::v1;

use super::*;
use crate::state::{ClusterState, Effect, StateError};
use crate::step::Input;
use crate::test_utils::{
    agent_event, commands, cordon_reason, diagnostics_at, heartbeat, patient_state, refusal,
    reg_with_gpus, register_at, step_raw, submit_at, t, tick_at, xid,
};

pub(super) const HOUR: u64 = 3600;

fn state() -> ClusterState {
    let mut s = patient_state();
    s.remediation = RemediationConfig::default();
    s
}

/// A cluster with `n` two-GPU nodes n0.. (each in session i + 1).
pub(super) fn cluster(n: u32) -> ClusterState {
    let mut s = state();
    for i in 0..n {
        register_at(
            &mut s,
            reg_with_gpus(&format!("n{i}"), u64::from(i) + 1, 2),
            t(0),
        );
    }
    s
}

/// The `Remediate` commands among `effects`.
pub(super) fn remediates(effects: &[Effect]) -> Vec<(String, v1::Remediate)> {
    commands(effects)
        .into_iter()
        .filter_map(|(n, k)| match k {
            v1::command::Kind::Remediate(r) => Some((n, r)),
            _ => None,
        })
        .collect()
}

pub(super) fn counted(effects: &[Effect]) -> Vec<(Step, &'static str)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Remediation { step, outcome, .. } => Some((*step, *outcome)),
            _ => None,
        })
        .collect()
}

pub(super) fn answer(
    s: &mut ClusterState,
    node: &str,
    r: &v1::Remediate,
    ok: bool,
    output: &str,
    secs: u64,
) -> Vec<Effect> {
    let event = v1::AgentEvent {
        at_unix_ms: 0,
        kind: Some(v1::agent_event::Kind::RemediationResult(
            v1::RemediationResult {
                step_id: r.step_id,
                action: r.action,
                gpu_index: r.gpu_index,
                ok,
                output: output.to_owned(),
                command: "stand-in".into(),
            },
        )),
    };
    agent_event(s, node, event, t(secs))
}

pub(super) fn ladder(s: &ClusterState, node: &str) -> Ladder {
    s.nodes[node]
        .record
        .remediation
        .as_deref()
        .cloned()
        .unwrap_or_default()
}

fn uncordon(s: &mut ClusterState, node: &str, force: bool, secs: u64) -> Vec<Effect> {
    step_raw(
        s,
        Input::Uncordon {
            node: node.into(),
            force,
        },
        t(secs),
    )
}

/// XID `code` on `gpu` of `node` at `secs`, then a tick; the `Remediate` commands sent.
pub(super) fn fault(
    s: &mut ClusterState,
    node: &str,
    gpu: u32,
    code: u32,
    secs: u64,
) -> Vec<(String, v1::Remediate)> {
    let mut e = agent_event(s, node, xid(gpu, code, 0), t(secs));
    e.extend(tick_at(s, t(secs)));
    remediates(&e)
}

#[test]
fn the_default_is_xid_48_twice_in_24h_reset_reboot_needs_repair() {
    let cfg = RemediationConfig::default();
    assert!(cfg.enabled);
    assert_eq!(cfg.rule, [Rule::default_xid_48()]);
    let r = &cfg.rule[0];
    assert_eq!(
        (r.xid, r.after, r.window),
        (48, 2, Duration::from_secs(24 * HOUR))
    );
    assert_eq!(r.ladder, [Step::GpuReset, Step::Reboot, Step::NeedsRepair]);
    assert_eq!(cfg.validate(), Ok(()));
    assert!(cfg.rule_for(48).is_some() && cfg.rule_for(79).is_none());
    let off = RemediationConfig {
        enabled: false,
        ..cfg
    };
    assert!(off.rule_for(48).is_none(), "disabled: no rule matches");
}

#[test]
fn rules_parse_from_toml_and_bad_ones_are_refused_by_field() {
    let cfg: RemediationConfig = toml::from_str(
        "answer_timeout = \"2m\"\n[[rule]]\nxid = 79\nafter = 1\nwindow = \"1h\"\nladder = [\"reboot\", \"needs_repair\"]\n",
    )
    .expect("parses");
    assert_eq!(cfg.answer_timeout, Duration::from_secs(120));
    assert_eq!(cfg.rule.len(), 1, "naming a rule replaces the default");
    assert_eq!(cfg.rule[0].ladder, [Step::Reboot, Step::NeedsRepair]);
    let bad = |text: &str| {
        toml::from_str::<RemediationConfig>(text)
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate())
            .expect_err(text)
    };
    assert!(bad("[[rule]]\nxid = 48\nafter = 0\n").contains("after = 0"));
    assert!(bad("[[rule]]\nxid = 48\nladder = []\n").contains("ladder is empty"));
    assert!(
        bad("[[rule]]\nxid = 48\nladder = [\"needs_repair\", \"reboot\"]\n").contains("terminal")
    );
    assert!(bad("[[rule]]\nxid = 48\n[[rule]]\nxid = 48\n").contains("one rule per XID"));
    assert!(bad("answer_timeout = \"0s\"\n").contains("answer_timeout"));
    assert!(bad("[[rule]]\nxid = 48\nladder = [\"format_disk\"]\n").contains("unknown variant"));
}

#[test]
fn the_ladder_escalates_with_recurrence_and_starts_afresh_after_a_quiet_window() {
    let rule = Rule::default_xid_48();
    let mut l = Ladder::default();
    assert_eq!(
        l.matched(&rule, 2, t(0)),
        Fired::Nothing,
        "once is not enough"
    );
    let fired = l.matched(&rule, 2, t(HOUR));
    assert_eq!(
        fired,
        Fired::Step {
            step: Step::GpuReset,
            number: 1,
            of: 3,
            count: 2
        }
    );
    l.take(48, Step::GpuReset, 2, "ok", t(HOUR));
    let fired = l.matched(&rule, 2, t(2 * HOUR));
    assert!(
        matches!(
            fired,
            Fired::Step {
                step: Step::Reboot,
                number: 2,
                ..
            }
        ),
        "{fired:?}"
    );
    l.take(48, Step::Reboot, 2, "pending", t(2 * HOUR));
    l.pending = Some(pending(7));
    assert_eq!(
        l.matched(&rule, 2, t(3 * HOUR)),
        Fired::Nothing,
        "one step at a time"
    );
    l.pending = None;
    let fired = l.matched(&rule, 2, t(4 * HOUR));
    assert!(
        matches!(
            fired,
            Fired::Step {
                step: Step::NeedsRepair,
                number: 3,
                ..
            }
        ),
        "{fired:?}"
    );
    // A whole window later, the old marks and steps no longer count.
    let later = 4 * HOUR + 24 * HOUR;
    assert_eq!(l.matched(&rule, 2, t(later)), Fired::Nothing);
    let fired = l.matched(&rule, 2, t(later + 1));
    assert!(
        matches!(
            fired,
            Fired::Step {
                step: Step::GpuReset,
                number: 1,
                ..
            }
        ),
        "{fired:?}"
    );
}

#[test]
fn windows_read_as_operators_write_them() {
    let rule = |secs| Rule {
        window: Duration::from_secs(secs),
        ..Rule::default_xid_48()
    };
    assert_eq!(rule(24 * HOUR).describe(2), "XID 48 twice in 24h");
    assert_eq!(rule(90 * 60).describe(1), "XID 48 once in 90m");
    assert_eq!(rule(45).describe(3), "XID 48 3 times in 45s");
}

#[test]
fn a_two_rung_ladder_repeats_its_last_step() {
    let rule = Rule {
        ladder: vec![Step::GpuReset, Step::Reboot],
        after: 1,
        ..Rule::default_xid_48()
    };
    let mut l = Ladder::default();
    for (i, want) in [Step::GpuReset, Step::Reboot, Step::Reboot]
        .into_iter()
        .enumerate()
    {
        let now = t(i as u64 * 60);
        let Fired::Step { step, .. } = l.matched(&rule, 0, now) else {
            panic!("fires")
        };
        assert_eq!(step, want);
        l.take(48, step, 0, "ok", now);
    }
}

fn pending(id: u64) -> Pending {
    Pending {
        id,
        step: Step::Reboot,
        gpu: 0,
        xid: 48,
        reason: "r".into(),
        requested_at_ms: 0,
        sent_at_ms: None,
        first_sent: None,
        sent: None,
        issued: false,
    }
}

#[test]
fn reset_then_burn_in_then_reboot_then_needs_repair_that_only_force_clears() {
    let mut s = cluster(1);
    assert!(
        fault(&mut s, "n0", 1, 48, 10).is_empty(),
        "one XID 48 only cordons"
    );
    assert!(
        cordon_reason(&s, "n0").contains("XID 48"),
        "{}",
        cordon_reason(&s, "n0")
    );

    let sent = fault(&mut s, "n0", 1, 48, 20);
    let [(node, r)] = sent.as_slice() else {
        panic!("one reset sent: {sent:?}")
    };
    assert_eq!(
        (node.as_str(), r.action, r.gpu_index),
        ("n0", v1::RemediationAction::GpuReset as i32, 1)
    );
    assert!(
        r.reason
            .contains("GPU reset of GPU 1 on n0 after XID 48 twice in 24h (step 1 of 3)"),
        "{}",
        r.reason
    );
    // Re-sent with backoff, same step id, until answered.
    assert!(
        remediates(&tick_at(&mut s, t(20))).is_empty(),
        "not before its backoff"
    );
    let again = remediates(&tick_at(&mut s, t(22)));
    assert_eq!(again.first().map(|(_, a)| a.step_id), Some(r.step_id));

    let e = answer(&mut s, "n0", r, true, "reset GPU 1", 30);
    assert_eq!(counted(&e), [(Step::GpuReset, "ok")]);
    assert_eq!(
        s.nodes["n0"].display_state(),
        "Validating",
        "burn-in after every step"
    );
    assert!(
        remediates(&tick_at(&mut s, t(40))).is_empty(),
        "answered: not sent again"
    );
    diagnostics_at(&mut s, "n0", true, "burn-in passed", t(50));
    assert_eq!(s.nodes["n0"].display_state(), "Ready", "schedulable again");
    let events: Vec<String> = s.nodes["n0"]
        .events
        .iter()
        .filter(|e| e.kind == EVENT_KIND)
        .map(|e| e.message.clone())
        .collect();
    assert!(
        events
            .iter()
            .any(|m| m.contains("ok (stand-in): reset GPU 1")),
        "{events:?}"
    );

    let sent = fault(&mut s, "n0", 1, 48, 100);
    let [(_, r)] = sent.as_slice() else {
        panic!("one reboot sent: {sent:?}")
    };
    assert_eq!(r.action, v1::RemediationAction::Reboot as i32);
    assert!(r.reason.contains("(step 2 of 3)"), "{}", r.reason);
    let e = answer(&mut s, "n0", r, true, "reboot issued", 110);
    assert!(counted(&e).is_empty(), "issued, not done: {e:?}");
    assert!(ladder(&s, "n0").pending.is_some_and(|p| p.issued));
    assert!(
        remediates(&tick_at(&mut s, t(112))).is_empty(),
        "an issued reboot is never sent again"
    );
    assert_ne!(
        s.nodes["n0"].display_state(),
        "Validating",
        "no burn-in of the old boot"
    );
    // The node comes back from its reboot in a new session.
    let e = register_at(&mut s, reg_with_gpus("n0", 7, 2), t(114));
    assert_eq!(counted(&e), [(Step::Reboot, "ok")]);
    assert_eq!(s.nodes["n0"].display_state(), "Validating");
    tick_at(&mut s, t(115));
    diagnostics_at(&mut s, "n0", true, "burn-in passed", t(120));
    assert_eq!(s.nodes["n0"].display_state(), "Ready");

    let e = agent_event(&mut s, "n0", xid(1, 48, 0), t(200));
    assert_eq!(counted(&e), [(Step::NeedsRepair, "cordoned")]);
    let why = cordon_reason(&s, "n0");
    assert!(
        why.starts_with("needs repair: XID 48 on GPU 1 after XID 48 4 times in 24h (step 3 of 3)"),
        "{why}"
    );
    assert!(
        why.contains("steps tried: gpu_reset GPU 1 ok, reboot ok"),
        "{why}"
    );
    diagnostics_at(&mut s, "n0", true, "all good", t(210));
    // XID 48 made n0 Unhealthy three times: a lemon too, which has its own clear (tested there).
    s.lemons.cfg.max_failures = 0;
    s.lemons.records.clear();
    match refusal(&uncordon(&mut s, "n0", false, 220)) {
        StateError::NeedsRepair { node, evidence } => {
            assert_eq!(node, "n0");
            assert!(evidence.contains("steps tried"), "{evidence}");
        }
        other => panic!("wrong refusal: {other:?}"),
    }
    assert!(
        fault(&mut s, "n0", 1, 48, 230).is_empty(),
        "terminal: no more steps"
    );
    uncordon(&mut s, "n0", true, 240);
    assert_eq!(s.nodes["n0"].display_state(), "Ready");
    assert!(
        s.nodes["n0"].record.remediation.is_none(),
        "the ladder starts afresh"
    );
}

#[test]
fn a_step_fired_during_a_burn_in_replaces_it_so_the_node_stays_out() {
    let (mut s, reboot) = at_reboot();
    let e = register_at(&mut s, reg_with_gpus("n0", 9, 2), t(31));
    assert_eq!(counted(&e), [(Step::Reboot, "ok")]);
    assert_eq!(s.nodes["n0"].display_state(), "Validating");
    assert_eq!(reboot.action, v1::RemediationAction::Reboot as i32);
    // The fault comes back before the burn-in answers: needs-repair drops the burn-in.
    agent_event(&mut s, "n0", xid(0, 48, 0), t(32));
    assert!(s.nodes["n0"].record.burn_in.is_none());
    diagnostics_at(&mut s, "n0", true, "late burn-in pass", t(33));
    assert!(
        cordon_reason(&s, "n0").starts_with("needs repair"),
        "{}",
        cordon_reason(&s, "n0")
    );

    // A two-rung ladder: the second step fires during the first one's burn-in.
    let mut s = cluster(1);
    s.remediation.rule = vec![Rule {
        after: 1,
        ..Rule::default_xid_48()
    }];
    let reset = fault(&mut s, "n0", 0, 48, 10).remove(0).1;
    answer(&mut s, "n0", &reset, true, "", 11);
    tick_at(&mut s, t(12));
    assert_eq!(s.nodes["n0"].display_state(), "Validating");
    let sent = fault(&mut s, "n0", 0, 48, 13);
    assert_eq!(
        sent.first().map(|(_, r)| r.action),
        Some(v1::RemediationAction::Reboot as i32)
    );
    diagnostics_at(&mut s, "n0", true, "late burn-in pass", t(14));
    assert!(
        cordon_reason(&s, "n0").starts_with("remediation: reboot of n0"),
        "the pass of a dropped burn-in lifts nothing: {}",
        cordon_reason(&s, "n0")
    );
}

#[test]
fn a_failed_step_goes_to_needs_repair_at_once_with_the_output() {
    let mut s = cluster(1);
    fault(&mut s, "n0", 0, 48, 10);
    let sent = fault(&mut s, "n0", 0, 48, 20);
    let e = answer(
        &mut s,
        "n0",
        &sent[0].1,
        false,
        "remediation.gpu_reset_command is not set on this node",
        30,
    );
    assert_eq!(
        counted(&e),
        [(Step::GpuReset, "failed"), (Step::NeedsRepair, "cordoned")]
    );
    let why = cordon_reason(&s, "n0");
    assert!(
        why.contains("failed: remediation.gpu_reset_command is not set"),
        "{why}"
    );
    assert!(ladder(&s, "n0").needs_repair.is_some());
    assert_ne!(
        s.nodes["n0"].display_state(),
        "Validating",
        "no burn-in lifts it"
    );
}

/// Ticks to the end of the step budget that began at `from`: nothing until then, then `step`
/// counted `no_answer` and needs-repair; the cordon reason.
pub(super) fn runs_out_of_budget(s: &mut ClusterState, from: u64, step: Step) -> String {
    let budget = DEFAULT_ANSWER_TIMEOUT.as_secs();
    let e = tick_at(s, t(from + budget));
    assert!(counted(&e).is_empty(), "within budget: {e:?}");
    let e = tick_at(s, t(from + budget + 1));
    assert_eq!(
        counted(&e),
        [(step, "no_answer"), (Step::NeedsRepair, "cordoned")]
    );
    cordon_reason(s, "n0")
}

#[test]
fn an_agent_that_never_answers_runs_out_of_budget_and_needs_repair() {
    let mut s = cluster(1);
    fault(&mut s, "n0", 0, 48, 10);
    assert_eq!(fault(&mut s, "n0", 0, 48, 20).len(), 1);
    let why = runs_out_of_budget(&mut s, 20, Step::GpuReset);
    assert!(why.contains("too old"), "{why}");
}

#[test]
fn an_issued_reboot_whose_node_never_returns_needs_repair() {
    let (mut s, reboot) = at_reboot();
    answer(&mut s, "n0", &reboot, true, "reboot issued", 40);
    let why = runs_out_of_budget(&mut s, 40, Step::Reboot);
    assert!(why.contains("did not re-register"), "{why}");
}

#[test]
fn a_stale_answer_changes_nothing() {
    let mut s = cluster(1);
    fault(&mut s, "n0", 0, 48, 10);
    let mut r = fault(&mut s, "n0", 0, 48, 20).remove(0).1;
    r.step_id += 1;
    assert!(
        answer(&mut s, "n0", &r, true, "", 30)
            .iter()
            .all(|e| !matches!(e, Effect::Remediation { .. }))
    );
    assert!(ladder(&s, "n0").pending.is_some());
}

/// One node n0 whose GPU 0 was reset (and burned in) after XID 48 twice, and whose third XID 48
/// at t(30) sent the reboot (returned).
pub(super) fn at_reboot() -> (ClusterState, v1::Remediate) {
    let mut s = cluster(1);
    fault(&mut s, "n0", 0, 48, 10);
    let reset = fault(&mut s, "n0", 0, 48, 20).remove(0).1;
    answer(&mut s, "n0", &reset, true, "", 21);
    diagnostics_at(&mut s, "n0", true, "ok", t(22));
    let reboot = fault(&mut s, "n0", 0, 48, 30).remove(0).1;
    (s, reboot)
}

#[test]
fn a_reboot_is_done_when_the_node_re_registers_and_is_never_sent_again() {
    let (mut s, reboot) = at_reboot();
    assert_eq!(reboot.action, v1::RemediationAction::Reboot as i32);
    // The answer died with the connection; the node comes back in a new session.
    let e = register_at(&mut s, reg_with_gpus("n0", 9, 2), t(60));
    assert_eq!(counted(&e), [(Step::Reboot, "ok")]);
    assert_eq!(s.nodes["n0"].display_state(), "Validating");
    assert!(remediates(&tick_at(&mut s, t(70))).is_empty());
}

#[test]
fn a_step_waits_until_no_job_and_no_worker_holds_the_node() {
    let mut s = cluster(2);
    // XID 13 does not cordon by itself: the ladder's own cordon keeps new work away.
    s.remediation.rule = vec![Rule {
        xid: 13,
        after: 1,
        ..Rule::default_xid_48()
    }];
    let spec = "name = \"t\"\nnodes = 2\ngpus_per_node = 1\ncommand = [\"x\"]\nworkdir = \"/w\"\n[checkpoint]\ndir = \"/c\"\n";
    let id = submit_at(&mut s, spec, t(1));
    assert!(s.jobs[&id].placement.contains(&"n0".to_owned()));
    assert!(
        fault(&mut s, "n0", 0, 13, 10).is_empty(),
        "the job still holds n0"
    );
    assert!(
        cordon_reason(&s, "n0").starts_with("remediation: GPU reset of GPU 0 on n0"),
        "{}",
        cordon_reason(&s, "n0")
    );
    step_raw(&mut s, Input::CancelJob { id: id.clone() }, t(11));
    let worker = v1::WorkerInfo {
        job_id: id.clone(),
        attempt: s.jobs[&id].attempt,
        ..Default::default()
    };
    heartbeat(
        &mut s,
        "n0",
        v1::Heartbeat {
            workers: vec![worker],
            ..Default::default()
        },
        t(12),
    );
    assert!(
        remediates(&tick_at(&mut s, t(13))).is_empty(),
        "a worker still runs there"
    );
    heartbeat(&mut s, "n0", v1::Heartbeat::default(), t(14));
    let attempt = s.jobs[&id].attempt;
    for node in ["n0", "n1"] {
        let exited = v1::WorkerExited {
            job_id: id.clone(),
            attempt,
            stopped: true,
            ..Default::default()
        };
        let event = v1::AgentEvent {
            at_unix_ms: 0,
            kind: Some(v1::agent_event::Kind::WorkerExited(exited)),
        };
        agent_event(&mut s, node, event, t(14));
    }
    let mut sent = Vec::new();
    for i in 15..30 {
        sent.extend(remediates(&tick_at(&mut s, t(i))));
    }
    assert!(!s.jobs[&id].phase.holds_nodes(), "{:?}", s.jobs[&id].phase);
    assert_eq!(
        sent.first().map(|(n, _)| n.as_str()),
        Some("n0"),
        "drained: sent"
    );
}

#[test]
fn with_the_breaker_holding_the_cordon_no_step_is_taken() {
    let mut s = cluster(1);
    s.remediation.rule = vec![Rule {
        xid: 13,
        after: 1,
        ..Rule::default_xid_48()
    }];
    s.breaker.open = Some(crate::breaker::Opened {
        since_unix_ms: 0,
        why: "test".into(),
    });
    assert!(fault(&mut s, "n0", 0, 13, 10).is_empty());
    let l = ladder(&s, "n0");
    assert!(l.pending.is_none());
    assert_eq!(l.steps.last().map(|st| st.outcome.as_str()), Some("held"));
    assert!(s.breaker.held.contains_key("n0"));
}
