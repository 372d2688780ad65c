//! Prometheus series of goodput accounting: per job ETTR, productive and
//! lost seconds by phase, the checkpoint interval against Young's; and each
//! running job's straggler count. Slurm jobs vigil records (`[slurm]`) get the same series,
//! labelled `job_id="slurm:<id>"`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use vigil_core::slurm::goodput as slurm_goodput;
use vigil_core::slurm::jobs::Ledger;

use crate::goodput::{self, Phase};
use crate::job::Job;

/// How many jobs get goodput series (bounded cardinality): running and
/// recent ones first.
const MAX_JOBS: usize = 100;

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    pub job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobPhaseLabel {
    pub job_id: String,
    pub phase: String,
}

#[derive(Default)]
pub struct GoodputMetrics {
    ettr: Family<JobLabel, FloatGauge>,
    wall: Family<JobLabel, FloatGauge>,
    productive: Family<JobLabel, FloatGauge>,
    lost: Family<JobPhaseLabel, FloatGauge>,
    interval: Family<JobLabel, FloatGauge>,
    suggested: Family<JobLabel, FloatGauge>,
    stragglers: Family<JobLabel, Gauge>,
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl GoodputMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_job_ettr_ratio",
            "Effective training time ratio of each job: productive / wall time (at most 100 jobs)",
            self.ettr.clone(),
        );
        registry.register_with_unit(
            "vigil_job_wall_time",
            "Wall time of each job since its submission (to its end when finished)",
            Unit::Seconds,
            self.wall.clone(),
        );
        registry.register_with_unit(
            "vigil_job_productive_time",
            "Time each job made new training progress",
            Unit::Seconds,
            self.productive.clone(),
        );
        registry.register_with_unit(
            "vigil_job_lost_time",
            "Time each job lost, by phase: queued, detection, teardown, waiting, startup, recomputation",
            Unit::Seconds,
            self.lost.clone(),
        );
        registry.register_with_unit(
            "vigil_job_checkpoint_interval",
            "Median time between each job's consecutive complete checkpoints",
            Unit::Seconds,
            self.interval.clone(),
        );
        registry.register_with_unit(
            "vigil_job_suggested_checkpoint_interval",
            "Checkpoint interval maximizing goodput (Young: sqrt(2 x save time x MTBF)) from observed failures",
            Unit::Seconds,
            self.suggested.clone(),
        );
        registry.register(
            "vigil_job_stragglers",
            "Nodes of each running job flagged as stragglers (step rate consistently below the gang's median)",
            self.stragglers.clone(),
        );
    }

    /// vigil's jobs (running first, then the newest) and the Slurm jobs vigil records (id
    /// `slurm:<id>`, the same order), at most [`MAX_JOBS`] of each.
    pub fn observe<'a>(&self, jobs: impl Iterator<Item = &'a Job>, slurm: &Ledger, now_ms: u64) {
        let mut jobs: Vec<&Job> = jobs.collect();
        jobs.sort_by_key(|j| (j.phase.is_terminal(), std::cmp::Reverse(j.seq)));
        self.ettr.clear();
        self.wall.clear();
        self.productive.clear();
        self.lost.clear();
        self.interval.clear();
        self.suggested.clear();
        self.stragglers.clear();
        for job in jobs.into_iter().take(MAX_JOBS) {
            self.set(&job.id, &goodput::account(job, now_ms));
            if job.phase == crate::job::JobPhase::Running {
                let label = JobLabel {
                    job_id: job.id.clone(),
                };
                self.stragglers
                    .get_or_create(&label)
                    .set(i64::try_from(job.stragglers.len()).unwrap_or(i64::MAX));
            }
        }
        let mut records: Vec<_> = slurm.jobs.values().collect();
        records.sort_by_key(|r| {
            let start = r.runs.first().map_or(0, |run| run.started_ms);
            (r.finished.is_some(), std::cmp::Reverse(start))
        });
        for r in records.into_iter().take(MAX_JOBS) {
            self.set(&r.shown_id(), &slurm_goodput::account(r, now_ms));
        }
    }

    /// One job's series.
    fn set(&self, id: &str, g: &goodput::Goodput) {
        let label = JobLabel {
            job_id: id.to_owned(),
        };
        self.ettr.get_or_create(&label).set(g.ettr);
        self.wall.get_or_create(&label).set(secs(g.wall_ms));
        self.productive
            .get_or_create(&label)
            .set(secs(g.productive_ms));
        for phase in Phase::LOST {
            let ms = match phase {
                Phase::Queued => g.queued_ms,
                Phase::Detection => g.detection_ms,
                Phase::Teardown => g.teardown_ms,
                Phase::Waiting => g.waiting_ms,
                Phase::Startup => g.startup_ms,
                Phase::Recomputation => g.recomputation_ms,
                Phase::Productive => continue,
            };
            self.lost
                .get_or_create(&JobPhaseLabel {
                    job_id: id.to_owned(),
                    phase: phase.as_str().to_owned(),
                })
                .set(secs(ms));
        }
        if let Some(ms) = g.checkpoint_interval_ms {
            self.interval.get_or_create(&label).set(secs(ms));
        }
        if let Some(ms) = g.suggested_interval_ms {
            self.suggested.get_or_create(&label).set(secs(ms));
        }
    }
}
