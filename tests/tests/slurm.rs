//! vigil on a real Slurm (docs/slurm.md): slurmctld and three slurmd on this host
//! (`vigil_tests::slurm`), a coordinator with `[slurm]`, and a simulated agent per Slurm node
//! (same names). A two-node `sbatch` job writes checkpoints and resumes with `clusterctl
//! checkpoint latest`; XID 79 on one of its nodes drains that node in Slurm with vigil's reason
//! and requeues the job; the coordinator is killed (`kill -9`) before it lifts Slurm's requeue
//! hold, and the next one lifts it from its stored record of the job, so the job runs again
//! well before Slurm's own two minutes, on the other nodes, from its last complete checkpoint;
//! `clusterctl jobs`/`job show`/`job report` show the Slurm job with its runs, the requeue (the
//! faulty node, the reason) and its goodput; uncordoning after diagnostics resumes the node; a
//! long reason is cut and Slurm keeps vigil's prefix, so vigil still resumes its own drain; an
//! administrator's drain shows in `clusterctl nodes` and is never lifted; a node whose agent is
//! lost is drained as `vigil: agent lost`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use vigil_tests::slurm::{NODES, SlurmCluster};
use vigil_tests::{Cluster, FAST_LIVENESS, LONG, bin, clusterctl, now, wait_for};

/// The batch job: resume from the newest complete checkpoint if there is one, then write one
/// (marker layout: data, then `COMPLETE`) every 200 ms; bounded, so nothing outlives a test.
const JOB: &str = r#"#!/bin/sh
#SBATCH --nodes=2
#SBATCH --requeue
resume=$("$CLUSTERCTL" checkpoint latest --dir "$CKPT" --layout marker) || resume=""
step=$(basename "${resume:-0}" | sed 's/[^0-9]//g; s/^0*//')
step=${step:-0}
echo "run restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST resume=${resume:-none}" >> "$JOBLOG"
i=0
while [ $i -lt 900 ]; do
  i=$((i + 1)); step=$((step + 1))
  d="$CKPT/step_$(printf %06d $step)"
  mkdir -p "$d" && echo weights > "$d/model.pt" && echo ok > "$d/COMPLETE"
  sleep 0.2
done
"#;

/// Where `program` is on `PATH`.
fn real(program: &str) -> Result<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not on PATH"))
}

/// The coordinator's Slurm commands: the real ones, except that lifting a requeue hold fails
/// while the file `hold` exists (the test kills the coordinator between requeue and release).
fn slurm_bin(dir: &Path, hold: &Path) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    for program in ["sinfo", "squeue", "scontrol"] {
        let exec = format!("exec {} \"$@\"\n", real(program)?.display());
        let gate = if program == "scontrol" {
            format!(
                "case \"$*\" in *StartTime=now*) [ -e {} ] && {{ echo 'held by the test' >&2; exit 1; }};; esac\n",
                hold.display()
            )
        } else {
            String::new()
        };
        let path = bin.join(program);
        std::fs::write(&path, format!("#!/bin/sh\n{gate}{exec}"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(bin)
}

/// `clusterctl uncordon node`, then waits until Slurm no longer shows it drained.
fn uncordon_and_resume(url: &str, slurm: &SlurmCluster, node: &str, what: &str) -> Result<()> {
    let out = clusterctl(url, &["uncordon", node])?;
    assert!(out.success(), "{}", out.stderr);
    wait_for(what, LONG, || {
        let (state, _) = slurm.node_state(node)?;
        Ok((!state.starts_with("drain")).then_some(()))
    })
}

/// The step of a checkpoint path's last component (`.../step_000012` is 12).
fn step_of(path: &str) -> Option<u64> {
    Path::new(path)
        .file_name()?
        .to_str()?
        .trim_start_matches("step_")
        .parse()
        .ok()
}

/// The `run ...` lines the job has logged so far.
fn runs(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("run "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn xid_drains_requeues_resumes_and_admin_drains_are_kept() -> Result<()> {
    if !vigil_tests::slurm::available() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let slurm = SlurmCluster::start(work.path())?;
    let hold = work.path().join("hold-releases");
    std::fs::write(&hold, "")?;
    let slurm_cmds = slurm_bin(work.path(), &hold)?;
    let config = format!(
        "{FAST_LIVENESS}\n[slurm]\ninterval = \"20s\"\nslurm_conf = \"{}\"\nbin_dir = \"{}\"\n",
        slurm.conf.display(),
        slurm_cmds.display()
    );
    let mut cluster = Cluster::start(&config, 0)?;
    for node in NODES {
        cluster.add_agent(node)?;
    }
    wait_for("agents Ready", LONG, || cluster.all("Ready", NODES.len()))?;

    // A two-node job that checkpoints.
    let ckpt = work.path().join("ckpt");
    let joblog = work.path().join("job.log");
    let script = vigil_tests::write_file(work.path(), "train.sh", JOB)?;
    let clusterctl_bin = bin("clusterctl")?;
    let out = std::process::Command::new("sbatch")
        .args(["--parsable", "--output", "/dev/null"])
        .arg(&script)
        .env("SLURM_CONF", &slurm.conf)
        .env("CKPT", &ckpt)
        .env("JOBLOG", &joblog)
        .env("CLUSTERCTL", &clusterctl_bin)
        .output()?;
    assert!(
        out.status.success(),
        "sbatch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let first = wait_for("the job running on two nodes", LONG, || {
        Ok(slurm
            .job(&job)?
            .filter(|(state, nodes)| state == "RUNNING" && nodes.len() == 2)
            .map(|(_, nodes)| nodes))
    })
    .with_context(|| slurm.logs())?;
    wait_for("a few complete checkpoints", LONG, || {
        let out = clusterctl(
            "http://127.0.0.1:1",
            &[
                "checkpoint",
                "latest",
                "--dir",
                &ckpt.to_string_lossy(),
                "--layout",
                "marker",
            ],
        )?;
        Ok(out
            .stdout
            .trim()
            .rsplit('_')
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s >= 3))
    })?;
    // A save in progress, newer than any: never resumed from.
    std::fs::create_dir_all(ckpt.join("step_900000"))?;
    std::fs::write(ckpt.join("step_900000/model.pt"), "half")?;

    // XID 79 on the job's second node.
    let bad = first[1].clone();
    let fault_at = now();
    cluster.agent(&bad)?.set_faults("gpu=3 xid=79\n")?;
    let reason = wait_for(
        "the node drained in Slurm with vigil's reason",
        LONG,
        || {
            let (state, reason) = slurm.node_state(&bad)?;
            Ok((state.starts_with("drain") && reason.starts_with("vigil: ")).then_some(reason))
        },
    )?;
    let to_drain = fault_at.elapsed();
    assert!(reason.contains("79"), "{reason}");
    // The adapter wakes when a node's cordon changes; its 20 s interval is only the fallback.
    assert!(
        to_drain < Duration::from_secs(10),
        "drained {to_drain:?} after the fault: the adapter waited for its interval"
    );
    // Requeued and recorded by vigil, still held by Slurm: the coordinator dies before it
    // lifts the hold; the next one finds the job in its records and lifts it.
    let url = cluster.url();
    let shown = format!("slurm:{job}");
    let record = wait_for("the requeue in vigil's record of the job", LONG, || {
        let out = clusterctl(&url, &["-o", "json", "job", "show", &shown])?;
        if !out.success() {
            return Ok(None);
        }
        let d = out.json()?;
        Ok((d["slurm"]["awaiting_rerun"] == true).then_some(d))
    })?;
    assert_eq!(
        record["slurm"]["requeues"][0]["node"],
        bad.as_str(),
        "{record}"
    );
    wait_for("the job pending on Slurm's requeue hold", LONG, || {
        let out = slurm.run("squeue", &["--noheader", "--jobs", &job, "--format=%T|%r"])?;
        Ok((out.trim() == "PENDING|BeginTime").then_some(()))
    })?;
    cluster.coordinator.kill9();
    std::fs::remove_file(&hold)?;
    let restarted_at = now();
    cluster.restart_coordinator()?;
    let rerun = wait_for("the job running again on healthy nodes", LONG * 2, || {
        Ok(slurm.job(&job)?.filter(|(state, nodes)| {
            state == "RUNNING" && nodes.len() == 2 && !nodes.contains(&bad)
        }))
    })
    .with_context(|| slurm.logs())?;
    let to_rerun = fault_at.elapsed();
    let restart_to_rerun = restarted_at.elapsed();
    // Slurm's own hold would keep it pending about two minutes after the requeue.
    assert!(
        restart_to_rerun < Duration::from_secs(60),
        "rerun took {restart_to_rerun:?} after the restart: the requeue hold was not lifted"
    );
    let second = wait_for("the second run's log line", LONG, || {
        Ok(runs(&joblog).get(1).cloned())
    })?;
    let resumed = second
        .split("resume=")
        .nth(1)
        .unwrap_or("none")
        .trim()
        .to_owned();
    let step = step_of(&resumed).with_context(|| format!("second run did not resume: {second}"))?;
    assert!(step < 900_000, "resumed from the partial save: {second}");
    assert!(Path::new(&resumed).join("COMPLETE").is_file(), "{second}");
    // The fault and the requeue are in vigil's records: the job's, the node's history, the
    // lemon ledger.
    let d = wait_for("vigil's record of the second run", LONG, || {
        let d = clusterctl(&url, &["-o", "json", "job", "show", &shown])?.json()?;
        Ok((d["attempts"].as_array().map_or(0, Vec::len) >= 2).then_some(d))
    })?;
    assert_eq!(d["job"]["source"], "slurm", "{d}");
    assert_eq!(d["attempts"][0]["outcome"], "requeued", "{d}");
    assert_eq!(d["attempts"][0]["culprit_node"], bad.as_str(), "{d}");
    assert!(
        d["attempts"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("vigil: ")),
        "{d}"
    );
    assert_eq!(
        d["goodput"]["failures"][0]["culprit_node"],
        bad.as_str(),
        "{d}"
    );
    let lost_ms = d["goodput"]["lost_ms"].as_u64().unwrap_or(0);
    // The time lost runs from the cordon to the second run as vigil saw them: about the fault
    // to the rerun (the adapter looks every second after it acted).
    let seen_lost = Duration::from_millis(lost_ms);
    assert!(
        seen_lost > Duration::ZERO && seen_lost < to_rerun + Duration::from_secs(10),
        "lost {seen_lost:?}, rerun {to_rerun:?} after the fault: {d}"
    );
    let list = clusterctl(&url, &["-o", "json", "jobs"])?.json()?;
    let listed = list["jobs"].as_array().is_some_and(|jobs| {
        jobs.iter()
            .any(|j| j["id"] == shown.as_str() && j["source"] == "slurm")
    });
    assert!(listed, "{list}");
    let table = clusterctl(&url, &["job", "show", &shown])?;
    assert!(
        table.stdout.contains("REQUEUES BY VIGIL"),
        "{}",
        table.stdout
    );
    let report = clusterctl(&url, &["job", "report", &shown])?;
    assert!(
        report.success() && report.stdout.contains(&bad),
        "{}",
        report.stdout
    );
    wait_for("the requeue in the node's history", LONG, || {
        let node = clusterctl(&url, &["-o", "json", "node", &bad])?.json()?;
        let events = node["events"].as_array().cloned().unwrap_or_default();
        Ok(events
            .iter()
            .any(|e| {
                e["kind"] == "slurm"
                    && e["message"].as_str().is_some_and(|m| {
                        m.starts_with(&format!("requeued slurm job {job}: vigil: "))
                    })
            })
            .then_some(()))
    })?;
    let lemons = clusterctl(&url, &["-o", "json", "nodes", "--lemons"])?.json()?;
    let charged = lemons["lemons"].as_array().is_some_and(|l| {
        l.iter()
            .any(|r| r["kind"] == "host" && r["id"] == bad.as_str())
    });
    assert!(
        charged,
        "{bad}'s fault is not in the lemon ledger: {lemons}"
    );
    println!(
        "slurm: XID 79 on {bad} -> drained in {to_drain:?}, job {job} running again on {:?} {to_rerun:?} after the fault ({restart_to_rerun:?} after a coordinator restart that lifted the hold), resumed from step {step}, lost {lost_ms} ms by vigil's goodput",
        rerun.1
    );

    // Repaired, diagnosed, uncordoned: vigil resumes its own drain.
    cluster
        .agent(&bad)?
        .set_faults("gpu=3 xid=79\ngpu=3 ok\n")?;
    wait_for("diagnostics to pass once repaired", LONG, || {
        Ok(clusterctl(&url, &["-o", "json", "diagnose", &bad])?
            .success()
            .then_some(()))
    })?;
    uncordon_and_resume(&url, &slurm, &bad, "the node resumed in Slurm")?;

    // A long reason: vigil cuts it to MAX_REASON_BYTES; Slurm keeps what vigil set (with its
    // prefix), so vigil still knows the drain as its own and resumes it.
    let long = format!("swap the PSU {}", "x".repeat(300));
    let out = clusterctl(&url, &["cordon", &bad, "--reason", &long])?;
    assert!(out.success(), "{}", out.stderr);
    let kept = wait_for("the long-reason drain in Slurm", LONG, || {
        let (state, reason) = slurm.node_state(&bad)?;
        Ok(
            (state.starts_with("drain") && reason.starts_with("vigil: swap the PSU"))
                .then_some(reason),
        )
    })?;
    let shown_node = slurm.run("scontrol", &["show", "node", &bad])?;
    let scontrol_reason = shown_node
        .split("Reason=")
        .nth(1)
        .map(|r| r.lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_default();
    // What Slurm does with a reason longer than vigil's cap, set directly.
    let direct = format!("vigil: {}", "y".repeat(300));
    slurm.run(
        "scontrol",
        &[
            "update",
            &format!("NodeName={bad}"),
            "State=DRAIN",
            &format!("Reason={direct}"),
        ],
    )?;
    let (_, direct_kept) = slurm.node_state(&bad)?;
    println!(
        "slurm reasons: vigil set {} bytes, sinfo shows {} ({kept:?}), scontrol show node {} bytes; a {}-byte reason set directly: sinfo shows {} bytes",
        vigil_coordinator::slurm::MAX_REASON_BYTES,
        kept.len(),
        scontrol_reason.len(),
        direct.len(),
        direct_kept.len()
    );
    // vigil cuts its reason to its cap; Slurm keeps reasons whole (also longer ones), and shows
    // them with its `[user@time]` suffix in `scontrol show node`.
    assert_eq!(
        kept.len(),
        vigil_coordinator::slurm::MAX_REASON_BYTES,
        "{kept}"
    );
    assert!(format!("vigil: {long}").starts_with(&kept), "{kept}");
    assert!(scontrol_reason.starts_with(&kept), "{scontrol_reason}");
    assert_eq!(direct_kept, direct, "Slurm cut a long reason");
    uncordon_and_resume(&url, &slurm, &bad, "vigil resuming its long-reason drain")?;

    // An administrator's drain: shown with Slurm's reason, never lifted by vigil.
    // On the node vigil just resumed: the one the rerun does not use.
    let idle = bad.clone();
    slurm.run(
        "scontrol",
        &[
            "update",
            &format!("NodeName={idle}"),
            "State=DRAIN",
            "Reason=bad fan",
        ],
    )?;
    let shown = wait_for("clusterctl showing the Slurm drain", LONG, || {
        let node = cluster.node(&idle)?;
        Ok(node["slurm_drain"]
            .is_object()
            .then_some(node["slurm_drain"].clone()))
    })?;
    assert_eq!(shown["source"], "slurm");
    assert_eq!(shown["reason"], "bad fan");
    let table = clusterctl(&url, &["nodes"])?;
    assert!(
        table.stdout.contains("drained in slurm: bad fan"),
        "{}",
        table.stdout
    );
    let detail = clusterctl(&url, &["node", &idle])?;
    assert!(
        detail.stdout.contains("bad fan (source slurm)"),
        "{}",
        detail.stdout
    );
    cluster.restart_coordinator()?;
    wait_for("agents Ready again", LONG, || {
        cluster.all("Ready", NODES.len())
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let (state, reason) = slurm.node_state(&idle)?;
    assert!(
        state.starts_with("drain") && reason == "bad fan",
        "{state} {reason}"
    );

    // An agent gone past lost_after under the running job: its node is drained as
    // "vigil: agent lost" and the job requeued off it.
    let lost = rerun.1[0].clone();
    cluster.agent_mut(&lost).context("no agent")?.kill9();
    wait_for("the lost node drained in Slurm", LONG, || {
        let (state, reason) = slurm.node_state(&lost)?;
        Ok((state.starts_with("drain") && reason == "vigil: agent lost").then_some(()))
    })
    .with_context(|| {
        let nodes = clusterctl(&url, &["nodes"])
            .map(|o| o.stdout)
            .unwrap_or_default();
        let log = cluster.coordinator.log_text();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        format!("{nodes}\n{}", tail.join("\n"))
    })?;
    wait_for("the job requeued off the lost node", LONG, || {
        Ok(slurm
            .job(&job)?
            .is_none_or(|(state, nodes)| state != "RUNNING" || !nodes.contains(&lost))
            .then_some(()))
    })?;
    drop(cluster);
    Ok(())
}
