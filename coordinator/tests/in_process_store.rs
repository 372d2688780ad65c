//! The in-process cluster (harness: `sim/`) and the state store: a store rolled back under a
//! restarted coordinator, exposed by an agent's store mark; a restored store; the recovery
//! hold after `--recover`.

mod sim;

use sim::{Cluster, TestResult, running_attempt};
use vigil_coordinator::config::Config;
use vigil_coordinator::engine::Event;
use vigil_coordinator::job::JobPhase;
use vigil_coordinator::node::CordonSource;
use vigil_coordinator::store::{Memory, RecoveryReport, StoreError, StoreMark};
use vigil_core::recovery::{JOBS_HELD, RecoveryHold};

/// Two nodes, a job running on one for 2 simulated seconds, and the store mark n0 was told.
async fn running_with_a_mark() -> Result<(Cluster, StoreMark), Box<dyn std::error::Error>> {
    let mut c = Cluster::start(2).await?;
    let id = c.submit(1, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    for _ in 0..40 {
        c.round().await?;
    }
    let told = c.agent("n0").mark.clone().ok_or("n0 was told no mark")?;
    Ok((c, told))
}

#[tokio::test(start_paused = true)]
async fn a_store_rolled_back_under_a_restart_is_exposed_by_an_agent_and_never_served() -> TestResult
{
    let (mut c, told) = running_with_a_mark().await?;
    let store = c.memory.mark();
    assert_eq!(told.store_id, store.store_id);
    assert!(
        told.seq >= 5 && told.seq <= store.seq,
        "told {told:?}, store at {store:?}: only durable commits are told"
    );
    // The data dir is replaced by an older copy of itself while the coordinator restarts:
    // the same store id, fewer commits.
    let memory = c.memory.clone();
    c.restart_on(memory.clone()).await?;
    memory.rewind_seq(told.seq - 3);
    let (commits, seq) = (memory.commits(), memory.mark().seq);
    c.reconnect("n0", 100).await?;
    let end = c.engine_end().await?;
    let Err(StoreError::Damaged { path, what }) = end else {
        return Err(format!("the engine should end with Damaged, not {end:?}").into());
    };
    assert_eq!(path, std::path::Path::new("memory"));
    let expected = format!(
        "it holds commit {seq} of store {}, but agent n0 was told of commit {}: the data dir \
         was replaced by an older copy (a rollback)",
        told.store_id, told.seq
    );
    assert_eq!(what, expected);
    assert_eq!(
        (memory.commits(), memory.mark().seq),
        (commits, seq),
        "nothing of that registration (nor anything after it) was committed"
    );
    let agent = c.agent("n0");
    agent.read_commands();
    let reason = agent
        .rejected
        .clone()
        .ok_or("n0's registration was not refused")?;
    assert!(reason.contains("rolled back"), "{reason}");
    assert!(!agent.registered, "{reason}");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_restored_store_is_a_new_store_and_an_agent_that_knew_the_old_one_joins_it() -> TestResult
{
    let (mut c, told) = running_with_a_mark().await?;
    // Restored from a backup (another store id), in one commit: far fewer than n0 was told.
    let restored = Memory::new();
    let store = restored.store();
    for record in c.memory.store().load_nodes()? {
        store.put_node(&record)?;
    }
    for job in c.memory.store().load_jobs()? {
        store.put_job(&job)?;
    }
    store.flush().await?;
    assert!(restored.mark().seq < told.seq, "{told:?}");
    c.restart_on(restored.clone()).await?;
    c.reconnect("n0", 100).await?;
    c.reconnect("n1", 101).await?;
    c.until("both nodes registered again", |c| {
        c.handle
            .snapshot()
            .nodes
            .iter()
            .all(|n| n.session.is_some())
    })
    .await?;
    for _ in 0..10 {
        c.round().await?;
    }
    let agent = c.agent("n0");
    assert!(agent.registered && agent.rejected.is_none());
    let mark = agent.mark.clone().ok_or("no mark")?;
    assert_eq!(
        mark.store_id,
        restored.mark().store_id,
        "the new store replaced the old mark"
    );
    assert!(mark.seq <= restored.mark().seq);
    assert!(
        !c.engine.is_finished(),
        "the coordinator serves the restored store"
    );
    Ok(())
}

/// The source of `node`'s cordon, if it is cordoned.
fn cordon_source(c: &Cluster, node: &str) -> Option<CordonSource> {
    c.node(node)
        .and_then(|n| n.record.cordon.as_ref().map(|c| c.source))
}

fn held_with_reason(c: &Cluster, id: &str) -> bool {
    c.job(id)
        .is_some_and(|j| j.phase == JobPhase::Pending && j.reason == JOBS_HELD)
}

async fn confirm(c: &Cluster) -> Result<RecoveryHold, vigil_coordinator::error::ControlError> {
    c.handle
        .ask(|reply| Event::ConfirmRecovery {
            actor: "alice (admin)".into(),
            reply,
        })
        .await
}

#[tokio::test(start_paused = true)]
async fn a_recovered_coordinator_holds_nodes_and_jobs_until_an_operator_confirms() -> TestResult {
    let memory = Memory::new();
    // Before the damage: two nodes known, and a job that waits (their agents are away).
    Cluster::start_on(memory.clone(), Config::default(), 2)
        .await?
        .shutdown()
        .await?;
    let mut c = Cluster::start_on(memory.clone(), Config::default(), 0).await?;
    let id = c.submit(1, 0).await?;
    assert_eq!(c.job(&id).map(|j| j.phase), Some(JobPhase::Pending));
    assert!(confirm(&c).await.is_err(), "no hold to confirm yet");
    c.shutdown().await?;

    // vigil-coordinator --recover: the store kept what was valid and says what it lost.
    let report = RecoveryReport {
        damage: "nodes tree: checksum mismatch".into(),
        lost: vec![
            "nodes/n7: checksum mismatch".into(),
            "jobs/j-9: unreadable".into(),
        ],
        lost_nodes: vec!["n7".into()],
        lost_jobs: vec!["j-9".into()],
        damaged_copy: "/var/lib/vigil/damaged".into(),
    };
    let mut c = Cluster::start_on(memory.recovered(report), Config::default(), 0).await?;
    let hold = c.handle.snapshot().recovery.clone().ok_or("a hold")?;
    assert!(hold.holds_jobs());
    assert_eq!(hold.lost.len(), 2);
    let stored: Option<RecoveryHold> = memory.store().load_cluster("recovery")?;
    assert_eq!(stored.as_ref(), Some(&hold), "committed before serving");
    assert!(
        c.metrics
            .encode()?
            .contains("\nvigil_store_recovery_hold 1\n")
    );
    for node in ["n0", "n1"] {
        assert_eq!(cordon_source(&c, node), Some(CordonSource::Recovery));
    }
    assert!(held_with_reason(&c, &id), "{:?}", c.job(&id));

    // The agents come back: their nodes stay cordoned, the job does not start.
    c.register("n0", 11).await?;
    c.register("n1", 12).await?;
    c.until("both nodes back, cordoned", |c| {
        c.nodes().iter().all(|(_, state)| state == "Cordoned")
    })
    .await?;
    // A node whose record was lost registers as new: cordoned too, and told why.
    c.register("n7", 13).await?;
    c.until("n7 cordoned", |c| {
        cordon_source(c, "n7") == Some(CordonSource::Recovery)
    })
    .await?;
    let n7 = c.node("n7").ok_or("n7")?;
    assert!(
        n7.events.iter().any(|e| e.kind == "recovery"),
        "{:?}",
        n7.events
    );
    // An operator reviews n0 and uncordons it: still no job before the confirmation.
    c.handle
        .ask(|reply| Event::Uncordon {
            node: "n0".into(),
            force: false,
            actor: "alice (admin)".into(),
            reply,
        })
        .await?;
    for _ in 0..40 {
        c.round().await?;
    }
    assert!(held_with_reason(&c, &id), "{:?}", c.job(&id));
    assert!(c.agents.iter().all(|a| a.log.is_empty()), "nothing started");

    // A restart during the hold keeps it: from the store, without --recover.
    c.shutdown().await?;
    let mut c = Cluster::start_on(memory.clone(), Config::default(), 0).await?;
    assert_eq!(
        c.handle
            .snapshot()
            .recovery
            .as_ref()
            .map(|h| h.holds_jobs()),
        Some(true)
    );
    for (i, node) in ["n0", "n1", "n7"].into_iter().enumerate() {
        c.register(node, 21 + i as u64).await?;
    }
    c.until("every agent back", |c| {
        c.handle
            .snapshot()
            .nodes
            .iter()
            .all(|n| n.session.is_some())
    })
    .await?;
    for _ in 0..40 {
        c.round().await?;
    }
    assert!(held_with_reason(&c, &id), "{:?}", c.job(&id));
    assert_eq!(cordon_source(&c, "n0"), None, "the review is kept");
    assert_eq!(cordon_source(&c, "n1"), Some(CordonSource::Recovery));

    // The operator confirms: the job starts on the uncordoned node; the others stay cordoned.
    let confirmed = confirm(&c).await?;
    assert_eq!(confirmed.confirmed_by.as_deref(), Some("alice (admin)"));
    c.until("the job running", |c| running_attempt(c, &id, 1))
        .await?;
    assert_eq!(c.job(&id).map(|j| j.placement), Some(vec!["n0".to_owned()]));
    for node in ["n1", "n7"] {
        assert_eq!(cordon_source(&c, node), Some(CordonSource::Recovery));
    }
    assert!(
        c.metrics
            .encode()?
            .contains("\nvigil_store_recovery_hold 0\n")
    );
    let again = confirm(&c)
        .await
        .err()
        .ok_or("a second confirm is refused")?;
    assert!(
        again
            .to_string()
            .contains("already confirmed by alice (admin)"),
        "{again}"
    );
    let stored: Option<RecoveryHold> = c.memory.store().load_cluster("recovery")?;
    assert_eq!(
        stored.and_then(|h| h.confirmed_by).as_deref(),
        Some("alice (admin)")
    );
    Ok(())
}

/// The "registered" history entries in the store.
fn registered_entries(memory: &Memory) -> Result<usize, StoreError> {
    Ok(memory
        .store()
        .load_events()?
        .iter()
        .filter(|(_, e)| e.kind == "registered")
        .count())
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_storm_is_answered_before_any_commit_and_its_history_follows_within_a_second()
-> TestResult {
    const NODES: usize = 40;
    let c = Cluster::start(NODES).await?;
    let memory = c.memory.clone();
    let config = c.config.clone();
    c.shutdown().await?;
    // The coordinator comes back on the same store; every agent registers again, unchanged.
    let mut c = Cluster::start_on(memory.clone(), config, 0).await?;
    let commits = memory.commits();
    // The first registrations' entries, flushed at the shutdown.
    assert_eq!(registered_entries(&memory)?, NODES);
    for i in 0..NODES {
        c.register(&format!("n{i}"), 100 + i as u64).await?;
    }
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    for agent in &mut c.agents {
        agent.read_commands();
    }
    let answered = c.agents.iter().filter(|a| a.registered).count();
    assert_eq!(answered, NODES, "every agent is answered in its turn");
    assert_eq!(
        memory.commits(),
        commits,
        "nothing of the storm needed a commit before the answers: only history was written"
    );
    assert_eq!(registered_entries(&memory)?, NODES);
    // The history goes out within a second, in one commit.
    for _ in 0..24 {
        c.round().await?;
    }
    assert_eq!(registered_entries(&memory)?, 2 * NODES);
    assert_eq!(
        memory.commits(),
        commits + 1,
        "the storm's history in one commit; heartbeats write nothing"
    );
    Ok(())
}
