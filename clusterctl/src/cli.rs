//! The command line: global flags and one variant per subcommand (a contract; docs and tests use it).

use clap::{Parser, Subcommand, ValueEnum};

/// Where clusterctl looks for the coordinator when neither flag nor environment says.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7770";

/// Operate a vigil GPU training cluster.
#[derive(Debug, Parser)]
#[command(name = "clusterctl", version)]
pub struct Cli {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        global = true,
        env = "VIGIL_COORDINATOR",
        default_value = DEFAULT_COORDINATOR,
        value_name = "URL"
    )]
    pub coordinator: String,

    /// Output format: aligned text for people, or one stable JSON document for scripts.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One screen: coordinator, node counts per state, GPUs, cordoned nodes.
    Status,
    /// List every node with its availability and scheduling state.
    Nodes,
    /// Show one node: summary, cordon, GPUs with their last health sample, workers.
    Node {
        /// The node's name, as `clusterctl nodes` lists it.
        name: String,
    },
    /// Stop placing new work on a node; running work stays.
    Cordon {
        name: String,
        /// Why, for the next operator who reads `clusterctl nodes`.
        #[arg(long, value_name = "TEXT", value_parser = non_empty_reason)]
        reason: String,
    },
    /// Let new work be placed on a node again.
    Uncordon { name: String },
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
    fn cordon_requires_a_non_empty_reason() {
        assert!(Cli::try_parse_from(["clusterctl", "cordon", "n1"]).is_err());
        assert!(Cli::try_parse_from(["clusterctl", "cordon", "n1", "--reason", "  "]).is_err());
        let cli = Cli::try_parse_from(["clusterctl", "cordon", "n1", "--reason", "bad fan"])
            .expect("parses");
        assert!(matches!(cli.command, Command::Cordon { reason, .. } if reason == "bad fan"));
    }
}
