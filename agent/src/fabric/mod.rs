//! The fabric: this host's InfiniBand/RoCE ports and network interfaces, read from sysfs at
//! every heartbeat (docs/fabric.md).
//!
//! Bounded and tolerant: at most [`MAX_PORTS`] ports, each file read up to [`MAX_FILE_BYTES`];
//! a missing or unreadable file is an absent value, never an error (the coordinator's policy
//! treats absent as "not known", never as a fault).
//!
//! Layout: this file (the `[fabric]` config, which ports are watched, the read); `parse` (one
//! sysfs file's text to a value); `check` (`vigil-agent --check-fabric`); `fake` (a fake sysfs
//! tree for tests and the simulator).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vigil_proto::v1::{FabricKind, FabricPort};

pub mod check;
pub mod fake;
mod parse;

pub use parse::glob_match;

/// The coordinator refuses more (`limits::MAX_FABRIC_PORTS`); a host has a handful.
pub const MAX_PORTS: usize = 64;
/// Every sysfs file read here is one short line.
pub const MAX_FILE_BYTES: u64 = 256;
/// Device and interface names considered, per class directory: a bound on a strange tree.
const MAX_ENTRIES: usize = 256;

/// `[fabric]`: which devices the agent watches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FabricSection {
    /// Globs (`*`, `?`) over InfiniBand device names (`mlx5_*`), InfiniBand ports
    /// (`mlx5_0/1`) and network interface names (`eth*`). Empty (the default): every
    /// InfiniBand port and every RoCE-capable interface (one whose device has an
    /// `infiniband` directory); none on a host that has none.
    pub devices: Vec<String>,
}

impl FabricSection {
    /// A glob that can match nothing useful is a mistake: name it.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        self.devices.iter().find_map(|g| {
            let bad = g.trim().is_empty() || g.contains(char::is_whitespace) || g.len() > 128;
            bad.then(|| {
                (
                    "fabric.devices",
                    format!("{g:?} is not a device glob (1-128 characters, no spaces)"),
                )
            })
        })
    }
}

/// Reads the watched ports under a sysfs root (`/` on a real host; a fake tree in tests).
#[derive(Debug, Clone)]
pub struct FabricReader {
    root: PathBuf,
    devices: Vec<String>,
}

impl FabricReader {
    pub fn new(sysfs_root: &Path, section: &FabricSection) -> Self {
        Self {
            root: sysfs_root.to_owned(),
            devices: section.devices.clone(),
        }
    }

    /// The sysfs root this reader reads under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether devices were named in the config (then the fabric is watched even when
    /// every named device is gone).
    pub fn configured(&self) -> bool {
        !self.devices.is_empty()
    }

    /// Every watched port, InfiniBand first, in name order; at most [`MAX_PORTS`].
    pub fn read(&self) -> Vec<FabricPort> {
        let mut ports = Vec::new();
        let ib = self.root.join("sys/class/infiniband");
        for device in entries(&ib) {
            for port in entries(&ib.join(&device).join("ports")) {
                let Ok(number) = port.parse::<u32>() else {
                    continue;
                };
                if self.wants_ib(&device, number) {
                    ports.push(read_ib(
                        &ib.join(&device).join("ports").join(&port),
                        &device,
                        number,
                    ));
                }
            }
        }
        let net = self.root.join("sys/class/net");
        for iface in entries(&net) {
            if self.wants_netdev(&net, &iface) {
                ports.push(read_netdev(&net.join(&iface), &iface));
            }
        }
        ports.truncate(MAX_PORTS);
        ports
    }

    /// [`Self::read`] off the async workers (sysfs reads can block on a wedged driver too),
    /// within `limit`. `None` when it failed or took longer: no data, which is no evidence
    /// either way, never a fault.
    pub async fn read_bounded(&self, limit: std::time::Duration) -> Option<Vec<FabricPort>> {
        let reader = self.clone();
        let read = tokio::task::spawn_blocking(move || reader.read());
        match tokio::time::timeout(limit, read).await {
            Ok(Ok(ports)) => Some(ports),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "fabric read failed; heartbeat carries no fabric data");
                None
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = limit.as_millis() as u64,
                    "fabric read took too long; heartbeat carries no fabric data"
                );
                None
            }
        }
    }

    fn wants_ib(&self, device: &str, port: u32) -> bool {
        if self.devices.is_empty() {
            return true;
        }
        let with_port = format!("{device}/{port}");
        self.devices
            .iter()
            .any(|g| glob_match(g, device) || glob_match(g, &with_port))
    }

    fn wants_netdev(&self, net: &Path, iface: &str) -> bool {
        if self.devices.is_empty() {
            // RoCE-capable: the interface's PCI device also has an RDMA device.
            return net.join(iface).join("device/infiniband").is_dir();
        }
        self.devices.iter().any(|g| glob_match(g, iface))
    }
}

/// The names in `dir`, sorted; none when it is missing or unreadable.
fn entries(dir: &Path) -> Vec<String> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = read
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .take(MAX_ENTRIES)
        .collect();
    names.sort();
    names
}

/// One sysfs file's first line, trimmed; `None` when missing, unreadable or not UTF-8.
fn read_line(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES).read_to_string(&mut text).ok()?;
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}

fn read_u64(path: &Path) -> Option<u64> {
    read_line(path)?.parse().ok()
}

fn read_ib(dir: &Path, device: &str, port: u32) -> FabricPort {
    let counter = |name: &str| read_u64(&dir.join("counters").join(name));
    FabricPort {
        kind: FabricKind::Infiniband.into(),
        device: device.to_owned(),
        port,
        state: read_line(&dir.join("state"))
            .map(|s| parse::state_word(&s))
            .unwrap_or_default(),
        phys_state: read_line(&dir.join("phys_state"))
            .map(|s| parse::state_word(&s))
            .unwrap_or_default(),
        rate_mbps: read_line(&dir.join("rate")).and_then(|s| parse::ib_rate_mbps(&s)),
        link_downed: counter("link_downed"),
        link_error_recovery: counter("link_error_recovery"),
        symbol_error: counter("symbol_error"),
        port_rcv_errors: counter("port_rcv_errors"),
        port_xmit_discards: counter("port_xmit_discards"),
        carrier_changes: None,
    }
}

fn read_netdev(dir: &Path, iface: &str) -> FabricPort {
    FabricPort {
        kind: FabricKind::Netdev.into(),
        device: iface.to_owned(),
        port: 0,
        state: read_line(&dir.join("operstate")).unwrap_or_default(),
        // -1 (or an error) while the link is down: no speed known.
        rate_mbps: read_line(&dir.join("speed")).and_then(|s| s.parse::<u64>().ok()),
        carrier_changes: read_u64(&dir.join("carrier_changes")),
        ..FabricPort::default()
    }
}

#[cfg(test)]
mod tests;
