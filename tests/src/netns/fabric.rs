//! A second, "fabric" network for the cluster's hosts: a bridge `br1` in the hub and a veth per
//! host (`fab0` at `10.78.0.<10+i>`), used only by job traffic (a preflight's all-reduce), so a
//! host's fabric link can fail while its agent stays connected over the management network.
//! Everything lives in the cluster's own namespaces and goes with them on drop.

use anyhow::Result;

use super::{NetCluster, ip};

/// The fabric subnet; a host's fabric address is its management address with this prefix.
pub const FABRIC_SUBNET: &str = "10.78.0";

impl NetCluster {
    /// Give every host a fabric link on a bridge of its own.
    pub fn add_fabric(&self) -> Result<()> {
        ip(&["-n", &self.hub, "link", "add", "br1", "type", "bridge"])?;
        ip(&["-n", &self.hub, "link", "set", "br1", "up"])?;
        for (i, host) in self.hosts.iter().enumerate() {
            let hub_if = format!("f{i}");
            ip(&[
                "-n", &self.hub, "link", "add", &hub_if, "type", "veth", "peer", "name", "fab0",
                "netns", &host.ns,
            ])?;
            ip(&["-n", &self.hub, "link", "set", &hub_if, "master", "br1"])?;
            ip(&["-n", &self.hub, "link", "set", &hub_if, "up"])?;
            let addr = format!("{FABRIC_SUBNET}.{}/24", 10 + i);
            ip(&["-n", &host.ns, "addr", "add", &addr, "dev", "fab0"])?;
            ip(&["-n", &host.ns, "link", "set", "fab0", "up"])?;
        }
        Ok(())
    }

    /// Host `name`'s fabric link goes down at the switch (its bridge port): it can no longer
    /// reach any other host's fabric address, its management link is untouched.
    pub fn fabric_down(&self, name: &str) -> Result<()> {
        let i = self.hosts.iter().position(|h| h.name == name);
        let i = i.ok_or_else(|| anyhow::anyhow!("no host {name}"))?;
        ip(&["-n", &self.hub, "link", "set", &format!("f{i}"), "down"])?;
        Ok(())
    }
}
