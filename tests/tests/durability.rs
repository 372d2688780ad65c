//! Crash durability: kill -9 the coordinator at random moments while an
//! operator cordons and uncordons; every change clusterctl reported as done
//! must be there after the restart, and the store must always open.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use vigil_tests::{Cluster, FAST_LIVENESS, LONG, clusterctl, nodes, wait_for};

const ROUNDS: usize = 50;
const NODES: [&str; 2] = ["node-0", "node-1"];

/// A node's cordon as clusterctl shows it: None or the reason.
type Cordon = Option<String>;

fn cordons(url: &str) -> Result<BTreeMap<String, Cordon>> {
    let listed = nodes(url)?;
    NODES
        .iter()
        .map(|n| {
            let node = listed
                .get(*n)
                .with_context(|| format!("{n} is missing after restart"))?;
            Ok((
                (*n).to_owned(),
                node["cordon"]["reason"].as_str().map(str::to_owned),
            ))
        })
        .collect()
}

#[test]
fn every_acknowledged_cordon_survives_kill9_at_random_moments() -> Result<()> {
    let seed = std::env::var("VIGIL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed} (set VIGIL_TEST_SEED to replay)");
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut cluster = Cluster::start(FAST_LIVENESS, NODES.len())?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", NODES.len()))?;

    // What each node's cordon may be: one value once confirmed, two while a
    // change whose answer never came may or may not have been applied.
    let mut possible: BTreeMap<String, BTreeSet<Cordon>> = NODES
        .iter()
        .map(|n| ((*n).to_owned(), BTreeSet::from([None])))
        .collect();
    let mut acknowledged = 0;
    for round in 0..ROUNDS {
        let url = cluster.url();
        let ops: Vec<(String, Cordon)> = (0..rng.usize(1..8))
            .map(|i| {
                let node = NODES[rng.usize(..NODES.len())].to_owned();
                let cordon = rng.bool().then(|| format!("round {round} op {i}"));
                (node, cordon)
            })
            .collect();
        let kill_after = Duration::from_millis(rng.u64(0..400));
        let worker_ops = ops.clone();
        let worker = std::thread::spawn(move || -> Vec<bool> {
            worker_ops
                .iter()
                .map(|(node, cordon)| {
                    let out = match cordon {
                        Some(reason) => clusterctl(&url, &["cordon", node, "--reason", reason]),
                        None => clusterctl(&url, &["uncordon", node]),
                    };
                    out.is_ok_and(|o| o.success())
                })
                .collect()
        });
        std::thread::sleep(kill_after);
        cluster.coordinator.kill9();
        let done = worker
            .join()
            .map_err(|_| anyhow::anyhow!("operator thread panicked"))?;
        for ((node, cordon), ok) in ops.iter().zip(done) {
            let set = possible.entry(node.clone()).or_default();
            if ok {
                set.clear();
                acknowledged += 1;
            }
            set.insert(cordon.clone());
        }

        cluster
            .restart_coordinator()
            .with_context(|| format!("round {round}: the store did not open after kill -9"))?;
        let actual = cordons(&cluster.url())?;
        for (node, cordon) in &actual {
            if !possible[node].contains(cordon) {
                bail!(
                    "round {round}: {node} has cordon {cordon:?}, but clusterctl reported {:?}\nlog:\n{}",
                    possible[node],
                    cluster.coordinator.log_text()
                );
            }
            possible.insert(node.clone(), BTreeSet::from([cordon.clone()]));
        }
    }
    println!(
        "{ROUNDS} kill -9 rounds, {acknowledged} acknowledged changes, all present after restart"
    );
    assert!(
        acknowledged > ROUNDS / 2,
        "too few changes were acknowledged to prove anything"
    );
    Ok(())
}
