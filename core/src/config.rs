//! The settings decisions read: liveness and the GPU-health policy, with their named defaults.
//! The coordinator's `Config` embeds them (its TOML sections `[liveness]` and `[health]`), next
//! to the settings that only the shell reads (listen addresses, TLS, HA, the store).

use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_UNREACHABLE_AFTER: Duration = Duration::from_secs(3);
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(10);
pub const DEFAULT_AGENT_LEASE: Duration = Duration::from_secs(8);

/// The GPU-health policy's thresholds; XID classes default to NVIDIA's catalog.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// GPU temperature (°C) at or above which a GPU is Degraded.
    pub temperature_max_c: f32,
    /// Also mark a GPU Degraded when its PCIe generation is below its max.
    /// Off by default: GPUs lower their link generation when idle to save power.
    pub pcie_gen_below_max: bool,
    /// How far back repeated XIDs count.
    #[serde(with = "humantime_serde")]
    pub recurrence_window: Duration,
    /// A warning-class XID (63, 92, 94, ...) seen this often on one GPU within
    /// the window cordons the node.
    pub degrade_recurrence: u32,
    /// An application-class XID (13, 31, 43, 45, 68) seen this often on one GPU
    /// within the window cordons the node: the GPU, not the job, is suspect.
    pub application_recurrence: u32,
    /// Per-XID class overrides: `"13" = "fatal"`; classes are `fatal`,
    /// `degrade`, `application`, `ignore`.
    pub xid: std::collections::BTreeMap<String, crate::xid::XidClass>,
    /// `[health.fabric]`: the InfiniBand/RoCE ports' and network interfaces' rules.
    pub fabric: FabricHealthConfig,
    /// `[health.rates]`: the GPU error counters' rate rules (PCIe replays, NVLink errors).
    pub rates: RateConfig,
}

/// Rate rules on GPU error counters that only ever grow: how much one rose within `window`.
/// A threshold of 0 turns its rule off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// PCIe replays of one GPU within the window that make the node Degraded.
    pub pcie_replays_degraded: u64,
    /// ... Unhealthy.
    pub pcie_replays_unhealthy: u64,
    /// NVLink CRC, replay and recovery errors of one GPU (all links) within the window that
    /// make the node Degraded.
    pub nvlink_errors_degraded: u64,
    /// ... Unhealthy.
    pub nvlink_errors_unhealthy: u64,
}

pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(600);
pub const DEFAULT_PCIE_REPLAYS_DEGRADED: u64 = 100;
pub const DEFAULT_NVLINK_ERRORS_DEGRADED: u64 = 100;

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_RATE_WINDOW,
            pcie_replays_degraded: DEFAULT_PCIE_REPLAYS_DEGRADED,
            pcie_replays_unhealthy: 0,
            nvlink_errors_degraded: DEFAULT_NVLINK_ERRORS_DEGRADED,
            nvlink_errors_unhealthy: 0,
        }
    }
}

impl RateConfig {
    /// What is wrong with these settings, naming the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        window_set("health.rates.window", self.window, "10m")?;
        in_order(
            "health.rates.pcie_replays",
            self.pcie_replays_degraded,
            self.pcie_replays_unhealthy,
        )?;
        in_order(
            "health.rates.nvlink_errors",
            self.nvlink_errors_degraded,
            self.nvlink_errors_unhealthy,
        )
    }
}

/// A rule's window must be longer than zero.
fn window_set(key: &str, window: Duration, example: &str) -> Result<(), String> {
    if window.is_zero() {
        return Err(format!(
            "{key} must be longer than zero; use e.g. \"{example}\""
        ));
    }
    Ok(())
}

/// `{prefix}_unhealthy` may not be below `{prefix}_degraded` where both are set (0: off).
fn in_order(prefix: &str, degraded: u64, unhealthy: u64) -> Result<(), String> {
    if degraded > 0 && unhealthy > 0 && unhealthy < degraded {
        return Err(format!(
            "{prefix}_unhealthy ({unhealthy}) is below {prefix}_degraded ({degraded}); make it \
             at least as large, or 0 to turn that rule off"
        ));
    }
    Ok(())
}

/// The fabric rules' thresholds (docs/fabric.md). A "flap" is one rise of a port's
/// `link_downed`, `link_error_recovery` or `carrier_changes` counter.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FabricHealthConfig {
    /// How far back flaps count.
    #[serde(with = "humantime_serde")]
    pub flap_window: Duration,
    /// Flaps of one port within the window that make the node Degraded; 0: never.
    pub flaps_degraded: u64,
    /// Flaps of one port within the window that make the node Unhealthy (cordoned); 0: never.
    pub flaps_unhealthy: u64,
    /// A port running below the rate it had when the node registered makes the node Degraded.
    pub rate_below_registered: bool,
}

pub const DEFAULT_FABRIC_FLAP_WINDOW: Duration = Duration::from_secs(3600);
pub const DEFAULT_FABRIC_FLAPS_DEGRADED: u64 = 1;
pub const DEFAULT_FABRIC_FLAPS_UNHEALTHY: u64 = 5;

impl Default for FabricHealthConfig {
    fn default() -> Self {
        Self {
            flap_window: DEFAULT_FABRIC_FLAP_WINDOW,
            flaps_degraded: DEFAULT_FABRIC_FLAPS_DEGRADED,
            flaps_unhealthy: DEFAULT_FABRIC_FLAPS_UNHEALTHY,
            rate_below_registered: true,
        }
    }
}

impl FabricHealthConfig {
    /// What is wrong with these settings, naming the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        window_set("health.fabric.flap_window", self.flap_window, "1h")?;
        in_order(
            "health.fabric.flaps",
            self.flaps_degraded,
            self.flaps_unhealthy,
        )
    }
}

pub const DEFAULT_TEMPERATURE_MAX_C: f32 = 90.0;
pub const DEFAULT_RECURRENCE_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            temperature_max_c: DEFAULT_TEMPERATURE_MAX_C,
            pcie_gen_below_max: false,
            recurrence_window: DEFAULT_RECURRENCE_WINDOW,
            degrade_recurrence: 2,
            application_recurrence: 3,
            xid: std::collections::BTreeMap::new(),
            fabric: FabricHealthConfig::default(),
            rates: RateConfig::default(),
        }
    }
}

impl HealthConfig {
    /// The class of `xid`: an override, else the catalog's default, else
    /// (an XID NVIDIA does not list) Degrade.
    pub fn xid_class(&self, xid: u32) -> crate::xid::XidClass {
        self.xid
            .get(&xid.to_string())
            .copied()
            .or_else(|| crate::xid::catalog().get(&xid).map(|i| i.class))
            .unwrap_or(crate::xid::XidClass::Degrade)
    }
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
