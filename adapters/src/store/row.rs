//! How the SQL stores lay a record out in a row: a few plain columns for queries,
//! and the whole record as JSON sealed with the keyring, bound to the connection id.

use super::{DueWork, StoreError};
use crate::crypto::Keyring;
use std::time::Duration;
use tokenfence_core::lease::LeaseSlot;
use tokenfence_core::{
    ConnectionId, ConnectionRecord, Generation, Lease, LeaseRequestId, PendingAuthorization,
    Status, Timestamp, WorkerId,
};
use zeroize::Zeroizing;

/// Context (associated data) prefix of sealed records: a sealed record opens only
/// as the record of the connection it was sealed for.
const RECORD_CONTEXT: &[u8] = b"tokenfence/connection-record/v1\0";

/// A record as written to a row.
pub(crate) struct SealedRecord {
    pub generation: i64,
    pub status: &'static str,
    /// The idle deadline while the record is live (keep-alive applies), else NULL.
    pub idle_deadline: Option<i64>,
    /// The earliest instant keep-alive may be due whatever the lead, with
    /// `idle_deadline`.
    pub keepalive_floor: Option<i64>,
    /// While the record is live: when work is due whatever the lead (a refresh in
    /// doubt, a degraded connection's retry): `ConnectionRecord::pending_work_at`.
    pub pending_work_at: Option<i64>,
    /// While the record is live: its hard deadline (for `notices_due`).
    pub hard_deadline: Option<i64>,
    pub updated_at: i64,
    pub sealed: Vec<u8>,
}

fn context(id: &ConnectionId) -> Vec<u8> {
    let mut c = Vec::with_capacity(RECORD_CONTEXT.len() + id.0.len());
    c.extend_from_slice(RECORD_CONTEXT);
    c.extend_from_slice(id.0.as_bytes());
    c
}

/// Seals a record for its row.
pub(crate) fn seal(
    keyring: &Keyring,
    record: &ConnectionRecord,
) -> Result<SealedRecord, StoreError> {
    // Reserve generously so serialization does not reallocate and leave copies of
    // the tokens behind in freed memory; the buffer is zeroized when dropped.
    let secrets = record.refresh.len() + record.access.as_ref().map_or(0, |a| a.token.len());
    let mut json = Zeroizing::new(Vec::with_capacity(
        1024 + 2 * secrets + 4 * record.id.0.len(),
    ));
    serde_json::to_writer(&mut *json, record).map_err(|e| {
        StoreError::Config(format!(
            "record of connection {} could not be serialized ({} error)",
            record.id,
            e.classify_name()
        ))
    })?;
    let sealed = keyring
        .seal(&context(&record.id), &json)
        .map_err(|e| StoreError::Config(format!("cannot seal record: {e}")))?;
    // `keepalive_due_at(lead)` is `max(idle_deadline - lead, floor)` with a floor
    // that does not depend on the lead (half the idle window since the last
    // refresh); the lead is only known at query time, so the row keeps both
    // terms and the query asks `idle_deadline <= now + lead AND floor <= now`.
    // The conformance suite checks this against MemoryStore, which calls
    // `keepalive_due_at` itself.
    let (idle_deadline, keepalive_floor) = match (
        record.keepalive_due_at(Duration::ZERO),
        record.keepalive_due_at(Duration::MAX),
        record.idle_deadline,
    ) {
        (Some(_), Some(floor), Some(deadline)) => {
            (Some(time_to_sql(deadline)), Some(time_to_sql(floor)))
        }
        _ => (None, None),
    };
    Ok(SealedRecord {
        generation: generation_to_sql(record.generation),
        status: status_name(&record.status),
        idle_deadline,
        keepalive_floor,
        pending_work_at: record.pending_work_at().map(time_to_sql),
        hard_deadline: record
            .hard_deadline
            .filter(|_| record.is_live())
            .map(time_to_sql),
        updated_at: time_to_sql(record.updated_at),
        sealed,
    })
}

/// Opens a row's sealed record and checks it against the row's plain columns.
pub(crate) fn open(
    keyring: &Keyring,
    id: &ConnectionId,
    generation: i64,
    sealed: &[u8],
) -> Result<ConnectionRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let json = keyring
        .open(&context(id), sealed)
        .map_err(|e| corrupt(e.to_string()))?;
    let record: ConnectionRecord = serde_json::from_slice(&json).map_err(|e| {
        // serde_json's messages can quote input; say only where it failed.
        corrupt(format!(
            "sealed record is not a valid record ({} error at line {} column {})",
            e.classify_name(),
            e.line(),
            e.column()
        ))
    })?;
    if record.id != *id {
        return Err(corrupt(
            "sealed record belongs to another connection".into(),
        ));
    }
    let stored = generation_from_sql(generation);
    if record.generation != stored {
        return Err(corrupt(format!(
            "sealed record has generation {} but the row says {stored}; an old ciphertext was restored",
            record.generation
        )));
    }
    Ok(record)
}

/// Re-seals a row's blob under the keyring's sealing key, if it is under an
/// older one. A blob under a newer key (one this keyring only opens: stage 1 of
/// a roll-out, while stage-2 processes already seal with it) is left as it is:
/// moving it back would make it unreadable once the old key is dropped.
/// Rows `reencrypt_all` reads and re-seals per batch (one short transaction each:
/// no whole-table lock, no whole-table load).
pub(crate) const RESEAL_BATCH: usize = 500;

pub(crate) fn reseal(
    keyring: &Keyring,
    id: &ConnectionId,
    sealed: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    let corrupt = |e: crate::crypto::CryptoError| StoreError::Corrupt {
        id: id.clone(),
        reason: e.to_string(),
    };
    let key = Keyring::key_id_of(sealed).map_err(corrupt)?;
    let newer_known = key > keyring.current() && keyring.key_ids().any(|k| k == key);
    if key == keyring.current() || newer_known {
        return Ok(None);
    }
    keyring
        .reencrypt(&context(id), sealed)
        .map(Some)
        .map_err(corrupt)
}

/// A status's name, as SQL columns and metrics labels spell it.
pub(crate) fn status_name(status: &Status) -> &'static str {
    match status {
        Status::Active => "active",
        Status::Degraded { .. } => "degraded",
        Status::ReauthRequired { .. } => "reauth_required",
        Status::Disconnected { .. } => "disconnected",
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "i/o",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "end of input",
        }
    }
}

/// Generations are stored as the same 64 bits, so every value round-trips and
/// equality (the CAS guard) is exact; values past `i64::MAX` read back negative in
/// SQL, which no realistic counter reaches.
pub(crate) fn generation_to_sql(g: Generation) -> i64 {
    g.0 as i64
}

/// Inverse of [`generation_to_sql`].
pub(crate) fn generation_from_sql(g: i64) -> Generation {
    Generation(g as u64)
}

/// Durations are stored as milliseconds, saturating at `i64::MAX`.
pub(crate) fn duration_to_sql(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Instants are stored as milliseconds since the epoch, saturating at `i64::MAX`
/// (292 million years from now), like [`Timestamp`]'s own arithmetic saturates.
pub(crate) fn time_to_sql(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

/// Parameters of the `due_for_work` query: `idle_deadline <= keepalive_bound` (keep-alive
/// due: `idle_deadline - lead <= now`), `keepalive_floor <= now`, `pending_work_at <= now`
/// and `expires_at <= now` (abandoned leases), the lead itself (a row's keep-alive
/// instant is `max(idle_deadline - lead, keepalive_floor)`), the page's start (rows
/// whose `(due, id)` comes after it; the first page starts before every row) and
/// at most `limit` rows.
pub(crate) struct DueQuery {
    pub keepalive_bound: i64,
    pub now: i64,
    pub lead: i64,
    pub after_at: i64,
    pub after_id: String,
    pub limit: i64,
}

pub(crate) fn due_query(
    now: Timestamp,
    lead: Duration,
    after: Option<DueWork>,
    limit: usize,
) -> DueQuery {
    let (after_at, after_id) =
        after.map_or((i64::MIN, String::new()), |d| (time_to_sql(d.at), d.id.0));
    DueQuery {
        keepalive_bound: time_to_sql(now.saturating_add(lead)),
        now: time_to_sql(now),
        lead: duration_to_sql(lead),
        after_at,
        after_id,
        limit: limit_to_sql(limit),
    }
}

/// `(due, id)` rows of a `due_for_work` query, in its order.
pub(crate) fn due_work(rows: impl IntoIterator<Item = (String, i64)>) -> Vec<DueWork> {
    rows.into_iter()
        .map(|(id, at)| DueWork {
            at: time_from_sql(at),
            id: ConnectionId(id),
        })
        .collect()
}

/// `hard_deadline` bounds `(low, high]` for notice instants (`hard_deadline -
/// notice`) in `(after, until]`: `after: None` is no lower bound.
pub(crate) fn notice_bounds(
    after: Option<Timestamp>,
    until: Timestamp,
    notice: Duration,
) -> (i64, i64) {
    let low = after.map_or(i64::MIN, |a| time_to_sql(a.saturating_add(notice)));
    (low, time_to_sql(until.saturating_add(notice)))
}

/// Inverse of [`time_to_sql`]; a negative value (never written) reads as the epoch.
pub(crate) fn time_from_sql(t: i64) -> Timestamp {
    Timestamp::from_millis(u64::try_from(t).unwrap_or(0))
}

/// A lease row as SQL holds it (schema v3, columns in this order after `id`): the lease granted, the request it was granted to,
/// and the row it displaced (all `displaced_*` NULL when there was none).
#[derive(Clone, Debug)]
pub(crate) struct LeaseColumns {
    pub owner: String,
    pub acquired_at: i64,
    pub expires_at: i64,
    pub generation: Option<i64>,
    pub request: i64,
    pub displaced_owner: Option<String>,
    pub displaced_acquired_at: Option<i64>,
    pub displaced_expires_at: Option<i64>,
    pub displaced_generation: Option<i64>,
    pub displaced_request: Option<i64>,
}

impl LeaseColumns {
    /// The columns that store `slot`.
    pub(crate) fn of(slot: &LeaseSlot) -> LeaseColumns {
        let lease = &slot.lease;
        let d = slot.displaced.as_ref();
        LeaseColumns {
            owner: lease.owner.0.clone(),
            acquired_at: time_to_sql(lease.acquired_at),
            expires_at: time_to_sql(lease.expires_at),
            generation: lease.generation.map(generation_to_sql),
            request: request_to_sql(lease.request),
            displaced_owner: d.map(|d| d.owner.0.clone()),
            displaced_acquired_at: d.map(|d| time_to_sql(d.acquired_at)),
            displaced_expires_at: d.map(|d| time_to_sql(d.expires_at)),
            displaced_generation: d.and_then(|d| d.generation.map(generation_to_sql)),
            displaced_request: d.map(|d| request_to_sql(d.request)),
        }
    }

    /// The slot these columns store. A displaced row with some of its columns
    /// NULL was not written by tokenfence: refused.
    pub(crate) fn into_slot(self, id: &ConnectionId) -> Result<LeaseSlot, StoreError> {
        let row = lease(
            self.owner,
            self.acquired_at,
            self.expires_at,
            self.generation,
            self.request,
        );
        let displaced = match (
            self.displaced_owner,
            self.displaced_acquired_at,
            self.displaced_expires_at,
            self.displaced_request,
        ) {
            (None, None, None, None) => None,
            (Some(owner), Some(acquired_at), Some(expires_at), Some(request)) => Some(lease(
                owner,
                acquired_at,
                expires_at,
                self.displaced_generation,
                request,
            )),
            _ => {
                return Err(StoreError::Config(format!(
                    "the lease row of connection {id} has a partial displaced row; \
                     the lease table was changed by hand"
                )))
            }
        };
        Ok(LeaseSlot {
            lease: row,
            displaced,
        })
    }
}

fn lease(
    owner: String,
    acquired_at: i64,
    expires_at: i64,
    generation: Option<i64>,
    request: i64,
) -> Lease {
    Lease {
        owner: WorkerId(owner),
        acquired_at: time_from_sql(acquired_at),
        expires_at: time_from_sql(expires_at),
        generation: generation.map(generation_from_sql),
        request: request_from_sql(request),
    }
}

/// Lease request ids are stored as the same 64 bits, like generations.
pub(crate) fn request_to_sql(r: LeaseRequestId) -> i64 {
    r.0 as i64
}

/// Inverse of [`request_to_sql`].
pub(crate) fn request_from_sql(r: i64) -> LeaseRequestId {
    LeaseRequestId(r as u64)
}

/// A `usize` limit as SQL's `LIMIT` operand.
pub(crate) fn limit_to_sql(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Context prefix of sealed pending authorizations: one opens only under the state
/// key it was sealed for.
const PENDING_CONTEXT: &[u8] = b"tokenfence/pending-authorization/v1\0";

/// Seals a pending authorization for its row under `key` (it holds the PKCE
/// verifier).
pub(crate) fn seal_pending(
    keyring: &Keyring,
    key: &str,
    pending: &PendingAuthorization,
) -> Result<Vec<u8>, StoreError> {
    let json = Zeroizing::new(serde_json::to_vec(pending).map_err(|e| {
        StoreError::Config(format!(
            "pending authorization could not be serialized ({} error)",
            e.classify_name()
        ))
    })?);
    keyring
        .seal(&[PENDING_CONTEXT, key.as_bytes()].concat(), &json)
        .map_err(|e| StoreError::Config(format!("cannot seal a pending authorization: {e}")))
}

/// Opens a pending authorization's row taken under `key`.
pub(crate) fn open_pending(
    keyring: &Keyring,
    key: &str,
    sealed: &[u8],
) -> Result<PendingAuthorization, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        id: ConnectionId(format!(
            "pending authorization {}",
            &key[..key.len().min(12)]
        )),
        reason,
    };
    let json = keyring
        .open(&[PENDING_CONTEXT, key.as_bytes()].concat(), sealed)
        .map_err(|e| corrupt(e.to_string()))?;
    serde_json::from_slice(&json).map_err(|e| {
        corrupt(format!(
            "not a pending authorization ({} error)",
            e.classify_name()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{EncryptionKey, KeyId};

    fn key(n: u8) -> EncryptionKey {
        EncryptionKey::from_slice(&[n; 32]).unwrap()
    }

    /// Only a row under an older key is re-sealed: one under the sealing key or
    /// under a newer key this keyring opens stays; one under a key it does not
    /// have is corrupt, as it is for a read.
    #[test]
    fn reseal_moves_rows_forward_only() {
        let id = ConnectionId("c".into());
        let seal = |ring: &Keyring| ring.seal(&context(&id), b"row").unwrap();
        let old = Keyring::new(KeyId(1), key(1));
        let stage1 = old.clone().with_open_only_key(KeyId(2), key(2)).unwrap();
        let stage2 = old.clone().with_key(KeyId(2), key(2)).unwrap();
        let stranger = Keyring::new(KeyId(3), key(3));
        assert!(reseal(&stage1, &id, &seal(&old)).unwrap().is_none());
        assert!(reseal(&stage1, &id, &seal(&stage2)).unwrap().is_none());
        let moved = reseal(&stage2, &id, &seal(&old)).unwrap().unwrap();
        assert_eq!(Keyring::key_id_of(&moved).unwrap(), KeyId(2));
        assert!(matches!(
            reseal(&stage1, &id, &seal(&stranger)),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
