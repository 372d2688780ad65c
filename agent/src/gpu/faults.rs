//! The simulator's fault file: its grammar, and what a file's content means (pure functions).
//!
//! One fault line: `gpu=N key[=value] ...`; `#` starts a comment. Faults are
//! state: the file's current content defines them, folded line by line in
//! order (so a later `gpu=N ok`, or `gpu=N clear`, undoes the lines above it).
//! XIDs are events: they fire for lines that are new since the previous read.
//! A fatal XID (one vigil classes fatal by default, e.g. 79) is state as well:
//! like the real GPU, the simulated one does not recover by itself, and stays
//! failed for as long as its line is in force.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// NVML_NVLINK_MAX_LINKS: an H100 has all 18.
pub const MAX_NVLINKS: u32 = 18;

/// Every key, as the fix for a mistyped one names them (and `--sim-fault-file`'s help lists them).
pub const KEYS: &str = "xid=K, ecc_uncorrected=K, ecc_corrected=K, temp=C, power=W, \
    retired_pending, remap_pending, remap_failure, remap_uncorrectable=K, hw_slowdown, \
    thermal_throttle, power_brake, pcie_width=W, pcie_gen=G, pcie_replay=K, nvlink_down=L, \
    lost, ok, clear";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    Xid(u32),
    EccUncorrected(u64),
    EccCorrected(u64),
    Temp(f32),
    Power(f32),
    RetiredPending,
    RemapPending,
    RemapFailure,
    RemapUncorrectable(u64),
    HwSlowdown,
    ThermalThrottle,
    PowerBrake,
    PcieWidth(u32),
    PcieGen(u32),
    PcieReplay(u64),
    NvlinkDown(u32),
    Lost,
    /// `ok` or `clear`: the GPU repaired.
    Clear,
}

/// One well-formed line.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultLine {
    /// 1-based, for messages.
    pub number: usize,
    /// Tokens joined by single spaces: whitespace edits do not make a line new.
    pub text: String,
    pub gpu: u32,
    pub faults: Vec<Fault>,
}

/// A malformed line, skipped; the message names the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub number: usize,
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.number, self.message)
    }
}

/// The faults in force on one GPU; `Default` is a healthy GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuFaults {
    pub ecc_uncorrected: Option<u64>,
    pub ecc_corrected: Option<u64>,
    pub temp: Option<f32>,
    pub power: Option<f32>,
    pub retired_pending: bool,
    pub remap_pending: bool,
    pub remap_failure: bool,
    pub remap_uncorrectable: Option<u64>,
    pub hw_slowdown: bool,
    pub thermal_throttle: bool,
    pub power_brake: bool,
    pub pcie_width: Option<u32>,
    pub pcie_gen: Option<u32>,
    pub pcie_replay: Option<u64>,
    pub nvlink_down: BTreeSet<u32>,
    pub lost: bool,
    /// Fatal XIDs the GPU has had since it was last repaired (`ok`): it needs a reset, so
    /// diagnostics fail (no sample field shows it).
    pub fatal_xids: BTreeSet<u32>,
}

/// Parses a whole file for a host with `gpus` GPUs: good lines, and the errors of the bad ones.
pub fn parse(text: &str, gpus: u32) -> (Vec<FaultLine>, Vec<LineError>) {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        match parse_line(raw, gpus) {
            Ok(Some((gpu, faults, text))) => lines.push(FaultLine {
                number,
                text,
                gpu,
                faults,
            }),
            Ok(None) => {}
            Err(message) => errors.push(LineError { number, message }),
        }
    }
    (lines, errors)
}

fn parse_line(raw: &str, gpus: u32) -> Result<Option<(u32, Vec<Fault>, String)>, String> {
    let content = raw.split('#').next().unwrap_or_default();
    let tokens: Vec<&str> = content.split_whitespace().collect();
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut gpu = None;
    let mut faults = Vec::new();
    for token in &tokens {
        let (key, value) = match token.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (*token, None),
        };
        if key == "gpu" {
            if gpu.is_some() {
                return Err("gpu= appears twice; write one fault line per GPU".to_owned());
            }
            let n: u32 = number(key, value)?;
            if n >= gpus {
                return Err(format!(
                    "gpu={n} is out of range: this agent simulates {gpus} GPUs (0-{}); \
                     use an index in that range",
                    gpus.saturating_sub(1)
                ));
            }
            gpu = Some(n);
        } else {
            faults.push(parse_fault(key, value)?);
        }
    }
    let Some(gpu) = gpu else {
        return Err("no gpu=N; start the line with the GPU index, e.g. `gpu=3 xid=79`".to_owned());
    };
    if faults.is_empty() {
        return Err(format!("gpu={gpu} names no fault; add one of {KEYS}"));
    }
    Ok(Some((gpu, faults, tokens.join(" "))))
}

fn parse_fault(key: &str, value: Option<&str>) -> Result<Fault, String> {
    let flag = |fault: Fault| match value {
        None => Ok(fault),
        Some(_) => Err(format!("{key} takes no value; write just `{key}`")),
    };
    Ok(match key {
        "xid" => match number(key, value)? {
            0 => return Err("xid=0 is not an XID; use the XID code, e.g. xid=79".to_owned()),
            k => Fault::Xid(k),
        },
        "ecc_uncorrected" => Fault::EccUncorrected(number(key, value)?),
        "ecc_corrected" => Fault::EccCorrected(number(key, value)?),
        "temp" => Fault::Temp(real(key, value, (-40.0, 200.0))?),
        "power" => Fault::Power(real(key, value, (0.0, 2000.0))?),
        "remap_uncorrectable" => Fault::RemapUncorrectable(number(key, value)?),
        "pcie_width" => Fault::PcieWidth(bounded(key, value, 1, 32)?),
        "pcie_gen" => Fault::PcieGen(bounded(key, value, 1, 6)?),
        "pcie_replay" => Fault::PcieReplay(number(key, value)?),
        "nvlink_down" => Fault::NvlinkDown(bounded(key, value, 0, MAX_NVLINKS - 1)?),
        "retired_pending" => flag(Fault::RetiredPending)?,
        "remap_pending" => flag(Fault::RemapPending)?,
        "remap_failure" => flag(Fault::RemapFailure)?,
        "hw_slowdown" => flag(Fault::HwSlowdown)?,
        "thermal_throttle" => flag(Fault::ThermalThrottle)?,
        "power_brake" => flag(Fault::PowerBrake)?,
        "lost" => flag(Fault::Lost)?,
        "ok" | "clear" => flag(Fault::Clear)?,
        other => return Err(format!("unknown key {other:?}; use one of {KEYS}")),
    })
}

fn number<T: std::str::FromStr>(key: &str, value: Option<&str>) -> Result<T, String> {
    let v = value.ok_or_else(|| format!("{key} needs a value; write `{key}=N`"))?;
    v.parse()
        .map_err(|_| format!("{key}={v:?} is not a whole number; write `{key}=N`"))
}

fn bounded(key: &str, value: Option<&str>, lo: u32, hi: u32) -> Result<u32, String> {
    let n: u32 = number(key, value)?;
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{key}={n} is out of range; use {lo} to {hi}"))
    }
}

fn real(key: &str, value: Option<&str>, (lo, hi): (f32, f32)) -> Result<f32, String> {
    let v = value.ok_or_else(|| format!("{key} needs a value; write `{key}=N`"))?;
    match v.parse::<f32>() {
        Ok(x) if (lo..=hi).contains(&x) => Ok(x),
        _ => Err(format!("{key}={v:?} is not a number from {lo} to {hi}")),
    }
}

/// The faults in force on each of `gpus` GPUs, lines applied in file order.
pub fn fold(lines: &[FaultLine], gpus: u32) -> Vec<GpuFaults> {
    let mut state = vec![GpuFaults::default(); gpus as usize];
    for line in lines {
        let Some(gpu) = state.get_mut(line.gpu as usize) else {
            continue;
        };
        for fault in &line.faults {
            apply(gpu, *fault);
        }
    }
    state
}

fn apply(g: &mut GpuFaults, fault: Fault) {
    match fault {
        Fault::Xid(k) => {
            if is_fatal(k) {
                g.fatal_xids.insert(k);
            }
        }
        Fault::EccUncorrected(k) => g.ecc_uncorrected = Some(k),
        Fault::EccCorrected(k) => g.ecc_corrected = Some(k),
        Fault::Temp(c) => g.temp = Some(c),
        Fault::Power(w) => g.power = Some(w),
        Fault::RetiredPending => g.retired_pending = true,
        Fault::RemapPending => g.remap_pending = true,
        Fault::RemapFailure => g.remap_failure = true,
        Fault::RemapUncorrectable(k) => g.remap_uncorrectable = Some(k),
        Fault::HwSlowdown => g.hw_slowdown = true,
        Fault::ThermalThrottle => g.thermal_throttle = true,
        Fault::PowerBrake => g.power_brake = true,
        Fault::PcieWidth(w) => g.pcie_width = Some(w),
        Fault::PcieGen(n) => g.pcie_gen = Some(n),
        Fault::PcieReplay(k) => g.pcie_replay = Some(k),
        Fault::NvlinkDown(l) => {
            g.nvlink_down.insert(l);
        }
        Fault::Lost => g.lost = true,
        Fault::Clear => *g = GpuFaults::default(),
    }
}

/// Whether the GPU needs a reset after XID `k`: vigil's default class for it is fatal (a
/// coordinator's `[health.xid]` overrides do not reach the simulator).
pub fn is_fatal(k: u32) -> bool {
    vigil_core::xid::catalog()
        .get(&k)
        .is_some_and(|info| info.class == vigil_core::xid::XidClass::Fatal)
}

/// `(gpu, xid)` for each XID on a line of `after` that `before` did not have.
///
/// A multiset diff on the line text: a line that stays is not new, a line
/// added twice fires twice, and a changed or re-added line fires again.
pub fn new_xids(before: &[FaultLine], after: &[FaultLine]) -> Vec<(u32, u32)> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for line in before {
        *seen.entry(line.text.as_str()).or_default() += 1;
    }
    let mut fired = Vec::new();
    for line in after {
        if let Some(n) = seen.get_mut(line.text.as_str()).filter(|n| **n > 0) {
            *n -= 1;
            continue;
        }
        fired.extend(line.faults.iter().filter_map(|f| match f {
            Fault::Xid(k) => Some((line.gpu, *k)),
            _ => None,
        }));
    }
    fired
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<FaultLine> {
        let (lines, errors) = parse(text, 8);
        assert!(errors.is_empty(), "{errors:?}");
        lines
    }

    fn error(text: &str) -> String {
        let (lines, errors) = parse(text, 8);
        assert!(lines.is_empty(), "{lines:?}");
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].to_string()
    }

    #[test]
    fn every_key_parses() {
        let text = "gpu=0 xid=79 ecc_uncorrected=2 ecc_corrected=5 temp=97 power=650.5\n\
                    gpu=1 retired_pending remap_pending remap_failure remap_uncorrectable=3\n\
                    gpu=2 hw_slowdown thermal_throttle power_brake\n\
                    gpu=3 pcie_width=8 pcie_gen=3 pcie_replay=100 nvlink_down=17\n\
                    gpu=4 lost\n\
                    gpu=5 clear\n\
                    gpu=6 ok\n";
        let l = lines(text);
        assert_eq!(l.len(), 7);
        assert_eq!(
            l[0].faults,
            [
                Fault::Xid(79),
                Fault::EccUncorrected(2),
                Fault::EccCorrected(5),
                Fault::Temp(97.0),
                Fault::Power(650.5)
            ]
        );
        assert_eq!(l[3].faults[3], Fault::NvlinkDown(17));
        assert_eq!(l[4].faults, [Fault::Lost]);
        assert_eq!((l[5].gpu, l[5].number), (5, 6));
        assert_eq!(l[6].faults, [Fault::Clear]);
    }

    #[test]
    fn comments_blank_lines_and_spacing_are_ignored() {
        let l = lines("# header\n\n   \ngpu=3    xid=79   # fell off the bus\n");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].text, "gpu=3 xid=79");
        assert_eq!(l[0].number, 4);
    }

    #[test]
    fn malformed_lines_name_the_line_and_the_fix() {
        assert!(error("xid=79").contains("line 1: no gpu=N"));
        assert!(error("gpu=3").contains("names no fault"));
        assert!(error("gpu=9 xid=79").contains("out of range"));
        assert!(error("gpu=x xid=79").contains("not a whole number"));
        assert!(error("gpu=1 gpu=2 lost").contains("twice"));
        assert!(error("gpu=1 bogus=1").contains("unknown key \"bogus\"; use one of xid=K"));
        assert!(error("gpu=1 lost=yes").contains("takes no value"));
        assert!(error("gpu=1 ok=1").contains("takes no value; write just `ok`"));
        assert!(error("gpu=1 xid").contains("needs a value"));
        assert!(error("gpu=1 xid=0").contains("not an XID"));
        assert!(error("gpu=1 temp=hot").contains("not a number"));
        assert!(error("gpu=1 nvlink_down=18").contains("use 0 to 17"));
        assert!(error("gpu=1 pcie_gen=9").contains("use 1 to 6"));
    }

    #[test]
    fn a_bad_line_does_not_spoil_the_good_ones() {
        let (l, errors) = parse("gpu=1 lost\ngpu=1 explode\ngpu=2 temp=90\n", 8);
        assert_eq!(l.len(), 2);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].number, 2);
    }

    #[test]
    fn fold_applies_lines_in_order_and_clear_resets_a_gpu() {
        let state = fold(
            &lines(
                "gpu=4 lost temp=99\ngpu=2 nvlink_down=1 nvlink_down=5\ngpu=4 clear\ngpu=4 hw_slowdown",
            ),
            8,
        );
        assert_eq!(state.len(), 8);
        assert!(!state[4].lost);
        assert_eq!(state[4].temp, None);
        assert!(state[4].hw_slowdown);
        assert_eq!(state[2].nvlink_down, BTreeSet::from([1, 5]));
        assert_eq!(state[0], GpuFaults::default());
    }

    #[test]
    fn a_fatal_xid_lasts_until_an_ok_line_and_others_leave_no_state() {
        let failed = |text: &str| -> Vec<BTreeSet<u32>> {
            fold(&lines(text), 8)
                .into_iter()
                .map(|g| g.fatal_xids)
                .collect()
        };
        let state = failed("gpu=3 xid=79\ngpu=1 xid=13\ngpu=2 xid=63\ngpu=3 xid=48\n");
        assert_eq!(state[3], BTreeSet::from([48, 79]));
        assert!(state[1].is_empty(), "XID 13 is the application's fault");
        assert!(state[2].is_empty(), "XID 63 is a warning");
        assert!(failed("gpu=3 xid=79\ngpu=3 temp=50\n")[3].contains(&79));
        assert!(failed("gpu=3 xid=79\ngpu=3 ok\n")[3].is_empty());
        assert!(failed("gpu=3 xid=79\ngpu=3 clear\n")[3].is_empty());
        assert!(
            failed("gpu=3 xid=79\ngpu=2 ok\n")[3].contains(&79),
            "ok repairs its own GPU only"
        );
        assert!(
            failed("gpu=3 ok\ngpu=3 xid=79\n")[3].contains(&79),
            "an ok above the XID repairs nothing"
        );
        assert!(
            failed("")[3].is_empty(),
            "removing the line removes the fault"
        );
        assert!(is_fatal(79) && is_fatal(48) && is_fatal(74));
        assert!(!is_fatal(13) && !is_fatal(63) && !is_fatal(9999));
    }

    #[test]
    fn removing_a_line_removes_its_fault() {
        assert!(fold(&lines("gpu=1 remap_failure"), 8)[1].remap_failure);
        assert!(!fold(&lines(""), 8)[1].remap_failure);
    }

    #[test]
    fn xids_fire_once_per_new_line() {
        let a = lines("gpu=3 xid=79\n");
        assert_eq!(new_xids(&[], &a), [(3, 79)]);
        assert!(
            new_xids(&a, &a).is_empty(),
            "a line that stays does not fire again"
        );
        let b = lines("gpu=1 temp=90\ngpu=3  xid=79\ngpu=3 xid=79\n");
        assert_eq!(new_xids(&a, &b), [(3, 79)], "only the second copy is new");
        let c = lines("gpu=3 xid=48\n");
        assert_eq!(new_xids(&b, &c), [(3, 48)], "a changed line fires");
        assert!(new_xids(&c, &[]).is_empty());
        assert_eq!(new_xids(&[], &c), [(3, 48)], "a re-added line fires again");
        let d = lines("gpu=2 xid=13 xid=31\n");
        assert_eq!(new_xids(&[], &d), [(2, 13), (2, 31)]);
    }
}
