//! The coordinator's acceptor: every TCP connection is handshaken off the accept loop (a
//! slow or hostile client holds up nobody), plaintext is refused when TLS is on, and the
//! TLS config can be swapped at run time: new connections get the new certificates, open
//! streams keep theirs.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{Peer, PeerIdentity};

/// A client gets this long to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the gRPC server to take them.
const READY_QUEUE: usize = 256;
/// The first byte of every TLS record that opens a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The coordinator's TLS config, swappable while it serves.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            config: Arc::new(RwLock::new(config)),
        }
    }

    /// New connections use `config` from now on; open ones are untouched.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        let mut slot = self.config.write().unwrap_or_else(|e| e.into_inner());
        *slot = config;
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Why a connection was turned away before any request, for logs and a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client spoke plaintext (an `http://` URL) to a TLS listener.
    Plaintext,
    /// The handshake failed: no client certificate, one from another CA, expired, ...
    Handshake,
    /// The client did not finish its handshake within [`HANDSHAKE_TIMEOUT`].
    Timeout,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Plaintext => "plaintext",
            Refusal::Handshake => "handshake",
            Refusal::Timeout => "timeout",
        }
    }
}

/// How a connection's TLS handshake ended, for a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Refused before any request.
    Refused(Refusal),
    /// Accepted after a full handshake: certificates signed and verified on both sides.
    Full,
    /// Accepted by resuming an earlier session with its ticket (no certificate signed or
    /// verified): what agents do after a coordinator restart.
    Resumed,
}

impl Handshake {
    pub fn as_str(self) -> &'static str {
        match self {
            Handshake::Refused(r) => r.as_str(),
            Handshake::Full => "full",
            Handshake::Resumed => "resumed",
        }
    }
}

/// Called for each connection once its handshake ended (the coordinator counts them).
pub type OnHandshake = Arc<dyn Fn(Handshake) + Send + Sync>;

/// The connections `listener` accepts, ready for `Server::serve_with_incoming`: TLS with
/// verified client certificates when `tls` is set, plaintext otherwise.
/// TLS handshakes worked on at once, per core. After a coordinator restart every agent of the
/// cluster dials within seconds; handshaking all of them at once shares the cores among
/// thousands, so every one finishes late, past its agent's connect timeout, and its agent dials
/// again: a full handshake thrown away. In turn, the first ones finish at once and register,
/// and the later ones wait in the queue (a waiting connection costs no CPU; one whose agent gave
/// up fails its handshake at the first read).
const HANDSHAKES_PER_CORE: usize = 16;
/// How long a connection may hold its turn: a handshake takes milliseconds of CPU.
const TURN_TIMEOUT: Duration = Duration::from_secs(3);

fn max_handshakes() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from) * HANDSHAKES_PER_CORE
}

pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
    on_handshake: OnHandshake,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    let handshakes = Arc::new(Semaphore::new(max_handshakes()));
    tokio::spawn(async move {
        loop {
            // Stop accepting as soon as the server is gone: another listener on
            // the same socket (an HA coordinator taking over from its standby
            // server) must get the next connection, not this loop.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: keep serving the connections already open.
                    warn!(error = %e, "accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tcp.set_nodelay(true).ok();
            let Some(tls) = tls.clone() else {
                let conn = Conn {
                    io: Io::Plain(tcp),
                    peer: Peer {
                        remote: Some(remote),
                        identity: None,
                    },
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            if tx.is_closed() {
                return;
            }
            let tx = tx.clone();
            let on_handshake = on_handshake.clone();
            let handshakes = handshakes.clone();
            tokio::spawn(async move {
                // In turn, first come first served (tokio's semaphore is fair); a connection
                // that has sent nothing yet takes no turn, and one that has holds it for
                // TURN_TIMEOUT at most, so a few stalled clients cannot stop everyone's.
                let admitted = async {
                    tcp.readable().await.ok();
                    handshakes.acquire_owned().await.ok()
                };
                let turn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, admitted).await {
                    Ok(Some(permit)) => permit,
                    Ok(None) => return,
                    Err(_) => {
                        warn!(%remote, "refused connection: no TLS handshake within {}s", HANDSHAKE_TIMEOUT.as_secs());
                        on_handshake(Handshake::Refused(Refusal::Timeout));
                        return;
                    }
                };
                let done = tokio::time::timeout(TURN_TIMEOUT, handshake(tcp, remote, &tls)).await;
                drop(turn);
                match done {
                    Ok(Ok((conn, kind))) => {
                        on_handshake(kind);
                        tx.send(Ok(conn)).await.ok();
                    }
                    Ok(Err(refusal)) => on_handshake(Handshake::Refused(refusal)),
                    Err(_) => {
                        warn!(%remote, "refused connection: TLS handshake not finished within {}s of its turn", TURN_TIMEOUT.as_secs());
                        on_handshake(Handshake::Refused(Refusal::Timeout));
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: &ServerTls,
) -> Result<(Conn, Handshake), Refusal> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) | Err(_) => return Err(Refusal::Handshake),
        Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => {
            warn!(
                %remote,
                "refused plaintext connection: this coordinator requires TLS; the client must \
                 use an https:// URL with a certificate signed by the cluster CA"
            );
            return Err(Refusal::Plaintext);
        }
        Ok(_) => {}
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let stream = acceptor.accept(tcp).await.map_err(|e| {
        warn!(%remote, error = %e, "refused connection: TLS handshake failed");
        Refusal::Handshake
    })?;
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let identity = {
        let Some(leaf) = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
        else {
            warn!(%remote, "refused connection: no client certificate");
            return Err(Refusal::Handshake);
        };
        // Parsed once, for the identity and (resumed) the validity period.
        let cert = match X509Certificate::from_der(leaf) {
            Ok((_, cert)) => cert,
            Err(e) => {
                warn!(%remote, error = %e, "refused connection: unreadable client certificate");
                return Err(Refusal::Handshake);
            }
        };
        let identity = PeerIdentity::from_cert(&cert);
        // A resumed session skips certificate verification: its ticket holds the chain as
        // first verified (under this CA: tickets are bound to it), so only time can have
        // changed.
        if resumed
            && let Err(e) = crate::files::check_cert_validity(
                &cert,
                Path::new("(resumed session)"),
                SystemTime::now(),
            )
        {
            warn!(%remote, cn = %identity.common_name, error = %e, "refused connection: resumed TLS session with a client certificate no longer valid");
            return Err(Refusal::Handshake);
        }
        identity
    };
    debug!(%remote, cn = %identity.common_name, resumed, "TLS connection accepted");
    let conn = Conn {
        io: Io::Tls(Box::new(stream)),
        peer: Peer {
            remote: Some(remote),
            identity: Some(identity),
        },
    };
    Ok((
        conn,
        if resumed {
            Handshake::Resumed
        } else {
            Handshake::Full
        },
    ))
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection and who is at the other end.
pub struct Conn {
    io: Io,
    peer: Peer,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}
