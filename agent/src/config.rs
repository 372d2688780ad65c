//! Agent configuration: the TOML file, its defaults, and the checks that run before anything starts.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tonic::codegen::http::Uri;

/// Where a coordinator listens when nothing else is said (its own `--listen` default).
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7770";
/// A highly available group has two or three coordinators; seven leaves room without
/// making a round of the list (and the time it takes to find a leader) unbounded.
pub const MAX_COORDINATORS: usize = 7;
/// Eight GPUs: the shape of one HGX/DGX host.
pub const DEFAULT_SIM_GPUS: u32 = 8;
pub const MAX_SIM_GPUS: u32 = 64;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vigil-agent";
/// One port above the coordinator's 9770, so both fit on a demo host.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9771";
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Short enough that an agent is back within seconds of a coordinator restart.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// SIGTERM-to-SIGKILL time for a worker when the coordinator sets none.
pub const DEFAULT_WORKER_STOP_GRACE: Duration = Duration::from_secs(10);
/// Cap on that time when the lease expired: with the default lease (8 s) and the
/// coordinator's `lost_after` (10 s), the old attempt is dead before any relaunch.
pub const DEFAULT_LEASE_STOP_GRACE: Duration = Duration::from_secs(1);

/// Everything the agent needs to start; flags are merged in before [`AgentConfig::validate`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// One coordinator, or every member of a highly available group (any order: the
    /// agent finds the leader).
    pub coordinator: Coordinators,
    /// Defaults to the hostname, so a fleet can share one config file.
    pub node_name: String,
    pub gpu_backend: GpuBackendKind,
    pub sim_gpus: u32,
    /// Fault injection for the simulator, re-read whenever it changes (see `gpu::faults`).
    pub sim_fault_file: Option<PathBuf>,
    /// The node's diagnostic, run when the coordinator asks: program and arguments,
    /// run without a shell. Empty (the default) runs the built-in self-check.
    pub diagnostics_command: Vec<String>,
    pub state_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    pub reconnect: ReconnectConfig,
    /// Leave workers running when the agent itself stops (an agent upgrade
    /// that must not interrupt training). The next agent start still stops
    /// them as orphans: it cannot supervise processes it did not spawn.
    pub keep_workers_on_shutdown: bool,
    /// SIGTERM-to-SIGKILL time for a worker whose StartWorker/StopWorkers sets none.
    #[serde(with = "humantime_serde")]
    pub worker_stop_grace: Duration,
    /// The most a worker gets between SIGTERM and SIGKILL once the lease expired.
    #[serde(with = "humantime_serde")]
    pub lease_stop_grace: Duration,
    /// Who job processes run as and where they may work.
    pub workers: WorkersSection,
    /// Plaintext to an `http://` coordinator: the agent cannot tell the real coordinator
    /// from anyone else on the network, and runs whatever it is told. Local demos and
    /// test clusters only; otherwise `[tls]`.
    pub insecure: bool,
    /// Mutual TLS to an `https://` coordinator: this node's certificate (CN = node name,
    /// O = vigil:node) and key, and the CA the coordinator's certificate must chain to.
    /// Read at every (re)connection, so renewed files apply without a restart.
    pub tls: Option<vigil_tls::TlsFiles>,
}

/// The `coordinator` key: one URL (`"https://coord:7770"`) or a list of them
/// (`["https://coord-1:7770", "https://coord-2:7770"]`), in the order the agent tries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinators(Vec<String>);

impl Coordinators {
    /// `--coordinator URL[,URL...]`: a comma-separated list; entries are trimmed, empty ones
    /// kept so validation can name them.
    pub fn from_flag(value: &str) -> Self {
        Self(value.split(',').map(|u| u.trim().to_owned()).collect())
    }

    pub fn urls(&self) -> &[String] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every URL starts with `prefix` (a scheme, say).
    pub fn starts_with(&self, prefix: &str) -> bool {
        !self.0.is_empty() && self.0.iter().all(|u| u.starts_with(prefix))
    }

    /// More than one: a highly available group, where the agent looks for the leader.
    pub fn is_group(&self) -> bool {
        self.0.len() > 1
    }

    /// The position of `url` in the list, comparing scheme, host and port (not spelling).
    pub fn position(&self, url: &str) -> Option<usize> {
        let key = url_key(url)?;
        self.0
            .iter()
            .position(|u| url_key(u).as_ref() == Some(&key))
    }
}

/// Scheme, lower-case host and port (the scheme's default when absent): two URLs with the
/// same key reach the same coordinator.
fn url_key(url: &str) -> Option<(String, String, u16)> {
    let uri: Uri = url.trim().parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host().filter(|h| !h.is_empty())?.to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some((scheme, host, port))
}

impl<'de> Deserialize<'de> for Coordinators {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "a coordinator URL, or an array of coordinator URLs"
        )]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Form::deserialize(deserializer)? {
            Form::One(url) => Self(vec![url]),
            Form::Many(urls) => Self(urls),
        })
    }
}

/// One URL as itself; a list comma-separated (the `--coordinator` form).
impl fmt::Display for Coordinators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl From<String> for Coordinators {
    fn from(url: String) -> Self {
        Self(vec![url])
    }
}

impl From<&str> for Coordinators {
    fn from(url: &str) -> Self {
        Self(vec![url.to_owned()])
    }
}

impl From<Vec<String>> for Coordinators {
    fn from(urls: Vec<String>) -> Self {
        Self(urls)
    }
}

/// A single coordinator equals its URL.
impl PartialEq<&str> for Coordinators {
    fn eq(&self, other: &&str) -> bool {
        matches!(self.0.as_slice(), [one] if one == other)
    }
}

/// `[workers]`: the confinement of job processes (see `workers::confine`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersSection {
    /// The user job processes run as. Unset: the agent's own user, refused when that is root;
    /// `"root"` allows root explicitly.
    pub run_as: Option<String>,
    /// Absolute directories a job's workdir and checkpoint dir must lie under; empty refuses
    /// every job.
    pub allowed_roots: Vec<PathBuf>,
}

/// How patiently the agent redials a coordinator it lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

/// Which source of GPU truth the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GpuBackendKind {
    Nvml,
    Sim,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The causes are part of the message (not `#[source]`) so they read before the fix.
    #[error("cannot read config file {path}: {error}; check the --config path")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config{}: {error}", path_suffix(.path.as_deref()))]
    Parse {
        path: Option<PathBuf>,
        error: Box<toml::de::Error>,
    },
    #[error("invalid {field}: {problem}; {fix}")]
    Invalid {
        field: &'static str,
        problem: String,
        fix: &'static str,
    },
}

fn path_suffix(path: Option<&Path>) -> String {
    path.map(|p| format!(" file {}", p.display()))
        .unwrap_or_default()
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            coordinator: DEFAULT_COORDINATOR.into(),
            node_name: hostname(),
            gpu_backend: GpuBackendKind::Nvml,
            sim_gpus: DEFAULT_SIM_GPUS,
            sim_fault_file: None,
            diagnostics_command: Vec::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            metrics_listen: DEFAULT_METRICS_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 9771))),
            reconnect: ReconnectConfig::default(),
            keep_workers_on_shutdown: false,
            worker_stop_grace: DEFAULT_WORKER_STOP_GRACE,
            lease_stop_grace: DEFAULT_LEASE_STOP_GRACE,
            workers: WorkersSection::default(),
            insecure: false,
            tls: None,
        }
    }
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// The hostname as the OS reports it; as a node name, validation catches one that is not usable.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

impl AgentConfig {
    /// Parses without validating: flags may still override fields before [`Self::validate`].
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            error: Box::new(e),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: Some(path.to_owned()),
            error: Box::new(e),
        })
    }

    /// The keys (top-level keys and sections) whose values differ in `new`:
    /// what re-reading the file on SIGHUP would change.
    pub fn changed_keys(&self, new: &AgentConfig) -> Vec<&'static str> {
        // No `..`: a new key must be added here, or this stops compiling.
        let AgentConfig {
            coordinator,
            node_name,
            gpu_backend,
            sim_gpus,
            sim_fault_file,
            diagnostics_command,
            state_dir,
            metrics_listen,
            reconnect,
            keep_workers_on_shutdown,
            worker_stop_grace,
            lease_stop_grace,
            workers,
            insecure,
            tls,
        } = self;
        [
            ("coordinator", *coordinator != new.coordinator),
            ("node_name", *node_name != new.node_name),
            ("gpu_backend", *gpu_backend != new.gpu_backend),
            ("sim_gpus", *sim_gpus != new.sim_gpus),
            ("sim_fault_file", *sim_fault_file != new.sim_fault_file),
            (
                "diagnostics_command",
                *diagnostics_command != new.diagnostics_command,
            ),
            ("state_dir", *state_dir != new.state_dir),
            ("metrics_listen", *metrics_listen != new.metrics_listen),
            ("reconnect", *reconnect != new.reconnect),
            (
                "keep_workers_on_shutdown",
                *keep_workers_on_shutdown != new.keep_workers_on_shutdown,
            ),
            (
                "worker_stop_grace",
                *worker_stop_grace != new.worker_stop_grace,
            ),
            (
                "lease_stop_grace",
                *lease_stop_grace != new.lease_stop_grace,
            ),
            ("workers", *workers != new.workers),
            ("insecure", *insecure != new.insecure),
            ("tls", *tls != new.tls),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_gpu()?;
        validate_coordinators(&self.coordinator)?;
        if self
            .diagnostics_command
            .first()
            .is_some_and(|p| p.trim().is_empty())
        {
            return Err(ConfigError::Invalid {
                field: "diagnostics_command",
                problem: "the program (first element) is empty".to_owned(),
                fix: "name a program, e.g. [\"dcgmi\", \"diag\", \"-r\", \"1\"], or leave the list empty for the built-in self-check",
            });
        }
        validate_workers(&self.workers)?;
        let r = &self.reconnect;
        if r.initial_backoff.is_zero() {
            return Err(ConfigError::Invalid {
                field: "reconnect.initial_backoff",
                problem: "must be greater than zero".to_owned(),
                fix: "use a duration such as \"200ms\"",
            });
        }
        if r.initial_backoff > r.max_backoff {
            return Err(ConfigError::Invalid {
                field: "reconnect.initial_backoff",
                problem: format!(
                    "{} is longer than reconnect.max_backoff ({})",
                    humantime::format_duration(r.initial_backoff),
                    humantime::format_duration(r.max_backoff)
                ),
                fix: "make initial_backoff at most max_backoff",
            });
        }
        for url in self.coordinator.urls() {
            vigil_tls::check_scheme(url, self.tls.is_some(), self.insecure).map_err(|e| {
                ConfigError::Invalid {
                    field: "coordinator",
                    problem: e.to_string(),
                    fix: "see docs/security.md",
                }
            })?;
        }
        Ok(())
    }

    /// The keys reading the GPUs needs (`--check-gpus`): the node name (simulated
    /// identities derive from it) and the simulated GPU count; the coordinator,
    /// TLS and workers are not looked at.
    pub fn validate_gpu(&self) -> Result<(), ConfigError> {
        validate_node_name(&self.node_name)?;
        if !(1..=MAX_SIM_GPUS).contains(&self.sim_gpus) {
            return Err(ConfigError::Invalid {
                field: "sim_gpus",
                problem: format!("{} is out of range", self.sim_gpus),
                fix: "use a value from 1 to 64",
            });
        }
        Ok(())
    }
}

/// The protocol's name rule, checked here so a name the coordinator would refuse stops the
/// agent at start, with the reason.
fn validate_node_name(name: &str) -> Result<(), ConfigError> {
    vigil_proto::check_node_name(name).map_err(|problem| ConfigError::Invalid {
        field: "node_name",
        problem: format!(
            "{name:?} {problem} (a node name has {})",
            vigil_proto::NODE_NAME_RULE
        ),
        fix: "set --node-name or node_name to such a name (the coordinator refuses any other)",
    })
}

fn validate_workers(w: &WorkersSection) -> Result<(), ConfigError> {
    if let Some(user) = &w.run_as {
        let ok = !user.is_empty()
            && user.len() <= 32
            && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(ConfigError::Invalid {
                field: "workers.run_as",
                problem: format!("{user:?} is not a user name"),
                fix: "name an unprivileged user such as \"vigil-job\" (or \"root\" to run jobs as root explicitly)",
            });
        }
    }
    for root in &w.allowed_roots {
        let bad = !root.is_absolute()
            || root
                .components()
                .any(|c| c == std::path::Component::ParentDir);
        if bad {
            return Err(ConfigError::Invalid {
                field: "workers.allowed_roots",
                problem: format!("{} is not an absolute path without '..'", root.display()),
                fix: "list absolute directories, e.g. allowed_roots = [\"/shared\"]",
            });
        }
        if root.parent().is_none() {
            return Err(ConfigError::Invalid {
                field: "workers.allowed_roots",
                problem: "\"/\" would allow every directory".to_owned(),
                fix: "list the storage roots jobs use, e.g. allowed_roots = [\"/shared\"]",
            });
        }
    }
    Ok(())
}

/// Each URL on its own, then the list: not empty, at most [`MAX_COORDINATORS`], one
/// scheme, no coordinator twice.
fn validate_coordinators(list: &Coordinators) -> Result<(), ConfigError> {
    let invalid = |problem: String, fix: &'static str| ConfigError::Invalid {
        field: "coordinator",
        problem,
        fix,
    };
    if list.is_empty() {
        return Err(invalid(
            "the list is empty".to_owned(),
            "name the coordinator, e.g. coordinator = \"https://coord:7770\", or every member \
             of its group, e.g. coordinator = [\"https://coord-1:7770\", \"https://coord-2:7770\"]",
        ));
    }
    if list.len() > MAX_COORDINATORS {
        return Err(invalid(
            format!(
                "lists {} coordinators, more than {MAX_COORDINATORS}",
                list.len()
            ),
            "list only the coordinators of this cluster's group (usually 2 or 3)",
        ));
    }
    let mut first_scheme: Option<(&str, &str)> = None;
    for (i, url) in list.urls().iter().enumerate() {
        validate_coordinator(url)?;
        let scheme = url.split("://").next().unwrap_or_default();
        match first_scheme {
            None => first_scheme = Some((url, scheme)),
            Some((first, s)) if !s.eq_ignore_ascii_case(scheme) => {
                return Err(invalid(
                    format!("{url:?} uses {scheme}:// but {first:?} uses {s}://"),
                    "use one scheme for every coordinator: https:// with [tls], or http:// \
                     with insecure = true",
                ));
            }
            Some(_) => {}
        }
        if list.position(url).is_some_and(|p| p < i) {
            return Err(invalid(
                format!("{url:?} is listed twice"),
                "list each coordinator once",
            ));
        }
    }
    Ok(())
}

fn validate_coordinator(url: &str) -> Result<(), ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        field: "coordinator",
        problem,
        fix: "use a URL such as https://coordinator.example:7770",
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| invalid(format!("{url:?} is not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(invalid(format!("scheme {other:?} is not http or https"))),
        None => return Err(invalid(format!("{url:?} has no scheme"))),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(format!("{url:?} has no host")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> AgentConfig {
        AgentConfig {
            node_name: "node-01".to_owned(),
            insecure: true,
            ..AgentConfig::default()
        }
    }

    fn invalid_field(cfg: &AgentConfig) -> &'static str {
        match cfg.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() -> Result<(), ConfigError> {
        let cfg = AgentConfig::from_toml_str("")?;
        assert_eq!(cfg.coordinator, DEFAULT_COORDINATOR);
        assert_eq!(cfg.gpu_backend, GpuBackendKind::Nvml);
        assert_eq!(cfg.sim_gpus, 8);
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/vigil-agent"));
        assert_eq!(cfg.metrics_listen.to_string(), "0.0.0.0:9771");
        assert_eq!(cfg.reconnect.initial_backoff, Duration::from_millis(200));
        assert_eq!(cfg.reconnect.max_backoff, Duration::from_secs(10));
        assert_eq!(cfg.node_name, hostname());
        assert!(cfg.diagnostics_command.is_empty(), "built-in self-check");
        assert!(!cfg.keep_workers_on_shutdown);
        assert_eq!(cfg.worker_stop_grace, Duration::from_secs(10));
        assert_eq!(cfg.lease_stop_grace, Duration::from_secs(1));
        Ok(())
    }

    #[test]
    fn diagnostics_command_needs_a_program() -> Result<(), ConfigError> {
        let mut cfg = valid();
        cfg.diagnostics_command = vec![" ".to_owned(), "-x".to_owned()];
        assert_eq!(invalid_field(&cfg), "diagnostics_command");
        cfg.diagnostics_command = vec!["/usr/bin/true".to_owned()];
        assert!(cfg.validate().is_ok());
        assert!(AgentConfig::from_toml_str("diagnostics_command = \"dcgmi diag\"").is_err());
        Ok(())
    }

    #[test]
    fn every_key_is_read() -> Result<(), ConfigError> {
        let cfg = AgentConfig::from_toml_str(
            r#"
            coordinator = "https://coord:7000"
            node_name = "gpu-node-7"
            gpu_backend = "sim"
            sim_gpus = 4
            sim_fault_file = "/tmp/faults"
            diagnostics_command = ["dcgmi", "diag", "-r", "1"]
            state_dir = "/tmp/state"
            metrics_listen = "127.0.0.1:0"
            keep_workers_on_shutdown = true
            worker_stop_grace = "30s"
            lease_stop_grace = "500ms"
            insecure = false
            [reconnect]
            initial_backoff = "1s"
            max_backoff = "1m"
            [tls]
            ca = "/etc/vigil/tls/ca.crt"
            cert = "/etc/vigil/tls/node.crt"
            key = "/etc/vigil/tls/node.key"
            "#,
        )?;
        cfg.validate()?;
        assert_eq!(cfg.coordinator, "https://coord:7000");
        assert_eq!(
            cfg.tls.as_ref().map(|t| t.cert.clone()),
            Some(PathBuf::from("/etc/vigil/tls/node.crt"))
        );
        assert!(!cfg.insecure);
        assert_eq!(cfg.node_name, "gpu-node-7");
        assert_eq!(cfg.gpu_backend, GpuBackendKind::Sim);
        assert_eq!(cfg.sim_gpus, 4);
        assert_eq!(cfg.sim_fault_file, Some(PathBuf::from("/tmp/faults")));
        assert_eq!(cfg.diagnostics_command, ["dcgmi", "diag", "-r", "1"]);
        assert_eq!(cfg.state_dir, PathBuf::from("/tmp/state"));
        assert_eq!(cfg.metrics_listen.port(), 0);
        assert_eq!(cfg.reconnect.initial_backoff, Duration::from_secs(1));
        assert_eq!(cfg.reconnect.max_backoff, Duration::from_secs(60));
        assert!(cfg.keep_workers_on_shutdown);
        assert_eq!(cfg.worker_stop_grace, Duration::from_secs(30));
        assert_eq!(cfg.lease_stop_grace, Duration::from_millis(500));
        Ok(())
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let err = AgentConfig::from_toml_str("heartbeat_interval = \"1s\"");
        let msg = err.map(|_| ()).err().map(|e| e.to_string());
        assert!(msg.is_some_and(|m| m.contains("heartbeat_interval")));
    }

    #[test]
    fn unknown_backend_is_rejected() {
        assert!(AgentConfig::from_toml_str("gpu_backend = \"rocm\"").is_err());
    }

    #[test]
    fn node_name_must_be_short_and_plain() {
        let mut cfg = valid();
        assert!(cfg.validate().is_ok());
        for bad in ["", "has space", "ünï", "a/b"] {
            cfg.node_name = bad.to_owned();
            assert_eq!(invalid_field(&cfg), "node_name", "{bad:?}");
        }
        cfg.node_name = "a".repeat(64);
        assert_eq!(invalid_field(&cfg), "node_name");
        cfg.node_name = "A.b_c-9".repeat(9);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn sim_gpus_must_be_between_1_and_64() {
        let mut cfg = valid();
        for (n, ok) in [(0, false), (1, true), (64, true), (65, false)] {
            cfg.sim_gpus = n;
            assert_eq!(cfg.validate().is_ok(), ok, "{n}");
        }
    }

    #[test]
    fn coordinator_must_be_an_http_url() {
        let mut cfg = valid();
        for bad in ["", "coord:7770", "ftp://coord:7770", "http://", "not a url"] {
            cfg.coordinator = bad.into();
            assert_eq!(invalid_field(&cfg), "coordinator", "{bad:?}");
        }
        cfg.coordinator = "https://coord:7770".into();
        assert_eq!(invalid_field(&cfg), "coordinator");
        cfg.coordinator = "http://10.0.0.1:7770".into();
        assert!(cfg.validate().is_ok());
    }

    fn problem(cfg: &AgentConfig) -> String {
        match cfg.validate() {
            Err(e @ ConfigError::Invalid { .. }) => e.to_string(),
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn coordinator_may_be_a_list() -> Result<(), ConfigError> {
        let cfg = AgentConfig::from_toml_str(
            "coordinator = [\"http://c1:7770\", \"http://c2:7770\", \"http://c3:7770\"]",
        )?;
        assert_eq!(
            cfg.coordinator.urls(),
            ["http://c1:7770", "http://c2:7770", "http://c3:7770"]
        );
        assert!(cfg.coordinator.is_group());
        assert!(cfg.coordinator.starts_with("http://"));
        AgentConfig {
            node_name: "n".into(),
            insecure: true,
            ..cfg
        }
        .validate()?;
        let one = AgentConfig::from_toml_str("coordinator = [\"http://c1:7770\"]")?;
        assert_eq!(one.coordinator, "http://c1:7770");
        assert!(!one.coordinator.is_group());
        let err = AgentConfig::from_toml_str("coordinator = 7770").map(|_| ());
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("a coordinator URL, or an array"), "{msg}");
        Ok(())
    }

    #[test]
    fn coordinator_list_is_checked_naming_the_key_and_the_fix() {
        let list = |urls: &[&str]| AgentConfig {
            coordinator: urls
                .iter()
                .map(|u| (*u).to_owned())
                .collect::<Vec<_>>()
                .into(),
            ..valid()
        };
        let empty = problem(&list(&[]));
        assert!(empty.contains("coordinator: the list is empty"), "{empty}");
        let twice = problem(&list(&["http://c1:7770", "http://C1:7770/"]));
        assert!(
            twice.contains("listed twice; list each coordinator once"),
            "{twice}"
        );
        let mixed = problem(&AgentConfig {
            insecure: false,
            tls: Some(vigil_tls::TlsFiles {
                ca: "/ca".into(),
                cert: "/c".into(),
                key: "/k".into(),
            }),
            ..list(&["https://c1:7770", "http://c2:7770"])
        });
        assert!(mixed.contains("uses http:// but"), "{mixed}");
        assert!(mixed.contains("use one scheme"), "{mixed}");
        let bad = problem(&list(&["http://c1:7770", "c2:7770"]));
        assert!(bad.starts_with("invalid coordinator: "), "{bad}");
        let urls: Vec<String> = (1..=8).map(|i| format!("http://c{i}:7770")).collect();
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        let many = problem(&list(&refs));
        assert!(many.contains("8 coordinators, more than 7"), "{many}");
        assert!(list(&refs[..7]).validate().is_ok());
        // Secure defaults still apply to every member of the list.
        let https = problem(&list(&["http://c1:7770", "https://c2:7770"]));
        assert!(https.contains("coordinator"), "{https}");
    }

    #[test]
    fn coordinators_match_by_scheme_host_and_port() {
        let list = Coordinators::from_flag("http://c1:7770, http://c2:7770,http://c3");
        assert_eq!(list.len(), 3);
        assert_eq!(list.to_string(), "http://c1:7770,http://c2:7770,http://c3");
        assert_eq!(list.position("http://C2:7770/"), Some(1));
        assert_eq!(list.position("http://c3:80"), Some(2));
        assert_eq!(list.position("https://c2:7770"), None);
        assert_eq!(list.position("http://c4:7770"), None);
        assert_eq!(list.position("not a url"), None);
    }

    #[test]
    fn changed_keys_see_a_changed_coordinator_list() {
        let old = valid();
        let new = AgentConfig {
            coordinator: Coordinators::from_flag("http://127.0.0.1:7770,http://c2:7770"),
            ..old.clone()
        };
        assert_eq!(old.changed_keys(&new), ["coordinator"]);
    }

    #[test]
    fn initial_backoff_may_not_exceed_max_backoff() {
        let mut cfg = valid();
        cfg.reconnect.initial_backoff = Duration::from_secs(11);
        assert_eq!(invalid_field(&cfg), "reconnect.initial_backoff");
        cfg.reconnect.initial_backoff = Duration::ZERO;
        assert_eq!(invalid_field(&cfg), "reconnect.initial_backoff");
        cfg.reconnect.initial_backoff = Duration::from_secs(10);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn changed_keys_name_what_a_reload_would_change() -> Result<(), ConfigError> {
        let old = valid();
        assert!(old.changed_keys(&old.clone()).is_empty());
        let mut new = AgentConfig::from_toml_str(
            "insecure = true\nworker_stop_grace = \"30s\"\n[reconnect]\nmax_backoff = \"1m\"\n",
        )?;
        new.node_name = old.node_name.clone();
        assert_eq!(old.changed_keys(&new), ["reconnect", "worker_stop_grace"]);
        Ok(())
    }

    #[test]
    fn bad_duration_is_rejected() {
        assert!(AgentConfig::from_toml_str("[reconnect]\nmax_backoff = \"soon\"").is_err());
    }

    #[test]
    fn workers_section_is_checked_naming_the_key() -> Result<(), Box<dyn std::error::Error>> {
        let cfg = AgentConfig::from_toml_str(
            "[workers]\nrun_as = \"vigil-job\"\nallowed_roots = [\"/shared\", \"/scratch\"]\n",
        )?;
        assert_eq!(cfg.workers.run_as.as_deref(), Some("vigil-job"));
        AgentConfig {
            node_name: "n".into(),
            insecure: true,
            ..cfg
        }
        .validate()?;
        for (workers, field) in [
            (
                WorkersSection {
                    run_as: Some("Bad User".into()),
                    ..Default::default()
                },
                "workers.run_as",
            ),
            (
                WorkersSection {
                    run_as: Some(String::new()),
                    ..Default::default()
                },
                "workers.run_as",
            ),
            (
                WorkersSection {
                    allowed_roots: vec!["shared".into()],
                    ..Default::default()
                },
                "workers.allowed_roots",
            ),
            (
                WorkersSection {
                    allowed_roots: vec!["/shared/../etc".into()],
                    ..Default::default()
                },
                "workers.allowed_roots",
            ),
            (
                WorkersSection {
                    allowed_roots: vec!["/".into()],
                    ..Default::default()
                },
                "workers.allowed_roots",
            ),
        ] {
            assert_eq!(invalid_field(&AgentConfig { workers, ..valid() }), field);
        }
        Ok(())
    }
}
