//! The Slurm adapter (`[slurm]`, docs/slurm.md): every `interval`, and at once when the engine
//! publishes a change of what vigil wants of a node (a cordon, an uncordon, a node lost), it
//! reads Slurm's nodes and jobs (`sinfo`, `squeue`), hands the job listing to the engine (vigil's
//! records of Slurm jobs, `vigil_core::slurm::jobs`), asks `vigil_core::slurm::plan` what to
//! change given the engine's latest snapshot, and carries that out with `scontrol`. It owns no
//! cluster state: the jobs it requeued are recorded by the engine (so a restarted coordinator
//! still lifts their hold), and a round that fails (Slurm down, a command timing out) is logged
//! and the next round starts over from what Slurm shows.
//!
//! Layout: `config` (the `[slurm]` section), `command` (Slurm's commands as child processes,
//! time-limited, output bounded).

pub mod command;
pub mod config;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};
use vigil_core::slurm::{self, Action, Intent, SlurmJob, SlurmNode, Want};

pub use command::SlurmError;
pub use config::SlurmConfig;
/// The longest drain reason vigil sets (tests check what Slurm keeps of it).
pub use vigil_core::slurm::MAX_REASON_BYTES;

use crate::engine::{self, EngineHandle, Event, Snapshot};
use crate::metrics::Metrics;

/// The drains an administrator (or NHC) set in Slurm, by vigil node name, with Slurm's
/// reason: shown by `clusterctl nodes`, never lifted. The adapter holds the sender.
pub type AdminDrains = watch::Receiver<Arc<BTreeMap<String, String>>>;

/// For [`FOLLOW_FOR`] after a round that changed something in Slurm, rounds come this often
/// (or every `interval`, if shorter): a requeued job's release and next run are seen as they
/// happen, so its record (and goodput) are true to about a second.
const FOLLOW_UP: std::time::Duration = std::time::Duration::from_secs(1);
const FOLLOW_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts the adapter; it ends when `stop` turns true.
pub fn spawn(
    config: SlurmConfig,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> AdminDrains {
    let (drains_tx, drains_rx) = watch::channel(Arc::default());
    let adapter = Adapter {
        config,
        engine,
        metrics,
        sent: BTreeSet::new(),
    };
    tokio::spawn(adapter.run(drains_tx, stop));
    drains_rx
}

struct Adapter {
    config: SlurmConfig,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    /// Jobs this adapter requeued that the engine's snapshot does not show recorded yet (the
    /// snapshot lags a turn): never requeued twice meanwhile.
    sent: BTreeSet<String>,
}

/// What vigil wants of each node, by vigil node name: a change wakes the adapter at once.
fn wants(snapshot: &Snapshot) -> Vec<(String, Want)> {
    snapshot
        .nodes
        .iter()
        .map(|n| (n.record.name.clone(), slurm::want(n)))
        .collect()
}

impl Adapter {
    async fn run(
        mut self,
        drains: watch::Sender<Arc<BTreeMap<String, String>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        info!(interval = ?self.config.interval, "slurm: carrying node decisions into Slurm");
        let mut failing = false;
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snapshots = self.engine.snapshots();
        let mut acted_on = Vec::new();
        let mut follow_until = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Most snapshots change nothing Slurm cares about (heartbeats, jobs).
                    if wants(&snapshots.borrow_and_update()) == acted_on {
                        continue;
                    }
                }
                () = engine::stopped(&mut stop) => return,
            }
            acted_on = wants(&self.engine.snapshot());
            match self.round().await {
                Ok((admin, acted)) => {
                    // What was just changed (a requeue, a release) shows in Slurm within
                    // moments: look again soon, so a job's new run is seen when it starts.
                    if acted {
                        follow_until = tokio::time::Instant::now() + FOLLOW_FOR;
                    }
                    if tokio::time::Instant::now() < follow_until {
                        ticker.reset_after(FOLLOW_UP.min(self.config.interval));
                    }
                    if failing {
                        info!("slurm: reachable again");
                        failing = false;
                    }
                    drains.send_if_modified(|old| {
                        let changed = **old != admin;
                        if changed {
                            *old = Arc::new(admin);
                        }
                        changed
                    });
                }
                Err(e) => {
                    self.metrics.slurm.read_errors.inc();
                    // Once per outage, not once per round.
                    if !failing {
                        warn!(
                            error = %e,
                            "slurm: cannot read Slurm; nothing is drained or resumed until it answers"
                        );
                        failing = true;
                    }
                }
            }
        }
    }

    /// One round: read Slurm, plan, act. Returns the administrators' drains by vigil node name,
    /// and whether it carried anything out.
    async fn round(&mut self) -> Result<(BTreeMap<String, String>, bool), SlurmError> {
        let (nodes, jobs, complete) = read(&self.config).await?;
        let snapshot = self.engine.snapshot();
        let table = &self.config.nodes;
        let intents: Vec<Intent> = snapshot
            .nodes
            .iter()
            .map(|n| Intent {
                slurm_name: slurm::slurm_name(table, &n.record.name).to_owned(),
                want: slurm::want(n),
            })
            .collect();
        let by_slurm: BTreeMap<&str, &str> = snapshot
            .nodes
            .iter()
            .map(|n| {
                let name = n.record.name.as_str();
                (slurm::slurm_name(table, name), name)
            })
            .collect();
        let vigil_name = |n: &str| by_slurm.get(n).map_or(n, |v| *v).to_owned();
        let named = jobs
            .iter()
            .map(|j| SlurmJob {
                nodes: j.nodes.iter().map(|n| vigil_name(n)).collect(),
                ..j.clone()
            })
            .collect();
        // A full engine queue only delays: the next round sends the listing again.
        let _ = self
            .engine
            .send(Event::SlurmJobs {
                jobs: named,
                complete,
            })
            .await;
        let recorded = snapshot.slurm_jobs.awaiting_rerun();
        let listed: BTreeSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        self.sent
            .retain(|id| listed.contains(id.as_str()) && !recorded.contains(id));
        let requeued: BTreeSet<String> = recorded.union(&self.sent).cloned().collect();
        let actions = slurm::plan(&intents, &nodes, &jobs, &requeued);
        let acted = !actions.is_empty();
        for action in actions {
            match act(&self.config, &action).await {
                Ok(()) => {
                    self.metrics.slurm.count(label(&action), true);
                    let event = match &action {
                        Action::Requeue { job, node, reason } => {
                            self.sent.insert(job.clone());
                            Some(Event::SlurmRequeued {
                                job: job.clone(),
                                node: vigil_name(node),
                                reason: reason.clone(),
                            })
                        }
                        other => history(other).map(|(node, message)| Event::Slurm {
                            node: vigil_name(node),
                            message,
                        }),
                    };
                    if let Some(event) = event {
                        // A full engine queue only delays; the log line above is the record.
                        let _ = self.engine.send(event).await;
                    }
                }
                Err(e) => {
                    self.metrics.slurm.count(label(&action), false);
                    warn!(error = %e, ?action, "slurm: action failed; tried again next round");
                }
            }
        }
        let admin = nodes
            .iter()
            .filter(|n| n.drained_by_admin())
            .filter_map(|n| {
                Some((
                    (*by_slurm.get(n.name.as_str())?).to_owned(),
                    n.reason.clone(),
                ))
            })
            .collect();
        Ok((admin, acted))
    }
}

/// The Slurm node a drain or resume concerns and the line for its vigil node's history; none
/// for a requeue (the engine records it on the node and the job) or a hold release.
fn history(action: &Action) -> Option<(&str, String)> {
    match action {
        Action::Drain { node, reason } => Some((node, format!("drained in slurm: {reason}"))),
        Action::Resume { node } => Some((node, "resumed in slurm".to_owned())),
        Action::Requeue { .. } | Action::Release { .. } => None,
    }
}

fn label(action: &Action) -> &'static str {
    match action {
        Action::Drain { .. } => "drain",
        Action::Resume { .. } => "resume",
        Action::Requeue { .. } => "requeue",
        Action::Release { .. } => "release",
    }
}

/// Slurm's nodes and jobs (also those ended lately, until Slurm's `MinJobAge`), and whether
/// every line of the job listing parsed.
async fn read(config: &SlurmConfig) -> Result<(Vec<SlurmNode>, Vec<SlurmJob>, bool), SlurmError> {
    let format = format!("--format={}", slurm::parse::SINFO_FORMAT);
    let text = command::run(config, "sinfo", &["--noheader", "--Node", &format]).await?;
    let (nodes, bad_nodes) = slurm::parse::sinfo(&text);
    let format = format!("--format={}", slurm::parse::SQUEUE_FORMAT);
    let text = command::run(config, "squeue", &["--noheader", "--states=all", &format]).await?;
    let (jobs, bad_jobs) = slurm::parse::squeue(&text);
    if bad_nodes + bad_jobs > 0 {
        warn!(
            bad_nodes,
            bad_jobs, "slurm: skipped lines of sinfo/squeue output that do not parse"
        );
    }
    Ok((nodes, jobs, bad_jobs == 0))
}

/// Carries out one action with `scontrol`, and logs it once done.
async fn act(config: &SlurmConfig, action: &Action) -> Result<(), SlurmError> {
    match action {
        Action::Drain { node, reason } => {
            let (name, why) = (format!("NodeName={node}"), format!("Reason={reason}"));
            command::run(config, "scontrol", &["update", &name, "State=DRAIN", &why]).await?;
            info!(node = %node, reason = %reason, "drained slurm node {node}: {reason}");
        }
        Action::Resume { node } => {
            let name = format!("NodeName={node}");
            command::run(config, "scontrol", &["update", &name, "State=RESUME"]).await?;
            info!(node = %node, "resumed slurm node {node}: vigil uncordoned it");
        }
        Action::Requeue { job, node, reason } => {
            command::run(config, "scontrol", &["requeue", job]).await?;
            info!(
                job = %job,
                node = %node,
                reason = %reason,
                "requeued slurm job {job}: {reason} on {node}"
            );
        }
        Action::Release { job } => {
            let id = format!("JobId={job}");
            command::run(config, "scontrol", &["update", &id, "StartTime=now"]).await?;
            info!(job = %job, "released slurm job {job} from its requeue hold: it runs again now");
        }
    }
    Ok(())
}
