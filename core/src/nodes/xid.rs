//! NVIDIA's XID catalog (shipped as data) and the class vigil gives each XID.

use std::collections::BTreeMap;
use std::sync::OnceLock;

const CATALOG_CSV: &str = include_str!("../../data/xid-catalog.csv");

/// What an XID means for the node it happened on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum XidClass {
    /// The application's fault (e.g. an illegal memory access): blame the
    /// job, not the node, unless the same GPU keeps repeating it.
    Application,
    /// The GPU cannot be trusted: cordon at once.
    Fatal,
    /// A warning sign (pending row remap, excessive single-bit ECC): the
    /// node is Degraded and resets at the next job boundary; cordon on recurrence.
    Degrade,
    /// Informational: recorded, no effect.
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidInfo {
    pub code: u32,
    /// The driver's name, e.g. `ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS`.
    pub name: String,
    /// NVIDIA's recommended action (resolution bucket), e.g. `RESTART_BM`.
    pub action: String,
    pub fatal: bool,
    pub class: XidClass,
}

impl XidInfo {
    /// "GPU has fallen off the bus" from the driver's name.
    pub fn description(&self) -> String {
        describe(&self.name)
    }
}

/// The XIDs the GPU-health rules name explicitly; the rest follow NVIDIA's action.
const APPLICATION: &[u32] = &[13, 31, 43, 45, 68];
const FATAL: &[u32] = &[
    48, 61, 62, 64, 74, 79, 95, 109, 119, 120, 140, 143, 144, 145, 146, 147, 148, 149, 150,
];
const DEGRADE: &[u32] = &[63, 92, 94];

/// Class from NVIDIA's recommended action for XIDs not named above.
fn class_from_action(action: &str) -> XidClass {
    match action {
        "RESTART_APP" => XidClass::Application,
        "RESET_GPU" | "RESTART_BM" | "RESTART_VM" => XidClass::Fatal,
        a if a.starts_with("WORKFLOW_NVLINK") => XidClass::Fatal,
        "IGNORE" => XidClass::Ignore,
        // UNEXPECTED_ERR_REPORT_ISSUE, CHECK_*, UPDATE_SWFW, FOLLOW_REFERENCED_XID:
        // worth a look, not proof the GPU is broken.
        _ => XidClass::Degrade,
    }
}

pub fn default_class(code: u32, action: &str) -> XidClass {
    if APPLICATION.contains(&code) {
        XidClass::Application
    } else if FATAL.contains(&code) {
        XidClass::Fatal
    } else if DEGRADE.contains(&code) {
        XidClass::Degrade
    } else {
        class_from_action(action)
    }
}

fn parse(csv: &str) -> BTreeMap<u32, XidInfo> {
    csv.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("xid,") && !l.trim().is_empty())
        .filter_map(|l| {
            let mut f = l.split(',');
            let code: u32 = f.next()?.trim().parse().ok()?;
            let name = f.next()?.trim().to_owned();
            let action = f.next()?.trim().to_owned();
            let fatal = f.next()?.trim() == "FATAL";
            let class = default_class(code, &action);
            Some((
                code,
                XidInfo {
                    code,
                    name,
                    action,
                    fatal,
                    class,
                },
            ))
        })
        .collect()
}

/// The catalog shipped with this build.
pub fn catalog() -> &'static BTreeMap<u32, XidInfo> {
    static CATALOG: OnceLock<BTreeMap<u32, XidInfo>> = OnceLock::new();
    CATALOG.get_or_init(|| parse(CATALOG_CSV))
}

fn describe(name: &str) -> String {
    let first = name.split(" / ").next().unwrap_or(name);
    let trimmed = first.strip_prefix("ROBUST_CHANNEL_").unwrap_or(first);
    let words: Vec<String> = trimmed
        .split('_')
        .filter(|w| !w.is_empty())
        .map(|w| match w {
            "GPU" | "GR" | "ECC" | "DBE" | "SBE" | "MMU" | "PMU" | "GSP" | "RPC" | "DRAM"
            | "PCIE" | "NVDEC0" | "FIFO" | "UVM" | "SW" | "HW" | "MSE" | "SAW" => w.to_owned(),
            "NVLINK" => "NVLink".to_owned(),
            "INFOROM" => "InfoROM".to_owned(),
            _ => w.to_lowercase(),
        })
        .collect();
    let mut s = words.join(" ");
    if let Some(c) = s.get(..1) {
        let upper = c.to_uppercase();
        s.replace_range(..1, &upper);
    }
    s
}

/// "XID 79 (GPU has fallen off the bus)"; unknown codes say so.
pub fn label(code: u32) -> String {
    match catalog().get(&code) {
        Some(info) => format!("XID {code} ({})", info.description()),
        None => format!("XID {code} (not in NVIDIA's catalog)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_catalog_has_all_162_xids() {
        let c = catalog();
        assert_eq!(c.len(), 162);
        assert_eq!(c.keys().next(), Some(&1));
        assert_eq!(c.keys().last(), Some(&162));
    }

    #[test]
    fn xid_79_is_fatal_and_reads_well() {
        let info = &catalog()[&79];
        assert_eq!(info.class, XidClass::Fatal);
        assert_eq!(info.action, "RESTART_BM");
        assert_eq!(label(79), "XID 79 (GPU has fallen off the bus)");
    }

    #[test]
    fn the_named_classes_hold() {
        for x in APPLICATION {
            assert_eq!(catalog()[x].class, XidClass::Application, "{x}");
        }
        for x in FATAL {
            assert_eq!(catalog()[x].class, XidClass::Fatal, "{x}");
        }
        for x in DEGRADE {
            assert_eq!(catalog()[x].class, XidClass::Degrade, "{x}");
        }
    }

    #[test]
    fn unnamed_xids_follow_nvidias_action() {
        assert_eq!(class_from_action("RESET_GPU"), XidClass::Fatal);
        assert_eq!(class_from_action("RESTART_APP"), XidClass::Application);
        assert_eq!(class_from_action("IGNORE"), XidClass::Ignore);
        assert_eq!(class_from_action("WORKFLOW_NVLINK5_ERR"), XidClass::Fatal);
        assert_eq!(
            class_from_action("UNEXPECTED_ERR_REPORT_ISSUE"),
            XidClass::Degrade
        );
        // 160 CHANNEL_RETIREMENT_EVENT is RESTART_BM in the catalog.
        assert_eq!(catalog()[&160].class, XidClass::Fatal);
    }

    #[test]
    fn descriptions_keep_acronyms() {
        assert_eq!(label(48), "XID 48 (GPU ECC DBE)");
        assert_eq!(label(13), "XID 13 (GR exception)");
        assert_eq!(label(144), "XID 144 (NVLink SAW error)");
        assert_eq!(label(9999), "XID 9999 (not in NVIDIA's catalog)");
    }
}
