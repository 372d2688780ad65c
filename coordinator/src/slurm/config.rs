//! `[slurm]`: carry vigil's node decisions into Slurm (docs/slurm.md). Absent: off.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    /// How often Slurm is read (`sinfo`, `squeue`) and brought in line with vigil.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The longest one `sinfo`/`squeue`/`scontrol` may take before it is killed.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Where `sinfo`, `squeue` and `scontrol` are; empty: found on `PATH`.
    pub bin_dir: PathBuf,
    /// `SLURM_CONF` for those commands; empty: Slurm's own default (`/etc/slurm/slurm.conf`).
    pub slurm_conf: PathBuf,
    /// vigil node name -> Slurm node name, where they differ; a node not named maps to itself.
    pub nodes: BTreeMap<String, String>,
    /// Records of finished Slurm jobs kept (`clusterctl jobs`, goodput); the oldest go first.
    pub keep_finished_jobs: usize,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            bin_dir: PathBuf::new(),
            slurm_conf: PathBuf::new(),
            nodes: BTreeMap::new(),
            keep_finished_jobs: vigil_core::slurm::jobs::DEFAULT_KEEP_FINISHED,
        }
    }
}

impl SlurmConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval < Duration::from_millis(100) {
            return Err(format!(
                "slurm.interval = {} is too short; use at least 100ms (e.g. \"2s\")",
                humantime::format_duration(self.interval)
            ));
        }
        if self.command_timeout < Duration::from_secs(1) {
            return Err(format!(
                "slurm.command_timeout = {} is too short; use at least 1s (e.g. \"10s\")",
                humantime::format_duration(self.command_timeout)
            ));
        }
        let mut seen = BTreeMap::new();
        for (vigil, slurm) in &self.nodes {
            if slurm.is_empty() || slurm.contains(|c: char| c.is_whitespace() || ",[]=".contains(c))
            {
                return Err(format!(
                    "slurm.nodes.{vigil} = {slurm:?} is not a Slurm node name; use the NodeName \
                     from slurm.conf"
                ));
            }
            if let Some(other) = seen.insert(slurm, vigil) {
                return Err(format!(
                    "slurm.nodes maps both {other} and {vigil} to Slurm node {slurm}; node names \
                     map one to one"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    fn refusal(text: &str) -> String {
        match Config::from_toml_str(text) {
            Err(ConfigError::Invalid(m)) => m,
            other => format!("not refused: {other:?}"),
        }
    }

    #[test]
    fn slurm_is_off_by_default_and_a_section_turns_it_on() -> Result<(), ConfigError> {
        assert_eq!(Config::from_toml_str("")?.slurm, None);
        let c = Config::from_toml_str(
            "[slurm]\ninterval = \"1s\"\nslurm_conf = \"/etc/slurm/slurm.conf\"\n\
             [slurm.nodes]\n\"gpu-host-1\" = \"n1\"\n",
        )?;
        let slurm = c.slurm.as_ref().map(|s| (s.interval, s.nodes.len()));
        assert_eq!(slurm, Some((std::time::Duration::from_secs(1), 1)));
        assert_eq!(
            Config::from_toml_str("[slurm]\n")?
                .slurm
                .map(|s| s.interval),
            Some(super::DEFAULT_INTERVAL)
        );
        Ok(())
    }

    #[test]
    fn bad_slurm_settings_are_refused_naming_the_key() {
        for (text, key) in [
            ("[slurm]\ninterval = \"10ms\"\n", "slurm.interval"),
            (
                "[slurm]\ncommand_timeout = \"100ms\"\n",
                "slurm.command_timeout",
            ),
            ("[slurm.nodes]\na = \"n[1-2]\"\n", "slurm.nodes.a"),
            ("[slurm.nodes]\na = \"n1\"\nb = \"n1\"\n", "one to one"),
            (
                "[slurm]\n[ha]\nadvertise_url = \"http://c1:7770\"\netcd_endpoints = [\"http://e1:2379\"]\n",
                "[slurm]",
            ),
        ] {
            let message = refusal(text);
            assert!(message.contains(key), "{text}: {message}");
        }
        assert!(
            matches!(
                Config::from_toml_str("[slurm]\nbogus = 1\n"),
                Err(ConfigError::Parse(m)) if m.contains("bogus")
            ),
            "unknown keys are refused"
        );
    }
}
