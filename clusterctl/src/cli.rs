//! The command line: global flags and one variant per subcommand (a contract; docs and tests use it).

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};

/// Where clusterctl looks for the coordinator when neither flag nor environment says.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7770";

/// Operate a vigil GPU training cluster.
#[derive(Debug, Parser)]
#[command(name = "clusterctl", version)]
pub struct Cli {
    /// The coordinator's gRPC address; with highly available coordinators, a comma-separated
    /// list (`https://c1:7770,https://c2:7770`): tried in order, and a standby's answer leads
    /// to the coordinator that leads.
    #[arg(
        long,
        global = true,
        env = "VIGIL_COORDINATOR",
        default_value = DEFAULT_COORDINATOR,
        value_name = "URL"
    )]
    pub coordinator: String,

    /// The cluster CA (PEM) that the coordinator's certificate must chain to; with --cert and
    /// --key for an https:// coordinator.
    #[arg(long, global = true, env = "VIGIL_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// Your operator certificate (PEM): O=vigil:viewer reads, O=vigil:admin also changes.
    #[arg(long, global = true, env = "VIGIL_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// The private key of --cert (PEM).
    #[arg(long, global = true, env = "VIGIL_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Talk plaintext to an http:// coordinator started with insecure = true (a local demo
    /// or test cluster): nothing is authenticated. VIGIL_INSECURE takes 1/0, true/false,
    /// yes/no or on/off.
    #[arg(
        long,
        global = true,
        env = "VIGIL_INSECURE",
        action = ArgAction::SetTrue,
        value_parser = EnvBool
    )]
    pub insecure: bool,

    /// Print `debug:` lines on stderr: which coordinator was tried, why it was passed over,
    /// and which leader a standby pointed to. VIGIL_DEBUG takes 1/0, true/false, yes/no or
    /// on/off.
    #[arg(
        long,
        global = true,
        env = "VIGIL_DEBUG",
        action = ArgAction::SetTrue,
        value_parser = EnvBool
    )]
    pub debug: bool,

    /// Output format: aligned text for people, or stable JSON for scripts (one document; JSON
    /// Lines from `events`, `job logs` and `status --watch`).
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

/// clusterctl's man page (roff), from the command line above: `clusterctl --print-man`, a hidden
/// flag that main handles before parsing (every other command line needs a subcommand), and that
/// scripts/package.sh uses.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory;
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    Ok(page)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One screen: coordinator, node counts per state, GPUs, cordoned and degraded nodes.
    Status {
        /// Redraw the screen every `--interval` until Ctrl-C.
        #[arg(short = 'w', long)]
        watch: bool,
        /// How often `--watch` redraws, e.g. `2s`, `500ms`, `1m`.
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "2s",
            value_parser = parse_interval,
            requires = "watch"
        )]
        interval: Duration,
    },
    /// List every node with its state, condition, availability and scheduling.
    Nodes {
        /// List lemons instead: hosts and GPUs (by serial) with failures on record, how many,
        /// of which kind, when, and whether they are blocklisted.
        #[arg(long)]
        lemons: bool,
    },
    /// Show one node: summary, condition, cordon, GPU health, last diagnostics, workers, events;
    /// `node forget NAME` (admin) drops the host the name is bound to.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Node {
        /// The node's name, as `clusterctl nodes` lists it.
        #[arg(required = true)]
        name: Option<String>,
        #[command(subcommand)]
        command: Option<NodeCommand>,
    },
    /// Stop placing new work on a node; running work stays.
    Cordon {
        name: String,
        /// Why, for the next operator who reads `clusterctl nodes`.
        #[arg(long, value_name = "TEXT", value_parser = non_empty_reason)]
        reason: String,
    },
    /// Cordon a node and restart the jobs running on it elsewhere now, from their last checkpoint.
    Drain {
        name: String,
        /// Why, for the next operator who reads `clusterctl nodes`.
        #[arg(
            long,
            value_name = "TEXT",
            value_parser = non_empty_reason,
            default_value = DEFAULT_DRAIN_REASON
        )]
        reason: String,
    },
    /// Let new work be placed on a node again.
    Uncordon {
        name: String,
        /// Uncordon an automatically cordoned node even though no diagnostics passed since.
        #[arg(long)]
        force: bool,
        /// First clear the node's host and GPUs from the lemon list (after the hardware was
        /// fixed or replaced); a lemon is refused service until then, even with --force.
        #[arg(long)]
        clear_lemon: bool,
    },
    /// Run the node's diagnostic now and wait for its result (exit code 1 if it fails).
    Diagnose {
        name: String,
        /// How long the diagnostic may run, e.g. `90s`, `2m`, `1m30s` (plain numbers are
        /// seconds); the coordinator's default when left out.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// List jobs: state, attempt, restarts, nodes, progress, last checkpoint, age, reason.
    Jobs,
    /// One job: submit, show, restart or cancel it, its post-mortem report, its workers' logs.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Node and job events, newest last; with `--follow`, new ones as they happen.
    Events {
        /// Keep printing new events until Ctrl-C.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this node's events.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Only this job's events.
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// How many past events to print first (the coordinator's default is 50; with
        /// `--kind`, 1000, the most it sends, since the kinds are picked out here).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
        backlog: Option<u32>,
        /// Only events of this kind (`xid`, `cordon`, `failed`, `checkpoint`, ...); repeat for
        /// several. Filtered by clusterctl: the coordinator sends every kind.
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
    },
    /// The recovery hold, after the coordinator started from a damaged state store
    /// (`vigil-coordinator --recover`): what was lost, which nodes wait for review, whether jobs
    /// are held; `recovery confirm` lets jobs be scheduled again.
    Recovery {
        #[command(subcommand)]
        command: Option<RecoveryCommand>,
    },
    /// The cordon circuit breaker: whether automatic cordons are being held, its cap, the
    /// cordons it counted and the nodes it holds; `breaker reset` (admin) closes it.
    Breaker {
        #[command(subcommand)]
        command: BreakerCommand,
    },
    /// Checkpoints on a shared filesystem, read here (needs no coordinator).
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Print a shell completion script to stdout (also `completion`).
    #[command(alias = "completion")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum BreakerCommand {
    /// Open or closed, the cap and how it is computed, the automatic cordons in the window
    /// and the held nodes with their evidence.
    Status,
    /// Close the breaker (admin; audited): a fresh window begins, and the held nodes are
    /// judged again on fresh evidence only (nothing from before the reset is replayed).
    Reset,
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Print the path of the newest complete checkpoint under DIR (the agent's own validator),
    /// for a batch script: `--resume "$(clusterctl checkpoint latest --dir D --layout L)"`.
    /// Exit 1 and nothing on stdout when there is none.
    Latest {
        /// The job's checkpoint directory.
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// How the trainer marks a complete checkpoint: marker, pytorch-dcp, megatron, deepspeed
        /// or hf-trainer.
        #[arg(long, value_name = "LAYOUT", value_parser = parse_layout)]
        layout: vigil_checkpoint::Layout,
        /// deepspeed only: the gang's world size, so a save needs a ZeRO shard from each rank.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        world_size: Option<u32>,
    },
}

fn parse_layout(s: &str) -> Result<vigil_checkpoint::Layout, vigil_checkpoint::UnknownLayout> {
    s.parse()
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Drop the name's host binding (admin; audited): the next host to register the name,
    /// whichever it is, binds it. For a host replaced before the old one was Lost, or a name
    /// an identity conflict shows held by the wrong host (docs/operations.md).
    Forget { name: String },
}

#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Confirm the recovery once you have reviewed what was lost: jobs may be scheduled again.
    /// Every node stays cordoned until you uncordon it (`clusterctl node NAME`, then
    /// `clusterctl uncordon NAME`).
    Confirm,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job spec (TOML); the coordinator validates it.
    Submit {
        /// The spec file; `-` reads it from stdin.
        #[arg(value_name = "FILE")]
        file: String,
    },
    /// Show one job: placement, restarts, last checkpoint, workers, attempts, events.
    Show {
        /// The job's id, as `clusterctl jobs` lists it.
        id: String,
    },
    /// Stop the job's workers and mark it cancelled.
    Cancel { id: String },
    /// Stop the job's attempt and start the next one now: from the last complete checkpoint, or
    /// from an earlier one (`--from-checkpoint STEP`, e.g. before a loss spike), with extra
    /// environment (`--env LR=1e-4`, kept for later attempts).
    Restart {
        id: String,
        /// The step of a complete checkpoint the job has seen (`job show` lists them in its
        /// history).
        #[arg(long, value_name = "STEP")]
        from_checkpoint: Option<u64>,
        /// `NAME=VALUE` over the spec's env; repeat for more.
        #[arg(long, value_name = "NAME=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
    /// Post-mortem: where the job's time went (ETTR, time lost per failure by phase), the
    /// checkpoint interval Young's formula suggests, and the timeline of phases and events.
    Report {
        /// The job's id, as `clusterctl jobs` lists it.
        id: String,
    },
    /// Print the end of the job's worker logs; with `--follow`, new output as it is written.
    Logs {
        id: String,
        /// Only this node's worker.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Keep printing new output until Ctrl-C.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How much of the end of each log to print first: bytes, or with a `K`/`KiB` or
        /// `M`/`MiB` suffix; at most 1 MiB (the coordinator's default is 8 KiB).
        #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
        tail: Option<u64>,
    },
}

/// The value parser of a boolean flag that an environment variable may also set: the bare flag
/// reads `true`; `VIGIL_INSECURE=1` (or any value [`parse_bool`] takes) reads as written, and
/// anything else is a usage error that names the variable.
#[derive(Debug, Clone, Copy)]
struct EnvBool;

impl clap::builder::TypedValueParser for EnvBool {
    type Value = bool;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<bool, clap::Error> {
        let text = value.to_string_lossy();
        parse_bool(&text).map_err(|why| {
            let source = arg
                .and_then(|a| a.get_env())
                .map(|env| env.to_string_lossy().into_owned())
                .unwrap_or_else(|| "the value".to_owned());
            clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                format!("{source}={text:?} is not a yes or no: {why}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

/// A boolean from the environment: 1/0, true/false, yes/no, on/off in any case; empty is false
/// (as if unset).
fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err("use 1 or 0, true or false, yes or no, on or off".to_owned()),
    }
}

/// `NAME=VALUE`, the name non-empty.
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

/// What `drain` records as the cordon reason when `--reason` is left out.
pub const DEFAULT_DRAIN_REASON: &str = "drained by operator";

/// The longest `--timeout` accepted: the coordinator's limit.
const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);

/// The shortest `status --interval`: more often only loads the coordinator.
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// The largest `--tail`: the coordinator's limit.
const MAX_TAIL_BYTES: u64 = 1 << 20;

/// A `--timeout`: more than zero and at most an hour.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let total = parse_duration_text(s)?;
    if total.is_zero() {
        return Err(format!(
            "invalid duration {s:?}: must be more than zero (leave --timeout out for the coordinator's default)"
        ));
    }
    if total > MAX_TIMEOUT {
        return Err(format!(
            "invalid duration {s:?}: at most 1h (the coordinator's limit)"
        ));
    }
    Ok(total)
}

/// A `status --interval`: at least 500ms and at most an hour.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let total = parse_duration_text(s)?;
    if total < MIN_INTERVAL || total > MAX_TIMEOUT {
        return Err(format!(
            "invalid interval {s:?}: must be between 500ms and 1h"
        ));
    }
    Ok(total)
}

/// A byte count such as `65536`, `64K`, `64KiB`, `1M` or `1MiB`; more than zero and at most 1 MiB.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size {s:?}: expected bytes, e.g. 4096, 64K or 1M");
    let text = s.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..digits].parse().map_err(|_| invalid())?;
    let unit: u64 = match &text[digits..] {
        "" | "B" => 1,
        "K" | "k" | "KiB" | "KB" => 1 << 10,
        "M" | "m" | "MiB" | "MB" => 1 << 20,
        _ => return Err(invalid()),
    };
    let bytes = number.checked_mul(unit).ok_or_else(invalid)?;
    if bytes == 0 {
        return Err(format!(
            "invalid size {s:?}: must be more than zero (leave --tail out for the coordinator's default, 8 KiB)"
        ));
    }
    if bytes > MAX_TAIL_BYTES {
        return Err(format!(
            "invalid size {s:?}: at most 1M (the coordinator's limit)"
        ));
    }
    Ok(bytes)
}

/// A duration such as `30s`, `2m`, `1m30s`, `1h`, `500ms`, or a plain number of seconds.
fn parse_duration_text(s: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {s:?}: expected e.g. 30s, 2m, 1m30s or 500ms");
    let text = s.trim();
    let mut total = Duration::ZERO;
    let mut rest = text;
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        total = text
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| invalid())?;
        rest = "";
    }
    if text.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let millis = match &rest[..unit] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(invalid()),
        };
        let part = number.checked_mul(millis).ok_or_else(invalid)?;
        total = total
            .checked_add(Duration::from_millis(part))
            .ok_or_else(invalid)?;
        rest = &rest[unit..];
    }
    Ok(total)
}

fn non_empty_reason(s: &str) -> Result<String, String> {
    let trimmed = s.trim();
    if trimmed.is_empty() {
        Err("the reason must not be empty: say why the node is cordoned".to_string())
    } else {
        Ok(trimmed.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_may_follow_the_subcommand() {
        let cli = Cli::try_parse_from([
            "clusterctl",
            "nodes",
            "-o",
            "json",
            "--coordinator",
            "http://h:1",
        ])
        .expect("parses");
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.coordinator, "http://h:1");
    }

    #[test]
    fn boolean_values_read_as_the_environment_writes_them() {
        for yes in ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " 1 "] {
            assert_eq!(parse_bool(yes), Ok(true), "{yes:?}");
        }
        for no in ["0", "false", "FALSE", "no", "No", "off", "OFF", ""] {
            assert_eq!(parse_bool(no), Ok(false), "{no:?}");
        }
        for bad in ["2", "maybe", "y", "t", "-1", "yes please"] {
            let err = parse_bool(bad).expect_err(bad);
            assert!(err.contains("1 or 0, true or false"), "{err}");
        }
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        use clap::CommandFactory;
        use clap::builder::TypedValueParser;
        let cmd = Cli::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "insecure")
            .expect("an --insecure argument");
        let err = EnvBool
            .parse_ref(&cmd, Some(arg), std::ffi::OsStr::new("maybe"))
            .expect_err("maybe is no boolean");
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        let text = err.to_string();
        assert!(
            text.contains("VIGIL_INSECURE=\"maybe\" is not a yes or no: use 1 or 0"),
            "{text}"
        );
        assert_eq!(
            EnvBool
                .parse_ref(&cmd, Some(arg), std::ffi::OsStr::new("On"))
                .ok(),
            Some(true)
        );
    }

    #[test]
    fn insecure_and_debug_stay_bare_flags() {
        let cli =
            Cli::try_parse_from(["clusterctl", "--insecure", "nodes", "--debug"]).expect("parses");
        assert!(cli.insecure && cli.debug);
        assert!(
            Cli::try_parse_from(["clusterctl", "--insecure=1", "nodes"]).is_err(),
            "on the command line the flag takes no value"
        );
        assert!(Cli::try_parse_from(["clusterctl", "nodes", "--insecure", "true"]).is_err());
    }

    #[test]
    fn cordon_requires_a_non_empty_reason() {
        assert!(Cli::try_parse_from(["clusterctl", "cordon", "n1"]).is_err());
        assert!(Cli::try_parse_from(["clusterctl", "cordon", "n1", "--reason", "  "]).is_err());
        let cli = Cli::try_parse_from(["clusterctl", "cordon", "n1", "--reason", "bad fan"])
            .expect("parses");
        assert!(matches!(cli.command, Command::Cordon { reason, .. } if reason == "bad fan"));
    }

    #[test]
    fn node_shows_a_node_and_node_forget_forgets_one() {
        let cli = Cli::try_parse_from(["clusterctl", "node", "n1"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Node { name: Some(n), command: None } if n == "n1"
        ));
        let cli = Cli::try_parse_from(["clusterctl", "node", "forget", "n1"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Node { name: None, command: Some(NodeCommand::Forget { name }) } if name == "n1"
        ));
        assert!(Cli::try_parse_from(["clusterctl", "node"]).is_err());
        assert!(Cli::try_parse_from(["clusterctl", "node", "forget"]).is_err());
    }

    #[test]
    fn uncordon_force_is_a_flag() {
        let cli = Cli::try_parse_from(["clusterctl", "uncordon", "n1", "--force"]).expect("parses");
        assert!(matches!(cli.command, Command::Uncordon { force: true, .. }));
        let cli = Cli::try_parse_from(["clusterctl", "uncordon", "n1"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Uncordon { force: false, .. }
        ));
    }

    #[test]
    fn job_subcommands_take_a_file_or_an_id() {
        let cli = Cli::try_parse_from(["clusterctl", "job", "submit", "-"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Job { command: JobCommand::Submit { file } } if file == "-"
        ));
        let cli = Cli::try_parse_from(["clusterctl", "job", "show", "j-1", "-o", "json"])
            .expect("parses");
        assert_eq!(cli.output, Output::Json);
        assert!(matches!(
            cli.command,
            Command::Job { command: JobCommand::Show { id } } if id == "j-1"
        ));
        assert!(Cli::try_parse_from(["clusterctl", "job", "cancel"]).is_err());
        assert!(Cli::try_parse_from(["clusterctl", "jobs"]).is_ok());
    }

    #[test]
    fn diagnose_timeout_is_optional() {
        let cli = Cli::try_parse_from(["clusterctl", "diagnose", "n1"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Diagnose { timeout: None, .. }
        ));
        let cli = Cli::try_parse_from(["clusterctl", "diagnose", "n1", "--timeout", "2m"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Diagnose { timeout: Some(t), .. } if t == Duration::from_secs(120)
        ));
        assert!(
            Cli::try_parse_from(["clusterctl", "diagnose", "n1", "--timeout", "soon"]).is_err()
        );
    }

    #[test]
    fn status_watch_takes_an_interval_only_with_watch() {
        let cli = Cli::try_parse_from(["clusterctl", "status"]).expect("parses");
        assert!(matches!(cli.command, Command::Status { watch: false, .. }));
        let cli = Cli::try_parse_from(["clusterctl", "status", "--watch"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Status { watch: true, interval } if interval == Duration::from_secs(2)
        ));
        let cli = Cli::try_parse_from(["clusterctl", "status", "-w", "--interval", "500ms"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Status { interval, .. } if interval == Duration::from_millis(500)
        ));
        assert!(Cli::try_parse_from(["clusterctl", "status", "--interval", "5s"]).is_err());
        assert!(
            Cli::try_parse_from(["clusterctl", "status", "-w", "--interval", "100ms"]).is_err()
        );
    }

    #[test]
    fn recovery_shows_or_confirms() {
        let cli = Cli::try_parse_from(["clusterctl", "recovery"]).expect("parses");
        assert!(matches!(cli.command, Command::Recovery { command: None }));
        let cli = Cli::try_parse_from(["clusterctl", "recovery", "confirm", "-o", "json"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Recovery {
                command: Some(RecoveryCommand::Confirm)
            }
        ));
        assert!(Cli::try_parse_from(["clusterctl", "recovery", "undo"]).is_err());
    }

    #[test]
    fn drain_has_a_default_reason() {
        let cli = Cli::try_parse_from(["clusterctl", "drain", "n1"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Drain { reason, .. } if reason == DEFAULT_DRAIN_REASON
        ));
        assert!(Cli::try_parse_from(["clusterctl", "drain", "n1", "--reason", " "]).is_err());
    }

    #[test]
    fn events_and_logs_take_filters_and_follow() {
        let cli = Cli::try_parse_from([
            "clusterctl",
            "events",
            "-f",
            "--node",
            "n1",
            "--backlog",
            "1000",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Events { follow: true, node: Some(n), job: None, backlog: Some(1000), kinds } if n == "n1" && kinds.is_empty()
        ));
        let cli =
            Cli::try_parse_from(["clusterctl", "events", "--kind", "xid", "--kind", "cordon"])
                .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Events { kinds, .. } if kinds == ["xid", "cordon"]
        ));
        assert!(Cli::try_parse_from(["clusterctl", "events", "--backlog", "1001"]).is_err());
        let cli = Cli::try_parse_from([
            "clusterctl",
            "job",
            "logs",
            "j-1",
            "--follow",
            "--tail",
            "1M",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Job {
                command: JobCommand::Logs {
                    follow: true,
                    tail: Some(1_048_576),
                    node: None,
                    ..
                }
            }
        ));
        assert!(Cli::try_parse_from(["clusterctl", "completions", "bash"]).is_ok());
        assert!(Cli::try_parse_from(["clusterctl", "completions", "tcsh"]).is_err());
    }

    #[test]
    fn sizes_take_plain_bytes_or_k_and_m() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(65_536));
        assert_eq!(parse_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_bytes("1M"), Ok(1 << 20));
        for bad in ["", "0", "2M", "1.5K", "K", "10x", "-1"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn durations_take_units_or_plain_seconds() {
        let ok = |s: &str| parse_duration(s).expect(s);
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("45"), Duration::from_secs(45));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1h"), Duration::from_secs(3_600));
        assert_eq!(ok("60m"), MAX_TIMEOUT);
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        for bad in [
            "",
            "s",
            "10x",
            "1.5s",
            "m5",
            "0",
            "0s",
            "-3s",
            "25h",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}
