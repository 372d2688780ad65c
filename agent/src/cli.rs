//! Command-line flags, and how they override the config file.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::config::{AgentConfig, ConfigError, Coordinators, GpuBackendKind};

/// vigil agent: reports this node's GPUs to the coordinator and keeps its lease.
///
/// Every flag overrides the same key of the config file.
///
/// Each training worker runs under a per-attempt shim, this same binary started by the agent as
/// `vigil-agent shim JOB ATTEMPT` (with `vigil-agent shim-guard` in the worker's process group):
/// the shims outlive the agent, so restarting or upgrading it restarts no job. They are not for
/// direct use.
#[derive(Debug, Clone, Parser)]
#[command(name = "vigil-agent", version)]
#[command(group(clap::ArgGroup::new("checks").args(["check_gpus", "check_fabric"])))]
pub struct Cli {
    /// TOML config file; flags given here override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Coordinator gRPC URL, or the URLs of a highly available group separated by commas
    /// [default: http://127.0.0.1:7770].
    #[arg(long, value_name = "URL[,URL...]")]
    pub coordinator: Option<String>,
    /// Name of this node in the cluster [default: the hostname].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// This host's identity for the coordinator, overriding /etc/machine-id (`[identity]
    /// machine_id`): for tests that run several agents on one machine, and hosts without one.
    #[arg(long, value_name = "ID")]
    pub machine_id: Option<String>,
    /// Where GPU data comes from: real NVML, or simulated GPUs [default: nvml].
    #[arg(long, value_name = "BACKEND")]
    pub gpu_backend: Option<GpuBackendKind>,
    /// Number of simulated GPUs, 1 to 64 (with --gpu-backend sim) [default: 8].
    #[arg(long, value_name = "N")]
    pub sim_gpus: Option<u32>,
    /// Simulated GPUs swapped for new boards since the last start (with --gpu-backend sim): a
    /// new UUID and serial at each index listed, e.g. `--sim-replaced-gpus 3`.
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    pub sim_replaced_gpus: Option<Vec<u32>>,
    /// Fault-injection file for simulated GPUs (with --gpu-backend sim), re-read every 100 ms.
    ///
    /// One line per GPU and fault set: `gpu=N KEY[=VALUE] ...`, e.g. `gpu=3 xid=79` (GPU 3 has
    /// fallen off the bus); `#` starts a comment. Keys: xid=K, ecc_uncorrected=K,
    /// ecc_corrected=K, temp=C, power=W, retired_pending, remap_pending, remap_failure,
    /// remap_uncorrectable=K, hw_slowdown, thermal_throttle, power_brake, pcie_width=W,
    /// pcie_gen=G, pcie_replay=K, nvlink_down=L, lost, ok, clear. An XID fires once, when its
    /// line appears; a fatal one (e.g. 79) also leaves the GPU failing its diagnostics, as a
    /// real one would, until it is repaired. Lines are state, applied in file order: add
    /// `gpu=N ok` (or `gpu=N clear`) to repair GPU N, undoing every line above it, or delete the
    /// lines. A malformed line is logged and skipped. Every key: docs/configuration.md,
    /// "Simulated faults".
    #[arg(long, value_name = "FILE")]
    pub sim_fault_file: Option<PathBuf>,
    /// Root under which sysfs is read for the fabric ports (`sys/class/infiniband`,
    /// `sys/class/net`) [default: /]. Tests and the simulator point it at a fake tree.
    #[arg(long, value_name = "DIR")]
    pub sysfs_root: Option<PathBuf>,
    /// Local state directory, created if missing [default: /var/lib/vigil-agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address for HTTP /metrics and /healthz [default: 0.0.0.0:9771].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Talk plaintext to an http:// coordinator: no way to tell it from an impostor.
    /// For a local demo or test cluster only.
    #[arg(long)]
    pub insecure: bool,
    /// Validate FILE and exit: 0 printing "FILE: ok", or 64 with the error.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub check_config: Option<PathBuf>,
    /// Read the GPU backend once, print every field the agent reads (value or
    /// "not supported") and exit: 0, 69 when the backend cannot be opened
    /// (no NVIDIA driver), 1 when a query fails. Nothing else is started.
    #[arg(long, conflicts_with = "check_config")]
    pub check_gpus: bool,
    /// Read the watched fabric ports (InfiniBand ports, RoCE interfaces; see [fabric] devices
    /// and --sysfs-root) once, print every value read (or "absent") and exit 0. Nothing else
    /// is started.
    #[arg(long, conflicts_with_all = ["check_config", "check_gpus"])]
    pub check_fabric: bool,
    /// With --check-gpus or --check-fabric: one JSON document instead of text.
    #[arg(long, requires = "checks")]
    pub json: bool,
    /// Print this program's man page (roff) to stdout and exit; scripts/package.sh uses it.
    #[arg(long, hide = true, exclusive = true)]
    pub print_man: bool,
}

impl Cli {
    /// `--print-man`: the man page, made from the flags above.
    pub fn man_page() -> std::io::Result<Vec<u8>> {
        use clap::CommandFactory;
        let mut page = Vec::new();
        clap_mangen::Man::new(Self::command()).render(&mut page)?;
        Ok(page)
    }

    /// Reads the config file (if any), applies the flags on top, then validates the result.
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        let cfg = self.merged()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// For `--check-gpus`: the config file and flags as for a start, but only the
    /// keys reading the GPUs needs are validated (no coordinator or TLS is used).
    pub fn into_gpu_config(self) -> Result<AgentConfig, ConfigError> {
        let cfg = self.merged()?;
        cfg.validate_gpu()?;
        Ok(cfg)
    }

    /// For `--check-fabric`: as [`Self::into_gpu_config`], for the keys reading the fabric needs.
    pub fn into_fabric_config(self) -> Result<AgentConfig, ConfigError> {
        let cfg = self.merged()?;
        cfg.validate_fabric()?;
        Ok(cfg)
    }

    /// The config file (or the defaults) with the flags applied, not yet validated.
    fn merged(self) -> Result<AgentConfig, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => AgentConfig::from_file(path)?,
            None => AgentConfig::default(),
        };
        self.apply(&mut cfg);
        Ok(cfg)
    }

    /// `--check-config FILE`: the file alone (no other flag), checked as at start-up.
    pub fn check_config(path: &std::path::Path) -> Result<AgentConfig, ConfigError> {
        let cfg = AgentConfig::from_file(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply(self, cfg: &mut AgentConfig) {
        if let Some(v) = self.coordinator {
            cfg.coordinator = Coordinators::from_flag(&v);
        }
        if let Some(v) = self.node_name {
            cfg.node_name = v;
        }
        if let Some(v) = self.machine_id {
            cfg.identity.machine_id = Some(v);
        }
        if let Some(v) = self.gpu_backend {
            cfg.gpu_backend = v;
        }
        if let Some(v) = self.sim_gpus {
            cfg.sim_gpus = v;
        }
        if let Some(v) = self.sim_replaced_gpus {
            cfg.sim_replaced_gpus = v;
        }
        if let Some(v) = self.sim_fault_file {
            cfg.sim_fault_file = Some(v);
        }
        if let Some(v) = self.sysfs_root {
            cfg.sysfs_root = v;
        }
        if let Some(v) = self.state_dir {
            cfg.state_dir = v;
        }
        if let Some(v) = self.metrics_listen {
            cfg.metrics_listen = v;
        }
        if self.insecure {
            cfg.insecure = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fault file's whole grammar is in `--help`, so no key can be added without it.
    #[test]
    fn sim_fault_file_help_gives_the_line_format_and_every_key() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            help.contains("`gpu=N KEY[=VALUE] ...`, e.g. `gpu=3 xid=79`"),
            "{help}"
        );
        for key in crate::gpu::faults::KEYS.split(", ") {
            assert!(
                help.contains(key),
                "--help lacks the fault key {key}: {help}"
            );
        }
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vigil-agent").chain(args.iter().copied()))
    }

    #[test]
    fn man_page_names_the_agent_and_its_flags_but_not_itself() {
        let page = String::from_utf8(Cli::man_page().expect("renders")).expect("utf-8");
        assert!(page.contains(".TH vigil-agent 1"), "{page}");
        assert!(page.contains(".SH NAME\nvigil\\-agent \\- "), "{page}");
        for flag in ["check\\-config", "check\\-gpus", "state\\-dir"] {
            assert!(
                page.contains(&format!("\\fB\\-\\-{flag}\\fR")),
                "no {flag}: {page}"
            );
        }
        assert!(
            !page.contains("print\\-man"),
            "the hidden flag shows: {page}"
        );
        assert!(parse(&["--print-man"]).expect("parses").print_man);
        assert!(parse(&["--print-man", "--insecure"]).is_err());
    }

    #[test]
    fn flags_override_the_config_file() -> Result<(), Box<dyn std::error::Error>> {
        let mut cfg = AgentConfig::from_toml_str("node_name = \"from-file\"\nsim_gpus = 2")?;
        parse(&[
            "--node-name=from-flag",
            "--gpu-backend=sim",
            "--coordinator=http://c:1",
            "--state-dir=/tmp/s",
            "--metrics-listen=127.0.0.1:0",
            "--sim-fault-file=/tmp/f",
        ])?
        .apply(&mut cfg);
        assert_eq!(cfg.node_name, "from-flag");
        assert_eq!(cfg.sim_gpus, 2, "keys without a flag keep the file's value");
        assert_eq!(cfg.gpu_backend, GpuBackendKind::Sim);
        assert_eq!(cfg.coordinator, "http://c:1");
        assert_eq!(cfg.state_dir, PathBuf::from("/tmp/s"));
        assert_eq!(cfg.metrics_listen.port(), 0);
        assert_eq!(cfg.sim_fault_file, Some(PathBuf::from("/tmp/f")));
        Ok(())
    }

    #[test]
    fn coordinator_flag_takes_a_comma_separated_list() -> Result<(), Box<dyn std::error::Error>> {
        let mut cfg = AgentConfig::from_toml_str("coordinator = \"http://file:1\"")?;
        parse(&["--coordinator=http://c1:7770,http://c2:7770"])?.apply(&mut cfg);
        assert_eq!(cfg.coordinator.urls(), ["http://c1:7770", "http://c2:7770"]);
        let twice = parse(&[
            "--coordinator=http://c1:7770,http://c1:7770",
            "--node-name=n",
            "--insecure",
        ])?
        .into_config();
        assert!(matches!(
            twice,
            Err(ConfigError::Invalid {
                field: "coordinator",
                ..
            })
        ));
        let empty_entry = parse(&[
            "--coordinator=http://c1:7770,",
            "--node-name=n",
            "--insecure",
        ])?
        .into_config();
        assert!(empty_entry.is_err());
        Ok(())
    }

    #[test]
    fn json_needs_check_gpus() -> Result<(), clap::Error> {
        assert!(parse(&["--json"]).is_err());
        let cli = parse(&["--check-gpus", "--json", "--gpu-backend=sim"])?;
        assert!(cli.check_gpus && cli.json);
        Ok(())
    }

    #[test]
    fn check_fabric_takes_json_and_a_sysfs_root_but_not_check_gpus()
    -> Result<(), Box<dyn std::error::Error>> {
        let cli = parse(&["--check-fabric", "--json", "--sysfs-root=/tmp/fake"])?;
        assert!(cli.check_fabric && cli.json);
        let cfg = cli.into_fabric_config()?;
        assert_eq!(cfg.sysfs_root, PathBuf::from("/tmp/fake"));
        assert!(parse(&["--check-fabric", "--check-gpus"]).is_err());
        let err = parse(&["--check-fabric", "--sysfs-root=relative"])?
            .into_fabric_config()
            .expect_err("a relative root");
        assert!(err.to_string().contains("invalid sysfs_root"), "{err}");
        Ok(())
    }

    #[test]
    fn check_gpus_needs_no_coordinator_settings() -> Result<(), Box<dyn std::error::Error>> {
        // A plaintext coordinator without --insecure stops a start, not a GPU check.
        let args = ["--check-gpus", "--coordinator=http://c:1", "--node-name=n"];
        assert!(parse(&args)?.into_config().is_err());
        assert!(parse(&args)?.into_gpu_config().is_ok());
        let err = parse(&["--check-gpus", "--sim-gpus=0", "--node-name=n"])?.into_gpu_config();
        assert!(matches!(
            err,
            Err(ConfigError::Invalid {
                field: "sim_gpus",
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn invalid_flag_values_are_refused() {
        assert!(parse(&["--gpu-backend=cuda"]).is_err());
        assert!(parse(&["--metrics-listen=nowhere"]).is_err());
        assert!(parse(&["--sim-gpus=many"]).is_err());
    }

    #[test]
    fn flag_values_are_validated_like_file_values() -> Result<(), clap::Error> {
        let err = parse(&["--sim-gpus=0", "--node-name=n"])?.into_config();
        assert!(matches!(
            err,
            Err(ConfigError::Invalid {
                field: "sim_gpus",
                ..
            })
        ));
        Ok(())
    }
}
