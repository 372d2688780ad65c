//! A server stream read message by message: within the command's time limit when it has one
//! (none when following), each failure turned into one line.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::time::Instant;
use tonic::{Response, Status, Streaming};

use crate::client::{REQUEST_TIMEOUT, Subject, describe_status, unreachable};

pub struct Feed<T> {
    stream: Streaming<T>,
    /// When the whole answer must be in, and the limit it came from (for the message).
    deadline: Option<(Instant, Duration)>,
    url: String,
}

/// Opens a stream with `call`; `limit` bounds the whole answer, opening included.
pub async fn open_feed<T>(
    url: &str,
    call: impl Future<Output = Result<Response<Streaming<T>>, Status>>,
    subject: Option<Subject<'_>>,
    limit: Option<Duration>,
) -> Result<Feed<T>> {
    let deadline = limit.map(|l| (Instant::now() + l, l));
    let answer = match deadline {
        Some((at, limit)) => tokio::time::timeout_at(at, call)
            .await
            .map_err(|_| late(url, limit))?,
        None => call.await,
    };
    let stream = answer.map(Response::into_inner).map_err(|status| {
        anyhow!(describe_status(
            &status,
            url,
            subject,
            limit.unwrap_or(REQUEST_TIMEOUT)
        ))
    })?;
    Ok(Feed {
        stream,
        deadline,
        url: url.to_string(),
    })
}

impl<T> Feed<T> {
    /// The next message; `None` when the coordinator ended the stream. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<T>> {
        let message = self.stream.message();
        let result = match self.deadline {
            Some((at, limit)) => tokio::time::timeout_at(at, message)
                .await
                .map_err(|_| late(&self.url, limit))?,
            None => message.await,
        };
        result.map_err(|status| {
            let limit = self.deadline.map_or(REQUEST_TIMEOUT, |(_, l)| l);
            anyhow!(describe_status(&status, &self.url, None, limit))
        })
    }
}

fn late(url: &str, limit: Duration) -> anyhow::Error {
    anyhow!(unreachable(
        url,
        &format!("no answer within {}s", limit.as_secs())
    ))
}
