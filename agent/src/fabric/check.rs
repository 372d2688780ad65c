//! `vigil-agent --check-fabric`: one read of the watched fabric ports, shown field by field.

use serde_json::{Value, json};
use vigil_proto::v1::{FabricKind, FabricPort};

use super::FabricReader;

fn or_absent<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "absent".to_owned(), |v| v.to_string())
}

fn word(s: &str) -> &str {
    if s.is_empty() { "absent" } else { s }
}

/// The report as text: a header naming the root and the selection, then one block per port.
pub fn render_text(reader: &FabricReader, ports: &[FabricPort]) -> String {
    let mut out = format!(
        "fabric under {} ({}): {} port(s)\n",
        reader.root().display(),
        if reader.configured() {
            "[fabric] devices"
        } else {
            "every InfiniBand port and RoCE-capable interface"
        },
        ports.len()
    );
    for p in ports {
        if p.kind() == FabricKind::Netdev {
            out.push_str(&format!(
                "interface {}\n  operstate        {}\n  speed_mbps       {}\n  carrier_changes  {}\n",
                p.device,
                word(&p.state),
                or_absent(p.rate_mbps),
                or_absent(p.carrier_changes)
            ));
            continue;
        }
        out.push_str(&format!(
            "port {}/{}\n  state            {}\n  phys_state       {}\n  rate_mbps        {}\n",
            p.device,
            p.port,
            word(&p.state),
            word(&p.phys_state),
            or_absent(p.rate_mbps)
        ));
        for (name, value) in ib_counters(p) {
            out.push_str(&format!("  {name:<20} {}\n", or_absent(value)));
        }
    }
    out
}

fn ib_counters(p: &FabricPort) -> [(&'static str, Option<u64>); 5] {
    [
        ("link_downed", p.link_downed),
        ("link_error_recovery", p.link_error_recovery),
        ("symbol_error", p.symbol_error),
        ("port_rcv_errors", p.port_rcv_errors),
        ("port_xmit_discards", p.port_xmit_discards),
    ]
}

/// The report as one JSON document: absent values are `null`.
pub fn render_json(reader: &FabricReader, ports: &[FabricPort]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            if p.kind() == FabricKind::Netdev {
                return json!({
                    "kind": "netdev",
                    "device": p.device,
                    "operstate": (!p.state.is_empty()).then_some(&p.state),
                    "speed_mbps": p.rate_mbps,
                    "carrier_changes": p.carrier_changes,
                });
            }
            let mut v = json!({
                "kind": "infiniband",
                "device": p.device,
                "port": p.port,
                "state": (!p.state.is_empty()).then_some(&p.state),
                "phys_state": (!p.phys_state.is_empty()).then_some(&p.phys_state),
                "rate_mbps": p.rate_mbps,
            });
            for (name, value) in ib_counters(p) {
                v[name] = json!(value);
            }
            v
        })
        .collect();
    json!({
        "sysfs_root": reader.root().display().to_string(),
        "configured": reader.configured(),
        "ports": ports,
    })
}
