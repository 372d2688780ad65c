//! The OPT logbook automated, end to end with the real binaries and the fake
//! trainer: goodput accounting (ETTR, time lost per failure, Young's
//! checkpoint interval) and the `clusterctl job report` post-mortem.

use anyhow::{Context, Result};
use serde_json::Value;
use vigil_tests::jobs::{spec, start, state, workers_running};
use vigil_tests::{LONG, clusterctl, http_get, metric, wait_for};

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

#[test]
fn goodput_of_a_job_with_one_crash_adds_up_and_the_report_shows_its_timeline() -> Result<()> {
    let cluster = start(3)?;
    // 40 ms steps, a checkpoint every 10 steps taking 200 ms, a crash at step
    // 49 of attempt 1 (so the steps after 40 that vigil heard of are
    // recomputed), done at step 80.
    let env =
        ", FAKE_CKPT_SAVE_MS = \"200\", FAKE_CRASH_AT_STEP = \"49\", FAKE_TOTAL_STEPS = \"80\"";
    let id = cluster.submit(&spec(&cluster, 2, 1, env, "")?)?;
    let job = cluster.wait_job(&id, "the job to succeed", |j| state(j) == "Succeeded")?;

    let g = &job["goodput"];
    let (wall, productive, lost) = (u(g, "wall_ms"), u(g, "productive_ms"), u(g, "lost_ms"));
    assert_eq!(productive + lost, wall, "productive + lost = wall: {g}");
    let phases: u64 = [
        "queued_ms",
        "detection_ms",
        "teardown_ms",
        "waiting_ms",
        "startup_ms",
        "recomputation_ms",
    ]
    .iter()
    .map(|k| u(g, k))
    .sum();
    assert_eq!(phases, lost, "the lost phases add up to lost: {g}");
    let ettr = g["ettr"].as_f64().context("ettr")?;
    assert!((ettr - productive as f64 / wall as f64).abs() < 1e-9, "{g}");
    assert!(ettr > 0.0 && ettr < 1.0, "{g}");

    let timeline = g["timeline"].as_array().context("timeline")?;
    let covered: u64 = timeline
        .iter()
        .map(|s| u(s, "to_unix_ms") - u(s, "from_unix_ms"))
        .sum();
    assert_eq!(covered, wall, "the timeline covers the wall time once");
    for pair in timeline.windows(2) {
        assert_eq!(u(&pair[0], "to_unix_ms"), u(&pair[1], "from_unix_ms"));
    }

    let failures = g["failures"].as_array().context("failures")?;
    assert_eq!(failures.len(), 1, "{g}");
    let f = &failures[0];
    assert_eq!(f["kind"], "crash");
    assert_eq!(f["attempt"], 1);
    // Progress arrives with heartbeats (every 200 ms, 5 steps here), so vigil
    // knows of steps 41 to 48 at most, depending on timing.
    let steps_lost = u(f, "steps_lost");
    assert!(
        steps_lost <= 8,
        "at most steps 41-48 after checkpoint 40: {f}"
    );
    assert!(u(f, "startup_ms") > 0, "attempt 2 took time to start: {f}");
    assert_eq!(
        u(f, "recomputation_ms") > 0,
        steps_lost > 0,
        "attempt 2 recomputes exactly when steps were lost: {f}"
    );
    let per_failure: u64 = [
        "detection_ms",
        "teardown_ms",
        "waiting_ms",
        "startup_ms",
        "recomputation_ms",
    ]
    .iter()
    .map(|k| u(f, k))
    .sum();
    assert!(per_failure <= lost, "{g}");

    let save = u(g, "checkpoint_save_ms");
    assert!(
        (150..5_000).contains(&save),
        "saves take ~200 ms, measured from the files: {g}"
    );
    let mtbf = u(g, "mtbf_ms");
    assert!(mtbf > 0, "{g}");
    let young = (2.0 * save as f64 * mtbf as f64).sqrt().round() as u64;
    assert_eq!(u(g, "suggested_checkpoint_interval_ms"), young, "{g}");
    assert!(u(g, "checkpoint_interval_ms") > 0, "{g}");

    let report = clusterctl(&cluster.url(), &["job", "report", &id])?;
    assert!(report.success(), "{}", report.stderr);
    let text = &report.stdout;
    println!("{text}");
    assert!(text.contains("goodput         wall "), "{text}");
    assert!(text.contains("FAILURES\n"), "{text}");
    assert!(text.contains("exited with code 1"), "{text}");
    assert_eq!(
        text.contains("recomputation (attempt 2)"),
        steps_lost > 0,
        "a recomputation phase exactly when steps were lost: {text}"
    );
    assert!(text.contains("suggested every"), "{text}");

    let show = clusterctl(&cluster.url(), &["job", "show", &id])?;
    assert!(
        show.stdout.contains("goodput         wall "),
        "{}",
        show.stdout
    );

    let metrics = http_get(cluster.coordinator.metrics, "/metrics")?;
    let series = format!("vigil_job_ettr_ratio{{job_id=\"{id}\"}}");
    let exported = metric(&metrics, &series).context("ETTR exported")?;
    assert!(exported > 0.0 && exported < 1.0, "{exported}");
    let lost_series =
        format!("vigil_job_lost_time_seconds{{job_id=\"{id}\",phase=\"recomputation\"}}");
    let recomputed = metric(&metrics, &lost_series).context("recomputation exported")?;
    assert_eq!(
        recomputed > 0.0,
        steps_lost > 0,
        "recomputation time exactly when steps were lost: {recomputed}"
    );
    Ok(())
}

fn cordon_reason(cluster: &vigil_tests::Cluster, node: &str) -> Result<Option<String>> {
    Ok(cluster.node(node)?["cordon"]["reason"]
        .as_str()
        .map(str::to_owned))
}

#[test]
fn a_node_failing_three_times_is_a_lemon_refused_service_until_cleared() -> Result<()> {
    let mut cluster = start(2)?;
    let url = cluster.url();
    for round in 1..=3 {
        // One more copy of the line each round: the simulator fires an XID per new line.
        cluster
            .agent("node-1")?
            .set_faults(&"gpu=3 xid=79\n".repeat(round))?;
        let reason = wait_for("node-1 cordoned", LONG, || {
            cordon_reason(&cluster, "node-1")
        })?;
        if round < 3 {
            assert!(reason.contains("XID 79"), "{reason}");
            let out = clusterctl(&url, &["uncordon", "node-1", "--force"])?;
            assert!(out.success(), "round {round}: {}", out.stderr);
            assert_eq!(cordon_reason(&cluster, "node-1")?, None);
        } else {
            let reason = wait_for("repeat-offender cordon", LONG, || {
                Ok(cordon_reason(&cluster, "node-1")?.filter(|r| r.starts_with("repeat-offender")))
            })?;
            assert!(
                reason.contains("host node-1 blocklisted (3 failures)"),
                "{reason}"
            );
            assert!(reason.contains("GPU 3 serial"), "{reason}");
        }
    }
    assert_eq!(cordon_reason(&cluster, "node-0")?, None, "node-0 is fine");

    let table = clusterctl(&url, &["nodes", "--lemons"])?;
    println!("{}", table.stdout);
    assert!(table.stdout.contains("Lemon"), "{}", table.stdout);
    let list = clusterctl(&url, &["-o", "json", "nodes", "--lemons"])?.json()?;
    let lemons = list["lemons"].as_array().context("lemons")?;
    let host = lemons
        .iter()
        .find(|l| l["kind"] == "host" && l["id"] == "node-1")
        .context("host node-1 listed")?;
    assert_eq!(host["failures"], 3);
    assert_eq!(host["kinds"], "unhealthy x3");
    assert!(host["blocklisted_at_unix_ms"].as_u64().is_some(), "{host}");
    assert!(
        lemons
            .iter()
            .any(|l| l["kind"] == "gpu" && l["node"] == "node-1" && l["failures"] == 3),
        "{list}"
    );

    // Persisted: a coordinator restart forgets nothing, and even --force is refused.
    cluster.restart_coordinator()?;
    let url = cluster.url();
    wait_for("agents back", LONG, || cluster.all("Ready", 2))?;
    let out = clusterctl(&url, &["uncordon", "node-1", "--force"])?;
    assert!(!out.success(), "a lemon is refused service");
    assert!(out.stderr.contains("refused service"), "{}", out.stderr);
    assert!(out.stderr.contains("--clear-lemon"), "{}", out.stderr);

    let out = clusterctl(&url, &["uncordon", "node-1", "--force", "--clear-lemon"])?;
    assert!(out.success(), "{}", out.stderr);
    assert_eq!(cordon_reason(&cluster, "node-1")?, None);
    let list = clusterctl(&url, &["-o", "json", "nodes", "--lemons"])?.json()?;
    assert!(
        list["lemons"]
            .as_array()
            .is_some_and(|l| l.iter().all(|l| l["blocklisted_at_unix_ms"].is_null())),
        "{list}"
    );
    Ok(())
}

#[test]
fn an_unexplained_hang_triages_the_gang_cordons_the_failing_node_and_resumes_on_the_spare()
-> Result<()> {
    let mut cluster = vigil_tests::Cluster::start(vigil_tests::FAST_LIVENESS, 0)?;
    let flags = cluster.dir.path().join("diag-fail");
    std::fs::create_dir_all(&flags)?;
    for i in 0..4 {
        let name = format!("node-{i}");
        // Each node's diagnostic fails while a flag file named after it exists.
        let check = format!(
            "if [ -e {dir}/{name} ]; then echo 'GPU memory test: 12 errors on GPU 2'; exit 1; fi; echo ok",
            dir = flags.display()
        );
        let extra = format!("diagnostics_command = [\"sh\", \"-c\", {check:?}]");
        cluster.add_agent_with(&name, &extra)?;
    }
    wait_for("agents Ready", LONG, || cluster.all("Ready", 4))?;
    // Attempt 1 hangs at step 30 on every rank (an NCCL timeout, say): no node is unhealthy.
    let env = ", FAKE_HANG_AT_STEP = \"30\"";
    let id = cluster.submit(&spec(&cluster, 3, 1, env, "")?)?;
    let job = cluster.wait_job(&id, "attempt 1 running", |j| workers_running(j, 3))?;
    let victim = job["job"]["assigned_nodes"][1]
        .as_str()
        .context("rank 1")?
        .to_owned();
    let spare = job["spare_nodes"][0]
        .as_str()
        .context("a spare")?
        .to_owned();
    std::fs::write(flags.join(&victim), "")?;

    let job = cluster.wait_job(&id, "attempt 2 running", |j| {
        vigil_tests::jobs::attempt(j) == 2 && workers_running(j, 3)
    })?;
    let reason = cordon_reason(&cluster, &victim)?.context("victim cordoned")?;
    assert!(reason.starts_with("triage: diagnostics failed"), "{reason}");
    let attempts = vigil_tests::jobs::attempts(&job);
    let first = &attempts[0];
    assert!(
        first["reason"].as_str().unwrap_or("").contains("hung"),
        "{first}"
    );
    let triage = first["triage"].as_object().context("triage verdicts")?;
    assert_eq!(triage.len(), 3, "every node of the gang: {first}");
    for (node, verdict) in triage {
        let verdict = verdict.as_str().unwrap_or("");
        if *node == victim {
            assert!(verdict.starts_with("FAILED"), "{node}: {verdict}");
        } else {
            assert!(verdict.starts_with("passed"), "{node}: {verdict}");
            assert_eq!(cordon_reason(&cluster, node)?, None, "{node} passed");
        }
    }
    let nodes: Vec<&str> = attempts[1]["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        nodes.contains(&spare.as_str()),
        "resumed on the spare: {nodes:?}"
    );
    assert!(!nodes.contains(&victim.as_str()), "{nodes:?}");
    let history: Vec<&str> = job["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["kind"] == "triage")
                .filter_map(|e| e["message"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let t0 = job["job"]["submitted_at_unix_ms"].as_u64().unwrap_or(0);
    for e in job["events"].as_array().into_iter().flatten() {
        let at = e["at_unix_ms"].as_u64().unwrap_or(0).saturating_sub(t0);
        println!("+{at:>6} ms {}: {}", e["kind"], e["message"]);
    }
    assert_eq!(history.len(), 2, "{history:?}");
    assert!(history[1].contains("1 node(s) failed"), "{history:?}");
    Ok(())
}

#[test]
fn an_uncordoned_node_runs_its_burn_in_first_and_a_failure_keeps_it_cordoned() -> Result<()> {
    let flags = tempfile::tempdir()?;
    let pass = flags.path().join("pass");
    let config = format!(
        "{}\n[burn_in]\non_uncordon = true\ntimeout = \"30s\"\ncommand = [\"sh\", \"-c\", {check:?}]\n",
        vigil_tests::FAST_LIVENESS,
        check = format!(
            "sleep 1; if [ -e {} ]; then echo 'memtest ok'; else echo 'GPU 0: 3 memory errors'; exit 1; fi",
            pass.display()
        )
    );
    let cluster = vigil_tests::Cluster::start(&config, 1)?;
    let url = cluster.url();
    wait_for("agent Ready", LONG, || cluster.all("Ready", 1))?;
    let out = clusterctl(&url, &["cordon", "node-0", "--reason", "fan replaced"])?;
    assert!(out.success(), "{}", out.stderr);

    let out = clusterctl(&url, &["uncordon", "node-0"])?;
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stdout.contains("validating"), "{}", out.stdout);
    assert_eq!(cluster.node("node-0")?["state"], "Validating");
    let reason = wait_for("burn-in to fail", LONG, || {
        Ok(cordon_reason(&cluster, "node-0")?.filter(|r| r.starts_with("burn-in failed")))
    })?;
    println!("{reason}");
    let node = clusterctl(&url, &["-o", "json", "node", "node-0"])?.json()?;
    assert_eq!(node["node"]["state"], "Cordoned", "{node}");
    let output = node["last_diagnostics"]["output"].as_str().unwrap_or("");
    assert!(
        output.contains("3 memory errors"),
        "the output is attached: {node}"
    );

    std::fs::write(&pass, "")?;
    let out = clusterctl(&url, &["uncordon", "node-0", "--force"])?;
    assert!(out.success(), "{}", out.stderr);
    wait_for("node-0 Ready after its burn-in", LONG, || {
        Ok((cluster.node("node-0")?["state"] == "Ready").then_some(()))
    })?;
    let history = clusterctl(&url, &["-o", "json", "node", "node-0"])?.json()?;
    let burn_ins = history["events"]
        .as_array()
        .map(|e| e.iter().filter(|e| e["kind"] == "burn-in").count())
        .unwrap_or(0);
    assert_eq!(
        burn_ins, 4,
        "validating, failed, validating, passed: {history}"
    );
    Ok(())
}

#[test]
fn a_node_stepping_slower_than_its_gang_is_flagged_a_straggler() -> Result<()> {
    let config = format!(
        "{}\n[stragglers]\nslower_than = 0.25\nfor = \"2s\"\nwindow = \"3s\"\n",
        vigil_tests::FAST_LIVENESS
    );
    let cluster = vigil_tests::Cluster::start(&config, 3)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", 3))?;
    // Rank 2 takes 120 ms per step, the others 40 ms.
    let env = ", FAKE_SLOW_RANK = \"2\", FAKE_SLOW_STEP_MS = \"120\"";
    let id = cluster.submit(&spec(&cluster, 3, 0, env, "")?)?;
    let job = cluster.wait_job(&id, "attempt 1 running", |j| workers_running(j, 3))?;
    let slow = job["job"]["assigned_nodes"][2]
        .as_str()
        .context("rank 2")?
        .to_owned();
    let node = wait_for("the slow node Degraded", LONG, || {
        let n = cluster.node(&slow)?;
        Ok((n["condition"] == "Degraded").then_some(n))
    })?;
    assert_eq!(node["state"], "Degraded", "still schedulable: {node}");
    let detail = clusterctl(&cluster.url(), &["-o", "json", "node", &slow])?.json()?;
    let reasons = detail["condition_reasons"].to_string() + &detail["events"].to_string();
    assert!(reasons.contains("straggler: "), "{detail}");
    for other in job["job"]["assigned_nodes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let other = other.as_str().unwrap_or("");
        if other != slow {
            assert_eq!(cluster.node(other)?["condition"], "Healthy", "{other}");
        }
    }
    let job = cluster.job(&id)?;
    assert_eq!(state(&job), "Running", "the run goes on");
    let flagged = job["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "straggler")
        .filter_map(|e| e["message"].as_str())
        .collect::<Vec<_>>();
    println!("{flagged:?}");
    assert!(flagged.iter().any(|m| m.starts_with(&slow)), "{flagged:?}");
    let metrics = http_get(cluster.coordinator.metrics, "/metrics")?;
    let series = format!("vigil_job_stragglers{{job_id=\"{id}\"}}");
    assert_eq!(metric(&metrics, &series), Some(1.0), "{metrics}");
    Ok(())
}

#[test]
fn a_loss_spike_is_rolled_back_to_the_checkpoint_before_it_and_an_operator_can_restart_earlier()
-> Result<()> {
    let cluster = start(2)?;
    // The loss jumps to 40 from step 115 of attempt 1. Checkpoints every 40
    // steps (1.6 s: the agent looks every second); 8 high reports (~1.6 s)
    // before the rollback, so checkpoint 120, written during the spike, is
    // usually known by then: the rollback must still pick 80.
    let env = ", FAKE_LOSS = \"1\", FAKE_LOSS_SPIKE_AT_STEP = \"115\", FAKE_TOTAL_STEPS = \"1000\"";
    let policy = "[training_health]\nspike_factor = 3.0\nspike_reports = 8\nmedian_window = 10\n";
    let text = spec(&cluster, 2, 0, env, policy)?
        .replace("FAKE_CKPT_EVERY = \"10\"", "FAKE_CKPT_EVERY = \"40\"");
    let id = cluster.submit(&text)?;
    let job = cluster.wait_job(&id, "attempt 2 running", |j| {
        vigil_tests::jobs::attempt(j) == 2 && workers_running(j, 2)
    })?;
    let attempts = vigil_tests::jobs::attempts(&job);
    let reason = attempts[0]["reason"].as_str().unwrap_or("");
    println!("{reason}");
    assert!(
        reason.contains("training unhealthy (loss_spike)"),
        "{reason}"
    );
    assert!(
        reason.contains("rolling back to checkpoint") && reason.contains("(step 80)"),
        "the newest checkpoint before step 115: {reason}"
    );
    assert_eq!(
        attempts[1]["resumed_from_step"], 80,
        "not a checkpoint written during the spike: {}",
        attempts[1]
    );
    let rollbacks = job["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "rollback")
        .count();
    assert_eq!(rollbacks, 1);

    let out = clusterctl(
        &cluster.url(),
        &[
            "job",
            "restart",
            &id,
            "--from-checkpoint",
            "40",
            "--env",
            "LR=1e-4",
        ],
    )?;
    assert!(out.success(), "{}", out.stderr);
    let job = cluster.wait_job(&id, "attempt 3 running", |j| {
        vigil_tests::jobs::attempt(j) == 3 && workers_running(j, 2)
    })?;
    let attempts = vigil_tests::jobs::attempts(&job);
    assert_eq!(attempts[2]["resumed_from_step"], 40, "{}", attempts[2]);
    let restart = job["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "restart")
        .filter_map(|e| e["message"].as_str())
        .collect::<Vec<_>>();
    assert!(
        restart.iter().any(|m| m.contains("with LR=1e-4")),
        "{restart:?}"
    );
    let bad = clusterctl(
        &cluster.url(),
        &["job", "restart", &id, "--from-checkpoint", "35"],
    )?;
    assert!(!bad.success());
    assert!(
        bad.stderr.contains("no complete checkpoint at step 35"),
        "{}",
        bad.stderr
    );
    Ok(())
}

#[test]
fn with_swap_at_checkpoint_a_straggler_is_replaced_by_the_spare() -> Result<()> {
    let config = format!(
        "{}\n[stragglers]\nfor = \"2s\"\nwindow = \"3s\"\nswap_at_checkpoint = true\n",
        vigil_tests::FAST_LIVENESS
    );
    let cluster = vigil_tests::Cluster::start(&config, 4)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", 4))?;
    let env = ", FAKE_SLOW_RANK = \"2\", FAKE_SLOW_STEP_MS = \"120\"";
    let id = cluster.submit(&spec(&cluster, 3, 1, env, "")?)?;
    let job = cluster.wait_job(&id, "attempt 1 running with a spare", |j| {
        workers_running(j, 3) && j["spare_nodes"].as_array().is_some_and(|s| s.len() == 1)
    })?;
    let slow = job["job"]["assigned_nodes"][2]
        .as_str()
        .context("rank 2")?
        .to_owned();
    let spare = job["spare_nodes"][0].as_str().context("spare")?.to_owned();
    let job = cluster.wait_job(&id, "attempt 2 running", |j| {
        vigil_tests::jobs::attempt(j) == 2 && workers_running(j, 3)
    })?;
    let attempts = vigil_tests::jobs::attempts(&job);
    assert!(
        attempts[0]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("swapping straggler(s) {slow} for spare(s)")),
        "{}",
        attempts[0]
    );
    let nodes: Vec<&str> = attempts[1]["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(!nodes.contains(&slow.as_str()), "{nodes:?}");
    assert!(nodes.contains(&spare.as_str()), "{nodes:?}");
    assert!(
        attempts[1]["resumed_from_step"].as_u64().is_some(),
        "resumed from the checkpoint it was swapped at: {}",
        attempts[1]
    );
    Ok(())
}
