//! The embedded default store: one SQLite file, nothing to run.
//!
//! The file is in WAL mode with `synchronous = FULL`, so a committed rotation
//! survives a power cut, and it can be shared by several processes on one machine:
//! every write is one `BEGIN IMMEDIATE` transaction, and a writer waits up to the
//! busy timeout for another. The compare-and-swap is a guarded
//! `UPDATE ... WHERE id = ? AND generation = ?` (an `INSERT` when no record may
//! exist); acquiring a lease reads the lease row and the record and writes the new
//! lease (with its request id and the row it displaced) in one transaction;
//! releasing deletes the lease, or puts back the row it displaced, only where the
//! owner and the request match, in one transaction. Records are sealed with a [`Keyring`] (AES-256-GCM, bound to the
//! connection id); the plain columns hold only what queries need.
//!
//! SQLite calls block, so they run on a thread of the store's own that owns its
//! one connection; calls waiting at the same time share one transaction and one
//! fsync, each in its own savepoint (group commit, [`batch`](super::batch)).

use super::batch::Writer;
use super::row::{self, LeaseColumns, SealedRecord};
use super::{CasOutcome, DueWork, LeaseOutcome, Store, StoreError};
use crate::crypto::Keyring;
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokenfence_core::lease::{self, Acquired, LeaseSlot};
use tokenfence_core::{
    ConnectionId, ConnectionRecord, Generation, LeaseRelease, LeaseRequestId, PendingAuthorization,
    Timestamp, WorkerId,
};

/// Schema migrations, applied in order on open; `PRAGMA user_version` records the
/// last one applied.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/sqlite/0001_init.sql")),
    (2, include_str!("migrations/sqlite/0002_scans.sql")),
    (3, include_str!("migrations/sqlite/0003_lease_requests.sql")),
    (
        4,
        include_str!("migrations/sqlite/0004_pending_authorizations.sql"),
    ),
    (
        5,
        include_str!("migrations/sqlite/0005_leases_unindexed.sql"),
    ),
    (6, include_str!("migrations/sqlite/0006_idle_day.sql")),
];

/// How long a write waits for another process's transaction before failing.
const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SELECT_RECORD: &str = "SELECT generation, sealed FROM tokenfence_connections WHERE id = ?1";
const SELECT_LEASE: &str = "SELECT owner, acquired_at, expires_at, generation, request, \
     displaced_owner, displaced_acquired_at, displaced_expires_at, displaced_generation, \
     displaced_request FROM tokenfence_leases WHERE id = ?1";

/// Records and leases in a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Writer,
    keyring: Keyring,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("keyring", &self.inner.keyring)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, enables WAL and applies the
    /// schema migrations this build ships. Blocks while it does so.
    pub fn open(path: impl AsRef<Path>, keyring: Keyring) -> Result<Self, StoreError> {
        Self::open_with_busy_timeout(path, keyring, DEFAULT_BUSY_TIMEOUT)
    }

    /// [`open`](Self::open) with another wait for other processes' transactions.
    pub fn open_with_busy_timeout(
        path: impl AsRef<Path>,
        keyring: Keyring,
        busy_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        create_private(&path)?;
        // Processes opening a new file at once race to switch it to WAL and to
        // migrate it; SQLite answers some of those steps with "busy" at once,
        // without waiting for the busy timeout. Try again until the timeout.
        let deadline = std::time::Instant::now() + busy_timeout;
        let conn = loop {
            match open_once(&path, busy_timeout) {
                Err(OpenError::Busy(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(OpenError::Busy(e)) => return Err(sql_error(e)),
                Err(OpenError::Store(e)) => return Err(e),
                Ok(conn) => break conn,
            }
        };
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: Writer::start(conn, keyring.clone())?,
                keyring,
                path,
            }),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Re-seals every record that is not under the keyring's newest key; returns
    /// how many rows changed. In batches of rows, each batch all or nothing: if
    /// a row does not open, the error names it and no row of its batch changes.
    pub async fn reencrypt_all(&self) -> Result<usize, StoreError> {
        let mut changed = 0;
        let mut after = String::new();
        loop {
            let from = after.clone();
            let (done, last, n) = self
                .run(true, move |conn, keyring| {
                    let rows: Vec<(String, Vec<u8>)> = {
                        let mut stmt = conn
                            .prepare_cached(
                                "SELECT id, sealed FROM tokenfence_connections \
                                 WHERE id > ?1 ORDER BY id LIMIT ?2",
                            )
                            .map_err(sql_error)?;
                        let batch = i64::try_from(row::RESEAL_BATCH).unwrap_or(i64::MAX);
                        let rows = stmt
                            .query_map(params![from, batch], |r| Ok((r.get(0)?, r.get(1)?)))
                            .map_err(sql_error)?;
                        rows.collect::<Result<_, _>>().map_err(sql_error)?
                    };
                    let mut n = 0;
                    for (id, sealed) in &rows {
                        let cid = ConnectionId(id.clone());
                        if let Some(resealed) = row::reseal(keyring, &cid, sealed)? {
                            // Only if the row is still what was read: a commit
                            // meanwhile sealed it anew already.
                            n += conn
                                .execute(
                                    "UPDATE tokenfence_connections SET sealed = ?2 \
                                     WHERE id = ?1 AND sealed = ?3",
                                    params![id, resealed, sealed],
                                )
                                .map_err(sql_error)?;
                        }
                    }
                    let last = rows.last().map(|(id, _)| id.clone());
                    Ok((rows.len() < row::RESEAL_BATCH, last, n))
                })
                .await?;
            changed += n;
            match last {
                Some(last) if !done => after = last,
                _ => return Ok(changed),
            }
        }
    }

    /// Runs `f` on the store's connection, on its writer thread, batched with
    /// other calls (see [`batch`](super::batch)); `write`: `f` may change rows.
    async fn run<T, F>(&self, write: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Keyring) -> Result<T, StoreError> + Send + 'static,
    {
        self.inner.writer.run(write, f).await
    }
}

/// Creates the file readable by its owner only, if it does not exist yet (SQLite
/// gives its `-wal` and `-shm` files the same permissions). The records in it are
/// sealed anyway; this keeps even the ciphertexts and the ids private.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Unavailable(format!(
            "cannot create SQLite file {}: {e}",
            path.display()
        ))),
    }
}

/// Why one attempt to open the store failed.
enum OpenError {
    /// Another connection holds a lock SQLite would not wait for: try again.
    Busy(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                OpenError::Busy(e)
            }
            _ => OpenError::Store(sql_error(e)),
        }
    }
}

fn open_once(path: &Path, busy_timeout: Duration) -> Result<Connection, OpenError> {
    let mut conn = Connection::open(path).map_err(|e| {
        OpenError::Store(StoreError::Unavailable(format!(
            "cannot open SQLite file {}: {e}",
            path.display()
        )))
    })?;
    conn.busy_timeout(busy_timeout)?;
    // Every statement is cached once prepared: about a dozen, and up to four
    // shapes of the compare-and-swap (which indexed columns move); rusqlite's
    // default of 16 would evict and prepare again.
    conn.set_prepared_statement_cache_capacity(64);
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::Store(StoreError::Config(format!(
            "SQLite file {} cannot use WAL (journal mode is {mode}); use a file on a local disk",
            path.display()
        ))));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), OpenError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > latest {
        return Err(OpenError::Store(StoreError::Config(format!(
            "the SQLite schema is at version {current}, newer than this build knows ({latest}); upgrade tokenfence"
        ))));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql).map_err(|e| {
            OpenError::Store(StoreError::Config(format!(
                "SQLite migration {version} failed: {e}"
            )))
        })?;
        tx.pragma_update(None, "user_version", version)?;
    }
    Ok(tx.commit()?)
}

/// The ids a query of one `id` column returns.
fn ids(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<ConnectionId>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_error)?;
    let ids = stmt
        .query_map(params, |r| r.get(0).map(ConnectionId))
        .map_err(sql_error)?;
    ids.collect::<Result<_, _>>().map_err(sql_error)
}

fn sql_error(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("SQLite: {e}"))
}

fn read_record(
    conn: &Connection,
    keyring: &Keyring,
    id: &ConnectionId,
) -> Result<Option<ConnectionRecord>, StoreError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .prepare_cached(SELECT_RECORD)
        .and_then(|mut s| {
            s.query_row([&id.0], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(sql_error)?;
    row.map(|(generation, sealed)| row::open(keyring, id, generation, &sealed))
        .transpose()
}

fn read_lease(conn: &Connection, id: &ConnectionId) -> Result<Option<LeaseSlot>, StoreError> {
    let columns = conn
        .prepare_cached(SELECT_LEASE)
        .and_then(|mut s| {
            s.query_row([&id.0], |r| {
                Ok(LeaseColumns {
                    owner: r.get(0)?,
                    acquired_at: r.get(1)?,
                    expires_at: r.get(2)?,
                    generation: r.get(3)?,
                    request: r.get(4)?,
                    displaced_owner: r.get(5)?,
                    displaced_acquired_at: r.get(6)?,
                    displaced_expires_at: r.get(7)?,
                    displaced_generation: r.get(8)?,
                    displaced_request: r.get(9)?,
                })
            })
            .optional()
        })
        .map_err(sql_error)?;
    columns.map(|c| c.into_slot(id)).transpose()
}

/// The record's columns an index covers, as stored, with its generation (the idle
/// deadline's day is the database's: migration 6's triggers keep it).
struct Scheduling {
    generation: i64,
    pending_work_at: Option<i64>,
    hard_deadline: Option<i64>,
}

fn read_scheduling(conn: &Connection, id: &ConnectionId) -> Result<Option<Scheduling>, StoreError> {
    conn.prepare_cached(
        "SELECT generation, pending_work_at, hard_deadline \
         FROM tokenfence_connections WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.query_row([&id.0], |r| {
            Ok(Scheduling {
                generation: r.get(0)?,
                pending_work_at: r.get(1)?,
                hard_deadline: r.get(2)?,
            })
        })
        .optional()
    })
    .map_err(sql_error)
}

/// The guarded update of a record, setting an indexed column only where its value
/// changes: SQLite rewrites an index whose column an `UPDATE` sets, changed or not,
/// and each index is one more page in the commit's fsync (the hard deadline and
/// pending work rarely move; a refresh moves the idle deadline, unindexed, and a
/// trigger its indexed day about once a day).
fn update_sql(
    stored: &Scheduling,
    pending_work_at: Option<i64>,
    hard_deadline: Option<i64>,
) -> String {
    let mut sql = String::from(
        "UPDATE tokenfence_connections SET generation = ?2, status = ?3, \
         idle_deadline = ?4, keepalive_floor = ?5, updated_at = ?6, sealed = ?7",
    );
    for (column, param, stored, new) in [
        (
            "pending_work_at",
            8,
            stored.pending_work_at,
            pending_work_at,
        ),
        ("hard_deadline", 9, stored.hard_deadline, hard_deadline),
    ] {
        if stored != new {
            sql.push_str(&format!(", {column} = ?{param}"));
        }
    }
    sql.push_str(" WHERE id = ?1 AND generation = ?10");
    sql
}

/// Releases a lease: either the row goes (no restore, or nothing to restore) or
/// the row it displaced takes its place; both only where owner and request match.
fn release_lease(
    conn: &Connection,
    id: &ConnectionId,
    release: &LeaseRelease,
) -> Result<(), StoreError> {
    let request = row::request_to_sql(release.request);
    let (owner, restore) = (&release.owner.0, release.restore);
    conn.prepare_cached(
        "DELETE FROM tokenfence_leases WHERE id = ?1 AND owner = ?2 AND request = ?3 \
         AND (NOT ?4 OR displaced_owner IS NULL)",
    )
    .and_then(|mut s| s.execute(params![id.0, owner, request, restore]))
    .map_err(sql_error)?;
    if restore {
        conn.prepare_cached(
            "UPDATE tokenfence_leases SET owner = displaced_owner, \
             acquired_at = displaced_acquired_at, expires_at = displaced_expires_at, \
             generation = displaced_generation, request = displaced_request, \
             displaced_owner = NULL, displaced_acquired_at = NULL, \
             displaced_expires_at = NULL, displaced_generation = NULL, \
             displaced_request = NULL \
             WHERE id = ?1 AND owner = ?2 AND request = ?3 AND displaced_owner IS NOT NULL",
        )
        .and_then(|mut s| s.execute(params![id.0, owner, request]))
        .map_err(sql_error)?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self, id: &ConnectionId) -> Result<Option<ConnectionRecord>, StoreError> {
        let id = id.clone();
        self.run(false, move |conn, keyring| read_record(conn, keyring, &id))
            .await
    }

    async fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        record: &ConnectionRecord,
        release: Option<&LeaseRelease>,
    ) -> Result<CasOutcome, StoreError> {
        let id = record.id.clone();
        let release = release.cloned();
        let SealedRecord {
            generation,
            status,
            idle_deadline,
            keepalive_floor,
            pending_work_at,
            hard_deadline,
            updated_at,
            sealed,
        } = row::seal(&self.inner.keyring, record)?;
        self.run(true, move |conn, keyring| {
            let columns = params![
                id.0,
                generation,
                status,
                idle_deadline,
                keepalive_floor,
                updated_at,
                sealed,
                pending_work_at,
                hard_deadline
            ];
            let changed = match expected {
                None => conn
                    .prepare_cached(
                        "INSERT INTO tokenfence_connections (id, generation, status, \
                         idle_deadline, keepalive_floor, updated_at, sealed, pending_work_at, \
                         hard_deadline) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                         ON CONFLICT (id) DO NOTHING",
                    )
                    .and_then(|mut s| s.execute(columns)),
                Some(g) => {
                    let expected = row::generation_to_sql(g);
                    match read_scheduling(conn, &id)? {
                        Some(stored) if stored.generation == expected => conn
                            .prepare_cached(&update_sql(&stored, pending_work_at, hard_deadline))
                            .and_then(|mut s| {
                                let mut all: Vec<&dyn rusqlite::ToSql> = columns.to_vec();
                                all.push(&expected);
                                s.execute(all.as_slice())
                            }),
                        _ => Ok(0),
                    }
                }
            }
            .map_err(sql_error)?;
            let outcome = if changed == 1 {
                if let Some(release) = &release {
                    release_lease(conn, &id, release)?;
                }
                CasOutcome::Committed
            } else {
                CasOutcome::Conflict(read_record(conn, keyring, &id)?)
            };
            Ok(outcome)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        let id = id.clone();
        let owner = owner.clone();
        self.run(true, move |conn, keyring| {
            let current = read_lease(conn, &id)?;
            if let Some(held) = current.as_ref().and_then(|l| l.held_against(&owner, now)) {
                return Ok(LeaseOutcome::Held(held.clone()));
            }
            // A record that does not open fails the acquisition; the transaction
            // rolls back and the lease row stays as it was.
            let record = read_record(conn, keyring, &id)?;
            let generation = record.as_ref().map(|r| r.generation);
            let (slot, took_over) =
                match lease::acquire(current.as_ref(), &owner, request, generation, now, ttl) {
                    Acquired::Held(held) => return Ok(LeaseOutcome::Held(held)),
                    Acquired::Granted { slot, took_over } => (slot, took_over),
                };
            let lease = slot.lease.clone();
            let c = LeaseColumns::of(&slot);
            conn.prepare_cached(
                "INSERT INTO tokenfence_leases (id, owner, acquired_at, expires_at, generation, \
                 request, displaced_owner, displaced_acquired_at, displaced_expires_at, \
                 displaced_generation, displaced_request) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (id) DO UPDATE SET \
                 owner = excluded.owner, acquired_at = excluded.acquired_at, \
                 expires_at = excluded.expires_at, generation = excluded.generation, \
                 request = excluded.request, displaced_owner = excluded.displaced_owner, \
                 displaced_acquired_at = excluded.displaced_acquired_at, \
                 displaced_expires_at = excluded.displaced_expires_at, \
                 displaced_generation = excluded.displaced_generation, \
                 displaced_request = excluded.displaced_request",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id.0,
                    c.owner,
                    c.acquired_at,
                    c.expires_at,
                    c.generation,
                    c.request,
                    c.displaced_owner,
                    c.displaced_acquired_at,
                    c.displaced_expires_at,
                    c.displaced_generation,
                    c.displaced_request
                ])
            })
            .map_err(sql_error)?;
            Ok(LeaseOutcome::Granted {
                lease,
                record,
                took_over,
            })
        })
        .await
    }

    async fn release_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> Result<(), StoreError> {
        let release = LeaseRelease {
            owner: owner.clone(),
            request,
            restore,
        };
        let id = id.clone();
        self.run(true, move |conn, _| release_lease(conn, &id, &release))
            .await
    }

    async fn due_for_work(
        &self,
        now: Timestamp,
        lead: Duration,
        after: Option<DueWork>,
        limit: usize,
    ) -> Result<Vec<DueWork>, StoreError> {
        let q = row::due_query(now, lead, after, limit);
        self.run(false, move |conn, _| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, MIN(due) FROM ( \
                     SELECT id, MAX(idle_deadline - ?3, keepalive_floor) AS due \
                     FROM tokenfence_connections \
                     WHERE idle_day <= ?1 AND idle_deadline <= ?1 AND keepalive_floor <= ?2 \
                     UNION ALL SELECT id, pending_work_at FROM tokenfence_connections \
                     WHERE pending_work_at <= ?2 \
                     UNION ALL SELECT id, expires_at FROM tokenfence_leases \
                     WHERE expires_at <= ?2) \
                     GROUP BY id HAVING (MIN(due), id) > (?4, ?5) \
                     ORDER BY 2, 1 LIMIT ?6",
                )
                .map_err(sql_error)?;
            let rows = stmt
                .query_map(
                    params![
                        q.keepalive_bound,
                        q.now,
                        q.lead,
                        q.after_at,
                        q.after_id,
                        q.limit
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(sql_error)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_error)?;
            Ok(row::due_work(rows))
        })
        .await
    }

    async fn notices_due(
        &self,
        after: Option<Timestamp>,
        until: Timestamp,
        notice: Duration,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        let (low, high) = row::notice_bounds(after, until, notice);
        self.run(false, move |conn, _| {
            ids(
                conn,
                "SELECT id FROM tokenfence_connections \
                 WHERE hard_deadline > ?1 AND hard_deadline <= ?2 ORDER BY id",
                params![low, high],
            )
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ConnectionId>, StoreError> {
        self.run(false, |conn, _| {
            ids(
                conn,
                "SELECT id FROM tokenfence_connections ORDER BY id",
                params![],
            )
        })
        .await
    }

    async fn put_pending(
        &self,
        key: &str,
        pending: &PendingAuthorization,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let sealed = row::seal_pending(&self.inner.keyring, key, pending)?;
        let (key, expires_at, now) = (
            key.to_owned(),
            row::time_to_sql(pending.expires_at),
            row::time_to_sql(now),
        );
        self.run(true, move |conn, _| {
            conn.execute(
                "DELETE FROM tokenfence_pending_authorizations WHERE expires_at < ?1",
                params![now],
            )
            .map_err(sql_error)?;
            conn.execute(
                "INSERT OR REPLACE INTO tokenfence_pending_authorizations (state_key, sealed, expires_at) \
                 VALUES (?1, ?2, ?3)",
                params![key, sealed, expires_at],
            )
            .map_err(sql_error)?;
            Ok(())
        })
        .await
    }

    async fn take_pending(&self, key: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        let key = key.to_owned();
        self.run(true, move |conn, keyring| {
            let sealed: Option<Vec<u8>> = conn
                .query_row(
                    "DELETE FROM tokenfence_pending_authorizations WHERE state_key = ?1 RETURNING sealed",
                    params![key],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql_error)?;
            sealed
                .map(|s| row::open_pending(keyring, &key, &s))
                .transpose()
        })
        .await
    }
}
