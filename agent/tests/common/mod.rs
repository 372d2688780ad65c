//! What the in-process agent harnesses of these integration tests share: the
//! agent running in a task until told to stop, its `/metrics`, the test user.
//! Each test binary uses a subset.
#![allow(dead_code)]

pub mod workers;

use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vigil_agent::{AgentConfig, AgentError};

pub type TestResult = Result<(), Box<dyn Error>>;

/// `vigil_agent::run_with_listener` in a task, its metrics on a free loopback port.
pub struct RunningAgent {
    pub metrics_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    pub async fn start(config: AgentConfig) -> Result<Self, Box<dyn Error>> {
        let metrics = TcpListener::bind("127.0.0.1:0").await?;
        let metrics_addr = metrics.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(vigil_agent::run_with_listener(config, metrics, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            metrics_addr,
            stop: Some(stop),
            task,
        })
    }

    /// The agent's `/metrics` page.
    pub async fn metrics(&self) -> Result<String, Box<dyn Error>> {
        let mut conn = TcpStream::connect(self.metrics_addr).await?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        conn.read_to_string(&mut text).await?;
        Ok(text)
    }

    /// Whether the agent's `run` is still going (it has not returned on its own).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Asks the agent to stop; it must end cleanly within `within`.
    pub async fn stop(mut self, within: Duration) -> TestResult {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(within, self.task).await???;
        Ok(())
    }
}

/// The name of the user running the tests.
pub fn current_user() -> Result<String, Box<dyn Error>> {
    let uid = nix::unistd::Uid::effective();
    Ok(nix::unistd::User::from_uid(uid)?
        .ok_or("no passwd entry for this uid")?
        .name)
}

/// Set to `1` (`.ci/run` does) to turn a skip for want of root into a failure,
/// so CI never goes green without running the tests that need it.
pub const REQUIRE_ROOT_ENV: &str = "VIGIL_REQUIRE_ROOT";

/// Whether `test` can run: the tests run as root. When not, prints one SKIP
/// line (past the test harness's capture, so a plain `cargo test` shows it) and
/// returns false, or fails when [`REQUIRE_ROOT_ENV`] is `1`.
pub fn root_or_skip(test: &str) -> Result<bool, Box<dyn Error>> {
    if nix::unistd::Uid::effective().is_root() {
        return Ok(true);
    }
    skip_root_test(test, "it needs root")?;
    Ok(false)
}

/// Prints `SKIP: TEST: WHY` for a test that needs root and cannot run here, or
/// fails when [`REQUIRE_ROOT_ENV`] is `1`.
pub fn skip_root_test(test: &str, why: &str) -> Result<(), Box<dyn Error>> {
    let line = format!("SKIP: {test}: {why}");
    if std::env::var_os(REQUIRE_ROOT_ENV).is_some_and(|v| v == "1") {
        return Err(format!("{REQUIRE_ROOT_ENV}=1 but {line}").into());
    }
    // Straight to the stream: libtest captures println!/eprintln! of passing tests.
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
    Ok(())
}
