//! A fabric fault on a node running a job goes the way of a fatal XID: the node is the
//! culprit, cordoned and charged; the attempt stops on the whole gang and the job relaunches.

use super::*;

fn active(device: &str) -> v1::FabricPort {
    v1::FabricPort {
        kind: v1::FabricKind::Infiniband.into(),
        device: device.into(),
        port: 1,
        state: "ACTIVE".into(),
        phys_state: "LinkUp".into(),
        rate_mbps: Some(400_000),
        link_downed: Some(0),
        ..Default::default()
    }
}

#[test]
fn a_fabric_port_down_on_a_jobs_node_makes_it_the_culprit_and_the_job_relaunches() {
    let now = t0();
    let mut s = cluster(3, now);
    // n1 comes back with an InfiniBand port (a new session of the same host).
    let with_fabric = Registration {
        fabric: vec![active("mlx5_0"), active("mlx5_1")],
        ..reg("n1", 11, Vec::new())
    };
    step_ok(&mut s, Input::Register(with_fabric), now);
    let (id, _) = submit(&mut s, &spec(2, 1), now);
    let port_down = v1::FabricPort {
        state: "DOWN".into(),
        phys_state: "Disabled".into(),
        link_downed: Some(1),
        ..active("mlx5_1")
    };
    let hb = v1::Heartbeat {
        fabric: vec![active("mlx5_0"), port_down],
        fabric_read: true,
        ..beat(&[])
    };
    let effects = heartbeat(&mut s, "n1", hb, at(now, 5.0));
    let cordon = s.nodes["n1"].record.cordon.clone().expect("n1 cordoned");
    assert_eq!(
        cordon.reason,
        "port mlx5_1/1 is DOWN (was ACTIVE, 400 Gb/sec)"
    );
    assert!(!s.nodes["n2"].cordoned() && !s.nodes["n3"].cordoned());
    assert_eq!(stops(&effects), ["n1", "n2"], "the whole gang stops");
    let attempt = &s.jobs[&id].attempts[0];
    assert_eq!(attempt.culprit_node, "n1");
    assert!(
        attempt.reason.contains("port mlx5_1/1 is DOWN"),
        "{}",
        attempt.reason
    );
    assert!(
        s.lemons.records.keys().any(|k| k == "host/n1"),
        "the host is charged: {:?}",
        s.lemons.records.keys().collect::<Vec<_>>()
    );
    let effects = confirm_stops(&mut s, &id, &effects, at(now, 6.0));
    assert!(starts(&effects).is_empty());
    let effects = tick(&mut s, at(now, 11.0));
    let nodes: Vec<String> = starts(&effects).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        nodes,
        ["n2", "n3"],
        "the spare replaces the node with the fabric fault"
    );
}
