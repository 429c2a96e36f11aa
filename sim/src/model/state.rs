//! The model's state: workers running the real machine, the store, the provider, the
//! network, the clock, budgets, and ghost bookkeeping for the properties.

use crate::provider::Provider;
use crate::store::MemoryStore;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};
use tokenfence_core::invariants::{keep_unsettled, SenderGhost, Unsettled};
use tokenfence_core::{
    AccessGrant, AccessToken, Connection, ConnectionRecord, Generation, HttpRequest, Input,
    LeaseRequestId, RefreshToken, Status, Timestamp, TokenGrant, WorkerId,
};

/// A store command the machine issued and the driver has not carried out yet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StoreCommand {
    /// `Output::Load`.
    Load,
    /// `Output::AcquireLease`.
    AcquireLease {
        /// Lease duration.
        ttl: core::time::Duration,
        /// The request's name.
        request: LeaseRequestId,
    },
    /// `Output::CompareAndSwap` (possibly rewritten by a baseline strategy).
    Cas {
        /// Generation the record was derived from.
        expected: Option<Generation>,
        /// The record to store.
        record: Box<ConnectionRecord>,
        /// The lease released with it if it lands: (request, restore).
        release: Option<(LeaseRequestId, bool)>,
    },
}

/// A refresh request on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Flight {
    /// The exact request the machine built.
    pub request: HttpRequest,
    /// When it was sent.
    pub sent_at: Timestamp,
    /// The provider processed it and the reply was lost.
    pub lost: bool,
}

/// A request sent by an incarnation that crashed: the provider may still process it
/// (before its deadline); the reply goes nowhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Orphan {
    /// The request.
    pub request: HttpRequest,
}

/// What a successful reply carried, kept until its commit for S6.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GrantCheck {
    /// The record the refresh was sent from.
    pub base: Box<ConnectionRecord>,
    /// The parsed reply.
    pub grant: TokenGrant,
    /// When the request was sent.
    pub sent_at: Timestamp,
}

/// Per-worker ghost bookkeeping (none of it is visible to the machine).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkerGhost {
    /// Newest generation the driver has handed to this machine (S5).
    pub newest: Option<Generation>,
    /// A successful reply not yet committed (S6).
    pub grant: Option<GrantCheck>,
    /// Tokens of the record a garbled reply was fed against (S9).
    pub bad_input: Option<(RefreshToken, Option<AccessGrant>)>,
    /// B3: the re-read after `invalid_grant` is answered with this record.
    pub reread_with: Option<Box<ConnectionRecord>>,
    /// B3: the next re-auth commit is written as a plain status update.
    pub naive_reauth: bool,
    /// The last lease grant replaced another owner's expired lease at the same
    /// generation: the next request knowingly presents a token that may be rotated.
    pub took_over: bool,
    /// The request on the wire knowingly presents a token that may be rotated.
    pub in_doubt: bool,
    /// Got a `Conflict` not yet followed by a commit or a served token.
    pub conflict: bool,
    /// The reply being committed re-delivered a successor that had been lost.
    pub recovering: bool,
    /// When the store last granted this worker a lease.
    pub lease_at: Timestamp,
    /// The refresh request this worker sent, until what it learnt is settled (S4).
    pub sender: SenderGhost,
    /// The access token this incarnation served last (what a 401 is reported for).
    pub served: Option<AccessToken>,
    /// Tokens this incarnation's callers reported refused by the API (R1).
    pub refused: Vec<AccessToken>,
    /// A lease request failed since this worker's last refresh committed: for
    /// all its machine knows the store granted it, and it refreshes to resolve
    /// that, until a refresh of its own commits (R2).
    pub lease_failed: bool,
}

/// One worker (one process's task for this connection).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Worker {
    /// The real machine.
    pub conn: Connection,
    /// Restarts so far; part of the lease owner name.
    pub incarnation: u8,
    /// A store command waiting to be carried out.
    pub pending: Option<StoreCommand>,
    /// A refresh request on the wire.
    pub net: Option<Flight>,
    /// A store answer the worker paused before handling.
    pub paused: Option<Input>,
    /// Access requests its callers will still make.
    pub requests_left: u8,
    /// 401 reports its callers will still make.
    pub rejects_left: u8,
    /// Ghost bookkeeping.
    pub ghost: WorkerGhost,
}

impl Worker {
    /// Whether the worker has anything in progress.
    pub fn is_busy(&self) -> bool {
        self.pending.is_some()
            || self.net.is_some()
            || self.paused.is_some()
            || self.conn.is_busy()
            || self.conn.waiting() > 0
    }
}

/// The name of worker `slot`'s incarnation `incarnation` in the store's lease rows.
pub fn owner_name(slot: usize, incarnation: u8) -> WorkerId {
    WorkerId(format!("w{}#{}", slot + 1, incarnation))
}

/// The worker slot a lease owner name belongs to.
pub fn owner_slot(owner: &WorkerId) -> Option<(usize, u8)> {
    let rest = owner.0.strip_prefix('w')?;
    let (slot, inc) = rest.split_once('#')?;
    let slot: usize = slot.parse().ok()?;
    Some((slot.checked_sub(1)?, inc.parse().ok()?))
}

/// Observations for the vacuity guards and for S8, as bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Seen(pub u16);

impl Seen {
    /// A refresh committed.
    pub const REFRESH_COMMITTED: u16 = 1;
    /// A worker got a CAS conflict and then committed or served a token.
    pub const CONFLICT_RESOLVED: u16 = 2;
    /// A successor lost on the wire was re-delivered inside a grace window and committed.
    pub const LOST_RECOVERED: u16 = 4;
    /// After the user revoked at the provider, the store says `ReauthRequired`.
    pub const REVOKE_REAUTH: u16 = 8;
    /// A lease was taken over after it expired under its holder (S8 relaxes).
    pub const LEASE_BROKEN: u16 = 16;
    /// A misconfigured worker refused to send and said which identity field differs.
    pub const MISMATCH_REFUSED: u16 = 32;

    /// Whether `bit` was seen.
    pub fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }

    /// Records `bit`.
    pub fn set(&mut self, bit: u16) {
        self.0 |= bit;
    }
}

/// The properties checked at transitions (the rest are state predicates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Breach {
    /// S1 at a landing write.
    S1,
    /// S3: a replay outside grace by a worker that had no reason to doubt.
    S3,
    /// S5 at a served token.
    S5,
    /// S6 at a commit of a reply.
    S6,
    /// S7 at a send, or at the provider.
    S7,
    /// S9 after a garbled reply.
    S9,
    /// L5: a refresh before the recorded retry time, or against a dead record while
    /// leases held.
    L5,
    /// The driver fed an input the machine refused (a harness or contract bug).
    Contract,
    /// R1: a token reported refused by the API served again by that worker.
    R1,
    /// R2: a refresh sent while the stored record needed none.
    R2,
}

/// The whole model state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The virtual clock.
    pub now: Timestamp,
    /// Workers, by slot.
    pub workers: Vec<Shared>,
    /// The shared store.
    pub store: MemoryStore,
    /// The provider with its ghost state.
    pub provider: Provider,
    /// Requests of crashed incarnations still on the wire.
    pub orphans: Vec<Orphan>,
    /// Fault injections left.
    pub faults_left: u8,
    /// Budgeted time jumps left.
    pub ticks_left: u8,
    /// Observations.
    pub seen: Seen,
    /// Every access token a caller reported refused by the API (R2).
    pub refused: Vec<AccessToken>,
    /// Transition properties broken on this path, with the first explanation.
    pub breaches: BTreeMap<Breach, String>,
    /// Refresh requests really sent whose outcome never reached the store (reply
    /// unseen, or the sender crashed), in order, for S2 and S4.
    pub unsettled: Vec<Unsettled>,
    /// Leases taken over from another worker with nothing committed since their
    /// grant (whoever takes one over cannot know whether a request was sent under
    /// it), as the requests they may stand for, in order, for S4 only.
    pub taken_over: Vec<Unsettled>,
}

impl State {
    /// The record in the store.
    pub fn stored(&self) -> Option<&ConnectionRecord> {
        self.store
            .row(super::connection_id())
            .and_then(|r| r.record.as_ref())
    }

    /// Keeps a refresh request whose outcome will never reach the store.
    pub fn keep_unsettled(&mut self, u: Option<Unsettled>) {
        keep_unsettled(&mut self.unsettled, u);
    }

    /// Keeps a lease taken over from another worker (S4).
    pub fn keep_taken_over(&mut self, u: Option<Unsettled>) {
        keep_unsettled(&mut self.taken_over, u);
    }

    /// Every refresh request really sent whose outcome has not reached the store.
    pub fn all_unsettled(&self) -> impl Iterator<Item = &Unsettled> {
        self.unsettled.iter().chain(
            self.workers
                .iter()
                .filter_map(|w| w.ghost.sender.unsettled()),
        )
    }

    /// What may justify a lost rotation (S4): every unsettled request, and every
    /// lease taken over from another worker.
    pub fn may_have_rotated(&self) -> impl Iterator<Item = &Unsettled> {
        self.all_unsettled().chain(&self.taken_over)
    }

    /// Records a transition property breach (the first explanation wins).
    pub fn breach(&mut self, what: Breach, why: impl FnOnce() -> String) {
        self.breaches.entry(what).or_insert_with(why);
    }
}

/// A short description of a record: generation, status, refresh token.
pub fn describe_record(r: &ConnectionRecord) -> String {
    let status = match r.status {
        Status::Active => "Active".to_string(),
        Status::Degraded {
            failures, retry_at, ..
        } => format!("Degraded({failures}, retry {retry_at})"),
        Status::ReauthRequired { reason, .. } => format!("ReauthRequired({reason:?})"),
        Status::Disconnected { .. } => "Disconnected".to_string(),
    };
    let access = r
        .access
        .as_ref()
        .map(|a| format!(" {}→{}", a.token.expose(), a.expires_at))
        .unwrap_or_default();
    let doubt = r
        .in_doubt_since
        .map(|t| format!(" in-doubt-since {t}"))
        .unwrap_or_default();
    format!(
        "{} {} {}{}{}",
        r.generation,
        status,
        show_refresh(&r.refresh),
        access,
        doubt
    )
}

/// A model refresh token for traces (model tokens are fake: `rt3`; an empty one is
/// shown as `<empty>`).
pub fn show_refresh(t: &RefreshToken) -> String {
    if t.is_empty() {
        "<empty>".into()
    } else {
        t.expose().to_string()
    }
}

/// A worker as the states hold it: shared by every state that did not change it,
/// with its digest computed once per change. A step changes one worker, so cloning
/// a state copies pointers, and hashing it (the checker does that for every state it
/// generates, twice under symmetry) reads the digests of the workers it did not
/// change. Writing through `DerefMut` copies the worker if another state shares it
/// and forgets the digest.
#[derive(Clone)]
pub struct Shared(Arc<Digested>);

/// Fixed seeds: the same worker gets the same digest in every run.
const DIGEST: ahash::RandomState = ahash::RandomState::with_seeds(
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
);

#[derive(Clone)]
struct Digested {
    worker: Worker,
    digest: OnceLock<u64>,
}

impl Shared {
    /// A worker no other state holds yet.
    pub fn new(worker: Worker) -> Self {
        Shared(Arc::new(Digested {
            worker,
            digest: OnceLock::new(),
        }))
    }

    /// A 64-bit digest of the worker's whole state: aHash with fixed seeds, the
    /// hasher of the checker's own fingerprints, which this digest feeds
    /// (deterministic across runs, and no weaker than those fingerprints).
    pub fn digest(&self) -> u64 {
        *self
            .0
            .digest
            .get_or_init(|| DIGEST.hash_one(&self.0.worker))
    }
}

impl Deref for Shared {
    type Target = Worker;

    fn deref(&self) -> &Worker {
        &self.0.worker
    }
}

impl DerefMut for Shared {
    fn deref_mut(&mut self) -> &mut Worker {
        let d = Arc::make_mut(&mut self.0);
        d.digest = OnceLock::new();
        &mut d.worker
    }
}

impl Hash for Shared {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest());
    }
}

impl PartialEq for Shared {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.worker == other.0.worker
    }
}

impl Eq for Shared {}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.worker.fmt(f)
    }
}

/// The representative of `state` under permutations of worker slots: workers sorted
/// by a fingerprint of their state, lease owner names renamed to match. Workers are
/// interchangeable because every machine runs under the same worker name (`self`)
/// and the driver maps store lease owners to slots.
pub fn representative(state: &State) -> State {
    let n = state.workers.len();
    let mut order: Vec<(u64, usize)> = state
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| (w.digest(), i))
        .collect();
    order.sort();
    let mut out = state.clone();
    if order.iter().enumerate().all(|(j, (_, i))| j == *i) {
        return out;
    }
    let mut new_slot = vec![0; n];
    for (j, (_, i)) in order.iter().enumerate() {
        new_slot[*i] = j;
    }
    out.workers = order
        .iter()
        .map(|(_, i)| state.workers[*i].clone())
        .collect();
    let id = super::connection_id();
    if let Some(mut slot) = state.store.row(id).and_then(|r| r.lease.clone()) {
        let rename = |l: &mut tokenfence_core::Lease| {
            if let Some((slot, inc)) = owner_slot(&l.owner) {
                l.owner = owner_name(new_slot[slot], inc);
            }
        };
        rename(&mut slot.lease);
        if let Some(d) = &mut slot.displaced {
            rename(d);
        }
        out.store.set_lease(id, Some(slot));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_names_round_trip() {
        assert_eq!(owner_slot(&owner_name(2, 5)), Some((2, 5)));
        assert_eq!(owner_slot(&WorkerId("self".into())), None);
    }
}
