//! A job's life: its gang start, waiting for nodes, failures and restarts from the last
//! complete checkpoint, success, cancel, adoption by a restarted coordinator, a drain.

use super::*;

#[test]
fn a_job_starts_on_exactly_its_gang_with_the_launcher_environment() {
    let now = t0();
    let mut s = cluster(3, now);
    let (id, effects) = submit(&mut s, &spec(2, 1), now);
    assert_eq!(id, "train-1");
    assert_eq!(phase(&s, &id), JobPhase::Running);
    let started = starts(&effects);
    assert_eq!(
        started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n2"],
        "the starts come in the submission's own effects"
    );
    // The scheduler's one pass per step starts the job; it claims its spares on its next pass
    // (the next step or tick, here at the same instant), before any later job is placed.
    let (other, _) = submit(&mut s, &spec(1, 0), now);
    assert_eq!(
        s.jobs[&id].spares,
        ["n3"],
        "the third node is held as a spare"
    );
    assert_eq!(phase(&s, &other), JobPhase::Pending, "n3 is not free");
    let (_, w) = &started[1];
    assert_eq!((w.attempt, w.node_rank, w.nnodes), (1, 1, 2));
    let env = &w.env;
    for (k, v) in [
        ("VIGIL_JOB_ID", "train-1"),
        ("VIGIL_ATTEMPT", "1"),
        ("VIGIL_NNODES", "2"),
        ("VIGIL_NODE_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("NODE_RANK", "1"),
        ("GROUP_RANK", "1"),
        ("PET_NNODES", "2"),
        ("PET_NODE_RANK", "1"),
        ("PET_MASTER_ADDR", "10.0.0.1"),
        ("PET_MASTER_PORT", "29500"),
        ("PET_NPROC_PER_NODE", "8"),
        ("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7"),
    ] {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(!env.contains_key("VIGIL_RESUME_FROM"), "fresh start");
    assert_eq!(
        started[0].1.checkpoint_dir, "/shared/ckpt/train",
        "rank 0 watches checkpoints"
    );
    assert!(started[1].1.checkpoint_dir.is_empty());
    assert!(effects.iter().any(|e| matches!(e, Effect::PersistJob(_))));
}

#[test]
fn a_job_waits_pending_until_enough_nodes_exist() {
    let now = t0();
    let mut s = cluster(1, now);
    step_ok(&mut s, Input::Register(reg("n2", 2, Vec::new())), now);
    step_ok(
        &mut s,
        Input::Cordon {
            node: "n2".into(),
            reason: "maintenance".into(),
        },
        now,
    );
    let (id, effects) = submit(&mut s, &spec(2, 0), now);
    assert_eq!(phase(&s, &id), JobPhase::Pending);
    assert!(starts(&effects).is_empty());
    assert!(
        s.jobs[&id].reason.contains("waiting for 2 eligible nodes"),
        "{}",
        s.jobs[&id].reason
    );
    let effects = step_ok(
        &mut s,
        Input::Uncordon {
            node: "n2".into(),
            force: false,
        },
        at(now, 1.0),
    );
    assert_eq!(starts(&effects).len(), 2);
    assert_eq!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn two_jobs_never_share_a_node() {
    let now = t0();
    let mut s = cluster(3, now);
    let (a, _) = submit(&mut s, &spec(2, 0), now);
    let (b, _) = submit(&mut s, &spec(2, 0), now);
    assert_eq!(phase(&s, &a), JobPhase::Running);
    assert_eq!(phase(&s, &b), JobPhase::Pending);
}

#[test]
fn a_crash_restarts_the_whole_gang_from_the_last_complete_checkpoint() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    from(
        &mut s,
        "n1",
        checkpoint(&id, 1, "/shared/ckpt/train/step_00000200", 200),
        at(now, 10.0),
    );
    // Reports a checkpoint from rank 1, outside the dir, or of another attempt: ignored.
    from(
        &mut s,
        "n2",
        checkpoint(&id, 1, "/shared/ckpt/train/step_00000300", 300),
        at(now, 11.0),
    );
    from(
        &mut s,
        "n1",
        checkpoint(&id, 1, "/tmp/step_00000400", 400),
        at(now, 11.0),
    );
    from(
        &mut s,
        "n1",
        checkpoint(&id, 7, "/shared/ckpt/train/step_00000500", 500),
        at(now, 11.0),
    );
    assert_eq!(
        s.jobs[&id].checkpoint.as_ref().and_then(|c| c.step),
        Some(200)
    );

    let crash = at(now, 20.0);
    let effects = from(&mut s, "n2", exited(&id, 1, Some(3), false), crash);
    assert_eq!(phase(&s, &id), JobPhase::Stopping);
    // n2's stop (its worker already exited: it confirms the node is clean) comes from the
    // transition, n1's from `commands`: every node of the gang, in the same step.
    assert_eq!(
        sorted(stops(&effects)),
        ["n1", "n2"],
        "every node of the gang is stopped"
    );
    assert!(
        starts(&effects).is_empty(),
        "nothing starts before the old attempt is dead"
    );
    assert!(
        s.jobs[&id]
            .reason
            .contains("n2 (rank 1) exited with code 3"),
        "{}",
        s.jobs[&id].reason
    );
    assert_eq!(s.jobs[&id].attempts[0].culprit_node, "n2");

    // n2's worker reported its own exit (its process group is dead); n1's is confirmed now.
    let e1 = from(&mut s, "n1", exited(&id, 1, None, true), at(now, 21.5));
    assert!(starts(&e1).is_empty());
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    assert!(
        starts(&tick(&mut s, at(now, 25.0))).is_empty(),
        "backoff is 5s"
    );

    let effects = tick(&mut s, at(now, 26.5));
    let started = starts(&effects);
    assert_eq!(started.len(), 2);
    assert_eq!(started[0].0, "n1", "a crash blames no node: same nodes");
    assert_eq!(started[0].1.attempt, 2);
    assert_eq!(
        started[0]
            .1
            .env
            .get("VIGIL_RESUME_FROM")
            .map(String::as_str),
        Some("/shared/ckpt/train/step_00000200")
    );
    let job = &s.jobs[&id];
    assert_eq!((job.restarts, job.attempt), (1, 2));
    assert_eq!(job.lost_ms, 6_500, "from the failure to the relaunch");
    assert_eq!(
        job.attempts[1].resumed_from.as_ref().and_then(|c| c.step),
        Some(200)
    );
    // Late reports of attempt 1 are fenced off.
    from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 27.0));
    assert_eq!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn an_xid_cordons_the_node_and_the_job_moves_to_the_spare() {
    let now = t0();
    let mut s = cluster(3, now);
    let (id, _) = submit(&mut s, &spec(2, 1), now);
    let xid = event(v1::agent_event::Kind::Xid(v1::XidError {
        gpu_index: 3,
        xid: 79,
        gpu_uuid: String::new(),
    }));
    let effects = from(&mut s, "n1", xid, at(now, 5.0));
    assert!(s.nodes["n1"].cordoned(), "the culprit is cordoned");
    assert!(
        !s.nodes["n2"].cordoned() && !s.nodes["n3"].cordoned(),
        "its gang mates are not"
    );
    assert_eq!(stops(&effects), ["n1", "n2"]);
    assert_eq!(s.jobs[&id].attempts[0].culprit_node, "n1");
    let effects = confirm_stops(&mut s, &id, &effects, at(now, 6.0));
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    assert!(starts(&effects).is_empty());
    let effects = tick(&mut s, at(now, 11.0));
    let nodes: Vec<String> = starts(&effects).into_iter().map(|(n, _)| n).collect();
    assert_eq!(nodes, ["n2", "n3"], "the spare replaces the cordoned node");
    assert!(s.jobs[&id].spares.is_empty(), "no spare left");
}

#[test]
fn a_lost_node_fails_the_attempt_and_counts_as_stopped() {
    let now = t0();
    let mut s = cluster_with(3, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(2, 1), now);
    let effects = step_ok(
        &mut s,
        Input::Disconnected {
            node: "n2".into(),
            session: 2,
        },
        at(now, 1.0),
    );
    assert_eq!(
        phase(&s, &id),
        JobPhase::Running,
        "Unreachable is not Lost: its workers may still run"
    );
    assert!(stops(&effects).is_empty());
    // Keep n1 and n3 alive.
    for t in [5.0, 9.0] {
        for n in ["n1", "n3"] {
            heartbeat(&mut s, n, v1::Heartbeat::default(), at(now, t));
        }
    }
    let effects = tick(&mut s, at(now, 11.0));
    assert_eq!(s.jobs[&id].workers["n2"].phase, WorkerPhase::Lost);
    assert_eq!(stops(&effects), ["n1"], "no command to the lost node");
    assert!(
        s.jobs[&id].reason.contains("node n2 lost"),
        "{}",
        s.jobs[&id].reason
    );
    confirm_stops(&mut s, &id, &effects, at(now, 11.5));
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    for n in ["n1", "n3"] {
        heartbeat(&mut s, n, v1::Heartbeat::default(), at(now, 16.0));
    }
    let started = starts(&tick(&mut s, at(now, 17.0)));
    assert_eq!(
        started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n3"]
    );
}

#[test]
fn an_unreachable_node_holds_the_restart_until_it_is_lost() {
    let now = t0();
    let mut s = cluster_with(2, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    step_ok(
        &mut s,
        Input::Disconnected {
            node: "n2".into(),
            session: 2,
        },
        at(now, 1.0),
    );
    let effects = from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 2.0));
    assert_eq!(
        stops(&effects),
        ["n1"],
        "n2 misses its stop: it is not connected (it is sent one when it reconnects)"
    );
    assert_eq!(s.jobs[&id].workers["n2"].phase, WorkerPhase::Stopping);
    from(&mut s, "n1", exited(&id, 1, None, true), at(now, 2.5));
    assert_eq!(
        phase(&s, &id),
        JobPhase::Stopping,
        "n2's worker may still run: wait"
    );
    heartbeat(&mut s, "n1", v1::Heartbeat::default(), at(now, 9.0));
    let effects = tick(&mut s, at(now, 9.5));
    assert!(
        stops(&effects).is_empty(),
        "still no one to send n2's stop to"
    );
    assert_eq!(phase(&s, &id), JobPhase::Stopping);
    tick(&mut s, at(now, 10.0));
    assert_eq!(
        phase(&s, &id),
        JobPhase::Restarting,
        "Lost: the lease has expired"
    );
}

#[test]
fn no_progress_for_hang_timeout_restarts_the_job() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    for (t, step) in [(10.0, 5), (30.0, 9), (50.0, 9), (89.0, 9)] {
        heartbeat(&mut s, "n1", beat(&[(&id, 1, 0, Some(step))]), at(now, t));
        assert!(tick(&mut s, at(now, t)).is_empty(), "at {t}s");
        assert_eq!(phase(&s, &id), JobPhase::Running, "at {t}s");
    }
    let effects = tick(&mut s, at(now, 90.5));
    assert_eq!(stops(&effects), ["n1"]);
    assert!(
        s.jobs[&id].reason.contains("no progress from n1"),
        "{}",
        s.jobs[&id].reason
    );
    assert!(
        s.jobs[&id].reason.contains("last step 9"),
        "{}",
        s.jobs[&id].reason
    );
}

#[test]
fn max_restarts_exhausted_fails_the_job_with_the_reason() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    let mut t = 0.0;
    for attempt in 1..=3 {
        t += 10.0;
        assert_eq!(s.jobs[&id].attempt, attempt);
        let effects = from(
            &mut s,
            "n1",
            exited(&id, attempt, Some(2), false),
            at(now, t),
        );
        confirm_stops(&mut s, &id, &effects, at(now, t + 0.1));
        tick(&mut s, at(now, t + 6.0));
    }
    let job = &s.jobs[&id];
    assert_eq!(job.phase, JobPhase::Failed);
    assert_eq!(job.attempt, 3);
    assert!(
        job.reason
            .contains("gave up after 2 restarts (max_restarts = 2)"),
        "{}",
        job.reason
    );
    assert!(job.reason.contains("exited with code 2"), "{}", job.reason);
    assert!(job.placement.is_empty(), "nodes released");
}

#[test]
fn all_workers_exiting_zero_succeeds() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    from(&mut s, "n1", exited(&id, 1, Some(0), false), at(now, 5.0));
    assert_eq!(phase(&s, &id), JobPhase::Running, "rank 1 still runs");
    from(&mut s, "n2", exited(&id, 1, Some(0), false), at(now, 5.1));
    assert_eq!(phase(&s, &id), JobPhase::Succeeded);
    let (other, _) = submit(&mut s, &spec(2, 0), at(now, 6.0));
    assert_eq!(
        phase(&s, &other),
        JobPhase::Running,
        "the nodes are free again"
    );
}

#[test]
fn cancel_stops_every_worker_then_cancels() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let (p, _) = submit(&mut s, &spec(2, 0), now);
    assert_eq!(phase(&s, &p), JobPhase::Pending);
    let effects = cancel(&mut s, &p, now);
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Refused(_))),
        "{effects:?}"
    );
    assert_eq!(
        phase(&s, &p),
        JobPhase::Cancelled,
        "a pending job cancels at once"
    );
    let effects = cancel(&mut s, &id, at(now, 1.0));
    assert_eq!(stops(&effects), ["n1", "n2"]);
    assert_eq!(s.jobs[&id].phase_name(), "Cancelling");
    confirm_stops(&mut s, &id, &effects, at(now, 2.0));
    assert_eq!(phase(&s, &id), JobPhase::Cancelled);
    assert!(tick(&mut s, at(now, 100.0)).is_empty(), "never restarted");
    assert_eq!(phase(&s, &id), JobPhase::Cancelled);
    assert!(matches!(
        cancel(&mut s, "nope", at(now, 100.0)).as_slice(),
        [Effect::Refused(StateError::UnknownJob(_))]
    ));
}

#[test]
fn a_restarted_coordinator_adopts_running_workers() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let jobs: Vec<Job> = s.jobs.values().cloned().collect();
    let records = s.nodes.values().map(|n| (*n.record).clone()).collect();
    let later = at(now, 30.0);
    let mut s = ClusterState::load(
        records,
        Vec::new(),
        LivenessConfig::default(),
        HealthConfig::default(),
        later,
    )
    .with_jobs(jobs);
    s.rearm_clocks(later);
    let worker = |rank| v1::WorkerInfo {
        job_id: id.clone(),
        attempt: 1,
        node_rank: rank,
        pid: 100 + rank,
        ..Default::default()
    };
    for (i, n) in ["n1", "n2"].into_iter().enumerate() {
        let rank = u32::try_from(i).unwrap_or(0);
        let effects = step_ok(
            &mut s,
            Input::Register(reg(n, 10 + u64::from(rank), vec![worker(rank)])),
            later,
        );
        assert!(
            starts(&effects).is_empty() && stops(&effects).is_empty(),
            "{effects:#?}"
        );
    }
    let job = &s.jobs[&id];
    assert_eq!(
        (job.phase, job.attempt),
        (JobPhase::Running, 1),
        "not restarted"
    );
    assert_eq!(job.workers["n2"].pid, 101);
}

#[test]
fn a_worker_of_a_stale_attempt_is_stopped_and_a_missing_one_fails_the_attempt() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let stale = v1::WorkerInfo {
        job_id: id.clone(),
        attempt: 0,
        node_rank: 0,
        pid: 7,
        ..Default::default()
    };
    let effects = step_ok(
        &mut s,
        Input::Register(reg("n1", 11, vec![stale])),
        at(now, 1.0),
    );
    assert!(
        stop_commands(&effects)
            .iter()
            .any(|(n, w)| n == "n1" && w.job_id == id && w.attempt == 0),
        "the stale worker is stopped: {effects:#?}"
    );
    assert_eq!(
        phase(&s, &id),
        JobPhase::Stopping,
        "and n1 came back without attempt 1's worker"
    );
    assert!(
        s.jobs[&id].reason.contains("worker on n1 is gone"),
        "{}",
        s.jobs[&id].reason
    );
}

#[test]
fn an_operator_cordon_does_not_kill_a_running_job() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let effects = step_ok(
        &mut s,
        Input::Cordon {
            node: "n2".into(),
            reason: "drain later".into(),
        },
        now,
    );
    assert!(s.nodes["n2"].cordoned());
    assert!(stops(&effects).is_empty());
    assert_eq!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn invalid_specs_are_refused_with_the_field() {
    let now = t0();
    let mut s = cluster(1, now);
    let effects = step_raw(
        &mut s,
        Input::SubmitJob {
            spec_toml: spec(2, 0),
            source: "job.toml".into(),
        },
        now,
    );
    let [Effect::Refused(err)] = effects.as_slice() else {
        panic!("too many nodes: refused, and nothing else: {effects:#?}");
    };
    assert!(matches!(err, StateError::InvalidSpec(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("nodes = 2 but the cluster has only 1"),
        "{err}"
    );
    assert!(s.jobs.is_empty());
}

#[test]
fn drain_cordons_and_restarts_the_job_elsewhere_without_blame() {
    let now = t0();
    let mut s = cluster(3, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let effects = step_ok(
        &mut s,
        Input::Drain {
            node: "n2".into(),
            reason: "kernel upgrade".into(),
        },
        at(now, 1.0),
    );
    let jobs = effects
        .iter()
        .find_map(|e| match e {
            Effect::Answer(Answer::Drained { jobs }) => Some(jobs.clone()),
            _ => None,
        })
        .expect("the drain is answered with the jobs it restarts");
    assert_eq!(jobs, std::slice::from_ref(&id));
    assert!(s.nodes["n2"].cordoned());
    assert_eq!(stops(&effects), ["n1", "n2"]);
    assert_eq!(
        s.jobs[&id].attempts[0].culprit_node, "",
        "a drain blames no node"
    );
    confirm_stops(&mut s, &id, &effects, at(now, 2.0));
    let started = starts(&tick(&mut s, at(now, 8.0)));
    assert_eq!(
        started.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n3"]
    );
}

#[test]
fn a_report_about_another_nodes_work_changes_nothing_and_is_named() {
    let now = t0();
    let mut s = cluster(3, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    let placement = s.jobs[&id].placement.clone();
    let outsider = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| !placement.iter().any(|p| p == n))
        .expect("a node outside the gang");
    let before = s.jobs[&id].clone();
    // A confused (or compromised) host claims the job's worker crashed.
    let effects = from(
        &mut s,
        outsider,
        exited(&id, 1, Some(1), false),
        at(now, 1.0),
    );
    let named: Vec<&Effect> = effects
        .iter()
        .filter(|e| {
            matches!(
                e,
                Effect::Ignored {
                    why: crate::state::Ignored::Unassigned(
                        crate::input::assigned::Unassigned::NotAssigned
                    ),
                    ..
                }
            )
        })
        .collect();
    assert_eq!(named.len(), 1, "{effects:?}");
    assert_eq!(s.jobs[&id].phase, before.phase);
    assert_eq!(s.jobs[&id].attempt, 1);
    assert!(stop_commands(&effects).is_empty(), "{effects:?}");
}
