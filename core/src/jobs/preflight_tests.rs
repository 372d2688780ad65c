//! The gang preflight: its bisection exhaustively against simulated faults (a fabric fault seen
//! only in groups, a node that fails even alone, two bad nodes, a bad spare, a broken command),
//! then the state machine through `step` and `tick`: workers held back, groups run with the
//! group's environment, bad nodes cordoned and the attempt placed again, old agents.

use std::collections::{BTreeMap, BTreeSet};

use vigil_proto::v1;

use super::*;
use crate::jobs::preflight_plan::{Outcome, Run, learn, max_rounds, plan};
use crate::state::ClusterState;
use crate::test_utils::{commands, cordon_reason, event_at, starts, submit_at, t, tick_at};

/// How a simulated fault shows.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Only in groups (a fabric link down): a bad node passes alone.
    Fabric,
    /// Everywhere: a bad node fails even alone.
    Alone,
}

fn names(n: usize, prefix: &str) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

/// One run of `group` when `bad` are faulty as `fault` says.
fn simulate(group: &[String], bad: &BTreeSet<String>, fault: Fault) -> Run {
    let has_bad = group.iter().any(|n| bad.contains(n));
    let fails = match fault {
        Fault::Fabric => has_bad && group.len() >= 2,
        Fault::Alone => has_bad,
    };
    let outcome = if fails {
        Outcome::Failed {
            why: "exited with code 1".into(),
            output: "allreduce timed out".into(),
        }
    } else {
        Outcome::Passed
    };
    Run {
        nodes: group.to_vec(),
        outcomes: group.iter().map(|n| (n.clone(), outcome.clone())).collect(),
    }
}

/// Bisect a gang with spares; the nodes found bad and the rounds run.
fn bisect(
    gang: &[String],
    spares: &[String],
    bad: &BTreeSet<String>,
    fault: Fault,
) -> (BTreeSet<String>, usize, bool) {
    let solo = gang.len() == 1;
    let mut rounds = vec![vec![simulate(gang, bad, fault)]];
    if rounds[0][0].verdict() == Some(true) {
        return (BTreeSet::new(), 1, true);
    }
    let pool: Vec<String> = gang.iter().chain(spares).cloned().collect();
    let bound = max_rounds(pool.len()) as usize;
    while rounds.len() < bound {
        let next = plan(&pool, &rounds, solo);
        if next.is_empty() {
            break;
        }
        let mut seen = BTreeSet::new();
        for g in &next {
            for n in g {
                assert!(
                    seen.insert(n.clone()),
                    "{n} in two groups of one round: {next:?}"
                );
            }
            let before = rounds
                .iter()
                .flatten()
                .any(|r| r.nodes == *g && r.nodes.len() > 1);
            assert!(!before, "group {g:?} run twice");
        }
        rounds.push(next.iter().map(|g| simulate(g, bad, fault)).collect());
    }
    let k = learn(&rounds, solo);
    (k.bad.keys().cloned().collect(), rounds.len(), k.any_pass)
}

#[test]
fn one_bad_node_is_found_in_every_position_of_every_gang_and_nothing_else_is() {
    for fault in [Fault::Fabric, Fault::Alone] {
        for size in 1..=9 {
            for spare_count in 0..=2 {
                let gang = names(size, "g");
                let spares = names(spare_count, "s");
                for culprit in gang.iter().chain(&spares) {
                    let bad = BTreeSet::from([culprit.clone()]);
                    let (found, rounds, _) = bisect(&gang, &spares, &bad, fault);
                    if spares.contains(culprit) {
                        // The gang passes: nothing to narrow down, the spare is never run.
                        assert!(found.is_empty());
                        continue;
                    }
                    let pool = size + spare_count;
                    if size == 1 && spare_count == 0
                        || matches!(fault, Fault::Fabric)
                            && pool < 3
                            && size > 1
                            && spare_count == 0
                    {
                        // Nothing to compare with: nobody is cordoned for it.
                        assert!(
                            found.is_empty() || found == bad,
                            "{fault:?} {size}+{spare_count}: {found:?}"
                        );
                        continue;
                    }
                    if matches!(fault, Fault::Fabric) && size == 1 {
                        // A one-node job has no fabric to test: the gang passes.
                        continue;
                    }
                    assert_eq!(found, bad, "{fault:?} gang {size} spares {spare_count}");
                    assert!(rounds <= max_rounds(pool) as usize);
                }
            }
        }
    }
}

#[test]
fn two_bad_nodes_in_different_halves_are_both_found_and_no_good_node_is_blamed() {
    for fault in [Fault::Fabric, Fault::Alone] {
        for size in 4..=8 {
            let gang = names(size, "g");
            let spares = names(1, "s");
            for i in 0..size {
                for j in i + 1..size {
                    let bad = BTreeSet::from([gang[i].clone(), gang[j].clone()]);
                    let (found, _, _) = bisect(&gang, &spares, &bad, fault);
                    assert!(found.is_subset(&bad), "{fault:?} {bad:?}: blamed {found:?}");
                    assert_eq!(found, bad, "{fault:?} gang {size}: {bad:?}");
                }
            }
        }
    }
}

#[test]
fn a_bad_spare_is_found_beside_a_bad_gang_node() {
    for fault in [Fault::Fabric, Fault::Alone] {
        let gang = names(4, "g");
        let spares = names(2, "s");
        let bad = BTreeSet::from(["g2".to_owned(), "s1".to_owned()]);
        let (found, _, _) = bisect(&gang, &spares, &bad, fault);
        assert_eq!(found, bad, "{fault:?}");
    }
}

#[test]
fn a_command_that_fails_everywhere_blames_nobody_it_is_the_command() {
    let gang = names(4, "g");
    let spares = names(1, "s");
    let all: BTreeSet<String> = gang.iter().chain(&spares).cloned().collect();
    let (_, _, any_pass) = bisect(&gang, &spares, &all, Fault::Alone);
    assert!(
        !any_pass,
        "nothing passed: the verdict is a broken command, not bad nodes"
    );
}

#[test]
fn silent_nodes_are_never_blamed_and_never_run_again() {
    let gang = names(2, "g");
    let silent = Run {
        nodes: gang.clone(),
        outcomes: BTreeMap::from([(
            "g1".to_owned(),
            Outcome::Failed {
                why: "timed out after 2m".into(),
                output: String::new(),
            },
        )]),
    };
    let rounds = vec![vec![silent]];
    let k = learn(&rounds, false);
    assert!(k.silent.contains("g2") && k.bad.is_empty());
    let next = plan(&gang, &rounds, false);
    assert!(next.iter().flatten().all(|n| n != "g2"), "{next:?}");
}

#[test]
fn max_rounds_grows_with_the_log_of_the_pool() {
    assert_eq!(max_rounds(2), 6);
    assert_eq!(max_rounds(3), 6);
    assert_eq!(max_rounds(1024), 24);
}

// --- the state machine ---

const SPEC: &str = r#"name = "train"
nodes = 2
gpus_per_node = 8
spare_nodes = 1
command = ["python3", "train.py"]
workdir = "/w"
[checkpoint]
dir = "/c"
[preflight]
command = ["python3", "/w/allreduce.py"]
timeout = "30s"
when = "always"
"#;

fn cluster() -> ClusterState {
    let mut s = crate::test_utils::patient_cluster(3, 8);
    s.triage.enabled = false;
    s
}

fn preflights(effects: &[Effect]) -> Vec<(String, v1::RunPreflight)> {
    commands(effects)
        .into_iter()
        .filter_map(|(n, k)| match k {
            v1::command::Kind::RunPreflight(r) => Some((n, r)),
            _ => None,
        })
        .collect()
}

fn answer(
    s: &mut ClusterState,
    node: &str,
    r: &v1::RunPreflight,
    passed: bool,
    at: u64,
) -> Vec<Effect> {
    let result = v1::PreflightResult {
        job_id: r.job_id.clone(),
        attempt: r.attempt,
        round: r.round,
        passed,
        why: if passed {
            String::new()
        } else {
            "exited with code 1".into()
        },
        duration_ms: 1500,
        output: if passed {
            "ok".into()
        } else {
            format!("{node}: connect to MASTER_ADDR timed out")
        },
    };
    event_at(
        s,
        node,
        v1::agent_event::Kind::PreflightResult(result),
        t(at),
    )
}

/// Answer every preflight command in `effects` (and those that follow) as `passes` says of the
/// group (its members from the command's env), until none is left; the effects of the last step.
fn run_out(s: &mut ClusterState, mut effects: Vec<Effect>, bad: &[&str], at: u64) -> Vec<Effect> {
    let mut all = Vec::new();
    for _ in 0..20 {
        let cmds = preflights(&effects);
        if cmds.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for (node, r) in cmds {
            let group_of_one = r.env["VIGIL_NNODES"] == "1";
            let members: Vec<String> = s.jobs[&r.job_id]
                .preflight
                .as_ref()
                .and_then(|p| p.rounds.last())
                .and_then(|round| round.groups.iter().find(|g| g.nodes.contains(&node)))
                .map(|g| g.nodes.clone())
                .unwrap_or_default();
            let passed = group_of_one || !members.iter().any(|m| bad.contains(&m.as_str()));
            next.extend(answer(s, &node, &r, passed, at));
        }
        effects = next;
        effects.extend(tick_at(s, t(at)));
        all.extend(effects.iter().cloned());
    }
    all
}

#[test]
fn always_runs_the_preflight_on_the_whole_gang_first_and_a_pass_starts_the_workers() {
    let mut s = cluster();
    let id = submit_at(&mut s, SPEC, t(0));
    let effects = tick_at(&mut s, t(1));
    let cmds = preflights(&effects);
    assert_eq!(cmds.len(), 2, "{effects:?}");
    assert!(
        starts(&effects).is_empty(),
        "workers wait for the preflight"
    );
    let (_, r0) = &cmds[0];
    assert_eq!(r0.round, 0);
    assert_eq!(r0.env["VIGIL_NNODES"], "2");
    assert_eq!(r0.env["VIGIL_PREFLIGHT_ROUND"], "0");
    assert_eq!(r0.command, ["python3", "/w/allreduce.py"]);
    assert_eq!(r0.timeout_ms, 30_000);
    // Re-sent until answered (after the backoff), and not before.
    assert!(preflights(&tick_at(&mut s, t(1))).is_empty());
    assert_eq!(preflights(&tick_at(&mut s, t(3))).len(), 2);
    let mut effects = Vec::new();
    for (node, r) in &cmds {
        effects.extend(answer(&mut s, node, r, true, 4));
    }
    let started: Vec<String> = starts(&effects).into_iter().map(|(n, _)| n).collect();
    assert_eq!(started, ["n1", "n2"]);
    let job = &s.jobs[&id];
    assert_eq!(
        job.attempts[0]
            .preflight
            .as_ref()
            .map(|p| p.verdict.as_str()),
        Some("passed on the whole gang")
    );
    assert!(
        job.events
            .iter()
            .any(|e| e.kind == "preflight" && e.message.contains("passed"))
    );
}

#[test]
fn restart_skips_the_first_attempt() {
    let mut s = cluster();
    let spec = SPEC.replace("when = \"always\"", "");
    submit_at(&mut s, &spec, t(0));
    let effects = tick_at(&mut s, t(1));
    assert!(preflights(&effects).is_empty());
    assert_eq!(starts(&effects).len(), 2);
}

#[test]
fn a_bad_node_is_cordoned_and_the_attempt_placed_again_on_the_rest_without_another_preflight() {
    let mut s = cluster();
    let id = submit_at(&mut s, SPEC, t(0));
    let first = tick_at(&mut s, t(1));
    let effects = run_out(&mut s, first, &["n1"], 2);
    let reason = cordon_reason(&s, "n1");
    assert!(reason.contains("preflight of job"), "{reason}");
    assert!(
        reason.contains("connect to MASTER_ADDR timed out"),
        "evidence: {reason}"
    );
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Cordoned {
            rule: crate::kinds::CordonRule::Preflight,
            ..
        }
    )));
    // Placed again at once (same tick or the next), on the gang's good node and the spare.
    let mut all = effects;
    all.extend(tick_at(&mut s, t(3)));
    let all = crate::test_utils::with_scans_answered(&mut s, all, t(3));
    let started: BTreeSet<String> = starts(&all).into_iter().map(|(n, _)| n).collect();
    assert_eq!(started, BTreeSet::from(["n2".to_owned(), "n3".to_owned()]));
    let job = &s.jobs[&id];
    assert_eq!(job.attempt, 2);
    assert_eq!(job.restarts, 0, "a preflight's replacement is no restart");
    assert_eq!(job.attempts[0].outcome, "preflight");
    assert!(
        job.events.iter().any(|e| e.message.contains("skipped")),
        "{:?}",
        job.events
    );
    assert_eq!(s.nodes["n2"].record.cordon, None);
}

#[test]
fn a_single_node_group_runs_alone_with_the_groups_own_environment() {
    let mut s = cluster();
    submit_at(&mut s, SPEC, t(0));
    let cmds = preflights(&tick_at(&mut s, t(1)));
    let mut effects = Vec::new();
    for (node, r) in &cmds {
        effects.extend(answer(&mut s, node, r, false, 2));
    }
    let round1 = preflights(&effects);
    assert!(!round1.is_empty());
    for (node, r) in &round1 {
        assert_eq!(r.round, 1);
        let nnodes: usize = r.env["VIGIL_NNODES"].parse().expect("number");
        assert_eq!(r.env["PET_NNODES"], r.env["VIGIL_NNODES"]);
        if nnodes == 1 {
            assert_eq!(r.env["VIGIL_NODE_RANK"], "0");
            assert_eq!(r.env["MASTER_ADDR"], s.nodes[node].record.address);
        }
    }
    assert!(
        round1.iter().any(|(n, _)| n == "n3"),
        "the spare is tested: {round1:?}"
    );
}

#[test]
fn a_command_failing_everywhere_fails_the_job_and_cordons_nothing() {
    let mut s = cluster();
    let id = submit_at(&mut s, SPEC, t(0));
    let first = tick_at(&mut s, t(1));
    let mut effects = first;
    for _ in 0..10 {
        let cmds = preflights(&effects);
        if cmds.is_empty() {
            break;
        }
        effects = Vec::new();
        for (node, r) in cmds {
            effects.extend(answer(&mut s, &node, &r, false, 2));
        }
    }
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Failed);
    assert!(
        job.reason.contains("command itself is probably broken"),
        "{}",
        job.reason
    );
    for n in ["n1", "n2", "n3"] {
        assert_eq!(cordon_reason(&s, n), "", "{n} is not blamed");
    }
}

#[test]
fn an_agent_that_never_answers_delays_the_start_by_the_timeout_and_is_not_cordoned() {
    let mut s = cluster();
    let id = submit_at(&mut s, SPEC, t(0));
    let cmds = preflights(&tick_at(&mut s, t(1)));
    // n1 answers; n2 is an old agent.
    let (node, r) = &cmds[0];
    let effects = answer(&mut s, node, r, true, 2);
    assert!(starts(&effects).is_empty());
    assert!(
        starts(&tick_at(&mut s, t(30))).is_empty(),
        "waits for the round's deadline"
    );
    let effects = tick_at(&mut s, t(42));
    assert_eq!(
        starts(&effects).len(),
        2,
        "starts anyway after timeout + slack"
    );
    assert_eq!(cordon_reason(&s, "n2"), "");
    let job = &s.jobs[&id];
    assert!(
        job.events
            .iter()
            .any(|e| e.message.contains("singled out no node") || e.message.contains("no answer")),
        "{:?}",
        job.events
    );
}

#[test]
fn a_timed_out_gang_is_bisected_like_a_failed_one() {
    let mut s = cluster();
    submit_at(&mut s, SPEC, t(0));
    let cmds = preflights(&tick_at(&mut s, t(1)));
    let mut effects = Vec::new();
    for (node, r) in &cmds {
        let mut result = v1::PreflightResult {
            job_id: r.job_id.clone(),
            attempt: r.attempt,
            round: 0,
            passed: false,
            why: "timed out after 30s".into(),
            duration_ms: 30_000,
            output: String::new(),
        };
        result.output.push_str("waiting for rank 1");
        effects = event_at(
            &mut s,
            node,
            v1::agent_event::Kind::PreflightResult(result),
            t(31),
        );
    }
    assert!(preflights(&effects).iter().all(|(_, r)| r.round == 1));
    assert!(!preflights(&effects).is_empty());
}

#[test]
fn preflight_spec_errors_name_the_field() {
    let base = SPEC;
    let cases = [
        (
            base.replace(
                "command = [\"python3\", \"/w/allreduce.py\"]",
                "command = [\" \"]",
            ),
            "preflight.command names no program",
        ),
        (
            base.replace("timeout = \"30s\"", "timeout = \"0s\""),
            "preflight.timeout = 0s must be between 1s and 1h",
        ),
        (
            base.replace("when = \"always\"", "when = \"sometimes\""),
            "when",
        ),
        (format!("{base}colour = 1\n"), "colour"),
    ];
    for (text, needle) in cases {
        let e = crate::jobspec::parse(&text, "job.toml", 3).expect_err("invalid");
        assert!(e.contains(needle), "{e:?} should mention {needle}");
    }
    let ok = crate::jobspec::parse(SPEC, "job.toml", 3).expect("valid");
    assert_eq!(ok.preflight.when, When::Always);
    assert_eq!(ok.preflight.timeout, std::time::Duration::from_secs(30));
}
