//! The per-GPU tables of `node NAME`: inventory, and health from the last sample and the
//! coordinator's judgement. `n/a`: not supported by the GPU or driver; `-`: nothing yet.

use vigil_proto::gpu_sample::{below_max, has_nvlinks};

use super::or_dash;
use crate::model::{GpuSample, NodeDetail};
use crate::table::{Table, format_gib};

/// Shown for a field the GPU or driver does not support.
const NOT_SUPPORTED: &str = "n/a";

/// UUIDs are long; this many characters tell GPUs apart (`GPU-` and 8 hex digits).
const UUID_SHOWN: usize = 12;

pub fn inventory_table(d: &NodeDetail) -> String {
    if d.gpus.is_empty() {
        return "GPUS: none reported\n".to_string();
    }
    let mut t = Table::with_headers(&["INDEX", "UUID", "NAME", "PCI-BUS", "MEMORY"]);
    for g in &d.gpus {
        t.push([
            g.index.to_string(),
            or_dash(&g.uuid).to_string(),
            or_dash(&g.name).to_string(),
            or_dash(&g.pci_bus_id).to_string(),
            format_gib(g.memory_total_bytes),
        ]);
    }
    format!("GPUS{}\n{}", simulated(d), t.render())
}

/// The CONDITION column, last, is cut to fit `term.width`.
pub fn health_table(d: &NodeDetail, term: crate::term::Term) -> String {
    if d.gpus.is_empty() {
        return String::new();
    }
    let mut t = Table::with_headers(&[
        "INDEX",
        "UUID",
        "TEMP",
        "POWER",
        "UTIL",
        "ECC",
        "REMAP",
        "THROTTLE",
        "PCIE",
        "NVLINK",
        "CONDITION",
    ])
    .fit(term.width);
    for g in &d.gpus {
        let mut row = vec![g.index.to_string(), short_uuid(&g.uuid)];
        row.extend(sample_cells(d.sample(g.index)));
        row.push(d.health(g.index).map_or_else(
            || "-".to_string(),
            |h| with_first_reason(h.condition.as_str(), &h.reasons),
        ));
        t.push(row);
    }
    format!("GPU HEALTH{}\n{}", simulated(d), t.render())
}

fn simulated(d: &NodeDetail) -> &'static str {
    if d.node.simulated { " (SIMULATED)" } else { "" }
}

fn short_uuid(uuid: &str) -> String {
    if uuid.chars().count() <= UUID_SHOWN + 1 {
        return or_dash(uuid).to_string();
    }
    let head: String = uuid.chars().take(UUID_SHOWN).collect();
    format!("{head}…")
}

/// `Degraded: first reason (+2 more)`, or just the condition when there is no reason.
pub fn with_first_reason(condition: &str, reasons: &[String]) -> String {
    match reasons {
        [] => condition.to_string(),
        [only] => format!("{condition}: {only}"),
        [first, rest @ ..] => format!("{condition}: {first} (+{} more)", rest.len()),
    }
}

/// TEMP through NVLINK; all `-` when no sample arrived yet.
fn sample_cells(sample: Option<&GpuSample>) -> [String; 8] {
    let Some(s) = sample else {
        return std::array::from_fn(|_| "-".to_string());
    };
    [
        temperature(s),
        opt(s.power_w, |v| format!("{v:.0}W")),
        opt(s.utilization_pct, |v| format!("{v}%")),
        ecc(s),
        remap(s),
        throttle(s),
        pcie(s),
        nvlink(s),
    ]
}

fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| NOT_SUPPORTED.to_string(), show)
}

/// GPU temperature, then the memory's after a slash when the GPU reports it.
fn temperature(s: &GpuSample) -> String {
    let gpu = opt(s.temperature_c, |v| format!("{v:.0}C"));
    match s.memory_temperature_c {
        Some(mem) => format!("{gpu}/{mem:.0}C"),
        None => gpu,
    }
}

/// Uncorrected ECC errors: volatile (since boot) / aggregate (lifetime).
fn ecc(s: &GpuSample) -> String {
    if s.ecc_uncorrected_volatile.is_none() && s.ecc_uncorrected_aggregate.is_none() {
        return NOT_SUPPORTED.to_string();
    }
    let show = |v: Option<u64>| opt(v, |v| v.to_string());
    format!(
        "{}/{}",
        show(s.ecc_uncorrected_volatile),
        show(s.ecc_uncorrected_aggregate)
    )
}

/// Remapped rows `correctable/uncorrectable` (Ampere and later), else retired pages
/// `ret single/double` (older GPUs); `pending` and `FAILED` mark what needs a reset or an RMA.
fn remap(s: &GpuSample) -> String {
    let show = |v: Option<u64>| opt(v, |v| v.to_string());
    let (mut text, pending) =
        if s.remapped_rows_correctable.is_some() || s.remapped_rows_uncorrectable.is_some() {
            let counts = format!(
                "{}/{}",
                show(s.remapped_rows_correctable),
                show(s.remapped_rows_uncorrectable)
            );
            (counts, s.remapped_rows_pending)
        } else if s.retired_pages_single_bit.is_some() || s.retired_pages_double_bit.is_some() {
            let counts = format!(
                "ret {}/{}",
                show(s.retired_pages_single_bit),
                show(s.retired_pages_double_bit)
            );
            (counts, s.retired_pages_pending)
        } else {
            (NOT_SUPPORTED.to_string(), s.remapped_rows_pending)
        };
    if pending == Some(true) {
        text.push_str(" pending");
    }
    if s.remapped_rows_failure == Some(true) {
        text.push_str(" FAILED");
    }
    text
}

/// The clock event (throttle) reasons active now, `-` for none.
fn throttle(s: &GpuSample) -> String {
    let reasons = [
        ("hw-slowdown", s.throttle_hw_slowdown),
        ("thermal", s.throttle_thermal),
        ("power-brake", s.throttle_power_brake),
    ];
    if reasons.iter().all(|(_, v)| v.is_none()) {
        return NOT_SUPPORTED.to_string();
    }
    let active: Vec<&str> = reasons
        .iter()
        .filter(|(_, v)| *v == Some(true))
        .map(|(name, _)| *name)
        .collect();
    if active.is_empty() {
        "-".to_string()
    } else {
        active.join(",")
    }
}

/// `gen5 x16`; `(max x16)` when the link trained narrower than it can; replays when any.
/// (A lower generation than the maximum is normal: idle GPUs slow their link down.)
fn pcie(s: &GpuSample) -> String {
    let mut text = match (s.pcie_link_gen_current, s.pcie_link_width_current) {
        (None, None) => NOT_SUPPORTED.to_string(),
        (Some(g), None) => format!("gen{g}"),
        (None, Some(w)) => format!("x{w}"),
        (Some(g), Some(w)) => format!("gen{g} x{w}"),
    };
    if let Some((_, max)) = below_max(s.pcie_link_width_current, s.pcie_link_width_max) {
        text.push_str(&format!(" (max x{max})"));
    }
    if let Some(replays @ 1..) = s.pcie_replay_counter {
        text.push_str(&format!(", {replays} replays"));
    }
    text
}

/// `18/18 up`, with the links' error count when there are any; `n/a` without NVLink (the
/// protocol's `has_nvlinks`: none listed, or the GPU says it has none).
fn nvlink(s: &GpuSample) -> String {
    if !has_nvlinks(s.nvlink_supported, s.nvlinks.len()) {
        return NOT_SUPPORTED.to_string();
    }
    let up = s.nvlinks.iter().filter(|l| l.active).count();
    let errors: u64 = s
        .nvlinks
        .iter()
        .flat_map(|l| [l.crc_errors, l.replay_errors, l.recovery_errors])
        .flatten()
        .fold(0, u64::saturating_add);
    let mut text = format!("{up}/{} up", s.nvlinks.len());
    if errors > 0 {
        text.push_str(&format!(", {errors} errors"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::v1;

    fn healthy_h100() -> v1::GpuSample {
        v1::GpuSample {
            temperature_c: Some(45.4),
            memory_temperature_c: Some(52.0),
            ecc_uncorrected_volatile: Some(0),
            ecc_uncorrected_aggregate: Some(2),
            remapped_rows_correctable: Some(1),
            remapped_rows_uncorrectable: Some(0),
            remapped_rows_pending: Some(false),
            remapped_rows_failure: Some(false),
            throttle_hw_slowdown: Some(false),
            throttle_thermal: Some(false),
            throttle_power_brake: Some(false),
            pcie_link_gen_current: Some(5),
            pcie_link_gen_max: Some(5),
            pcie_link_width_current: Some(16),
            pcie_link_width_max: Some(16),
            pcie_replay_counter: Some(0),
            nvlinks: (0..18)
                .map(|link| v1::NvLinkStatus {
                    link,
                    active: true,
                    crc_errors: Some(0),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_gpu_reads_at_a_glance() {
        let s = GpuSample::from(healthy_h100());
        assert_eq!(temperature(&s), "45C/52C");
        assert_eq!(ecc(&s), "0/2");
        assert_eq!(remap(&s), "1/0");
        assert_eq!(throttle(&s), "-");
        assert_eq!(pcie(&s), "gen5 x16");
        assert_eq!(nvlink(&s), "18/18 up");
    }

    #[test]
    fn faults_are_marked() {
        let mut raw = healthy_h100();
        raw.remapped_rows_pending = Some(true);
        raw.remapped_rows_failure = Some(true);
        raw.throttle_hw_slowdown = Some(true);
        raw.throttle_thermal = Some(true);
        raw.pcie_link_gen_current = Some(3);
        raw.pcie_link_width_current = Some(8);
        raw.pcie_replay_counter = Some(12);
        raw.nvlinks[3].active = false;
        raw.nvlinks[4].crc_errors = Some(7);
        let s = GpuSample::from(raw);
        assert_eq!(remap(&s), "1/0 pending FAILED");
        assert_eq!(throttle(&s), "hw-slowdown,thermal");
        assert_eq!(pcie(&s), "gen3 x8 (max x16), 12 replays");
        assert_eq!(nvlink(&s), "17/18 up, 7 errors");
    }

    #[test]
    fn unsupported_fields_are_not_applicable() {
        let s = GpuSample::default();
        for cell in [
            temperature(&s),
            ecc(&s),
            remap(&s),
            throttle(&s),
            pcie(&s),
            nvlink(&s),
        ] {
            assert_eq!(cell, "n/a");
        }
        let old = GpuSample {
            retired_pages_single_bit: Some(2),
            retired_pages_double_bit: Some(0),
            retired_pages_pending: Some(true),
            ..Default::default()
        };
        assert_eq!(remap(&old), "ret 2/0 pending");
    }

    #[test]
    fn links_of_a_gpu_that_says_it_has_no_nvlink_are_not_shown() {
        let mut raw = healthy_h100();
        raw.nvlinks[0].active = false;
        raw.nvlink_supported = Some(false);
        assert_eq!(nvlink(&GpuSample::from(raw)), "n/a");
    }

    #[test]
    fn long_uuids_are_shortened() {
        assert_eq!(
            short_uuid("GPU-5f3c2a1b-0000-1111-2222-333344445555"),
            "GPU-5f3c2a1b…"
        );
        assert_eq!(short_uuid("GPU-sim-0"), "GPU-sim-0");
        assert_eq!(short_uuid(""), "-");
    }

    #[test]
    fn conditions_show_their_first_reason() {
        assert_eq!(with_first_reason("Healthy", &[]), "Healthy");
        let reasons = ["hot".to_string(), "slow".to_string(), "x".to_string()];
        assert_eq!(
            with_first_reason("Degraded", &reasons[..1]),
            "Degraded: hot"
        );
        assert_eq!(
            with_first_reason("Degraded", &reasons),
            "Degraded: hot (+2 more)"
        );
    }
}
