//! Coordinator configuration: TOML file, overridden by flags, with named defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
pub use vigil_core::config::{
    DEFAULT_AGENT_LEASE, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_LOST_AFTER, DEFAULT_RECURRENCE_WINDOW,
    DEFAULT_TEMPERATURE_MAX_C, DEFAULT_UNREACHABLE_AFTER, HealthConfig, LivenessConfig,
};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:7770";
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9770";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/vigil";

/// Why a configuration was refused; the message names the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC address for agents and clusterctl.
    pub listen: SocketAddr,
    /// HTTP address for `/metrics` and `/healthz`.
    pub metrics_listen: SocketAddr,
    /// Where the state store (SQLite) lives.
    pub data_dir: PathBuf,
    pub liveness: LivenessConfig,
    pub health: HealthConfig,
    pub diagnostics: DiagnosticsConfig,
    /// Per-agent stream rate limits (see docs/security.md, "Input limits").
    pub limits: crate::limits::LimitsConfig,
    /// Plaintext gRPC: nobody is authenticated, and whoever reaches `listen` can cordon the
    /// fleet or run code on it. For a local demo or test cluster only; otherwise `[tls]`.
    pub insecure: bool,
    /// Mutual TLS: the coordinator's certificate and key, and the CA that signed every
    /// agent's and operator's certificate. Re-read on SIGHUP.
    pub tls: Option<vigil_tls::TlsFiles>,
    /// Lemon hosts and GPUs (see `lemons`).
    pub lemons: crate::lemons::LemonConfig,
    /// Diagnosing the gang after an unexplained failure (see `triage`).
    pub triage: crate::triage::TriageConfig,
    /// Burn-in before a node joins or rejoins (see `burn_in`).
    pub burn_in: crate::burn_in::BurnInConfig,
    /// Nodes slower than their gang (see `stragglers`).
    pub stragglers: crate::stragglers::StragglerConfig,
    /// What hung attempts' evidence may store (see `jobs::evidence`).
    pub evidence: vigil_core::jobs::evidence::EvidenceConfig,
    /// The cap on automatic cordons (see `breaker`).
    pub cordon_breaker: crate::breaker::BreakerConfig,
    /// The remediation ladder: GPU reset, reboot, needs-repair (see `remediation`).
    pub remediation: crate::remediation::RemediationConfig,
    /// Several coordinators sharing state in etcd, one leading (docs/ha.md). Absent: one
    /// coordinator with its state in SQLite under `data_dir`.
    pub ha: Option<crate::ha::HaConfig>,
    /// Scheduled backups of the store in `data_dir` (docs/operations.md). Absent: none.
    pub backup: Option<crate::store::backup::BackupConfig>,
    /// Carry node decisions into Slurm (docs/slurm.md). Absent: off.
    pub slurm: Option<crate::slurm::SlurmConfig>,
}

/// On-demand diagnostics (`clusterctl diagnose`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiagnosticsConfig {
    /// How long a diagnostic may run when the operator does not say.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

pub const DEFAULT_DIAGNOSTICS_TIMEOUT: Duration = Duration::from_secs(120);
pub const MAX_DIAGNOSTICS_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_DIAGNOSTICS_TIMEOUT,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: parse_default(DEFAULT_LISTEN),
            metrics_listen: parse_default(DEFAULT_METRICS_LISTEN),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            liveness: LivenessConfig::default(),
            health: HealthConfig::default(),
            diagnostics: DiagnosticsConfig::default(),
            limits: crate::limits::LimitsConfig::default(),
            insecure: false,
            tls: None,
            lemons: crate::lemons::LemonConfig::default(),
            triage: crate::triage::TriageConfig::default(),
            burn_in: crate::burn_in::BurnInConfig::default(),
            stragglers: crate::stragglers::StragglerConfig::default(),
            evidence: vigil_core::jobs::evidence::EvidenceConfig::default(),
            cordon_breaker: crate::breaker::BreakerConfig::default(),
            remediation: crate::remediation::RemediationConfig::default(),
            ha: None,
            backup: None,
            slurm: None,
        }
    }
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl Config {
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The keys (top-level keys and sections) whose values differ in `new`:
    /// what re-reading the file on SIGHUP would change.
    pub fn changed_keys(&self, new: &Config) -> Vec<&'static str> {
        // No `..`: a new key must be added here, or this stops compiling.
        let Config {
            listen,
            metrics_listen,
            data_dir,
            liveness,
            health,
            diagnostics,
            limits,
            insecure,
            tls,
            lemons,
            triage,
            burn_in,
            stragglers,
            evidence,
            cordon_breaker,
            remediation,
            ha,
            backup,
            slurm,
        } = self;
        [
            ("listen", *listen != new.listen),
            ("metrics_listen", *metrics_listen != new.metrics_listen),
            ("data_dir", *data_dir != new.data_dir),
            ("liveness", *liveness != new.liveness),
            ("health", *health != new.health),
            ("diagnostics", *diagnostics != new.diagnostics),
            ("limits", *limits != new.limits),
            ("insecure", *insecure != new.insecure),
            ("tls", *tls != new.tls),
            ("lemons", *lemons != new.lemons),
            ("triage", *triage != new.triage),
            ("burn_in", *burn_in != new.burn_in),
            ("stragglers", *stragglers != new.stragglers),
            ("evidence", *evidence != new.evidence),
            ("cordon_breaker", *cordon_breaker != new.cordon_breaker),
            ("remediation", *remediation != new.remediation),
            ("ha", *ha != new.ha),
            ("backup", *backup != new.backup),
            ("slurm", *slurm != new.slurm),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }

    /// Exactly one of `[tls]` and `insecure = true`: a coordinator never serves plaintext
    /// by accident. Checked at start-up and by `--check-config`, after the flags.
    pub fn validate_transport(&self) -> Result<(), ConfigError> {
        match (self.insecure, &self.tls) {
            (true, Some(_)) => Err(ConfigError::Invalid(
                "insecure = true (or --insecure) and a [tls] section are both set: remove one \
                 ([tls] serves mutual TLS, insecure = true plaintext)"
                    .into(),
            )),
            (false, None) => Err(ConfigError::Invalid(
                "no transport security configured: add a [tls] section with ca, cert and key \
                 (docs/security.md, deploy/tls/make-certs.sh), or set insecure = true (or pass \
                 --insecure) for a plaintext test cluster"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(ha) = &self.ha {
            ha.validate(self.liveness.agent_lease)?;
        }
        let l = &self.liveness;
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if l.heartbeat_interval < Duration::from_millis(50) {
            return Err(ConfigError::Invalid(format!(
                "liveness.heartbeat_interval = {} is too short; use at least 50ms",
                fmt(l.heartbeat_interval)
            )));
        }
        if l.unreachable_after <= l.heartbeat_interval {
            return Err(ConfigError::Invalid(format!(
                "liveness.unreachable_after ({}) must be longer than liveness.heartbeat_interval ({}); \
                 a few intervals is usual",
                fmt(l.unreachable_after),
                fmt(l.heartbeat_interval)
            )));
        }
        if l.lost_after <= l.unreachable_after {
            return Err(ConfigError::Invalid(format!(
                "liveness.lost_after ({}) must be longer than liveness.unreachable_after ({})",
                fmt(l.lost_after),
                fmt(l.unreachable_after)
            )));
        }
        if l.agent_lease >= l.lost_after || l.agent_lease <= l.heartbeat_interval {
            return Err(ConfigError::Invalid(format!(
                "liveness.agent_lease ({}) must lie between liveness.heartbeat_interval ({}) and \
                 liveness.lost_after ({}): agents must stop their work before the coordinator \
                 restarts it elsewhere",
                fmt(l.agent_lease),
                fmt(l.heartbeat_interval),
                fmt(l.lost_after)
            )));
        }
        let h = &self.health;
        if !(30.0..=150.0).contains(&h.temperature_max_c) {
            return Err(ConfigError::Invalid(format!(
                "health.temperature_max_c = {} is outside 30..150 °C",
                h.temperature_max_c
            )));
        }
        if h.degrade_recurrence < 1 || h.application_recurrence < 1 {
            return Err(ConfigError::Invalid(
                "health.degrade_recurrence and health.application_recurrence must be at least 1"
                    .into(),
            ));
        }
        for key in h.xid.keys() {
            if key.parse::<u32>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "health.xid key {key:?} is not an XID number; write e.g. \"13\" = \"fatal\""
                )));
            }
        }
        h.fabric.validate().map_err(ConfigError::Invalid)?;
        h.rates.validate().map_err(ConfigError::Invalid)?;
        let t = self.diagnostics.timeout;
        if t.is_zero() || t > MAX_DIAGNOSTICS_TIMEOUT {
            return Err(ConfigError::Invalid(format!(
                "diagnostics.timeout = {} must be between 1s and 1h",
                fmt(t)
            )));
        }
        self.limits.validate().map_err(ConfigError::Invalid)?;
        self.lemons.validate().map_err(ConfigError::Invalid)?;
        self.triage.validate().map_err(ConfigError::Invalid)?;
        self.burn_in.validate().map_err(ConfigError::Invalid)?;
        self.stragglers.validate().map_err(ConfigError::Invalid)?;
        self.evidence.validate().map_err(ConfigError::Invalid)?;
        self.cordon_breaker
            .validate()
            .map_err(ConfigError::Invalid)?;
        self.remediation.validate().map_err(ConfigError::Invalid)?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "data_dir is empty; set it to a directory such as /var/lib/vigil".into(),
            ));
        }
        if let Some(backup) = &self.backup {
            if self.ha.is_some() {
                return Err(ConfigError::Invalid(
                    "[backup] backs up a single coordinator's data dir; with [ha] the state is in \
                     etcd: remove [backup] and take etcd snapshots instead (etcdctl snapshot \
                     save; docs/operations.md, \"Backing up etcd\")"
                        .into(),
                ));
            }
            backup
                .validate(&self.data_dir)
                .map_err(ConfigError::Invalid)?;
        }
        if let Some(slurm) = &self.slurm {
            if self.ha.is_some() {
                return Err(ConfigError::Invalid(
                    "[slurm] runs beside a single coordinator only; remove [ha] or [slurm] \
                     (docs/slurm.md, \"Limits\")"
                        .into(),
                ));
            }
            slurm.validate().map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::from_toml_str("").expect("defaults are valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
        assert_eq!(c.liveness.lost_after, Duration::from_secs(10));
    }

    #[test]
    fn durations_are_humantime() {
        let c = Config::from_toml_str(
            "[liveness]\nheartbeat_interval = \"200ms\"\nunreachable_after = \"1s\"\nlost_after = \"3s\"\nagent_lease = \"2s\"\n",
        )
        .expect("valid");
        assert_eq!(c.liveness.heartbeat_interval, Duration::from_millis(200));
        assert_eq!(c.liveness.agent_lease, Duration::from_secs(2));
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = Config::from_toml_str("listen_addr = \"0.0.0.0:1\"").expect_err("unknown key");
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn lost_must_come_after_unreachable() {
        let err = Config::from_toml_str("[liveness]\nunreachable_after = \"20s\"\n")
            .expect_err("lost_after 10s < 20s");
        assert!(err.to_string().contains("liveness.lost_after"), "{err}");
    }

    #[test]
    fn lease_must_expire_before_lost() {
        let err = Config::from_toml_str("[liveness]\nagent_lease = \"10s\"\n").expect_err("lease");
        assert!(err.to_string().contains("liveness.agent_lease"), "{err}");
    }

    #[test]
    fn xid_classes_can_be_overridden() {
        use crate::xid::XidClass;
        let c = Config::from_toml_str("[health.xid]\n\"13\" = \"fatal\"\n\"79\" = \"ignore\"\n")
            .expect("valid");
        assert_eq!(c.health.xid_class(13), XidClass::Fatal);
        assert_eq!(c.health.xid_class(79), XidClass::Ignore);
        assert_eq!(c.health.xid_class(48), XidClass::Fatal);
        assert_eq!(
            c.health.xid_class(4242),
            XidClass::Degrade,
            "unknown XIDs degrade"
        );
        let err = Config::from_toml_str("[health.xid]\n\"x\" = \"fatal\"\n").expect_err("bad key");
        assert!(err.to_string().contains("health.xid"), "{err}");
        let err =
            Config::from_toml_str("[health.xid]\n\"13\" = \"deadly\"\n").expect_err("bad class");
        assert!(err.to_string().contains("deadly"), "{err}");
    }

    #[test]
    fn changed_keys_name_the_sections_a_reload_would_change() {
        let old = Config::default();
        assert!(old.changed_keys(&old.clone()).is_empty());
        let new =
            Config::from_toml_str("listen = \"127.0.0.1:1\"\n[health]\ntemperature_max_c = 80.0\n")
                .expect("valid");
        assert_eq!(old.changed_keys(&new), ["listen", "health"]);
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = Config::from_toml_str("[liveness]\nlost_after = \"ten seconds\"\n")
            .expect_err("bad duration");
        assert!(err.to_string().contains("lost_after"), "{err}");
    }

    #[test]
    fn bad_address_names_the_key() {
        let err = Config::from_toml_str("listen = \"nowhere\"").expect_err("bad addr");
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn backup_section_defaults_and_refusals_name_the_key() {
        assert_eq!(Config::from_toml_str("").expect("defaults").backup, None);
        let c = Config::from_toml_str("[backup]\ndir = \"/b\"\n").expect("valid");
        let b = c.backup.expect("on");
        assert_eq!(b.interval, Duration::from_secs(3600));
        assert_eq!(b.keep, 24);
        let c = Config::from_toml_str("[backup]\ndir = \"/b\"\ninterval = \"10m\"\nkeep = 3\n")
            .expect("valid");
        assert_eq!(
            c.backup.as_ref().map(|b| b.interval),
            Some(Duration::from_secs(600))
        );
        for (text, key) in [
            ("[backup]\ninterval = \"1h\"\n", "backup.dir"),
            ("[backup]\ndir = \"/var/lib/vigil\"\n", "backup.dir"),
            (
                "[backup]\ndir = \"/b\"\ninterval = \"10ms\"\n",
                "backup.interval",
            ),
            ("[backup]\ndir = \"/b\"\nkeep = 0\n", "backup.keep"),
            ("[backup]\ndir = \"/b\"\nevery = \"1h\"\n", "every"),
            (
                "[backup]\ndir = \"/b\"\ninterval = \"hourly\"\n",
                "interval",
            ),
        ] {
            let e = Config::from_toml_str(text).expect_err(key).to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
        let ha =
            "[ha]\nadvertise_url = \"http://c1:7770\"\netcd_endpoints = [\"http://e1:2379\"]\n";
        Config::from_toml_str(ha).expect("valid [ha]");
        let e = Config::from_toml_str(&format!("{ha}[backup]\ndir = \"/b\"\n"))
            .expect_err("[backup] with [ha]")
            .to_string();
        assert!(
            e.contains("[backup]") && e.contains("etcdctl snapshot save"),
            "{e}"
        );
    }

    #[test]
    fn limits_config_defaults_and_refusals_name_the_key() {
        let c = Config::from_toml_str("").expect("defaults");
        assert_eq!(c.limits, crate::limits::LimitsConfig::default());
        for (text, key) in [
            (
                "[limits]\nagent_messages_per_second = 1\n",
                "agent_messages_per_second",
            ),
            ("[limits]\nagent_message_burst = 0\n", "agent_message_burst"),
            (
                "[limits]\nagent_bytes_per_second = 10\n",
                "agent_bytes_per_second",
            ),
            ("[limits]\nagent_bytes_burst = 1024\n", "agent_bytes_burst"),
            ("[limits]\nagent_rate = 1\n", "agent_rate"),
        ] {
            let e = Config::from_toml_str(text).expect_err(key).to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
    }

    #[test]
    fn cordon_breaker_defaults_and_refusals_name_the_key() {
        let c = Config::from_toml_str("").expect("defaults");
        assert_eq!(c.cordon_breaker, crate::breaker::BreakerConfig::default());
        let c = Config::from_toml_str(
            "[cordon_breaker]\nmax_fraction = 0.25\nmax_nodes = 3\nwindow = \"30m\"\n",
        )
        .expect("valid");
        assert_eq!(c.cordon_breaker.max_fraction, 0.25);
        assert_eq!(c.cordon_breaker.max_nodes, 3);
        assert_eq!(c.cordon_breaker.window, Duration::from_secs(1800));
        assert_eq!(Config::default().changed_keys(&c), ["cordon_breaker"]);
        for (text, key) in [
            (
                "[cordon_breaker]\nmax_fraction = 0.0\n",
                "cordon_breaker.max_fraction",
            ),
            (
                "[cordon_breaker]\nmax_nodes = 0\n",
                "cordon_breaker.max_nodes",
            ),
            (
                "[cordon_breaker]\nwindow = \"0s\"\n",
                "cordon_breaker.window",
            ),
            ("[cordon_breaker]\nmax_percent = 10\n", "max_percent"),
        ] {
            let e = Config::from_toml_str(text).expect_err(key).to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
    }

    #[test]
    fn remediation_defaults_to_xid_48_and_refusals_name_the_key() {
        let c = Config::from_toml_str("").expect("defaults");
        assert_eq!(
            c.remediation,
            crate::remediation::RemediationConfig::default()
        );
        let c = Config::from_toml_str(
            "[remediation]\nanswer_timeout = \"2m\"\n[[remediation.rule]]\nxid = 79\nafter = 1\nladder = [\"reboot\", \"needs_repair\"]\n",
        )
        .expect("valid");
        assert_eq!(c.remediation.rule.len(), 1);
        assert_eq!(c.remediation.rule[0].xid, 79);
        assert_eq!(c.remediation.answer_timeout, Duration::from_secs(120));
        assert_eq!(Config::default().changed_keys(&c), ["remediation"]);
        for (text, key) in [
            (
                "[[remediation.rule]]\nxid = 48\nafter = 0\n",
                "remediation.rule[0] (xid 48): after",
            ),
            (
                "[remediation]\nanswer_timeout = \"0s\"\n",
                "remediation.answer_timeout",
            ),
            ("[remediation]\nenable = true\n", "enable"),
        ] {
            let e = Config::from_toml_str(text).expect_err(key).to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
    }
}
