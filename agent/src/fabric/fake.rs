//! A fake sysfs tree, for tests and the simulator: `vigil-agent --sysfs-root DIR` reads it as
//! it would read `/sys`. Files are written whole, the way the kernel shows them
//! (`4: ACTIVE`, `400 Gb/sec (4X NDR)`), so the reader's parsing is exercised too.

use std::io;
use std::path::{Path, PathBuf};

/// A tree rooted at `root` (what `--sysfs-root` names): ports live under `root/sys/class`.
#[derive(Debug, Clone)]
pub struct FakeSysfs {
    root: PathBuf,
}

/// The counters an InfiniBand port has in the fake tree.
pub const IB_COUNTERS: [&str; 5] = [
    "link_downed",
    "link_error_recovery",
    "symbol_error",
    "port_rcv_errors",
    "port_xmit_discards",
];

impl FakeSysfs {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn ib_port(&self, device: &str, port: u32) -> PathBuf {
        self.root
            .join("sys/class/infiniband")
            .join(device)
            .join("ports")
            .join(port.to_string())
    }

    /// An InfiniBand port, ACTIVE and LinkUp at `gbps`, every counter 0.
    pub fn add_ib_port(&self, device: &str, port: u32, gbps: u32) -> io::Result<()> {
        let dir = self.ib_port(device, port);
        std::fs::create_dir_all(dir.join("counters"))?;
        self.set_ib_state(device, port, "4: ACTIVE", "5: LinkUp")?;
        std::fs::write(dir.join("rate"), format!("{gbps} Gb/sec (4X NDR)\n"))?;
        for counter in IB_COUNTERS {
            std::fs::write(dir.join("counters").join(counter), "0\n")?;
        }
        Ok(())
    }

    /// Write a port's `state` and `phys_state`, e.g. `("1: DOWN", "3: Disabled")`.
    pub fn set_ib_state(&self, device: &str, port: u32, state: &str, phys: &str) -> io::Result<()> {
        let dir = self.ib_port(device, port);
        write_atomic(&dir.join("state"), state)?;
        write_atomic(&dir.join("phys_state"), phys)
    }

    /// Add `by` to one of a port's counters (see [`IB_COUNTERS`]).
    pub fn bump_ib_counter(
        &self,
        device: &str,
        port: u32,
        counter: &str,
        by: u64,
    ) -> io::Result<()> {
        let path = self.ib_port(device, port).join("counters").join(counter);
        bump(&path, by)
    }

    /// A network interface, `up` at `mbps`; `roce`: its device also has an RDMA device (so
    /// the default `[fabric] devices` watch it).
    pub fn add_netdev(&self, name: &str, mbps: u32, roce: bool) -> io::Result<()> {
        let dir = self.root.join("sys/class/net").join(name);
        std::fs::create_dir_all(&dir)?;
        if roce {
            std::fs::create_dir_all(dir.join("device/infiniband"))?;
        }
        write_atomic(&dir.join("operstate"), "up")?;
        std::fs::write(dir.join("speed"), format!("{mbps}\n"))?;
        std::fs::write(dir.join("carrier_changes"), "0\n")
    }

    /// Write an interface's `operstate` (`up`, `down`).
    pub fn set_operstate(&self, name: &str, state: &str) -> io::Result<()> {
        write_atomic(
            &self.root.join("sys/class/net").join(name).join("operstate"),
            state,
        )
    }

    /// Add `by` to an interface's `carrier_changes`.
    pub fn bump_carrier_changes(&self, name: &str, by: u64) -> io::Result<()> {
        bump(
            &self
                .root
                .join("sys/class/net")
                .join(name)
                .join("carrier_changes"),
            by,
        )
    }
}

fn bump(path: &Path, by: u64) -> io::Result<()> {
    let now: u64 = std::fs::read_to_string(path)?.trim().parse().unwrap_or(0);
    write_atomic(path, &now.saturating_add(by).to_string())
}

/// Readers never see a half-written file.
fn write_atomic(path: &Path, line: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, format!("{line}\n"))?;
    std::fs::rename(tmp, path)
}
