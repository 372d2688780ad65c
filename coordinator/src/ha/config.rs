//! `[ha]`: several coordinators on etcd, one leading. Absent: one coordinator on SQLite.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

pub const DEFAULT_PREFIX: &str = "/vigil";
/// etcd's leader lease: a dead leader is replaced this long after its last keepalive.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How much sooner than etcd this coordinator considers its own lease gone.
pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_secs(1);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
pub const MAX_ENDPOINTS: usize = 9;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// This coordinator's name among its peers; unique. Default: the hostname.
    #[serde(default = "default_name")]
    pub name: String,
    /// The gRPC URL agents and clusterctl reach this coordinator at (what a standby
    /// sends them to when this one leads): `https://coord-1.example:7770`.
    pub advertise_url: String,
    /// etcd client URLs, every member: `["https://etcd-1:2379", ...]`.
    pub etcd_endpoints: Vec<String>,
    /// Every key vigil writes starts with this prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "default_margin", with = "humantime_serde")]
    pub safety_margin: Duration,
    /// How long one etcd request may take before it is retried (elsewhere).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TLS to etcd (its client port): the CA of etcd's certificates and this
    /// coordinator's client certificate and key. Required for https:// endpoints.
    pub etcd_tls: Option<EtcdTls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_name() -> String {
    gethostname()
}
fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}
fn default_lease_ttl() -> Duration {
    DEFAULT_LEASE_TTL
}
fn default_keepalive() -> Duration {
    DEFAULT_KEEPALIVE_INTERVAL
}
fn default_margin() -> Duration {
    DEFAULT_SAFETY_MARGIN
}
fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}

fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "coordinator".to_owned())
}

impl HaConfig {
    /// `agent_lease`: the agents' lease, which a failover must fit inside.
    pub fn validate(&self, agent_lease: Duration) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        // The node-name rule: the name is an etcd key's last part and shown beside node names.
        if let Err(problem) = vigil_proto::check_node_name(&self.name) {
            return bad(format!(
                "ha.name {:?} {problem}; use {}, unique among the coordinators",
                self.name,
                vigil_proto::NODE_NAME_RULE
            ));
        }
        if !(self.advertise_url.starts_with("http://")
            || self.advertise_url.starts_with("https://"))
        {
            return bad(format!(
                "ha.advertise_url {:?} is not a gRPC URL; set the http(s)://host:port agents and \
                 clusterctl reach this coordinator at",
                self.advertise_url
            ));
        }
        if self.etcd_endpoints.is_empty() || self.etcd_endpoints.len() > MAX_ENDPOINTS {
            return bad(format!(
                "ha.etcd_endpoints lists {} endpoints; list every etcd member's client URL \
                 (1 to {MAX_ENDPOINTS}; 3 or 5 in production)",
                self.etcd_endpoints.len()
            ));
        }
        for e in &self.etcd_endpoints {
            let https = e.starts_with("https://");
            if !(https || e.starts_with("http://")) {
                return bad(format!(
                    "ha.etcd_endpoints: {e:?} is not a URL; write http://host:2379 or https://host:2379"
                ));
            }
            if https && self.etcd_tls.is_none() {
                return bad(format!(
                    "ha.etcd_endpoints: {e:?} is https but [ha.etcd_tls] is missing; add ca, cert \
                     and key for etcd's client port"
                ));
            }
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 || self.prefix.ends_with('/') {
            return bad(format!(
                "ha.prefix {:?} must start with '/' and not end with one, e.g. \"/vigil\"",
                self.prefix
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(60) {
            return bad(format!(
                "ha.lease_ttl = {} is out of range; use 2s to 60s (5s is usual)",
                fmt(self.lease_ttl)
            ));
        }
        if self.keepalive_interval.is_zero() || self.keepalive_interval * 3 > self.lease_ttl {
            return bad(format!(
                "ha.keepalive_interval ({}) must be at most a third of ha.lease_ttl ({}): two \
                 lost keepalives must not cost the leadership",
                fmt(self.keepalive_interval),
                fmt(self.lease_ttl)
            ));
        }
        if self.safety_margin < self.keepalive_interval || self.safety_margin * 2 > self.lease_ttl {
            return bad(format!(
                "ha.safety_margin ({}) must lie between ha.keepalive_interval ({}) and half of \
                 ha.lease_ttl ({})",
                fmt(self.safety_margin),
                fmt(self.keepalive_interval),
                fmt(self.lease_ttl)
            ));
        }
        // Failover = the old lease running out + an election + agents re-registering; it
        // must end before the agents' own lease does, or every job stops.
        if self.lease_ttl + Duration::from_secs(2) > agent_lease {
            return bad(format!(
                "ha.lease_ttl ({}) leaves no time for a failover inside liveness.agent_lease ({}): \
                 agents stop their workers before a new leader can reach them; make \
                 liveness.agent_lease at least ha.lease_ttl + 2s (and liveness.lost_after longer \
                 still), or shorten ha.lease_ttl (docs/ha.md)",
                fmt(self.lease_ttl),
                fmt(agent_lease)
            ));
        }
        if self.request_timeout.is_zero() || self.request_timeout > self.lease_ttl {
            return bad(format!(
                "ha.request_timeout ({}) must be above zero and at most ha.lease_ttl ({})",
                fmt(self.request_timeout),
                fmt(self.lease_ttl)
            ));
        }
        Ok(())
    }

    pub fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    pub fn coordinators_prefix(&self) -> String {
        format!("{}/coordinators/", self.prefix)
    }

    pub fn state_prefix(&self) -> String {
        format!("{}/state/", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ha() -> HaConfig {
        toml::from_str(
            "name = \"c1\"\nadvertise_url = \"http://127.0.0.1:7770\"\n\
             etcd_endpoints = [\"http://127.0.0.1:2379\"]\n",
        )
        .expect("parses")
    }

    const LEASE: Duration = Duration::from_secs(8);

    #[test]
    fn defaults_are_valid_and_fit_the_agent_lease() {
        let h = ha();
        assert_eq!(h.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(h.prefix, "/vigil");
        h.validate(LEASE).expect("valid");
        assert_eq!(h.leader_key(), "/vigil/leader");
        assert_eq!(h.state_prefix(), "/vigil/state/");
    }

    #[test]
    fn each_bad_value_names_its_key() {
        type Change = Box<dyn Fn(&mut HaConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|h| h.name = "a b".into()), "ha.name"),
            (Box::new(|h| h.name = "-c1".into()), "ha.name"),
            (
                Box::new(|h| h.advertise_url = "c1:7770".into()),
                "ha.advertise_url",
            ),
            (Box::new(|h| h.etcd_endpoints.clear()), "ha.etcd_endpoints"),
            (
                Box::new(|h| h.etcd_endpoints = vec!["etcd:2379".into()]),
                "not a URL",
            ),
            (
                Box::new(|h| h.etcd_endpoints = vec!["https://e:2379".into()]),
                "[ha.etcd_tls] is missing",
            ),
            (Box::new(|h| h.prefix = "vigil".into()), "ha.prefix"),
            (
                Box::new(|h| h.lease_ttl = Duration::from_secs(1)),
                "ha.lease_ttl",
            ),
            (
                Box::new(|h| h.keepalive_interval = Duration::from_secs(2)),
                "ha.keepalive_interval",
            ),
            (
                Box::new(|h| h.lease_ttl = Duration::from_secs(7)),
                "no time for a failover",
            ),
        ];
        for (change, expect) in cases {
            let mut h = ha();
            change(&mut h);
            let err = h.validate(LEASE).expect_err(expect).to_string();
            assert!(err.contains(expect), "{err}");
        }
    }
}
