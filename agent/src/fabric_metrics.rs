//! The fabric ports' counters and states, named and labelled as node_exporter's `infiniband`
//! and `netclass` collectors name theirs, so dashboards built on node_exporter apply as they
//! are (docs/metrics.md lists them).
//!
//! A collector, like `gpu_metrics`: each scrape encodes the latest heartbeat's read, so a
//! value sysfs did not give is not exported (never a fake zero) and a port that is no longer
//! watched disappears.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use vigil_proto::v1::{FabricKind, FabricPort};

type Read = fn(&FabricPort) -> Option<f64>;

/// One family: the name node_exporter gives it (without `_total`, which the OpenMetrics
/// encoder adds to a counter), its help, whether it is a counter, the reading.
struct Family {
    name: &'static str,
    help: &'static str,
    counter: bool,
    netdev: bool,
    read: Read,
}

fn count(v: Option<u64>) -> Option<f64> {
    v.map(|n| n as f64)
}

/// Mb/s to bytes per second, as node_exporter converts rates and speeds.
fn bytes_per_second(mbps: Option<u64>) -> Option<f64> {
    mbps.map(|m| m as f64 * 125_000.0)
}

/// The number sysfs writes before the state word (`4: ACTIVE`).
fn state_id(word: &str) -> Option<f64> {
    let id = match word {
        "DOWN" => 1,
        "INIT" => 2,
        "ARMED" => 3,
        "ACTIVE" => 4,
        "ACTIVE_DEFER" => 5,
        _ => return None,
    };
    Some(f64::from(id))
}

fn physical_state_id(word: &str) -> Option<f64> {
    let id = match word {
        "Sleep" => 1,
        "Polling" => 2,
        "Disabled" => 3,
        "PortConfigurationTraining" => 4,
        "LinkUp" => 5,
        "LinkErrorRecovery" => 6,
        "Phy Test" => 7,
        _ => return None,
    };
    Some(f64::from(id))
}

const FAMILIES: &[Family] = &[
    Family {
        name: "node_infiniband_link_downed",
        help: "Number of times the link failed to recover from an error state and went down",
        counter: true,
        netdev: false,
        read: |p| count(p.link_downed),
    },
    Family {
        name: "node_infiniband_link_error_recovery",
        help: "Number of times the link successfully recovered from an error state",
        counter: true,
        netdev: false,
        read: |p| count(p.link_error_recovery),
    },
    Family {
        name: "node_infiniband_symbol_error",
        help: "Number of minor link errors detected on one or more physical lanes",
        counter: true,
        netdev: false,
        read: |p| count(p.symbol_error),
    },
    Family {
        name: "node_infiniband_port_errors_received",
        help: "Number of packets containing an error that were received on this port",
        counter: true,
        netdev: false,
        read: |p| count(p.port_rcv_errors),
    },
    Family {
        name: "node_infiniband_port_transmit_discards",
        help: "Number of outbound packets discarded by the port because the port is down or congested",
        counter: true,
        netdev: false,
        read: |p| count(p.port_xmit_discards),
    },
    Family {
        name: "node_infiniband_state_id",
        help: "State of the InfiniBand port (0: no change, 1: down, 2: init, 3: armed, 4: active, 5: act defer)",
        counter: false,
        netdev: false,
        read: |p| state_id(&p.state),
    },
    Family {
        name: "node_infiniband_physical_state_id",
        help: "Physical state of the InfiniBand port (0: no change, 1: sleep, 2: polling, 3: disable, 4: shift, 5: link up, 6: link error recover, 7: phytest)",
        counter: false,
        netdev: false,
        read: |p| physical_state_id(&p.phys_state),
    },
    Family {
        name: "node_infiniband_rate_bytes_per_second",
        help: "Maximum signal transfer rate",
        counter: false,
        netdev: false,
        read: |p| bytes_per_second(p.rate_mbps),
    },
    Family {
        name: "node_network_carrier_changes",
        help: "Network device property: carrier_changes_total",
        counter: true,
        netdev: true,
        read: |p| count(p.carrier_changes),
    },
    Family {
        name: "node_network_up",
        help: "Value is 1 if operstate is 'up', 0 otherwise",
        counter: false,
        netdev: true,
        read: |p| (!p.state.is_empty()).then_some(if p.state == "up" { 1.0 } else { 0.0 }),
    },
    Family {
        name: "node_network_speed_bytes",
        help: "Network device property: speed_bytes",
        counter: false,
        netdev: true,
        read: |p| bytes_per_second(p.rate_mbps),
    },
];

/// The latest read of every watched port, encoded at each scrape.
#[derive(Debug, Default)]
pub struct FabricCollector {
    latest: Mutex<Vec<FabricPort>>,
}

impl FabricCollector {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the previous read.
    pub fn observe(&self, ports: &[FabricPort]) {
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = ports.to_vec();
    }
}

impl Collector for FabricCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        for family in FAMILIES {
            let values: Vec<(&FabricPort, f64)> = latest
                .iter()
                .filter(|p| (p.kind() == FabricKind::Netdev) == family.netdev)
                .filter_map(|p| Some((p, (family.read)(p)?)))
                .collect();
            if values.is_empty() {
                continue;
            }
            let kind = if family.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, kind)?;
            for (port, value) in values {
                let number = port.port.to_string();
                let mut labels = vec![("device", port.device.as_str())];
                if !family.netdev {
                    labels.push(("port", number.as_str()));
                }
                let encoder = metric.encode_family(&labels)?;
                if family.counter {
                    ConstCounter::new(value).encode(encoder)?;
                } else {
                    ConstGauge::new(value).encode(encoder)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn scrape(ports: &[FabricPort]) -> String {
        let collector = FabricCollector::new();
        collector.observe(ports);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        text
    }

    #[test]
    fn series_carry_node_exporters_names_and_labels() {
        let ib = FabricPort {
            kind: FabricKind::Infiniband.into(),
            device: "mlx5_0".into(),
            port: 1,
            state: "ACTIVE".into(),
            phys_state: "LinkUp".into(),
            rate_mbps: Some(400_000),
            link_downed: Some(3),
            ..FabricPort::default()
        };
        let eth = FabricPort {
            kind: FabricKind::Netdev.into(),
            device: "eth0".into(),
            state: "down".into(),
            carrier_changes: Some(4),
            ..FabricPort::default()
        };
        let text = scrape(&[ib, eth]);
        for line in [
            "node_infiniband_link_downed_total{device=\"mlx5_0\",port=\"1\"} 3",
            "node_infiniband_state_id{device=\"mlx5_0\",port=\"1\"} 4",
            "node_infiniband_physical_state_id{device=\"mlx5_0\",port=\"1\"} 5",
            "node_infiniband_rate_bytes_per_second{device=\"mlx5_0\",port=\"1\"} 50000000000",
            "node_network_carrier_changes_total{device=\"eth0\"} 4",
            "node_network_up{device=\"eth0\"} 0",
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
        assert!(
            !text.contains("node_infiniband_symbol_error"),
            "an absent counter is not exported: {text}"
        );
        assert!(!text.contains("node_network_speed_bytes"), "{text}");
    }

    #[test]
    fn a_host_without_fabric_exports_no_fabric_series() {
        assert!(!scrape(&[]).contains("node_"));
    }
}
