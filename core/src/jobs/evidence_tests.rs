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

#[test]
fn an_attempt_the_previous_release_wrote_with_its_evidence_inside_still_reads() {
    let old = r#"{"attempt":1,"nodes":["n1"],"started_at_ms":1,"ended_at_ms":2,
        "outcome":"failed","reason":"hung","culprit_node":"","resumed_from":null,"last_step":5,
        "failure_kind":"hang",
        "evidence":[{"node":"n1","at_ms":3,"processes":[{"pid":42,"comm":"python3",
            "state":"S (sleeping)","wchan":"futex_wait_queue","kernel_stack":"[<0>] futex_wait"}],
            "log_tail":"step 5\n","fabric":[],"error":""}],
        "suspect":"n1: port mlx5_0/1 is DOWN"}"#;
    let a: crate::job::Attempt = serde_json::from_str(old).expect("reads");
    assert_eq!(a.evidence.len(), 1);
    assert_eq!(a.evidence[0].processes[0].python_stacks, "", "defaulted");
    assert!(a.evidence_from.is_empty());
    assert_eq!(a.suspect, "n1: port mlx5_0/1 is DOWN");
    // Written again, it keeps what it read; nothing new is ever put there.
    let again = serde_json::to_string(&a).expect("json");
    assert!(again.contains("\"evidence\":[{"), "{again}");
    assert!(!again.contains("evidence_from"), "{again}");
}
