//! The shared store: PostgreSQL, for many processes on many machines.
//!
//! The compare-and-swap is one guarded `UPDATE ... WHERE id = $1 AND generation = $n`
//! (an `INSERT ... ON CONFLICT DO NOTHING` when no record may exist). Acquiring a
//! lease starts with one statement that reads the database's clock, the lease row
//! and the record (one snapshot) and, where it finds a record and no lease row
//! (the common case: a commit deletes the row), locks the record `FOR SHARE` and
//! inserts the row where there is none. Otherwise, with no transaction, a second
//! statement writes the new lease (unless the read says "held"), with
//! its request id and the row it displaced, only if the lease row is still the one
//! read (`UPDATE ... WHERE (columns) IS NOT DISTINCT FROM (as read)`, or, where there
//! was none, `INSERT ... ON CONFLICT DO NOTHING`) and the record's generation is
//! still the one read (`FOR SHARE`, so a commit in flight lands first); a write that
//! finds either changed reads again. The write takes the connection's advisory lock,
//! which earlier builds held for their whole acquisition, so both builds can run
//! side by side during a deploy. A connection with no record is leased in a
//! transaction under that lock (a record inserted after the write's snapshot is not
//! seen by its guard). Releasing is one statement guarded by `owner = $2 AND request = $3`
//! (a `DELETE`, and with restore an `UPDATE` that puts the displaced row back, in
//! one `WITH`), so an expired holder can never release someone else's lease; a
//! release racing an acquisition waits for the row lock and then finds another
//! owner or request.
//!
//! Migrations ship with the crate and run on connect, in one transaction under an
//! advisory lock, so any number of processes may start at once. Records are sealed
//! with a [`Keyring`] (AES-256-GCM, bound to the connection id).
//!
//! TLS (rustls): a server is always verified (certificate chain and host name,
//! libpq's `verify-full`), against the Mozilla roots plus any CA certificates
//! named in [`PostgresOptions::tls_root_certificates`] (a cloud provider's CA
//! bundle, a private CA). Without `sslmode` in the URL, TLS is required for any
//! host that is not loopback (a network path never carries sealed tokens and the
//! password in clear by default); loopback and Unix sockets default to `prefer`.
//! An explicit `sslmode` is obeyed: `require` (also written `verify-full` or
//! `verify-ca`), `prefer` (TLS when the server offers it), `disable`.
//!
//! The role needs the right to create tables in the schema on first use (and to
//! create the schema if it does not exist). PostgreSQL text cannot hold NUL
//! characters, so connection ids and worker ids containing one are refused with
//! [`StoreError::Config`].

use super::row::{self, LeaseColumns, SealedRecord};
use super::{CasOutcome, DueWork, LeaseOutcome, Store, StoreError};
use crate::crypto::Keyring;
use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokenfence_core::lease::{self, Acquired};
use tokenfence_core::{
    ConnectionId, ConnectionRecord, Generation, LeaseRelease, LeaseRequestId, PendingAuthorization,
    Timestamp, WorkerId,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Schema migrations, applied in order on connect.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/postgres/0001_init.sql")),
    (2, include_str!("migrations/postgres/0002_scans.sql")),
    (
        3,
        include_str!("migrations/postgres/0003_lease_requests.sql"),
    ),
    (
        4,
        include_str!("migrations/postgres/0004_pending_authorizations.sql"),
    ),
];

/// First half of the advisory-lock key that serializes migrations ("tokn").
const MIGRATION_LOCK: i32 = 0x746f_6b6e;
/// First half of the advisory-lock keys of lease acquisitions ("leas"); the
/// second is `hashtext('<schema>/<connection id>')`. Builds before the
/// two-statement lease took it for their whole acquisition, so the write takes it
/// too: a process of each build may run side by side during a deploy.
const LEASE_LOCK: i32 = 0x6c65_6173;

/// How many times a lease acquisition reads and writes again after the lease row
/// or the record changed between its read and its write (each such loss is
/// another acquisition's, release's or commit's progress).
const LEASE_ATTEMPTS: usize = 16;

/// A lease acquisition's arguments, and its advisory-lock key.
struct LeaseAsk<'a> {
    id: &'a ConnectionId,
    owner: &'a WorkerId,
    request: LeaseRequestId,
    now: Timestamp,
    ttl: Duration,
    lock_key: String,
}

/// How one optimistic acquisition ended.
enum LeaseAttempt {
    /// Granted or held: the answer.
    Done(Box<LeaseOutcome>),
    /// The lease row or the record changed between the read and the write.
    Changed,
    /// The record is absent: nothing was written (see `try_acquire`).
    NoRecord,
}

/// The lease row's columns, in the order every lease statement names them.
const LEASE_COLUMNS: &str = "owner, acquired_at, expires_at, generation, request, \
     displaced_owner, displaced_acquired_at, displaced_expires_at, displaced_generation, \
     displaced_request";

/// How a [`PostgresStore`] connects.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// The schema that holds tokenfence's tables (created if missing). Lowercase
    /// letters, digits and `_`, starting with a letter or `_`.
    pub schema: String,
    /// Connections in the pool.
    pub max_connections: usize,
    /// How long an operation waits for a pooled connection, how long connecting
    /// may take, and (unless the URL sets `options`) the server-side
    /// `statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout`.
    pub timeout: Duration,
    /// A PEM file of CA certificates to trust for TLS, besides the Mozilla roots.
    pub tls_root_certificates: Option<PathBuf>,
    /// Whose clock decides lease expiry.
    pub lease_clock: LeaseClock,
}

/// Whose clock decides whether a lease has expired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeaseClock {
    /// The database server's (`clock_timestamp()`), the default: processes on
    /// machines whose clocks disagree still exclude each other, and a holder's
    /// send deadline (counted from when it asked, on its own clock) ends before
    /// the lease does.
    #[default]
    Database,
    /// The `now` each caller passes (for tests that inject time).
    Caller,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: "public".into(),
            max_connections: 8,
            timeout: Duration::from_secs(10),
            tls_root_certificates: None,
            lease_clock: LeaseClock::Database,
        }
    }
}

/// Records and leases in a PostgreSQL database. Clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    keyring: Keyring,
    sql: Sql,
    lease_clock: LeaseClock,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never shown.
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.sql.schema)
            .field("keyring", &self.inner.keyring)
            .finish()
    }
}

/// Statements, with the schema spelled in.
struct Sql {
    schema: String,
    select_record: String,
    insert_record: String,
    update_record: String,
    /// `insert_record` and `update_record` releasing a lease when they land.
    insert_record_releasing: String,
    update_record_releasing: String,
    /// The first attempt of an acquisition, one statement: `read_for_lease`'s
    /// read, and where it finds a record and no lease row, the new row written
    /// (see `first_attempt`).
    first_attempt: String,
    /// The database's clock, the lease row and the record, in one statement (one
    /// snapshot).
    read_for_lease: String,
    /// The new lease row, only where there is none.
    insert_lease: String,
    /// The new lease row, only where the row is still the one read.
    replace_lease: String,
    release_lease: String,
    due: String,
    notices: String,
    list: String,
    reseal: String,
    purge_pending: String,
    put_pending: String,
    take_pending: String,
}

/// The write's guard on the record: its generation is still the one read
/// (`$n`; NULL: there was none). `FOR SHARE` makes a compare-and-swap in flight
/// finish first, and then the newest version is judged, not the statement's
/// snapshot. A record inserted after the snapshot is not seen: alone, that insert
/// counts as coming after the grant; an insert that releases a lease would need a
/// lease granted between the read and the write, which the lock held from before
/// the read excludes, which is why an acquisition that read no record runs in a
/// transaction under the lock.
fn record_guard(connections: &str, n: usize) -> String {
    format!("(SELECT generation FROM {connections} WHERE id = $1 FOR SHARE) IS NOT DISTINCT FROM ${n}::bigint")
}

impl Sql {
    fn new(schema: &str) -> Sql {
        let c = format!("\"{schema}\".tokenfence_connections");
        let l = format!("\"{schema}\".tokenfence_leases");
        let p = format!("\"{schema}\".tokenfence_pending_authorizations");
        // The read an acquisition decides on: the database's clock, the lease row
        // and the record, in one snapshot.
        let read = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint, \
             l.*, c.generation, c.sealed";
        let read_joins = format!(
            "LEFT JOIN (SELECT {LEASE_COLUMNS} FROM {l} WHERE id = $1) AS l ON true \
             LEFT JOIN {c} AS c ON c.id = $1"
        );
        let insert_record = format!(
            "INSERT INTO {c} (id, generation, status, idle_deadline, keepalive_floor, \
             updated_at, sealed, pending_work_at, hard_deadline) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (id) DO NOTHING"
        );
        let update_record = format!(
            "UPDATE {c} SET generation = $2, status = $3, idle_deadline = $4, \
             keepalive_floor = $5, updated_at = $6, sealed = $7, pending_work_at = $8, \
             hard_deadline = $9 WHERE id = $1 AND generation = $10"
        );
        // A lease row put back in place of the one it displaced.
        let restored = "owner = displaced_owner, acquired_at = displaced_acquired_at, \
             expires_at = displaced_expires_at, generation = displaced_generation, \
             request = displaced_request, displaced_owner = NULL, \
             displaced_acquired_at = NULL, displaced_expires_at = NULL, \
             displaced_generation = NULL, displaced_request = NULL";
        // One statement: the swap, and only where it landed (joined on its
        // returned id) the release, as `release_lease` does; owner, request and
        // restore are the parameters from `first` on.
        let releasing = |cas: &str, first: usize| {
            let (owner, request, restore) = (first, first + 1, first + 2);
            format!(
                "WITH cas AS ({cas} RETURNING id), \
                 restored AS (UPDATE {l} SET {restored} FROM cas \
                 WHERE {l}.id = cas.id AND owner = ${owner} AND request = ${request} \
                 AND ${restore} AND displaced_owner IS NOT NULL RETURNING 1), \
                 released AS (DELETE FROM {l} USING cas WHERE {l}.id = cas.id \
                 AND owner = ${owner} AND request = ${request} \
                 AND (NOT ${restore} OR displaced_owner IS NULL) RETURNING 1) \
                 SELECT count(*) FROM cas"
            )
        };
        Sql {
            schema: schema.to_owned(),
            insert_record_releasing: releasing(&insert_record, 10),
            update_record_releasing: releasing(&update_record, 11),
            insert_record,
            update_record,
            select_record: format!("SELECT generation, sealed FROM {c} WHERE id = $1"),
            read_for_lease: format!("SELECT {read} FROM (SELECT 1) AS one {read_joins}"),
            // Columns 0 to 12 are `read_for_lease`'s (the statement's snapshot: it
            // does not see its own insert); 13 to 15 the grant, if the row was
            // inserted: its instant and the record it was granted on. The record
            // is locked (`FOR SHARE`: a commit in flight lands first, and none
            // lands until this one does) before the lease row is inserted, the
            // order of every statement that touches both (a releasing commit
            // updates the record, then deletes the row); the insert waits for the
            // advisory lock older builds hold for their whole acquisition (the
            // share lock may be held meanwhile, at most `lock_timeout`). Where a
            // lease row is in sight the record is not locked at all: askers told
            // "held" again and again would keep a share lock on it and starve the
            // holder's commit (found by the conformance suite's turn-taking test: 2
            // minutes instead of 2 seconds). `$3`: the caller's clock, or NULL for
            // the database's.
            first_attempt: format!(
                "WITH rec AS (SELECT generation, sealed FROM {c} WHERE id = $1 \
                 AND NOT EXISTS (SELECT 1 FROM {l} WHERE id = $1) FOR SHARE), \
                 ins AS (INSERT INTO {l} (id, owner, acquired_at, expires_at, generation, request) \
                 SELECT $1, $2::text, at.ms, at.ms + LEAST($4::bigint, {max} - at.ms), \
                 rec.generation, $5::bigint \
                 FROM rec, (SELECT COALESCE($3::bigint, \
                 (extract(epoch FROM clock_timestamp()) * 1000)::bigint) AS ms) AS at, \
                 (SELECT pg_advisory_xact_lock({LEASE_LOCK}, hashtext($6))) AS locked \
                 ON CONFLICT (id) DO NOTHING RETURNING acquired_at) \
                 SELECT {read}, ins.acquired_at, rec.generation, rec.sealed \
                 FROM (SELECT 1) AS one {read_joins} \
                 LEFT JOIN ins ON true LEFT JOIN rec ON ins.acquired_at IS NOT NULL",
                max = i64::MAX
            ),
            insert_lease: format!(
                "INSERT INTO {l} (id, {LEASE_COLUMNS}) \
                 SELECT $1, $2::text, $3::bigint, $4::bigint, $5::bigint, $6::bigint, \
                 $7::text, $8::bigint, $9::bigint, $10::bigint, $11::bigint \
                 FROM (SELECT pg_advisory_xact_lock({LEASE_LOCK}, hashtext($12))) AS locked \
                 WHERE {record_guard} \
                 ON CONFLICT (id) DO NOTHING",
                record_guard = record_guard(&c, 13)
            ),
            replace_lease: format!(
                "UPDATE {l} SET ({LEASE_COLUMNS}) = ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 FROM (SELECT pg_advisory_xact_lock({LEASE_LOCK}, hashtext($22))) AS locked \
                 WHERE id = $1 AND ({LEASE_COLUMNS}) IS NOT DISTINCT FROM \
                 ($12, $13, $14, $15, $16, $17, $18, $19, $20, $21) AND {record_guard}",
                record_guard = record_guard(&c, 23)
            ),
            // Both parts read the same snapshot and match complementary rows: the
            // row goes unless it is to be restored; a row to restore becomes the
            // one it displaced. Each rechecks its guard after waiting for a lock.
            release_lease: format!(
                "WITH restored AS (UPDATE {l} SET {restored} \
                 WHERE id = $1 AND owner = $2 AND request = $3 AND $4 \
                 AND displaced_owner IS NOT NULL RETURNING id) \
                 DELETE FROM {l} WHERE id = $1 AND owner = $2 AND request = $3 \
                 AND (NOT $4 OR displaced_owner IS NULL)"
            ),
            due: format!(
                "SELECT id, MIN(due) FROM ( \
                 SELECT id, GREATEST(idle_deadline - $3, keepalive_floor) AS due FROM {c} \
                 WHERE idle_deadline <= $1 AND keepalive_floor <= $2 \
                 UNION ALL SELECT id, pending_work_at FROM {c} WHERE pending_work_at <= $2 \
                 UNION ALL SELECT id, expires_at FROM {l} WHERE expires_at <= $4) AS d \
                 GROUP BY id HAVING (MIN(due), id) > ($5, $6) ORDER BY 2, 1 LIMIT $7"
            ),
            notices: format!(
                "SELECT id FROM {c} WHERE hard_deadline > $1 AND hard_deadline <= $2 ORDER BY id"
            ),
            list: format!("SELECT id FROM {c} ORDER BY id"),
            reseal: format!("UPDATE {c} SET sealed = $2 WHERE id = $1 AND sealed = $3"),
            purge_pending: format!("DELETE FROM {p} WHERE expires_at < $1"),
            put_pending: format!(
                "INSERT INTO {p} (state_key, sealed, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (state_key) DO UPDATE SET sealed = $2, expires_at = $3"
            ),
            take_pending: format!("DELETE FROM {p} WHERE state_key = $1 RETURNING sealed"),
        }
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) with the
    /// default [`PostgresOptions`] and applies the migrations this build ships.
    pub async fn connect(url: &str, keyring: Keyring) -> Result<Self, StoreError> {
        Self::connect_with(url, keyring, PostgresOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    pub async fn connect_with(
        url: &str,
        keyring: Keyring,
        options: PostgresOptions,
    ) -> Result<Self, StoreError> {
        if !valid_schema_name(&options.schema) {
            return Err(StoreError::Config(format!(
                "PostgreSQL schema name `{}` must be lowercase letters, digits and `_`, at most 63",
                options.schema.escape_debug()
            )));
        }
        let mut config = parse_url(url)?;
        if config.get_application_name().is_none() {
            config.application_name("tokenfence");
        }
        config.connect_timeout(options.timeout);
        if config.get_options().is_none() {
            // A stuck statement or a lock held by a paused client must not block
            // every other worker: the server ends them.
            let ms = options.timeout.as_millis().max(1);
            config.options(format!(
                "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
            ));
        }
        let tls = tls_connector(options.tls_root_certificates.as_deref())?;
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .build()
            .map_err(|e| StoreError::Config(format!("PostgreSQL pool: {e}")))?;
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool,
                keyring,
                sql: Sql::new(&options.schema),
                lease_clock: options.lease_clock,
            }),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The schema that holds the tables.
    pub fn schema(&self) -> &str {
        &self.inner.sql.schema
    }

    /// The instant leases are judged at: the database's clock, or the caller's
    /// `now` ([`LeaseClock`]).
    async fn lease_now(
        &self,
        client: &impl GenericClient,
        caller: Timestamp,
    ) -> Result<Timestamp, StoreError> {
        match self.inner.lease_clock {
            LeaseClock::Caller => Ok(caller),
            LeaseClock::Database => {
                let clock = client
                    .prepare_cached("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
                    .await
                    .map_err(pg_error)?;
                let row = client.query_one(&clock, &[]).await.map_err(pg_error)?;
                let ms: i64 = row.try_get(0).map_err(column_error)?;
                Ok(row::time_from_sql(ms))
            }
        }
    }

    /// One optimistic acquisition: read the clock, the lease row and the record
    /// in one statement (one snapshot), decide as every store does
    /// (`lease::acquire`), then write only if the lease row is still the one read
    /// (absent: still absent) and the record's generation still the one read; a
    /// commit in flight finishes first (`FOR SHARE`). Those two and the clock are
    /// all the decision reads, so a write that lands is the decision an atomic
    /// acquisition makes at that moment (its clock read a little earlier, which
    /// only shortens the lease). Without `locked`, a read that finds no record
    /// writes nothing ([`LeaseAttempt::NoRecord`]).
    async fn try_acquire(
        &self,
        client: &impl GenericClient,
        ask: &LeaseAsk<'_>,
        locked: bool,
    ) -> Result<LeaseAttempt, StoreError> {
        let read = client
            .prepare_cached(&self.inner.sql.read_for_lease)
            .await
            .map_err(pg_error)?;
        let row = client
            .query_one(&read, &[&ask.id.0])
            .await
            .map_err(pg_error)?;
        self.decide(client, ask, locked, &row).await
    }

    /// The rest of [`try_acquire`](Self::try_acquire) from its read (`row`,
    /// `read_for_lease`'s columns): the decision and the guarded write.
    async fn decide(
        &self,
        client: &impl GenericClient,
        ask: &LeaseAsk<'_>,
        locked: bool,
        row: &tokio_postgres::Row,
    ) -> Result<LeaseAttempt, StoreError> {
        let (id, owner) = (ask.id, ask.owner);
        let sql = &self.inner.sql;
        let now = match self.inner.lease_clock {
            LeaseClock::Caller => ask.now,
            LeaseClock::Database => row::time_from_sql(row.try_get(0).map_err(column_error)?),
        };
        let read_columns = lease_columns(row, 1)?;
        let current = read_columns.clone().map(|c| c.into_slot(id)).transpose()?;
        if let Some(held) = current.as_ref().and_then(|l| l.held_against(owner, now)) {
            return Ok(LeaseAttempt::Done(Box::new(LeaseOutcome::Held(
                held.clone(),
            ))));
        }
        // A record that does not open fails the acquisition; nothing is written.
        let stored: Option<i64> = row.try_get(11).map_err(column_error)?;
        let record = match stored {
            Some(_) => Some(open_record(row, 11, &self.inner.keyring, id)?),
            None if locked => None,
            None => return Ok(LeaseAttempt::NoRecord),
        };
        let generation = record.as_ref().map(|r| r.generation);
        let (slot, took_over) = match lease::acquire(
            current.as_ref(),
            owner,
            ask.request,
            generation,
            now,
            ask.ttl,
        ) {
            Acquired::Held(held) => {
                return Ok(LeaseAttempt::Done(Box::new(LeaseOutcome::Held(held))))
            }
            Acquired::Granted { slot, took_over } => (slot, took_over),
        };
        let new = LeaseColumns::of(&slot);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id.0];
        params.extend(lease_params(&new));
        let statement = match &read_columns {
            None => &sql.insert_lease,
            Some(old) => {
                params.extend(lease_params(old));
                &sql.replace_lease
            }
        };
        params.push(&ask.lock_key);
        params.push(&stored);
        let stmt = client.prepare_cached(statement).await.map_err(pg_error)?;
        if client.execute(&stmt, &params).await.map_err(pg_error)? != 1 {
            return Ok(LeaseAttempt::Changed);
        }
        Ok(LeaseAttempt::Done(Box::new(LeaseOutcome::Granted {
            lease: slot.lease,
            record,
            took_over,
        })))
    }

    /// The first attempt of an acquisition, in one round trip: the read
    /// [`try_acquire`](Self::try_acquire) decides on, and in the same statement,
    /// where it finds a record and no lease row (the common case: a commit deletes
    /// the row), the new row: inserted only where there is none, with the
    /// record's generation read under `FOR SHARE`, so it is the grant
    /// `lease::acquire` makes of a free row at that instant. Otherwise the read
    /// goes on to the decision and the guarded write. A record that does not
    /// open fails the acquisition, and a row just written is released again (a
    /// release that fails too leaves it as a lost answer leaves a grant: the
    /// machine's retry under the same request recognises it, or giving up
    /// releases it).
    async fn first_attempt(
        &self,
        client: &impl GenericClient,
        ask: &LeaseAsk<'_>,
    ) -> Result<LeaseAttempt, StoreError> {
        let caller_now = match self.inner.lease_clock {
            LeaseClock::Caller => Some(row::time_to_sql(ask.now)),
            LeaseClock::Database => None,
        };
        let ttl = row::duration_to_sql(ask.ttl);
        let request = row::request_to_sql(ask.request);
        let stmt = client
            .prepare_cached(&self.inner.sql.first_attempt)
            .await
            .map_err(pg_error)?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &ask.id.0,
            &ask.owner.0,
            &caller_now,
            &ttl,
            &request,
            &ask.lock_key,
        ];
        let row = client.query_one(&stmt, &params).await.map_err(pg_error)?;
        let Some(granted_at) = row.try_get::<_, Option<i64>>(13).map_err(column_error)? else {
            // A record and no lease row in sight, yet nothing inserted: a row came
            // since the snapshot. Read again rather than decide on a stale read.
            let lease_seen: Option<String> = row.try_get(1).map_err(column_error)?;
            let record_seen: Option<i64> = row.try_get(11).map_err(column_error)?;
            if lease_seen.is_none() && record_seen.is_some() {
                return Ok(LeaseAttempt::Changed);
            }
            return self.decide(client, ask, false, &row).await;
        };
        let record = match open_record(&row, 14, &self.inner.keyring, ask.id) {
            Ok(record) => record,
            Err(e) => {
                if let Err(release) = self
                    .release(client, ask.id, ask.owner, ask.request, false)
                    .await
                {
                    tracing::warn!(
                        connection = %ask.id,
                        error = %release,
                        "lease row left after a record that does not open: giving up releases it, or it expires"
                    );
                }
                return Err(e);
            }
        };
        let lease = lease::grant(
            ask.owner,
            ask.request,
            Some(record.generation),
            row::time_from_sql(granted_at),
            ask.ttl,
        );
        Ok(LeaseAttempt::Done(Box::new(LeaseOutcome::Granted {
            lease,
            record: Some(record),
            took_over: None,
        })))
    }

    /// Releases `owner`'s lease of `id` granted under `request` (`release_lease`).
    async fn release(
        &self,
        client: &impl GenericClient,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> Result<(), StoreError> {
        let stmt = client
            .prepare_cached(&self.inner.sql.release_lease)
            .await
            .map_err(pg_error)?;
        client
            .execute(
                &stmt,
                &[&id.0, &owner.0, &row::request_to_sql(request), &restore],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL: {}", with_causes(&e))))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&MIGRATION_LOCK, &self.inner.sql.schema],
        )
        .await
        .map_err(pg_error)?;
        let schema = &self.inner.sql.schema;
        let exists = tx
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[schema])
            .await
            .map_err(pg_error)?
            .is_some();
        if !exists {
            tx.batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
                .await
                .map_err(|e| StoreError::Config(format!("cannot create schema {schema}: {e}")))?;
        }
        let versions = format!("\"{schema}\".tokenfence_schema_version");
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {versions} (version BIGINT NOT NULL PRIMARY KEY, \
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ))
        .await
        .map_err(|e| StoreError::Config(format!("cannot create {versions}: {e}")))?;
        let current: i64 = tx
            .query_one(
                &format!("SELECT COALESCE(MAX(version), 0) FROM {versions}"),
                &[],
            )
            .await
            .map_err(pg_error)?
            .try_get(0)
            .map_err(column_error)?;
        let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if current > latest {
            return Err(StoreError::Config(format!(
                "the PostgreSQL schema {schema} is at version {current}, newer than this build knows ({latest}); upgrade tokenfence"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(&sql.replace("{schema}", &format!("\"{schema}\"")))
                .await
                .map_err(|e| {
                    StoreError::Config(format!("PostgreSQL migration {version} failed: {e}"))
                })?;
            tx.execute(
                &format!("INSERT INTO {versions} (version) VALUES ($1)"),
                &[version],
            )
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }

    /// Re-seals every record that is not under the keyring's newest key; returns
    /// how many rows changed. A row written meanwhile is left to its writer (it is
    /// sealed under the newest key already). Stops at the first row that does not
    /// open, leaving it as it is.
    pub async fn reencrypt_all(&self) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let page = client
            .prepare_cached(&format!(
                "SELECT id, sealed FROM \"{}\".tokenfence_connections \
                 WHERE id > $1 ORDER BY id LIMIT $2",
                self.inner.sql.schema
            ))
            .await
            .map_err(pg_error)?;
        let reseal = client
            .prepare_cached(&self.inner.sql.reseal)
            .await
            .map_err(pg_error)?;
        let batch = i64::try_from(row::RESEAL_BATCH).unwrap_or(i64::MAX);
        let mut changed = 0;
        let mut after = String::new();
        loop {
            let rows = client
                .query(&page, &[&after, &batch])
                .await
                .map_err(pg_error)?;
            for r in &rows {
                let id: String = r.try_get(0).map_err(column_error)?;
                let sealed: Vec<u8> = r.try_get(1).map_err(column_error)?;
                let cid = ConnectionId(id.clone());
                if let Some(new) = row::reseal(&self.inner.keyring, &cid, &sealed)? {
                    // Only if the row is still what was read (one statement each:
                    // no lock held across the pass).
                    changed += client
                        .execute(&reseal, &[&id, &new, &sealed])
                        .await
                        .map_err(pg_error)?;
                }
                after = id;
            }
            if rows.len() < row::RESEAL_BATCH {
                return Ok(usize::try_from(changed).unwrap_or(usize::MAX));
            }
        }
    }
}

/// The URL as tokio-postgres reads it, with the TLS policy of the module docs.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    use tokio_postgres::config::{Host, SslMode};
    // libpq's verifying modes: ours always verifies, so they mean `require`.
    let normalized = url
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require");
    let mut config: tokio_postgres::Config = normalized
        .parse()
        .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?;
    let loopback = |h: &Host| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    };
    if !url.contains("sslmode=") && !config.get_hosts().iter().all(loopback) {
        config.ssl_mode(SslMode::Require);
    }
    Ok(config)
}

/// Verifies servers against the Mozilla roots and `extra_roots`.
fn tls_connector(extra_roots: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_roots {
        let bad = |e: &dyn std::fmt::Display| {
            StoreError::Config(format!("TLS root certificates in {}: {e}", path.display()))
        };
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad(&"no certificate found"));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Config(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn valid_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {}", with_causes(&e)))
}

/// An error and its causes, `a: b: c` (tokio-postgres keeps the useful part, such
/// as why a TLS handshake failed, in the causes).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// A column that is missing or of another type: the tables were changed by hand.
fn column_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Config(format!(
        "PostgreSQL tables do not have the expected columns: {}",
        with_causes(&e)
    ))
}

fn check_text(what: &str, text: &str) -> Result<(), StoreError> {
    if text.contains('\0') {
        return Err(StoreError::Config(format!(
            "{what} contains a NUL character, which PostgreSQL text cannot store"
        )));
    }
    Ok(())
}

async fn read_record<C: GenericClient>(
    client: &C,
    sql: &str,
    keyring: &Keyring,
    id: &ConnectionId,
) -> Result<Option<ConnectionRecord>, StoreError> {
    let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
    let row = client.query_opt(&stmt, &[&id.0]).await.map_err(pg_error)?;
    row.map(|r| open_record(&r, 0, keyring, id)).transpose()
}

/// Opens the record whose generation and sealed blob are columns `first` and
/// `first + 1` of `row`.
fn open_record(
    row: &tokio_postgres::Row,
    first: usize,
    keyring: &Keyring,
    id: &ConnectionId,
) -> Result<ConnectionRecord, StoreError> {
    let sealed: &[u8] = row.try_get(first + 1).map_err(column_error)?;
    row::open(
        keyring,
        id,
        row.try_get(first).map_err(column_error)?,
        sealed,
    )
}

/// The lease row in columns `first..first + 10` of `row` ([`LEASE_COLUMNS`]'s
/// order), if there is one (its owner is never NULL).
fn lease_columns(
    row: &tokio_postgres::Row,
    first: usize,
) -> Result<Option<LeaseColumns>, StoreError> {
    let Some(owner) = row.try_get(first).map_err(column_error)? else {
        return Ok(None);
    };
    Ok(Some(LeaseColumns {
        owner,
        acquired_at: row.try_get(first + 1).map_err(column_error)?,
        expires_at: row.try_get(first + 2).map_err(column_error)?,
        generation: row.try_get(first + 3).map_err(column_error)?,
        request: row.try_get(first + 4).map_err(column_error)?,
        displaced_owner: row.try_get(first + 5).map_err(column_error)?,
        displaced_acquired_at: row.try_get(first + 6).map_err(column_error)?,
        displaced_expires_at: row.try_get(first + 7).map_err(column_error)?,
        displaced_generation: row.try_get(first + 8).map_err(column_error)?,
        displaced_request: row.try_get(first + 9).map_err(column_error)?,
    }))
}

/// A lease row's columns as statement parameters, in [`LEASE_COLUMNS`]'s order.
fn lease_params(c: &LeaseColumns) -> [&(dyn tokio_postgres::types::ToSql + Sync); 10] {
    [
        &c.owner,
        &c.acquired_at,
        &c.expires_at,
        &c.generation,
        &c.request,
        &c.displaced_owner,
        &c.displaced_acquired_at,
        &c.displaced_expires_at,
        &c.displaced_generation,
        &c.displaced_request,
    ]
}

async fn ids<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<ConnectionId>, StoreError> {
    let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
    let rows = client.query(&stmt, params).await.map_err(pg_error)?;
    rows.iter()
        .map(|r| r.try_get(0).map(ConnectionId).map_err(column_error))
        .collect()
}

#[async_trait]
impl Store for PostgresStore {
    async fn load(&self, id: &ConnectionId) -> Result<Option<ConnectionRecord>, StoreError> {
        check_text("connection id", &id.0)?;
        let client = self.client().await?;
        read_record(
            &client,
            &self.inner.sql.select_record,
            &self.inner.keyring,
            id,
        )
        .await
    }

    async fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        record: &ConnectionRecord,
        release: Option<&LeaseRelease>,
    ) -> Result<CasOutcome, StoreError> {
        check_text("connection id", &record.id.0)?;
        if let Some(r) = release {
            check_text("worker id", &r.owner.0)?;
        }
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
        let client = self.client().await?;
        let expected = expected.map(row::generation_to_sql);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &record.id.0,
            &generation,
            &status,
            &idle_deadline,
            &keepalive_floor,
            &updated_at,
            &sealed,
            &pending_work_at,
            &hard_deadline,
        ];
        if expected.is_some() {
            params.push(&expected);
        }
        let released = release.map(|r| (&r.owner.0, row::request_to_sql(r.request), r.restore));
        if let Some((owner, request, restore)) = &released {
            params.push(owner);
            params.push(request);
            params.push(restore);
        }
        let sql = &self.inner.sql;
        let statement = match (expected.is_some(), released.is_some()) {
            (false, false) => &sql.insert_record,
            (true, false) => &sql.update_record,
            (false, true) => &sql.insert_record_releasing,
            (true, true) => &sql.update_record_releasing,
        };
        let stmt = client.prepare_cached(statement).await.map_err(pg_error)?;
        let changed = if released.is_some() {
            let landed: i64 = client
                .query_one(&stmt, &params)
                .await
                .map_err(pg_error)?
                .get(0);
            u64::try_from(landed).unwrap_or(0)
        } else {
            client.execute(&stmt, &params).await.map_err(pg_error)?
        };
        if changed == 1 {
            return Ok(CasOutcome::Committed);
        }
        // Read after the failed guard: the record stored now (at least as new as
        // the one that failed it, since generations only move by CAS).
        let current = read_record(
            &client,
            &self.inner.sql.select_record,
            &self.inner.keyring,
            &record.id,
        )
        .await?;
        Ok(CasOutcome::Conflict(current))
    }

    async fn acquire_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        check_text("connection id", &id.0)?;
        check_text("worker id", &owner.0)?;
        let mut client = self.client().await?;
        let ask = LeaseAsk {
            id,
            owner,
            request,
            now,
            ttl,
            lock_key: format!("{}/{}", self.inner.sql.schema, id.0),
        };
        for n in 0..LEASE_ATTEMPTS {
            let optimistic = if n == 0 {
                self.first_attempt(&client, &ask).await?
            } else {
                self.try_acquire(&client, &ask, false).await?
            };
            let attempt = match optimistic {
                // No record: under the lock, in a transaction, so that no lease
                // can be granted, and a record inserted with its release, between
                // the read and the write.
                LeaseAttempt::NoRecord => {
                    // Read committed whatever the server's default: the read
                    // after the lock must see what committed before it.
                    let tx = client
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
                        .start()
                        .await
                        .map_err(pg_error)?;
                    let lock = tx
                        .prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                        .await
                        .map_err(pg_error)?;
                    tx.execute(&lock, &[&LEASE_LOCK, &ask.lock_key])
                        .await
                        .map_err(pg_error)?;
                    let attempt = self.try_acquire(&tx, &ask, true).await?;
                    tx.commit().await.map_err(pg_error)?;
                    attempt
                }
                attempt => attempt,
            };
            if let LeaseAttempt::Done(outcome) = attempt {
                return Ok(*outcome);
            }
        }
        Err(StoreError::Unavailable(format!(
            "PostgreSQL: the lease row of {} changed under {LEASE_ATTEMPTS} acquisitions in a row",
            id.0
        )))
    }

    async fn release_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> Result<(), StoreError> {
        check_text("connection id", &id.0)?;
        check_text("worker id", &owner.0)?;
        let client = self.client().await?;
        self.release(&client, id, owner, request, restore).await
    }

    async fn due_for_work(
        &self,
        now: Timestamp,
        lead: Duration,
        after: Option<DueWork>,
        limit: usize,
    ) -> Result<Vec<DueWork>, StoreError> {
        let q = row::due_query(now, lead, after, limit);
        let client = self.client().await?;
        let leases = row::time_to_sql(self.lease_now(&client, now).await?);
        let stmt = client
            .prepare_cached(&self.inner.sql.due)
            .await
            .map_err(pg_error)?;
        let rows = client
            .query(
                &stmt,
                &[
                    &q.keepalive_bound,
                    &q.now,
                    &q.lead,
                    &leases,
                    &q.after_at,
                    &q.after_id,
                    &q.limit,
                ],
            )
            .await
            .map_err(pg_error)?;
        let rows = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(column_error)?;
        Ok(row::due_work(rows))
    }

    async fn notices_due(
        &self,
        after: Option<Timestamp>,
        until: Timestamp,
        notice: Duration,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        let (low, high) = row::notice_bounds(after, until, notice);
        let client = self.client().await?;
        ids(&client, &self.inner.sql.notices, &[&low, &high]).await
    }

    async fn list(&self) -> Result<Vec<ConnectionId>, StoreError> {
        let client = self.client().await?;
        ids(&client, &self.inner.sql.list, &[]).await
    }

    async fn put_pending(
        &self,
        key: &str,
        pending: &PendingAuthorization,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let sealed = row::seal_pending(&self.inner.keyring, key, pending)?;
        let client = self.client().await?;
        let sql = &self.inner.sql;
        client
            .execute(&sql.purge_pending, &[&row::time_to_sql(now)])
            .await
            .map_err(pg_error)?;
        client
            .execute(
                &sql.put_pending,
                &[&key, &sealed, &row::time_to_sql(pending.expires_at)],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn take_pending(&self, key: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&self.inner.sql.take_pending, &[&key])
            .await
            .map_err(pg_error)?;
        row.map(|r| row::open_pending(&self.inner.keyring, key, &r.get::<_, Vec<u8>>(0)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;
    use tokio_postgres::config::SslMode;

    fn mode(url: &str) -> SslMode {
        parse_url(url).unwrap().get_ssl_mode()
    }

    #[test]
    fn tls_is_required_off_loopback_unless_the_url_says_otherwise() {
        assert_eq!(mode("postgres://u:p@db.example.com/t"), SslMode::Require);
        assert_eq!(mode("postgres://u:p@10.1.2.3:5432/t"), SslMode::Require);
        assert_eq!(
            mode("host=db.example.com user=u dbname=t"),
            SslMode::Require
        );
        assert_eq!(
            mode("postgres://u:p@db.example.com/t?sslmode=verify-full"),
            SslMode::Require
        );
        assert_eq!(
            mode("postgres://u:p@db.example.com/t?sslmode=prefer"),
            SslMode::Prefer
        );
        assert_eq!(
            mode("postgres://u:p@db.example.com/t?sslmode=disable"),
            SslMode::Disable
        );
        assert_eq!(mode("postgres://u:p@127.0.0.1:5432/t"), SslMode::Prefer);
        assert_eq!(mode("postgres://u:p@[::1]:5432/t"), SslMode::Prefer);
        assert_eq!(mode("postgres://u:p@localhost/t"), SslMode::Prefer);
        assert_eq!(mode("host=/var/run/postgresql user=u"), SslMode::Prefer);
        // One host off loopback is enough to require it.
        assert_eq!(
            mode("postgres://u:p@127.0.0.1,db.example.com/t"),
            SslMode::Require
        );
    }
}
