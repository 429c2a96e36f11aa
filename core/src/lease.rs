//! What a store does with a connection's lease row: the one home of the lease
//! protocol, used by every store (in-memory, SQLite, PostgreSQL, the model's and
//! the test harnesses') so that they cannot drift apart.
//!
//! A lease row names its owner, expiry, the record generation at the grant and the
//! [`LeaseRequestId`] it was granted to; it is kept until its owner releases it or
//! another worker takes it over after expiry. With it the store keeps the
//! unreleased row the grant displaced. The machine retries a lease request whose
//! answer was lost under the same name; finding its own earlier grant (same owner,
//! same request), the store grants again and reports what that grant displaced,
//! not the requester's own row, under which nothing was sent (find 18). A new
//! request of the same owner (a restarted worker reusing a pinned id) still
//! reports the old row (find 1). A release names the request too; with `restore` it
//! puts the displaced row back, so that a lease given up without acting on what it
//! reported leaves the doubt to the next worker.

use crate::record::{Generation, Lease, LeaseRequestId, WorkerId};
use crate::time::Timestamp;
use core::time::Duration;

/// A connection's lease row: the lease granted and the unreleased row it
/// displaced (its holder never released it, so its refresh may be in flight).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseSlot {
    /// The lease granted.
    pub lease: Lease,
    /// The unreleased row the grant displaced, as reported to its requester.
    pub displaced: Option<Lease>,
}

impl LeaseSlot {
    /// The holder's lease, if it excludes `owner` at `now`: another owner's,
    /// unexpired.
    pub fn held_against(&self, owner: &WorkerId, now: Timestamp) -> Option<&Lease> {
        let l = &self.lease;
        (l.owner != *owner && now < l.expires_at).then_some(l)
    }

    /// Whether `owner` holds this row under `request`.
    pub fn is(&self, owner: &WorkerId, request: LeaseRequestId) -> bool {
        self.lease.owner == *owner && self.lease.request == request
    }

    /// What a release by its holder leaves: nothing, or with `restore` the
    /// displaced row. A displaced row that had itself displaced a row granted at the
    /// same generation was kept as that earlier row ([`acquire`]), so a restored
    /// row is never mistaken for its later holder's retry (found by the property
    /// test: a retry that reported nothing presented a token a crashed worker had
    /// rotated).
    pub fn released(self, restore: bool) -> Option<LeaseSlot> {
        self.displaced.filter(|_| restore).map(|lease| LeaseSlot {
            lease,
            displaced: None,
        })
    }
}

/// The answer of [`acquire`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Acquired {
    /// The lease is the requester's: store `slot`; report `took_over`.
    Granted {
        /// The row to store.
        slot: LeaseSlot,
        /// The unreleased row the grant displaced, for `Input::LeaseGranted`.
        took_over: Option<Lease>,
    },
    /// Another owner holds an unexpired lease; nothing changes.
    Held(Lease),
}

/// Grants the lease of a connection whose row is `current` to `owner` under
/// `request` for `ttl` from `now` (the record's generation is `generation`) if it
/// is free, expired or `owner`'s own.
pub fn acquire(
    current: Option<&LeaseSlot>,
    owner: &WorkerId,
    request: LeaseRequestId,
    generation: Option<Generation>,
    now: Timestamp,
    ttl: Duration,
) -> Acquired {
    if let Some(holder) = current.and_then(|s| s.held_against(owner, now)) {
        return Acquired::Held(holder.clone());
    }
    let lease = grant(owner, request, generation, now, ttl);
    let displaced = match current {
        // A retry of the request whose answer was lost: nothing was sent under
        // that grant, so it displaced nothing itself; what it displaced stands.
        Some(old) if old.is(owner, request) => old.displaced.clone(),
        Some(old) => Some(inherit(old.lease.clone(), old.displaced.clone())),
        None => None,
    };
    Acquired::Granted {
        slot: LeaseSlot {
            lease,
            displaced: displaced.clone(),
        },
        took_over: displaced,
    }
}

/// The lease [`acquire`] grants `owner` under `request` for `ttl` from `now`, the
/// record at `generation`: where there was no row, all that it stores (a store
/// that writes a free row's grant in one statement reports it with this).
pub fn grant(
    owner: &WorkerId,
    request: LeaseRequestId,
    generation: Option<Generation>,
    now: Timestamp,
    ttl: Duration,
) -> Lease {
    Lease {
        owner: owner.clone(),
        acquired_at: now,
        expires_at: now.saturating_add(ttl),
        generation,
        request,
    }
}

/// What releasing `current` by `owner` under `request` leaves: `None` when it is
/// not theirs (nothing changes), else the new row ([`LeaseSlot::released`]).
pub fn release(
    current: Option<&LeaseSlot>,
    owner: &WorkerId,
    request: LeaseRequestId,
    restore: bool,
) -> Option<Option<LeaseSlot>> {
    current
        .filter(|s| s.is(owner, request))
        .map(|s| s.clone().released(restore))
}

/// The row a new grant displaces, `old`, with what `old` had itself displaced
/// (`earlier`): when both were granted at the same record generation (nothing
/// committed between them), the doubt runs from the earlier one, so the reported
/// row is the earlier one (its holder and request: only that holder can say
/// whether it sent), from the earlier start, until `old`'s expiry. Otherwise
/// `old` alone.
fn inherit(old: Lease, earlier: Option<Lease>) -> Lease {
    match earlier {
        Some(e) if e.generation == old.generation => Lease {
            acquired_at: e.acquired_at.min(old.acquired_at),
            expires_at: old.expires_at,
            ..e
        },
        _ => old,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(a: Acquired) -> (LeaseSlot, Option<Lease>) {
        match a {
            Acquired::Granted { slot, took_over } => (slot, took_over),
            Acquired::Held(h) => panic!("held by {h:?}"),
        }
    }

    /// Clocks may disagree (leases on the processes' clocks): a chain's row starts
    /// at the earlier of the two grants' stamps, whichever was granted first.
    #[test]
    fn an_inherited_row_starts_at_the_earlier_stamp() {
        let lease = |owner: &str, at: u64| Lease {
            owner: WorkerId(owner.into()),
            acquired_at: Timestamp::from_secs(at),
            expires_at: Timestamp::from_secs(at + 10),
            generation: Some(Generation(1)),
            request: LeaseRequestId(1),
        };
        let row = inherit(lease("b", 5), Some(lease("a", 8)));
        assert_eq!(row.owner, WorkerId("a".into()));
        assert_eq!(row.acquired_at, Timestamp::from_secs(5));
        assert_eq!(row.expires_at, Timestamp::from_secs(15));
        let unrelated = Lease {
            generation: Some(Generation(2)),
            ..lease("a", 1)
        };
        assert_eq!(inherit(lease("b", 5), Some(unrelated)), lease("b", 5));
    }

    #[test]
    fn a_retry_inherits_what_its_lost_grant_displaced_and_giving_up_restores_it() {
        let (a, b, c) = (
            WorkerId("a".into()),
            WorkerId("b".into()),
            WorkerId("c".into()),
        );
        let ttl = Duration::from_secs(10);
        let t = Timestamp::from_secs;
        let g = Some(Generation(1));
        let (b_row, _) = granted(acquire(None, &b, LeaseRequestId(7), g, t(0), ttl));
        // a takes over b's expired row; the answer is lost; a retries.
        let (first, old) = granted(acquire(Some(&b_row), &a, LeaseRequestId(1), g, t(11), ttl));
        assert_eq!(old.as_ref().map(|l| &l.owner), Some(&b));
        let (again, inherited) =
            granted(acquire(Some(&first), &a, LeaseRequestId(1), g, t(12), ttl));
        assert_eq!(inherited, old, "the retry inherits the displaced row");
        // Same owner, another request: its own row is reported (find 1).
        let (mine, _) = granted(acquire(None, &a, LeaseRequestId(1), g, t(0), ttl));
        let (_, own) = granted(acquire(Some(&mine), &a, LeaseRequestId(2), g, t(1), ttl));
        assert_eq!(own.map(|l| l.owner), Some(a.clone()));
        // Giving up restores b's row as it was.
        assert_eq!(release(Some(&again), &a, LeaseRequestId(9), true), None);
        let restored = release(Some(&again), &a, LeaseRequestId(1), true)
            .flatten()
            .expect("restored");
        assert_eq!(restored.lease.owner, b);
        let (_, seen) = granted(acquire(
            Some(&restored),
            &b,
            LeaseRequestId(7),
            g,
            t(30),
            ttl,
        ));
        assert_eq!(seen, None, "b's own row, restored as it was: b's retry");
        let (_, next) = granted(acquire(
            Some(&restored),
            &c,
            LeaseRequestId(5),
            g,
            t(30),
            ttl,
        ));
        assert_eq!(next.map(|l| l.owner), Some(b));
    }

    #[test]
    fn a_chain_with_nothing_committed_reports_its_earliest_holder() {
        let (a, b, c) = (
            WorkerId("a".into()),
            WorkerId("b".into()),
            WorkerId("c".into()),
        );
        let ttl = Duration::from_secs(10);
        let t = Timestamp::from_secs;
        let (a_row, _) = granted(acquire(
            None,
            &a,
            LeaseRequestId(1),
            Some(Generation(1)),
            t(0),
            ttl,
        ));
        let (b_row, _) = granted(acquire(
            Some(&a_row),
            &b,
            LeaseRequestId(2),
            Some(Generation(1)),
            t(11),
            ttl,
        ));
        let (_, reported) = granted(acquire(
            Some(&b_row),
            &c,
            LeaseRequestId(3),
            Some(Generation(1)),
            t(22),
            ttl,
        ));
        let reported = reported.expect("a takeover");
        assert_eq!(
            (reported.owner, reported.request, reported.acquired_at),
            (a, LeaseRequestId(1), t(0))
        );
        assert_eq!(
            reported.expires_at, b_row.lease.expires_at,
            "until b's expiry"
        );
        // Something committed between the grants: b's row alone.
        let (b_row, _) = granted(acquire(
            Some(&a_row),
            &b,
            LeaseRequestId(2),
            Some(Generation(2)),
            t(11),
            ttl,
        ));
        let (_, reported) = granted(acquire(
            Some(&b_row),
            &c,
            LeaseRequestId(3),
            Some(Generation(2)),
            t(22),
            ttl,
        ));
        assert_eq!(reported.map(|l| l.owner), Some(b));
    }
}
