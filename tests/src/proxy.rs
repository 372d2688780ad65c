//! A userspace TCP fault proxy for the namespace tests (this machine has no
//! `tc netem` and no iptables): forwards every connection to one upstream,
//! adding latency, stalls or resets as its control file says.
//!
//! The control file is re-read every 50 ms; each line is `key=value`:
//! - `latency_ms=N`: every chunk is delivered N ms after it was read (each direction);
//! - `stall=1`: nothing is delivered until `stall=0` (held bytes then flow, in order);
//! - `reset=N`: whenever N changes, every open connection is closed.
//!
//! A missing or empty file means a plain pass-through.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to traffic now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shaping {
    pub latency: Duration,
    pub stalled: bool,
    pub reset: u64,
}

impl Shaping {
    /// Parse the control file's text; unknown or malformed lines are ignored.
    pub fn parse(text: &str) -> Self {
        let mut s = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let Ok(n) = value.trim().parse::<u64>() else {
                continue;
            };
            match key.trim() {
                "latency_ms" => s.latency = Duration::from_millis(n),
                "stall" => s.stalled = n != 0,
                "reset" => s.reset = n,
                _ => {}
            }
        }
        s
    }
}

/// Accept on `listener` and forward to `upstream` until the process ends.
pub async fn run(listener: TcpListener, upstream: SocketAddr, control: PathBuf) {
    let (tx, rx) = watch::channel(Shaping::default());
    tokio::spawn(watch_control(control, tx));
    loop {
        let Ok((down, _)) = listener.accept().await else {
            continue;
        };
        let rx = rx.clone();
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            connection(down, up, rx).await;
        });
    }
}

async fn watch_control(path: PathBuf, tx: watch::Sender<Shaping>) {
    loop {
        let text = tokio::fs::read_to_string(&path).await.unwrap_or_default();
        tx.send_if_modified(|s| {
            let new = Shaping::parse(&text);
            let changed = *s != new;
            *s = new;
            changed
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Both directions of one connection, until either side closes or a reset.
async fn connection(down: TcpStream, up: TcpStream, mut rx: watch::Receiver<Shaping>) {
    down.set_nodelay(true).ok();
    up.set_nodelay(true).ok();
    let reset_at_start = rx.borrow().reset;
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    let shaping = Arc::new(rx.clone());
    let to_up = pipe(dr, uw, Arc::clone(&shaping));
    let to_down = pipe(ur, dw, shaping);
    let reset = async {
        while rx.changed().await.is_ok() {
            if rx.borrow().reset != reset_at_start {
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = async { tokio::join!(to_up, to_down); } => {}
        () = reset => {}
    }
}

/// Copy `from` to `to`, each chunk held for the latency and while stalled.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shaping: Arc<watch::Receiver<Shaping>>,
) {
    let (tx, mut queue) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((read_at, chunk)) = queue.recv().await {
            loop {
                let s = *shaping.borrow();
                if !s.stalled && Instant::now() >= read_at + s.latency {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        to.shutdown().await.ok();
    };
    tokio::join!(reader, writer);
}

/// Command-line entry for the `vigil-netproxy` binary: `LISTEN UPSTREAM CONTROL_FILE`.
pub async fn main_with_args(args: &[String]) -> Result<(), String> {
    let [listen, upstream, control] = args else {
        return Err("usage: vigil-netproxy LISTEN_ADDR UPSTREAM_ADDR CONTROL_FILE".into());
    };
    let listen: SocketAddr = listen
        .parse()
        .map_err(|e| format!("listen address {listen:?}: {e}"))?;
    let upstream: SocketAddr = upstream
        .parse()
        .map_err(|e| format!("upstream address {upstream:?}: {e}"))?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!("proxy listen={listen} upstream={upstream}");
    run(listener, upstream, Path::new(control).to_owned()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_set_latency_stall_and_reset() {
        let s = Shaping::parse("latency_ms=200\nstall=1\nreset=3\nbogus\nx=y\n");
        assert_eq!(
            s,
            Shaping {
                latency: Duration::from_millis(200),
                stalled: true,
                reset: 3
            }
        );
        assert_eq!(Shaping::parse(""), Shaping::default());
    }

    #[tokio::test]
    async fn bytes_arrive_late_by_the_latency_and_not_during_a_stall() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let mut buf = [0u8; 4];
            while s.read_exact(&mut buf).await.is_ok() {
                s.write_all(&buf).await.expect("echo");
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("ctl");
        std::fs::write(&control, "latency_ms=100\n").expect("write");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(run(listener, upstream, control.clone()));
        tokio::time::sleep(Duration::from_millis(150)).await;

        let mut c = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 4];
        let t = Instant::now();
        c.write_all(b"ping").await.expect("write");
        c.read_exact(&mut buf).await.expect("read");
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(200), "{rtt:?}");

        std::fs::write(&control, "stall=1\n").expect("write");
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.write_all(b"pong").await.expect("write");
        let stalled =
            tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut buf)).await;
        assert!(stalled.is_err(), "nothing arrives during a stall");
        std::fs::write(&control, "stall=0\n").expect("write");
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .expect("delivered after the stall")
            .expect("read");
        assert_eq!(&buf, b"pong");

        std::fs::write(&control, "reset=1\n").expect("write");
        let closed = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the connection is closed, not left hanging");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
}
