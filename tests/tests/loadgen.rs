//! The load generator end to end, as `scripts/bench.sh` drives it, at a size a test can afford:
//! 20 simulated agents with mutual TLS (certificates from `vigil-loadgen --make-certs`, one per
//! agent naming its node) against a real coordinator, through every phase: registration, a burst
//! of XIDs, a timed relaunch, and a coordinator `kill -9` and restart on the same port and data
//! dir. A restart that quick (well inside the 8 s lease) fences no agent, and the load generator's
//! lease accounting must say so; the benchmark's "fenced" figures rest on it.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vigil_tests::{Coordinator, LONG, wait_for};

const AGENTS: usize = 20;

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vigil-loadgen"))
}

fn config(certs: &Path) -> String {
    let file = |name: &str| certs.join(name).display().to_string();
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[cordon_breaker]\nmax_fraction = 1.0\n",
        file("bench-ca.crt"),
        file("coordinator.crt"),
        file("coordinator.key"),
    )
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

#[test]
fn the_load_generator_runs_every_phase_with_mutual_tls_and_a_quick_restart_fences_no_agent()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let made = loadgen()
        .arg("--make-certs")
        .arg(&certs)
        .args(["--agents", &AGENTS.to_string()])
        .output()?;
    if !made.status.success() {
        bail!(
            "--make-certs failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let config = config(&certs);
    let mut coordinator = Coordinator::start(dir.path(), &config, None)?;
    let url = format!("https://{}", coordinator.grpc);
    let phases = dir.path().join("phases");
    let log = std::fs::File::create(dir.path().join("loadgen.log"))?;
    let mut run = loadgen()
        .arg("--tls")
        .arg(&certs)
        .args(["--coordinator", &url, "--agents", &AGENTS.to_string()])
        .args(["--warmup", "1", "--window", "2", "--faults", "4"])
        .args(["--job", "--relaunches", "1", "--status-samples", "2"])
        .args(["--measure-restart", "--register-timeout", "90"])
        .args(["--restart-timeout", "90", "--worker-threads", "2"])
        .arg("--phase-file")
        .arg(&phases)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let phase = |name: &str| {
        std::fs::read_to_string(&phases)
            .map(|text| text.lines().any(|l| l.starts_with(&format!("{name} "))))
            .unwrap_or(false)
    };
    let waited = wait_for("the load generator to await the restart", 3 * LONG, || {
        if let Some(status) = run.try_wait()? {
            bail!("the load generator exited early ({status})");
        }
        Ok(phase("await-restart").then_some(()))
    });
    if let Err(e) = waited {
        run.kill().ok();
        let log = std::fs::read_to_string(dir.path().join("loadgen.log")).unwrap_or_default();
        return Err(e.context(format!("loadgen log:\n{log}")));
    }
    let grpc = coordinator.grpc;
    coordinator.kill9();
    let _restarted = Coordinator::start(dir.path(), &config, Some(grpc))?;
    let status = wait_for("the load generator to finish", 3 * LONG, || {
        Ok(run.try_wait()?)
    })?;
    let mut out = String::new();
    run.stdout
        .take()
        .context("no stdout")?
        .read_to_string(&mut out)?;
    if !status.success() {
        let log = std::fs::read_to_string(dir.path().join("loadgen.log")).unwrap_or_default();
        bail!("the load generator failed ({status}); log:\n{log}");
    }
    let result: Value = serde_json::from_str(out.trim()).context("loadgen JSON")?;
    let n = AGENTS as u64;
    assert_eq!(
        get(&result, &["initial_registration", "registered"]).as_u64(),
        Some(n),
        "{result}"
    );
    assert_eq!(
        get(&result, &["fault_burst", "cordoned"]).as_u64(),
        Some(4),
        "{result}"
    );
    assert_eq!(
        get(&result, &["relaunch", "fault_to_relaunch", "count"]).as_u64(),
        Some(1),
        "{result}"
    );
    let restart = &result["restart"];
    assert_eq!(restart["all_reregistered"], Value::Bool(true), "{result}");
    assert_eq!(restart["fenced"].as_u64(), Some(0), "{result}");
    // The restarted coordinator knows every node from its store, none Lost: an agent whose
    // contact it steps before the registration is renewed at once (one whose Register lands in
    // the same batch is simply registered). With 20 agents, some contacts come first.
    let renewed = restart["early_lease_renewals"]
        .as_u64()
        .context("restart.early_lease_renewals")?;
    assert!((1..=n).contains(&renewed), "{result}");
    // One silence per agent: from its last message of the old coordinator to its first of
    // the new one (the lease renewal, or Registered).
    assert_eq!(
        get(restart, &["silence", "count"]).as_u64(),
        Some(n),
        "{result}"
    );
    let max_ms = get(restart, &["silence", "max_ms"])
        .as_f64()
        .context("silence.max_ms")?;
    assert!(
        Duration::from_secs_f64(max_ms / 1000.0) < Duration::from_secs(8),
        "{result}"
    );
    Ok(())
}
