//! The fake's cordon breaker (open: one node cordoned, one held), and the tests of
//! `breaker status` and `breaker reset`.

use serde_json::json;
use vigil_proto::v1;

use super::{clusterctl, start_fake, stdout_json};

/// Open: gpu-auto cordoned (cap 1 of 3 nodes), gpu-hot held.
pub fn open() -> v1::BreakerStatus {
    v1::BreakerStatus {
        open: true,
        opened_at_unix_ms: Some(1_700_000_000_000),
        opened_why: "cordon breaker opened: a cordon of gpu-hot would make 2 automatic cordons in 10m, past the cap of 1 node (10% of 3 nodes, max_nodes 50); holding further automatic cordons until clusterctl breaker reset".into(),
        cap: 1,
        max_fraction: 0.1,
        max_nodes: 50,
        nodes_known: 3,
        window_ms: 600_000,
        cordons: vec![v1::BreakerCordon {
            node: "gpu-auto".into(),
            at_unix_ms: 1_700_000_000_000,
        }],
        held: vec![v1::HeldCordon {
            node: "gpu-hot".into(),
            rule: "xid".into(),
            evidence: "gpu 1: Xid 79 (fell off the bus)".into(),
            since_unix_ms: 1_700_000_000_000,
            message: "cordon held: breaker open (1 automatic cordon in the last 10m, cap 1): gpu 1: Xid 79 (fell off the bus)".into(),
        }],
        last_reset_by: String::new(),
        last_reset_at_unix_ms: None,
    }
}

/// What `reset` answers: closed, a fresh window, nothing held.
pub fn after_reset() -> v1::BreakerStatus {
    v1::BreakerStatus {
        open: false,
        opened_at_unix_ms: None,
        opened_why: String::new(),
        cordons: vec![],
        held: vec![],
        last_reset_by: "anonymous (insecure)".into(),
        last_reset_at_unix_ms: Some(1_700_000_060_000),
        ..open()
    }
}

#[test]
fn breaker_status_and_reset_show_the_breaker() {
    let (_rt, url) = start_fake();
    let view = stdout_json(&clusterctl(&url, &["-o", "json", "breaker", "status"]));
    assert_eq!(view["state"], json!("open"));
    assert_eq!(view["cap"], json!(1));
    assert_eq!(view["cordons"][0]["node"], json!("gpu-auto"));
    assert_eq!(view["held"][0]["node"], json!("gpu-hot"));
    assert_eq!(view["held"][0]["rule"], json!("xid"));
    assert_eq!(view["last_reset_by"], json!(null));
    let out = clusterctl(&url, &["breaker", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("state        OPEN since 2023-11-14 22:13:20Z"),
        "{text}"
    );
    assert!(
        text.contains("cap          1 node = max(1, min(max_nodes 50, floor(10% of 3 nodes)))\n"),
        "{text}"
    );
    assert!(text.contains("gpu-hot (xid, since "), "{text}");

    let out = clusterctl(&url, &["breaker", "reset"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "cordon breaker reset by anonymous (insecure): closed; a fresh window begins (cap 1); \
         held nodes are judged again on fresh evidence only\n"
    );
    let view = stdout_json(&clusterctl(&url, &["-o", "json", "breaker", "reset"]));
    assert_eq!(view["state"], json!("closed"));
    assert_eq!(view["held"], json!([]));
    assert_eq!(view["last_reset_by"], json!("anonymous (insecure)"));
}
