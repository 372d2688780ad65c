//! Fault injection across real hosts, part 2: the coordinator and the
//! network to it fail (kill -9 mid-recovery, SIGSTOP, a slow and stalling
//! network, a full state dir). See tests/tests/reliability.rs for the method.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use vigil_tests::jobs::{attempt, spec_in, state, workers_running};
use vigil_tests::netns::NetCluster;
use vigil_tests::report::Row;
use vigil_tests::scenario::{Resume, check_resume, restarts, running, settle};
use vigil_tests::{FAST_LIVENESS, LONG, now, wait_for};

fn progress(job: &Value) -> u64 {
    job["job"]["progress_step"].as_u64().unwrap_or(0)
}

#[test]
fn full_state_dir_refuses_new_work_keeps_running_jobs_and_recovers() -> Result<()> {
    let Some(c) = NetCluster::builder(FAST_LIVENESS)
        .hosts(2)
        .state_tmpfs_kib(64 * 1024)
        .start()?
    else {
        return Ok(());
    };
    let one = spec_in(c.dir.path(), 1, 0, "", "")?;
    let id = c.submit(&one)?;
    let job = running(&c, &id, 1)?;
    let pid = job["workers"][0]["pid"].as_u64().context("pid")?;
    let filled = c.fill_state_dir()?;
    println!("filled the state dir with {filled} bytes");
    let t0 = now();
    let path = vigil_tests::write_file(c.dir.path(), "second.toml", &one)?;
    let refused = c.ctl(&["job", "submit", &path.to_string_lossy()])?;
    let refusal = t0.elapsed();
    println!(
        "submit on a full disk: code {:?}\n{}{}",
        refused.code, refused.stdout, refused.stderr
    );
    ensure!(!refused.success(), "a new job is refused on a full disk");
    let s0 = progress(&c.job(&id)?);
    let job = c.wait_job(&id, "the running job keeps progressing", |j| {
        progress(j) > s0 + 20
    })?;
    ensure!(
        attempt(&job) == 1 && job["workers"][0]["pid"].as_u64() == Some(pid),
        "{job}"
    );
    c.free_state_dir()?;
    let t1 = now();
    let id2 = wait_for("a new job accepted once space returns", LONG, || {
        let out = c.ctl(&["-o", "json", "job", "submit", &path.to_string_lossy()])?;
        Ok(out.success().then(|| out.json()).transpose()?)
    })?;
    let recovered = t1.elapsed();
    let id2 = id2["job"]["id"].as_str().context("id")?.to_owned();
    c.wait_job(&id2, "second job running", |j| workers_running(j, 1))?;
    let job = c.job(&id)?;
    ensure!(attempt(&job) == 1 && restarts(&job) == 0, "{job}");
    ensure!(state(&job) == "Running");
    Row {
        order: 13,
        scenario: "coordinator state dir full".into(),
        fault: "tmpfs under the coordinator's data dir filled to the last byte".into(),
        detection: Some(refusal),
        recovery: Some(recovered),
        outcome: format!(
            "new job refused with: `{}`; the running job kept its worker and progress; new jobs accepted again once space returned",
            refused.stderr.trim()
        ),
        ..Row::default()
    }
    .record()
}
