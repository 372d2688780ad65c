//! The fabric-health policy, pure: the InfiniBand/RoCE ports and network interfaces a node
//! registered, then each heartbeat's read of them -> findings (docs/fabric.md).
//!
//! - A port that was up when the node registered is *required*: down (or not `LinkUp`), or
//!   gone from a heartbeat that read the fabric, is Unhealthy (the node is cordoned, and a job
//!   on it fails with the node as its culprit, as for a fatal XID).
//! - Flaps (rises of `link_downed`, `link_error_recovery`, `carrier_changes`) of a required port
//!   within `flap_window`: Degraded from `flaps_degraded`, Unhealthy from `flaps_unhealthy`.
//! - A required port below its registered rate: Degraded.
//!
//! A port down at registration is not required (an unused port must not cordon its node),
//! unless the node's previous registration had it up (the record keeps those ports): then it is
//! a fault, once ([`down_since_last_registration`]). No fabric data at all (an agent that
//! predates it, a host without fabric) is no evidence.
//! Times are milliseconds on the monotonic clock (`Now::mono_ms`); findings carry the agent's
//! wall time of the heartbeat, for the fault-to-cordon latency only.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vigil_proto::v1::{FabricKind, FabricPort};

use crate::config::FabricHealthConfig;
use crate::counter_window::CounterWindow;
use crate::health::{Condition, Finding};

/// A required port: what it was when the node registered. The node's record keeps the ports
/// of its last registration (`NodeRecord::fabric_ports`), so one found down at the next
/// registration is a fault even across an agent restart or a reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequiredPort {
    pub key: PortKey,
    pub state: String,
    #[serde(default)]
    pub rate_mbps: Option<u64>,
}

/// Which port: `mlx5_0/1` (InfiniBand) or `eth0` (netdev).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortKey {
    pub netdev: bool,
    pub device: String,
    pub port: u32,
}

impl PortKey {
    /// Whether `p` is this port (without building its key).
    pub fn matches(&self, p: &FabricPort) -> bool {
        self.netdev == (p.kind() == FabricKind::Netdev)
            && self.port == p.port
            && self.device == p.device
    }

    pub fn of(p: &FabricPort) -> Self {
        Self {
            netdev: p.kind() == FabricKind::Netdev,
            device: p.device.clone(),
            port: p.port,
        }
    }
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.netdev {
            write!(f, "interface {}", self.device)
        } else {
            write!(f, "port {}/{}", self.device, self.port)
        }
    }
}

/// What the policy remembers of one node's fabric.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FabricHealth {
    /// The ports up at registration, in key order. Shared: it changes only at a registration,
    /// and nodes are cloned for every snapshot.
    pub required: Arc<Vec<RequiredPort>>,
    /// From the latest heartbeat; replaced by every heartbeat that carries fabric data.
    pub findings: Vec<Finding>,
    /// The flaps of `required[i]`, once a read of it was seen.
    flaps: Vec<Option<CounterWindow>>,
}

pub use vigil_proto::fabric_port::is_up;

/// `400 Gb/sec`, `2.5 Gb/sec`: the way sysfs writes an InfiniBand rate.
pub fn rate_text(mbps: u64) -> String {
    if mbps.is_multiple_of(1000) {
        format!("{} Gb/sec", mbps / 1000)
    } else {
        format!("{} Gb/sec", mbps as f64 / 1000.0)
    }
}

/// The flap counters of a port, summed (absent counters count nothing).
fn flap_total(p: &FabricPort) -> u64 {
    [p.link_downed, p.link_error_recovery, p.carrier_changes]
        .into_iter()
        .flatten()
        .fold(0, u64::saturating_add)
}

/// The ports of a read that are up, in key order: the ones a registration requires.
pub fn up_ports(ports: &[FabricPort]) -> Vec<RequiredPort> {
    let mut required: Vec<RequiredPort> = ports
        .iter()
        .filter(|p| is_up(p))
        .map(|p| RequiredPort {
            key: PortKey::of(p),
            state: p.state.clone(),
            rate_mbps: p.rate_mbps,
        })
        .collect();
    required.sort_by(|a, b| a.key.cmp(&b.key));
    required.dedup_by(|a, b| a.key == b.key);
    required
}

/// At a registration that read the fabric: the ports the node's previous registration had up
/// that this read shows down (present, not up), each with the finding's message. A port
/// missing from the read is not judged here (its device may have left `[fabric] devices`); a
/// registration without fabric data judges nothing (an older agent, or a failed read).
pub fn down_since_last_registration(
    remembered: &[RequiredPort],
    ports: &[FabricPort],
) -> Vec<String> {
    remembered
        .iter()
        .filter_map(|req| {
            let p = ports.iter().find(|p| req.key.matches(p))?;
            (!is_up(p)).then(|| {
                format!(
                    "{} is {} at registration ({} when the node last registered)",
                    req.key,
                    state_now(p),
                    was(req)
                )
            })
        })
        .collect()
}

/// `was ACTIVE, 400 Gb/sec`: a required port as it was registered.
fn was(req: &RequiredPort) -> String {
    match req.rate_mbps {
        Some(r) => format!("was {}, {}", req.state, rate_text(r)),
        None => format!("was {}", req.state),
    }
}

/// A port's state as a finding names it: its `state`, or its physical state where the logical
/// one still says ACTIVE.
fn state_now(p: &FabricPort) -> &str {
    match p.state.as_str() {
        "" => "unreadable",
        "ACTIVE" if !p.phys_state.is_empty() => &p.phys_state,
        state => state,
    }
}

impl FabricHealth {
    /// A registration: the ports up now are the required ones, their counters the baseline.
    pub fn register(&mut self, ports: &[FabricPort], now_ms: u64, cfg: &FabricHealthConfig) {
        let required = up_ports(ports);
        self.flaps = vec![None; required.len()];
        self.required = Arc::new(required);
        self.findings.clear();
        self.observe_flaps(ports, now_ms, window_ms(cfg));
    }

    /// The operator says the node is fixed: flaps seen so far no longer count.
    pub fn forget_flaps(&mut self) {
        self.flaps
            .iter_mut()
            .flatten()
            .for_each(CounterWindow::forget);
    }

    /// Judge one heartbeat's read. `read`: the agent reads the fabric (so an empty `ports`
    /// means every port is gone); `false` with no ports is no evidence either way.
    pub fn judge(
        &mut self,
        ports: &[FabricPort],
        read: bool,
        observed_at_ms: u64,
        now_ms: u64,
        cfg: &FabricHealthConfig,
    ) {
        if ports.is_empty() && !read {
            self.findings.clear();
            return;
        }
        self.observe_flaps(ports, now_ms, window_ms(cfg));
        let mut out = Vec::new();
        for (req, flaps) in self.required.iter().zip(&self.flaps) {
            let mut add = |condition, rule, message: String| {
                out.push(Finding {
                    condition,
                    rule,
                    gpu: None,
                    message,
                    observed_at_ms,
                });
            };
            let was = was(req);
            let Some(p) = ports.iter().find(|p| req.key.matches(p)) else {
                add(
                    Condition::Unhealthy,
                    "fabric_port_down",
                    format!("{} is missing ({was})", req.key),
                );
                continue;
            };
            if !is_up(p) {
                let now = state_now(p);
                add(
                    Condition::Unhealthy,
                    "fabric_port_down",
                    format!("{} is {now} ({was})", req.key),
                );
                continue;
            }
            if let Some(rise) = flaps.as_ref().map(CounterWindow::rise) {
                let over = |limit: u64| limit > 0 && rise >= limit;
                let condition = if over(cfg.flaps_unhealthy) {
                    Some(Condition::Unhealthy)
                } else if over(cfg.flaps_degraded) {
                    Some(Condition::Degraded)
                } else {
                    None
                };
                if let Some(condition) = condition {
                    add(
                        condition,
                        "fabric_flap",
                        format!(
                            "{} flapped {rise} times within {} (link down, error recovery or carrier change)",
                            req.key,
                            humantime::format_duration(cfg.flap_window)
                        ),
                    );
                }
            }
            let slower = match (p.rate_mbps, req.rate_mbps) {
                (Some(now), Some(registered)) if cfg.rate_below_registered && now < registered => {
                    Some((now, registered))
                }
                _ => None,
            };
            if let Some((now, registered)) = slower {
                add(
                    Condition::Degraded,
                    "fabric_rate",
                    format!(
                        "{} at {}, below its registered {}",
                        req.key,
                        rate_text(now),
                        rate_text(registered)
                    ),
                );
            }
        }
        self.findings = out;
    }

    fn observe_flaps(&mut self, ports: &[FabricPort], now_ms: u64, window_ms: u64) {
        for (req, flaps) in self.required.iter().zip(self.flaps.iter_mut()) {
            let Some(p) = ports.iter().find(|p| req.key.matches(p)) else {
                continue;
            };
            let total = flap_total(p);
            match flaps {
                Some(w) => w.observe(total, now_ms, window_ms),
                None => *flaps = Some(CounterWindow::new(total, now_ms)),
            }
        }
    }
}

fn window_ms(cfg: &FabricHealthConfig) -> u64 {
    crate::counter_window::millis(cfg.flap_window)
}

#[cfg(test)]
#[path = "fabric_tests.rs"]
mod tests;
