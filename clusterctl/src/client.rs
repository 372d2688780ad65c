//! The coordinator's ControlService, one method per call (`dial` picks the coordinator), and
//! gRPC failures turned into one-line errors.
//!
//! Unary calls wait `REQUEST_TIMEOUT` (more for diagnose and drain); streams are read through
//! `Feed`, time-limited unless followed.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Result, anyhow};
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use vigil_proto::v1;

use crate::dial::{CallOpts, Dialer};
use crate::feed::Feed;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `job logs` without `--follow` may take: the coordinator reads each worker's log
/// through its node's agent.
const LOGS_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `drain` waits: the coordinator cordons the node and sets its jobs' restarts going.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// HTTP/2 pings on an open connection, so a followed stream notices a coordinator host that
/// vanished without closing it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How much longer than the diagnostic itself clusterctl waits for its result.
const DIAGNOSE_MARGIN: Duration = Duration::from_secs(10);

/// How long clusterctl waits for a diagnostic run with the coordinator's default timeout
/// (`diagnostics.timeout`, two minutes unless configured otherwise; when it is configured
/// longer, operators pass `--timeout`).
const DIAGNOSE_DEFAULT_WAIT: Duration = Duration::from_secs(130);

/// How clusterctl proves who it is: `--ca/--cert/--key` for an https:// coordinator, or
/// `--insecure` for a plaintext one.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: bool,
}

impl Tls {
    pub fn transport(&self, url: &str) -> Result<vigil_tls::ClientTls> {
        let files = match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Some(vigil_tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None, None) => None,
            _ => {
                return Err(anyhow!(
                    "give all three of --ca, --cert and --key (or VIGIL_CA, VIGIL_CERT, VIGIL_KEY) \
                     for an https:// coordinator"
                ));
            }
        };
        vigil_tls::check_scheme(url, files.is_some(), self.insecure).map_err(|e| anyhow!("{e}"))?;
        Ok(match files {
            Some(files) => vigil_tls::ClientTls::Tls {
                config: files
                    .client_config(SystemTime::now())
                    .map_err(|e| anyhow!("{e}"))?,
                server_name: None,
            },
            None => vigil_tls::ClientTls::Insecure,
        })
    }
}

/// What a request is about, for the message of a NotFound the server sent without words.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Node(&'a str),
    Job(&'a str),
}

/// The ControlService of whichever coordinator answers (`dial`: the address list, leader
/// hints), one method per call.
pub struct Coordinator {
    dialer: Dialer,
}

/// A unary call: `$method` of the client with `$message` (cloned for each coordinator tried)
/// and `$timeout` as its `grpc-timeout`.
macro_rules! unary {
    ($self:ident, $method:ident, $message:expr, $subject:expr, $timeout:expr) => {{
        let message = $message;
        let timeout: Duration = $timeout;
        let opts = CallOpts {
            subject: $subject,
            wait: timeout,
            limit: None,
            read_only: matches!(
                stringify!($method),
                "list_nodes"
                    | "get_node"
                    | "list_jobs"
                    | "get_job"
                    | "list_lemons"
                    | "get_recovery"
            ),
        };
        $self
            .dialer
            .call(opts, move |mut client| {
                let mut req = tonic::Request::new(message.clone());
                req.set_timeout(timeout);
                async move { client.$method(req).await }
            })
            .await
    }};
}

impl Coordinator {
    /// Validates the `--coordinator` list and the TLS flags; nothing is dialed before the
    /// first call.
    pub fn new(list: &str, tls: &Tls, debug: bool) -> Result<Self> {
        Ok(Self {
            dialer: Dialer::new(list, tls, debug)?,
        })
    }

    /// The URL of the coordinator that answered last.
    pub fn url(&self) -> &str {
        self.dialer.url()
    }

    /// Answered by the first coordinator that answers, a standby included (its answer shows
    /// who leads, or that none does); when a standby names a leader, the leader's answer.
    pub async fn status(&mut self) -> Result<v1::StatusResponse> {
        let opts = CallOpts {
            subject: None,
            wait: REQUEST_TIMEOUT,
            limit: None,
            read_only: true,
        };
        self.dialer
            .call_preferring_leader(
                opts,
                |mut client| async move { client.status(request(v1::StatusRequest {})).await },
                |s: &v1::StatusResponse| {
                    s.ha.as_ref()
                        .filter(|ha| ha.role == "standby")
                        .map(|ha| ha.leader_url.clone())
                },
            )
            .await
    }

    pub async fn list_nodes(&mut self) -> Result<v1::ListNodesResponse> {
        unary!(
            self,
            list_nodes,
            v1::ListNodesRequest {},
            None,
            REQUEST_TIMEOUT
        )
    }

    pub async fn list_lemons(&mut self) -> Result<v1::ListLemonsResponse> {
        unary!(
            self,
            list_lemons,
            v1::ListLemonsRequest {},
            None,
            REQUEST_TIMEOUT
        )
    }

    pub async fn clear_lemon(&mut self, subject: &str) -> Result<v1::ListLemonsResponse> {
        let req = v1::ClearLemonRequest {
            subject: subject.into(),
        };
        unary!(self, clear_lemon, req, None, REQUEST_TIMEOUT)
    }

    pub async fn get_node(&mut self, name: &str) -> Result<v1::NodeDetail> {
        let req = v1::GetNodeRequest { name: name.into() };
        unary!(
            self,
            get_node,
            req,
            Some(Subject::Node(name)),
            REQUEST_TIMEOUT
        )
    }

    pub async fn cordon(&mut self, name: &str, reason: &str) -> Result<v1::NodeSummary> {
        let req = v1::CordonRequest {
            name: name.into(),
            reason: reason.into(),
        };
        unary!(
            self,
            cordon,
            req,
            Some(Subject::Node(name)),
            REQUEST_TIMEOUT
        )
    }

    pub async fn uncordon(&mut self, name: &str, force: bool) -> Result<v1::NodeSummary> {
        let req = v1::UncordonRequest {
            name: name.into(),
            force,
        };
        unary!(
            self,
            uncordon,
            req,
            Some(Subject::Node(name)),
            REQUEST_TIMEOUT
        )
    }

    /// Runs the node's diagnostic; `timeout` `None` lets the coordinator pick. Waits for the
    /// diagnostic plus a margin, not the usual few seconds.
    pub async fn diagnose(
        &mut self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<v1::DiagnosticsRecord> {
        let req = v1::DiagnoseRequest {
            name: name.into(),
            timeout_ms: timeout.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        };
        let wait = diagnose_wait(timeout);
        unary!(self, diagnose, req, Some(Subject::Node(name)), wait)
    }

    /// Sends a job spec; `source` (the file name) lets the coordinator name it in its errors.
    pub async fn submit_job(&mut self, spec_toml: &str, source: &str) -> Result<v1::JobDetail> {
        let req = v1::SubmitJobRequest {
            spec_toml: spec_toml.into(),
            source: source.into(),
        };
        unary!(self, submit_job, req, None, REQUEST_TIMEOUT)
    }

    pub async fn list_jobs(&mut self) -> Result<v1::ListJobsResponse> {
        unary!(
            self,
            list_jobs,
            v1::ListJobsRequest {},
            None,
            REQUEST_TIMEOUT
        )
    }

    pub async fn get_job(&mut self, id: &str) -> Result<v1::JobDetail> {
        let req = v1::GetJobRequest { id: id.into() };
        unary!(self, get_job, req, Some(Subject::Job(id)), REQUEST_TIMEOUT)
    }

    pub async fn cancel_job(&mut self, id: &str) -> Result<v1::JobDetail> {
        let req = v1::CancelJobRequest { id: id.into() };
        unary!(
            self,
            cancel_job,
            req,
            Some(Subject::Job(id)),
            REQUEST_TIMEOUT
        )
    }

    pub async fn restart_job(
        &mut self,
        id: &str,
        from_checkpoint_step: Option<u64>,
        env: Vec<(String, String)>,
    ) -> Result<v1::JobDetail> {
        let req = v1::RestartJobRequest {
            id: id.into(),
            from_checkpoint_step,
            env: env.into_iter().collect(),
        };
        unary!(
            self,
            restart_job,
            req,
            Some(Subject::Job(id)),
            REQUEST_TIMEOUT
        )
    }

    /// The recovery hold, if the coordinator's store was ever recovered.
    pub async fn get_recovery(&mut self) -> Result<v1::RecoveryResponse> {
        unary!(
            self,
            get_recovery,
            v1::GetRecoveryRequest {},
            None,
            REQUEST_TIMEOUT
        )
    }

    /// Confirms the recovery hold: jobs may be scheduled again.
    pub async fn confirm_recovery(&mut self) -> Result<v1::RecoveryResponse> {
        unary!(
            self,
            confirm_recovery,
            v1::ConfirmRecoveryRequest {},
            None,
            REQUEST_TIMEOUT
        )
    }

    /// The cordon circuit breaker.
    pub async fn get_breaker(&mut self) -> Result<v1::BreakerStatus> {
        unary!(
            self,
            get_breaker,
            v1::GetBreakerRequest {},
            None,
            REQUEST_TIMEOUT
        )
    }

    /// Closes the cordon circuit breaker.
    pub async fn reset_breaker(&mut self) -> Result<v1::BreakerStatus> {
        unary!(
            self,
            reset_breaker,
            v1::ResetBreakerRequest {},
            None,
            REQUEST_TIMEOUT
        )
    }

    /// Drops the node name's host binding.
    pub async fn forget_node(&mut self, name: &str) -> Result<v1::NodeSummary> {
        let req = v1::ForgetNodeRequest { name: name.into() };
        unary!(
            self,
            forget_node,
            req,
            Some(Subject::Node(name)),
            REQUEST_TIMEOUT
        )
    }

    /// Cordons the node and restarts its jobs elsewhere.
    pub async fn drain(&mut self, name: &str, reason: &str) -> Result<v1::DrainResponse> {
        let req = v1::DrainRequest {
            name: name.into(),
            reason: reason.into(),
        };
        unary!(self, drain, req, Some(Subject::Node(name)), DRAIN_TIMEOUT)
    }

    /// Past events, then, with `follow`, new ones for as long as the stream lasts (no timeout).
    pub async fn watch_events(
        &mut self,
        req: v1::WatchEventsRequest,
    ) -> Result<Feed<v1::ClusterEvent>> {
        let (node, job) = (req.node.clone(), req.job.clone());
        let subject = match (node.as_str(), job.as_str()) {
            ("", "") => None,
            ("", job) => Some(Subject::Job(job)),
            (node, _) => Some(Subject::Node(node)),
        };
        let limit = (!req.follow).then_some(REQUEST_TIMEOUT);
        let opts = CallOpts {
            subject,
            wait: limit.unwrap_or(REQUEST_TIMEOUT),
            limit,
            read_only: true,
        };
        let started = Instant::now();
        let stream = self
            .dialer
            .call(opts, move |mut client| {
                let req = stream_request(req.clone(), limit);
                async move { client.watch_events(req).await }
            })
            .await?;
        Ok(Feed::new(stream, self.url(), started, limit))
    }

    /// The tail of the job's worker logs, then, with `follow`, new output (no timeout).
    pub async fn job_logs(&mut self, req: v1::JobLogsRequest) -> Result<Feed<v1::LogChunk>> {
        let id = req.id.clone();
        let limit = (!req.follow).then_some(LOGS_TIMEOUT);
        let opts = CallOpts {
            subject: Some(Subject::Job(&id)),
            wait: limit.unwrap_or(REQUEST_TIMEOUT),
            limit,
            read_only: true,
        };
        let started = Instant::now();
        let stream = self
            .dialer
            .call(opts, move |mut client| {
                let req = stream_request(req.clone(), limit);
                async move { client.job_logs(req).await }
            })
            .await?;
        Ok(Feed::new(stream, self.url(), started, limit))
    }
}

/// How long clusterctl waits for a diagnostic run: its timeout plus a margin, or long enough
/// for the coordinator's default.
fn diagnose_wait(timeout: Option<Duration>) -> Duration {
    timeout.map_or(DIAGNOSE_DEFAULT_WAIT, |t| t.saturating_add(DIAGNOSE_MARGIN))
}

/// Sends `grpc-timeout`, so the coordinator gives up when clusterctl does; the channel has
/// no timeout of its own, as tonic would apply the shorter of the two.
fn request<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(REQUEST_TIMEOUT);
    req
}

/// A stream's request: with a time limit, `grpc-timeout` tells the coordinator; a followed
/// stream has none.
fn stream_request<T>(message: T, limit: Option<Duration>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(limit) = limit {
        req.set_timeout(limit);
    }
    req
}

/// Validates `url` (`https://`, or `http://` with `--insecure`) and applies the connect
/// timeout (each request carries its own) and keepalive pings.
pub fn endpoint(url: &str) -> Result<Endpoint> {
    let invalid = |why: &str| {
        anyhow!(
            "invalid --coordinator URL {url:?} ({why}); expected https://HOST:PORT, e.g. https://coordinator.example:7770"
        )
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(invalid("missing https:// or http:// scheme"));
    }
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|_| invalid("not a URL"))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT))
}

pub fn unreachable(url: &str, cause: &str) -> String {
    format!(
        "cannot reach coordinator at {url} ({cause}); is vigil-coordinator running? set --coordinator or VIGIL_COORDINATOR{}",
        plaintext_hint(url)
    )
}

fn code_is_cancelled(status: &Status) -> bool {
    status.code() == Code::Cancelled
}

/// A TLS coordinator drops a plaintext client without a word; say what that likely means.
pub fn plaintext_hint(url: &str) -> &'static str {
    if url.starts_with("http://") {
        "; if the coordinator requires TLS (it drops plaintext connections), use an https:// URL \
         with --ca, --cert and --key"
    } else {
        ""
    }
}

/// The most telling cause in an error chain: the I/O error kind ("connection refused") if
/// there is one, else the innermost message.
pub fn cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = err.to_string();
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return match io.kind() {
                K::TimedOut => timed_out(),
                kind @ (K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::AddrNotAvailable) => kind.to_string(),
                _ => io.to_string(),
            };
        }
        if e.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return timed_out();
        }
        innermost = e.to_string();
        current = e.source();
    }
    if innermost.to_lowercase().contains("timed out") {
        return timed_out();
    }
    innermost
}

fn timed_out() -> String {
    format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())
}

/// One line for a failed call. NotFound, InvalidArgument, FailedPrecondition (e.g. uncordoning
/// a node whose diagnostics have not passed), DeadlineExceeded and the like carry the server's
/// own words, which already name the fix (an invalid job spec: the field and the fix);
/// `subject` fills in when a server sends no message; `timeout` is what the call waited.
pub fn describe_status(
    status: &Status,
    url: &str,
    subject: Option<Subject<'_>>,
    timeout: Duration,
) -> String {
    let message = status.message().trim();
    match status.code() {
        Code::NotFound if message.is_empty() => match subject {
            Some(Subject::Node(n)) => {
                format!("node {n:?} not found (clusterctl nodes lists known nodes)")
            }
            Some(Subject::Job(id)) => format!("job {id:?} not found (clusterctl jobs lists jobs)"),
            None => "not found".to_string(),
        },
        // DeadlineExceeded with a message is the coordinator's own (an agent that did not
        // report diagnostics in time); tonic reports its own timeouts as Cancelled.
        Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::DeadlineExceeded
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unauthenticated
            if !message.is_empty() =>
        {
            message.to_string()
        }
        Code::DeadlineExceeded => {
            unreachable(url, &format!("no answer within {}s", timeout.as_secs()))
        }
        Code::Cancelled if message.to_lowercase().contains("timeout") => {
            unreachable(url, &format!("no answer within {}s", timeout.as_secs()))
        }
        // The coordinator's own words (a node without a connected agent): they name the fix.
        Code::Unavailable if std::error::Error::source(status).is_none() && !message.is_empty() => {
            format!("coordinator at {url}: {message}")
        }
        Code::Unavailable => {
            let why = match std::error::Error::source(status) {
                Some(source) => cause(source),
                None if !message.is_empty() => message.to_string(),
                None => "unavailable".to_string(),
            };
            unreachable(url, &why)
        }
        // A TLS coordinator closes a plaintext connection at once, which hyper reports as a
        // cancelled request or a bare transport error, depending on when it noticed.
        Code::Cancelled | Code::Unknown
            if url.starts_with("http://")
                && (code_is_cancelled(status) || message.contains("transport error")) =>
        {
            unreachable(url, "the connection was closed before any answer")
        }
        Code::Unimplemented => format!(
            "coordinator at {url} does not support this request (is it an older vigil-coordinator, or not a vigil-coordinator at all?)"
        ),
        code => {
            let message = if message.is_empty() {
                "no details"
            } else {
                message
            };
            format!("coordinator at {url} failed the request ({code:?}): {message}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnose_waits_longer_than_the_diagnostic() {
        assert_eq!(diagnose_wait(None), Duration::from_secs(130));
        assert_eq!(
            diagnose_wait(Some(Duration::from_secs(30))),
            Duration::from_secs(40)
        );
        assert_eq!(diagnose_wait(Some(Duration::MAX)), Duration::MAX);
    }

    #[test]
    fn job_errors_keep_the_servers_words_or_name_the_job() {
        let invalid = Status::invalid_argument(
            "job.toml: nodes = 0: must be at least 1 (the gang size), e.g. nodes = 2",
        );
        assert_eq!(
            describe_status(&invalid, "http://h:1", None, REQUEST_TIMEOUT),
            "job.toml: nodes = 0: must be at least 1 (the gang size), e.g. nodes = 2"
        );
        let bare = Status::not_found("");
        assert_eq!(
            describe_status(
                &bare,
                "http://h:1",
                Some(Subject::Job("j-9")),
                REQUEST_TIMEOUT
            ),
            "job \"j-9\" not found (clusterctl jobs lists jobs)"
        );
    }

    #[test]
    fn failed_preconditions_keep_the_servers_words() {
        let status = Status::failed_precondition(
            "node gpu-003 was cordoned automatically; run `clusterctl diagnose gpu-003` or use --force",
        );
        assert_eq!(
            describe_status(
                &status,
                "http://h:1",
                Some(Subject::Node("gpu-003")),
                REQUEST_TIMEOUT
            ),
            "node gpu-003 was cordoned automatically; run `clusterctl diagnose gpu-003` or use --force"
        );
        let late = Status::cancelled("Timeout expired");
        assert!(
            describe_status(&late, "http://h:1", None, Duration::from_secs(40))
                .contains("(no answer within 40s)")
        );
        let agent_late = Status::deadline_exceeded(
            "node \"n1\" did not report diagnostics within 30s; see the agent's log",
        );
        assert_eq!(
            describe_status(
                &agent_late,
                "http://h:1",
                Some(Subject::Node("n1")),
                REQUEST_TIMEOUT
            ),
            "node \"n1\" did not report diagnostics within 30s; see the agent's log"
        );
    }
}
