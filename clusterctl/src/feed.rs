//! A server stream read message by message: within the command's time limit when it has one
//! (none when following), each failure turned into one line.

use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::time::Instant;
use tonic::Streaming;

use crate::client::{REQUEST_TIMEOUT, describe_status, unreachable};

pub struct Feed<T> {
    stream: Streaming<T>,
    /// When the whole answer must be in, and the limit it came from (for the message).
    deadline: Option<(Instant, Duration)>,
    url: String,
}

impl<T> Feed<T> {
    /// A stream `url` opened; `limit` bounds the whole answer from `started` (before the
    /// call was sent), opening included.
    pub fn new(stream: Streaming<T>, url: &str, started: Instant, limit: Option<Duration>) -> Self {
        Self {
            stream,
            deadline: limit.map(|l| (started + l, l)),
            url: url.to_string(),
        }
    }

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
