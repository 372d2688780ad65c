//! The verification runner and the verifying scan, on temp dirs with real `sh` processes.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use nix::unistd::{Uid, User};
use vigil_proto::v1::ScanCheckpoints;

use super::*;
use crate::workers::confine::Confinement;
use crate::workers::resume_scan;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Rules under which this test process may run job processes as itself (as root: `run_as =
/// "root"`, explicitly).
fn rules(root: &Path) -> Result<Confinement, Box<dyn std::error::Error>> {
    let me = User::from_uid(Uid::effective())?.ok_or("no passwd entry for this user")?;
    Ok(Confinement {
        run_as: Some(me.name),
        allowed_roots: vec![root.to_owned()],
    })
}

/// `<tmp>/ckpt` holding marker-layout checkpoints at `steps` (each complete), and `<tmp>/work`.
fn layout(steps: &[u64]) -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    for step in steps {
        let dir = tmp.path().join(format!("ckpt/step_{step:06}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("model.bin"), b"weights")?;
        std::fs::write(dir.join("COMPLETE"), b"ok\n")?;
    }
    std::fs::create_dir_all(tmp.path().join("work"))?;
    Ok(tmp)
}

fn scan(tmp: &Path, script: &str, timeout_ms: u64) -> ScanCheckpoints {
    ScanCheckpoints {
        job_id: "j-1".into(),
        attempt: 2,
        checkpoint_dir: tmp.join("ckpt").display().to_string(),
        checkpoint_layout: "marker".into(),
        // The candidate's path is appended: `$1` in the script.
        verify_command: vec!["sh".into(), "-c".into(), script.into(), "verify".into()],
        verify_timeout_ms: timeout_ms,
        workdir: tmp.join("work").display().to_string(),
        env: [("A".to_owned(), "from-the-spec".to_owned())].into(),
        world_size: 0,
    }
}

const FAILS_ON_BAD: &str =
    "test ! -e \"$VIGIL_CHECKPOINT/bad\" || { echo \"corrupt: $1\"; echo oops >&2; exit 3; }";

#[tokio::test]
async fn a_candidate_that_fails_is_rejected_and_the_next_one_that_passes_is_the_answer()
-> TestResult {
    let tmp = layout(&[100, 200, 300])?;
    std::fs::write(tmp.path().join("ckpt/step_000300/bad"), b"")?;
    let s = scan(tmp.path(), FAILS_ON_BAD, 10_000);
    let answer = resume_scan::run(Arc::new(rules(tmp.path())?), s.clone()).await;
    assert_eq!(answer.error, "");
    let newest = answer.newest.ok_or("a verified checkpoint")?;
    assert_eq!(newest.path, format!("{}/step_000200", s.checkpoint_dir));
    assert_eq!(newest.step, Some(200));
    assert_eq!(answer.rejected.len(), 1);
    let r = &answer.rejected[0];
    let bad = format!("{}/step_000300", s.checkpoint_dir);
    assert_eq!((r.path.as_str(), r.step), (bad.as_str(), Some(300)));
    assert_eq!(r.why, "exited with code 3");
    assert_eq!(
        r.output,
        format!("corrupt: {bad}\noops\n"),
        "stdout and stderr"
    );
    Ok(())
}

#[tokio::test]
async fn when_every_candidate_fails_none_is_the_answer_and_at_most_three_were_tried() -> TestResult
{
    let tmp = layout(&[100, 200, 300, 400])?;
    let s = scan(tmp.path(), "exit 3", 10_000);
    let answer = resume_scan::run(Arc::new(rules(tmp.path())?), s.clone()).await;
    assert_eq!(answer.newest, None);
    let tried: Vec<Option<u64>> = answer.rejected.iter().map(|r| r.step).collect();
    assert_eq!(tried, [Some(400), Some(300), Some(200)]);
    let d = &s.checkpoint_dir;
    assert_eq!(
        answer.error,
        format!(
            "no checkpoint passed verify_command: tried {d}/step_000400 (exited with code 3), {d}/step_000300 (exited with code 3), {d}/step_000200 (exited with code 3)"
        )
    );
    Ok(())
}

#[tokio::test]
async fn a_command_that_cannot_start_rejects_nothing() -> TestResult {
    let tmp = layout(&[100])?;
    let mut s = scan(tmp.path(), "exit 0", 10_000);
    s.verify_command = vec!["/no/such/verifier".into()];
    let answer = resume_scan::run(Arc::new(rules(tmp.path())?), s).await;
    assert_eq!(answer.newest, None);
    assert!(answer.rejected.is_empty());
    assert!(
        answer.error.starts_with("cannot run verify_command on ")
            && answer.error.contains("cannot start \"/no/such/verifier\""),
        "{}",
        answer.error
    );
    Ok(())
}

#[tokio::test]
async fn the_command_runs_in_the_workdir_with_the_spec_env_and_the_path() -> TestResult {
    let tmp = layout(&[100])?;
    let s = scan(
        tmp.path(),
        "echo \"$A|$(pwd)|$VIGIL_CHECKPOINT|$1\"; exit 1",
        10_000,
    );
    let answer = resume_scan::run(Arc::new(rules(tmp.path())?), s.clone()).await;
    let path = format!("{}/step_000100", s.checkpoint_dir);
    let work = tmp.path().join("work").canonicalize()?;
    assert_eq!(
        answer.rejected.first().map(|r| r.output.as_str()),
        Some(format!("from-the-spec|{}|{path}|{path}\n", work.display()).as_str())
    );
    Ok(())
}

#[tokio::test]
async fn at_the_timeout_the_whole_process_group_is_killed() -> TestResult {
    let tmp = layout(&[])?;
    let pgid_file = tmp.path().join("pgid");
    let verifier = Verifier {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo $$ > {}; echo started; sleep 60 & wait",
                pgid_file.display()
            ),
        ],
        timeout: Duration::from_millis(500),
        workdir: tmp.path().to_owned(),
        env: BTreeMap::new(),
        identity: None,
    };
    let failed = verifier
        .verify("/c/step_1")
        .await?
        .err()
        .ok_or("a timeout is a failure")?;
    assert_eq!(failed.why, "timed out after 500ms");
    assert_eq!(failed.output, "started\n");
    let pgid: i32 = std::fs::read_to_string(&pgid_file)?.trim().parse()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while group::group_alive(pgid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the background sleep outlived the timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn it_runs_as_the_job_user_never_the_agents_root() -> TestResult {
    let tmp = layout(&[100])?;
    // The job's user must be able to enter the workdir.
    for dir in [tmp.path().to_owned(), tmp.path().join("work")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let me = Uid::effective();
    let (rules, want) = match User::from_name("nobody")? {
        Some(nobody) if me.is_root() => (
            Confinement {
                run_as: Some("nobody".into()),
                allowed_roots: vec![tmp.path().to_owned()],
            },
            nobody.uid.as_raw(),
        ),
        // Not root: jobs run as the agent's own user, which is not root either.
        _ => (rules(tmp.path())?, me.as_raw()),
    };
    let s = scan(tmp.path(), "id -u; exit 1", 10_000);
    let answer = resume_scan::run(Arc::new(rules), s).await;
    assert_eq!(
        answer.rejected.first().map(|r| r.output.trim().to_owned()),
        Some(want.to_string()),
        "{}",
        answer.error
    );
    // As root with nothing configured, nothing runs at all.
    if me.is_root() {
        let implicit = Confinement {
            run_as: None,
            allowed_roots: vec![tmp.path().to_owned()],
        };
        let s = scan(tmp.path(), "exit 0", 10_000);
        let answer = resume_scan::run(Arc::new(implicit), s).await;
        assert!(answer.error.contains("workers.run_as"), "{}", answer.error);
        assert_eq!((answer.newest, answer.rejected.len()), (None, 0));
    }
    Ok(())
}

#[test]
fn the_output_tail_is_bounded_and_whole_characters() {
    // A character cut in two at the start of the tail turns into U+FFFD (3 bytes): over the
    // limit, so it is dropped whole.
    let mut bytes = vec![0xa9];
    bytes.extend(std::iter::repeat_n(b'x', MAX_OUTPUT - 1));
    assert_eq!(tail_text(&bytes), "x".repeat(MAX_OUTPUT - 1));
    assert_eq!(tail_text("é!".as_bytes()), "é!");
}
