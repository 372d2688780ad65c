//! Version skew during a rolling upgrade (docs/operations.md, "Upgrades"): the previous minor
//! release's agent and clusterctl against this coordinator, with this release's agents in the
//! same gang; and this release's agent and clusterctl against the previous coordinator. Each
//! registers, heartbeats (nodes stay Ready), is cordoned and uncordoned by hand, and runs a
//! job that an XID 79 relaunches on the spare. And the coordinator itself upgraded in place
//! (the previous release's data dir read by this release) and rolled back (this release's data
//! dir read by the previous one), with a job running through both restarts.
//!
//! The previous release's binaries come from `scripts/previous-release.sh` (it builds the
//! release `.ci/previous-release` names), found through `VIGIL_PREVIOUS_RELEASE`. Without it
//! these tests print a skip line and pass; `.ci/run` builds the release and sets
//! `VIGIL_REQUIRE_PREVIOUS_RELEASE=1`, which turns the skip into a failure.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vigil_tests::jobs::{attempt, attempts, spec, workers_running};
use vigil_tests::process::using;
use vigil_tests::{Cluster, FAST_LIVENESS, LONG, clusterctl, wait_for};

const RELEASE_ENV: &str = "VIGIL_PREVIOUS_RELEASE";
const REQUIRE_ENV: &str = "VIGIL_REQUIRE_PREVIOUS_RELEASE";
const SKIP_LINE: &str = "SKIP: VIGIL_PREVIOUS_RELEASE is not set; build the previous release \
     with scripts/previous-release.sh and set it to the directory that prints";

/// The previous release's binaries and the version they report; `None` after the skip line.
fn previous_release() -> Result<Option<(PathBuf, String)>> {
    let Some(dir) = std::env::var_os(RELEASE_ENV).map(PathBuf::from) else {
        if std::env::var_os(REQUIRE_ENV).is_some_and(|v| v == "1") {
            bail!("{REQUIRE_ENV}=1 but {SKIP_LINE}");
        }
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{SKIP_LINE}");
        return Ok(None);
    };
    let out = std::process::Command::new(dir.join("vigil-agent"))
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}/vigil-agent", dir.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("vigil-agent --version printed {text:?}"))?
        .to_owned();
    let this = env!("CARGO_PKG_VERSION");
    if version == this {
        bail!(
            "{} holds release {version}, this release's own: build the previous one with \
             scripts/previous-release.sh",
            dir.display()
        );
    }
    println!("previous release: {version} from {}", dir.display());
    Ok(Some((dir, version)))
}

/// The node's agent version, as `clusterctl -o json nodes` shows it.
fn agent_version(cluster: &Cluster, node: &str) -> Result<String> {
    Ok(cluster.node(node)?["agent_version"]
        .as_str()
        .unwrap_or("")
        .to_owned())
}

/// Cordon and uncordon `node` by hand; the cordon shows, then is gone.
fn cordon_by_hand(cluster: &Cluster, node: &str) -> Result<()> {
    let url = cluster.url();
    let out = clusterctl(&url, &["cordon", node, "--reason", "rolling upgrade test"])?;
    if !out.success() {
        bail!("cordon {node} failed: {}", out.stderr);
    }
    let reason = cluster.node(node)?["cordon"]["reason"].clone();
    assert_eq!(reason, "rolling upgrade test", "{node}");
    let out = clusterctl(&url, &["uncordon", node])?;
    if !out.success() {
        bail!("uncordon {node} failed: {}", out.stderr);
    }
    wait_for("node Ready again", LONG, || {
        let n = cluster.node(node)?;
        Ok((n["cordon"].is_null() && n["availability"] == "Ready").then_some(()))
    })
}

/// A 2-node job with 1 spare runs; XID 79 on rank 1's node cordons it, and attempt 2 runs on
/// the survivor and the spare.
fn run_and_relaunch(cluster: &Cluster) -> Result<()> {
    let id = cluster.submit(&spec(cluster, 2, 1, "", "")?)?;
    let job = cluster.wait_job(&id, "attempt 1 running with a checkpoint", |j| {
        workers_running(j, 2) && j["job"]["last_checkpoint_step"].as_u64().is_some()
    })?;
    let rank = |job: &Value, r: usize| -> Result<String> {
        job["job"]["assigned_nodes"][r]
            .as_str()
            .map(str::to_owned)
            .context("no assigned node")
    };
    let victim = rank(&job, 1)?;
    let survivor = rank(&job, 0)?;
    cluster.agent(&victim)?.set_faults("gpu=3 xid=79\n")?;
    wait_for("victim cordoned", LONG, || {
        Ok(cluster.node(&victim)?["cordon"]["reason"]
            .as_str()
            .filter(|r| r.contains("XID 79"))
            .map(str::to_owned))
    })?;
    let job = cluster.wait_job(&id, "attempt 2 running on the spare", |j| {
        attempt(j) == 2 && workers_running(j, 2)
    })?;
    let nodes: Vec<String> = attempts(&job)[1]["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(nodes.contains(&survivor), "{nodes:?}");
    assert!(!nodes.contains(&victim), "{nodes:?}");
    assert_eq!(attempts(&job)[0]["culprit_node"], victim.as_str());
    Ok(())
}

/// The old agents, the new one beside them and the old clusterctl all stay Ready for a while
/// (heartbeats flowing, no re-registration).
fn steady(cluster: &Cluster, nodes: usize) -> Result<()> {
    wait_for("agents Ready", LONG, || cluster.all("Ready", nodes))?;
    let detail = |i: usize| -> Result<Value> {
        clusterctl(
            &cluster.url(),
            &["-o", "json", "node", &format!("node-{i}")],
        )?
        .json()
    };
    let before: Vec<Value> = (0..nodes).map(detail).collect::<Result<_>>()?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    for (i, was) in before.iter().enumerate() {
        let now = detail(i)?;
        assert_eq!(now["node"]["availability"], "Ready", "node-{i}: {now}");
        assert!(
            now["node"]["last_heartbeat_age_ms"]
                .as_u64()
                .is_some_and(|ms| ms < 2_000),
            "node-{i} heartbeats: {now}"
        );
        assert_eq!(
            now["last_registered_unix_ms"], was["last_registered_unix_ms"],
            "node-{i} registered again"
        );
    }
    Ok(())
}

#[test]
fn previous_agents_and_clusterctl_work_with_this_coordinator() -> Result<()> {
    let Some((previous, old_version)) = previous_release()? else {
        return Ok(());
    };
    let mut cluster = Cluster::start(FAST_LIVENESS, 0)?;
    {
        let _old = using(&previous, &["vigil-agent"]);
        cluster.add_agent("node-0")?;
        cluster.add_agent("node-2")?;
    }
    cluster.add_agent("node-1")?;
    // Every clusterctl call from here on is the previous release's.
    let _old_ctl = using(&previous, &["clusterctl"]);
    let ctl = std::process::Command::new(vigil_tests::bin("clusterctl")?)
        .arg("--version")
        .output()?;
    assert!(
        String::from_utf8_lossy(&ctl.stdout).contains(&old_version),
        "{ctl:?}"
    );
    steady(&cluster, 3)?;
    assert_eq!(agent_version(&cluster, "node-0")?, old_version);
    assert_eq!(agent_version(&cluster, "node-2")?, old_version);
    assert_eq!(
        agent_version(&cluster, "node-1")?,
        env!("CARGO_PKG_VERSION")
    );
    cordon_by_hand(&cluster, "node-0")?;
    run_and_relaunch(&cluster)?;
    Ok(())
}

#[test]
fn this_agent_and_clusterctl_work_with_the_previous_coordinator() -> Result<()> {
    let Some((previous, old_version)) = previous_release()? else {
        return Ok(());
    };
    let cluster = {
        let _old = using(&previous, &["vigil-coordinator"]);
        Cluster::start(FAST_LIVENESS, 3)?
    };
    steady(&cluster, 3)?;
    let status = clusterctl(&cluster.url(), &["-o", "json", "status"])?.json()?;
    assert_eq!(status["coordinator"]["version"], old_version.as_str());
    assert_eq!(
        agent_version(&cluster, "node-1")?,
        env!("CARGO_PKG_VERSION")
    );
    cordon_by_hand(&cluster, "node-1")?;
    run_and_relaunch(&cluster)?;
    Ok(())
}

/// The production lease (8 s): a coordinator restart must not fence the job's workers.
const PRODUCTION_LEASE: &str = r#"
[liveness]
heartbeat_interval = "200ms"
unreachable_after = "2s"
lost_after = "20s"
agent_lease = "8s"
"#;

/// After a coordinator restart: it runs `version`, the job is still in attempt 1 with both
/// workers running (none was stopped), and node-2 is still cordoned by hand.
fn kept_across(cluster: &Cluster, id: &str, version: &str) -> Result<()> {
    let status = clusterctl(&cluster.url(), &["-o", "json", "status"])?.json()?;
    assert_eq!(status["coordinator"]["version"], version);
    wait_for("agents back", LONG, || {
        let nodes = vigil_tests::nodes(&cluster.url())?;
        Ok((nodes.len() == 3 && nodes.values().all(|n| n["state"] != "Unreachable")).then_some(()))
    })?;
    let job = cluster.wait_job(id, "the job's workers reported again", |j| {
        workers_running(j, 2)
    })?;
    assert_eq!(attempt(&job), 1, "the job did not restart: {job}");
    assert_eq!(job["job"]["restarts"], 0, "{job}");
    assert_eq!(
        cluster.node("node-2")?["cordon"]["reason"],
        "kept across versions"
    );
    Ok(())
}

#[test]
fn the_coordinator_upgrades_in_place_and_rolls_back_without_restarting_the_job() -> Result<()> {
    let Some((previous, old_version)) = previous_release()? else {
        return Ok(());
    };
    let mut cluster = {
        let _old = using(&previous, &["vigil-coordinator"]);
        Cluster::start(PRODUCTION_LEASE, 3)?
    };
    wait_for("agents Ready", LONG, || cluster.all("Ready", 3))?;
    let out = clusterctl(
        &cluster.url(),
        &["cordon", "node-2", "--reason", "kept across versions"],
    )?;
    assert!(out.success(), "{}", out.stderr);
    let id = cluster.submit(&spec(&cluster, 2, 0, "", "")?)?;
    cluster.wait_job(&id, "attempt 1 running with a checkpoint", |j| {
        workers_running(j, 2) && j["job"]["last_checkpoint_step"].as_u64().is_some()
    })?;
    // Upgrade: this release on the previous one's data dir and port.
    cluster.restart_coordinator()?;
    kept_across(&cluster, &id, env!("CARGO_PKG_VERSION"))?;
    // Roll back: the previous release on the data dir this one wrote.
    {
        let _old = using(&previous, &["vigil-coordinator"]);
        cluster.restart_coordinator()?;
    }
    kept_across(&cluster, &id, &old_version)?;
    Ok(())
}
