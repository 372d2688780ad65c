//! Write-ahead: a turn's changes are staged and committed once before any of its effects is
//! carried out.
//!
//! One rollback policy. When a commit fails (a full disk, etcd without quorum), nothing of
//! that turn is carried out: its effects wait in `held` (commands are not kept: they follow
//! from the state and go out once due), and the store is marked failed. Until it recovers,
//! turns commit nothing and hold their effects; agents are still acknowledged, so their
//! leases hold and running jobs keep running. Every second `recover_store` reopens the store
//! where needed and writes the whole state again from memory, in one commit (a commit that
//! failed may have lost part of its batch); once that works the held effects are carried out.
//! So the state in memory is never behind the disk, and no effect rests on an uncommitted
//! change. An operator's request is different: it is refused and undone (see `requests`).
//!
//! History entries alone do not make a turn commit. A turn of agent messages or a tick whose
//! only writes are history (a reconnect storm's "registered" lines, availability changes) leaves
//! them staged: they go out with the next commit something else needs, or after
//! [`HISTORY_DELAY`], whichever comes first. An effect never rests on a history entry, and a
//! commit costs an fsync (or an etcd round trip): one per turn in a storm of ten thousand
//! registrations held every answer behind the disk. An operator's request commits whatever is
//! staged, its own writes included, before it is answered.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Engine;
use crate::state::Effect;
use crate::store::StoreError;

/// The longest a history entry waits for a commit (a crash loses at most this much history;
/// nothing an effect rests on).
pub(super) const HISTORY_DELAY: Duration = Duration::from_secs(1);

/// What a commit must cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Urgency {
    /// An agent turn or a tick: records now, history within [`HISTORY_DELAY`].
    Records,
    /// An operator's request: everything staged, now.
    Everything,
}

/// What one call staged.
#[derive(Debug, Clone, Copy, Default)]
struct Staged {
    history: bool,
    records: bool,
}

impl Engine {
    /// Stage what `effects` store, commit once, then carry the effects out in order.
    pub(super) async fn commit_and_act(&mut self, effects: Vec<Effect>) -> Result<(), StoreError> {
        self.commit_and_act_with(effects, Urgency::Records).await
    }

    /// As [`Engine::commit_and_act`], with `urgency`.
    pub(super) async fn commit_and_act_with(
        &mut self,
        effects: Vec<Effect>,
        urgency: Urgency,
    ) -> Result<(), StoreError> {
        match self.commit_effects_with(&effects, urgency).await {
            Ok(()) => {
                for effect in effects {
                    self.act(effect);
                }
                Ok(())
            }
            Err(e) => {
                self.hold(effects);
                Err(e)
            }
        }
    }

    /// Stage and commit, without carrying anything out. While the store is failed, commits
    /// nothing and answers with the failure: `recover_store` writes everything later.
    pub(super) async fn commit_effects(&mut self, effects: &[Effect]) -> Result<(), StoreError> {
        self.commit_effects_with(effects, Urgency::Records).await
    }

    /// As [`Engine::commit_effects`], with `urgency`.
    pub(super) async fn commit_effects_with(
        &mut self,
        effects: &[Effect],
        urgency: Urgency,
    ) -> Result<(), StoreError> {
        if let Some(why) = self.store_failed.clone() {
            // Staged, not committed: recovery commits this batch first, then the whole
            // state (so history recorded meanwhile is kept too). A request never gets here
            // with effects to keep: it is refused and undone (`requests::apply_request`).
            self.stage(effects).ok();
            return Err(StoreError::Io {
                path: self.store.path().to_owned(),
                message: format!("not written yet: the store has not recovered from: {why}"),
            });
        }
        match self.stage_and_commit(effects, urgency).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }

    async fn stage_and_commit(
        &mut self,
        effects: &[Effect],
        urgency: Urgency,
    ) -> Result<(), StoreError> {
        let staged = self.stage(effects)?;
        let now = Instant::now();
        if staged.history {
            self.history_waiting_since.get_or_insert(now);
        }
        let waiting = self.history_waiting_since;
        let history_due = waiting.is_some_and(|since| {
            urgency == Urgency::Everything || now.saturating_duration_since(since) >= HISTORY_DELAY
        });
        if staged.records || history_due {
            let committed = self.store.flush().await;
            let took = now.elapsed().as_secs_f64();
            self.metrics.ha.observe(self.store.backend(), "flush", took);
            committed?;
            self.history_waiting_since = None;
        }
        Ok(())
    }

    /// Note a failed write or commit: nothing is committed again until `recover_store`.
    fn failed(&mut self, e: StoreError) -> StoreError {
        warn!(error = %e, held = self.held.len(), "state store commit failed; nothing that rests on a change is carried out until the store recovers and the whole state is written again");
        self.store_failed = Some(e.to_string());
        e
    }

    /// Keep the effects of an uncommitted turn for after recovery. Commands are not kept:
    /// they follow from the state and go out once due.
    pub(super) fn hold(&mut self, effects: Vec<Effect>) {
        self.held.extend(
            effects
                .into_iter()
                .filter(|e| !matches!(e, Effect::Command { .. })),
        );
        // Bounded: a store that stays down for long keeps the state, not every log line.
        const MAX_HELD: usize = 100_000;
        if self.held.len() > MAX_HELD {
            let extra = self.held.len() - MAX_HELD;
            self.held.drain(..extra);
        }
    }

    /// Put every record `effects` ask to store into the store's batch; what kinds were.
    fn stage(&mut self, effects: &[Effect]) -> Result<Staged, StoreError> {
        let mut staged = Staged::default();
        for effect in effects {
            match effect {
                Effect::Persist(record) => self.store.put_node(record)?,
                Effect::Record { node, event } => {
                    self.store.put_event(node, event)?;
                    staged.history = true;
                    continue;
                }
                Effect::PersistJob(job) => self.store.put_job(job)?,
                Effect::PersistEvidence {
                    job,
                    attempt,
                    evidence,
                } => self.store.put_evidence(job, *attempt, evidence)?,
                Effect::DropEvidence {
                    job,
                    attempt,
                    nodes,
                } => {
                    for node in nodes {
                        self.store.drop_evidence(job, *attempt, node);
                    }
                }
                Effect::PersistLemon(record) => self.store.put_lemon(record)?,
                Effect::PersistRecovery(hold) => {
                    self.store.put_cluster(super::RECOVERY_HOLD, hold)?;
                }
                Effect::PersistBreaker(b) => {
                    self.store.put_cluster(vigil_core::breaker::RECORD, b)?;
                }
                Effect::PersistSlurmJobs(l) => {
                    self.store.put_cluster(vigil_core::slurm::jobs::RECORD, l)?;
                }
                _ => continue,
            }
            staged.records = true;
        }
        Ok(staged)
    }

    /// After a failed commit: reopen the store where it needs it, write the whole state again
    /// in one commit, and once that works carry out what was held.
    pub(super) async fn recover_store(&mut self) {
        let Some(why) = self.store_failed.clone() else {
            return;
        };
        if let Err(e) = self.store.recover() {
            debug!(error = %e, "state store still cannot be reopened");
            return;
        }
        let mut effects: Vec<Effect> = self
            .state
            .nodes
            .values()
            .map(|n| Effect::Persist((*n.record).clone()))
            .collect();
        effects.extend(
            self.state
                .jobs
                .values()
                .map(|j| Effect::PersistJob(Box::new(j.clone()))),
        );
        effects.extend(
            self.state
                .lemons
                .records
                .values()
                .map(|r| Effect::PersistLemon(Box::new(r.clone()))),
        );
        effects.extend(
            self.state
                .recovery
                .iter()
                .map(|h| Effect::PersistRecovery(Box::new(h.clone()))),
        );
        effects.push(Effect::PersistBreaker(Box::new(self.state.breaker.clone())));
        if !self.state.slurm_jobs.jobs.is_empty() {
            effects.push(Effect::PersistSlurmJobs(Box::new(
                self.state.slurm_jobs.clone(),
            )));
        }
        match self.stage_and_commit(&effects, Urgency::Everything).await {
            Ok(()) => {
                self.store_failed = None;
                info!(
                    nodes = self.state.nodes.len(),
                    jobs = self.state.jobs.len(),
                    held = self.held.len(),
                    after = %why,
                    "state store recovered; whole state written again, held effects carried out"
                );
                for effect in std::mem::take(&mut self.held) {
                    self.act(effect);
                }
            }
            Err(e) => debug!(error = %e, "state store not writable yet"),
        }
    }
}
