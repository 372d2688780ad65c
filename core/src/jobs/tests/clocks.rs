//! Time no job loses: a coordinator's stall or failover is not a hang, and a wall-clock step
//! changes no decision.

use super::*;

#[test]
fn a_coordinator_stall_counts_as_neither_silence_nor_a_hang() {
    let now = t0();
    let mut s = cluster_with(2, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    for (n, rank) in [("n1", 0), ("n2", 1)] {
        heartbeat(
            &mut s,
            n,
            beat(&[("train-1", 1, rank, Some(5))]),
            at(now, 1.0),
        );
    }
    // The coordinator is stopped for 70 s: past lost_after (10 s) and hang_timeout (60 s).
    let woke = at(now, 71.0);
    let mut unforgiven = s.clone();
    tick(&mut unforgiven, woke);
    assert_ne!(
        phase(&unforgiven, &id),
        JobPhase::Running,
        "without it, the job fails"
    );

    let mut effects = step_ok(
        &mut s,
        Input::Stalled {
            gap: Duration::from_secs(70),
        },
        woke,
    );
    effects.extend(tick(&mut s, woke));
    assert!(stops(&effects).is_empty(), "{effects:?}");
    assert_eq!(phase(&s, &id), JobPhase::Running);
    assert!(
        s.nodes
            .values()
            .all(|n| n.availability == crate::node::Availability::Ready)
    );
    // Silence after the stall still counts: lost_after later, the nodes are Lost.
    tick(&mut s, at(now, 82.0));
    assert_ne!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn a_new_coordinator_watches_progress_from_when_it_starts() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    heartbeat(
        &mut s,
        "n1",
        beat(&[("train-1", 1, 0, Some(5))]),
        at(now, 1.0),
    );
    // The state as another coordinator loads it 70 s later (past hang_timeout, 60 s):
    // nobody watched in between, so the worker is not hung yet.
    let loaded = at(now, 71.0);
    let mut taken_over = s.clone();
    taken_over.rearm_clocks(loaded);
    assert!(tick(&mut taken_over, loaded).is_empty());
    assert_eq!(phase(&taken_over, &id), JobPhase::Running);
    let effects = tick(&mut s, loaded);
    assert_eq!(stops(&effects), ["n1"], "without it, the job is hung");
    assert_eq!(phase(&s, &id), JobPhase::Stopping);
    // Silence after the takeover still counts.
    let effects = tick(&mut taken_over, at(now, 132.0));
    assert_eq!(stops(&effects), ["n1"]);
    assert_eq!(phase(&taken_over, &id), JobPhase::Stopping);
}

/// No Unreachable or Lost node, no stop, no failure among `effects`.
fn assert_undisturbed(effects: &[Effect], when: &str) {
    assert!(stops(effects).is_empty(), "{when}: {effects:#?}");
    assert!(
        !effects.iter().any(|e| matches!(
            e,
            Effect::Availability {
                to: crate::node::Availability::Unreachable | crate::node::Availability::Lost,
                ..
            } | Effect::JobLog { warn: true, .. }
        )),
        "{when}: {effects:#?}"
    );
}

#[test]
fn a_wall_clock_step_changes_no_decision() {
    let now = t0();
    let mut s = cluster_with(1, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    // Steady heartbeats with steady progress, each followed half a second later by a tick.
    // The wall clock steps +1 h at 29.5 s and back -1 h at 80.5 s; the monotonic clock
    // runs on. Each step comes right before a tick, with the last progress on the other side.
    let wall = |secs: f64| {
        if (29.5..80.5).contains(&secs) {
            HOUR_MS
        } else {
            0
        }
    };
    for second in 1..=150_u32 {
        let t = f64::from(second);
        let hb = stepped(now, t, wall(t));
        let e = heartbeat(
            &mut s,
            "n1",
            beat(&[(&id, 1, 0, Some(u64::from(second)))]),
            hb,
        );
        assert_undisturbed(&e, &format!("heartbeat at {t}s"));
        let e = tick(&mut s, stepped(now, t + 0.5, wall(t + 0.5)));
        assert_undisturbed(&e, &format!("tick at {t}.5s"));
        assert_eq!(
            s.nodes["n1"].availability,
            crate::node::Availability::Ready,
            "at {t}.5s"
        );
        let job = &s.jobs[&id];
        assert_eq!(
            (job.phase, job.attempt),
            (JobPhase::Running, 1),
            "at {t}.5s"
        );
    }
    // And a silence of 20 s of wall time but 2 s on the monotonic clock is no silence; one of
    // 2 s of wall time but 70 s on the monotonic clock is a hang and a lost node.
    let e = tick(&mut s, stepped(now, 152.0, 20_000 - 2_000));
    assert_undisturbed(&e, "wall +20 s, mono +2 s");
    tick(&mut s, stepped(now, 220.0, 2_000 - 70_000));
    assert_eq!(s.nodes["n1"].availability, crate::node::Availability::Lost);
    assert_ne!(phase(&s, &id), JobPhase::Running);
}

#[test]
fn a_wall_clock_step_neither_shortens_nor_lengthens_a_restart_backoff() {
    let now = t0();
    let mut s = cluster_with(1, now, LivenessConfig::default());
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    heartbeat(&mut s, "n1", beat(&[(&id, 1, 0, Some(1))]), at(now, 1.0));
    // The worker crashes at 10 s: the attempt is dead at once (one node), backoff 5 s.
    from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 10.0));
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    // Heartbeats keep n1 Ready; the wall clock steps +1 h while the monotonic one moves 1 s.
    let timeline = [
        (11.0, HOUR_MS, false),
        (12.0, HOUR_MS, false),
        // Then it steps back -1 h below where it was: still before the backoff ends.
        (13.0, -HOUR_MS, false),
        (14.9, -HOUR_MS, false),
        // The backoff ended on the monotonic clock, though the wall says 1 h earlier.
        (15.5, -HOUR_MS, true),
    ];
    for (t, step, starts_now) in timeline {
        let e = heartbeat(
            &mut s,
            "n1",
            v1::Heartbeat::default(),
            stepped(now, t, step),
        );
        let mut all = e;
        all.extend(tick(&mut s, stepped(now, t, step)));
        let started = starts(&all);
        if starts_now {
            assert_eq!(started.len(), 1, "at {t}s: {all:#?}");
            assert_eq!(started[0].1.attempt, 2);
            assert_eq!(
                (phase(&s, &id), s.jobs[&id].attempt),
                (JobPhase::Running, 2)
            );
        } else {
            assert!(started.is_empty(), "at {t}s (wall {step:+} ms): {all:#?}");
            assert_eq!(
                (phase(&s, &id), s.jobs[&id].attempt),
                (JobPhase::Restarting, 1)
            );
        }
    }
}
