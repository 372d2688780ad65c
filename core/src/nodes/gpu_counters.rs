//! The GPU error counters' rules, pure: rate rules on counters that only grow (PCIe replays,
//! NVLink CRC/replay/recovery errors), and which NVLinks count at all.
//!
//! - A counter rising by a threshold within `[health.rates] window` makes the node Degraded
//!   (or Unhealthy, where that threshold is set). One number per GPU: the PCIe replay counter;
//!   the sum of every link's CRC, replay and recovery counters.
//! - An NVLink counts as down only if it was active in the node's first sample after it
//!   registered: boards with unused links must not be cordoned for them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use vigil_proto::v1::GpuSample;

use crate::config::RateConfig;
use crate::counter_window::{CounterWindow, millis};
use crate::health::{Condition, Finding};

/// Which counter of a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    PcieReplays,
    NvLinkErrors,
}

/// What the policy remembers of one node's GPU counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuCounters {
    /// Per GPU index, the NVLinks active in the first sample after registration; `None` until
    /// that sample. Shared: set once per registration, and nodes are cloned for every snapshot.
    pub nvlink_baseline: Option<Arc<BTreeMap<u32, Vec<u32>>>>,
    /// From the latest heartbeat.
    pub findings: Vec<Finding>,
    /// Whether the last [`Self::used_links`] left a link out.
    links_left_out: bool,
    windows: Vec<((u32, Counter), CounterWindow)>,
}

fn nvlink_errors(s: &GpuSample) -> Option<u64> {
    let mut any = false;
    let mut total = 0u64;
    for l in &s.nvlinks {
        for v in [l.crc_errors, l.replay_errors, l.recovery_errors]
            .into_iter()
            .flatten()
        {
            any = true;
            total = total.saturating_add(v);
        }
    }
    any.then_some(total)
}

impl GpuCounters {
    /// A registration: a new baseline of links, and counters start over.
    pub fn register(&mut self) {
        *self = Self::default();
    }

    /// The operator says the node is fixed: rises so far no longer count.
    pub fn forget(&mut self) {
        self.windows.iter_mut().for_each(|(_, w)| w.forget());
    }

    /// `samples` with every NVLink not active at the baseline left out, so that the sample
    /// rules judge only links that were in use; the first samples after registration set the
    /// baseline. Borrowed when nothing is left out (the common case).
    pub fn used_links<'a>(&mut self, samples: &'a [GpuSample]) -> Cow<'a, [GpuSample]> {
        if samples.is_empty() {
            return Cow::Borrowed(samples);
        }
        let baseline = self.nvlink_baseline.get_or_insert_with(|| {
            Arc::new(
                samples
                    .iter()
                    .map(|s| {
                        let active = s.nvlinks.iter().filter(|l| l.active).map(|l| l.link);
                        (s.index, active.collect())
                    })
                    .collect(),
            )
        });
        let unused = |s: &GpuSample, link: u32| {
            !baseline
                .get(&s.index)
                .is_some_and(|active| active.contains(&link))
        };
        self.links_left_out = samples
            .iter()
            .any(|s| s.nvlinks.iter().any(|l| unused(s, l.link)));
        if !self.links_left_out {
            return Cow::Borrowed(samples);
        }
        Cow::Owned(
            samples
                .iter()
                .map(|s| {
                    let mut s2 = s.clone();
                    s2.nvlinks.retain(|l| !unused(s, l.link));
                    s2
                })
                .collect(),
        )
    }

    /// [`Self::used_links`] of samples whose NVLinks are those it was last given (a heartbeat
    /// that says GPU health is unchanged): the same links are left out, so when none was the
    /// search is skipped.
    pub fn used_links_again<'a>(&mut self, samples: &'a [GpuSample]) -> Cow<'a, [GpuSample]> {
        if self.nvlink_baseline.is_some() && !self.links_left_out {
            return Cow::Borrowed(samples);
        }
        self.used_links(samples)
    }

    /// Judge the rates of one heartbeat's samples at `now_ms` (monotonic).
    pub fn judge(&mut self, samples: &[GpuSample], now_ms: u64, cfg: &RateConfig) {
        let window = millis(cfg.window);
        let mut out = Vec::new();
        for s in samples {
            let counters = [
                (Counter::PcieReplays, s.pcie_replay_counter),
                (Counter::NvLinkErrors, nvlink_errors(s)),
            ];
            for (counter, value) in counters {
                let Some(total) = value else { continue };
                let key = (s.index, counter);
                let rise = match self.windows.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, w)) => {
                        w.observe(total, now_ms, window);
                        w.rise()
                    }
                    None => {
                        self.windows.push((key, CounterWindow::new(total, now_ms)));
                        0
                    }
                };
                let (degraded, unhealthy, rule, what) = match counter {
                    Counter::PcieReplays => (
                        cfg.pcie_replays_degraded,
                        cfg.pcie_replays_unhealthy,
                        "pcie_replay_rate",
                        "PCIe replays",
                    ),
                    Counter::NvLinkErrors => (
                        cfg.nvlink_errors_degraded,
                        cfg.nvlink_errors_unhealthy,
                        "nvlink_error_rate",
                        "NVLink CRC/replay/recovery errors",
                    ),
                };
                let over = |limit: u64| limit > 0 && rise >= limit;
                let condition = if over(unhealthy) {
                    Condition::Unhealthy
                } else if over(degraded) {
                    Condition::Degraded
                } else {
                    continue;
                };
                out.push(Finding {
                    condition,
                    rule,
                    gpu: Some(s.index),
                    message: format!(
                        "{rise} {what} on GPU {} within {}",
                        s.index,
                        humantime::format_duration(cfg.window)
                    ),
                    observed_at_ms: s.observed_at_unix_ms,
                });
            }
        }
        self.findings = out;
    }
}

#[cfg(test)]
#[path = "gpu_counters_tests.rs"]
mod tests;
