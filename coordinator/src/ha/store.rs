//! The etcd backend of [`crate::store::Store`]: the same records as sled, under
//! `{prefix}/state/`, and every write fenced on the leadership term.
//!
//! Keys: `meta/schema`, `nodes/{name}`, `events/{node}/{id:020}`, `jobs/{id}`,
//! `lemons/{key}`; values are the same JSON as in sled. Writes are staged and
//! committed by `flush` in transactions that succeed only while the leader key
//! still has this leadership's create revision: a deposed leader cannot write,
//! even one that does not know yet that it was deposed. A refused transaction
//! revokes the leadership at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use tracing::warn;

use super::HaConfig;
use super::etcd::{describe, retryable};
use crate::job::Job;
use crate::leadership::Leadership;
use crate::lemons::LemonRecord;
use crate::node::{MAX_EVENTS, NodeEvent, NodeRecord};
use crate::store::StoreError;

const SCHEMA: &[u8] = b"vigil-store-v1";
/// etcd refuses a transaction of more than 128 operations (`--max-txn-ops`).
const MAX_OPS: usize = 100;
/// ... or a request over 1.5 MiB (`--max-request-bytes`).
const MAX_TXN_BYTES: usize = 1024 * 1024;
const PAGE: i64 = 500;
const RETRY: Duration = Duration::from_millis(100);

enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

impl Op {
    fn size(&self) -> usize {
        match self {
            Op::Put(k, v) => k.len() + v.len(),
            Op::Delete(k) => k.len(),
        }
    }
}

pub struct EtcdStore {
    client: Client,
    prefix: String,
    leader_key: String,
    leadership: Arc<Leadership>,
    request_timeout: Duration,
    /// What was there when leadership was won, handed out by the `load_*` calls.
    loaded: Mutex<Vec<(String, Vec<u8>)>>,
    pending: Mutex<Vec<Op>>,
    /// Event ids per node, oldest first: the ones beyond `MAX_EVENTS` are deleted.
    events: Mutex<HashMap<String, VecDeque<u64>>>,
    next_event: AtomicU64,
    bytes: AtomicU64,
    /// For messages: `etcd http://a:2379,... /vigil/state/`.
    pub(crate) describe: String,
}

impl EtcdStore {
    /// Reads all of vigil's state from etcd (linearizable, in pages). Called
    /// once leadership is won: nobody else can write from then on.
    pub async fn open(
        client: Client,
        ha: &HaConfig,
        leadership: Arc<Leadership>,
    ) -> Result<Self, StoreError> {
        let prefix = ha.state_prefix();
        let describe_it = format!("etcd {} {prefix}", ha.etcd_endpoints.join(","));
        let mut c = client.clone();
        let started = Instant::now();
        let mut all = Vec::new();
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            let resp = loop {
                match c.get(from.clone(), Some(opts.clone())).await {
                    Ok(r) => break r,
                    Err(e) if retryable(&e) && leadership.is_valid() => {
                        tokio::time::sleep(RETRY).await;
                    }
                    Err(e) => {
                        return Err(StoreError::Io {
                            path: describe_it.clone().into(),
                            message: format!("cannot read the state: {}", describe(&e)),
                        });
                    }
                }
            };
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                all.push((key, kv.value().to_vec()));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        let store = Self {
            client,
            leader_key: ha.leader_key(),
            leadership,
            request_timeout: ha.request_timeout,
            loaded: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            events: Mutex::new(HashMap::new()),
            next_event: AtomicU64::new(1),
            bytes: AtomicU64::new(0),
            describe: describe_it,
            prefix,
        };
        let schema_key = format!("{}meta/schema", store.prefix);
        match all.iter().find(|(k, _)| *k == schema_key) {
            Some((_, v)) if v.as_slice() == SCHEMA => {}
            Some((_, v)) => {
                return Err(StoreError::Foreign {
                    path: store.describe.clone().into(),
                    found: format!("schema {:?}", String::from_utf8_lossy(v)),
                });
            }
            None => store.stage(Op::Put(schema_key, SCHEMA.to_vec())),
        }
        let mut bytes = 0u64;
        let mut max_id = 0u64;
        {
            let mut events = lock(&store.events);
            for (k, v) in &all {
                bytes += (k.len() + v.len()) as u64;
                if let Some((node, id)) = store.event_key(k) {
                    max_id = max_id.max(id);
                    events.entry(node.to_owned()).or_default().push_back(id);
                }
            }
            for ids in events.values_mut() {
                ids.make_contiguous().sort_unstable();
            }
        }
        store.next_event.store(max_id + 1, Ordering::Relaxed);
        store.bytes.store(bytes, Ordering::Relaxed);
        tracing::info!(
            keys = all.len(),
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "read the cluster state from etcd"
        );
        *lock(&store.loaded) = all;
        Ok(store)
    }

    pub fn leadership(&self) -> &Arc<Leadership> {
        &self.leadership
    }

    fn event_key<'a>(&self, key: &'a str) -> Option<(&'a str, u64)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("events/")?;
        let (node, id) = rest.rsplit_once('/')?;
        Some((node, id.parse().ok()?))
    }

    fn stage(&self, op: Op) {
        lock(&self.pending).push(op);
    }

    fn loaded<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let start = format!("{}{kind}/", self.prefix);
        let loaded = lock(&self.loaded);
        let mut out = Vec::new();
        for (k, v) in loaded.iter().filter(|(k, _)| k.starts_with(&start)) {
            let record = serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
                path: self.describe.clone().into(),
                key: k.clone(),
                message: e.to_string(),
            })?;
            out.push((k[start.len()..].to_owned(), record));
        }
        Ok(out)
    }

    pub fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::new();
        for (name, record) in self.loaded::<NodeRecord>("nodes")? {
            if record.name != name {
                return Err(StoreError::Corrupt {
                    path: self.describe.clone().into(),
                    key: format!("nodes/{name}"),
                    message: format!("holds the record of node {:?}", record.name),
                });
            }
            out.push(record);
        }
        Ok(out)
    }

    pub fn load_jobs(&self) -> Result<Vec<Job>, StoreError> {
        Ok(self
            .loaded::<Job>("jobs")?
            .into_iter()
            .map(|(_, j)| j)
            .collect())
    }

    pub fn load_lemons(&self) -> Result<Vec<LemonRecord>, StoreError> {
        Ok(self
            .loaded::<LemonRecord>("lemons")?
            .into_iter()
            .map(|(_, l)| l)
            .collect())
    }

    /// Oldest first within each node, as sled gives them.
    pub fn load_events(&self) -> Result<Vec<(String, NodeEvent)>, StoreError> {
        let mut out: Vec<(String, u64, NodeEvent)> = Vec::new();
        for (rest, event) in self.loaded::<NodeEvent>("events")? {
            let Some((node, id)) = rest.rsplit_once('/') else {
                continue;
            };
            out.push((node.to_owned(), id.parse().unwrap_or(0), event));
        }
        out.sort_by(|a, b| (a.0.as_str(), a.1).cmp(&(b.0.as_str(), b.1)));
        Ok(out.into_iter().map(|(n, _, e)| (n, e)).collect())
    }

    fn encode<T: serde::Serialize>(&self, what: &str, v: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(v).map_err(|e| StoreError::Io {
            path: self.describe.clone().into(),
            message: format!("cannot encode {what}: {e}"),
        })
    }

    pub fn put_node(&self, record: &NodeRecord) -> Result<(), StoreError> {
        let v = self.encode(&format!("node {:?}", record.name), record)?;
        self.stage(Op::Put(format!("{}nodes/{}", self.prefix, record.name), v));
        Ok(())
    }

    pub fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        let v = self.encode(&format!("job {:?}", job.id), job)?;
        self.stage(Op::Put(format!("{}jobs/{}", self.prefix, job.id), v));
        Ok(())
    }

    pub fn put_lemon(&self, record: &LemonRecord) -> Result<(), StoreError> {
        let v = self.encode(&format!("lemon record {:?}", record.key()), record)?;
        self.stage(Op::Put(
            format!("{}lemons/{}", self.prefix, record.key()),
            v,
        ));
        Ok(())
    }

    pub fn put_event(&self, node: &str, event: &NodeEvent) -> Result<(), StoreError> {
        let v = self.encode(&format!("an event of node {node:?}"), event)?;
        let id = self.next_event.fetch_add(1, Ordering::Relaxed);
        self.stage(Op::Put(self.event_key_of(node, id), v));
        let mut events = lock(&self.events);
        let ids = events.entry(node.to_owned()).or_default();
        ids.push_back(id);
        while ids.len() > MAX_EVENTS {
            if let Some(old) = ids.pop_front() {
                self.stage(Op::Delete(self.event_key_of(node, old)));
            }
        }
        Ok(())
    }

    fn event_key_of(&self, node: &str, id: u64) -> String {
        format!("{}events/{node}/{id:020}", self.prefix)
    }

    pub fn size(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Commits every staged write, in fenced transactions. What could not be
    /// committed stays staged (ahead of anything staged since) for the next flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let ops = last_write_per_key(std::mem::take(&mut *lock(&self.pending)));
        if ops.is_empty() {
            return Ok(());
        }
        let mut chunks: Vec<Vec<Op>> = vec![Vec::new()];
        let mut size = 0;
        for op in ops {
            let last = chunks.last().map_or(0, Vec::len);
            if last >= MAX_OPS || (last > 0 && size + op.size() > MAX_TXN_BYTES) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += op.size();
            if let Some(c) = chunks.last_mut() {
                c.push(op);
            }
        }
        let mut chunks = chunks.into_iter();
        while let Some(chunk) = chunks.next() {
            if let Err(e) = self.commit(&chunk).await {
                let mut pending = lock(&self.pending);
                let newer = std::mem::take(&mut *pending);
                pending.extend(chunk);
                pending.extend(chunks.flatten());
                pending.extend(newer);
                return Err(e);
            }
            let written: u64 = chunk.iter().map(|o| o.size() as u64).sum();
            self.bytes.fetch_add(written, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn commit(&self, ops: &[Op]) -> Result<(), StoreError> {
        let term = i64::try_from(self.leadership.term()).unwrap_or(i64::MAX);
        let txn_ops: Vec<TxnOp> = ops
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(k.clone(), v.clone(), None),
                Op::Delete(k) => TxnOp::delete(k.clone(), None),
            })
            .collect();
        let mut last_error = String::new();
        loop {
            if !self.leadership.is_valid() {
                return Err(self.fenced(if last_error.is_empty() {
                    "leadership lapsed before the write".to_owned()
                } else {
                    format!("leadership lapsed while etcd failed: {last_error}")
                }));
            }
            let txn = Txn::new()
                .when([Compare::create_revision(
                    self.leader_key.clone(),
                    CompareOp::Equal,
                    term,
                )])
                .and_then(txn_ops.clone());
            let mut c = self.client.clone();
            match tokio::time::timeout(self.request_timeout, c.txn(txn)).await {
                Ok(Ok(r)) if r.succeeded() => return Ok(()),
                Ok(Ok(_)) => {
                    let reason = format!(
                        "etcd refused a write fenced on term {term}: the leader key has another \
                         holder, so this coordinator no longer leads"
                    );
                    self.leadership.revoke(reason.clone());
                    return Err(self.fenced(reason));
                }
                Ok(Err(e)) if retryable(&e) => last_error = describe(&e),
                Ok(Err(e)) => {
                    return Err(StoreError::Io {
                        path: self.describe.clone().into(),
                        message: describe(&e),
                    });
                }
                Err(_) => last_error = "no answer in time".to_owned(),
            }
            warn!(error = %last_error, "etcd write failed; retrying while leadership holds");
            tokio::time::sleep(RETRY).await;
        }
    }

    fn fenced(&self, reason: String) -> StoreError {
        StoreError::Fenced {
            term: self.leadership.term(),
            reason,
        }
    }
}

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Put(k, _) | Op::Delete(k) => k,
        }
    }
}

/// etcd refuses a transaction that names a key twice: keep each key's last
/// write, in the order of those last writes.
fn last_write_per_key(ops: Vec<Op>) -> Vec<Op> {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<Op> = ops
        .into_iter()
        .rev()
        .filter(|op| seen.insert(op.key().to_owned()))
        .collect();
    kept.reverse();
    kept
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_written_twice_keeps_its_last_write_only() {
        let ops = vec![
            Op::Put("a".into(), b"1".to_vec()),
            Op::Put("b".into(), b"1".to_vec()),
            Op::Put("a".into(), b"2".to_vec()),
            Op::Delete("b".into()),
        ];
        let kept = last_write_per_key(ops);
        let shown: Vec<String> = kept
            .iter()
            .map(|o| match o {
                Op::Put(k, v) => format!("put {k}={}", String::from_utf8_lossy(v)),
                Op::Delete(k) => format!("delete {k}"),
            })
            .collect();
        assert_eq!(shown, ["put a=2", "delete b"]);
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/vigil/state/"), b"/vigil/state0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
