//! The acceptor on a real loopback socket: who gets in, who is refused and why, and that a
//! swapped config applies to new connections only.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use vigil_tls::testing::{Leaf, TestCa};
use vigil_tls::{Handshake, Refusal, ServerTls, TlsFiles, incoming};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Fixture {
    _dir: tempfile::TempDir,
    ca: TestCa,
    other_ca: TestCa,
    server: TlsFiles,
}

fn fixture() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new(dir.path(), "cluster")?;
    let other_ca = TestCa::new(dir.path(), "rogue")?;
    let server = ca.issue("coordinator", &Leaf::server("coordinator"))?;
    Ok(Fixture {
        _dir: dir,
        ca,
        other_ca,
        server,
    })
}

async fn dial(port: u16, client: &TlsFiles) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = client.client_config(SystemTime::now())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    // TLS 1.3 reports a rejected client certificate only on the first read.
    tls.write_all(b"ping").await?;
    Ok(tls)
}

/// Serves `server`, echoing each accepted connection's identity back to it.
async fn serve(server: &ServerTls) -> Result<(u16, Arc<Mutex<Vec<Refusal>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let seen = refusals.clone();
    let mut conns = incoming(
        listener,
        Some(server.clone()),
        Arc::new(move |h| {
            if let Handshake::Refused(r) = h {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            }
        }),
    );
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = conns.next().await {
            use tonic::transport::server::Connected;
            let peer = conn.connect_info();
            let name = peer.identity.map(|i| i.common_name).unwrap_or_default();
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if conn.read_exact(&mut buf).await.is_ok() {
                    conn.write_all(name.as_bytes()).await.ok();
                    conn.shutdown().await.ok();
                }
            });
        }
    });
    Ok((port, refusals))
}

async fn answer(mut tls: tokio_rustls::client::TlsStream<TcpStream>) -> Result<String> {
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn a_client_certificate_from_the_cluster_ca_is_accepted_with_its_identity() -> Result {
    let f = fixture()?;
    let server = ServerTls::new(f.server.server_config(SystemTime::now())?);
    let (port, refusals) = serve(&server).await?;
    let node = f.ca.issue("node-0", &Leaf::node("node-0"))?;
    assert_eq!(answer(dial(port, &node).await?).await?, "node-0");
    assert!(refusals.lock().map(|r| r.is_empty()).unwrap_or(false));
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_and_plaintext_are_refused_and_counted() -> Result {
    let f = fixture()?;
    let server = ServerTls::new(f.server.server_config(SystemTime::now())?);
    let (port, refusals) = serve(&server).await?;
    let mut rogue = f.other_ca.issue("rogue-node", &Leaf::node("node-0"))?;
    // The rogue client trusts the real coordinator, so only the server can refuse it.
    rogue.ca = f.ca.ca_path();
    let refused = match dial(port, &rogue).await {
        Err(_) => true,
        Ok(tls) => answer(tls).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must not get in");

    let mut plain = TcpStream::connect(("127.0.0.1", port)).await?;
    plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let mut buf = Vec::new();
    let n = plain.read_to_end(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "plaintext gets nothing back");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = refusals.lock().map(|r| r.clone()).unwrap_or_default();
        if seen.contains(&Refusal::Handshake) && seen.contains(&Refusal::Plaintext) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusals seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_replaced_config_serves_new_connections_and_leaves_open_ones_alone() -> Result {
    let f = fixture()?;
    let server = ServerTls::new(f.server.server_config(SystemTime::now())?);
    let (port, _) = serve(&server).await?;
    let node = f.ca.issue("node-0", &Leaf::node("node-0"))?;
    let open = dial(port, &node).await?;

    // Rotate to a coordinator certificate from a new CA: clients of the old CA can no
    // longer connect, clients of the new one can, and the open connection still works.
    let dir = tempfile::tempdir()?;
    let new_ca = TestCa::new(dir.path(), "next")?;
    let new_server = new_ca.issue("coordinator", &Leaf::server("coordinator"))?;
    server.replace(new_server.server_config(SystemTime::now())?);
    let new_node = new_ca.issue("node-1", &Leaf::node("node-1"))?;
    assert_eq!(answer(dial(port, &new_node).await?).await?, "node-1");
    let old = match dial(port, &node).await {
        Err(_) => true,
        Ok(tls) => answer(tls).await.is_err(),
    };
    assert!(old, "the old CA's clients are refused after the swap");
    assert_eq!(
        answer(open).await?,
        "node-0",
        "the open connection lives on"
    );
    Ok(())
}

#[test]
fn an_expired_certificate_is_refused_naming_the_file() -> Result {
    let f = fixture()?;
    let mut leaf = Leaf::node("node-0");
    leaf.expired = true;
    let files = f.ca.issue("old", &leaf)?;
    let err = match files.client_config(SystemTime::now()) {
        Err(e) => e.to_string(),
        Ok(_) => return Err("expired certificate accepted".into()),
    };
    assert!(err.contains("old.crt") && err.contains("expired"), "{err}");
    Ok(())
}

#[test]
fn a_key_swapped_for_the_certificate_is_refused_naming_both_files() -> Result {
    let f = fixture()?;
    let mut files = f.ca.issue("node-0", &Leaf::node("node-0"))?;
    let other = f.ca.issue("node-1", &Leaf::node("node-1"))?;
    files.cert = other.cert;
    let err = match files.server_config(SystemTime::now()) {
        Err(e) => e.to_string(),
        Ok(_) => return Err("mismatched key accepted".into()),
    };
    assert!(
        err.contains("node-1.crt") && err.contains("node-0.key"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_missing_file_or_a_key_given_as_certificate_is_named() -> Result {
    let f = fixture()?;
    let mut files = f.ca.issue("node-0", &Leaf::node("node-0"))?;
    files.ca = "/nonexistent/ca.crt".into();
    let err = files
        .client_config(SystemTime::now())
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("/nonexistent/ca.crt") && e.contains("[tls]")),
        "{err:?}"
    );
    let mut files = f.ca.issue("node-0", &Leaf::node("node-0"))?;
    files.cert = files.key.clone();
    let err = files
        .client_config(SystemTime::now())
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("node-0.key") && e.contains("no PEM certificate")),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn roles_come_from_the_organization_and_node_identity_from_cn_or_san() -> Result {
    use rustls_pki_types::pem::PemObject;
    let f = fixture()?;
    let identity = |files: &TlsFiles| -> Result<vigil_tls::PeerIdentity> {
        let der = rustls_pki_types::CertificateDer::from_pem_file(&files.cert)?;
        Ok(vigil_tls::PeerIdentity::from_der(&der)?)
    };
    let node = identity(&f.ca.issue("n", &Leaf::node("gpu-017"))?)?;
    assert_eq!(node.role(), Some(vigil_tls::Role::Node));
    assert!(node.is_node("gpu-017"));
    assert!(!node.is_node("gpu-018"));
    let admin = identity(&f.ca.issue("a", &Leaf::admin("alice"))?)?;
    assert_eq!(admin.role(), Some(vigil_tls::Role::Admin));
    assert!(
        !admin.is_node("alice"),
        "an operator certificate is no node certificate"
    );
    let viewer = identity(&f.ca.issue("v", &Leaf::viewer("bob"))?)?;
    assert_eq!(viewer.role(), Some(vigil_tls::Role::Viewer));
    let server = identity(&f.server)?;
    assert_eq!(server.role(), None);
    Ok(())
}

#[tokio::test]
async fn a_tls_client_without_a_certificate_is_refused() -> Result {
    let f = fixture()?;
    let server = ServerTls::new(f.server.server_config(SystemTime::now())?);
    let (port, refusals) = serve(&server).await?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in vigil_tls::files::load_certs(&f.ca.ca_path(), "CA", SystemTime::now())? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let refused = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
    {
        Err(_) => true,
        Ok(mut tls) => {
            tls.write_all(b"ping").await.ok();
            answer(tls).await.is_err()
        }
    };
    assert!(refused, "no client certificate, no entry");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !refusals
        .lock()
        .map(|r| r.contains(&Refusal::Handshake))
        .unwrap_or(false)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusal not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn dial_resuming(
    port: u16,
    client: &TlsFiles,
    sessions: &vigil_tls::ClientSessions,
) -> Result<(String, Option<rustls::HandshakeKind>)> {
    let config = client.client_config_resuming(SystemTime::now(), sessions)?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(b"ping").await?;
    let kind = tls.get_ref().1.handshake_kind();
    // Reading to the end also takes in the tickets the server sends after the handshake.
    Ok((answer(tls).await?, kind))
}

/// A coordinator serving with session-ticket keys in `data` (its data dir).
async fn serve_resuming(
    f: &Fixture,
    data: &std::path::Path,
) -> Result<(u16, Arc<Mutex<Vec<Refusal>>>)> {
    let config = f
        .server
        .server_config_resuming(SystemTime::now(), Some(data))?;
    serve(&ServerTls::new(config)).await
}

#[tokio::test]
async fn an_agent_resumes_its_session_after_a_restart_and_keeps_its_identity() -> Result {
    use rustls::HandshakeKind::{Full, Resumed};
    let f = fixture()?;
    let data = tempfile::tempdir()?;
    let node = f.ca.issue("node-0", &Leaf::node("node-0"))?;
    let sessions = vigil_tls::ClientSessions::default();

    let (port, _) = serve_resuming(&f, data.path()).await?;
    assert_eq!(
        dial_resuming(port, &node, &sessions).await?,
        ("node-0".to_owned(), Some(Full))
    );

    // A restarted coordinator: a new config and listener, the same data dir.
    let (port, refusals) = serve_resuming(&f, data.path()).await?;
    assert_eq!(
        dial_resuming(port, &node, &sessions).await?,
        ("node-0".to_owned(), Some(Resumed)),
        "the ticket of the first session opens with the key kept in the data dir"
    );

    // A coordinator with another data dir (its keys lost) still lets the agent in, in full.
    let elsewhere = tempfile::tempdir()?;
    let (fresh_port, _) = serve_resuming(&f, elsewhere.path()).await?;
    assert_eq!(
        dial_resuming(fresh_port, &node, &sessions).await?,
        ("node-0".to_owned(), Some(Full))
    );

    // New certificate files: the old tickets (which carry the old certificate) are forgotten.
    let renewed = f.ca.issue("node-0", &Leaf::node("node-7"))?;
    assert_eq!(
        dial_resuming(port, &renewed, &sessions).await?,
        ("node-7".to_owned(), Some(Full))
    );
    assert!(refusals.lock().map(|r| r.is_empty()).unwrap_or(false));
    Ok(())
}
