//! Remediation steps with stand-in commands (never a real reset or reboot).

use super::*;
use crate::events::EventSource;
use crate::metrics::Metrics;

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn remediator(cfg: RemediationSection) -> (Arc<Remediator>, EventSource) {
    let (sink, source) = crate::events::channel(Metrics::new("simulated", &[], "h"));
    (Arc::new(Remediator::new(cfg, sink)), source)
}

fn step(id: u64, action: RemediationAction, gpu: u32) -> Remediate {
    Remediate {
        step_id: id,
        action: action as i32,
        gpu_index: gpu,
        reason: "test".into(),
    }
}

async fn next_result(source: &mut EventSource) -> RemediationResult {
    let event = tokio::time::timeout(Duration::from_secs(20), source.next())
        .await
        .expect("answered in time");
    match event.kind {
        Some(Kind::RemediationResult(r)) => r,
        other => panic!("not a remediation result: {other:?}"),
    }
}

#[test]
fn gpu_is_replaced_by_the_index_and_a_missing_command_says_which_key() {
    let cfg = RemediationSection {
        gpu_reset_command: vec![
            "nvidia-smi".into(),
            "-r".into(),
            "-i".into(),
            "{gpu}".into(),
        ],
        ..RemediationSection::default()
    };
    assert_eq!(
        cfg.argv(RemediationAction::GpuReset, 3),
        Ok(vec![
            "nvidia-smi".into(),
            "-r".into(),
            "-i".into(),
            "3".into()
        ])
    );
    assert_eq!(
        cfg.argv(RemediationAction::Reboot, 0),
        Err("remediation.reboot_command is not set on this node".into())
    );
    assert!(cfg.problem().is_none());
    let bad = RemediationSection {
        timeout: Duration::ZERO,
        ..cfg.clone()
    };
    assert_eq!(bad.problem().map(|p| p.0), Some("remediation.timeout"));
    let empty = RemediationSection {
        reboot_command: vec![" ".into()],
        ..cfg
    };
    assert_eq!(
        empty.problem().map(|p| p.0),
        Some("remediation.reboot_command")
    );
}

#[tokio::test]
async fn a_reset_runs_the_stand_in_once_per_step_id_and_answers_repeats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("resets");
    let cfg = RemediationSection {
        gpu_reset_command: sh(&format!(
            "echo reset {{gpu}} >> {}; echo done",
            file.display()
        )),
        ..RemediationSection::default()
    };
    let (r, mut source) = remediator(cfg);
    r.spawn(step(4, RemediationAction::GpuReset, 2));
    r.spawn(step(4, RemediationAction::GpuReset, 2));
    let first = next_result(&mut source).await;
    assert!(first.ok, "{first:?}");
    assert_eq!((first.step_id, first.gpu_index), (4, 2));
    assert_eq!(first.output.trim(), "done");
    assert!(
        first.command.starts_with("sh -c echo reset 2 >>"),
        "{}",
        first.command
    );
    r.spawn(step(4, RemediationAction::GpuReset, 2));
    let again = next_result(&mut source).await;
    assert_eq!(again, first, "a repeat is answered with the same result");
    let runs = std::fs::read_to_string(&file).expect("stand-in ran");
    assert_eq!(runs, "reset 2\n", "ran once");
}

#[tokio::test]
async fn a_node_without_the_command_answers_not_ok_and_says_why() {
    let (r, mut source) = remediator(RemediationSection::default());
    r.spawn(step(1, RemediationAction::GpuReset, 0));
    let result = next_result(&mut source).await;
    assert!(!result.ok);
    assert_eq!(
        result.output,
        "remediation.gpu_reset_command is not set on this node"
    );
    assert!(result.command.is_empty());
}

#[tokio::test]
async fn a_failing_or_hanging_command_is_not_ok_and_a_hang_is_killed_whole() {
    let (ok, output) = run_in_group(&sh("echo oops >&2; exit 3"), Duration::from_secs(10)).await;
    assert!(!ok);
    assert!(
        output.contains("oops") && output.contains("exit status: 3"),
        "{output}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("survived");
    let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
    let (ok, output) = run_in_group(&sh(&script), Duration::from_millis(300)).await;
    assert!(!ok);
    assert!(output.contains("killed"), "{output}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!marker.exists(), "the whole process group was killed");
}

#[tokio::test]
async fn a_reboot_is_answered_ok_before_its_command_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("reboots");
    let cfg = RemediationSection {
        reboot_command: sh(&format!("echo reboot >> {}", file.display())),
        ..RemediationSection::default()
    };
    let (r, mut source) = remediator(cfg);
    r.spawn(step(9, RemediationAction::Reboot, 0));
    let result = next_result(&mut source).await;
    assert!(result.ok, "{result:?}");
    assert!(
        result.output.starts_with("reboot issued"),
        "{}",
        result.output
    );
    assert!(!file.exists(), "answered before the command ran");
    for _ in 0..100 {
        if file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(std::fs::read_to_string(&file).expect("ran"), "reboot\n");
}
