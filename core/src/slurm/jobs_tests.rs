use std::collections::BTreeSet;

use super::*;
use crate::slurm::tests::job;
use crate::slurm::{Action, HOLD_REASON, plan};

fn vigil(n: &str) -> bool {
    ["n1", "n2", "n3"].contains(&n)
}

fn running(id: &str, nodes: &[&str]) -> SlurmJob {
    job(id, JobState::Running, "None", nodes)
}

#[test]
fn a_job_gets_a_record_once_seen_running_on_vigils_nodes_and_only_changes_persist() {
    let mut ledger = Ledger::default();
    let pending = [job("7", JobState::Pending, "Priority", &[])];
    assert!(
        !ledger.observe(&pending, true, vigil, 1),
        "pending: not yet"
    );
    let elsewhere = [running("8", &["other1"])];
    assert!(
        !ledger.observe(&elsewhere, true, vigil, 2),
        "not on vigil's nodes"
    );
    let jobs = [running("7", &["n1", "n2"])];
    assert!(ledger.observe(&jobs, true, vigil, 3));
    assert!(
        !ledger.observe(&jobs, true, vigil, 4),
        "same listing: nothing to store"
    );
    let r = &ledger.jobs["7"];
    assert_eq!((r.name.as_str(), r.user.as_str()), ("train", "alice"));
    assert_eq!(r.runs.len(), 1);
    assert_eq!((r.runs[0].started_ms, r.runs[0].ended_ms), (3, None));
    assert!(!ledger.jobs.contains_key("8"));
}

#[test]
fn runs_requeues_and_the_final_state_are_recorded() {
    let mut ledger = Ledger::default();
    ledger.observe(&[running("7", &["n1", "n2"])], true, vigil, 10);
    assert!(ledger.requeued("7", "n2", "vigil: XID 79", Some(8), 11));
    assert!(!ledger.requeued("99", "n2", "vigil: XID 79", None, 11));
    assert_eq!(ledger.awaiting_rerun(), BTreeSet::from(["7".to_owned()]));
    // Still shows running where it ran: the same run, still awaiting its rerun.
    assert!(!ledger.observe(&[running("7", &["n1", "n2"])], true, vigil, 12));
    assert!(ledger.jobs["7"].awaiting_rerun());
    let held = [job("7", JobState::Pending, HOLD_REASON, &[])];
    assert!(ledger.observe(&held, true, vigil, 13));
    assert_eq!(ledger.jobs["7"].runs[0].ended_ms, Some(13));
    assert!(ledger.jobs["7"].awaiting_rerun());
    assert!(ledger.observe(&[running("7", &["n1", "n3"])], true, vigil, 14));
    assert!(ledger.awaiting_rerun().is_empty(), "it runs again");
    assert_eq!(ledger.jobs["7"].runs[1].nodes, ["n1", "n3"]);
    let done = [job("7", JobState::Finished, "None", &["n1", "n3"])];
    assert!(ledger.observe(&done, true, vigil, 20));
    let r = &ledger.jobs["7"];
    assert_eq!(r.runs[1].ended_ms, Some(20));
    assert_eq!(
        r.finished,
        Some(Finished {
            at_ms: 20,
            outcome: "COMPLETED".into()
        })
    );
    assert!(!ledger.observe(&done, true, vigil, 21));
    assert!(
        !ledger.observe(&[], true, vigil, 22),
        "ended: leaving the queue is no news"
    );
}

#[test]
fn a_job_missing_from_a_complete_listing_has_left_the_queue() {
    let mut ledger = Ledger::default();
    ledger.observe(&[running("7", &["n1"])], true, vigil, 1);
    assert!(
        !ledger.observe(&[], false, vigil, 2),
        "a listing with bad lines proves nothing"
    );
    assert!(ledger.observe(&[], true, vigil, 3));
    let r = &ledger.jobs["7"];
    assert_eq!(r.finished.as_ref().map(|f| f.outcome.as_str()), Some(GONE));
    assert_eq!(r.runs[0].ended_ms, Some(3));
}

#[test]
fn only_so_many_finished_records_are_kept_oldest_dropped_first() {
    let mut ledger = Ledger {
        keep_finished: 2,
        ..Ledger::default()
    };
    for (i, id) in ["1", "2", "3"].iter().enumerate() {
        let t = i as u64 * 10;
        ledger.observe(&[running(id, &["n1"])], false, vigil, t);
        ledger.observe(
            &[job(id, JobState::Finished, "None", &["n1"])],
            false,
            vigil,
            t + 1,
        );
    }
    ledger.observe(&[running("4", &["n2"])], false, vigil, 40);
    let ids: Vec<&str> = ledger.jobs.keys().map(String::as_str).collect();
    assert_eq!(ids, ["2", "3", "4"], "the running job is never dropped");
}

#[test]
fn a_job_requeued_over_and_over_keeps_its_latest_runs() {
    let mut ledger = Ledger::default();
    for i in 0..(MAX_RUNS as u64 + 5) {
        ledger.observe(&[running("7", &["n1"])], true, vigil, i * 2);
        ledger.requeued("7", "n1", "vigil: XID 79", None, i * 2);
        ledger.observe(
            &[job("7", JobState::Pending, "None", &[])],
            true,
            vigil,
            i * 2 + 1,
        );
    }
    let r = &ledger.jobs["7"];
    assert_eq!(r.runs.len(), MAX_RUNS);
    assert!(r.requeues.len() <= MAX_RUNS);
    assert!(r.awaiting_rerun());
}

/// Issue 19 part 4: the requeue memory survives a coordinator restart, because it is derived
/// from the stored records, not kept in the adapter.
#[test]
fn a_held_job_vigil_requeued_is_released_by_the_next_coordinator() {
    let mut ledger = Ledger::default();
    ledger.observe(&[running("7", &["n1", "n2"])], true, vigil, 1);
    ledger.requeued("7", "n2", "vigil: XID 79", Some(1), 2);
    // The coordinator dies; the next one loads the stored record.
    let stored = serde_json::to_string(&ledger).expect("encodes");
    let loaded: Ledger = serde_json::from_str(&stored).expect("decodes");
    let held = [job("7", JobState::Pending, HOLD_REASON, &[])];
    let actions = plan(&[], &[], &held, &loaded.awaiting_rerun());
    assert_eq!(actions, [Action::Release { job: "7".into() }]);
}

#[test]
fn the_cluster_state_stores_the_ledger_only_when_it_changed() {
    use crate::state::Effect;
    use crate::step::Input;
    use crate::test_utils::{patient_state, reg, step_ok, t};
    let mut state = patient_state();
    step_ok(&mut state, Input::Register(reg("n1", 1)), t(0));
    let listing = || Input::SlurmJobs {
        jobs: vec![running("7", &["n1"])],
        complete: true,
    };
    let persists = |effects: &[Effect]| {
        effects
            .iter()
            .filter(|e| matches!(e, Effect::PersistSlurmJobs(_)))
            .count()
    };
    assert_eq!(persists(&step_ok(&mut state, listing(), t(1))), 1);
    assert_eq!(persists(&step_ok(&mut state, listing(), t(2))), 0);
    let requeued = Input::SlurmRequeued {
        job: "7".into(),
        node: "n1".into(),
        reason: "vigil: XID 79".into(),
    };
    let effects = step_ok(&mut state, requeued, t(3));
    assert_eq!(persists(&effects), 1);
    assert!(effects.iter().any(|e| matches!(e, Effect::Record { .. })));
    assert!(state.slurm_jobs.jobs["7"].awaiting_rerun());
}
