//! The remediation ladder end to end (docs/failure-handling.md, "Remediation ladder"), with the
//! real binaries and stand-in commands (a test never resets a GPU nor reboots the machine): XID 48
//! twice on a simulated GPU runs the agent's stand-in GPU reset for that GPU, and the node goes
//! through burn-in and is schedulable again; a third XID 48 runs the stand-in reboot; a fourth
//! makes the node needs-repair, which `clusterctl uncordon` refuses without --force.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use vigil_tests::{Agent, Cluster, FAST_LIVENESS, LONG, clusterctl, wait_for};

const NODE: &str = "node-0";
const XID_48: &str = "gpu=1 xid=48";

/// Each stand-in records what it did, then repairs the simulated GPU as a real reset or reboot
/// would (a `gpu=N ok` line), and gives the agent's fault-file watcher time to apply it before
/// the step is answered (the burn-in's self-check reads the repaired GPU).
fn agent_section(dir: &Path, faults: &Path) -> String {
    let actions = dir.join("actions");
    let stand_in = |what: &str| {
        format!(
            "[\"sh\", \"-c\", \"echo {what} {{gpu}} >> {}; echo gpu={{gpu}} ok >> {}; sleep 0.5\"]",
            actions.display(),
            faults.display()
        )
    };
    format!(
        "[remediation]\ngpu_reset_command = {}\nreboot_command = {}\ntimeout = \"30s\"\n",
        stand_in("reset"),
        stand_in("reboot")
    )
}

fn actions(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.dir.path().join("actions")).unwrap_or_default()
}

/// Add one line to the simulated GPUs' faults, keeping what the stand-ins wrote.
fn inject(agent: &Agent, line: &str) -> Result<()> {
    let mut text = std::fs::read_to_string(&agent.fault_file).unwrap_or_default();
    text.push_str(line);
    text.push('\n');
    agent.set_faults(&text)
}

fn cordon_reason(node: &Value) -> String {
    node["cordon"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Wait until the node is Ready and uncordoned (burn-in passed).
fn schedulable(cluster: &Cluster, after: &str) -> Result<()> {
    wait_for(&format!("{NODE} schedulable after {after}"), LONG, || {
        let n = cluster.node(NODE)?;
        Ok((n["state"] == "Ready" && n["cordon"].is_null()).then_some(()))
    })
    .with_context(|| format!("node: {}", cluster.node(NODE).unwrap_or_default()))
}

fn metric(cluster: &Cluster, series: &str) -> Result<Option<f64>> {
    let text = vigil_tests::http_get(cluster.coordinator.metrics, "/metrics")?;
    Ok(vigil_tests::metric(&text, series))
}

#[test]
fn xid_48_resets_then_reboots_then_needs_repair_that_only_force_clears() -> Result<()> {
    // The breaker must not hold the one node's cordons; the lemon list must not cordon it first.
    let config = format!(
        "{FAST_LIVENESS}\n[cordon_breaker]\nmax_fraction = 1.0\n\n[lemons]\nmax_failures = 0\n\n[burn_in]\ntimeout = \"60s\"\n"
    );
    let mut cluster = Cluster::start(&config, 0)?;
    let faults = cluster.dir.path().join(format!("agent-{NODE}.faults"));
    let section = agent_section(cluster.dir.path(), &faults);
    cluster.add_agent_with(NODE, &section)?;
    wait_for("agent Ready", LONG, || cluster.all("Ready", 1))?;
    let agent = cluster.agent(NODE)?;

    inject(agent, XID_48)?;
    wait_for("first XID 48 cordons", LONG, || {
        Ok((!cluster.node(NODE)?["cordon"].is_null()).then_some(()))
    })?;
    ensure!(actions(&cluster).is_empty(), "once is not enough");

    inject(agent, XID_48)?;
    wait_for("stand-in GPU reset ran", LONG, || {
        Ok(actions(&cluster).contains("reset 1\n").then_some(()))
    })?;
    schedulable(&cluster, "the GPU reset")?;
    let detail = clusterctl(&cluster.url(), &["-o", "json", "node", NODE])?.json()?;
    let history: Vec<String> = detail["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["kind"] == "remediation" || e["kind"] == "burn-in")
                .filter_map(|e| e["message"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        history.iter().any(|m| m.starts_with(
            "GPU reset of GPU 1 on node-0 after XID 48 twice in 24h (step 1 of 3): ok"
        )),
        "{history:#?}"
    );
    ensure!(
        history.iter().any(|m| m.starts_with("burn-in passed")),
        "{history:#?}"
    );

    inject(agent, XID_48)?;
    wait_for("stand-in reboot ran", LONG, || {
        Ok(actions(&cluster).contains("reboot 1\n").then_some(()))
    })?;
    // The stand-in does not reboot: the test does what a reboot would, a new agent process
    // with fresh simulated GPUs (an empty fault file) registering anew. The step ends then.
    ensure!(
        cluster.node(NODE)?["state"] != "Validating",
        "no burn-in before the node comes back from its reboot"
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    let url = cluster.url();
    let dir = cluster.dir.path().to_owned();
    let slot = cluster
        .agents
        .iter_mut()
        .find(|a| a.name == NODE)
        .context("agent slot")?;
    slot.kill9();
    *slot = Agent::start_with(&dir, &url, NODE, 8, &section)?;
    schedulable(&cluster, "the reboot")?;
    let agent = cluster.agent(NODE)?;

    inject(agent, XID_48)?;
    let node = wait_for("needs repair", LONG, || {
        let n = cluster.node(NODE)?;
        Ok(cordon_reason(&n).starts_with("needs repair").then_some(n))
    })?;
    let reason = cordon_reason(&node);
    ensure!(
        reason.contains("steps tried: gpu_reset GPU 1 ok, reboot ok"),
        "{reason}"
    );
    ensure!(node["cordon"]["source"] == "auto", "{node}");
    ensure!(node["needs_repair"] == true, "{node}");
    let detail = clusterctl(&cluster.url(), &["-o", "json", "node", NODE])?.json()?;
    let steps: Vec<(String, String)> = detail["remediation"]["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| {
                    let text = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
                    (text("action"), text("outcome"))
                })
                .collect()
        })
        .unwrap_or_default();
    let want = [
        ("gpu_reset", "ok"),
        ("reboot", "ok"),
        ("needs_repair", "cordoned"),
    ]
    .map(|(a, o)| (a.to_owned(), o.to_owned()));
    ensure!(steps == want, "{:#}", detail["remediation"]);
    let table = clusterctl(&cluster.url(), &["node", NODE])?.stdout;
    ensure!(table.contains("remediation     needs repair: "), "{table}");
    ensure!(
        actions(&cluster) == "reset 1\nreboot 1\n",
        "no step after the ladder's end: {}",
        actions(&cluster)
    );

    let refused = clusterctl(&cluster.url(), &["uncordon", NODE])?;
    ensure!(!refused.success(), "uncordon without --force must fail");
    ensure!(
        refused.stderr.contains("needs repair") && refused.stderr.contains("--force"),
        "{}",
        refused.stderr
    );
    for (action, outcome) in [
        ("gpu_reset", "ok"),
        ("reboot", "ok"),
        ("needs_repair", "cordoned"),
    ] {
        let series =
            format!("vigil_remediations_total{{action=\"{action}\",outcome=\"{outcome}\"}}");
        ensure!(
            metric(&cluster, &series)? == Some(1.0),
            "{series}: {:?}",
            metric(&cluster, &series)?
        );
    }

    let forced = clusterctl(&cluster.url(), &["uncordon", NODE, "--force"])?;
    ensure!(forced.success(), "{}", forced.stderr);
    schedulable(&cluster, "a forced uncordon")?;
    Ok(())
}
