//! One function per subcommand: call the coordinator, map the answer to the model, render it.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cli::{Cli, Command, Output};
use crate::client::Coordinator;
use crate::model::{NodeDetail, NodeList, NodeSummary, Status};
use crate::render;

/// Runs the parsed command line and returns what goes to stdout.
pub async fn run(cli: Cli) -> Result<String> {
    let mut coordinator = Coordinator::connect(&cli.coordinator).await?;
    let out = cli.output;
    match cli.command {
        Command::Status => status(&mut coordinator, out).await,
        Command::Nodes => nodes(&mut coordinator, out).await,
        Command::Node { name } => node(&mut coordinator, out, &name).await,
        Command::Cordon { name, reason } => cordon(&mut coordinator, out, &name, &reason).await,
        Command::Uncordon { name } => uncordon(&mut coordinator, out, &name).await,
    }
}

async fn status(c: &mut Coordinator, out: Output) -> Result<String> {
    let status = Status::from_proto(c.status().await?, c.url());
    emit(out, &status, |s| render::status(s, now_ms()))
}

async fn nodes(c: &mut Coordinator, out: Output) -> Result<String> {
    let list = NodeList::from(c.list_nodes().await?);
    emit(out, &list, |l| render::nodes(&l.nodes))
}

async fn node(c: &mut Coordinator, out: Output, name: &str) -> Result<String> {
    let detail = NodeDetail::from_proto(c.get_node(name).await?, name);
    emit(out, &detail, |d| render::node_detail(d, now_ms()))
}

async fn cordon(c: &mut Coordinator, out: Output, name: &str, reason: &str) -> Result<String> {
    let node = NodeSummary::from(c.cordon(name, reason).await?);
    emit(out, &node, |n| {
        let reason = n.cordon.as_ref().map_or(reason, |c| c.reason.as_str());
        format!(
            "node {} cordoned: {}\n",
            n.name,
            crate::table::sanitize(reason)
        )
    })
}

async fn uncordon(c: &mut Coordinator, out: Output, name: &str) -> Result<String> {
    let node = NodeSummary::from(c.uncordon(name).await?);
    emit(out, &node, |n| format!("node {} uncordoned\n", n.name))
}

/// The model as one pretty JSON document, or the text view of it.
fn emit<T: Serialize>(out: Output, model: &T, text: impl FnOnce(&T) -> String) -> Result<String> {
    match out {
        Output::Json => {
            let mut json = serde_json::to_string_pretty(model).context("encoding JSON output")?;
            json.push('\n');
            Ok(json)
        }
        Output::Table => Ok(text(model)),
    }
}

/// The local wall clock, for ages of server timestamps; before 1970 reads as 0.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
