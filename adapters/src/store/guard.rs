//! Rollback detection: a store that answers with an older generation of a record
//! than this process has already seen (a restored backup, an old row written back
//! whole) is refused with [`StoreError::RolledBack`] instead of being believed.
//!
//! What it covers: anything this process read or committed since it started. What
//! it does not: a rollback that happened while no process that had seen the newer
//! generation was running (a restarted fleet accepts the restored rows), and a row
//! rolled back to the very generation this process saw last.

use super::{CasOutcome, DueWork, LeaseOutcome, Store, StoreError};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokenfence_core::{
    ConnectionId, ConnectionRecord, Generation, LeaseRelease, LeaseRequestId, PendingAuthorization,
    Timestamp, WorkerId,
};

/// A store that remembers the highest generation it has seen of each record.
pub(crate) struct RollbackGuard {
    inner: Arc<dyn Store>,
    seen: papaya::HashMap<ConnectionId, Generation>,
}

impl RollbackGuard {
    pub(crate) fn new(inner: Arc<dyn Store>) -> Self {
        RollbackGuard {
            inner,
            seen: papaya::HashMap::new(),
        }
    }

    /// Notes `generation` of `id`; an older one than already noted is a rollback.
    fn note(&self, id: &ConnectionId, generation: Generation) -> Result<(), StoreError> {
        let seen = self.seen.pin();
        let known = *seen.update_or_insert(id.clone(), |&k| k.max(generation), generation);
        let result = if known > generation {
            Err(known)
        } else {
            Ok(())
        };
        result.map_err(|known| {
            tracing::error!(
                connection = %id,
                seen = known.0,
                found = generation.0,
                "the store answered with an older record than this process has seen; refused"
            );
            metrics::counter!("tokenfence_store_rollbacks_total").increment(1);
            StoreError::RolledBack {
                id: id.clone(),
                seen: known,
                found: generation,
            }
        })
    }

    fn check(&self, record: Option<&ConnectionRecord>) -> Result<(), StoreError> {
        match record {
            Some(r) => self.note(&r.id, r.generation),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Store for RollbackGuard {
    async fn load(&self, id: &ConnectionId) -> Result<Option<ConnectionRecord>, StoreError> {
        let record = self.inner.load(id).await?;
        self.check(record.as_ref())?;
        Ok(record)
    }

    async fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        record: &ConnectionRecord,
        release: Option<&LeaseRelease>,
    ) -> Result<CasOutcome, StoreError> {
        let outcome = self
            .inner
            .compare_and_swap(expected, record, release)
            .await?;
        match &outcome {
            CasOutcome::Committed => self.note(&record.id, record.generation)?,
            CasOutcome::Conflict(current) => self.check(current.as_ref())?,
        }
        Ok(outcome)
    }

    async fn acquire_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        let outcome = self
            .inner
            .acquire_lease(id, owner, request, now, ttl)
            .await?;
        if let LeaseOutcome::Granted { record, .. } = &outcome {
            self.check(record.as_ref())?;
        }
        Ok(outcome)
    }

    async fn release_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> Result<(), StoreError> {
        self.inner.release_lease(id, owner, request, restore).await
    }

    async fn due_for_work(
        &self,
        now: Timestamp,
        lead: Duration,
        after: Option<DueWork>,
        limit: usize,
    ) -> Result<Vec<DueWork>, StoreError> {
        self.inner.due_for_work(now, lead, after, limit).await
    }

    async fn notices_due(
        &self,
        after: Option<Timestamp>,
        until: Timestamp,
        notice: Duration,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        self.inner.notices_due(after, until, notice).await
    }

    async fn list(&self) -> Result<Vec<ConnectionId>, StoreError> {
        self.inner.list().await
    }
    async fn put_pending(
        &self,
        key: &str,
        pending: &PendingAuthorization,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner.put_pending(key, pending, now).await
    }
    async fn take_pending(&self, key: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        self.inner.take_pending(key).await
    }
}
