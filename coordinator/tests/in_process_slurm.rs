//! The in-process cluster (harness: `sim/`) and vigil's records of Slurm jobs (`[slurm]`): the
//! adapter's listing and requeue become a stored record, which a restarted coordinator loads,
//! so it still knows the job awaits the lifting of its requeue hold.

mod sim;

use sim::{Cluster, TestResult};
use vigil_coordinator::engine::Event;
use vigil_core::slurm::{JobState, SlurmJob};

fn running(id: &str, nodes: &[&str]) -> SlurmJob {
    SlurmJob {
        id: id.to_owned(),
        state: JobState::Running,
        state_text: "RUNNING".to_owned(),
        reason: "None".to_owned(),
        nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        name: "train".to_owned(),
        user: "alice".to_owned(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_requeued_slurm_job_is_remembered_across_a_coordinator_restart() -> TestResult {
    let mut c = Cluster::start(2).await?;
    let jobs = vec![running("7", &["n0", "n1"]), running("8", &["elsewhere"])];
    c.handle
        .send(Event::SlurmJobs {
            jobs,
            complete: true,
        })
        .await?;
    c.handle
        .send(Event::SlurmRequeued {
            job: "7".into(),
            node: "n1".into(),
            reason: "vigil: XID 79".into(),
        })
        .await?;
    c.until("the requeue recorded", |c| {
        c.handle
            .snapshot()
            .slurm_jobs
            .awaiting_rerun()
            .contains("7")
    })
    .await?;
    let memory = c.memory.clone();
    c.restart_on(memory).await?;
    let snap = c.handle.snapshot();
    let record = snap.slurm_jobs.jobs.get("7").ok_or("job 7 not loaded")?;
    assert!(record.awaiting_rerun(), "{record:?}");
    assert_eq!(record.requeues[0].node, "n1");
    assert_eq!(record.user, "alice");
    assert!(
        !snap.slurm_jobs.jobs.contains_key("8"),
        "a job on no vigil node gets no record"
    );
    Ok(())
}
