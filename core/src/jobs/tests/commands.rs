//! Commands follow the state: a start or a stop that no agent has confirmed yet is sent again,
//! with backoff, until one does.

use super::*;

#[test]
fn a_lost_stop_is_sent_again_with_backoff_until_the_agent_confirms_it() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, _) = submit(&mut s, &spec(2, 0), now);
    for (n, pid) in [("n1", 101), ("n2", 102)] {
        from(&mut s, n, started(&id, 1, pid), at(now, 0.5));
    }
    assert!(
        s.jobs[&id]
            .workers
            .values()
            .all(|w| w.phase == WorkerPhase::Running)
    );
    // n2's worker crashes; the stop to n1 is lost on the way (never delivered).
    let effects = from(&mut s, "n2", exited(&id, 1, Some(1), false), at(now, 10.0));
    let first: Vec<(String, u64)> = stop_commands(&effects)
        .into_iter()
        .map(|(n, w)| (n, w.attempt))
        .collect();
    assert_eq!(
        sorted(first.iter().map(|(n, _)| n.clone()).collect()),
        ["n1", "n2"]
    );
    assert!(first.iter().all(|(_, a)| *a == 1), "{first:?}");
    assert_eq!(phase(&s, &id), JobPhase::Stopping);

    // Time passes in 100 ms ticks: when does n1 get its stop again?
    let mut resent = Vec::new();
    for tenth in 101..=175_u64 {
        let when = at_ms(now, tenth * 100);
        for (node, w) in stop_commands(&tick(&mut s, when)) {
            assert_eq!(
                (node.as_str(), w.job_id.as_str(), w.attempt),
                ("n1", id.as_str(), 1),
                "only n1's stop is re-sent"
            );
            assert_eq!(w.grace_ms, 3_000);
            resent.push(tenth * 100);
        }
    }
    assert_eq!(
        resent,
        [11_000, 13_000, 17_000],
        "re-sent after 1 s, then 2 s, then 4 s"
    );
    assert_eq!(phase(&s, &id), JobPhase::Stopping, "not confirmed yet");

    // The stop arrives at last; the agent confirms it.
    let effects = from(&mut s, "n1", exited(&id, 1, None, true), at(now, 17.5));
    assert_eq!(phase(&s, &id), JobPhase::Restarting);
    assert!(stops(&effects).is_empty(), "{effects:#?}");
    for tenth in 176..=400_u64 {
        let effects = tick(&mut s, at_ms(now, tenth * 100));
        assert!(
            stops(&effects).is_empty(),
            "no stop once confirmed, at {} ms: {effects:#?}",
            tenth * 100
        );
    }
    assert_eq!(
        (phase(&s, &id), s.jobs[&id].attempt),
        (JobPhase::Running, 2)
    );
}

#[test]
fn a_start_not_yet_confirmed_is_sent_again_until_a_heartbeat_reports_the_worker() {
    let now = t0();
    let mut s = cluster(2, now);
    let (id, effects) = submit(&mut s, &spec(2, 0), now);
    let first = starts(&effects);
    assert_eq!(
        first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n1", "n2"]
    );
    let mut sent: Vec<(u64, String)> = Vec::new();
    for tenth in 1..=200_u64 {
        let when = at_ms(now, tenth * 100);
        if tenth == 35 {
            // n1's agent reports its worker: the start arrived after all.
            let e = heartbeat(&mut s, "n1", beat(&[(&id, 1, 0, None)]), when);
            assert!(starts(&e).iter().all(|(n, _)| n != "n1"), "{e:#?}");
            assert_eq!(s.jobs[&id].workers["n1"].phase, WorkerPhase::Running);
        }
        if tenth == 75 {
            let e = heartbeat(&mut s, "n2", beat(&[(&id, 1, 1, None)]), when);
            assert!(starts(&e).is_empty(), "{e:#?}");
        }
        for (node, w) in starts(&tick(&mut s, when)) {
            let original = first.iter().find(|(n, _)| *n == node).map(|(_, w)| w);
            assert_eq!(Some(&w), original, "the same command again, to {node}");
            sent.push((tenth * 100, node));
        }
    }
    let at_times = |node: &str| -> Vec<u64> {
        sent.iter()
            .filter(|(_, n)| n == node)
            .map(|(t, _)| *t)
            .collect()
    };
    assert_eq!(
        at_times("n1"),
        [1_000, 3_000],
        "re-sent after 1 s, 2 s; never once reported"
    );
    assert_eq!(
        at_times("n2"),
        [1_000, 3_000, 7_000],
        "re-sent after 1 s, 2 s, 4 s; never once reported"
    );
    assert!(
        s.jobs[&id]
            .workers
            .values()
            .all(|w| w.phase == WorkerPhase::Running)
    );
}

#[test]
fn a_node_that_reconnects_with_a_worker_of_an_old_attempt_is_sent_its_stop_until_it_is_gone() {
    let now = t0();
    let mut s = cluster(1, now);
    let (id, _) = submit(&mut s, &spec(1, 0), now);
    heartbeat(&mut s, "n1", beat(&[(&id, 1, 0, Some(1))]), at(now, 1.0));
    // Attempt 1 fails; attempt 2 starts on n1 again and runs.
    from(&mut s, "n1", exited(&id, 1, Some(1), false), at(now, 2.0));
    heartbeat(&mut s, "n1", v1::Heartbeat::default(), at(now, 3.0));
    let e = tick(&mut s, at(now, 8.0));
    assert_eq!(starts(&e).len(), 1);
    assert_eq!(s.jobs[&id].attempt, 2);
    heartbeat(&mut s, "n1", beat(&[(&id, 2, 0, Some(1))]), at(now, 9.0));

    // n1's agent reconnects in a new session, reporting attempt 2's worker and one of
    // attempt 1 that survived somehow (a stop it never got).
    let both = [(id.as_str(), 1, 0, Some(1)), (id.as_str(), 2, 0, Some(2))];
    let workers = beat(&both).workers;
    let reconnect = at(now, 20.0);
    let effects = step_ok(&mut s, Input::Register(reg("n1", 11, workers)), reconnect);
    let stray = |effects: &[Effect]| -> Vec<u64> {
        stop_commands(effects)
            .into_iter()
            .map(|(n, w)| {
                assert_eq!((n.as_str(), w.job_id.as_str()), ("n1", id.as_str()));
                w.attempt
            })
            .collect()
    };
    assert_eq!(stray(&effects), [1], "the old attempt's worker is stopped");
    assert_eq!(
        (phase(&s, &id), s.jobs[&id].attempt),
        (JobPhase::Running, 2),
        "the current one is adopted"
    );

    // Reports keep showing it (every second): re-sent with backoff.
    let mut sent = Vec::new();
    for tenth in 201..=400_u64 {
        let when = at_ms(now, tenth * 100);
        let mut e = Vec::new();
        if tenth % 10 == 0 {
            let report: &[(&str, u64, u32, Option<u64>)] =
                if tenth < 300 { &both } else { &both[1..] };
            e.extend(heartbeat(&mut s, "n1", beat(report), when));
        }
        e.extend(tick(&mut s, when));
        for attempt in stray(&e) {
            assert_eq!(attempt, 1, "never a stop to the current attempt");
            sent.push(tenth * 100);
        }
    }
    assert_eq!(
        sent,
        [21_000, 23_000, 27_000],
        "1 s, 2 s, 4 s apart while reported; never again once gone (at 30 s)"
    );
    assert!(
        s.stray_stops.is_empty(),
        "forgotten once no agent reports it"
    );
    assert_eq!(
        (phase(&s, &id), s.jobs[&id].attempt),
        (JobPhase::Running, 2)
    );
}
