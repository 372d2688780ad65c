//! One node name, one host, end to end: a second host registering a live node's name is
//! refused (and backs off slowly) while the first keeps its node undisturbed; once the first is
//! gone past `lost_after`, the second takes the name, with an `identity-changed` event. The
//! same host restarting takes its name back at once; a GPU swapped while it was down is an
//! `inventory-changed` event and a burn-in.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use vigil_tests::{Agent, Cluster, FAST_LIVENESS, LONG, clusterctl, now, wait_for};

/// The two hosts' dirs: each agent's state dir (and so its machine-id) is its own.
fn host_dir(cluster: &Cluster, host: &str) -> Result<PathBuf> {
    let dir = cluster.dir.path().join(host);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn detail(cluster: &Cluster, node: &str) -> Result<Value> {
    clusterctl(&cluster.url(), &["-o", "json", "node", node])?.json()
}

fn events(detail: &Value, kind: &str) -> Vec<String> {
    detail["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["kind"] == kind)
                .filter_map(|e| e["message"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn conflicts_counted(cluster: &Cluster) -> Result<f64> {
    let text = vigil_tests::http_get(cluster.coordinator.metrics, "/metrics")?;
    Ok(vigil_tests::metric(&text, "vigil_node_identity_conflicts_total").unwrap_or(0.0))
}

#[test]
fn a_second_host_with_a_live_nodes_name_is_refused_until_the_first_is_lost() -> Result<()> {
    let cluster = Cluster::start(FAST_LIVENESS, 0)?;
    let url = cluster.url();
    let mut first = Agent::start(&host_dir(&cluster, "host-a")?, &url, "n1", 4)?;
    let before = wait_for("n1 Ready with host a's 4 GPUs", LONG, || {
        let d = detail(&cluster, "n1");
        Ok(d.ok()
            .filter(|d| d["node"]["state"] == "Ready" && d["node"]["gpus_total"] == 4))
    })?;
    let registered = events(&before, "registered").len();

    let second = Agent::start(&host_dir(&cluster, "host-b")?, &url, "n1", 2)?;
    let refused = wait_for("the conflict in n1's events", LONG, || {
        Ok(events(&detail(&cluster, "n1")?, "identity-conflict")
            .pop()
            .filter(|_| second.log_text().contains("registration refused:")))
    })?;
    assert!(
        refused.starts_with("node \"n1\" is already connected from ")
            && refused.contains("; this host is ")
            && refused.ends_with(": give it its own node name"),
        "{refused}"
    );
    let log = second.log_text();
    assert!(log.contains(&refused), "the refused agent says why: {log}");
    assert!(conflicts_counted(&cluster)? >= 1.0);

    // The first host's node is undisturbed while the second keeps trying.
    let watch_until = now() + Duration::from_secs(30);
    while now() < watch_until {
        let d = detail(&cluster, "n1")?;
        let node = &d["node"];
        assert_eq!(node["state"], "Ready", "{d}");
        assert_eq!(node["gpus_total"], 4, "{d}");
        assert_eq!(events(&d, "registered").len(), registered, "{d}");
        assert!(events(&d, "cordon").is_empty(), "{d}");
        assert!(events(&d, "gpu-lost").is_empty(), "{d}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let d = detail(&cluster, "n1")?;
    assert_eq!(
        events(&d, "identity-conflict").len(),
        1,
        "rate-limited: {d}"
    );
    // Its fast reconnect backoff (at most 1 s here) would have tried some 30 times.
    let counted = conflicts_counted(&cluster)?;
    assert!(
        counted < 10.0,
        "the refused agent backs off slowly: {counted}"
    );
    let warned = second.log_text().matches("registration refused:").count();
    assert_eq!(warned, 1, "warned once per reason: {}", second.log_text());

    // The first host goes away for good: once n1 is Lost, the second host takes the name.
    first.terminate(Duration::from_secs(10))?;
    let taken = wait_for("n1 rebound to host b", LONG, || {
        let d = detail(&cluster, "n1")?;
        Ok(
            (d["node"]["gpus_total"] == 2 && !events(&d, "identity-changed").is_empty())
                .then_some(d),
        )
    })?;
    let changed = events(&taken, "identity-changed");
    assert_eq!(changed.len(), 1, "{taken}");
    assert!(
        changed[0].contains("host replaced: machine-id test-"),
        "{}",
        changed[0]
    );
    let burn_in = events(&taken, "burn-in");
    assert!(
        burn_in.iter().any(|m| m.contains("identity-changed")),
        "burned in before it takes work: {taken}"
    );
    assert!(events(&taken, "gpu-lost").is_empty(), "{taken}");
    Ok(())
}

#[test]
fn clusterctl_node_forget_lets_another_host_take_the_name_at_once() -> Result<()> {
    let cluster = Cluster::start(FAST_LIVENESS, 0)?;
    let url = cluster.url();
    let first = Agent::start(&host_dir(&cluster, "host-a")?, &url, "n1", 4)?;
    wait_for("n1 Ready", LONG, || {
        let d = detail(&cluster, "n1");
        Ok(d.ok().filter(|d| d["node"]["state"] == "Ready"))
    })?;
    let out = clusterctl(&url, &["node", "forget", "n1"])?;
    assert!(out.success(), "{}", out.stderr);
    let d = detail(&cluster, "n1")?;
    let forgotten = events(&d, "identity-forgotten");
    assert_eq!(forgotten.len(), 1, "{d}");
    // Host b takes the name while host a is still connected; host a is now the stranger.
    let second = Agent::start(&host_dir(&cluster, "host-b")?, &url, "n1", 2)?;
    wait_for("n1 held by host b, host a refused", LONG, || {
        let d = detail(&cluster, "n1")?;
        let refused = first.log_text().contains("registration refused:");
        Ok((d["node"]["gpus_total"] == 2 && refused).then_some(()))
    })?;
    assert!(second.log_text().contains("registered with coordinator"));
    let unknown = clusterctl(&url, &["node", "forget", "nope"])?;
    assert!(
        !unknown.success() && unknown.stderr.contains("nope"),
        "{}",
        unknown.stderr
    );
    Ok(())
}

/// A cluster with one host's agent as n1, Ready: the cluster, the host's dir, its agent and
/// n1's detail.
fn one_host_ready() -> Result<(Cluster, PathBuf, Agent, Value)> {
    let cluster = Cluster::start(FAST_LIVENESS, 0)?;
    let host = host_dir(&cluster, "host-a")?;
    let agent = Agent::start(&host, &cluster.url(), "n1", 4)?;
    let ready = wait_for("n1 Ready", LONG, || {
        let d = detail(&cluster, "n1");
        Ok(d.ok().filter(|d| d["node"]["state"] == "Ready"))
    })?;
    Ok((cluster, host, agent, ready))
}

#[test]
fn the_same_host_restarting_takes_its_name_back_at_once() -> Result<()> {
    let (cluster, host, mut agent, before) = one_host_ready()?;
    let url = cluster.url();
    let machine_id = before["machine_id"].as_str().unwrap_or("").to_owned();
    assert!(machine_id.starts_with("test-"), "{before}");
    let boot_id = before["boot_id"].clone();
    // kill -9 (the host's agent crashed, or the host rebooted): the old session may still look
    // live to the coordinator when the same host comes back; same machine-id, so it takes over.
    agent.kill9();
    let restarted = now();
    let agent = Agent::start(&host, &url, "n1", 4)?;
    let after = wait_for("n1 registered again", LONG, || {
        let d = detail(&cluster, "n1")?;
        Ok(
            (d["last_registered_unix_ms"] != before["last_registered_unix_ms"]
                && d["node"]["state"] == "Ready")
                .then_some(d),
        )
    })?;
    println!("same host back in {:?}", restarted.elapsed());
    assert!(events(&after, "identity-conflict").is_empty(), "{after}");
    assert!(events(&after, "identity-changed").is_empty(), "{after}");
    assert!(events(&after, "inventory-changed").is_empty(), "{after}");
    assert_eq!(after["machine_id"], machine_id.as_str());
    // One machine, one boot: the test agents share this machine's boot id.
    assert_eq!(after["boot_id"], boot_id);
    assert!(!agent.log_text().contains("registration refused"));
    assert_eq!(conflicts_counted(&cluster)?, 0.0);
    Ok(())
}

#[test]
fn a_gpu_swapped_while_the_host_was_down_is_an_inventory_change_with_a_burn_in() -> Result<()> {
    let (cluster, host, mut agent, before) = one_host_ready()?;
    let url = cluster.url();
    let serial = |d: &Value, i: usize| d["gpus"][i]["serial"].as_str().unwrap_or("").to_owned();
    let old_serial = serial(&before, 2);
    agent.kill9();
    // The same host, back with a new board in slot 2.
    let _agent = Agent::start_with(&host, &url, "n1", 4, "sim_replaced_gpus = [2]")?;
    let changed = wait_for("an inventory-changed event", LONG, || {
        let d = detail(&cluster, "n1")?;
        Ok((!events(&d, "inventory-changed").is_empty()).then_some(d))
    })?;
    let new_serial = serial(&changed, 2);
    assert_ne!(new_serial, old_serial);
    let message = events(&changed, "inventory-changed").join("\n");
    assert!(
        message.contains(&format!("serial {new_serial}"))
            && message.contains("replacing GPU 2 (")
            && message.contains(&format!("serial {old_serial}")),
        "{message}"
    );
    // Burned in before it takes work, then Ready; the old board is not charged as lost.
    let done = wait_for("n1 burned in and Ready", LONG, || {
        let d = detail(&cluster, "n1")?;
        Ok((d["node"]["state"] == "Ready" && !events(&d, "burn-in").is_empty()).then_some(d))
    })?;
    assert!(
        events(&done, "burn-in")
            .iter()
            .any(|m| m.contains("inventory-changed")),
        "{done}"
    );
    assert!(events(&done, "gpu-lost").is_empty(), "{done}");
    assert!(events(&done, "cordon").is_empty(), "{done}");
    assert_eq!(
        serial(&done, 0),
        serial(&before, 0),
        "other slots unchanged"
    );
    Ok(())
}
