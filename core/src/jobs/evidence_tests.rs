use super::*;

fn delta(state: &str, link_downed: u64, symbol_error: u64) -> FabricDeltaRecord {
    FabricDeltaRecord {
        port: "mlx5_0/1".into(),
        state: state.into(),
        link_downed,
        link_error_recovery: 0,
        symbol_error,
        port_rcv_errors: 0,
        port_xmit_discards: 0,
        carrier_changes: 0,
    }
}

#[test]
fn a_port_down_or_flapping_during_the_attempt_is_a_fault_and_symbol_errors_alone_are_not() {
    assert_eq!(
        delta("DOWN", 1, 0).fault().as_deref(),
        Some("port mlx5_0/1 is DOWN")
    );
    assert_eq!(
        delta("ACTIVE", 3, 0).fault().as_deref(),
        Some("port mlx5_0/1 flapped 3 times during the attempt")
    );
    assert_eq!(delta("ACTIVE", 0, 50).fault(), None);
    assert_eq!(delta("up", 0, 0).fault(), None);
}

#[test]
fn evidence_from_an_agent_is_bounded() {
    let e = v1::HangEvidence {
        job_id: "j-1".into(),
        attempt: 1,
        processes: (0..100)
            .map(|pid| v1::ProcessEvidence {
                pid,
                comm: "c".repeat(MAX_TEXT),
                state: "s".repeat(MAX_TEXT),
                wchan: "w".repeat(MAX_TEXT),
                kernel_stack: "é".repeat(MAX_TEXT),
                python_stacks: "p".repeat(MAX_TEXT * 2),
            })
            .collect(),
        log_tail: "x".repeat(MAX_TEXT * 2),
        fabric: (0..100)
            .map(|_| v1::FabricDelta {
                port: "p".repeat(MAX_TEXT),
                state: "s".repeat(MAX_TEXT),
                ..Default::default()
            })
            .collect(),
        error: "e".repeat(MAX_TEXT * 2),
    };
    let kept = NodeEvidence::from_event("n1", 5, &e);
    assert_eq!(kept.processes.len(), MAX_PROCESSES);
    assert_eq!(kept.log_tail.len(), MAX_TEXT);
    assert!(kept.processes[0].kernel_stack.len() <= MAX_TEXT);
    assert!(kept.processes[MAX_FULL_STACKS].python_stacks.len() <= MAX_SHORT_TEXT);
    // The worst an agent can send is still one modest record.
    let bytes = kept.approx_bytes();
    assert!(bytes <= MAX_NODE_BYTES, "{bytes}");
    let json = serde_json::to_vec(&kept).expect("json").len() as u64;
    assert!(json <= MAX_NODE_BYTES, "{json}");
}
