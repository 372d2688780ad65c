//! Latency statistics: a log-linear (HDR-like) histogram of atomic counters
//! for the many heartbeat samples, exact nearest-rank percentiles for the few
//! others. No dependency beyond std and serde_json.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

/// 32 sub-buckets per power of two: a value is known to within about 3%.
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUB;

/// Counts of microsecond values, shared by every agent task without a lock.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    max_us: AtomicU64,
    sum_us: AtomicU64,
}

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = ((v >> shift) as usize) & (SUB - 1);
    (shift as usize + 1) * SUB + sub
}

/// The highest value that lands in bucket `i`.
fn upper(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let shift = (i / SUB - 1) as u32;
    let low = ((SUB + i % SUB) as u64) << shift;
    low + ((1u64 << shift) - 1)
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[index(us)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The value at quantile `q` (0..=1), in microseconds: the upper edge of
    /// its bucket, never above the largest value seen.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(upper(i).min(self.max_us.load(Ordering::Relaxed)));
            }
        }
        Some(self.max_us.load(Ordering::Relaxed))
    }

    /// `{count, p50_ms, p90_ms, p99_ms, p999_ms, max_ms, mean_ms}`.
    pub fn summary(&self) -> Value {
        let count = self.count();
        let ms = |q: f64| self.quantile_us(q).map(|us| round3(us as f64 / 1000.0));
        let mean = (count > 0)
            .then(|| round3(self.sum_us.load(Ordering::Relaxed) as f64 / count as f64 / 1000.0));
        json!({
            "count": count,
            "p50_ms": ms(0.50),
            "p90_ms": ms(0.90),
            "p99_ms": ms(0.99),
            "p999_ms": ms(0.999),
            "max_ms": (count > 0).then(|| round3(self.max_us.load(Ordering::Relaxed) as f64 / 1000.0)),
            "mean_ms": mean,
        })
    }
}

/// Exact nearest-rank percentile of sorted `v`.
fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// `{count, p50_ms, p90_ms, p99_ms, max_ms, min_ms}` of millisecond samples.
pub fn summarize_ms(samples: &[f64]) -> Value {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let p = |q| percentile(&v, q).map(round3);
    json!({
        "count": v.len(),
        "min_ms": v.first().copied().map(round3),
        "p50_ms": p(0.50),
        "p90_ms": p(0.90),
        "p99_ms": p(0.99),
        "max_ms": v.last().copied().map(round3),
    })
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut last = 0;
        for v in 0..100_000u64 {
            let i = index(v);
            assert!(i >= last, "index must not decrease at {v}");
            last = i;
            assert!(upper(i) >= v, "{v} above its bucket's edge {}", upper(i));
            assert!(
                upper(i) as f64 <= v as f64 * 1.04 + 1.0,
                "bucket of {v} too wide"
            );
        }
        assert!(index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles_follow_the_data() {
        let h = Histogram::default();
        for ms_ in 1..=1000u64 {
            h.record(Duration::from_millis(ms_));
        }
        let p50 = h.quantile_us(0.5).unwrap_or(0);
        let p99 = h.quantile_us(0.99).unwrap_or(0);
        assert!((500_000..=520_000).contains(&p50), "{p50}");
        assert!((990_000..=1_000_000).contains(&p99), "{p99}");
        assert_eq!(h.count(), 1000);
    }

    #[test]
    fn exact_percentiles_use_nearest_rank() {
        let s = summarize_ms(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(s["p50_ms"], json!(3.0));
        assert_eq!(s["max_ms"], json!(5.0));
        assert_eq!(summarize_ms(&[])["p99_ms"], Value::Null);
    }
}
