//! A hang: every node is asked for evidence before the stops go out; the answers are kept with
//! the attempt, and a fabric fault in one points at that node.

use super::*;

fn hang_evidence(job: &str, attempt: u64, fabric: Vec<v1::FabricDelta>) -> v1::AgentEvent {
    event(v1::agent_event::Kind::HangEvidence(v1::HangEvidence {
        job_id: job.into(),
        attempt,
        processes: vec![v1::ProcessEvidence {
            pid: 42,
            comm: "python3".into(),
            state: "S (sleeping)".into(),
            wchan: "futex_wait_queue".into(),
            kernel_stack: "[<0>] futex_wait".into(),
            python_stacks: "Thread 42 (idle): all_reduce (torch/distributed)".into(),
        }],
        log_tail: "step 5\n".into(),
        fabric,
        error: String::new(),
    }))
}

/// Port mlx5_1/1's counters during the attempt.
fn delta(state: &str, link_downed: u64) -> v1::FabricDelta {
    v1::FabricDelta {
        port: "mlx5_1/1".into(),
        state: state.into(),
        link_downed,
        ..Default::default()
    }
}

/// A job of `nodes` nodes and `spares` spares on a cluster just big enough, hung: its ranks
/// report step 5 once, then nothing until the hang timeout passes at 62 s. The cluster, the
/// job, what the hang set off, and the start time.
fn hung(nodes: u32, spares: u32) -> (ClusterState, String, Vec<Effect>, Now) {
    let now = t0();
    let mut s = cluster(nodes + spares, now);
    let (id, _) = submit(&mut s, &spec(nodes, spares), now);
    for (rank, node) in s.jobs[&id].placement.clone().iter().enumerate() {
        let workers = [(id.as_str(), 1, rank as u32, Some(5))];
        heartbeat(&mut s, node, beat(&workers), at(now, 1.0));
    }
    let effects = tick(&mut s, at(now, 62.0));
    (s, id, effects, now)
}

#[test]
fn a_hang_asks_every_node_for_evidence_before_stopping_and_keeps_the_answers() {
    let (mut s, id, effects, now) = hung(2, 0);
    let order: Vec<(String, &str)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Command { node, kind } => match kind {
                v1::command::Kind::CaptureEvidence(_) => Some((node.clone(), "capture")),
                v1::command::Kind::StopWorkers(_) => Some((node.clone(), "stop")),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let captures: Vec<&str> = order
        .iter()
        .filter(|(_, k)| *k == "capture")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(captures, ["n1", "n2"]);
    let first_stop = order.iter().position(|(_, k)| *k == "stop");
    let last_capture = order.iter().rposition(|(_, k)| *k == "capture");
    assert!(
        last_capture < first_stop && first_stop.is_some(),
        "captures go out before the stops: {order:?}"
    );

    from(
        &mut s,
        "n2",
        hang_evidence(&id, 1, vec![delta("DOWN", 1)]),
        at(now, 63.0),
    );
    from(
        &mut s,
        "n1",
        hang_evidence(&id, 1, Vec::new()),
        at(now, 63.5),
    );
    let a = &s.jobs[&id].attempts[0];
    let nodes: Vec<&str> = a.evidence.iter().map(|e| e.node.as_str()).collect();
    assert_eq!(nodes, ["n1", "n2"]);
    assert_eq!(a.evidence[0].processes[0].wchan, "futex_wait_queue");
    assert_eq!(a.suspect, "n2: port mlx5_1/1 is DOWN");
    // A repeated answer replaces the node's earlier one.
    from(
        &mut s,
        "n1",
        hang_evidence(&id, 1, Vec::new()),
        at(now, 64.0),
    );
    assert_eq!(s.jobs[&id].attempts[0].evidence.len(), 2);
}

#[test]
fn a_crash_asks_for_no_evidence() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    let effects = from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 2.0));
    assert!(!effects.iter().any(|e| matches!(
        e,
        Effect::Command {
            kind: v1::command::Kind::CaptureEvidence(_),
            ..
        }
    )));
}

#[test]
fn a_hang_suspect_is_swapped_for_the_spare_in_the_next_attempt() {
    let (mut s, id, stops, now) = hung(2, 1);
    let placed = s.jobs[&id].placement.clone();
    let spare = s.jobs[&id].spares.clone();
    assert_eq!((placed.len(), spare.len()), (2, 1), "{placed:?} {spare:?}");
    let suspect = placed[1].clone();
    // Two flaps, still ACTIVE: below the cordon rules, but the hang waited on it.
    from(
        &mut s,
        &suspect,
        hang_evidence(&id, 1, vec![delta("ACTIVE", 2)]),
        at(now, 63.0),
    );
    assert!(
        s.jobs[&id].avoid.contains(&suspect),
        "{:?}",
        s.jobs[&id].avoid
    );
    confirm_stops(&mut s, &id, &stops, at(now, 64.0));
    let mut next = Vec::new();
    for i in 0..20 {
        tick(&mut s, at(now, 65.0 + f64::from(i)));
        if s.jobs[&id].attempt == 2 {
            next = s.jobs[&id].placement.clone();
            break;
        }
    }
    assert!(
        !next.contains(&suspect) && next.contains(&spare[0]) && next.contains(&placed[0]),
        "attempt 2 on {next:?}; suspect {suspect}, spare {spare:?}"
    );
    // Not cordoned: the job avoided it once; the node stays schedulable for others.
    assert!(!s.nodes[&suspect].cordoned());
}

#[test]
fn without_a_spare_a_hang_suspect_is_kept_rather_than_wait() {
    let (mut s, id, _, now) = hung(2, 0);
    from(
        &mut s,
        "n2",
        hang_evidence(&id, 1, vec![delta("ACTIVE", 1)]),
        at(now, 63.0),
    );
    assert!(!s.jobs[&id].attempts[0].suspect.is_empty());
    assert!(s.jobs[&id].avoid.is_empty(), "no spare to take its place");
}
