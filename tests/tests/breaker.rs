//! The cordon circuit breaker end to end (docs/failure-handling.md, "Cordon circuit breaker"),
//! with the real binaries: XID 79 on 5 of 8 nodes at once cordons at most the cap and opens the
//! breaker; the rest are shown held by clusterctl and on /metrics; it stays open across a
//! coordinator restart; an operator cordon is never held; `breaker reset` closes it without
//! replaying the stale XIDs, and a fresh XID after the reset cordons.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use vigil_tests::{Cluster, FAST_LIVENESS, LONG, clusterctl, nodes, wait_for};

const NODES: usize = 8;
/// floor(0.25 × 8) = 2 nodes.
const CAP: usize = 2;
const XID_79: &str = "gpu=3 xid=79\n";

fn names(of: impl IntoIterator<Item = usize>) -> Vec<String> {
    of.into_iter().map(|i| format!("node-{i}")).collect()
}

/// `clusterctl -o json breaker status`.
fn breaker(cluster: &Cluster) -> Result<Value> {
    let out = clusterctl(&cluster.url(), &["-o", "json", "breaker", "status"])?;
    ensure!(out.success(), "breaker status: {}", out.stderr);
    out.json()
}

/// The nodes of `among` cordoned, and those whose cordon is held, once each is one or the other.
fn decided(cluster: &Cluster, among: &[String]) -> Result<Option<(Vec<String>, Vec<String>)>> {
    let all = nodes(&cluster.url())?;
    let (mut cordoned, mut held) = (Vec::new(), Vec::new());
    for name in among {
        let Some(n) = all.get(name) else {
            return Ok(None);
        };
        if !n["cordon"].is_null() {
            cordoned.push(name.clone());
        } else if !n["held_cordon"].is_null() {
            held.push(name.clone());
        } else {
            return Ok(None);
        }
    }
    Ok(Some((cordoned, held)))
}

fn metric(cluster: &Cluster, series: &str) -> Result<Option<f64>> {
    let text = vigil_tests::http_get(cluster.coordinator.metrics, "/metrics")?;
    Ok(vigil_tests::metric(&text, series))
}

fn start() -> Result<Cluster> {
    let config = format!("{FAST_LIVENESS}\n[cordon_breaker]\nmax_fraction = 0.25\n");
    let cluster = Cluster::start(&config, NODES)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", NODES))?;
    Ok(cluster)
}

/// XID 79 on node-0..node-4 at once: (cordoned, held).
fn burst(cluster: &Cluster) -> Result<(Vec<String>, Vec<String>)> {
    let victims = names(0..5);
    for v in &victims {
        cluster.agent(v)?.set_faults(XID_79)?;
    }
    wait_for("each victim cordoned or held", LONG, || {
        decided(cluster, &victims)
    })
}

#[test]
fn xid_79_on_5_of_8_nodes_at_once_cordons_at_most_the_cap_and_opens_the_breaker() -> Result<()> {
    let mut cluster = start()?;
    let (cordoned, held) = burst(&cluster)?;
    assert_eq!(cordoned.len(), CAP, "cordoned {cordoned:?}, held {held:?}");
    assert_eq!(held.len(), 5 - CAP, "cordoned {cordoned:?}, held {held:?}");
    for name in &held {
        let n = cluster.node(name)?;
        assert_eq!(n["cordon"], Value::Null, "{n}");
        assert_eq!(n["condition"], "Unhealthy", "{n}");
        assert_eq!(n["held_cordon"]["rule"], "xid", "{n}");
        let evidence = n["held_cordon"]["evidence"].as_str().unwrap_or_default();
        assert!(
            evidence.contains("XID 79 (GPU has fallen off the bus)"),
            "{n}"
        );
    }
    let table = clusterctl(&cluster.url(), &["nodes"])?.stdout;
    for name in &held {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_default();
        assert!(
            line.contains("cordon held: breaker open: XID 79"),
            "{table}"
        );
    }
    let detail = clusterctl(&cluster.url(), &["-o", "json", "node", &held[0]])?.json()?;
    let held_event = detail["events"].as_array().and_then(|events| {
        events
            .iter()
            .find(|e| e["kind"] == "cordon-held")
            .and_then(|e| e["message"].as_str().map(str::to_owned))
    });
    assert!(
        held_event.as_deref().is_some_and(|m| m.starts_with(
            "cordon held: breaker open (2 automatic cordons in the last 10m, cap 2): XID 79"
        )),
        "{held_event:?}"
    );

    let status = breaker(&cluster)?;
    assert_eq!(status["state"], "open", "{status}");
    assert_eq!(status["cap"], 2, "{status}");
    assert_eq!(status["nodes_known"], 8, "{status}");
    assert_eq!(
        listed_of(&status, "cordons"),
        cordoned.iter().cloned().collect()
    );
    assert_eq!(listed_of(&status, "held"), held.iter().cloned().collect());
    assert_eq!(metric(&cluster, "vigil_cordon_breaker_open")?, Some(1.0));
    assert_eq!(
        metric(&cluster, "vigil_cordon_breaker_held_total")?,
        Some((5 - CAP) as f64)
    );

    // A restart does not close it, nor forget whom it holds.
    cluster.restart_coordinator()?;
    if let Err(e) = wait_for("agents back", LONG, || cluster.all("Ready", NODES)) {
        anyhow::bail!(
            "{e:#}\ncoordinator log:\n{}",
            cluster.coordinator.log_text()
        );
    }
    let status = breaker(&cluster)?;
    assert_eq!(status["state"], "open", "after a restart: {status}");
    assert_eq!(listed_of(&status, "held"), held.iter().cloned().collect());
    assert_eq!(metric(&cluster, "vigil_cordon_breaker_open")?, Some(1.0));
    Ok(())
}

fn listed_of(status: &Value, key: &str) -> BTreeSet<String> {
    status[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["node"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_open_breaker_never_holds_an_operator_cordon_and_a_reset_replays_nothing_stale() -> Result<()>
{
    let cluster = start()?;
    let (cordoned, held) = burst(&cluster)?;
    assert_eq!(cordoned.len(), CAP, "cordoned {cordoned:?}, held {held:?}");
    assert_eq!(breaker(&cluster)?["state"], "open");

    let out = clusterctl(
        &cluster.url(),
        &["cordon", "node-6", "--reason", "operator check"],
    )?;
    assert!(out.success(), "{}", out.stderr);
    let n = cluster.node("node-6")?;
    assert_eq!(n["cordon"]["source"], "operator", "{n}");
    assert_eq!(n["held_cordon"], Value::Null, "{n}");
    assert!(!listed_of(&breaker(&cluster)?, "held").contains("node-6"));

    let out = clusterctl(&cluster.url(), &["-o", "json", "breaker", "reset"])?;
    assert!(out.success(), "{}", out.stderr);
    let reset = out.json()?;
    assert_eq!(reset["state"], "closed", "{reset}");
    assert_eq!(reset["held"], serde_json::json!([]), "{reset}");
    assert!(reset["last_reset_by"].is_string(), "{reset}");
    wait_for("vigil_cordon_breaker_open 0", LONG, || {
        Ok((metric(&cluster, "vigil_cordon_breaker_open")? == Some(0.0)).then_some(()))
    })?;

    // The held nodes' XIDs came before the reset: they are not replayed. Their heartbeats go on
    // (healthy samples), and they stay uncordoned.
    wait_for("held nodes judged Healthy again", LONG, || {
        let all = nodes(&cluster.url())?;
        let healthy = held
            .iter()
            .all(|h| all.get(h).is_some_and(|n| n["condition"] == "Healthy"));
        Ok(healthy.then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let all = nodes(&cluster.url())?;
    for h in &held {
        assert_eq!(all[h]["cordon"], Value::Null, "{h}: {}", all[h]);
        assert_eq!(all[h]["held_cordon"], Value::Null, "{h}: {}", all[h]);
    }
    assert_eq!(breaker(&cluster)?["state"], "closed");

    // A fresh XID on a node held before the reset cordons it (one more line is one more XID).
    let fresh = &held[0];
    cluster.agent(fresh)?.set_faults(&XID_79.repeat(2))?;
    let n = wait_for(&format!("{fresh} cordoned by a fresh XID"), LONG, || {
        let n = cluster.node(fresh)?;
        Ok((!n["cordon"].is_null()).then_some(n))
    })?;
    assert_eq!(n["cordon"]["source"], "auto", "{n}");
    let status = breaker(&cluster)?;
    assert_eq!(
        status["state"], "closed",
        "one cordon in a fresh window: {status}"
    );
    assert_eq!(
        listed_of(&status, "cordons"),
        BTreeSet::from([fresh.clone()])
    );
    Ok(())
}
