//! An in-memory store: for tests and single-process use.

use super::{CasOutcome, DueWork, LeaseOutcome, Store, StoreError};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokenfence_core::lease::{self, Acquired, LeaseSlot};
use tokenfence_core::{
    ConnectionId, ConnectionRecord, Generation, LeaseRelease, LeaseRequestId, PendingAuthorization,
    Timestamp, WorkerId,
};

#[derive(Default)]
struct Row {
    record: Option<ConnectionRecord>,
    lease: Option<LeaseSlot>,
}

/// `tokenfence_core::lease::release` on one row.
fn release_row(row: &mut Row, owner: &WorkerId, request: LeaseRequestId, restore: bool) {
    if let Some(left) = lease::release(row.lease.as_ref(), owner, request, restore) {
        row.lease = left;
    }
}

/// Records and leases in a mutex-guarded map.
#[derive(Default)]
pub struct MemoryStore {
    rows: Mutex<BTreeMap<ConnectionId, Row>>,
    pending: Mutex<BTreeMap<String, PendingAuthorization>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<ConnectionId, Row>) -> T,
    ) -> Result<T, StoreError> {
        let mut rows = self
            .rows
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()))?;
        Ok(f(&mut rows))
    }

    fn kept(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, PendingAuthorization>>, StoreError> {
        self.pending
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self, id: &ConnectionId) -> Result<Option<ConnectionRecord>, StoreError> {
        self.with(|rows| rows.get(id).and_then(|r| r.record.clone()))
    }

    async fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        record: &ConnectionRecord,
        release: Option<&LeaseRelease>,
    ) -> Result<CasOutcome, StoreError> {
        self.with(|rows| {
            let row = rows.entry(record.id.clone()).or_default();
            if row.record.as_ref().map(|r| r.generation) == expected {
                row.record = Some(record.clone());
                if let Some(r) = release {
                    release_row(row, &r.owner, r.request, r.restore);
                }
                CasOutcome::Committed
            } else {
                CasOutcome::Conflict(row.record.clone())
            }
        })
    }

    async fn acquire_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        self.with(|rows| {
            let row = rows.entry(id.clone()).or_default();
            let generation = row.record.as_ref().map(|r| r.generation);
            let (slot, took_over) =
                match lease::acquire(row.lease.as_ref(), owner, request, generation, now, ttl) {
                    Acquired::Held(holder) => return LeaseOutcome::Held(holder),
                    Acquired::Granted { slot, took_over } => (slot, took_over),
                };
            let lease = slot.lease.clone();
            row.lease = Some(slot);
            LeaseOutcome::Granted {
                lease,
                record: row.record.clone(),
                took_over,
            }
        })
    }

    async fn release_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> Result<(), StoreError> {
        self.with(|rows| {
            if let Some(row) = rows.get_mut(id) {
                release_row(row, owner, request, restore);
            }
        })
    }

    async fn due_for_work(
        &self,
        now: Timestamp,
        lead: Duration,
        after: Option<DueWork>,
        limit: usize,
    ) -> Result<Vec<DueWork>, StoreError> {
        self.with(|rows| {
            let mut due: Vec<DueWork> = rows
                .iter()
                .filter_map(|(id, row)| {
                    let work = row.record.as_ref().and_then(|r| r.work_due_at(lead));
                    let abandoned = row.lease.as_ref().map(|l| l.lease.expires_at);
                    let at = [work, abandoned]
                        .into_iter()
                        .flatten()
                        .filter(|t| *t <= now)
                        .min()?;
                    Some(DueWork { at, id: id.clone() })
                })
                .filter(|d| after.as_ref().is_none_or(|a| d > a))
                .collect();
            due.sort();
            due.truncate(limit);
            due
        })
    }

    async fn notices_due(
        &self,
        after: Option<Timestamp>,
        until: Timestamp,
        notice: Duration,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        self.with(|rows| {
            rows.iter()
                .filter(|(_, row)| {
                    row.record
                        .as_ref()
                        .is_some_and(|r| super::notice_due(r, after, until, notice))
                })
                .map(|(id, _)| id.clone())
                .collect()
        })
    }

    async fn list(&self) -> Result<Vec<ConnectionId>, StoreError> {
        self.with(|rows| {
            rows.iter()
                .filter(|(_, r)| r.record.is_some())
                .map(|(id, _)| id.clone())
                .collect()
        })
    }

    async fn put_pending(
        &self,
        key: &str,
        pending: &PendingAuthorization,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut kept = self.kept()?;
        kept.retain(|_, p| p.expires_at >= now);
        kept.insert(key.to_owned(), pending.clone());
        Ok(())
    }

    async fn take_pending(&self, key: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        Ok(self.kept()?.remove(key))
    }
}
