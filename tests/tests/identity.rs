//! One node name, one host, end to end: a second host registering a live node's name is
//! refused (and backs off slowly) while the first keeps its node undisturbed; once the first is
//! gone past `lost_after`, the second takes the name, with an `identity-changed` event.

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
