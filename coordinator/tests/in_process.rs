//! The in-process cluster (harness: `sim/`): the real engine, simulated agents and the memory
//! store in one paused-time runtime. Deterministic and fast (simulated seconds cost
//! microseconds), so the core loop is tested end to end without sockets, processes or real
//! time: XID -> cordon -> gang stop -> relaunch on the spare; a lost stop command; a store
//! whose commits fail; burn-in before a waiting job.

mod sim;

use std::time::Duration;

use sim::{Cluster, ROUND, TestResult, running_attempt};
use vigil_coordinator::config::Config;
use vigil_coordinator::job::JobPhase;

#[tokio::test(start_paused = true)]
async fn an_xid_cordons_the_node_stops_the_gang_and_relaunches_on_the_spare() -> TestResult {
    let mut c = Cluster::start(3).await?;
    let id = c.submit(2, 1).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    let job = c.job(&id).ok_or("job")?;
    let (bad, good) = (job.placement[0].clone(), job.placement[1].clone());
    let spare = job.spares.first().cloned().ok_or("a spare node")?;
    let injected = c.elapsed;
    c.xid(&bad, 3, 79).await?;
    c.until("the node cordoned", |c| {
        c.node(&bad).is_some_and(|n| n.cordoned())
    })
    .await?;
    let cordoned_after = c.elapsed - injected;
    let reason = c
        .node(&bad)
        .and_then(|n| n.record.cordon.clone())
        .ok_or("cordon")?;
    assert!(reason.reason.contains("XID 79"), "{}", reason.reason);
    c.until("attempt 2 running", |c| running_attempt(c, &id, 2))
        .await?;
    let job = c.job(&id).ok_or("job")?;
    assert!(!job.placement.contains(&bad), "{:?}", job.placement);
    assert!(
        job.placement.contains(&spare) && job.placement.contains(&good),
        "{:?}",
        job.placement
    );
    // Fencing: the gang's every worker of attempt 1 was stopped before attempt 2 started.
    for a in &c.agents {
        assert!(
            !a.running.contains_key(&(id.clone(), 1)),
            "{} still runs attempt 1",
            a.node
        );
    }
    // Simulated time: the cordon comes with the engine's first turn after the XID, and readers
    // see it with the next snapshot (published every 300 ms).
    assert!(
        cordoned_after <= Duration::from_millis(300) + ROUND,
        "cordoned after {cordoned_after:?}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_lost_stop_command_delays_the_restart_but_never_strands_the_job() -> TestResult {
    let mut c = Cluster::start(3).await?;
    let id = c.submit(2, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    let job = c.job(&id).ok_or("job")?;
    let (bad, other) = (job.placement[0].clone(), job.placement[1].clone());
    // The healthy node's first StopWorkers is lost on the way.
    c.agent(&other).drop_stops = 1;
    c.xid(&bad, 0, 79).await?;
    c.until("the job stopping", |c| {
        c.job(&id)
            .is_some_and(|j| j.phase != JobPhase::Running || j.attempt > 1)
    })
    .await?;
    c.until("attempt 2 running", |c| running_attempt(c, &id, 2))
        .await?;
    let agent = c.agent(&other);
    assert!(
        agent.stops_seen >= 2,
        "the stop was sent again: {} stops seen",
        agent.stops_seen
    );
    assert!(!agent.running.contains_key(&(id.clone(), 1)));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn commits_that_fail_hold_every_effect_until_the_store_recovers() -> TestResult {
    let mut c = Cluster::start(2).await?;
    // Every commit fails for a while: the submission is refused and nothing starts.
    c.faults.fail_next_commits(1);
    let refused = c.submit(1, 0).await;
    assert!(refused.is_err(), "a job is refused while its commit fails");
    assert!(
        c.jobs().is_empty(),
        "the refused job is undone: {:?}",
        c.jobs()
    );
    // Until the store has recovered (it writes the whole state again within a second),
    // requests are refused; heartbeats are still acknowledged, so leases hold.
    assert!(
        c.submit(1, 0).await.is_err(),
        "refused until the store recovered"
    );
    for _ in 0..40 {
        c.round().await?;
    }
    assert!(
        c.jobs().is_empty(),
        "no refused job came back: {:?}",
        c.jobs()
    );
    let id = c.submit(1, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    assert!(
        c.nodes().iter().all(|(_, s)| s == "Ready"),
        "{:?}",
        c.nodes()
    );
    // What the store holds is what was acknowledged: the accepted job, not the refused one.
    let stored = c.memory.store().load_jobs()?;
    let ids: Vec<&str> = stored.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [id.as_str()], "only the acknowledged job is stored");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_node_joining_is_burned_in_before_a_waiting_job_lands_on_it() -> TestResult {
    let mut config = Config::default();
    config.burn_in.on_join = true;
    let mut c = Cluster::start_with(config, 2).await?;
    c.until("n0 and n1 burned in", |c| {
        c.nodes().iter().all(|(_, state)| state == "Ready")
    })
    .await?;
    let busy = c.submit(2, 0).await?;
    c.until("the first job running", |c| running_attempt(c, &busy, 1))
        .await?;
    // A second job waits for a free node; then one joins. The step that registers it cordons
    // it for burn-in before the scheduler runs, so the job must not start there until its
    // burn-in passes.
    let id = c.submit(1, 0).await?;
    c.register("n2", 3).await?;
    c.until("the second job running", |c| running_attempt(c, &id, 1))
        .await?;
    assert_eq!(
        c.agent("n2").log,
        ["diagnostics passed", "start"],
        "burn-in ran before the start"
    );
    assert_eq!(c.job(&id).map(|j| j.placement), Some(vec!["n2".to_owned()]));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_reconnects_while_the_store_cannot_commit_keeps_its_job() -> TestResult {
    let mut c = Cluster::start(2).await?;
    let id = c.submit(1, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    let node = c.job(&id).ok_or("job")?.placement[0].clone();
    // The store fails every commit from now on (a full disk that stays full).
    c.faults.fail_next_commits(u32::MAX);
    // Its agent's stream breaks and it comes back, unchanged, with its worker.
    c.reconnect(&node, 100).await?;
    for _ in 0..400 {
        c.round().await?;
    }
    let agent = c.agent(&node);
    assert!(
        agent.registered,
        "an unchanged node is answered without a commit"
    );
    assert_eq!(
        agent.stops_seen, 0,
        "no stop while nothing could be committed"
    );
    assert!(agent.running.contains_key(&(id.clone(), 1)));
    let job = c.job(&id).ok_or("job")?;
    assert_eq!((job.phase, job.attempt), (JobPhase::Running, 1));
    assert!(
        c.nodes().iter().all(|(_, s)| s == "Ready"),
        "{:?}",
        c.nodes()
    );
    // The store recovers; the job never noticed.
    c.faults.fail_next_commits(0);
    for _ in 0..40 {
        c.round().await?;
    }
    assert!(running_attempt(&c, &id, 1));
    Ok(())
}

/// The engine's half of the early lease renewal. A restarted coordinator knows every node from
/// its store: an agent's contact (its Register read, its registration not stepped yet) gets a
/// `LeaseRenewed` at once, with the lease `Registered` will give. Once a node is `Lost` (its
/// work given away), or for another host claiming its name, a contact gets nothing.
#[tokio::test(start_paused = true)]
async fn a_contact_renews_a_known_nodes_lease_at_once_but_never_a_lost_ones() -> TestResult {
    use tokio::sync::mpsc;
    use vigil_coordinator::engine::Contact;
    use vigil_proto::v1::coordinator_message::Body;

    let mut c = Cluster::start(2).await?;
    let memory = c.memory.clone();
    c.restart_on(memory).await?;
    // The old sessions are gone with the old coordinator; no agent speaks from here on.
    c.agents.clear();
    let contact = |c: &Cluster, node: &str, machine: &str| {
        let (tx, rx) = mpsc::channel(8);
        c.handle.contact(Contact {
            node: node.into(),
            session: 100,
            machine_id: machine.into(),
            tx,
        });
        rx
    };
    let settle = || async {
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    };

    let mut known = contact(&c, "n0", "machine-n0");
    let mut other_host = contact(&c, "n1", "machine-elsewhere");
    let mut unknown = contact(&c, "n9", "machine-n9");
    settle().await;
    let renewed = known.try_recv()?.map_err(|s| s.to_string())?;
    let lease = c.config.liveness.agent_lease;
    match renewed.body {
        Some(Body::LeaseRenewed(r)) => {
            assert_eq!(Duration::from_millis(r.lease_ms), lease);
        }
        other => return Err(format!("expected LeaseRenewed, got {other:?}").into()),
    }
    assert!(
        other_host.try_recv().is_err(),
        "another host's claim renews nothing"
    );
    assert!(
        unknown.try_recv().is_err(),
        "a node nobody knows has no work to keep"
    );

    // No agent comes back: n1 goes Lost (n0's contact holds it off for lost_after).
    let lost_after = c.config.liveness.lost_after;
    let mut waited = Duration::ZERO;
    while c
        .node("n1")
        .is_none_or(|n| n.availability != vigil_core::node::Availability::Lost)
    {
        assert!(waited < lost_after * 3, "n1 never went Lost");
        tokio::time::advance(ROUND).await;
        waited += ROUND;
        settle().await;
    }
    let mut late = contact(&c, "n1", "machine-n1");
    settle().await;
    assert!(
        late.try_recv().is_err(),
        "a Lost node's work is given away: no renewal"
    );
    assert_eq!(
        c.metrics.early_lease_renewals.get(),
        1,
        "exactly one renewal counted"
    );
    c.shutdown().await
}
