//! Scenario tests of re-registrations that bring another GPU inventory (same host).

use super::*;
use crate::test_utils::{default_state, node_events, reg_with_gpus, register_at, t};

fn with_serials(mut reg: Registration) -> Registration {
    for g in &mut reg.gpus {
        g.serial = format!("serial-{}", g.index);
    }
    reg
}

#[test]
fn a_swapped_gpu_is_an_inventory_change_with_a_burn_in_not_a_lost_gpu() {
    let mut s = default_state();
    register_at(&mut s, with_serials(reg_with_gpus("n1", 1, 8)), t(0));
    let mut swapped = with_serials(reg_with_gpus("n1", 2, 8));
    swapped.gpus[3].uuid = "GPU-new-3".into();
    swapped.gpus[3].serial = "new".into();
    register_at(&mut s, swapped, t(1));
    let changed = node_events(&s, "n1", "inventory-changed");
    assert_eq!(changed.len(), 1);
    assert!(
        changed[0].starts_with(
            "GPU inventory changed: new GPU 3 (GPU-new-3, serial new); replacing GPU 3 \
             (GPU-n1-3, serial serial-3)"
        ),
        "{}",
        changed[0]
    );
    let node = &s.nodes["n1"];
    assert!(
        node.health.first_unhealthy().is_none(),
        "a swap is no lost GPU"
    );
    let burn_in = node.record.burn_in.as_ref().expect("burn-in");
    assert_eq!(burn_in.why, "inventory-changed");
}

#[test]
fn an_added_gpu_is_an_inventory_change() {
    let mut s = default_state();
    register_at(&mut s, reg_with_gpus("n1", 1, 4), t(0));
    register_at(&mut s, reg_with_gpus("n1", 2, 5), t(1));
    let changed = node_events(&s, "n1", "inventory-changed");
    assert_eq!(changed.len(), 1);
    assert!(
        changed[0].contains("new GPU 4 (GPU-n1-4, serial none)"),
        "{}",
        changed[0]
    );
    assert!(s.nodes["n1"].record.burn_in.is_some());
}

#[test]
fn the_same_inventory_again_is_no_change() {
    let mut s = default_state();
    register_at(&mut s, reg_with_gpus("n1", 1, 8), t(0));
    register_at(&mut s, reg_with_gpus("n1", 2, 8), t(1));
    assert!(node_events(&s, "n1", "inventory-changed").is_empty());
    assert!(s.nodes["n1"].record.burn_in.is_none());
}

#[test]
fn a_missing_gpu_is_a_fault_charged_once_however_often_the_host_registers() {
    let mut s = default_state();
    register_at(&mut s, reg_with_gpus("n1", 1, 8), t(0));
    // GPU 3 fell off the bus; NVML numbers the rest again (4..7 become 3..6).
    let missing = |session| {
        let mut reg = reg_with_gpus("n1", session, 8);
        reg.gpus.remove(3);
        for (i, g) in reg.gpus.iter_mut().enumerate() {
            g.index = i as u32;
        }
        reg
    };
    let first = register_at(&mut s, missing(2), t(1));
    assert!(
        first.iter().any(|e| matches!(e, Effect::Cordoned { .. })),
        "{first:?}"
    );
    assert!(
        node_events(&s, "n1", "inventory-changed").is_empty(),
        "missing is no new hardware"
    );
    let ledger = format!("{:?}", s.lemons.records);
    let findings = s.nodes["n1"].health.reasons();
    for session in 3..6 {
        let again = register_at(&mut s, missing(session), t(session));
        assert!(
            !again
                .iter()
                .any(|e| matches!(e, Effect::Cordoned { .. } | Effect::PersistLemon(_))),
            "{again:?}"
        );
    }
    assert_eq!(format!("{:?}", s.lemons.records), ledger, "charged once");
    assert_eq!(s.nodes["n1"].health.reasons(), findings);
    assert!(node_events(&s, "n1", "inventory-changed").is_empty());
}

#[test]
fn inventory_change_matches_gpus_by_uuid_not_index() {
    let gpus = |ids: &[(u32, &str)]| -> Vec<GpuRecord> {
        ids.iter()
            .map(|(i, u)| GpuRecord {
                index: *i,
                uuid: (*u).to_owned(),
                name: String::new(),
                pci_bus_id: String::new(),
                memory_total_bytes: 0,
                serial: String::new(),
            })
            .collect()
    };
    let before = gpus(&[(0, "a"), (1, "b"), (2, "c")]);
    let renumbered = InventoryChange::between(&before, &gpus(&[(0, "a"), (1, "c")]));
    assert_eq!(renumbered.lost, gpus(&[(1, "b")]));
    assert!(!renumbered.changed());
    let swapped = InventoryChange::between(&before, &gpus(&[(0, "a"), (1, "x"), (2, "c")]));
    assert_eq!(swapped.replaced, gpus(&[(1, "b")]));
    assert_eq!(swapped.added, gpus(&[(1, "x")]));
    assert!(swapped.lost.is_empty());
}
