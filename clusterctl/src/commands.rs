//! One function per subcommand: call the coordinator, map the answer to the model, render it.
//! The commands that print as they go live in `follow` (`events`, `job logs`) and `watch`
//! (`status --watch`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;
use vigil_proto::NodeState;

use crate::cli::{
    BreakerCommand, CheckpointCommand, Cli, Command, JobCommand, NodeCommand, Output,
    RecoveryCommand,
};
use crate::client::Coordinator;
use crate::follow::{EventsQuery, LogsQuery};
use crate::model::{
    Breaker, DiagnoseResult, DrainResult, JobDetail, JobList, LemonList, NodeDetail, NodeList,
    NodeSummary, RecoveryView, Status,
};
use crate::term::Term;
use crate::{follow, render, watch};

/// What a command that got an answer prints: stdout, and the error line when the answer
/// itself is a failure (failed diagnostics), which makes the exit code 1.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: String,
    pub failure: Option<String>,
}

impl From<String> for Outcome {
    fn from(stdout: String) -> Self {
        Self {
            stdout,
            failure: None,
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<Outcome> {
    match cli.command {
        Command::Completions { shell } => return Ok(completions(shell).into()),
        Command::Checkpoint {
            command:
                CheckpointCommand::Latest {
                    dir,
                    layout,
                    world_size,
                },
        } => {
            return crate::checkpoint::latest(cli.output, &dir, layout, world_size)
                .map(Outcome::from);
        }
        _ => {}
    }
    // A spec that cannot be read fails the same whether or not a coordinator answers.
    let spec = match &cli.command {
        Command::Job {
            command: JobCommand::Submit { file },
        } => Some(read_spec(file)?),
        _ => None,
    };
    let tls = crate::client::Tls {
        ca: cli.ca.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
        insecure: cli.insecure,
    };
    let mut coordinator = Coordinator::new(&cli.coordinator, &tls, cli.debug)?;
    let c = &mut coordinator;
    let out = cli.output;
    let term = match out {
        Output::Table => Term::detect(),
        Output::Json => Term::PLAIN,
    };
    let streamed = |()| Outcome::default();
    match cli.command {
        Command::Status { watch: false, .. } => status(c, out, term).await.map(Outcome::from),
        Command::Status { interval, .. } => watch::status(c, out, interval).await.map(streamed),
        Command::Nodes { lemons: false } => nodes(c, out, term).await.map(Outcome::from),
        Command::Nodes { lemons: true } => lemons(c, out, term).await.map(Outcome::from),
        Command::Node {
            command: Some(NodeCommand::Forget { name }),
            ..
        } => {
            let node = NodeSummary::from(c.forget_node(&name).await?);
            emit(out, &node, |n| {
                format!(
                    "node {}: host binding dropped; the next host to register it binds it\n",
                    n.name
                )
            })
            .map(Outcome::from)
        }
        Command::Node {
            name: Some(name), ..
        } => node(c, out, &name, term).await.map(Outcome::from),
        Command::Node { name: None, .. } => anyhow::bail!("name a node: clusterctl node NAME"),
        Command::Drain { name, reason } => drain(c, out, &name, &reason).await.map(Outcome::from),
        Command::Events {
            follow,
            node,
            job,
            backlog,
            kinds,
        } => {
            let query = EventsQuery {
                follow,
                node,
                job,
                backlog,
                kinds,
            };
            follow::events(c, out, term, query).await.map(streamed)
        }
        Command::Completions { shell } => Ok(completions(shell).into()),
        Command::Checkpoint { .. } => unreachable!("answered above, without a coordinator"),
        Command::Cordon { name, reason } => cordon(c, out, &name, &reason).await.map(Outcome::from),
        Command::Uncordon {
            name,
            force,
            clear_lemon,
        } => {
            if clear_lemon {
                c.clear_lemon(&name).await?;
            }
            uncordon(c, out, &name, force).await.map(Outcome::from)
        }
        Command::Diagnose { name, timeout } => diagnose(c, out, &name, timeout).await,
        Command::Recovery { command: None } => recovery(c, out, term).await.map(Outcome::from),
        Command::Recovery {
            command: Some(RecoveryCommand::Confirm),
        } => {
            let view = RecoveryView::from(c.confirm_recovery().await?);
            emit(out, &view, render::recovery_confirmed).map(Outcome::from)
        }
        Command::Breaker {
            command: BreakerCommand::Status,
        } => {
            let view = Breaker::from(c.get_breaker().await?);
            emit(out, &view, |b| render::breaker(b, now_ms(), term)).map(Outcome::from)
        }
        Command::Breaker {
            command: BreakerCommand::Reset,
        } => {
            let view = Breaker::from(c.reset_breaker().await?);
            emit(out, &view, render::breaker_reset).map(Outcome::from)
        }
        Command::Jobs => jobs(c, out, term).await.map(Outcome::from),
        Command::Job { command } => match (command, spec) {
            (JobCommand::Submit { file }, spec) => match spec {
                Some(spec) => submit(c, out, &spec).await,
                None => submit(c, out, &read_spec(&file)?).await,
            },
            (JobCommand::Show { id }, _) => job_show(c, out, &id, term).await,
            (JobCommand::Cancel { id }, _) => job_cancel(c, out, &id).await,
            (JobCommand::Report { id }, _) => job_report(c, out, &id, term).await,
            (
                JobCommand::Restart {
                    id,
                    from_checkpoint,
                    env,
                },
                _,
            ) => {
                let detail =
                    JobDetail::from_proto(c.restart_job(&id, from_checkpoint, env).await?, &id);
                emit(out, &detail, |d| {
                    let from = from_checkpoint.map_or_else(
                        || "its last complete checkpoint".to_owned(),
                        |s| format!("checkpoint step {s}"),
                    );
                    format!("job {} restarting from {from}: {}\n", d.job.id, d.job.state)
                })
            }
            (
                JobCommand::Logs {
                    id,
                    node,
                    follow,
                    tail,
                },
                _,
            ) => {
                let query = LogsQuery {
                    id,
                    node,
                    follow,
                    tail,
                };
                return follow::job_logs(c, out, query).await.map(streamed);
            }
        }
        .map(Outcome::from),
    }
}

/// The completion script for `shell`.
fn completions(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "clusterctl", &mut script);
    String::from_utf8_lossy(&script).into_owned()
}

/// A job spec's text and where it came from (the path, or `<stdin>` for `-`).
struct Spec {
    source: String,
    text: String,
}

fn read_spec(file: &str) -> Result<Spec> {
    if file == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read job spec from stdin")?;
        return Ok(Spec {
            source: "<stdin>".to_string(),
            text,
        });
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read job spec {file:?}"))?;
    Ok(Spec {
        source: file.to_string(),
        text,
    })
}

async fn jobs(c: &mut Coordinator, out: Output, term: Term) -> Result<String> {
    let list = JobList::from(c.list_jobs().await?);
    emit(out, &list, |l| render::jobs(&l.jobs, now_ms(), term))
}

async fn submit(c: &mut Coordinator, out: Output, spec: &Spec) -> Result<String> {
    let detail = JobDetail::from_proto(c.submit_job(&spec.text, &spec.source).await?, "");
    emit(out, &detail, render::job_submitted)
}

async fn job_show(c: &mut Coordinator, out: Output, id: &str, term: Term) -> Result<String> {
    let detail = JobDetail::from_proto(c.get_job(id).await?, id);
    emit(out, &detail, |d| render::job_detail(d, now_ms(), term))
}

async fn job_report(c: &mut Coordinator, out: Output, id: &str, term: Term) -> Result<String> {
    let detail = JobDetail::from_proto(c.get_job(id).await?, id);
    emit(out, &detail, |d| render::job_report(d, term))
}

async fn job_cancel(c: &mut Coordinator, out: Output, id: &str) -> Result<String> {
    let detail = JobDetail::from_proto(c.cancel_job(id).await?, id);
    emit(out, &detail, render::job_cancelled)
}

async fn status(c: &mut Coordinator, out: Output, term: Term) -> Result<String> {
    let status = Status::from_proto(c.status().await?, c.url());
    emit(out, &status, |s| render::status(s, now_ms(), term))
}

async fn nodes(c: &mut Coordinator, out: Output, term: Term) -> Result<String> {
    let list = NodeList::from(c.list_nodes().await?);
    emit(out, &list, |l| render::nodes(&l.nodes, term))
}

async fn lemons(c: &mut Coordinator, out: Output, term: Term) -> Result<String> {
    let list = LemonList::from(c.list_lemons().await?);
    emit(out, &list, |l| render::lemons(l, now_ms(), term))
}

async fn node(c: &mut Coordinator, out: Output, name: &str, term: Term) -> Result<String> {
    let detail = NodeDetail::from_proto(c.get_node(name).await?, name);
    emit(out, &detail, |d| render::node_detail(d, now_ms(), term))
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

async fn uncordon(c: &mut Coordinator, out: Output, name: &str, force: bool) -> Result<String> {
    let node = NodeSummary::from(c.uncordon(name, force).await?);
    let forced = if force { " (forced)" } else { "" };
    emit(out, &node, |n| {
        if NodeState::parse(&n.state) == Some(NodeState::Validating) {
            format!(
                "node {} validating{forced}: schedulable once its burn-in passes (clusterctl node {} shows it)\n",
                n.name, n.name
            )
        } else {
            format!("node {} uncordoned{forced}\n", n.name)
        }
    })
}

/// Prints the result whether it passed or not; a failed diagnostic also fails the command.
async fn diagnose(
    c: &mut Coordinator,
    out: Output,
    name: &str,
    timeout: Option<Duration>,
) -> Result<Outcome> {
    let result = DiagnoseResult::from_proto(c.diagnose(name, timeout).await?, name);
    let stdout = emit(out, &result, render::diagnose)?;
    let failure = (!result.diagnostics.passed).then(|| {
        format!(
            "diagnostics failed on {}: {}",
            result.node, result.diagnostics.summary
        )
    });
    Ok(Outcome { stdout, failure })
}

async fn recovery(c: &mut Coordinator, out: Output, term: Term) -> Result<String> {
    let view = RecoveryView::from(c.get_recovery().await?);
    emit(out, &view, |v| render::recovery(v, now_ms(), term))
}

async fn drain(c: &mut Coordinator, out: Output, name: &str, reason: &str) -> Result<String> {
    let result = DrainResult::from_proto(c.drain(name, reason).await?, name);
    emit(out, &result, |d| render::drained(d, reason))
}

/// The model as one pretty JSON document, or the text view of it.
pub fn emit<T: Serialize>(
    out: Output,
    model: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<String> {
    match out {
        Output::Json => json_document(model),
        Output::Table => Ok(text(model)),
    }
}

/// One pretty JSON document and a newline: what `-o json` prints.
pub fn json_document<T: Serialize>(model: &T) -> Result<String> {
    let mut json = serde_json::to_string_pretty(model).context("encoding JSON output")?;
    json.push('\n');
    Ok(json)
}

/// One compact JSON object and a newline: a line of JSON Lines, for streamed output.
pub fn json_line<T: Serialize>(model: &T) -> Result<String> {
    let mut json = serde_json::to_string(model).context("encoding JSON output")?;
    json.push('\n');
    Ok(json)
}

/// The local wall clock, for ages of server timestamps; before 1970 reads as 0.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
