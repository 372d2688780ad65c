//! Leader election on etcd with a lease and a transaction, and the tasks that
//! keep what this coordinator believes in line with what etcd says.
//!
//! Election: grant a lease (`ha.lease_ttl`), then in one transaction create
//! the leader key bound to it if the key does not exist. The key's create
//! revision is the term: etcd revisions only grow, so every later leadership
//! has a higher term. The leader keeps its lease alive every
//! `ha.keepalive_interval`; each answered keepalive moves the local deadline to
//! (when it was sent + TTL − `ha.safety_margin`). The keepalive stream is
//! pinned to one etcd member, so it is reopened on any error; leadership is
//! given up only when etcd says the lease is gone or the deadline passes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tracing::{debug, info, warn};
use vigil_proto::v1;

use super::HaConfig;
use super::etcd::{describe, explain};
pub use super::view::CoordinatorRecord;
use super::view::{HaView, Leader};
use crate::leadership::Leadership;

/// Pause between attempts while etcd cannot be reached.
const RETRY: Duration = Duration::from_millis(250);
/// How often each etcd member's health and the coordinators list are read.
const HEALTH_EVERY: Duration = Duration::from_secs(2);

fn unix_ms() -> u64 {
    crate::metrics::unix_ms(SystemTime::now())
}

/// Leadership won: the lease that holds it and the term it is.
pub struct Won {
    pub lease: i64,
    pub leadership: Arc<Leadership>,
}

/// Campaigns until this coordinator leads. Meanwhile it keeps `view.leader`
/// current, so a standby can send everyone to the leader.
pub async fn campaign(client: &Client, ha: &HaConfig, view: &HaView) -> Won {
    let me = view.me().clone();
    let value = serde_json::to_vec(&me).unwrap_or_default();
    let key = ha.leader_key();
    let ttl = i64::try_from(ha.lease_ttl.as_secs()).unwrap_or(5).max(2);
    let mut c = client.clone();
    let mut last_error = String::new();
    loop {
        let sent = Instant::now();
        let attempt = async {
            let lease = c.lease_grant(ttl, None).await?;
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease.id())),
                    ),
                    TxnOp::get(key.clone(), None),
                ])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = c.txn(txn).await?;
            Ok::<_, etcd_client::Error>((lease.id(), lease.ttl(), resp))
        };
        let (lease, granted_ttl, resp) = match attempt.await {
            Ok(r) => r,
            Err(e) => {
                let error = explain(ha, &e);
                if error != last_error {
                    warn!(%error, "cannot campaign for leadership: etcd unreachable, without quorum or refusing this coordinator; retrying");
                    last_error = error;
                }
                view.set_leader(None);
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        last_error.clear();
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        if resp.succeeded() {
            let term = current
                .as_ref()
                .map(|kv| u64::try_from(kv.create_revision()).unwrap_or(0))
                .unwrap_or(0);
            let granted = Duration::from_secs(u64::try_from(granted_ttl).unwrap_or(0));
            let valid_until = sent + granted.saturating_sub(ha.safety_margin);
            let since = unix_ms();
            info!(
                coordinator = %me.name,
                term,
                lease_ttl_s = granted_ttl,
                "elected leader at term {term}: loading state from etcd"
            );
            view.set_leader(Some(Leader {
                name: me.name.clone(),
                url: me.url.clone(),
                term,
                since_unix_ms: since,
            }));
            return Won {
                lease,
                leadership: Arc::new(Leadership::elected(
                    &me.name,
                    &me.url,
                    term,
                    valid_until,
                    since,
                )),
            };
        }
        // Someone else leads: give our lease back and wait for theirs to end.
        c.lease_revoke(lease).await.ok();
        let Some(kv) = current else {
            // Deleted between the compare and the read: campaign again.
            continue;
        };
        view.set_leader(Some(leader_of(&kv)));
        let from = resp.header().map_or(0, |h| h.revision()) + 1;
        wait_for_vacancy(&mut c, &key, from, ha.lease_ttl).await;
    }
}

fn leader_of(kv: &etcd_client::KeyValue) -> Leader {
    let record: Option<CoordinatorRecord> = serde_json::from_slice(kv.value()).ok();
    let (name, url) = record.map_or_else(
        || ("(unreadable leader key)".to_owned(), String::new()),
        |r| (r.name, r.url),
    );
    Leader {
        name,
        url,
        term: u64::try_from(kv.create_revision()).unwrap_or(0),
        since_unix_ms: 0,
    }
}

/// Returns once the leader key is deleted (its lease ran out, or its holder
/// resigned), or after a while in any case: the caller campaigns again.
async fn wait_for_vacancy(c: &mut Client, key: &str, from_revision: i64, ttl: Duration) {
    // A streaming call: the client's request timeout does not bound it.
    let watch = tokio::time::timeout(
        ttl,
        c.watch(
            key,
            Some(WatchOptions::new().with_start_revision(from_revision)),
        ),
    )
    .await;
    let mut stream = match watch {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %describe(&e), "cannot watch the leader key; polling");
            tokio::time::sleep(RETRY).await;
            return;
        }
        Err(_) => return,
    };
    // A watch can go quiet without failing (a member partitioned away): look again now and then.
    let give_up = tokio::time::sleep(ttl * 2);
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            () = &mut give_up => return,
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                        return;
                    }
                }
                Ok(None) | Err(_) => {
                    tokio::time::sleep(RETRY).await;
                    return;
                }
            },
        }
    }
}

/// Keeps the leader lease alive and the leadership's deadline moving; revokes
/// the leadership when etcd says the lease is gone, when the leader key no
/// longer holds our term, or when the deadline passes without an answer.
pub async fn keep_leading(client: Client, ha: HaConfig, lease: i64, leadership: Arc<Leadership>) {
    let mut c = client;
    let interval = ha.keepalive_interval;
    let key = ha.leader_key();
    let term = leadership.term();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'reopen: loop {
        if leadership.lost_reason().is_some() {
            return;
        }
        if !leadership.is_valid() {
            leadership.revoke(format!(
                "no keepalive answered by etcd within the lease ({}): etcd unreachable or \
                 without quorum",
                humantime::format_duration(ha.lease_ttl)
            ));
            return;
        }
        // Opening the stream is not bounded by the client's request timeout: bound it here.
        let (mut keeper, mut stream) =
            match tokio::time::timeout(interval, c.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => {
                    debug!(error = %describe(&e), "cannot open the keepalive stream; retrying");
                    tokio::time::sleep(RETRY.min(interval)).await;
                    continue 'reopen;
                }
                Err(_) => continue 'reopen,
            };
        loop {
            ticker.tick().await;
            if !leadership.is_valid() {
                continue 'reopen;
            }
            let sent = Instant::now();
            if !matches!(
                tokio::time::timeout(interval, keeper.keep_alive()).await,
                Ok(Ok(()))
            ) {
                continue 'reopen;
            }
            match tokio::time::timeout(interval, stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                    let ttl = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
                    leadership.extend(sent + ttl.saturating_sub(ha.safety_margin));
                }
                Ok(Ok(Some(_))) => {
                    leadership.revoke("etcd says the leader lease has expired");
                    return;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => continue 'reopen,
            }
            // Now and then, check the key itself: an operator may have deleted it.
            if let Ok(Ok(resp)) = tokio::time::timeout(interval, c.get(key.clone(), None)).await {
                let holds = resp
                    .kvs()
                    .first()
                    .is_some_and(|kv| u64::try_from(kv.create_revision()).ok() == Some(term));
                if !holds {
                    leadership.revoke(format!(
                        "the leader key no longer holds term {term}: another coordinator leads"
                    ));
                    return;
                }
            }
        }
    }
}

/// Puts this coordinator's presence key (bound to its own lease) and keeps it
/// there, so every coordinator can list its peers. Runs until dropped.
pub async fn stay_present(client: Client, ha: HaConfig, me: CoordinatorRecord) {
    let mut c = client;
    let key = format!("{}{}", ha.coordinators_prefix(), me.name);
    let value = serde_json::to_vec(&me).unwrap_or_default();
    let ttl = i64::try_from(ha.lease_ttl.as_secs()).unwrap_or(5).max(2);
    loop {
        let lease = match c.lease_grant(ttl, None).await {
            Ok(l) => l.id(),
            Err(_) => {
                tokio::time::sleep(RETRY * 4).await;
                continue;
            }
        };
        if c.put(
            key.clone(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .is_err()
        {
            tokio::time::sleep(RETRY * 4).await;
            continue;
        }
        let opened = tokio::time::timeout(ha.request_timeout, c.lease_keep_alive(lease)).await;
        let Ok(Ok((mut keeper, mut stream))) = opened else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        loop {
            tokio::time::sleep(ha.keepalive_interval).await;
            let sent = tokio::time::timeout(ha.request_timeout, keeper.keep_alive()).await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
            match tokio::time::timeout(ha.keepalive_interval, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                _ => break,
            }
        }
    }
}

/// Every `HEALTH_EVERY`: each member's status, whether a linearizable read
/// commits (quorum), the coordinators present and who leads. Runs until dropped.
pub async fn watch_health(client: Client, ha: HaConfig, view: Arc<HaView>) {
    let mut members: Vec<(String, Option<Client>)> = ha
        .etcd_endpoints
        .iter()
        .map(|e| (e.clone(), None))
        .collect();
    loop {
        let mut statuses = Vec::new();
        for (endpoint, slot) in &mut members {
            if slot.is_none() {
                *slot = super::etcd::connect_one(&ha, endpoint).await.ok();
            }
            let status = match slot.as_mut() {
                Some(one) => match tokio::time::timeout(ha.request_timeout, one.status()).await {
                    Ok(Ok(s)) => v1::EtcdMember {
                        endpoint: endpoint.clone(),
                        healthy: s.errors().is_empty(),
                        is_leader: s.header().is_some_and(|h| h.member_id() == s.leader()),
                        version: s.version().to_owned(),
                        db_size_bytes: u64::try_from(s.db_size()).unwrap_or(0),
                        raft_term: s.raft_term(),
                        error: s.errors().join("; "),
                    },
                    Ok(Err(e)) => unhealthy(endpoint, explain(&ha, &e)),
                    Err(_) => unhealthy(endpoint, "no answer in time".into()),
                },
                None => unhealthy(endpoint, "cannot connect".into()),
            };
            statuses.push(status);
        }
        let mut c = client.clone();
        let read = tokio::time::timeout(ha.request_timeout, c.get(ha.leader_key(), None)).await;
        let (quorum, error, leader) = match read {
            Ok(Ok(resp)) => (true, String::new(), resp.kvs().first().map(leader_of)),
            Ok(Err(e)) => (false, format!("no quorum: {}", explain(&ha, &e)), None),
            Err(_) => (
                false,
                "no quorum: a read did not commit in time".into(),
                None,
            ),
        };
        let coordinators = if quorum {
            let opts = GetOptions::new().with_prefix();
            match c.get(ha.coordinators_prefix(), Some(opts)).await {
                Ok(resp) => resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                    .collect(),
                Err(_) => Vec::new(),
            }
        } else {
            Vec::new()
        };
        if quorum {
            // A standby learns of a new leader here too, should its watch have missed it.
            if !view.leading() {
                let known = view.leader().map(|l| (l.name, l.term));
                let now = leader.as_ref().map(|l| (l.name.clone(), l.term));
                if known != now {
                    view.set_leader(leader.map(|mut l| {
                        l.since_unix_ms = unix_ms();
                        l
                    }));
                }
            }
        } else if view.quorum() {
            warn!(%error, "etcd has lost quorum: no coordinator can decide anything until it returns");
        }
        if quorum && !view.quorum() && view.checked_ago().is_some() {
            info!("etcd has quorum again");
        }
        view.set_health(coordinators, statuses, quorum, error);
        tokio::time::sleep(HEALTH_EVERY).await;
    }
}

fn unhealthy(endpoint: &str, error: String) -> v1::EtcdMember {
    v1::EtcdMember {
        endpoint: endpoint.to_owned(),
        healthy: false,
        error,
        ..Default::default()
    }
}
