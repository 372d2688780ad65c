//! Coordinator configuration: TOML file, overridden by flags, with named defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:7770";
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9770";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/vigil";
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_UNREACHABLE_AFTER: Duration = Duration::from_secs(3);
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(10);
pub const DEFAULT_AGENT_LEASE: Duration = Duration::from_secs(8);

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
    /// Where the sled state store lives.
    pub data_dir: PathBuf,
    pub liveness: LivenessConfig,
}

/// How silence from an agent turns into node availability.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// Handed to each agent at registration: how often it heartbeats.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Silence after which a node is `Unreachable`.
    #[serde(with = "humantime_serde")]
    pub unreachable_after: Duration,
    /// Silence after which a node is `Lost` and its work is restarted elsewhere.
    #[serde(with = "humantime_serde")]
    pub lost_after: Duration,
    /// Handed to each agent: silence from the coordinator after which the agent
    /// stops its workers itself. Always shorter than `lost_after`, so that work
    /// taken from a lost node is surely stopped before it runs anywhere else.
    #[serde(with = "humantime_serde")]
    pub agent_lease: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: parse_default(DEFAULT_LISTEN),
            metrics_listen: parse_default(DEFAULT_METRICS_LISTEN),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            liveness: LivenessConfig::default(),
        }
    }
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            unreachable_after: DEFAULT_UNREACHABLE_AFTER,
            lost_after: DEFAULT_LOST_AFTER,
            agent_lease: DEFAULT_AGENT_LEASE,
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

    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "data_dir is empty; set it to a directory such as /var/lib/vigil".into(),
            ));
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
    fn bad_address_names_the_key() {
        let err = Config::from_toml_str("listen = \"nowhere\"").expect_err("bad addr");
        assert!(err.to_string().contains("listen"), "{err}");
    }
}
