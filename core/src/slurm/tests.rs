use super::*;

fn node(name: &str, drained: bool, reason: &str) -> SlurmNode {
    SlurmNode {
        name: name.to_owned(),
        state: if drained { "drained" } else { "idle" }.to_owned(),
        drained,
        reason: reason.to_owned(),
    }
}

fn intent(name: &str, drain: Option<DrainCause>) -> Intent {
    Intent {
        slurm_name: name.to_owned(),
        want: drain.map_or(Want::Schedulable, Want::Drained),
    }
}

pub(super) fn job(id: &str, state: JobState, reason: &str, nodes: &[&str]) -> SlurmJob {
    SlurmJob {
        id: id.to_owned(),
        state,
        state_text: match state {
            JobState::Running => "RUNNING",
            JobState::Pending => "PENDING",
            JobState::Other => "COMPLETING",
            JobState::Finished => "COMPLETED",
        }
        .to_owned(),
        reason: reason.to_owned(),
        nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        name: "train".to_owned(),
        user: "alice".to_owned(),
    }
}

fn xid79() -> Option<DrainCause> {
    Some(DrainCause::Fault("XID 79 on GPU 3".into()))
}

#[test]
fn a_fault_drains_the_node_and_requeues_its_running_job() {
    let memory = BTreeSet::new();
    let nodes = [node("n1", false, ""), node("n2", false, "")];
    let jobs = [job("7", JobState::Running, "None", &["n1", "n2"])];
    let actions = plan(
        &[intent("n1", None), intent("n2", xid79())],
        &nodes,
        &jobs,
        &memory,
    );
    let reason = "vigil: XID 79 on GPU 3".to_owned();
    assert_eq!(
        actions,
        [
            Action::Drain {
                node: "n2".into(),
                reason: reason.clone()
            },
            Action::Requeue {
                job: "7".into(),
                node: "n2".into(),
                reason
            },
        ]
    );
    // Next round, the requeue recorded: drained, the job still shows where it ran: nothing
    // is sent twice.
    let nodes = [
        node("n1", false, ""),
        node("n2", true, "vigil: XID 79 on GPU 3"),
    ];
    let again = plan(
        &[intent("n1", None), intent("n2", xid79())],
        &nodes,
        &jobs,
        &BTreeSet::from(["7".to_owned()]),
    );
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn a_requeued_job_is_released_from_its_hold_until_it_runs_again() {
    let nodes = [
        node("n1", false, ""),
        node("n2", true, "vigil: XID 79 on GPU 3"),
    ];
    let intents = [intent("n1", None), intent("n2", xid79())];
    let mine = BTreeSet::from(["7".to_owned()]);
    // Requeued, still showing where it ran: not requeued twice.
    let running = [job("7", JobState::Running, "None", &["n1", "n2"])];
    assert!(plan(&intents, &nodes, &running, &mine).is_empty());
    let held = [job("7", JobState::Pending, HOLD_REASON, &[])];
    let release = vec![Action::Release { job: "7".into() }];
    assert_eq!(plan(&intents, &nodes, &held, &mine), release);
    let waiting = [job("7", JobState::Pending, "Resources", &[])];
    assert!(plan(&intents, &nodes, &waiting, &mine).is_empty());
    // A job vigil never requeued keeps whatever hold it has.
    let other = [job("8", JobState::Pending, HOLD_REASON, &[])];
    assert!(plan(&intents, &nodes, &other, &mine).is_empty());
}

#[test]
fn a_failed_requeue_is_tried_again() {
    // Nothing is remembered of a requeue until it is recorded: the next round sends it again.
    let memory = BTreeSet::new();
    let nodes = [node("n2", true, "vigil: XID 79 on GPU 3")];
    let jobs = [job("7", JobState::Running, "None", &["n2"])];
    let first = plan(&[intent("n2", xid79())], &nodes, &jobs, &memory);
    assert_eq!(first.len(), 1);
    assert_eq!(
        plan(&[intent("n2", xid79())], &nodes, &jobs, &memory),
        first
    );
}

#[test]
fn an_operator_cordon_drains_without_requeueing() {
    let memory = BTreeSet::new();
    let nodes = [node("n1", false, "")];
    let jobs = [job("7", JobState::Running, "None", &["n1"])];
    let cause = Some(DrainCause::Operator("swap PSU".into()));
    let actions = plan(&[intent("n1", cause)], &nodes, &jobs, &memory);
    assert_eq!(
        actions,
        [Action::Drain {
            node: "n1".into(),
            reason: "vigil: swap PSU".into()
        }]
    );
}

#[test]
fn a_lost_node_is_drained_as_agent_lost_and_its_jobs_requeued() {
    let memory = BTreeSet::new();
    let nodes = [node("n1", false, "")];
    let jobs = [job("7", JobState::Running, "None", &["n1"])];
    let actions = plan(
        &[intent("n1", Some(DrainCause::Lost))],
        &nodes,
        &jobs,
        &memory,
    );
    assert_eq!(actions.len(), 2);
    assert_eq!(
        actions[0],
        Action::Drain {
            node: "n1".into(),
            reason: LOST_REASON.into()
        }
    );
}

#[test]
fn only_vigils_own_drain_is_resumed() {
    let memory = BTreeSet::new();
    let nodes = [
        node("n1", true, "vigil: XID 79 on GPU 3"),
        node("n2", true, "bad fan [admin@2026-12-05]"),
        node("n3", false, ""),
    ];
    let intents = [intent("n1", None), intent("n2", None), intent("n3", None)];
    let actions = plan(&intents, &nodes, &[], &memory);
    assert_eq!(actions, [Action::Resume { node: "n1".into() }]);
    assert!(nodes[1].drained_by_admin());
    assert!(!nodes[0].drained_by_admin());
}

#[test]
fn an_admin_drain_is_left_alone_even_when_vigil_wants_it_drained() {
    let memory = BTreeSet::new();
    let nodes = [node("n2", true, "bad fan")];
    let actions = plan(&[intent("n2", xid79())], &nodes, &[], &memory);
    assert!(actions.is_empty(), "{actions:?}");
}

#[test]
fn nodes_slurm_does_not_know_are_skipped() {
    let memory = BTreeSet::new();
    let actions = plan(&[intent("ghost", xid79())], &[], &[], &memory);
    assert!(actions.is_empty());
}

#[test]
fn reasons_are_one_line_and_cut_on_a_character_boundary() {
    let long = DrainCause::Fault(format!("XID 79\n{}", "é".repeat(200)));
    let reason = long.reason();
    assert!(reason.len() <= MAX_REASON_BYTES);
    assert!(reason.starts_with("vigil: XID 79 é"));
    assert!(!reason.contains('\n'));
}

#[test]
fn the_name_table_maps_vigil_names_to_slurm_names() {
    let table = BTreeMap::from([("gpu-host-1".to_owned(), "n1".to_owned())]);
    assert_eq!(slurm_name(&table, "gpu-host-1"), "n1");
    assert_eq!(slurm_name(&table, "n2"), "n2");
}

#[test]
fn what_the_adapter_did_goes_into_the_nodes_history() {
    use crate::step::Input;
    use crate::test_utils::{node_events, patient_state, reg, step_ok, t};
    let mut state = patient_state();
    step_ok(&mut state, Input::Register(reg("n1", 1)), t(0));
    let message = "requeued slurm job 7: vigil: XID 79 on GPU 3".to_owned();
    let input = Input::Slurm {
        node: "n1".into(),
        message: message.clone(),
    };
    step_ok(&mut state, input, t(1));
    assert_eq!(node_events(&state, "n1", EVENT_KIND), [message]);
    assert!(state.slurm_record("ghost", "x".into(), t(2)).is_empty());
}

#[test]
fn cordons_map_to_drain_causes_by_their_source() {
    use crate::step::Input;
    use crate::test_utils::{patient_state, reg, step_ok, t};
    let mut state = patient_state();
    step_ok(&mut state, Input::Register(reg("n1", 1)), t(0));
    assert_eq!(want(&state.nodes["n1"]), Want::Schedulable);
    let cordon = Input::Cordon {
        node: "n1".into(),
        reason: "swap PSU".into(),
    };
    step_ok(&mut state, cordon, t(1));
    assert_eq!(
        want(&state.nodes["n1"]),
        Want::Drained(DrainCause::Operator("swap PSU".into()))
    );
    let mut lost = state.nodes["n1"].clone();
    lost.availability = Availability::Lost;
    assert_eq!(want(&lost), Want::Drained(DrainCause::Lost));
    let mut held = state.nodes["n1"].clone();
    std::sync::Arc::make_mut(&mut held.record).cordon = Some(crate::nodes::node::Cordon {
        reason: "held for review".into(),
        source: CordonSource::Recovery,
        since_unix_ms: 0,
    });
    assert_eq!(want(&held), Want::AsIs);
}

/// Regression guard: a recovered store turns every cordon into a review hold (source
/// `recovery`), which must not lift the drain of a node vigil drained for a fault.
#[test]
fn a_node_held_for_review_is_neither_drained_nor_resumed() {
    let memory = BTreeSet::new();
    let nodes = [
        node("n1", true, "vigil: XID 79 on GPU 3"),
        node("n2", false, ""),
    ];
    let intents = [
        Intent {
            slurm_name: "n1".into(),
            want: Want::AsIs,
        },
        Intent {
            slurm_name: "n2".into(),
            want: Want::AsIs,
        },
    ];
    assert!(plan(&intents, &nodes, &[], &memory).is_empty());
}
