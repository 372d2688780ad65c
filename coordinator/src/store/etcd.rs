//! The etcd backend: the same records as SQLite, under `{prefix}/state/`, and
//! every write fenced on the leadership term.
//!
//! Keys: `meta/schema`, `nodes/{name}`, `events/{node}/{id:020}`, `jobs/{id}`,
//! `lemons/{key}`, `evidence/{job}/{attempt:020}/{node}` (read on demand, not kept from the
//! read at election); values are the same JSON as in the SQLite store. A commit writes the
//! whole batch in one transaction that succeeds only while the leader key
//! still has this leadership's create revision: a deposed leader cannot write,
//! even one that does not know yet that it was deposed. A refused transaction
//! revokes the leadership at once. A batch over etcd's limits on one
//! transaction (a whole state written again) goes out in several, each fenced.
//!
//! A commit's transaction takes at most `ha.request_timeout`, retries
//! included (a batch split in several: each of them): the engine waits for
//! it, and an etcd that answers keepalives but not writes must not stall it.
//! What was not written stays staged for the next commit, with the same keys
//! (event ids are fixed when staged), so writing it twice is harmless.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use tracing::warn;

use super::evidence::{Read, Reader};
use super::{Backend, Commit, Kind, Put, StoreError, lock, restage};
use crate::ha::HaConfig;
use crate::ha::etcd::{describe, retryable};
use crate::leadership::Leadership;
use crate::node::MAX_EVENTS;

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
    path: PathBuf,
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
            path: describe_it.into(),
            prefix,
        };
        let schema_key = format!("{}meta/schema", store.prefix);
        match all.iter().find(|(k, _)| *k == schema_key) {
            Some((_, v)) if v.as_slice() == SCHEMA => {}
            Some((_, v)) => {
                return Err(StoreError::Foreign {
                    path: store.path.clone(),
                    found: format!("schema {:?}", String::from_utf8_lossy(v)),
                });
            }
            None => store.stage_op(Op::Put(schema_key, SCHEMA.to_vec())),
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
        // Evidence is read on demand (`EtcdReader`), never from what was read here.
        let evidence = format!("{}{}/", store.prefix, Kind::Evidence.dir());
        all.retain(|(k, _)| !k.starts_with(&evidence));
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

    fn event_key<'a>(&self, key: &'a str) -> Option<(&'a str, u64)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("events/")?;
        let (node, id) = rest.rsplit_once('/')?;
        Some((node, id.parse().ok()?))
    }

    fn stage_op(&self, op: Op) {
        lock(&self.pending).push(op);
    }

    fn event_key_of(&self, node: &str, id: u64) -> String {
        format!("{}events/{node}/{id:020}", self.prefix)
    }

    /// Commits every staged write, in fenced transactions, each within
    /// `request_timeout`. What could not be committed stays staged (ahead of
    /// anything staged since) for the next commit.
    async fn commit_staged(&self) -> Result<(), StoreError> {
        let ops = last_write_per_key(std::mem::take(&mut *lock(&self.pending)));
        if ops.is_empty() {
            return Ok(());
        }
        let mut chunks = chunked(ops).into_iter();
        while let Some(chunk) = chunks.next() {
            let deadline = Instant::now() + self.request_timeout;
            if let Err(e) = self.write(&chunk, deadline).await {
                let mut kept = chunk;
                kept.extend(chunks.flatten());
                restage(&self.pending, kept);
                return Err(e);
            }
            let written: u64 = chunk.iter().map(|o| o.size() as u64).sum();
            self.bytes.fetch_add(written, Ordering::Relaxed);
        }
        Ok(())
    }

    /// One fenced transaction of `ops`, retried on errors worth retrying
    /// until `deadline`.
    async fn write(&self, ops: &[Op], deadline: Instant) -> Result<(), StoreError> {
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
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, c.txn(txn)).await {
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
                        path: self.path.clone(),
                        message: describe(&e),
                    });
                }
                Err(_) => last_error = "no answer in time".to_owned(),
            }
            if Instant::now() + RETRY >= deadline {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    message: format!(
                        "etcd did not take the write within {} ({last_error}); it stays staged \
                         and goes out with the next commit",
                        humantime::format_duration(self.request_timeout)
                    ),
                });
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

impl Backend for EtcdStore {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn leadership(&self) -> &Arc<Leadership> {
        &self.leadership
    }

    /// From what was read when leadership was won; events oldest first
    /// within each node, as the SQLite store gives them.
    fn load(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = format!("{}{}/", self.prefix, kind.dir());
        let loaded = lock(&self.loaded);
        let found = loaded
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&start)?, v)));
        if kind != Kind::Event {
            return Ok(found.map(|(k, v)| (k.to_owned(), v.clone())).collect());
        }
        let mut events: Vec<(&str, u64, &Vec<u8>)> = found
            .filter_map(|(rest, v)| {
                let (node, id) = rest.rsplit_once('/')?;
                Some((node, id.parse().unwrap_or(0), v))
            })
            .collect();
        events.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        Ok(events
            .into_iter()
            .map(|(node, _, v)| (node.to_owned(), v.clone()))
            .collect())
    }

    fn discard(&self) {
        lock(&self.pending).clear();
    }

    fn stage(&self, put: Put) {
        let Put { kind, key, value } = put;
        if kind != Kind::Event {
            let key = format!("{}{}/{key}", self.prefix, kind.dir());
            self.stage_op(Op::Put(key, value));
            return;
        }
        let id = self.next_event.fetch_add(1, Ordering::Relaxed);
        self.stage_op(Op::Put(self.event_key_of(&key, id), value));
        let mut events = lock(&self.events);
        let ids = events.entry(key.clone()).or_default();
        ids.push_back(id);
        while ids.len() > MAX_EVENTS {
            if let Some(old) = ids.pop_front() {
                self.stage_op(Op::Delete(self.event_key_of(&key, old)));
            }
        }
    }

    fn stage_delete(&self, kind: Kind, key: String) {
        self.stage_op(Op::Delete(format!("{}{}/{key}", self.prefix, kind.dir())));
    }

    fn reader(&self) -> Arc<dyn Reader> {
        Arc::new(EtcdReader {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            request_timeout: self.request_timeout,
            path: self.path.clone(),
        })
    }

    fn commit(&self) -> Commit<'_> {
        Box::pin(self.commit_staged())
    }

    /// What was read at election plus what this leader wrote since.
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.bytes.load(Ordering::Relaxed))
    }
}

/// Reads committed records by prefix with etcd range reads, a few records a page (evidence
/// records are up to a few hundred KiB each).
struct EtcdReader {
    client: Client,
    prefix: String,
    request_timeout: Duration,
    path: PathBuf,
}

/// Records per page of an [`EtcdReader`] read.
const READ_PAGE: i64 = 8;

impl Reader for EtcdReader {
    fn read_prefix(&self, kind: Kind, prefix: String) -> Read<'_> {
        Box::pin(async move {
            let start = format!("{}{}/", self.prefix, kind.dir());
            let full = format!("{start}{prefix}");
            let end = prefix_end(full.as_bytes());
            let mut from = full.into_bytes();
            let mut out = Vec::new();
            loop {
                let opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(READ_PAGE);
                let mut c = self.client.clone();
                let resp =
                    tokio::time::timeout(self.request_timeout, c.get(from.clone(), Some(opts)))
                        .await
                        .map_err(|_| "no answer in time".to_owned())
                        .and_then(|r| r.map_err(|e| describe(&e)))
                        .map_err(|message| StoreError::Io {
                            path: self.path.clone(),
                            message: format!("cannot read {}: {message}", kind.dir()),
                        })?;
                for kv in resp.kvs() {
                    let key = String::from_utf8_lossy(kv.key());
                    if let Some(k) = key.strip_prefix(&start) {
                        out.push((k.to_owned(), kv.value().to_vec()));
                    }
                }
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => return Ok(out),
                }
            }
        })
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

/// Splits a batch along etcd's limits on one transaction (usually: one chunk).
fn chunked(ops: Vec<Op>) -> Vec<Vec<Op>> {
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
    chunks
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

    /// A store over an "etcd" that accepts connections and never answers.
    async fn store_on_a_silent_etcd(request_timeout: Duration) -> EtcdStore {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let client = Client::connect([format!("http://{addr}")], None)
            .await
            .expect("client");
        let valid_until = Instant::now() + Duration::from_secs(60);
        EtcdStore {
            client,
            prefix: "/vigil/state/".into(),
            leader_key: "/vigil/leader".into(),
            leadership: Arc::new(Leadership::elected("c1", "", 7, valid_until, 0)),
            request_timeout,
            loaded: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            events: Mutex::new(HashMap::new()),
            next_event: AtomicU64::new(1),
            bytes: AtomicU64::new(0),
            path: "etcd silent".into(),
        }
    }

    fn staged_keys(store: &EtcdStore) -> Vec<String> {
        lock(&store.pending)
            .iter()
            .map(|op| op.key().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_commit_etcd_does_not_answer_fails_in_time_and_stays_staged() {
        let timeout = Duration::from_millis(300);
        let store = store_on_a_silent_etcd(timeout).await;
        store.stage(Put {
            kind: Kind::Node,
            key: "a".into(),
            value: b"{}".to_vec(),
        });
        store.stage(Put {
            kind: Kind::Event,
            key: "a".into(),
            value: b"{}".to_vec(),
        });
        let staged = staged_keys(&store);
        for _ in 0..2 {
            let started = Instant::now();
            let err = store.commit().await.expect_err("no answer");
            assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
            assert!(matches!(err, StoreError::Io { .. }), "{err}");
            assert!(err.to_string().contains("stays staged"), "{err}");
            assert_eq!(staged_keys(&store), staged, "the same batch, once");
        }
        assert!(store.leadership.is_valid(), "a slow etcd deposes no one");
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/vigil/state/"), b"/vigil/state0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
