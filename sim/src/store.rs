//! An in-memory token store with the semantics every tokenfence store must have:
//! compare-and-swap on the record's generation, and leases with an owner and an
//! expiry that stay in place until their owner releases them or another worker takes
//! them over after they expired, as `tokenfence_core::lease` (the one home of the
//! lease protocol, find 18) decides.
//!
//! Deterministic and `Clone + Eq + Hash`, so it lives inside model-checker states and
//! simulator snapshots. Time is an argument; nothing here reads a clock. Rows sit in a
//! hash map with a fixed, seedless hasher (the simulator reads a row after every step
//! of a fleet of thousands); nothing iterates it in hash order.

use core::hash::{BuildHasherDefault, Hash, Hasher};
use core::time::Duration;
use std::collections::HashMap;
use tokenfence_core::lease::{self, Acquired, LeaseSlot};
use tokenfence_core::{
    ConnectionId, ConnectionRecord, Generation, Lease, LeaseRequestId, Timestamp, WorkerId,
};

/// What is stored for one connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Row {
    /// The record, if the connection exists.
    pub record: Option<ConnectionRecord>,
    /// The lease row, if one was granted and not released.
    pub lease: Option<LeaseSlot>,
}

impl Row {
    /// The lease, if one was granted and not released.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref().map(|l| &l.lease)
    }
}

/// The answer to a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CasOutcome {
    /// The record was stored with this generation.
    Committed(Generation),
    /// Another generation is stored; here is the record as it is now.
    Conflict(Option<Box<ConnectionRecord>>),
}

/// The answer to a lease request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeaseOutcome {
    /// The lease is the caller's now.
    Granted {
        /// The lease granted.
        lease: Lease,
        /// The record read atomically with the grant.
        record: Option<Box<ConnectionRecord>>,
        /// The unreleased lease row this grant replaced, whoever owned it.
        took_over: Option<Lease>,
    },
    /// Another owner holds an unexpired lease.
    Held {
        /// The holder's lease.
        holder: Lease,
    },
}

/// The in-memory store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryStore {
    rows: HashMap<ConnectionId, Row, BuildHasherDefault<Fnv1a>>,
}

/// FNV-1a: seedless, so deterministic, and quick on short ids. Not collision
/// resistant, which a store keyed by our own ids does not need.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Hash for MemoryStore {
    /// In id order, so that equal stores hash alike whatever their insertion order.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut rows: Vec<_> = self.rows.iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        rows.hash(state);
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A connection's row.
    pub fn row(&self, id: &ConnectionId) -> Option<&Row> {
        self.rows.get(id)
    }

    /// Reads a record.
    pub fn load(&self, id: &ConnectionId) -> Option<ConnectionRecord> {
        self.rows.get(id).and_then(|r| r.record.clone())
    }

    /// Stores `record` only if the stored generation is `expected` (`None`: only if
    /// there is no record). The stored generation becomes `expected + 1` (0 for a
    /// new record), whatever `record.generation` says.
    pub fn compare_and_swap(
        &mut self,
        id: &ConnectionId,
        expected: Option<Generation>,
        mut record: ConnectionRecord,
    ) -> CasOutcome {
        let row = self.row_mut(id);
        let stored = row.record.as_ref().map(|r| r.generation);
        if stored != expected {
            return CasOutcome::Conflict(row.record.clone().map(Box::new));
        }
        let generation = expected.map_or(Generation(0), Generation::next);
        record.generation = generation;
        row.record = Some(record);
        CasOutcome::Committed(generation)
    }

    /// Stores `record` as it is, whatever is stored (what a naive driver without
    /// compare-and-swap does; baselines only).
    pub fn overwrite(&mut self, id: &ConnectionId, record: ConnectionRecord) -> Generation {
        let generation = record.generation;
        self.row_mut(id).record = Some(record);
        generation
    }

    /// Grants the lease to `owner` for `ttl` from `now` if it is free, expired, or
    /// already `owner`'s; the record is read in the same step. The unreleased lease
    /// row the grant replaces, whoever owned it, is returned as `took_over`: its
    /// holder never released it, so its refresh may be in flight. If that row is
    /// `owner`'s own earlier grant to the same `request` (whose answer was lost),
    /// nothing was sent under it: `took_over` is what that grant displaced.
    pub fn acquire_lease(
        &mut self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        ttl: Duration,
        now: Timestamp,
    ) -> LeaseOutcome {
        let row = self.row_mut(id);
        let generation = row.record.as_ref().map(|r| r.generation);
        match lease::acquire(row.lease.as_ref(), owner, request, generation, now, ttl) {
            Acquired::Held(holder) => LeaseOutcome::Held { holder },
            Acquired::Granted { slot, took_over } => {
                let lease = slot.lease.clone();
                row.lease = Some(slot);
                LeaseOutcome::Granted {
                    lease,
                    record: row.record.clone().map(Box::new),
                    took_over,
                }
            }
        }
    }

    /// Releases the lease if `owner` holds it under `request` (expired or not);
    /// with `restore`, the row it displaced takes its place. Returns whether it did.
    pub fn release_lease(
        &mut self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> bool {
        let Some(row) = self.rows.get_mut(id) else {
            return false;
        };
        match lease::release(row.lease.as_ref(), owner, request, restore) {
            Some(left) => {
                row.lease = left;
                true
            }
            None => false,
        }
    }

    /// Replaces the lease row (harness use: renaming owners under symmetry).
    pub fn set_lease(&mut self, id: &ConnectionId, lease: Option<LeaseSlot>) {
        self.row_mut(id).lease = lease;
    }

    fn row_mut(&mut self, id: &ConnectionId) -> &mut Row {
        if !self.rows.contains_key(id) {
            self.rows.insert(id.clone(), Row::default());
        }
        self.rows
            .get_mut(id)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfence_core::{Environment, GrantIdentity, RefreshToken, Status};

    fn record(refresh: &str) -> ConnectionRecord {
        ConnectionRecord {
            id: ConnectionId("c".into()),
            generation: Generation(99),
            identity: GrantIdentity {
                provider: "p".into(),
                environment: Environment::Production,
                client_id: "x".into(),
            },
            realm_id: None,
            access: None,
            refresh: RefreshToken::new(refresh),
            refresh_issued_at: Timestamp::EPOCH,
            idle_deadline: None,
            hard_deadline: None,
            in_doubt_since: None,
            in_doubt_holder: None,
            status: Status::Active,
            blocked_client: None,
            imported_at: None,
            last_refreshed_at: None,
            updated_at: Timestamp::EPOCH,
        }
    }

    #[test]
    fn cas_lands_only_on_the_expected_generation() {
        let id = ConnectionId("c".into());
        let mut s = MemoryStore::new();
        assert_eq!(
            s.compare_and_swap(&id, None, record("a")),
            CasOutcome::Committed(Generation(0))
        );
        assert!(
            matches!(s.compare_and_swap(&id, None, record("b")), CasOutcome::Conflict(Some(r)) if r.refresh.expose() == "a")
        );
        assert_eq!(
            s.compare_and_swap(&id, Some(Generation(0)), record("b")),
            CasOutcome::Committed(Generation(1))
        );
        assert!(matches!(
            s.compare_and_swap(&id, Some(Generation(0)), record("c")),
            CasOutcome::Conflict(_)
        ));
        assert_eq!(s.load(&id).map(|r| r.generation), Some(Generation(1)));
    }

    #[test]
    fn leases_exclude_until_expiry_and_report_takeovers() {
        let id = ConnectionId("c".into());
        let (a, b) = (WorkerId("a".into()), WorkerId("b".into()));
        let (ra, rb) = (LeaseRequestId(1), LeaseRequestId(2));
        let ttl = Duration::from_secs(10);
        let mut s = MemoryStore::new();
        let t = Timestamp::from_secs;
        assert!(matches!(
            s.acquire_lease(&id, &a, ra, ttl, t(0)),
            LeaseOutcome::Granted {
                took_over: None,
                ..
            }
        ));
        assert!(matches!(
            s.acquire_lease(&id, &b, rb, ttl, t(9)),
            LeaseOutcome::Held { .. }
        ));
        assert!(
            matches!(
                s.acquire_lease(&id, &a, LeaseRequestId(3), ttl, t(9)),
                LeaseOutcome::Granted {
                    took_over: Some(_),
                    ..
                }
            ),
            "an unreleased row of another request is reported even to its owner"
        );
        let LeaseOutcome::Granted {
            took_over: Some(old),
            ..
        } = s.acquire_lease(&id, &b, rb, ttl, t(19))
        else {
            panic!("b takes over the expired lease");
        };
        assert_eq!(old.owner, a);
        assert!(
            !s.release_lease(&id, &a, LeaseRequestId(3), false),
            "a no longer holds it"
        );
        assert!(
            !s.release_lease(&id, &b, ra, false),
            "not under that request"
        );
        assert!(s.release_lease(&id, &b, rb, false));
        assert!(matches!(
            s.acquire_lease(&id, &a, ra, ttl, t(20)),
            LeaseOutcome::Granted {
                took_over: None,
                ..
            }
        ));
    }
}
