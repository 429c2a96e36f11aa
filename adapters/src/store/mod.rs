//! Where connection records and leases live. One trait, several backends: in-memory
//! (tests, single process), SQLite (the embedded default) and PostgreSQL (shared by
//! many processes on many machines).
//!
//! Every backend must give the same guarantees, checked by the same conformance
//! tests: a compare-and-swap on `generation` is atomic; a lease row names its owner
//! and expiry, is released only by its owner, and is kept until released or taken
//! over after expiry; acquiring a lease reads the record in the same atomic step and
//! reports the unreleased row it replaced (whoever owned it).
//!
//! The lease protocol itself lives in `tokenfence_core::lease` (one home for
//! every store). A lease row also keeps the [`LeaseRequestId`] it was granted to and the
//! unreleased row it displaced. The machine retries a lease request whose answer
//! was lost under the same id; finding its own earlier grant (same owner, same
//! request), the store grants again and reports what that grant displaced, not the
//! requester's own row, under which nothing was sent. Without this, one lost answer
//! made a worker see its own row as another's takeover, assume a refresh of its own
//! was in flight, and end in a false `ReauthRequired(LostRotation)` (find 18). A
//! new request of the same owner (a restarted worker reusing its pinned id) still
//! reports the old row (find 1). Releasing takes the request id too, and with
//! `restore` puts the displaced row back, so that a lease given up without acting
//! on its takeover leaves the doubt to the next worker.

mod batch;
mod guard;
mod memory;
mod postgres;
mod row;
mod sqlite;

pub(crate) use guard::RollbackGuard;
pub use memory::MemoryStore;
pub use postgres::{LeaseClock, PostgresOptions, PostgresStore};
pub(crate) use row::status_name;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use std::time::Duration;
use tokenfence_core::{
    ConnectionId, ConnectionRecord, Generation, Lease, LeaseRelease, LeaseRequestId,
    PendingAuthorization, Timestamp, WorkerId,
};

/// A connection due for work ([`Store::due_for_work`]) and since when; ordered
/// by that instant, then by id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DueWork {
    /// When the work fell due.
    pub at: Timestamp,
    /// The connection.
    pub id: ConnectionId,
}

/// The result of a compare-and-swap.
#[allow(clippy::large_enum_variant)] // returned once per store call; boxing buys nothing
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The record was stored.
    Committed,
    /// Another generation was stored; here is the record stored now.
    Conflict(Option<ConnectionRecord>),
}

/// The result of a lease acquisition.
#[allow(clippy::large_enum_variant)] // returned once per store call; boxing buys nothing
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The lease is ours.
    Granted {
        /// The lease now held.
        lease: Lease,
        /// The record, read atomically with the grant.
        record: Option<ConnectionRecord>,
        /// The unreleased lease row this grant replaced, whoever owned it.
        took_over: Option<Lease>,
    },
    /// Someone else holds it.
    Held(Lease),
}

/// Why a store operation failed. Never carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or the operation failed transiently.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored row could not be read back (corrupt, truncated, foreign ciphertext,
    /// wrong key). The row is left as it is.
    #[error("stored record for connection {id} is unreadable: {reason}")]
    Corrupt {
        /// The connection.
        id: ConnectionId,
        /// What is wrong (no secret).
        reason: String,
    },
    /// The store's schema or configuration is wrong.
    #[error("store misconfigured: {0}")]
    Config(String),
    /// The store answered with an older generation of a record than this process
    /// has already seen: a restored backup or an old row written back. Refused; a
    /// restarted process accepts the restored state.
    #[error("stored record for connection {id} is older ({found}) than one this process has seen ({seen}): rolled back? Refusing it")]
    RolledBack {
        /// The connection.
        id: ConnectionId,
        /// The newest generation this process saw.
        seen: Generation,
        /// The generation the store answered with.
        found: Generation,
    },
}

/// A place to keep connection records and leases.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads a record.
    async fn load(&self, id: &ConnectionId) -> Result<Option<ConnectionRecord>, StoreError>;

    /// Stores `record` only if the stored generation is `expected` (`None`: only if
    /// there is no record). If it is stored and `release` is given, releases that
    /// lease as [`release_lease`](Store::release_lease) does, in the same atomic
    /// step: a refresh ends with one transaction, not two. A conflict leaves the
    /// lease as it is.
    async fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        record: &ConnectionRecord,
        release: Option<&LeaseRelease>,
    ) -> Result<CasOutcome, StoreError>;

    /// Takes the refresh lease of `id` for `ttl` from `now` if it is free, expired or
    /// already `owner`'s, reading the record in the same atomic step, and keeps
    /// `request` with the new row.
    ///
    /// `took_over` is the unreleased row the grant displaced, kept with the new
    /// row. If the replaced row is `owner`'s own earlier grant to the same
    /// `request` (a retry after a lost answer), the new row keeps that grant's
    /// displaced row and reports it (`None` if it had none). Otherwise the replaced
    /// row is the displaced one; if it had itself displaced a row granted at the
    /// same record generation (nothing committed in between), it is reported with
    /// the earlier of the two `acquired_at`s, since the doubt runs from there.
    async fn acquire_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome, StoreError>;

    /// Releases the lease of `id` if `owner` holds it under `request` (expired or
    /// not); does nothing otherwise (an expired holder can never release someone
    /// else's lease, nor a stale request a newer grant). With `restore`, the row
    /// the grant displaced takes its place (with no displaced row of its own)
    /// instead of leaving none.
    async fn release_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> Result<(), StoreError>;

    /// Connections that need work without anyone asking
    /// ([`ConnectionRecord::work_due_at`]): a keep-alive refresh is due (`lead`
    /// before the idle deadline), the record says a refresh is in doubt, a degraded
    /// connection's retry time has come, or an expired lease was never released (a
    /// refresh may be in doubt). Ordered by when the work fell due (the earliest of
    /// those instants, the lease's on the store's lease clock), then by id; only
    /// those after `after` (the last of the previous page: keyset paging), at most
    /// `limit`.
    async fn due_for_work(
        &self,
        now: Timestamp,
        lead: Duration,
        after: Option<DueWork>,
        limit: usize,
    ) -> Result<Vec<DueWork>, StoreError>;

    /// Live connections whose `ReconnectSoon` notice instant (`notice` before the
    /// hard deadline) falls in `(after, until]` (`after: None`: any time up to
    /// `until`), in id order: what a process announces when it starts, and then
    /// what came due since its previous scan.
    async fn notices_due(
        &self,
        after: Option<Timestamp>,
        until: Timestamp,
        notice: Duration,
    ) -> Result<Vec<ConnectionId>, StoreError>;

    /// Every connection id, in order.
    async fn list(&self) -> Result<Vec<ConnectionId>, StoreError>;

    /// Keeps `pending` (an authorization begun, sealed where the store seals)
    /// under `key` (the hash of its state, [`tokenfence_core::connect::state_key`])
    /// until it is taken; drops authorizations that expired before `now`.
    async fn put_pending(
        &self,
        key: &str,
        pending: &PendingAuthorization,
        now: Timestamp,
    ) -> Result<(), StoreError>;

    /// Takes the authorization kept under `key` out of the store, atomically: of
    /// any number of concurrent takers, in any processes, one gets it and the
    /// others `None` (a state is used once). Expired ones are returned too; the
    /// caller refuses them.
    async fn take_pending(&self, key: &str) -> Result<Option<PendingAuthorization>, StoreError>;
}

/// Whether `record`'s notice instant falls in `(after, until]` (see
/// [`Store::notices_due`]); the in-memory store's filter and the SQL stores' bounds
/// say the same.
pub(crate) fn notice_due(
    record: &ConnectionRecord,
    after: Option<Timestamp>,
    until: Timestamp,
    notice: Duration,
) -> bool {
    let Some(deadline) = record.hard_deadline.filter(|_| record.is_live()) else {
        return false;
    };
    let at = deadline.saturating_sub(notice);
    at <= until && after.is_none_or(|a| at > a)
}

#[async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    async fn load(&self, id: &ConnectionId) -> Result<Option<ConnectionRecord>, StoreError> {
        (**self).load(id).await
    }
    async fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        record: &ConnectionRecord,
        release: Option<&LeaseRelease>,
    ) -> Result<CasOutcome, StoreError> {
        (**self).compare_and_swap(expected, record, release).await
    }
    async fn acquire_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        (**self).acquire_lease(id, owner, request, now, ttl).await
    }
    async fn release_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> Result<(), StoreError> {
        (**self).release_lease(id, owner, request, restore).await
    }
    async fn due_for_work(
        &self,
        now: Timestamp,
        lead: Duration,
        after: Option<DueWork>,
        limit: usize,
    ) -> Result<Vec<DueWork>, StoreError> {
        (**self).due_for_work(now, lead, after, limit).await
    }
    async fn notices_due(
        &self,
        after: Option<Timestamp>,
        until: Timestamp,
        notice: Duration,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        (**self).notices_due(after, until, notice).await
    }
    async fn list(&self) -> Result<Vec<ConnectionId>, StoreError> {
        (**self).list().await
    }
    async fn put_pending(
        &self,
        key: &str,
        pending: &PendingAuthorization,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        (**self).put_pending(key, pending, now).await
    }
    async fn take_pending(&self, key: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        (**self).take_pending(key).await
    }
}
