//! Mutual TLS for the load test, as production runs it: a cluster CA, the coordinator's
//! certificate, an operator's (admin) certificate, and one node certificate per simulated agent
//! naming its node (the coordinator refuses a node certificate that names another node). All
//! ECDSA P-256, as `deploy/tls/make-certs.sh` makes them, but with rcgen: 10,000 certificates
//! take seconds instead of the minutes openssl would.
//!
//! `vigil-loadgen --make-certs DIR --agents N` writes them (before the coordinator starts, so it
//! can be given `DIR/coordinator.{crt,key}` and `DIR/bench-ca.crt`); `--tls DIR` uses them.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow};
use vigil_tls::ClientTls;
use vigil_tls::TlsFiles;
use vigil_tls::testing::{Leaf, TestCa};

/// The CA's name: its certificate is `DIR/bench-ca.crt`.
const CA: &str = "bench";
/// The real agent that scripts/bench.sh runs beside the simulated ones.
pub const BENCH_AGENT: &str = "bench-agent";

/// Node `name`'s certificate and key, under `DIR/agents/`.
fn agent_file(name: &str) -> String {
    format!("agents/{name}")
}

/// Writes the CA, `coordinator`, `admin`, `bench-agent` and one certificate per agent
/// (`PREFIX-00001` ...) into `dir`.
pub fn make_certs(dir: &Path, prefix: &str, agents: usize) -> Result<()> {
    std::fs::create_dir_all(dir.join("agents"))
        .with_context(|| format!("cannot create {}", dir.join("agents").display()))?;
    let ca = TestCa::new(dir, CA).map_err(|e| anyhow!("cannot make the CA: {e}"))?;
    let issue = |file: &str, leaf: &Leaf<'_>| {
        ca.issue(file, leaf)
            .map(|_| ())
            .map_err(|e| anyhow!("cannot issue {file}: {e}"))
    };
    issue("coordinator", &Leaf::server("vigil-coordinator"))?;
    issue("admin", &Leaf::admin("bench-admin"))?;
    issue(BENCH_AGENT, &Leaf::node(BENCH_AGENT))?;
    for i in 0..agents {
        let name = crate::agent_name(prefix, i);
        issue(&agent_file(&name), &Leaf::node(&name))?;
    }
    Ok(())
}

fn files(dir: &Path, file: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join(format!("{CA}-ca.crt")),
        cert: dir.join(format!("{file}.crt")),
        key: dir.join(format!("{file}.key")),
    }
}

/// How a client dials: plaintext without a certificate directory, else mutual TLS as `file`.
fn client(dir: Option<&PathBuf>, file: &str) -> Result<ClientTls> {
    let Some(dir) = dir else {
        return Ok(ClientTls::Insecure);
    };
    let config = files(dir, file)
        .client_config(SystemTime::now())
        .with_context(|| format!("certificates for {file} in {}", dir.display()))?;
    Ok(ClientTls::Tls {
        config,
        server_name: None,
    })
}

/// Simulated agent `name`'s transport.
pub fn agent(dir: Option<&PathBuf>, name: &str) -> Result<ClientTls> {
    client(dir, &agent_file(name))
}

/// The operator's transport (events, jobs, status).
pub fn admin(dir: Option<&PathBuf>) -> Result<ClientTls> {
    client(dir, "admin")
}
