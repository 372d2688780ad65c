//! Mutual TLS and roles end to end: real coordinator and agents on loopback, certificates
//! made at test time. Who gets in, who is refused (and never shows up), what a viewer may
//! do, and certificate rotation on SIGHUP without dropping an agent.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use vigil_tests::{
    Agent, Coordinator, CtlOutput, FAST_LIVENESS, LONG, clusterctl, http_get, metric, wait_for,
};
use vigil_tls::TlsFiles;
use vigil_tls::testing::{Leaf, TestCa};

/// A TLS cluster's PKI: the cluster CA, a rogue CA, the coordinator's files.
struct Pki {
    ca: TestCa,
    rogue: TestCa,
    coordinator: TlsFiles,
}

fn pki(dir: &Path) -> Result<Pki> {
    let err = |e| anyhow!("{e}");
    let ca = TestCa::new(dir, "cluster").map_err(err)?;
    let rogue = TestCa::new(dir, "rogue").map_err(err)?;
    let coordinator = ca
        .issue("coordinator", &Leaf::server("coordinator"))
        .map_err(err)?;
    Ok(Pki {
        ca,
        rogue,
        coordinator,
    })
}

fn issue(ca: &TestCa, file: &str, leaf: &Leaf<'_>) -> Result<TlsFiles> {
    ca.issue(file, leaf).map_err(|e| anyhow!("{e}"))
}

fn tls_section(files: &TlsFiles) -> String {
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        files.ca, files.cert, files.key
    )
}

fn start_coordinator(dir: &Path, pki: &Pki) -> Result<(Coordinator, String)> {
    let config = format!("{FAST_LIVENESS}\n{}", tls_section(&pki.coordinator));
    let coordinator = Coordinator::start(dir, &config, None)?;
    let url = format!("https://{}", coordinator.grpc);
    Ok((coordinator, url))
}

/// clusterctl with an operator's certificate.
fn ctl(url: &str, who: &TlsFiles, args: &[&str]) -> Result<CtlOutput> {
    let mut all = vec![
        "--ca".to_owned(),
        who.ca.display().to_string(),
        "--cert".to_owned(),
        who.cert.display().to_string(),
        "--key".to_owned(),
        who.key.display().to_string(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    clusterctl(url, &all)
}

fn node_names(url: &str, who: &TlsFiles) -> Result<Vec<String>> {
    let out = ctl(url, who, &["-o", "json", "nodes"])?;
    let json = out.json()?;
    Ok(json["nodes"]
        .as_array()
        .context("nodes is a list")?
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect())
}

fn ready(url: &str, who: &TlsFiles, name: &str) -> Result<Option<()>> {
    let out = ctl(url, who, &["-o", "json", "nodes"])?;
    let found = out.json()?["nodes"]
        .as_array()
        .context("nodes is a list")?
        .iter()
        .any(|n| n["name"] == name && n["availability"] == "Ready");
    Ok(found.then_some(()))
}

fn wait_log(agent: &Agent, needle: &str) -> Result<()> {
    wait_for(&format!("{} to log {needle:?}", agent.name), LONG, || {
        Ok(agent.log_text().contains(needle).then_some(()))
    })
    .with_context(|| format!("{}'s log:\n{}", agent.name, agent.log_text()))
}

#[test]
fn only_an_agent_with_a_node_certificate_for_its_own_name_joins() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let (coordinator, url) = start_coordinator(dir.path(), &pki)?;
    let admin = issue(&pki.ca, "alice", &Leaf::admin("alice"))?;

    let good = issue(&pki.ca, "node-0", &Leaf::node("node-0"))?;
    let _good = Agent::start_with(dir.path(), &url, "node-0", 2, &tls_section(&good))?;

    // Plaintext: no client certificate at all.
    let plain_url = format!("http://{}", coordinator.grpc);
    let plain = Agent::start(dir.path(), &plain_url, "node-1", 2)?;
    // A certificate from another CA (trusting the real coordinator, so only it can refuse).
    let mut rogue = issue(&pki.rogue, "rogue-node-2", &Leaf::node("node-2"))?;
    rogue.ca = pki.ca.ca_path();
    let rogue = Agent::start_with(dir.path(), &url, "node-2", 2, &tls_section(&rogue))?;
    // A genuine node certificate, for another node.
    let other = issue(&pki.ca, "node-9", &Leaf::node("node-9"))?;
    let impostor = Agent::start_with(dir.path(), &url, "node-3", 2, &tls_section(&other))?;
    // An operator's certificate is no node certificate, whatever its CN.
    let operator = issue(&pki.ca, "op-node-4", &Leaf::admin("node-4"))?;
    let operator = Agent::start_with(dir.path(), &url, "node-4", 2, &tls_section(&operator))?;

    wait_for("node-0 Ready", LONG, || ready(&url, &admin, "node-0"))?;
    wait_log(&impostor, "may not register as node \"node-3\"")?;
    wait_log(&operator, "may not register as node \"node-4\"")?;
    wait_for("two TLS handshakes refused", LONG, || {
        let text = http_get(coordinator.metrics, "/metrics")?;
        let refused = |reason: &str| {
            metric(
                &text,
                &format!("vigil_connections_refused_total{{reason=\"{reason}\"}}"),
            )
            .unwrap_or(0.0)
        };
        Ok((refused("plaintext") >= 1.0 && refused("handshake") >= 1.0).then_some(()))
    })?;
    // Each refused agent keeps retrying; give them a few rounds, then look again.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        node_names(&url, &admin)?,
        ["node-0"],
        "only node-0 ever joined"
    );
    let log = coordinator.log_text();
    assert!(log.contains("refused plaintext connection"), "{log}");
    assert!(log.contains("TLS handshake failed"), "{log}");
    for agent in [&plain, &rogue] {
        assert!(
            agent.log_text().contains("coordinator unreachable"),
            "{}: {}",
            agent.name,
            agent.log_text()
        );
    }
    Ok(())
}

/// After `kill -9` and a restart on the same data dir, the real agent comes back by resuming its
/// TLS session (the ticket its first session got, opened with the keys the coordinator keeps in
/// its data dir): no certificate is signed or verified for it, which is what lets thousands of
/// agents return within their lease (docs/security.md, "Session resumption").
#[test]
fn an_agent_resumes_its_tls_session_after_a_coordinator_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let (mut coordinator, url) = start_coordinator(dir.path(), &pki)?;
    let admin = issue(&pki.ca, "alice", &Leaf::admin("alice"))?;
    let node = issue(&pki.ca, "node-0", &Leaf::node("node-0"))?;
    let _agent = Agent::start_with(dir.path(), &url, "node-0", 2, &tls_section(&node))?;
    wait_for("node-0 Ready", LONG, || ready(&url, &admin, "node-0"))?;
    let keys = dir.path().join("coordinator-data").join("tls-ticket-keys");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&keys)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "the ticket keys are private");

    coordinator.kill9();
    let config = format!("{FAST_LIVENESS}\n{}", tls_section(&pki.coordinator));
    let restarted = Coordinator::start(dir.path(), &config, Some(coordinator.grpc))?;
    wait_for("node-0 back with a resumed session", LONG, || {
        let text = http_get(restarted.metrics, "/metrics")?;
        let resumed = metric(&text, "vigil_tls_handshakes_total{kind=\"resumed\"}").unwrap_or(0.0);
        Ok((resumed >= 1.0).then_some(()))
    })?;
    wait_for("node-0 Ready again", LONG, || ready(&url, &admin, "node-0"))?;
    // clusterctl keeps no ticket between runs: its calls are full handshakes.
    let text = http_get(restarted.metrics, "/metrics")?;
    assert!(metric(&text, "vigil_tls_handshakes_total{kind=\"full\"}").unwrap_or(0.0) >= 1.0);
    Ok(())
}

#[test]
fn a_viewer_reads_but_cannot_change_anything_and_an_admin_is_audited() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let (coordinator, url) = start_coordinator(dir.path(), &pki)?;
    let node = issue(&pki.ca, "node-0", &Leaf::node("node-0"))?;
    let _agent = Agent::start_with(dir.path(), &url, "node-0", 2, &tls_section(&node))?;
    let viewer = issue(&pki.ca, "bob", &Leaf::viewer("bob"))?;
    let admin = issue(&pki.ca, "alice", &Leaf::admin("alice"))?;
    wait_for("node-0 Ready", LONG, || ready(&url, &viewer, "node-0"))?;

    let status = ctl(&url, &viewer, &["status"])?;
    assert!(status.success(), "{}", status.stderr);
    assert!(
        status.stdout.contains("mutual TLS, you are bob (viewer)"),
        "{}",
        status.stdout
    );

    let denied = ctl(
        &url,
        &viewer,
        &["cordon", "node-0", "--reason", "viewer tries"],
    )?;
    assert!(!denied.success());
    assert!(
        denied
            .stderr
            .contains("bob is a viewer: cordon needs the admin role"),
        "{}",
        denied.stderr
    );
    let spec = vigil_tests::write_file(
        dir.path(),
        "job.toml",
        "name = \"x\"\nnodes = 1\ngpus_per_node = 1\ncommand = [\"true\"]\nworkdir = \"/tmp\"\n\
         [checkpoint]\ndir = \"/tmp/x\"\n",
    )?;
    let spec = spec.display().to_string();
    let denied = ctl(&url, &viewer, &["job", "submit", &spec])?;
    assert!(!denied.success());
    assert!(
        denied.stderr.contains("needs the admin role"),
        "{}",
        denied.stderr
    );
    let jobs = ctl(&url, &viewer, &["-o", "json", "jobs"])?.json()?;
    assert_eq!(
        jobs["jobs"].as_array().map(Vec::len),
        Some(0),
        "nothing submitted: {jobs}"
    );
    let node_state = ctl(&url, &viewer, &["-o", "json", "node", "node-0"])?.json()?;
    assert_eq!(
        node_state["node"]["scheduling"], "Schedulable",
        "{node_state}"
    );

    let done = ctl(&url, &admin, &["cordon", "node-0", "--reason", "bad fan"])?;
    assert!(done.success(), "{}", done.stderr);
    wait_for("the audit record of the cordon", LONG, || {
        let events = ctl(&url, &viewer, &["-o", "json", "events", "--node", "node-0"])?;
        let found = events
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| {
                e["kind"] == "audit" && e["message"] == "cordon (bad fan) by alice (admin): ok"
            });
        Ok(found.then_some(()))
    })?;
    let text = http_get(coordinator.metrics, "/metrics")?;
    assert_eq!(
        metric(&text, "vigil_control_calls_denied_total{call=\"cordon\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "vigil_control_calls_denied_total{call=\"job submit\"}"
        ),
        Some(1.0)
    );
    // A node's certificate gives no access to operator calls.
    let as_node = ctl(&url, &node, &["nodes"])?;
    assert!(!as_node.success());
    assert!(
        as_node.stderr.contains("grants no access"),
        "{}",
        as_node.stderr
    );
    Ok(())
}

#[test]
fn plaintext_clients_against_a_tls_coordinator_fail_with_a_clear_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let (coordinator, _url) = start_coordinator(dir.path(), &pki)?;
    let out = clusterctl(&format!("http://{}", coordinator.grpc), &["status"])?;
    assert!(!out.success());
    assert!(out.stderr.contains("requires TLS"), "{}", out.stderr);
    assert!(out.stderr.contains("https://"), "{}", out.stderr);
    Ok(())
}

#[test]
fn a_coordinator_with_an_expired_certificate_refuses_to_start_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let mut leaf = Leaf::server("coordinator");
    leaf.expired = true;
    let expired = issue(&pki.ca, "expired", &leaf)?;
    let config = format!("{FAST_LIVENESS}\n{}", tls_section(&expired));
    let err = match Coordinator::start(dir.path(), &config, None) {
        Ok(_) => return Err(anyhow!("a coordinator with an expired certificate started")),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("expired.crt") && err.contains("expired at"),
        "{err}"
    );
    Ok(())
}

#[test]
fn certificates_rotate_on_sighup_without_dropping_agents() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let (coordinator, url) = start_coordinator(dir.path(), &pki)?;
    let node = issue(&pki.ca, "node-0", &Leaf::node("node-0"))?;
    let agent = Agent::start_with(dir.path(), &url, "node-0", 2, &tls_section(&node))?;
    let admin = issue(&pki.ca, "alice", &Leaf::admin("alice"))?;
    wait_for("node-0 Ready", LONG, || ready(&url, &admin, "node-0"))?;
    let sessions = || {
        agent
            .log_text()
            .matches("registered with coordinator")
            .count()
    };
    assert_eq!(sessions(), 1);

    // A bad file first: the reload is refused naming it, and the old certificate stays.
    std::fs::write(&pki.coordinator.cert, "not a certificate")?;
    sighup(&coordinator)?;
    wait_for("the failed reload to be counted", LONG, || {
        let text = http_get(coordinator.metrics, "/metrics")?;
        Ok((metric(&text, "vigil_tls_reloads_total{result=\"error\"}") == Some(1.0)).then_some(()))
    })?;
    assert!(
        coordinator.log_text().contains("coordinator.crt"),
        "{}",
        coordinator.log_text()
    );
    assert!(
        ctl(&url, &admin, &["status"])?.success(),
        "still serving with the old files"
    );

    // Then a renewed certificate at the same paths.
    issue(&pki.ca, "coordinator", &Leaf::server("coordinator-renewed"))?;
    sighup(&coordinator)?;
    wait_for("the reload to be counted", LONG, || {
        let text = http_get(coordinator.metrics, "/metrics")?;
        Ok((metric(&text, "vigil_tls_reloads_total{result=\"ok\"}") == Some(1.0)).then_some(()))
    })?;
    assert!(
        ctl(&url, &admin, &["status"])?.success(),
        "new connections use the new files"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sessions(),
        1,
        "the agent's stream was never dropped: {}",
        agent.log_text()
    );
    assert!(ready(&url, &admin, "node-0")?.is_some());
    Ok(())
}

fn sighup(coordinator: &Coordinator) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &coordinator.child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -HUP failed");
    Ok(())
}

/// Runs deploy/tls/make-certs.sh with `args`, writing into `dir`.
fn make_certs(dir: &Path, args: &[&str]) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls/make-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .env("VIGIL_TLS_DIR", dir)
        .output()
        .context("cannot run deploy/tls/make-certs.sh (needs bash and openssl)")?;
    anyhow::ensure!(
        out.status.success(),
        "make-certs.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn certificates_from_the_openssl_script_make_a_working_cluster() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    make_certs(&tls, &["ca"])?;
    make_certs(&tls, &["coordinator", "localhost", "127.0.0.1"])?;
    make_certs(&tls, &["node", "node-0"])?;
    make_certs(&tls, &["admin", "alice"])?;
    let files = |name: &str| TlsFiles {
        ca: tls.join("ca.crt"),
        cert: tls.join(format!("{name}.crt")),
        key: tls.join(format!("{name}.key")),
    };
    let config = format!("{FAST_LIVENESS}\n{}", tls_section(&files("coordinator")));
    let coordinator = Coordinator::start(dir.path(), &config, None)?;
    let url = format!("https://{}", coordinator.grpc);
    let _agent = Agent::start_with(
        dir.path(),
        &url,
        "node-0",
        2,
        &tls_section(&files("node-0")),
    )?;
    wait_for("node-0 Ready", LONG, || {
        ready(&url, &files("alice"), "node-0")
    })?;
    let status = ctl(&url, &files("alice"), &["status"])?;
    assert!(
        status.stdout.contains("mutual TLS, you are alice (admin)"),
        "{}",
        status.stdout
    );
    // The script refuses to overwrite a key or mint a second CA.
    assert!(make_certs(&tls, &["ca"]).is_err());
    assert!(make_certs(&tls, &["node", "node-0"]).is_err());
    assert!(make_certs(&tls, &["node", "bad name"]).is_err());
    Ok(())
}
