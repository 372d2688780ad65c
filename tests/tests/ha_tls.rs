//! HA coordinators over an etcd whose client port requires mutual TLS (etcd's
//! `--client-cert-auth`), as a production group runs it: `https://` endpoints
//! and `[ha.etcd_tls]`. A coordinator with a client certificate from etcd's CA
//! leads and writes its state there; one with a certificate from another CA
//! never leads and says why; the state survives a failover over TLS. Skipped
//! with one line where etcd is not installed (CI sets `VIGIL_REQUIRE_ETCD=1`).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use vigil_tests::etcd::{self, EtcdCluster, ServerTls, free_port, ha_status, leader_name, tick};
use vigil_tests::{Agent, Coordinator, LONG, clusterctl, nodes, wait_for};
use vigil_tls::TlsFiles;
use vigil_tls::testing::{Leaf, TestCa};

fn client_leaf(name: &str) -> Leaf<'_> {
    Leaf {
        common_name: name,
        organization: None,
        sans: Vec::new(),
        expired: false,
    }
}

/// Starts coordinator `name` over `etcd` with `tls` as its etcd client
/// identity; returns it and its URL.
fn coordinator(
    dir: &Path,
    name: &str,
    etcd: &EtcdCluster,
    tls: &TlsFiles,
) -> Result<(Coordinator, String)> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = format!(
        "[ha]\nname = \"{name}\"\nadvertise_url = \"http://{addr}\"\netcd_endpoints = {}\n\
         [ha.etcd_tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        etcd.endpoints_toml(),
        tls.ca,
        tls.cert,
        tls.key
    );
    let own = dir.join(name);
    std::fs::create_dir_all(&own)?;
    let c = Coordinator::start(&own, &config, Some(addr))?;
    Ok((c, format!("http://{addr}")))
}

#[test]
fn coordinators_lead_over_an_etcd_that_requires_client_certificates() -> Result<()> {
    if !etcd::available() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let err = |e| anyhow!("{e}");
    let etcd_ca = TestCa::new(dir.path(), "etcd").map_err(err)?;
    let server = etcd_ca
        .issue("etcd-server", &Leaf::server("etcd"))
        .map_err(err)?;
    let good = etcd_ca
        .issue("coordinator-etcd", &client_leaf("vigil-coordinator"))
        .map_err(err)?;
    // etcd's server certificate trusted, but a client certificate another
    // CA signed: etcd refuses it.
    let rogue_ca = TestCa::new(dir.path(), "rogue").map_err(err)?;
    let foreign = rogue_ca
        .issue("foreign-etcd", &client_leaf("vigil-coordinator"))
        .map_err(err)?;
    let refused = TlsFiles {
        ca: good.ca.clone(),
        ..foreign
    };
    // A genuine client certificate, but trusting another CA than etcd's: it
    // refuses etcd.
    let distrustful = TlsFiles {
        ca: rogue_ca.ca_path(),
        ..good.clone()
    };
    let etcd = EtcdCluster::start_tls(
        dir.path(),
        3,
        ServerTls {
            ca: server.ca.clone(),
            cert: server.cert.clone(),
            key: server.key.clone(),
        },
    )?;
    assert!(etcd.endpoints().iter().all(|e| e.starts_with("https://")));

    let (mut c1, url1) = coordinator(dir.path(), "c1", &etcd, &good)?;
    wait_for("c1 leads over TLS etcd", LONG, || {
        Ok((leader_name(&ha_status(&url1)?) == "c1").then_some(()))
    })
    .with_context(|| c1.log_text())?;
    let agent = Agent::start(dir.path(), &url1, "node-0", 8)?;
    wait_for("node-0 Ready", LONG, || {
        Ok(nodes(&url1)?
            .get("node-0")
            .is_some_and(|n| n["availability"] == "Ready")
            .then_some(()))
    })
    .with_context(|| agent.log_text())?;
    let out = clusterctl(&url1, &["cordon", "node-0", "--reason", "bad fan"])?;
    assert!(out.success(), "{}", out.stderr);

    let bad = [
        (
            "refused",
            "sign [ha.etcd_tls] cert with the CA in etcd's --trusted-ca-file",
            coordinator(dir.path(), "refused", &etcd, &refused)?,
        ),
        (
            "distrustful",
            "TLS with etcd failed: [ha.etcd_tls] ca must be the CA that signed etcd's server",
            coordinator(dir.path(), "distrustful", &etcd, &distrustful)?,
        ),
    ];
    // The genuine standby.
    let (c2, url2) = coordinator(dir.path(), "c2", &etcd, &good)?;
    wait_for("c2 stands by, seeing c1 lead", LONG, || {
        Ok((leader_name(&ha_status(&url2)?) == "c1").then_some(()))
    })
    .with_context(|| c2.log_text())?;

    // The leader dies; c2 takes over and reads the cordon back from etcd.
    c1.kill9();
    // Until c2 leads, a call may find no leader to answer it (c2 still names dead c1): not yet.
    wait_for("c2 leads after c1's death", LONG, || {
        Ok(ha_status(&url2)
            .ok()
            .filter(|ha| leader_name(ha) == "c2")
            .map(|_| ()))
    })
    .with_context(|| c2.log_text())?;
    let node = wait_for("node-0 known to c2", LONG, || {
        Ok(nodes(&url2).ok().and_then(|mut n| n.remove("node-0")))
    })?;
    assert_eq!(node["scheduling"], "Cordoned", "{node}");

    // All along, neither bad coordinator took part, and each says why: in
    // its log, and in the etcd section of its status.
    for (name, hint, (c, url)) in &bad {
        let ha = ha_status(url)?;
        assert_eq!(ha["role"], "standby", "{name}: {ha}");
        assert_eq!(ha["quorum"], false, "{name}: {ha}");
        // The wording of the error varies with when the connection broke.
        let said = wait_for(&format!("{name}'s log names the fix"), LONG, || {
            Ok(c.log_text()
                .lines()
                .find(|l| l.contains("cannot campaign for leadership") && l.contains(hint))
                .map(str::to_owned))
        })
        .with_context(|| c.log_text())?;
        eprintln!("{name}: {said}");
        assert!(!c.log_text().contains("elected leader"), "{name}");
        wait_for(&format!("{name}'s status names the fix"), LONG, || {
            let ha = ha_status(url)?;
            Ok(ha["etcd_error"]
                .as_str()
                .is_some_and(|e| e.contains(hint))
                .then_some(()))
        })?;
    }
    // What the hint tells the operator to look for is there.
    assert!(
        (0..3).any(|i| etcd.log_text(i).contains("rejected connection")),
        "etcd logged no rejected connection"
    );
    tick();
    drop(agent);
    Ok(())
}
