//! Agent configuration: the TOML file, its defaults, and the checks that run before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod coordinators;

pub use coordinators::Coordinators;
use coordinators::validate_coordinators;

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
    /// Simulated GPUs at these indexes are boards swapped in since the last start: a new UUID
    /// and serial (what a repair that replaced a GPU looks like to the coordinator).
    pub sim_replaced_gpus: Vec<u32>,
    /// Fault injection for the simulator, re-read whenever it changes (see `gpu::faults`).
    pub sim_fault_file: Option<PathBuf>,
    /// The node's diagnostic, run when the coordinator asks: program and arguments,
    /// run without a shell. Empty (the default) runs the built-in self-check.
    pub diagnostics_command: Vec<String>,
    pub state_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    pub reconnect: ReconnectConfig,
    /// Leave workers running under their shims when the agent itself stops (a restart or an
    /// upgrade must not interrupt training): the next agent re-adopts them, and if none comes
    /// within the lease, the shims stop them. False: stop every worker before exiting.
    pub keep_workers_on_shutdown: bool,
    /// SIGTERM-to-SIGKILL time for a worker whose StartWorker/StopWorkers sets none.
    #[serde(with = "humantime_serde")]
    pub worker_stop_grace: Duration,
    /// The most a worker gets between SIGTERM and SIGKILL once the lease expired.
    #[serde(with = "humantime_serde")]
    pub lease_stop_grace: Duration,
    /// Who job processes run as and where they may work.
    pub workers: WorkersSection,
    /// The node's own GPU reset and reboot commands, run when the coordinator's remediation
    /// ladder asks (see `remediation`); unset: such a step answers "not set on this node".
    pub remediation: crate::remediation::RemediationSection,
    /// Plaintext to an `http://` coordinator: the agent cannot tell the real coordinator
    /// from anyone else on the network, and runs whatever it is told. Local demos and
    /// test clusters only; otherwise `[tls]`.
    pub insecure: bool,
    /// Mutual TLS to an `https://` coordinator: this node's certificate (CN = node name,
    /// O = vigil:node) and key, and the CA the coordinator's certificate must chain to.
    /// Read at every (re)connection, so renewed files apply without a restart.
    pub tls: Option<vigil_tls::TlsFiles>,
    /// Who this host is (see `identity`).
    pub identity: IdentitySection,
    /// Where sysfs is read from: `/` on a real host; tests and the simulator point it at a
    /// fake tree (`fabric::fake`) holding `sys/class/infiniband` and `sys/class/net`.
    pub sysfs_root: PathBuf,
    /// Which fabric ports the agent watches (see `fabric`).
    pub fabric: crate::fabric::FabricSection,
    /// The program started as each attempt's shim; `None`: this binary (`/proc/self/exe`).
    /// Not a config key: tests of the library, whose own binary is no agent, set it.
    #[serde(skip)]
    pub shim_program: Option<PathBuf>,
}

/// `[workers]`: the confinement of job processes (see `workers::confine`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersSection {
    /// `false`: this agent launches nothing (a GPU-health daemon beside `slurmd`, where Slurm
    /// runs the jobs: docs/slurm.md); every StartWorker is refused and logged.
    pub launch: bool,
    /// The user job processes run as. Unset: the agent's own user, refused when that is root;
    /// `"root"` allows root explicitly.
    pub run_as: Option<String>,
    /// Absolute directories a job's workdir and checkpoint dir must lie under; empty refuses
    /// every job.
    pub allowed_roots: Vec<PathBuf>,
}

impl Default for WorkersSection {
    fn default() -> Self {
        Self {
            launch: true,
            run_as: None,
            allowed_roots: Vec::new(),
        }
    }
}

/// `[identity]`: this host's machine-id, which the coordinator binds the node name to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySection {
    /// Overrides `/etc/machine-id`: for tests that start several agents on one machine (each
    /// needs its own), and hosts without one. At most 64 of `[A-Za-z0-9._-]`.
    pub machine_id: Option<String>,
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
            sim_replaced_gpus: Vec::new(),
            sim_fault_file: None,
            diagnostics_command: Vec::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            metrics_listen: DEFAULT_METRICS_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 9771))),
            reconnect: ReconnectConfig::default(),
            keep_workers_on_shutdown: true,
            worker_stop_grace: DEFAULT_WORKER_STOP_GRACE,
            lease_stop_grace: DEFAULT_LEASE_STOP_GRACE,
            workers: WorkersSection::default(),
            remediation: crate::remediation::RemediationSection::default(),
            insecure: false,
            tls: None,
            identity: IdentitySection::default(),
            sysfs_root: PathBuf::from("/"),
            fabric: crate::fabric::FabricSection::default(),
            shim_program: None,
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
            sim_replaced_gpus,
            sim_fault_file,
            diagnostics_command,
            state_dir,
            metrics_listen,
            reconnect,
            keep_workers_on_shutdown,
            worker_stop_grace,
            lease_stop_grace,
            workers,
            remediation,
            insecure,
            tls,
            identity,
            sysfs_root,
            fabric,
            // Not in the file.
            shim_program: _,
        } = self;
        [
            ("coordinator", *coordinator != new.coordinator),
            ("node_name", *node_name != new.node_name),
            ("gpu_backend", *gpu_backend != new.gpu_backend),
            ("sim_gpus", *sim_gpus != new.sim_gpus),
            (
                "sim_replaced_gpus",
                *sim_replaced_gpus != new.sim_replaced_gpus,
            ),
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
            ("remediation", *remediation != new.remediation),
            ("insecure", *insecure != new.insecure),
            ("tls", *tls != new.tls),
            ("identity", *identity != new.identity),
            ("sysfs_root", *sysfs_root != new.sysfs_root),
            ("fabric", *fabric != new.fabric),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_gpu()?;
        self.validate_fabric()?;
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
        if let Some((field, problem)) = self.remediation.problem() {
            return Err(ConfigError::Invalid {
                field,
                problem,
                fix: "name a program, e.g. gpu_reset_command = [\"nvidia-smi\", \"-r\", \"-i\", \"{gpu}\"], and a timeout from 1s to 1h",
            });
        }
        if let Some(problem) = self.identity.machine_id.as_deref().and_then(|id| match id {
            "" => Some("is empty".to_owned()),
            id => vigil_proto::check_host_id(id).err(),
        }) {
            return Err(ConfigError::Invalid {
                field: "identity.machine_id",
                problem,
                fix: "use 1-64 letters, digits, '.', '_' or '-' (or remove it to use /etc/machine-id)",
            });
        }
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

    /// The keys reading the fabric needs (`--check-fabric`, and every start).
    pub fn validate_fabric(&self) -> Result<(), ConfigError> {
        if !self.sysfs_root.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "sysfs_root",
                problem: format!("{} is not an absolute path", self.sysfs_root.display()),
                fix: "use \"/\" on a real host, or the absolute path of a fake tree",
            });
        }
        if let Some((field, problem)) = self.fabric.problem() {
            return Err(ConfigError::Invalid {
                field,
                problem,
                fix: "list globs such as devices = [\"mlx5_*\", \"eth0\"], or leave it empty for every InfiniBand port and RoCE interface",
            });
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
        if let Some(i) = self.sim_replaced_gpus.iter().find(|i| **i >= self.sim_gpus) {
            return Err(ConfigError::Invalid {
                field: "sim_replaced_gpus",
                problem: format!("GPU {i} is not one of the {} simulated GPUs", self.sim_gpus),
                fix: "list indexes below sim_gpus",
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

#[cfg(test)]
mod tests;
