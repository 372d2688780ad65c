//! The commands that print as the coordinator streams, `events` and `job logs`: they end when
//! the stream does, when stdout's reader goes away, or at Ctrl-C, all with exit code 0.

use std::time::Duration;

use anyhow::Result;
use vigil_proto::v1;

use crate::cli::Output;
use crate::client::Coordinator;
use crate::commands::json_line;
use crate::feed::Feed;
use crate::model::{ClusterEvent, LogChunk};
use crate::render::{EventColumns, LogPrinter};
use crate::term::{Interrupt, Term, write_now};

/// A followed stream's backlog is what arrives before a pause this long; it is printed as one
/// aligned block, and later events use its widths.
const BACKLOG_QUIET: Duration = Duration::from_millis(200);

pub struct EventsQuery {
    pub follow: bool,
    pub node: Option<String>,
    pub job: Option<String>,
    pub backlog: Option<u32>,
    /// Only these kinds (none: all); picked out here, the coordinator has no such filter.
    pub kinds: Vec<String>,
}

impl EventsQuery {
    /// The backlog to ask for: as asked, else with a kind filter the most the coordinator
    /// sends (1000), else its default.
    fn backlog(&self) -> u32 {
        match (self.backlog, self.kinds.is_empty()) {
            (Some(n), _) => n,
            (None, false) => 1000,
            (None, true) => 0,
        }
    }

    fn wants(&self, event: &v1::ClusterEvent) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&event.kind)
    }
}

pub struct LogsQuery {
    pub id: String,
    pub node: Option<String>,
    pub follow: bool,
    pub tail: Option<u64>,
}

/// What waiting on a stream gave.
enum Next<T> {
    Item(T),
    /// The coordinator ended the stream.
    End,
    /// Nothing within the pause asked for.
    Quiet,
    Interrupted,
}

async fn next<T>(
    feed: &mut Feed<T>,
    interrupt: &mut Interrupt,
    quiet: Option<Duration>,
) -> Result<Next<T>> {
    let message = async {
        match quiet {
            Some(pause) => tokio::time::timeout(pause, feed.next()).await.ok(),
            None => Some(feed.next().await),
        }
    };
    tokio::select! {
        () = interrupt.wait() => Ok(Next::Interrupted),
        message = message => Ok(match message {
            None => Next::Quiet,
            Some(result) => result?.map_or(Next::End, Next::Item),
        }),
    }
}

/// `events`: the backlog aligned as a table, then (following) each new event on its own
/// line; `-o json`: one JSON object per line.
pub async fn events(c: &mut Coordinator, out: Output, term: Term, q: EventsQuery) -> Result<()> {
    let mut interrupt = Interrupt::catch()?;
    let request = v1::WatchEventsRequest {
        node: q.node.clone().unwrap_or_default(),
        job: q.job.clone().unwrap_or_default(),
        follow: q.follow,
        backlog: q.backlog(),
    };
    let mut feed = tokio::select! {
        () = interrupt.wait() => return Ok(()),
        feed = c.watch_events(request) => feed?,
    };
    if out == Output::Json {
        while let Next::Item(event) = next(&mut feed, &mut interrupt, None).await? {
            if q.wants(&event) && !write_now(&json_line(&ClusterEvent::from(event))?)? {
                break;
            }
        }
        return Ok(());
    }
    let quiet = q.follow.then_some(BACKLOG_QUIET);
    let mut backlog = Vec::new();
    let stop = loop {
        match next(&mut feed, &mut interrupt, quiet).await? {
            Next::Item(event) if q.wants(&event) => backlog.push(ClusterEvent::from(event)),
            Next::Item(_) => {}
            stop => break stop,
        }
    };
    if backlog.is_empty() && !q.follow {
        write_now("no events\n")?;
        return Ok(());
    }
    let columns = EventColumns::fit(&backlog, q.follow);
    let text = columns.header() + &columns.lines(&backlog, term);
    if !write_now(&text)? || !matches!(stop, Next::Quiet) {
        return Ok(());
    }
    while let Next::Item(event) = next(&mut feed, &mut interrupt, None).await? {
        if q.wants(&event) && !write_now(&columns.line(&ClusterEvent::from(event), term))? {
            break;
        }
    }
    Ok(())
}

/// `job logs`: the workers' output as it arrives, each line prefixed `[NODE rank R] ` when
/// the job runs on more than one node and `--node` does not pick one; `-o json`: one JSON
/// object per chunk and line.
pub async fn job_logs(c: &mut Coordinator, out: Output, q: LogsQuery) -> Result<()> {
    let mut interrupt = Interrupt::catch()?;
    let prefix = match (&q.node, out) {
        (None, Output::Table) => c
            .get_job(&q.id)
            .await?
            .summary
            .is_some_and(|s| s.nodes > 1 || s.assigned_nodes.len() > 1),
        _ => false,
    };
    let request = v1::JobLogsRequest {
        id: q.id,
        node: q.node.unwrap_or_default(),
        follow: q.follow,
        tail_bytes: q.tail.unwrap_or(0),
    };
    let mut feed = tokio::select! {
        () = interrupt.wait() => return Ok(()),
        feed = c.job_logs(request) => feed?,
    };
    let mut printer = LogPrinter::new(prefix);
    loop {
        let chunk = match next(&mut feed, &mut interrupt, None).await {
            Ok(Next::Item(chunk)) => LogChunk::from(chunk),
            Ok(_) => break,
            Err(e) => {
                write_now(&printer.finish())?;
                return Err(e);
            }
        };
        let text = match out {
            Output::Json => json_line(&chunk)?,
            Output::Table => printer.push(&chunk),
        };
        if !write_now(&text)? {
            return Ok(());
        }
    }
    write_now(&printer.finish())?;
    Ok(())
}
