//! How to read a `FabricPort`: whether it is up, and its name as people write it. The
//! coordinator's fabric policy and the agent's hang evidence both use these.

use crate::v1::{FabricKind, FabricPort};

/// Whether a port is up: an InfiniBand port `ACTIVE` (and `LinkUp` where the physical state
/// was read), a netdev `up`.
pub fn is_up(p: &FabricPort) -> bool {
    if p.kind() == FabricKind::Netdev {
        return p.state == "up";
    }
    p.state == "ACTIVE" && (p.phys_state.is_empty() || p.phys_state == "LinkUp")
}

/// `mlx5_0/1` for an InfiniBand port, `eth0` for an interface.
pub fn port_name(p: &FabricPort) -> String {
    if p.kind() == FabricKind::Netdev {
        p.device.clone()
    } else {
        format!("{}/{}", p.device, p.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_means_active_and_link_up_or_an_interface_up() {
        let ib = |state: &str, phys: &str| FabricPort {
            kind: FabricKind::Infiniband.into(),
            device: "mlx5_0".into(),
            port: 1,
            state: state.into(),
            phys_state: phys.into(),
            ..FabricPort::default()
        };
        assert!(is_up(&ib("ACTIVE", "LinkUp")));
        assert!(is_up(&ib("ACTIVE", "")));
        assert!(!is_up(&ib("ACTIVE", "Polling")));
        assert!(!is_up(&ib("DOWN", "Disabled")));
        assert_eq!(port_name(&ib("ACTIVE", "")), "mlx5_0/1");
        let eth = FabricPort {
            kind: FabricKind::Netdev.into(),
            device: "eth0".into(),
            state: "up".into(),
            ..FabricPort::default()
        };
        assert!(is_up(&eth));
        assert_eq!(port_name(&eth), "eth0");
    }
}
