//! Prometheus metrics of the scheduled backups of the state store (`[backup]`,
//! `store::backup::schedule`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::ResultLabel;

/// Seconds since the last good backup, computed when scraped; NaN while there is none.
#[derive(Debug, Default, Clone)]
pub struct BackupAge {
    /// Unix ms of the last good backup; 0: none yet.
    last_ok_unix_ms: Arc<AtomicU64>,
}

impl BackupAge {
    pub fn seconds(&self, now_unix_ms: u64) -> f64 {
        match self.last_ok_unix_ms.load(Ordering::Relaxed) {
            0 => f64::NAN,
            ms => now_unix_ms.saturating_sub(ms) as f64 / 1000.0,
        }
    }
}

impl EncodeMetric for BackupAge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.seconds(super::unix_ms(SystemTime::now())))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

#[derive(Default)]
pub struct BackupMetrics {
    pub age: BackupAge,
    pub interval: Gauge<f64, AtomicU64>,
    pub backups: Family<ResultLabel, Counter>,
}

impl BackupMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "vigil_store_backup_age",
            "Since the last good backup of the state store (scheduled, [backup]; one found in \
             backup.dir at start counts); NaN while there is none",
            Unit::Seconds,
            self.age.clone(),
        );
        registry.register_with_unit(
            "vigil_store_backup_interval",
            "backup.interval of the scheduled backups; 0 when they are off (no [backup])",
            Unit::Seconds,
            self.interval.clone(),
        );
        registry.register(
            "vigil_store_backups",
            "Scheduled backups of the state store, by result (ok: written and checked; error)",
            self.backups.clone(),
        );
        for result in ["ok", "error"] {
            let _ = self.backups.get_or_create(&ResultLabel {
                result: result.to_owned(),
            });
        }
    }

    /// Scheduled backups are on, every `interval`.
    pub fn configured(&self, interval: Duration) {
        self.interval.set(interval.as_secs_f64());
    }

    /// A good backup taken at `unix_ms` by this coordinator: counted, and the age starts over.
    pub fn succeeded(&self, unix_ms: u64) {
        self.found(unix_ms);
        self.count("ok");
    }

    /// A good backup taken at `unix_ms` exists (one found in `backup.dir` at start).
    pub fn found(&self, unix_ms: u64) {
        self.age
            .last_ok_unix_ms
            .fetch_max(unix_ms.max(1), Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.count("error");
    }

    fn count(&self, result: &str) {
        self.backups
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }
}
