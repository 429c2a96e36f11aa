//! The refresh strategies under test, shared by the model checker and the simulator:
//! tokenfence itself and the naive baselines B1–B4 of INVARIANTS.md.
//!
//! A baseline is not a second implementation of the core. Every harness runs the
//! real `tokenfence_core::Connection`; a baseline only changes what the *driver*
//! does with the machine's outputs: how a write lands in the store
//! ([`write`](Strategy::write)), whether leases exclude anybody
//! ([`acquire_lease`](Strategy::acquire_lease), [`release_lease`](Strategy::release_lease)),
//! what a committed reply keeps ([`rewrite_commit`](Strategy::rewrite_commit)) and
//! whether an `invalid_grant` is checked against the store
//! ([`trusts_invalid_grant`](Strategy::trusts_invalid_grant)). The model checker and
//! the simulator call these same functions, so both test the same baselines.

use crate::store::{CasOutcome, LeaseOutcome, MemoryStore};
use core::time::Duration;
use tokenfence_core::{
    ConnectionId, ConnectionRecord, Generation, Lease, LeaseRequestId, RefreshToken, Status,
    Timestamp, TokenGrant, WorkerId,
};

/// The refresh strategy under test: tokenfence itself, or one of the naive baselines
/// of INVARIANTS.md, obtained by rewriting what the driver does with the machine's
/// outputs (the machine itself is always the real one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Strategy {
    /// The real core, driven as its contract says.
    Tokenfence,
    /// B1: no lease and no compare-and-swap: every worker refreshes when it likes and
    /// writes back unconditionally.
    NaiveB1,
    /// B2: a lease, but writes are unconditional; the lease can expire under a
    /// paused worker.
    NaiveB2,
    /// B3: on `invalid_grant`, declare re-auth without re-reading the store: the
    /// re-read is answered with the pre-refresh record and the re-auth is written as
    /// a plain status update.
    NaiveB3,
    /// B4: a reply without `refresh_token` wipes the stored refresh token.
    NaiveB4,
    /// Find 18 before its fix, not a baseline (not in [`ALL`](Self::ALL)): lease
    /// requests carry no name the store recognises, so a retry after a lost answer
    /// sees the requester's own row as a takeover, and a release only names the
    /// owner. Its regression test shows S4 failing with it.
    UnnamedLeaseRequests,
}

/// Where a write landed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Written {
    /// The record is stored now.
    Landed {
        /// The generation stored.
        generation: Generation,
        /// The generation the write was derived from, as the store saw it (S1
        /// compares it with the generation stored before the write).
        base: Option<Generation>,
    },
    /// Compare-and-swap found another generation stored: here is the record now.
    Conflict(Option<Box<ConnectionRecord>>),
}

impl Strategy {
    /// Every strategy, in a stable order.
    pub const ALL: [Strategy; 5] = [
        Strategy::Tokenfence,
        Strategy::NaiveB1,
        Strategy::NaiveB2,
        Strategy::NaiveB3,
        Strategy::NaiveB4,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Tokenfence => "tokenfence",
            Strategy::NaiveB1 => "naive-b1",
            Strategy::NaiveB2 => "naive-b2",
            Strategy::NaiveB3 => "naive-b3",
            Strategy::NaiveB4 => "naive-b4",
            Strategy::UnnamedLeaseRequests => "unnamed-lease-requests",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether stores honour compare-and-swap.
    pub fn uses_cas(self) -> bool {
        !matches!(self, Strategy::NaiveB1 | Strategy::NaiveB2)
    }

    /// Whether leases exclude other workers.
    pub fn uses_leases(self) -> bool {
        self != Strategy::NaiveB1
    }

    /// Whether an `invalid_grant` is believed without re-reading the store (B3):
    /// the driver then answers the machine's re-read with the record the refresh
    /// was sent from, and writes the re-auth with [`write`](Self::write)'s
    /// `naive_reauth`.
    pub fn trusts_invalid_grant(self) -> bool {
        self == Strategy::NaiveB3
    }

    /// Rewrites a record about to be committed after a successful reply `grant`, as
    /// the strategy would build it (B4 stores the reply's refresh token even when
    /// there is none).
    pub fn rewrite_commit(self, record: &mut ConnectionRecord, grant: &TokenGrant) {
        if self == Strategy::NaiveB4 && grant.refresh.is_none() {
            record.refresh = RefreshToken::new("");
        }
    }

    /// Takes the lease as the strategy does: in the store, or (without leases) a
    /// lease granted by nobody, with the record read as it is.
    pub fn acquire_lease(
        self,
        store: &mut MemoryStore,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        ttl: Duration,
        now: Timestamp,
    ) -> LeaseOutcome {
        if self == Strategy::UnnamedLeaseRequests {
            // A name the store has never seen: every request is a new one.
            let fresh = LeaseRequestId(u64::MAX - now.as_millis());
            return store.acquire_lease(id, owner, fresh, ttl, now);
        }
        if self.uses_leases() {
            return store.acquire_lease(id, owner, request, ttl, now);
        }
        let record = store.load(id);
        LeaseOutcome::Granted {
            lease: Lease {
                owner: owner.clone(),
                acquired_at: now,
                expires_at: now.saturating_add(ttl),
                generation: record.as_ref().map(|r| r.generation),
                request,
            },
            record: record.map(Box::new),
            took_over: None,
        }
    }

    /// Releases the lease if the strategy uses leases and `owner` holds it under
    /// `request` (with `restore`, putting back the row it displaced).
    pub fn release_lease(
        self,
        store: &mut MemoryStore,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> bool {
        if self == Strategy::UnnamedLeaseRequests {
            let held = store.row(id).and_then(|r| r.lease());
            let Some(request) = held.filter(|l| l.owner == *owner).map(|l| l.request) else {
                return false;
            };
            return store.release_lease(id, owner, request, false);
        }
        self.uses_leases() && store.release_lease(id, owner, request, restore)
    }

    /// Writes `record`, derived from generation `expected`, as the strategy does:
    /// compare-and-swap; an unconditional overwrite (B1, B2); or, for a re-auth the
    /// strategy believed without re-reading (`naive_reauth`, B3), a plain status
    /// update of whatever is stored (`UPDATE ... SET status = 'reauth'`).
    pub fn write(
        self,
        store: &mut MemoryStore,
        id: &ConnectionId,
        expected: Option<Generation>,
        record: ConnectionRecord,
        naive_reauth: bool,
    ) -> Written {
        let before = store
            .row(id)
            .and_then(|r| r.record.as_ref())
            .map(|r| r.generation);
        if naive_reauth && matches!(record.status, Status::ReauthRequired { .. }) {
            let mut current = store.load(id).unwrap_or_else(|| record.clone());
            current.status = record.status;
            current.generation = before.map_or(Generation(0), Generation::next);
            let generation = store.overwrite(id, current);
            return Written::Landed {
                generation,
                base: before,
            };
        }
        if !self.uses_cas() {
            let generation = expected.map_or(Generation(0), Generation::next);
            let mut record = record;
            record.generation = generation;
            store.overwrite(id, record);
            return Written::Landed {
                generation,
                base: expected,
            };
        }
        match store.compare_and_swap(id, expected, record) {
            CasOutcome::Committed(generation) => Written::Landed {
                generation,
                base: expected,
            },
            CasOutcome::Conflict(current) => Written::Conflict(current),
        }
    }
}
