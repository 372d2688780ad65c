//! Hung attempts' evidence in the store: one record per (job, attempt, node), under
//! `evidence/{job}/{attempt:020}/{node}` (the attempt zero-padded, so a job's records sort by
//! attempt), apart from the job record, which keeps a note per node. The engine writes and
//! deletes them with its other changes; nothing loads them at start: `clusterctl job show`
//! reads a job's on demand through an [`EvidenceReader`], from any task, without the engine.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use vigil_core::jobs::evidence::NodeEvidence;

use super::{Kind, StoreError};

/// The key of `node`'s evidence of `job`'s attempt `attempt`.
pub fn key(job: &str, attempt: u64, node: &str) -> String {
    format!("{job}/{attempt:020}/{node}")
}

/// Every key of `job`'s evidence starts with this.
pub fn job_prefix(job: &str) -> String {
    format!("{job}/")
}

/// The attempt a key names.
fn attempt_of(key: &str) -> Option<u64> {
    key.split('/').nth(1)?.parse().ok()
}

/// Committed records in flight from a [`Reader`].
pub type Read<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<(String, Vec<u8>)>, StoreError>> + Send + 'a>>;

/// Reads committed records of a kind by key prefix, beside the engine (each backend has one:
/// SQLite its own read-only connection, etcd a range read, memory its maps).
pub trait Reader: Send + Sync {
    /// Every committed record of `kind` whose key starts with `prefix`, as (key, JSON), by key.
    fn read_prefix(&self, kind: Kind, prefix: String) -> Read<'_>;
}

/// A reader with nothing to read (the sled store, only ever read to move it over).
pub struct Nothing;

impl Reader for Nothing {
    fn read_prefix(&self, _: Kind, _: String) -> Read<'_> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// Reads jobs' evidence; cloned into whoever serves `clusterctl job show`.
#[derive(Clone)]
pub struct EvidenceReader {
    reader: Arc<dyn Reader>,
    /// Where the store lives, for errors.
    path: PathBuf,
}

impl EvidenceReader {
    pub fn new(reader: Arc<dyn Reader>, path: PathBuf) -> Self {
        Self { reader, path }
    }

    /// Every stored record of `job`'s evidence, as (attempt, evidence), by attempt then node.
    pub async fn of_job(&self, job: &str) -> Result<Vec<(u64, NodeEvidence)>, StoreError> {
        let records = self
            .reader
            .read_prefix(Kind::Evidence, job_prefix(job))
            .await?;
        records
            .into_iter()
            .map(|(key, value)| {
                let corrupt = |message: String| StoreError::Corrupt {
                    path: self.path.clone(),
                    key: format!("{}/{key}", Kind::Evidence.dir()),
                    message,
                };
                let attempt =
                    attempt_of(&key).ok_or_else(|| corrupt("the key names no attempt".into()))?;
                let evidence =
                    serde_json::from_slice(&value).map_err(|e| corrupt(e.to_string()))?;
                Ok((attempt, evidence))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_attempt_and_name_it() {
        let (a, b) = (key("j-1", 2, "n9"), key("j-1", 10, "n1"));
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with(&job_prefix("j-1")));
        assert!(!key("j-10", 1, "n1").starts_with(&job_prefix("j-1")));
        assert_eq!(attempt_of(&b), Some(10));
        assert_eq!(attempt_of("j-1"), None);
    }
}
