//! End to end: real coordinator, agents and clusterctl processes on loopback.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use vigil_tests::{Cluster, FAST_LIVENESS, LONG, http_get, nodes, now, wait_for};

fn availability(cluster: &Cluster, node: &str) -> Result<Option<String>> {
    Ok(nodes(&cluster.url())?
        .get(node)
        .and_then(|n| n["availability"].as_str().map(str::to_owned)))
}

#[test]
fn killed_agent_goes_unreachable_then_lost_while_the_other_stays_ready() -> Result<()> {
    let mut cluster = Cluster::start(FAST_LIVENESS, 2)?;
    wait_for("both agents Ready", LONG, || cluster.all("Ready", 2))?;

    let listed = nodes(&cluster.url())?;
    for (name, node) in &listed {
        assert_eq!(node["gpus_total"], 8, "{name}");
        assert_eq!(node["gpus_healthy"], 8, "{name}");
        assert_eq!(node["simulated"], true, "{name}");
        assert_eq!(node["gpu_backend"], "simulated", "{name}");
    }

    cluster.agent_mut("node-1").expect("agent").kill9();
    let killed = now();
    wait_for("node-1 Unreachable", LONG, || {
        Ok((availability(&cluster, "node-1")?.as_deref() != Some("Ready")).then_some(()))
    })?;
    let to_unreachable = killed.elapsed();
    wait_for("node-1 Lost", LONG, || {
        Ok((availability(&cluster, "node-1")?.as_deref() == Some("Lost")).then_some(()))
    })?;
    let to_lost = killed.elapsed();
    println!(
        "kill -9 agent -> Unreachable: {to_unreachable:?}, -> Lost: {to_lost:?} (lost_after 3s)"
    );

    // lost_after counts from the last heartbeat, at most one interval (200 ms) before the kill.
    assert!(
        to_lost >= Duration::from_millis(2700),
        "Lost too early: {to_lost:?}"
    );
    assert!(
        to_lost <= Duration::from_secs(3) + Duration::from_secs(5),
        "Lost too late: {to_lost:?}"
    );
    assert!(
        to_unreachable <= Duration::from_secs(1) + Duration::from_secs(5),
        "{to_unreachable:?}"
    );
    assert_eq!(availability(&cluster, "node-0")?.as_deref(), Some("Ready"));
    Ok(())
}

#[test]
fn cordon_survives_coordinator_kill9_and_agents_return_by_themselves() -> Result<()> {
    let mut cluster = Cluster::start(FAST_LIVENESS, 2)?;
    wait_for("both agents Ready", LONG, || cluster.all("Ready", 2))?;

    let out = vigil_tests::clusterctl(
        &cluster.url(),
        &["cordon", "node-1", "--reason", "fan failure in PSU 2"],
    )?;
    assert!(out.success(), "cordon failed: {}", out.stderr);

    cluster.restart_coordinator()?;
    // Right after the restart, before any agent is back, the store alone answers.
    let listed = nodes(&cluster.url())?;
    assert_eq!(listed.keys().collect::<Vec<_>>(), ["node-0", "node-1"]);
    let cordon = &listed["node-1"]["cordon"];
    assert_eq!(cordon["reason"], "fan failure in PSU 2");
    assert_eq!(cordon["source"], "operator");
    assert_eq!(listed["node-1"]["scheduling"], "Cordoned");
    assert_eq!(listed["node-0"]["cordon"], serde_json::Value::Null);

    let start = now();
    wait_for("agents to reconnect by themselves", LONG, || {
        cluster.all("Ready", 2)
    })?;
    println!(
        "coordinator restart -> both agents Ready again: {:?}",
        start.elapsed()
    );
    let listed = nodes(&cluster.url())?;
    assert_eq!(listed["node-1"]["state"], "Cordoned");
    assert_eq!(listed["node-1"]["cordon"]["reason"], "fan failure in PSU 2");
    assert_eq!(listed["node-0"]["state"], "Ready");

    let out = vigil_tests::clusterctl(&cluster.url(), &["uncordon", "node-1"])?;
    assert!(out.success(), "uncordon failed: {}", out.stderr);
    assert_eq!(nodes(&cluster.url())?["node-1"]["state"], "Ready");
    Ok(())
}

#[test]
fn status_node_detail_and_metrics_describe_the_cluster() -> Result<()> {
    let cluster = Cluster::start(FAST_LIVENESS, 2)?;
    wait_for("both agents Ready", LONG, || cluster.all("Ready", 2))?;
    let url = cluster.url();

    let status = vigil_tests::clusterctl(&url, &["-o", "json", "status"])?.json()?;
    assert_eq!(status["nodes_total"], 2);
    assert_eq!(status["nodes_by_state"]["Ready"], 2);
    assert_eq!(status["gpus_total"], 16);
    assert_eq!(status["gpus_healthy"], 16);
    assert_eq!(status["nodes_simulated"], 2);

    let table = vigil_tests::clusterctl(&url, &["status"])?;
    assert!(table.success(), "{}", table.stderr);
    assert!(
        table.stdout.to_lowercase().contains("simulated"),
        "{}",
        table.stdout
    );

    let detail = vigil_tests::clusterctl(&url, &["-o", "json", "node", "node-0"])?.json()?;
    let gpus = detail["gpus"].as_array().expect("gpus");
    assert_eq!(gpus.len(), 8);
    let uuids: std::collections::BTreeSet<_> = gpus.iter().map(|g| g["uuid"].to_string()).collect();
    assert_eq!(uuids.len(), 8, "GPU UUIDs are distinct");

    let body = http_get(cluster.coordinator.metrics, "/metrics")?;
    for needle in [
        "vigil_nodes{state=\"Ready\"} 2",
        "vigil_gpus{state=\"healthy\"} 16",
        "vigil_heartbeats_received_total",
        "vigil_build_info{version=",
    ] {
        assert!(body.contains(needle), "/metrics lacks {needle}:\n{body}");
    }
    assert!(http_get(cluster.coordinator.metrics, "/healthz")?.contains("ok"));
    Ok(())
}

#[test]
fn agent_exits_cleanly_on_sigterm() -> Result<()> {
    let mut cluster = Cluster::start(FAST_LIVENESS, 1)?;
    wait_for("agent Ready", LONG, || cluster.all("Ready", 1))?;
    let status = cluster
        .agent_mut("node-0")
        .expect("agent")
        .terminate(LONG)?;
    assert!(status.success(), "agent exit status {status}");
    wait_for("node-0 Unreachable after its agent stopped", LONG, || {
        Ok((availability(&cluster, "node-0")?.as_deref() == Some("Unreachable")).then_some(()))
    })?;
    Ok(())
}

/// The `export VIGIL_...` line the demo prints for its "Try, in another shell" (scripts/demo.sh),
/// as `(NAME, VALUE)` pairs with `$url` replaced by `url`: the test reads the script itself, so
/// it breaks when the demo tells people something else.
fn demo_environment(url: &str) -> Result<Vec<(String, String)>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    let script = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the demo {}", path.display()))?;
    let mut exports = script
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("export VIGIL_") && l.contains("VIGIL_INSECURE"));
    let line = exports
        .next()
        .context("scripts/demo.sh prints no `export VIGIL_... VIGIL_INSECURE=...` line")?;
    ensure!(
        exports.next().is_none(),
        "scripts/demo.sh has two export lines"
    );
    let words = line.split('#').next().unwrap_or_default();
    words
        .split_whitespace()
        .skip(1)
        .map(|word| {
            let (name, value) = word
                .split_once('=')
                .with_context(|| format!("{word:?} in the demo's {line:?} is not NAME=VALUE"))?;
            let value = match value {
                "$url" => url.to_owned(),
                v if v.contains('$') => {
                    bail!("the demo's {word:?} uses a variable this test does not know")
                }
                v => v.to_owned(),
            };
            Ok((name.to_owned(), value))
        })
        .collect()
}

#[test]
fn clusterctl_works_with_exactly_the_environment_the_demo_prints() -> Result<()> {
    let cluster = Cluster::start(FAST_LIVENESS, 1)?;
    wait_for("agent Ready", LONG, || cluster.all("Ready", 1))?;
    let env = demo_environment(&cluster.url())?;
    assert!(
        env.iter().any(|(name, _)| name == "VIGIL_COORDINATOR"),
        "{env:?}"
    );
    println!("the demo's environment: {env:?}");
    for args in [&["nodes"][..], &["-o", "json", "nodes"]] {
        let mut command = std::process::Command::new(vigil_tests::bin("clusterctl")?);
        // Only what the demo exports: no flag, no VIGIL_ variable of this test's own.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("VIGIL_") {
                command.env_remove(name);
            }
        }
        let out = command
            .args(args)
            .envs(env.iter().map(|(n, v)| (n, v)))
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "clusterctl {args:?} with the demo's environment failed ({:?}): {stderr}",
            out.status.code()
        );
        assert!(stdout.contains("node-0"), "clusterctl {args:?}: {stdout}");
    }
    Ok(())
}
