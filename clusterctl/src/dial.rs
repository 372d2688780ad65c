//! Which coordinator answers a call. `--coordinator` may list several (highly available
//! coordinators on etcd: one leads, the others stand by); every call, whatever the command,
//! goes through `Dialer::call`:
//!
//! - the coordinator that answered the previous call is asked first, then the list in order;
//! - one that cannot be reached (refused, unreachable, silent past the connect timeout) is
//!   passed over for the next;
//! - a standby refuses with FAILED_PRECONDITION and names the leader in the `vigil-leader`
//!   response metadata: the call is sent once to that URL, even when the list does not name
//!   it, but only with the list's scheme (and so the same TLS settings); with no leader named
//!   (no coordinator leads, e.g. etcd lost quorum) the next address is tried;
//! - any other answer, an error included (not found, a refusal, a timeout), is final, so a
//!   request is never sent to a second coordinator after one that may have acted on it;
//! - when no address answers, one error line names each address and why.
//!
//! `Dialer::call_preferring_leader` (for `status`, which a standby answers) also follows the
//! leader a standby's answer names, keeping the standby's answer when the leader cannot be had.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use vigil_proto::MAX_MESSAGE_BYTES;
use vigil_proto::v1::control_service_client::ControlServiceClient;

use crate::client::{Subject, Tls, cause, describe_status, endpoint, plaintext_hint, unreachable};

/// Every call says which release of clusterctl makes it (`vigil-client-version`), so a
/// coordinator outside its window refuses it before it does anything.
pub type Client = ControlServiceClient<InterceptedService<Channel, Labeller>>;
type Labeller = fn(Request<()>) -> std::result::Result<Request<()>, Status>;

fn label(mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
    request.metadata_mut().insert(
        vigil_proto::compat::CLIENT_VERSION_METADATA,
        MetadataValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    Ok(request)
}

/// How one call waits: `wait` names the limit in messages; `limit`, when set, bounds the
/// call's answer as a whole (opening a time-limited stream).
#[derive(Debug, Clone, Copy)]
pub struct CallOpts<'a> {
    pub subject: Option<Subject<'a>>,
    pub wait: Duration,
    pub limit: Option<Duration>,
    /// A read that changes nothing: when its coordinator does not answer in time (a paused
    /// or wedged process still accepts connections), the next address is asked.
    pub read_only: bool,
}

/// The coordinator addresses, the transport they share, and the coordinator that answered last.
pub struct Dialer {
    addrs: Vec<String>,
    /// `http` or `https`: the list's scheme; a leader hint must share it.
    scheme: String,
    transport: vigil_tls::ClientTls,
    debug: bool,
    current: Option<(String, Client)>,
}

/// What one try at one address gave.
enum Try<T> {
    Answered(T),
    /// Final: the coordinator's own error, or a call that timed out.
    Final(anyhow::Error),
    /// Not reached (why): the next address may answer.
    Unreachable(String),
    /// A standby refused (its message); `leader` is the URL it named, `None` when none leads.
    Standby {
        leader: Option<String>,
        message: String,
    },
}

/// One address passed over and why, for the error line when none answers.
struct Passed {
    url: String,
    why: String,
    /// A standby that knew of no leader (the fix is etcd's quorum, not the address list).
    leaderless: bool,
}

impl Dialer {
    /// Validates the comma-separated `list` (each URL, and that they share one scheme matching
    /// the TLS flags) before anything is dialed.
    pub fn new(list: &str, tls: &Tls, debug: bool) -> Result<Self> {
        let addrs = parse_list(list)?;
        let mut transport = None;
        for url in &addrs {
            endpoint(url)?;
            let t = tls.transport(url)?;
            transport.get_or_insert(t);
        }
        let (Some(transport), Some(first)) = (transport, addrs.first()) else {
            return Err(anyhow!(
                "--coordinator names no address; give one URL or several separated by commas, \
                 e.g. https://c1:7770,https://c2:7770"
            ));
        };
        let scheme = scheme(first).to_string();
        Ok(Self {
            addrs,
            scheme,
            transport,
            debug,
            current: None,
        })
    }

    /// The URL of the coordinator that answered the last call (the first address before any).
    pub fn url(&self) -> &str {
        match &self.current {
            Some((url, _)) => url,
            None => self.addrs.first().map_or("", String::as_str),
        }
    }

    /// Sends `call` to the first coordinator that will answer it (see the module comment).
    pub async fn call<T, F, Fut>(&mut self, opts: CallOpts<'_>, mut call: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let mut tried: Vec<String> = Vec::new();
        let mut passed: Vec<Passed> = Vec::new();
        let mut order: Vec<String> = self.current.iter().map(|(u, _)| u.clone()).collect();
        order.extend(self.addrs.iter().cloned());
        for url in order {
            if tried.contains(&url) {
                continue;
            }
            tried.push(url.clone());
            let (leader, message) = match self.try_at(&url, opts, &mut call).await {
                Try::Answered(answer) => return Ok(answer),
                Try::Final(err) => return Err(err),
                Try::Unreachable(why) => {
                    self.debug(&format!("{url}: {why}; trying the next address"));
                    passed.push(Passed::new(&url, why));
                    continue;
                }
                Try::Standby { leader, message } => (leader, message),
            };
            let Some(leader) = leader else {
                let why = standby_without_leader(&message);
                self.debug(&format!("{url}: {why}; trying the next address"));
                passed.push(Passed {
                    url,
                    why,
                    leaderless: true,
                });
                continue;
            };
            if let Err(why) = self.followable(&leader, &tried) {
                self.debug(&format!("{url}: {why}"));
                passed.push(Passed::new(&url, why));
                continue;
            }
            passed.push(Passed::new(&url, format!("standby, leader is {leader}")));
            self.debug(&self.following(&url, &leader));
            tried.push(leader.clone());
            match self.try_at(&leader, opts, &mut call).await {
                Try::Answered(answer) => return Ok(answer),
                Try::Final(err) => return Err(err),
                Try::Unreachable(why) => passed.push(Passed::new(&leader, why)),
                Try::Standby { message, .. } => passed.push(Passed::new(
                    &leader,
                    format!("standby too: the leader named by {url} no longer leads ({message})"),
                )),
            }
        }
        Err(none_answered(&passed))
    }

    /// Like `call`; then, when `leader_of` finds the answer came from a standby that names a
    /// leader, asks the leader once and prefers its answer; the standby's stays when the
    /// leader cannot be had.
    pub async fn call_preferring_leader<T, F, Fut>(
        &mut self,
        opts: CallOpts<'_>,
        mut call: F,
        leader_of: impl Fn(&T) -> Option<String>,
    ) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let answer = self.call(opts, &mut call).await?;
        let answered = self.url().to_string();
        let Some(leader) = leader_of(&answer).filter(|l| !l.is_empty() && *l != answered) else {
            return Ok(answer);
        };
        if let Err(why) = self.followable(&leader, std::slice::from_ref(&answered)) {
            self.debug(&format!("{answered}: {why}; showing its answer"));
            return Ok(answer);
        }
        let standby = self.current.take();
        self.debug(&self.following(&answered, &leader));
        match self.try_at(&leader, opts, &mut call).await {
            Try::Answered(better) => Ok(better),
            other => {
                let why = match other {
                    Try::Final(e) => format!("{e:#}"),
                    Try::Unreachable(why) => why,
                    Try::Standby { .. } => "it is a standby too".to_string(),
                    Try::Answered(_) => String::new(),
                };
                self.debug(&format!(
                    "{leader}: {why}; showing the answer of {answered}"
                ));
                self.current = standby;
                Ok(answer)
            }
        }
    }

    /// One try at `url`: dial it unless it answered last, then call.
    async fn try_at<T, F, Fut>(&mut self, url: &str, opts: CallOpts<'_>, call: &mut F) -> Try<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let client = match &self.current {
            Some((current, client)) if current == url => client.clone(),
            _ => match self.dial(url).await {
                Ok(client) => client,
                Err(why) => return Try::Unreachable(why),
            },
        };
        self.debug(&format!("asking {url}"));
        let answer = match opts.limit {
            Some(limit) => match tokio::time::timeout(limit, call(client.clone())).await {
                Ok(answer) => answer,
                Err(_) => {
                    let why = format!("no answer within {}s", limit.as_secs());
                    if opts.read_only {
                        self.current = None;
                        return Try::Unreachable(why);
                    }
                    return Try::Final(anyhow!(unreachable(url, &why)));
                }
            },
            None => call(client.clone()).await,
        };
        match answer {
            Ok(response) => {
                self.current = Some((url.to_string(), client));
                Try::Answered(response.into_inner())
            }
            Err(status) => {
                if let Some(leader) = standby_hint(&status) {
                    return Try::Standby {
                        leader,
                        message: status.message().trim().to_string(),
                    };
                }
                if opts.read_only
                    && matches!(
                        status.code(),
                        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                    )
                {
                    self.current = None;
                    return Try::Unreachable(format!("no answer within {}s", opts.wait.as_secs()));
                }
                if not_reached(&status) {
                    // A connection that broke (a coordinator that stopped since the last call),
                    // or one shutting down: not this call's answer; dial afresh next time.
                    self.current = None;
                    return Try::Unreachable(unavailable_cause(&status));
                }
                self.current = Some((url.to_string(), client));
                Try::Final(anyhow!(describe_status(
                    &status,
                    url,
                    opts.subject,
                    opts.wait
                )))
            }
        }
    }

    /// Connects to `url` now, so a dead coordinator is passed over within the connect timeout.
    async fn dial(&self, url: &str) -> std::result::Result<Client, String> {
        endpoint(url).map_err(|e| format!("{e:#}"))?;
        let endpoint =
            endpoint(&vigil_tls::dial_url(url, &self.transport)).map_err(|e| format!("{e:#}"))?;
        let channel = vigil_tls::connect(endpoint, &self.transport)
            .await
            .map_err(|e| cause(&e))?;
        Ok(
            ControlServiceClient::with_interceptor(channel, label as Labeller)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// Whether a standby's leader hint may be followed: a valid URL with the list's scheme
    /// (the TLS settings are the list's), not tried already in this call.
    fn followable(&self, leader: &str, tried: &[String]) -> std::result::Result<(), String> {
        if endpoint(leader).is_err() {
            return Err(format!(
                "standby, its leader hint {leader:?} is not a URL (not followed)"
            ));
        }
        if scheme(leader) != self.scheme {
            return Err(format!(
                "standby, leader is {leader} (not followed: clusterctl uses {}:// and its TLS \
                 settings for every coordinator; list the leader with --coordinator)",
                self.scheme
            ));
        }
        if tried.iter().any(|t| t == leader) {
            return Err(format!("standby, leader is {leader} (tried already)"));
        }
        Ok(())
    }

    fn following(&self, standby: &str, leader: &str) -> String {
        let listed = if self.addrs.iter().any(|a| a == leader) {
            ""
        } else {
            " (not in --coordinator)"
        };
        format!(
            "{standby} is a standby; following its leader hint {leader}{listed} with the same \
             scheme and TLS settings"
        )
    }

    fn debug(&self, line: &str) {
        if self.debug {
            eprintln!("debug: {}", crate::table::sanitize(line));
        }
    }
}

impl Passed {
    fn new(url: &str, why: String) -> Self {
        Self {
            url: url.to_string(),
            why,
            leaderless: false,
        }
    }
}

/// The comma-separated addresses, trimmed, empty entries and repeats dropped.
pub fn parse_list(list: &str) -> Result<Vec<String>> {
    let mut addrs: Vec<String> = Vec::new();
    for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        if !addrs.iter().any(|a| a == url) {
            addrs.push(url.to_string());
        }
    }
    if addrs.is_empty() {
        return Err(anyhow!(
            "--coordinator names no address; give one URL or several separated by commas, \
             e.g. https://c1:7770,https://c2:7770"
        ));
    }
    Ok(addrs)
}

fn scheme(url: &str) -> &str {
    url.split("://").next().unwrap_or_default()
}

/// `Some(leader)` when `status` is a standby's refusal (the protocol's `standby_refusal`),
/// `None` for every other error (a FAILED_PRECONDITION of the request itself).
fn standby_hint(status: &Status) -> Option<Option<String>> {
    vigil_proto::standby_refusal(status).map(|refusal| refusal.leader)
}

fn standby_without_leader(message: &str) -> String {
    if message.is_empty() {
        "standby, no leader".to_string()
    } else {
        format!("standby, no leader ({message})")
    }
}

/// Whether the call did not reach a coordinator that would act on it: a transport failure
/// (tonic's Unavailable carries its cause as the source), or a coordinator shutting down.
/// A coordinator's own Unavailable (a node without a connected agent) is its answer.
fn not_reached(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && (std::error::Error::source(status).is_some()
            || status.message().trim().is_empty()
            || status.message().contains("shutting down"))
}

/// Why an Unavailable call did not reach its coordinator.
fn unavailable_cause(status: &Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => cause(source),
        None if !status.message().trim().is_empty() => status.message().trim().to_string(),
        None => "unavailable".to_string(),
    }
}

/// One line for "no address answered": one address unreachable reads as it always has; more
/// name each address and why, then the likely fix.
fn none_answered(passed: &[Passed]) -> anyhow::Error {
    match passed {
        [only] if !only.leaderless && !only.why.starts_with("standby") => {
            return anyhow!(unreachable(&only.url, &only.why));
        }
        _ => {}
    }
    let each: Vec<String> = passed
        .iter()
        .map(|p| format!("{}: {}", p.url, p.why))
        .collect();
    let fix = if passed.iter().any(|p| p.leaderless) {
        "no coordinator leads: one is elected once etcd has quorum (clusterctl status on a \
         standby shows the coordinators and etcd health)"
            .to_string()
    } else {
        format!(
            "are the vigil-coordinators running? set --coordinator or VIGIL_COORDINATOR \
             (comma-separated URLs){}",
            passed.first().map_or("", |p| plaintext_hint(&p.url))
        )
    };
    anyhow!("no coordinator answered: {}; {fix}", each.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::LEADER_METADATA;

    #[test]
    fn the_list_is_trimmed_and_deduplicated() {
        assert_eq!(
            parse_list(" http://a:1, http://b:2,,http://a:1 ").expect("parses"),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
        assert!(parse_list(" , ").is_err());
    }

    #[test]
    fn mixed_schemes_are_refused_before_dialing() {
        let tls = Tls {
            insecure: true,
            ..Tls::default()
        };
        assert!(Dialer::new("http://a:1,http://b:2", &tls, false).is_ok());
        let err = Dialer::new("http://a:1,https://b:2", &tls, false)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("https://b:2"), "{err}");
        assert!(err.contains("--insecure"), "{err}");
    }

    #[test]
    fn standbys_are_told_apart_from_other_refusals() {
        let mut status = Status::failed_precondition("coordinator c1 is a standby");
        status
            .metadata_mut()
            .insert(LEADER_METADATA, "https://c2:7770".parse().expect("ascii"));
        assert_eq!(
            standby_hint(&status),
            Some(Some("https://c2:7770".to_string()))
        );
        let mut leaderless = Status::failed_precondition("c1 is a standby; no leader");
        leaderless
            .metadata_mut()
            .insert(LEADER_METADATA, "".parse().expect("ascii"));
        assert_eq!(standby_hint(&leaderless), Some(None));
        let bare = Status::failed_precondition("coordinator c1 is a standby: etcd has no quorum");
        assert_eq!(standby_hint(&bare), Some(None));
        let refusal = Status::failed_precondition("node gpu-auto was cordoned automatically");
        assert_eq!(standby_hint(&refusal), None);
        let other = Status::not_found("standby");
        assert_eq!(standby_hint(&other), None);
    }

    #[test]
    fn a_coordinators_own_unavailable_is_its_answer() {
        assert!(!not_reached(&Status::unavailable(
            "node \"n1\" has no connected agent; diagnostics need it (see clusterctl node n1)"
        )));
        assert!(not_reached(&Status::unavailable(
            "the coordinator is shutting down; retry in a moment"
        )));
        assert!(not_reached(&Status::unavailable("")));
    }

    #[test]
    fn the_combined_error_names_each_address_and_why() {
        let passed = [
            Passed {
                url: "https://c1:7770".into(),
                why: standby_without_leader("etcd has no quorum"),
                leaderless: true,
            },
            Passed::new("https://c2:7770", "connection refused".into()),
        ];
        let line = format!("{:#}", none_answered(&passed));
        assert!(
            line.starts_with(
                "no coordinator answered: https://c1:7770: standby, no leader (etcd has no quorum); \
                 https://c2:7770: connection refused; no coordinator leads"
            ),
            "{line}"
        );
        let one = [Passed::new("http://c1:7770", "connection refused".into())];
        assert!(
            format!("{:#}", none_answered(&one))
                .starts_with("cannot reach coordinator at http://c1:7770 (connection refused)")
        );
    }

    #[test]
    fn a_leader_hint_is_followed_only_with_the_lists_scheme() {
        let tls = Tls {
            insecure: true,
            ..Tls::default()
        };
        let dialer = Dialer::new("http://a:1,http://b:2", &tls, false).expect("valid");
        assert!(dialer.followable("http://c:3", &[]).is_ok());
        let other = dialer
            .followable("https://c:3", &[])
            .err()
            .unwrap_or_default();
        assert!(other.contains("not followed"), "{other}");
        assert!(dialer.followable("c:3", &[]).is_err());
        assert!(
            dialer
                .followable("http://a:1", &["http://a:1".to_string()])
                .is_err()
        );
        assert_eq!(
            dialer.following("http://a:1", "http://c:3"),
            "http://a:1 is a standby; following its leader hint http://c:3 (not in --coordinator) \
             with the same scheme and TLS settings"
        );
    }
}
