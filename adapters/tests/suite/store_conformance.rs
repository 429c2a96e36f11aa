//! Store conformance: every property is written once, as a generic async fn over a
//! [`Backend`], and run against MemoryStore, SqliteStore (a temp file) and
//! PostgresStore (a fresh schema per test in the database at `TOKENFENCE_PG_URL`).
//!
//! PostgreSQL is not optional: with `TOKENFENCE_PG_URL` unset the PostgreSQL tests
//! fail, unless `TOKENFENCE_SKIP_PG=1` says to skip them on purpose. Start a
//! throwaway server with `eval "$(scripts/postgres start)"`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenfence::crypto::{EncryptionKey, KeyId, Keyring};
use tokenfence::store::{
    CasOutcome, DueWork, LeaseClock, LeaseOutcome, MemoryStore, PostgresOptions, PostgresStore,
    SqliteStore, Store, StoreError,
};
use tokenfence_core::{
    days, AccessGrant, AccessToken, ConnectionId, ConnectionRecord, Environment, FailureKind,
    Generation, GrantIdentity, Lease, LeaseRequestId, PendingAuthorization, ReauthReason,
    RefreshToken, SecretString, Status, Timestamp, WorkerId,
};

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

const T0: Timestamp = Timestamp::from_secs(1_800_000_000);
const TTL: Duration = Duration::from_secs(30);

fn at(secs: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

fn id(s: &str) -> ConnectionId {
    ConnectionId(s.into())
}

fn worker(s: &str) -> WorkerId {
    WorkerId(s.into())
}

fn key(byte: u8) -> EncryptionKey {
    EncryptionKey::from_slice(&[byte; 32]).unwrap()
}

fn keyring() -> Keyring {
    Keyring::new(KeyId(1), key(1))
}

/// A record whose tokens name the connection and generation, so a record read
/// back from the wrong row or generation cannot pass for the right one.
fn record(conn: &str, generation: u64) -> ConnectionRecord {
    ConnectionRecord {
        id: id(conn),
        generation: Generation(generation),
        identity: GrantIdentity {
            provider: "intuit".into(),
            environment: Environment::Production,
            client_id: "ABclient".into(),
        },
        realm_id: Some("9130".into()),
        access: Some(AccessGrant {
            token: AccessToken::new(format!("AT-secret-{conn}-{generation}")),
            expires_at: at(generation.saturating_add(3600)),
        }),
        refresh: RefreshToken::new(format!("RT-secret-{conn}-{generation}")),
        refresh_issued_at: T0,
        idle_deadline: Some(T0.saturating_add(days(100))),
        hard_deadline: Some(T0.saturating_add(days(5 * 365))),
        in_doubt_since: None,
        in_doubt_holder: None,
        status: Status::Active,
        blocked_client: None,
        imported_at: None,
        last_refreshed_at: Some(T0),
        updated_at: at(generation),
    }
}

/// Something that opens stores over one shared place (a map, a file, a schema),
/// and for the encrypted backends reaches under the store to damage rows.
trait Backend: Sync {
    type S: Store;
    /// A store over the shared place, with the given keyring.
    async fn open(&self, keyring: Keyring) -> Arc<Self::S>;
    /// The raw sealed column of a row.
    async fn sealed(&self, id: &ConnectionId) -> Vec<u8>;
    /// Overwrites the raw sealed column of a row.
    async fn set_sealed(&self, id: &ConnectionId, sealed: &[u8]);
    /// The raw lease owner of a row, read without the store.
    async fn lease_owner(&self, id: &ConnectionId) -> Option<String>;
    /// Every byte the backend keeps, for leak checks.
    async fn raw_bytes(&self) -> Vec<u8>;
}

struct MemoryBackend(Arc<MemoryStore>);

impl MemoryBackend {
    fn new() -> Self {
        MemoryBackend(Arc::new(MemoryStore::new()))
    }
}

impl Backend for MemoryBackend {
    type S = MemoryStore;
    async fn open(&self, _: Keyring) -> Arc<MemoryStore> {
        Arc::clone(&self.0)
    }
    async fn sealed(&self, _: &ConnectionId) -> Vec<u8> {
        unreachable!("memory rows are not sealed")
    }
    async fn set_sealed(&self, _: &ConnectionId, _: &[u8]) {
        unreachable!("memory rows are not sealed")
    }
    async fn lease_owner(&self, _: &ConnectionId) -> Option<String> {
        unreachable!("memory rows are not sealed")
    }
    async fn raw_bytes(&self) -> Vec<u8> {
        unreachable!("memory rows are not sealed")
    }
}

struct SqliteBackend {
    dir: tempfile::TempDir,
}

impl SqliteBackend {
    fn new() -> Self {
        SqliteBackend {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("tokens.db")
    }

    fn raw(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.path()).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }
}

impl Backend for SqliteBackend {
    type S = SqliteStore;
    async fn open(&self, keyring: Keyring) -> Arc<SqliteStore> {
        Arc::new(SqliteStore::open(self.path(), keyring).unwrap())
    }
    async fn sealed(&self, id: &ConnectionId) -> Vec<u8> {
        self.raw()
            .query_row(
                "SELECT sealed FROM tokenfence_connections WHERE id = ?1",
                [&id.0],
                |r| r.get(0),
            )
            .unwrap()
    }
    async fn set_sealed(&self, id: &ConnectionId, sealed: &[u8]) {
        let n = self
            .raw()
            .execute(
                "UPDATE tokenfence_connections SET sealed = ?2 WHERE id = ?1",
                rusqlite::params![id.0, sealed],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    async fn lease_owner(&self, id: &ConnectionId) -> Option<String> {
        use rusqlite::OptionalExtension;
        self.raw()
            .query_row(
                "SELECT owner FROM tokenfence_leases WHERE id = ?1",
                [&id.0],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
    }
    async fn raw_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            all.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        all
    }
}

struct PgBackend {
    url: String,
    schema: String,
}

static SCHEMA_SEQ: AtomicU32 = AtomicU32::new(0);

impl PgBackend {
    /// A fresh schema in the test database; `None` only when the PostgreSQL tests
    /// are skipped on purpose.
    async fn new() -> Option<Self> {
        let Ok(url) = std::env::var("TOKENFENCE_PG_URL") else {
            if std::env::var("TOKENFENCE_SKIP_PG").as_deref() == Ok("1") {
                eprintln!("TOKENFENCE_SKIP_PG=1: skipping a PostgreSQL conformance test");
                return None;
            }
            panic!(
                "TOKENFENCE_PG_URL is not set, so the PostgreSQL store cannot be tested. \
                 Start a throwaway server with `eval \"$(scripts/postgres start)\"`, \
                 or set TOKENFENCE_SKIP_PG=1 to skip the PostgreSQL tests on purpose."
            );
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let schema = format!(
            "tf_test_{}_{}_{}",
            std::process::id(),
            nanos,
            SCHEMA_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Some(PgBackend { url, schema })
    }

    async fn raw(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    async fn drop_schema(&self) {
        self.raw()
            .await
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ))
            .await
            .unwrap();
    }
}

impl Backend for PgBackend {
    type S = PostgresStore;
    async fn open(&self, keyring: Keyring) -> Arc<PostgresStore> {
        // The suite injects time: leases on the callers' `now` (the database's
        // clock is the default, tested on its own below).
        let options = PostgresOptions {
            schema: self.schema.clone(),
            max_connections: 4,
            lease_clock: LeaseClock::Caller,
            ..PostgresOptions::default()
        };
        Arc::new(
            PostgresStore::connect_with(&self.url, keyring, options)
                .await
                .unwrap(),
        )
    }
    async fn sealed(&self, id: &ConnectionId) -> Vec<u8> {
        let sql = format!(
            "SELECT sealed FROM \"{}\".tokenfence_connections WHERE id = $1",
            self.schema
        );
        self.raw()
            .await
            .query_one(&sql, &[&id.0])
            .await
            .unwrap()
            .get(0)
    }
    async fn set_sealed(&self, id: &ConnectionId, sealed: &[u8]) {
        let sql = format!(
            "UPDATE \"{}\".tokenfence_connections SET sealed = $2 WHERE id = $1",
            self.schema
        );
        let n = self
            .raw()
            .await
            .execute(&sql, &[&id.0, &sealed])
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    async fn lease_owner(&self, id: &ConnectionId) -> Option<String> {
        let sql = format!(
            "SELECT owner FROM \"{}\".tokenfence_leases WHERE id = $1",
            self.schema
        );
        self.raw()
            .await
            .query_opt(&sql, &[&id.0])
            .await
            .unwrap()
            .map(|r| r.get(0))
    }
    async fn raw_bytes(&self) -> Vec<u8> {
        let client = self.raw().await;
        let mut all = Vec::new();
        for table in [
            "tokenfence_connections",
            "tokenfence_leases",
            "tokenfence_pending_authorizations",
        ] {
            let sql = format!(
                "SELECT convert_to(t::text, 'UTF8') FROM \"{}\".{table} t",
                self.schema
            );
            for row in client.query(&sql, &[]).await.unwrap() {
                all.extend(row.get::<_, Vec<u8>>(0));
            }
        }
        let sql = format!(
            "SELECT sealed FROM \"{}\".tokenfence_connections",
            self.schema
        );
        for row in client.query(&sql, &[]).await.unwrap() {
            all.extend(row.get::<_, Vec<u8>>(0));
        }
        let sql = format!(
            "SELECT sealed FROM \"{}\".tokenfence_pending_authorizations",
            self.schema
        );
        for row in client.query(&sql, &[]).await.unwrap() {
            all.extend(row.get::<_, Vec<u8>>(0));
        }
        all
    }
}

async fn committed(store: &impl Store, expected: Option<u64>, record: &ConnectionRecord) {
    let outcome = store
        .compare_and_swap(expected.map(Generation), record, None)
        .await
        .unwrap();
    assert_eq!(outcome, CasOutcome::Committed, "CAS of {:?}", record.id);
}

/// The request each owner acquires under unless a test says otherwise.
fn req(owner: &str) -> LeaseRequestId {
    LeaseRequestId(owner.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }))
}

async fn granted(
    store: &impl Store,
    conn: &str,
    owner: &str,
    now: Timestamp,
) -> (Lease, Option<ConnectionRecord>, Option<Lease>) {
    granted_as(store, conn, owner, req(owner), now).await
}

async fn granted_as(
    store: &impl Store,
    conn: &str,
    owner: &str,
    request: LeaseRequestId,
    now: Timestamp,
) -> (Lease, Option<ConnectionRecord>, Option<Lease>) {
    match store
        .acquire_lease(&id(conn), &worker(owner), request, now, TTL)
        .await
        .unwrap()
    {
        LeaseOutcome::Granted {
            lease,
            record,
            took_over,
        } => (lease, record, took_over),
        LeaseOutcome::Held(l) => panic!("{owner} expected the lease of {conn}, held by {l:?}"),
    }
}

/// What a grant reports as taken over.
/// The ids `due_for_work` reports, in id order (what is due, whatever its order;
/// the order itself is checked by `due_for_work_pages_by_due_time`).
async fn due(s: &dyn Store, now: Timestamp, lead: Duration, limit: usize) -> Vec<ConnectionId> {
    let mut ids: Vec<_> = s
        .due_for_work(now, lead, None, limit)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    ids.sort();
    ids
}

async fn took_over(
    store: &impl Store,
    conn: &str,
    owner: &str,
    request: LeaseRequestId,
    now: Timestamp,
) -> Option<Lease> {
    granted_as(store, conn, owner, request, now).await.2
}

async fn held(store: &impl Store, conn: &str, owner: &str, now: Timestamp) -> Lease {
    match store
        .acquire_lease(&id(conn), &worker(owner), req(owner), now, TTL)
        .await
        .unwrap()
    {
        LeaseOutcome::Held(l) => l,
        other => panic!("{owner} expected {conn}'s lease to be held, got {other:?}"),
    }
}

/// Releases `owner`'s lease of `conn` under its usual request, without restore.
async fn release(store: &impl Store, conn: &str, owner: &str) {
    store
        .release_lease(&id(conn), &worker(owner), req(owner), false)
        .await
        .unwrap();
}

/// `owner`'s lease under `request`.
fn lease_as(
    owner: &str,
    request: LeaseRequestId,
    acquired: Timestamp,
    generation: Option<u64>,
) -> Lease {
    Lease {
        request,
        ..lease(owner, acquired, generation)
    }
}

/// A chain of rows granted at one generation, as reported: the earliest row,
/// until the expiry of the latest one (`via`).
fn folded(earliest: Lease, via: &Lease) -> Lease {
    Lease {
        expires_at: via.expires_at,
        ..earliest
    }
}

fn lease(owner: &str, acquired: Timestamp, generation: Option<u64>) -> Lease {
    Lease {
        owner: worker(owner),
        acquired_at: acquired,
        expires_at: acquired.saturating_add(TTL),
        generation: generation.map(Generation),
        request: req(owner),
    }
}

// ---------------------------------------------------------------------------
// Properties every store has
// ---------------------------------------------------------------------------

async fn insert_only_if_absent<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    assert_eq!(s.load(&id("a")).await.unwrap(), None);
    committed(&*s, None, &record("a", 0)).await;
    assert_eq!(s.load(&id("a")).await.unwrap(), Some(record("a", 0)));
    // A second insert conflicts and reports what is stored; nothing changes.
    let mut other = record("a", 0);
    other.refresh = RefreshToken::new("RT-other");
    assert_eq!(
        s.compare_and_swap(None, &other, None).await.unwrap(),
        CasOutcome::Conflict(Some(record("a", 0)))
    );
    assert_eq!(s.load(&id("a")).await.unwrap(), Some(record("a", 0)));
}

async fn cas_success_and_conflict_return_current<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    committed(&*s, Some(0), &record("a", 1)).await;
    assert_eq!(s.load(&id("a")).await.unwrap(), Some(record("a", 1)));
    // Derived from g0, but g1 is stored: conflict with the g1 record, unchanged.
    let mut stale = record("a", 1);
    stale.refresh = RefreshToken::new("RT-stale");
    assert_eq!(
        s.compare_and_swap(Some(Generation(0)), &stale, None)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(record("a", 1)))
    );
    // Derived from a generation that was never stored.
    assert_eq!(
        s.compare_and_swap(Some(Generation(7)), &record("a", 8), None)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(record("a", 1)))
    );
    // An update of a connection that does not exist conflicts with nothing.
    assert_eq!(
        s.compare_and_swap(Some(Generation(0)), &record("b", 1), None)
            .await
            .unwrap(),
        CasOutcome::Conflict(None)
    );
    assert_eq!(s.load(&id("b")).await.unwrap(), None);
    assert_eq!(s.load(&id("a")).await.unwrap(), Some(record("a", 1)));
}

async fn generation_never_decreases<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    let mut seen = 0;
    for g in 1..=6u64 {
        committed(&*s, Some(g - 1), &record("a", g)).await;
        // Every stale writer, from any older generation, is refused.
        for old in 0..g {
            let outcome = s
                .compare_and_swap(Some(Generation(old)), &record("a", old + 1), None)
                .await
                .unwrap();
            assert_eq!(outcome, CasOutcome::Conflict(Some(record("a", g))));
            assert_eq!(
                s.compare_and_swap(None, &record("a", 0), None)
                    .await
                    .unwrap(),
                outcome
            );
        }
        let now = s.load(&id("a")).await.unwrap().unwrap().generation.0;
        assert!(now >= seen, "generation went from {seen} to {now}");
        assert_eq!(now, g);
        seen = now;
    }
}

async fn records_round_trip_exactly<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    let mut variants = Vec::new();
    let mut r = record("bare", 0);
    r.access = None;
    r.realm_id = None;
    r.idle_deadline = None;
    r.hard_deadline = None;
    r.last_refreshed_at = None;
    variants.push(r);
    let mut r = record("degraded", 3);
    r.status = Status::Degraded {
        failures: 4,
        retry_at: at(90),
        last: FailureKind::ServerError(503),
    };
    r.in_doubt_since = Some(at(12));
    variants.push(r);
    let mut r = record("reauth", 9);
    r.status = Status::ReauthRequired {
        reason: ReauthReason::LostRotation,
        since: at(5),
    };
    variants.push(r);
    let mut r = record("disconnected", 2);
    r.status = Status::Disconnected { at: at(1) };
    variants.push(r);
    let mut r = record("unicode: société ✓ \"quoted\" 'x' ; DROP TABLE", 1);
    r.refresh = RefreshToken::new("RT-".to_string() + &"x".repeat(4096));
    variants.push(r);
    let mut r = record("far-future", u64::MAX - 1);
    r.idle_deadline = Some(Timestamp::from_millis(u64::MAX));
    r.updated_at = Timestamp::from_millis(u64::MAX);
    variants.push(r);
    for r in &variants {
        committed(&*s, None, r).await;
    }
    for r in &variants {
        assert_eq!(s.load(&r.id).await.unwrap().as_ref(), Some(r));
    }
    // Generations at the top of the range still compare exactly.
    let mut top = record("far-future", u64::MAX);
    top.status = Status::Active;
    committed(&*s, Some(u64::MAX - 1), &top).await;
    assert_eq!(
        s.compare_and_swap(Some(Generation(u64::MAX - 1)), &top, None)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(top.clone()))
    );
}

async fn list_in_id_order<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    assert_eq!(s.list().await.unwrap(), vec![]);
    let names = [
        "b", "a", "B", "ä", "a b", "a-1", "a_1", "Z", "é", "😀", "10", "9",
    ];
    for n in names {
        committed(&*s, None, &record(n, 0)).await;
    }
    // A lease without a record is not a connection.
    granted(&*s, "lease-only", "w", T0).await;
    let mut expected: Vec<ConnectionId> = names.iter().map(|n| id(n)).collect();
    expected.sort(); // bytewise, like Rust's String order
    assert_eq!(s.list().await.unwrap(), expected);
}

async fn lease_held_expired_taken_over<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    // A lease on a connection with no record yet.
    let (l, r, took) = granted(&*s, "new", "A", T0).await;
    assert_eq!((l, r, took), (lease("A", T0, None), None, None));

    committed(&*s, None, &record("a", 0)).await;
    committed(&*s, Some(0), &record("a", 1)).await;
    let (l, r, took) = granted(&*s, "a", "A", T0).await;
    assert_eq!(l, lease("A", T0, Some(1)));
    assert_eq!(r, Some(record("a", 1)));
    assert_eq!(took, None);
    // Held: B sees A's lease exactly, until the last millisecond before expiry.
    assert_eq!(held(&*s, "a", "B", at(10)).await, lease("A", T0, Some(1)));
    let last = Timestamp::from_millis(T0.saturating_add(TTL).as_millis() - 1);
    assert_eq!(held(&*s, "a", "B", last).await, lease("A", T0, Some(1)));
    // The same owner may take it again under a new request (a restarted worker
    // reusing its id), and learns of its own unreleased row (find 1).
    let (l, _, took) = granted_as(&*s, "a", "A", LeaseRequestId(2), at(10)).await;
    assert_eq!(l, lease_as("A", LeaseRequestId(2), at(10), Some(1)));
    assert_eq!(took, Some(lease("A", T0, Some(1))));
    // Expired at exactly expires_at: B takes over and is told whose row it replaced
    // (A's second row, whose doubt runs from A's first grant: no commit between).
    let expiry = at(10).saturating_add(TTL);
    let (l, r, took) = granted(&*s, "a", "B", expiry).await;
    assert_eq!(l, lease("B", expiry, Some(1)));
    assert_eq!(r, Some(record("a", 1)));
    let a_from_t0 = folded(lease("A", T0, Some(1)), &lease("A", at(10), Some(1)));
    assert_eq!(took, Some(a_from_t0));
    // A's late release does not free B's lease.
    s.release_lease(&id("a"), &worker("A"), LeaseRequestId(2), false)
        .await
        .unwrap();
    release(&*s, "a", "A").await;
    assert_eq!(
        held(&*s, "a", "C", expiry).await,
        lease("B", expiry, Some(1))
    );
    // B's release frees it: C gets it with nothing taken over.
    release(&*s, "a", "B").await;
    let (l, _, took) = granted(&*s, "a", "C", expiry).await;
    assert_eq!((l, took), (lease("C", expiry, Some(1)), None));
    // The lease records the generation read with it.
    committed(&*s, Some(1), &record("a", 2)).await;
    release(&*s, "a", "C").await;
    let (l, r, _) = granted(&*s, "a", "D", expiry).await;
    assert_eq!(l.generation, Some(Generation(2)));
    assert_eq!(r, Some(record("a", 2)));
}

async fn release_by_non_owner_does_nothing<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    release(&*s, "nothing", "A").await;
    committed(&*s, None, &record("a", 0)).await;
    granted(&*s, "a", "A", T0).await;
    for intruder in ["B", "a", "A ", ""] {
        // Under its own request or under A's, with or without restore.
        for (request, restore) in [(req(intruder), false), (req("A"), true)] {
            s.release_lease(&id("a"), &worker(intruder), request, restore)
                .await
                .unwrap();
            assert_eq!(held(&*s, "a", "B", at(1)).await, lease("A", T0, Some(0)));
        }
    }
    // Not even after expiry: the row stays until taken over, and the next holder
    // is told about it.
    release(&*s, "a", "B").await;
    let (_, _, took) = granted(&*s, "a", "B", at(100)).await;
    assert_eq!(took, Some(lease("A", T0, Some(0))));
    // Releasing one connection's lease leaves another's alone.
    granted(&*s, "b", "B", at(100)).await;
    release(&*s, "a", "B").await;
    assert_eq!(
        held(&*s, "b", "X", at(101)).await,
        lease("B", at(100), None)
    );
}

/// Find 18: a lease request whose answer was lost is retried under the same
/// request id. The store recognises its own earlier grant and reports what that
/// grant displaced (B's abandoned row), never the requester's own row, under
/// which nothing was sent.
async fn retry_inherits_what_the_lost_grant_displaced<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    granted(&*s, "a", "B", T0).await;
    let r1 = LeaseRequestId(1);
    // A's grant displaces B's expired row; its answer is lost.
    let first = took_over(&*s, "a", "A", r1, at(30)).await;
    assert_eq!(first, Some(lease("B", T0, Some(0))));
    // The retries (before and after the lost grant expired) report B's row again.
    let (l, r, took) = granted_as(&*s, "a", "A", r1, at(31)).await;
    assert_eq!(l, lease_as("A", r1, at(31), Some(0)));
    assert_eq!(r, Some(record("a", 0)));
    assert_eq!(took, first);
    assert_eq!(took_over(&*s, "a", "A", r1, at(100)).await, first);
    // The retried grant excludes others like any other.
    assert_eq!(
        held(&*s, "a", "C", at(101)).await,
        lease_as("A", r1, at(100), Some(0))
    );
    // Once A releases it, the row is gone with what it displaced.
    s.release_lease(&id("a"), &worker("A"), r1, false)
        .await
        .unwrap();
    assert_eq!(took_over(&*s, "a", "C", req("C"), at(101)).await, None);
}

/// A retry of a grant that displaced nothing reports nothing, even after that
/// grant expired: nothing was sent under it.
async fn retry_without_displaced_row_reports_none<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    let r1 = LeaseRequestId(1);
    // With no record, and with one.
    assert_eq!(took_over(&*s, "new", "A", r1, T0).await, None);
    assert_eq!(took_over(&*s, "new", "A", r1, at(1)).await, None);
    committed(&*s, None, &record("a", 0)).await;
    assert_eq!(took_over(&*s, "a", "A", r1, T0).await, None);
    assert_eq!(took_over(&*s, "a", "A", r1, at(1)).await, None);
    assert_eq!(took_over(&*s, "a", "A", r1, at(500)).await, None);
    // Another worker taking the expired row over still learns of it.
    assert_eq!(
        took_over(&*s, "a", "B", req("B"), at(530)).await,
        Some(lease_as("A", r1, at(500), Some(0)))
    );
}

/// Find 1 stays closed: the same owner under a new request (a restarted worker
/// reusing its pinned id) learns of its own unreleased row; a retry of that new
/// request reports it again.
async fn same_owner_new_request_reports_its_own_row<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    granted_as(&*s, "a", "A", LeaseRequestId(1), T0).await;
    let mine = Some(lease_as("A", LeaseRequestId(1), T0, Some(0)));
    // Unexpired or expired, the old row is reported.
    assert_eq!(
        took_over(&*s, "a", "A", LeaseRequestId(2), at(5)).await,
        mine
    );
    assert_eq!(
        took_over(&*s, "a", "A", LeaseRequestId(2), at(6)).await,
        mine
    );
    // The old request's release is stale: it leaves the new grant in place.
    s.release_lease(&id("a"), &worker("A"), LeaseRequestId(1), false)
        .await
        .unwrap();
    assert_eq!(
        held(&*s, "a", "B", at(7)).await,
        lease_as("A", LeaseRequestId(2), at(6), Some(0))
    );
    // A third request reports the second row, its doubt running from the first
    // grant (both granted at generation 0, whatever was committed since).
    committed(&*s, Some(0), &record("a", 1)).await;
    assert_eq!(
        took_over(&*s, "a", "A", LeaseRequestId(3), at(8)).await,
        Some(folded(
            lease_as("A", LeaseRequestId(1), T0, Some(0)),
            &lease("A", at(6), Some(0))
        ))
    );
}

/// A release with restore puts back the row the grant displaced: the next worker
/// takes it over and is told of it (find 18: a lease given up without acting on
/// its takeover leaves the doubt to the next worker). Without a displaced row,
/// restore leaves none.
async fn release_with_restore_puts_back_the_displaced_row<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    let lead = days(14);
    committed(&*s, None, &record("a", 0)).await;
    granted(&*s, "a", "B", T0).await;
    let r1 = LeaseRequestId(1);
    let b_row = Some(lease("B", T0, Some(0)));
    assert_eq!(took_over(&*s, "a", "A", r1, at(40)).await, b_row);
    s.release_lease(&id("a"), &worker("A"), r1, true)
        .await
        .unwrap();
    // B's expired row is back: abandoned again, for the scan and the next worker.
    assert_eq!(due(&*s, at(41), lead, 10).await, vec![id("a")]);
    assert_eq!(took_over(&*s, "a", "C", req("C"), at(41)).await, b_row);
    // A restored row keeps its request: released by its holder, it is gone.
    release(&*s, "a", "C").await;
    granted(&*s, "a", "B", at(42)).await;
    assert_eq!(
        took_over(&*s, "a", "A", r1, at(100)).await,
        Some(lease("B", at(42), Some(0)))
    );
    s.release_lease(&id("a"), &worker("A"), r1, true)
        .await
        .unwrap();
    release(&*s, "a", "B").await;
    assert_eq!(took_over(&*s, "a", "C", req("C"), at(101)).await, None);
    // A restored row that has not expired excludes others again.
    committed(&*s, None, &record("b", 0)).await;
    granted_as(&*s, "b", "A", LeaseRequestId(1), T0).await;
    let a_first = Some(lease_as("A", LeaseRequestId(1), T0, Some(0)));
    assert_eq!(
        took_over(&*s, "b", "A", LeaseRequestId(2), at(1)).await,
        a_first
    );
    s.release_lease(&id("b"), &worker("A"), LeaseRequestId(2), true)
        .await
        .unwrap();
    assert_eq!(
        held(&*s, "b", "B", at(2)).await,
        lease_as("A", LeaseRequestId(1), T0, Some(0))
    );
    // With nothing displaced, restore releases like a plain release.
    granted(&*s, "c", "A", T0).await;
    s.release_lease(&id("c"), &worker("A"), req("A"), true)
        .await
        .unwrap();
    assert_eq!(took_over(&*s, "c", "B", req("B"), at(1)).await, None);
}

/// A compare-and-swap carrying `owner`'s release of its lease under `request`.
async fn cas_releasing(
    store: &impl Store,
    expected: Option<Generation>,
    record: &ConnectionRecord,
    owner: &str,
    request: LeaseRequestId,
    restore: bool,
) -> CasOutcome {
    let release = tokenfence_core::LeaseRelease {
        owner: worker(owner),
        request,
        restore,
    };
    store
        .compare_and_swap(expected, record, Some(&release))
        .await
        .unwrap()
}

/// A compare-and-swap carrying a release: when it commits, the lease is released
/// in the same step (the next worker is granted at once and told of no
/// takeover; with restore, the displaced row is back); when it conflicts, or the
/// release names another owner or request, the lease stays as it was.
async fn a_committed_swap_releases_the_lease_with_it<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    // Commits: released.
    committed(&*s, None, &record("a", 0)).await;
    granted(&*s, "a", "A", T0).await;
    let outcome = cas_releasing(
        &*s,
        Some(Generation(0)),
        &record("a", 1),
        "A",
        req("A"),
        false,
    )
    .await;
    assert_eq!(outcome, CasOutcome::Committed);
    assert_eq!(took_over(&*s, "a", "B", req("B"), at(1)).await, None);
    // Conflicts: nothing written, the lease still B's.
    let outcome = cas_releasing(
        &*s,
        Some(Generation(0)),
        &record("a", 1),
        "B",
        req("B"),
        false,
    )
    .await;
    assert!(matches!(outcome, CasOutcome::Conflict(Some(r)) if r.generation == Generation(1)));
    assert_eq!(held(&*s, "a", "C", at(2)).await, lease("B", at(1), Some(1)));
    // Another owner's or request's release: the swap commits, the lease stays.
    for (owner, request) in [("C", req("C")), ("B", LeaseRequestId(9))] {
        let g = s.load(&id("a")).await.unwrap().unwrap().generation.0;
        let outcome = cas_releasing(
            &*s,
            Some(Generation(g)),
            &record("a", g + 1),
            owner,
            request,
            true,
        )
        .await;
        assert_eq!(outcome, CasOutcome::Committed);
        assert_eq!(held(&*s, "a", "C", at(3)).await, lease("B", at(1), Some(1)));
    }
    // With restore: the row the grant displaced is back, for the next worker.
    committed(&*s, None, &record("b", 0)).await;
    granted(&*s, "b", "B", T0).await;
    let b_row = Some(lease("B", T0, Some(0)));
    assert_eq!(took_over(&*s, "b", "A", req("A"), at(40)).await, b_row);
    let outcome = cas_releasing(
        &*s,
        Some(Generation(0)),
        &record("b", 1),
        "A",
        req("A"),
        true,
    )
    .await;
    assert_eq!(outcome, CasOutcome::Committed);
    assert_eq!(took_over(&*s, "b", "C", req("C"), at(41)).await, b_row);
    // Inserting the first record releases too.
    granted(&*s, "c", "A", T0).await;
    let outcome = cas_releasing(&*s, None, &record("c", 0), "A", req("A"), false).await;
    assert_eq!(outcome, CasOutcome::Committed);
    assert_eq!(took_over(&*s, "c", "B", req("B"), at(1)).await, None);
}

/// A release under another request than the row's does nothing, with or without
/// restore, expired or not.
async fn release_with_wrong_request_does_nothing<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    granted(&*s, "a", "B", T0).await;
    let r1 = LeaseRequestId(1);
    let b_row = Some(lease("B", T0, Some(0)));
    assert_eq!(took_over(&*s, "a", "A", r1, at(30)).await, b_row);
    let a_row = lease_as("A", r1, at(30), Some(0));
    for restore in [false, true] {
        for request in [LeaseRequestId(2), LeaseRequestId(0), req("A"), req("B")] {
            s.release_lease(&id("a"), &worker("A"), request, restore)
                .await
                .unwrap();
            assert_eq!(held(&*s, "a", "C", at(31)).await, a_row);
        }
    }
    // Expired, it is still A's row, with B's behind it: the chain, from B's grant.
    let a_from_t0 = folded(lease("B", T0, Some(0)), &a_row);
    s.release_lease(&id("a"), &worker("A"), LeaseRequestId(2), true)
        .await
        .unwrap();
    assert_eq!(
        took_over(&*s, "a", "C", req("C"), at(60)).await,
        Some(a_from_t0)
    );
}

/// Chained takeovers: a grant displacing a row that had itself displaced one
/// granted at the same record generation (nothing committed between them)
/// reports the earliest row (its holder and request, from its start), until the
/// displaced row's expiry; after a commit between them, the displaced row alone.
async fn chained_takeovers_report_the_earliest_start<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    granted(&*s, "a", "B", T0).await;
    assert_eq!(
        took_over(&*s, "a", "A", req("A"), at(30)).await,
        Some(lease("B", T0, Some(0)))
    );
    // C displaces A's row (never released): the doubt runs from B's grant, and
    // only B can say whether it sent: B's row is reported, until A's expiry.
    let a_from_t0 = folded(lease("B", T0, Some(0)), &lease("A", at(30), Some(0)));
    assert_eq!(
        took_over(&*s, "a", "C", req("C"), at(60)).await,
        Some(a_from_t0.clone())
    );
    // And on down the chain, as long as nothing is committed.
    assert_eq!(
        took_over(&*s, "a", "D", req("D"), at(90)).await,
        Some(folded(
            lease("B", T0, Some(0)),
            &lease("C", at(60), Some(0))
        ))
    );
    // A retry in the chain inherits the chained row unchanged.
    assert_eq!(
        took_over(&*s, "a", "D", req("D"), at(95)).await,
        Some(folded(
            lease("B", T0, Some(0)),
            &lease("C", at(60), Some(0))
        ))
    );
    // A commit between two grants breaks the chain.
    committed(&*s, None, &record("b", 0)).await;
    granted(&*s, "b", "B", T0).await;
    committed(&*s, Some(0), &record("b", 1)).await;
    assert_eq!(
        took_over(&*s, "b", "A", req("A"), at(30)).await,
        Some(lease("B", T0, Some(0)))
    );
    assert_eq!(
        took_over(&*s, "b", "C", req("C"), at(60)).await,
        Some(lease("A", at(30), Some(1)))
    );
    // A restored chained row is the displaced row as reported, and chains no more.
    committed(&*s, None, &record("c", 0)).await;
    granted(&*s, "c", "B", T0).await;
    granted(&*s, "c", "A", at(30)).await;
    let r9 = LeaseRequestId(9);
    assert_eq!(
        took_over(&*s, "c", "C", r9, at(60)).await,
        Some(a_from_t0.clone())
    );
    s.release_lease(&id("c"), &worker("C"), r9, true)
        .await
        .unwrap();
    assert_eq!(
        took_over(&*s, "c", "D", req("D"), at(61)).await,
        Some(a_from_t0)
    );
}

/// A UTC midnight ten days after T0 (SQLite indexes idle deadlines by their day).
fn midnight() -> Timestamp {
    const DAY: u64 = 86_400_000;
    Timestamp::from_millis((T0.as_millis() / DAY + 10) * DAY)
}

/// An idle deadline the provider moves earlier, across a UTC midnight (SQLite
/// indexes the deadline's day): the keep-alive scan follows the new deadline.
async fn keepalive_follows_a_deadline_moved_earlier<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    let (midnight, hour) = (midnight(), Duration::from_secs(3600));
    let mut r = record("moved", 0);
    r.idle_deadline = Some(midnight.saturating_add(hour));
    committed(&*s, None, &r).await;
    let mut earlier = record("moved", 1);
    earlier.idle_deadline = Some(midnight.saturating_sub(hour));
    committed(&*s, Some(0), &earlier).await;
    let before = midnight.saturating_sub(hour * 2);
    assert!(due(&*s, before, Duration::ZERO, 10).await.is_empty());
    let after = midnight.saturating_sub(hour / 2);
    assert_eq!(due(&*s, after, Duration::ZERO, 10).await, vec![id("moved")]);
}

async fn due_for_work_finds_keepalive_and_abandoned<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    // Last refreshed 90 days before T0; idle deadlines some days after it.
    let refreshed = T0.saturating_sub(days(90));
    let with_idle = |n: &str, idle_days: Option<u64>| {
        let mut r = record(n, 0);
        r.refresh_issued_at = refreshed;
        r.last_refreshed_at = Some(refreshed);
        r.idle_deadline = idle_days.map(|d| T0.saturating_add(days(d)));
        r
    };
    committed(&*s, None, &with_idle("idle-100d", Some(100))).await;
    committed(&*s, None, &with_idle("idle-10d", Some(10))).await;
    // Never refreshed: the window counts from when the token was issued.
    let mut never = with_idle("idle-1d", Some(1));
    never.last_refreshed_at = None;
    committed(&*s, None, &never).await;
    committed(&*s, None, &with_idle("no-idle", None)).await;
    // Refreshed just now with a short window: not due before half of it passed,
    // however long the lead (no keep-alive storm).
    let mut fresh = with_idle("fresh-idle-10d", Some(10));
    fresh.last_refreshed_at = Some(T0);
    committed(&*s, None, &fresh).await;
    let mut dead = with_idle("dead-idle-1d", Some(1));
    dead.status = Status::ReauthRequired {
        reason: ReauthReason::InvalidGrant,
        since: T0,
    };
    committed(&*s, None, &dead).await;
    let mut gone = with_idle("disconnected-idle-1d", Some(1));
    gone.status = Status::Disconnected { at: T0 };
    committed(&*s, None, &gone).await;
    let mut degraded = with_idle("degraded-idle-1d", Some(1));
    degraded.status = Status::Degraded {
        failures: 1,
        retry_at: at(60),
        last: FailureKind::RateLimited,
    };
    committed(&*s, None, &degraded).await;
    let lead = days(14);
    let ids = |v: &[&str]| v.iter().map(|n| id(n)).collect::<Vec<_>>();

    // Keep-alive: live records whose idle deadline is within `lead`.
    assert_eq!(
        due(&*s, T0, lead, 100).await,
        ids(&["degraded-idle-1d", "idle-10d", "idle-1d"])
    );
    // The boundary is inclusive: due at exactly idle_deadline - lead.
    let boundary = T0.saturating_add(days(100)).saturating_sub(lead);
    let before = Timestamp::from_millis(boundary.as_millis() - 1);
    assert!(!due(&*s, before, lead, 100).await.contains(&id("idle-100d")));
    assert!(due(&*s, boundary, lead, 100)
        .await
        .contains(&id("idle-100d")));
    // A lead longer than the time left saturates, but keep-alive still waits for
    // half the idle window since the last refresh: idle-100d's window is 190 days
    // from T0 - 90d, so not before T0 + 5d; fresh-idle-10d not before T0 + 5d.
    assert_eq!(
        due(&*s, T0, days(100_000), 2).await,
        ids(&["degraded-idle-1d", "idle-1d"])
    );
    let halfway = T0.saturating_add(days(5));
    let just_before = Timestamp::from_millis(halfway.as_millis() - 1);
    assert_eq!(
        due(&*s, just_before, days(100_000), 100).await,
        ids(&["degraded-idle-1d", "idle-10d", "idle-1d"])
    );
    assert_eq!(
        due(&*s, halfway, days(100_000), 100).await,
        ids(&[
            "degraded-idle-1d",
            "fresh-idle-10d",
            "idle-100d",
            "idle-10d",
            "idle-1d"
        ])
    );
    assert_eq!(
        due(&*s, halfway, Duration::ZERO, 100).await,
        ids(&["degraded-idle-1d", "idle-1d"])
    );

    // Abandoned leases: expired and never released, with or without a record.
    granted(&*s, "no-idle", "A", T0).await;
    granted(&*s, "lease-only", "A", T0).await;
    granted(&*s, "idle-10d", "A", T0).await;
    granted(&*s, "idle-100d", "A", T0).await;
    release(&*s, "idle-100d", "A").await;
    assert_eq!(
        due(&*s, at(29), lead, 100).await,
        ids(&["degraded-idle-1d", "idle-10d", "idle-1d"])
    );
    assert_eq!(
        due(&*s, at(30), lead, 100).await,
        ids(&[
            "degraded-idle-1d",
            "idle-10d",
            "idle-1d",
            "lease-only",
            "no-idle"
        ])
    );
    // At most `limit`, the earliest due (T0 - 13 d for both; idle-10d at T0 - 4 d).
    assert_eq!(
        due(&*s, at(30), lead, 2).await,
        ids(&["degraded-idle-1d", "idle-1d"])
    );
    assert_eq!(due(&*s, at(30), lead, 0).await, ids(&[]));
    // A record that stops being live stops being due for keep-alive.
    let mut r = never.clone();
    r.generation = Generation(1);
    r.status = Status::Disconnected { at: T0 };
    committed(&*s, Some(0), &r).await;
    assert_eq!(
        due(&*s, T0, lead, 100).await,
        ids(&["degraded-idle-1d", "idle-10d"])
    );
}

/// A record that says a refresh may have rotated its token unseen is due at once,
/// whatever its keep-alive instant: a doubt left by a process that stopped must be
/// resolved by another while the provider's grace window is open. A degraded
/// record is due at its retry time, so that it recovers without a caller.
async fn due_for_work_finds_records_in_doubt<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    let ids = |v: &[&str]| v.iter().map(|n| id(n)).collect::<Vec<_>>();
    let lead = days(14);
    // Keep-alive far away (idle deadline 100 days out, refreshed at T0).
    let mut doubt = record("in-doubt", 0);
    doubt.in_doubt_since = Some(at(10));
    committed(&*s, None, &doubt).await;
    let mut no_idle = record("in-doubt-no-idle", 0);
    no_idle.idle_deadline = None;
    no_idle.in_doubt_since = Some(at(10));
    committed(&*s, None, &no_idle).await;
    let mut dead = record("in-doubt-dead", 0);
    dead.in_doubt_since = Some(at(10));
    dead.status = Status::ReauthRequired {
        reason: ReauthReason::LostRotation,
        since: at(10),
    };
    committed(&*s, None, &dead).await;
    committed(&*s, None, &record("sure", 0)).await;
    let mut degraded = record("degraded-retry-15", 0);
    degraded.status = Status::Degraded {
        failures: 2,
        retry_at: at(15),
        last: FailureKind::ServerError(503),
    };
    committed(&*s, None, &degraded).await;

    assert_eq!(due(&*s, at(9), lead, 100).await, ids(&[]));
    assert_eq!(
        due(&*s, at(10), lead, 100).await,
        ids(&["in-doubt", "in-doubt-no-idle"])
    );
    // The doubt resolved: no longer due.
    let mut resolved = doubt.clone();
    resolved.generation = Generation(1);
    resolved.in_doubt_since = None;
    committed(&*s, Some(0), &resolved).await;
    assert_eq!(
        due(&*s, at(10), lead, 100).await,
        ids(&["in-doubt-no-idle"])
    );
    // A doubt that arises on a later write makes the row due again.
    let mut again = resolved.clone();
    again.generation = Generation(2);
    again.in_doubt_since = Some(at(20));
    committed(&*s, Some(1), &again).await;
    assert_eq!(
        due(&*s, at(14), lead, 100).await,
        ids(&["in-doubt-no-idle"])
    );
    assert_eq!(
        due(&*s, at(15), lead, 100).await,
        ids(&["degraded-retry-15", "in-doubt-no-idle"])
    );
    assert_eq!(
        due(&*s, at(20), lead, 100).await,
        ids(&["degraded-retry-15", "in-doubt", "in-doubt-no-idle"])
    );
}

/// Due work comes earliest first (ties by id), whatever the ids, each connection
/// once at the earliest of its instants (keep-alive, doubt, abandoned lease), and
/// keyset pages (`after` = the last of the previous page) cover it exactly: a scan
/// pages past rows it cannot work instead of meeting them at the head forever.
async fn due_for_work_pages_by_due_time<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    let lead = days(14);
    let in_doubt = |n: &str, since: u64| {
        let mut r = record(n, 0);
        r.in_doubt_since = Some(at(since));
        r
    };
    // Ids in the reverse order of their due times.
    for (n, since) in [
        ("z-doubt-1", 1),
        ("y-doubt-2", 2),
        ("x-tie-3", 3),
        ("w-tie-3", 3),
        ("c-doubt-20-lease-30", 20),
        ("d-not-yet", 50),
    ] {
        committed(&*s, None, &in_doubt(n, since)).await;
    }
    // Keep-alive due at max(idle deadline - lead, halfway) = T0 - 13 d.
    let mut idle = record("b-keepalive", 0);
    idle.refresh_issued_at = T0.saturating_sub(days(90));
    idle.last_refreshed_at = Some(idle.refresh_issued_at);
    idle.idle_deadline = Some(T0.saturating_add(days(1)));
    committed(&*s, None, &idle).await;
    // Leases granted at T0 expire at T0 + 30 s.
    granted(&*s, "a-lease-30", "A", T0).await;
    granted(&*s, "c-doubt-20-lease-30", "A", T0).await;

    let now = at(40);
    let all = s.due_for_work(now, lead, None, 100).await.unwrap();
    let expected: Vec<DueWork> = [
        ("b-keepalive", T0.saturating_sub(days(13))),
        ("z-doubt-1", at(1)),
        ("y-doubt-2", at(2)),
        ("w-tie-3", at(3)),
        ("x-tie-3", at(3)),
        ("c-doubt-20-lease-30", at(20)),
        ("a-lease-30", at(30)),
    ]
    .into_iter()
    .map(|(n, t)| DueWork { at: t, id: id(n) })
    .collect();
    assert_eq!(all, expected);
    for limit in 1..=3 {
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = s.due_for_work(now, lead, after, limit).await.unwrap();
            assert!(page.len() <= limit);
            after = page.last().cloned();
            let done = page.len() < limit;
            paged.extend(page);
            if done {
                break;
            }
        }
        assert_eq!(paged, expected, "pages of {limit}");
    }
    // A page starts strictly after its cursor, also within a tie.
    let after_w = DueWork {
        at: at(3),
        id: id("w-tie-3"),
    };
    assert_eq!(
        s.due_for_work(now, lead, Some(after_w), 1).await.unwrap(),
        expected[4..5]
    );
}

/// Live connections whose notice instant (hard deadline - notice) falls in the
/// window, each window boundary exclusive below and inclusive above.
async fn notices_due_reports_each_notice_in_its_window<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    let ids = |v: &[&str]| v.iter().map(|n| id(n)).collect::<Vec<_>>();
    let notice = days(60);
    let with_deadline = |n: &str, secs: Option<u64>| {
        let mut r = record(n, 0);
        r.hard_deadline = secs.map(|x| at(x).saturating_add(notice));
        r
    };
    // Notice instants at T0+10 s, T0+20 s, T0+30 s; none; and a dead one at T0+10 s.
    committed(&*s, None, &with_deadline("b-notice-20", Some(20))).await;
    committed(&*s, None, &with_deadline("a-notice-10", Some(10))).await;
    committed(&*s, None, &with_deadline("c-notice-30", Some(30))).await;
    committed(&*s, None, &with_deadline("d-no-deadline", None)).await;
    let mut dead = with_deadline("e-dead-10", Some(10));
    dead.status = Status::ReauthRequired {
        reason: ReauthReason::InvalidGrant,
        since: T0,
    };
    committed(&*s, None, &dead).await;

    // A first pass: everything due by now.
    assert_eq!(s.notices_due(None, at(9), notice).await.unwrap(), ids(&[]));
    assert_eq!(
        s.notices_due(None, at(20), notice).await.unwrap(),
        ids(&["a-notice-10", "b-notice-20"])
    );
    // Later passes: only what came due since.
    assert_eq!(
        s.notices_due(Some(at(20)), at(29), notice).await.unwrap(),
        ids(&[])
    );
    assert_eq!(
        s.notices_due(Some(at(20)), at(30), notice).await.unwrap(),
        ids(&["c-notice-30"])
    );
    assert_eq!(
        s.notices_due(Some(at(10)), at(30), notice).await.unwrap(),
        ids(&["b-notice-20", "c-notice-30"])
    );
    // A reconnection moves the deadline out of the window.
    let mut moved = with_deadline("c-notice-30", Some(1_000));
    moved.generation = Generation(1);
    committed(&*s, Some(0), &moved).await;
    assert_eq!(
        s.notices_due(Some(at(20)), at(30), notice).await.unwrap(),
        ids(&[])
    );
}

async fn concurrent_cas_has_one_winner_per_generation<B: Backend>(b: &B) {
    const TASKS: usize = 8;
    const TARGET: u64 = 30;
    // Two stores over the same place, like two processes.
    let stores = [b.open(keyring()).await, b.open(keyring()).await];
    committed(&*stores[0], None, &record("hot", 0)).await;
    let winners = Arc::new(Mutex::new(BTreeMap::<u64, Vec<usize>>::new()));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = Arc::clone(&stores[t % 2]);
        let winners = Arc::clone(&winners);
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u32;
            loop {
                let current = s.load(&id("hot")).await.unwrap().unwrap();
                let g = current.generation.0;
                if g >= TARGET {
                    return conflicts;
                }
                let mut next = record("hot", g + 1);
                next.refresh = RefreshToken::new(format!("RT-task-{t}-g{}", g + 1));
                match s
                    .compare_and_swap(Some(Generation(g)), &next, None)
                    .await
                    .unwrap()
                {
                    CasOutcome::Committed => {
                        winners.lock().unwrap().entry(g + 1).or_default().push(t);
                    }
                    CasOutcome::Conflict(now) => {
                        let now = now.unwrap();
                        assert!(
                            now.generation.0 > g,
                            "conflict at g{g} reported g{}",
                            now.generation.0
                        );
                        conflicts += 1;
                    }
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let winners = winners.lock().unwrap().clone();
    assert_eq!(
        winners.keys().copied().collect::<Vec<_>>(),
        (1..=TARGET).collect::<Vec<_>>()
    );
    for (g, w) in winners.iter() {
        assert_eq!(w.len(), 1, "generation {g} was committed by tasks {w:?}");
    }
    let last = winners[&TARGET][0];
    let stored = stores[1].load(&id("hot")).await.unwrap().unwrap();
    assert_eq!(stored.generation, Generation(TARGET));
    assert_eq!(stored.refresh.expose(), format!("RT-task-{last}-g{TARGET}"));
    eprintln!("{TASKS} tasks, {TARGET} generations, {conflicts} conflicts");
}

/// Twelve workers of two store handles ask for the lease of one record at once,
/// first while it has no lease row (every ask inserts), then, after the winner's
/// lease expired, to take over that row (every ask replaces it): each time
/// exactly one is granted, and the others are told of the winner.
async fn concurrent_lease_has_one_holder<B: Backend>(b: &B) {
    let stores = [b.open(keyring()).await, b.open(keyring()).await];
    committed(&*stores[0], None, &record("hot", 4)).await;
    let first = race_for_lease(&stores, T0, 0, None).await;
    race_for_lease(&stores, at(2 * TTL.as_secs()), 100, Some(first)).await;
}

/// The race of [`concurrent_lease_has_one_holder`] at `now`, the workers asking
/// under requests from `request`; `before` is the lease the winner must report
/// it took over. Returns the winner's lease.
async fn race_for_lease<S: Store + 'static>(
    stores: &[Arc<S>; 2],
    now: Timestamp,
    request: u64,
    before: Option<Lease>,
) -> Lease {
    const TASKS: usize = 12;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = Arc::clone(&stores[t % 2]);
        tasks.push(tokio::spawn(async move {
            s.acquire_lease(
                &id("hot"),
                &worker(&format!("w{t}")),
                LeaseRequestId(request + t as u64),
                now,
                TTL,
            )
            .await
            .unwrap()
        }));
    }
    let mut winner = None;
    let mut holders = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            LeaseOutcome::Granted {
                lease,
                record,
                took_over,
            } => {
                assert!(winner.is_none(), "two grants: {winner:?} and {lease:?}");
                assert_eq!(record, Some(record_of(4)));
                assert_eq!(took_over, before);
                winner = Some(lease);
            }
            LeaseOutcome::Held(l) => holders.push(l),
        }
    }
    let winner = winner.expect("nobody got the lease");
    assert_eq!(holders.len(), TASKS - 1);
    assert!(
        holders.iter().all(|h| *h == winner),
        "{holders:?} vs {winner:?}"
    );
    winner
}

/// Workers of two store handles take turns at one record as a refresh does: take
/// the lease, then commit on the generation the grant read, releasing the lease in
/// the same step. A grant must read the record as it is when the lease is granted:
/// no one else can commit while the lease is held, so every such commit lands.
/// (A grant that read the record before another worker's whole turn — lease, commit
/// and release between its read and its write — would carry a generation already
/// replaced, and its commit would conflict.)
async fn lease_holders_commit_on_what_their_grant_read<B: Backend>(b: &B) {
    take_turns(b, true).await;
}

/// The same from no record: the first turn inserts it, releasing its lease. A
/// grant that read "no record" after that insert would conflict.
async fn lease_holders_commit_on_what_their_grant_read_from_no_record<B: Backend>(b: &B) {
    take_turns(b, false).await;
}

async fn take_turns<B: Backend>(b: &B, with_record: bool) {
    const TASKS: usize = 6;
    const TURNS: usize = 40;
    let stores = [b.open(keyring()).await, b.open(keyring()).await];
    if with_record {
        committed(&*stores[0], None, &record("turns", 0)).await;
    }
    // A conflicting commit leaves its lease held for good (the clock stands
    // still): every task stops at the first one.
    let stale = Arc::new(Mutex::new(None));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = Arc::clone(&stores[t % 2]);
        let stale = Arc::clone(&stale);
        tasks.push(tokio::spawn(async move {
            let me = worker(&format!("w{t}"));
            let (mut turns, mut asks) = (0, 0_u64);
            while turns < TURNS && stale.lock().unwrap().is_none() {
                asks += 1;
                let request = LeaseRequestId(((t as u64) << 32) | asks);
                let outcome = s
                    .acquire_lease(&id("turns"), &me, request, T0, TTL)
                    .await
                    .unwrap();
                let LeaseOutcome::Granted { record: read, .. } = outcome else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let read = read.map(|r| r.generation);
                let next = read.map_or(0, |g| g.0 + 1);
                let release = tokenfence_core::LeaseRelease {
                    owner: me.clone(),
                    request,
                    restore: false,
                };
                let swap = s
                    .compare_and_swap(read, &record("turns", next), Some(&release))
                    .await
                    .unwrap();
                if swap != CasOutcome::Committed {
                    *stale.lock().unwrap() = Some(format!("w{t}'s grant read {read:?}: {swap:?}"));
                }
                turns += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*stale.lock().unwrap(), None);
    let stored = stores[0].load(&id("turns")).await.unwrap().unwrap();
    let turns = (TASKS * TURNS) as u64;
    assert_eq!(
        stored.generation,
        Generation(turns - u64::from(!with_record))
    );
}

fn record_of(g: u64) -> ConnectionRecord {
    record("hot", g)
}

// ---------------------------------------------------------------------------
// Properties of the sealed (SQL) stores
// ---------------------------------------------------------------------------

/// Every way a store can find `id` unreadable, each checked to leave the row as
/// it was and to be `StoreError::Corrupt` naming the connection.
async fn assert_corrupt_and_unchanged<B: Backend>(b: &B, s: &B::S, conn: &str, expect: &str) {
    let before = b.sealed(&id(conn)).await;
    let lease_before = b.lease_owner(&id(conn)).await;
    let check = |what: &str, e: StoreError| match e {
        StoreError::Corrupt { id: got, reason } => {
            assert_eq!(got, id(conn), "{what}");
            assert!(
                reason.contains(expect),
                "{what}: `{reason}` lacks `{expect}`"
            );
            let shown = format!(
                "{} {:?}",
                StoreError::Corrupt {
                    id: got,
                    reason: reason.clone()
                },
                reason
            );
            assert!(!shown.contains("secret"), "{what} shows a secret: {shown}");
        }
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    };
    check("load", s.load(&id(conn)).await.unwrap_err());
    check(
        "acquire_lease",
        s.acquire_lease(
            &id(conn),
            &worker("intruder"),
            req("intruder"),
            at(10_000),
            TTL,
        )
        .await
        .unwrap_err(),
    );
    check(
        "insert conflict",
        s.compare_and_swap(None, &record(conn, 0), None)
            .await
            .unwrap_err(),
    );
    check(
        "update conflict",
        s.compare_and_swap(Some(Generation(999)), &record(conn, 1000), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(b.sealed(&id(conn)).await, before, "the row was changed");
    assert_eq!(
        b.lease_owner(&id(conn)).await,
        lease_before,
        "the lease was changed"
    );
    // The store still lists and schedules around the bad row.
    assert!(s.list().await.unwrap().contains(&id(conn)));
}

async fn corrupt_ciphertext_is_refused<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    granted(&*s, "a", "owner", T0).await;
    let mut sealed = b.sealed(&id("a")).await;
    let mid = sealed.len() / 2;
    sealed[mid] ^= 0x01;
    b.set_sealed(&id("a"), &sealed).await;
    assert_corrupt_and_unchanged(b, &s, "a", "failed authentication").await;
    assert_eq!(b.lease_owner(&id("a")).await.as_deref(), Some("owner"));
}

async fn truncated_blob_is_refused<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("short", 0)).await;
    committed(&*s, None, &record("cut", 0)).await;
    committed(&*s, None, &record("empty", 0)).await;
    let sealed = b.sealed(&id("short")).await;
    b.set_sealed(&id("short"), &sealed[..10]).await;
    assert_corrupt_and_unchanged(b, &s, "short", "truncated").await;
    let sealed = b.sealed(&id("cut")).await;
    b.set_sealed(&id("cut"), &sealed[..sealed.len() - 20]).await;
    assert_corrupt_and_unchanged(b, &s, "cut", "failed authentication").await;
    b.set_sealed(&id("empty"), &[]).await;
    assert_corrupt_and_unchanged(b, &s, "empty", "truncated").await;
}

async fn ciphertext_swapped_from_another_row_is_refused<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("victim", 0)).await;
    committed(&*s, None, &record("attacker", 0)).await;
    let theirs = b.sealed(&id("attacker")).await;
    b.set_sealed(&id("victim"), &theirs).await;
    assert_corrupt_and_unchanged(b, &s, "victim", "another connection").await;
    // The row it came from is still fine.
    assert_eq!(
        s.load(&id("attacker")).await.unwrap(),
        Some(record("attacker", 0))
    );
}

async fn old_ciphertext_restored_is_refused<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    let old = b.sealed(&id("a")).await;
    committed(&*s, Some(0), &record("a", 1)).await;
    b.set_sealed(&id("a"), &old).await;
    assert_corrupt_and_unchanged(b, &s, "a", "old ciphertext").await;
}

async fn wrong_key_is_refused<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    committed(&*s, None, &record("a", 0)).await;
    // Same key id, other key material.
    let wrong = b.open(Keyring::new(KeyId(1), key(2))).await;
    assert_corrupt_and_unchanged(b, &wrong, "a", "failed authentication").await;
    // A keyring that lacks the key id altogether.
    let other = b.open(Keyring::new(KeyId(2), key(1))).await;
    assert_corrupt_and_unchanged(b, &other, "a", "key id 1").await;
    // The right key still reads it.
    assert_eq!(s.load(&id("a")).await.unwrap(), Some(record("a", 0)));
}

async fn keys_rotate<B: Backend>(b: &B) {
    let old = b.open(keyring()).await;
    committed(&*old, None, &record("a", 0)).await;
    committed(&*old, None, &record("b", 0)).await;
    committed(&*old, None, &record("c", 0)).await;
    assert_eq!(
        Keyring::key_id_of(&b.sealed(&id("a")).await).unwrap(),
        KeyId(1)
    );
    let both = keyring().with_key(KeyId(2), key(2)).unwrap();
    let s = b.open(both).await;
    // Old rows open; new writes use the newest key.
    assert_eq!(s.load(&id("a")).await.unwrap(), Some(record("a", 0)));
    committed(&*s, Some(0), &record("a", 1)).await;
    assert_eq!(
        Keyring::key_id_of(&b.sealed(&id("a")).await).unwrap(),
        KeyId(2)
    );
    assert_eq!(
        Keyring::key_id_of(&b.sealed(&id("b")).await).unwrap(),
        KeyId(1)
    );
}

async fn reencrypt_all_moves_rows_to_the_newest_key<B: Backend>(
    b: &B,
    reencrypt: impl AsyncFn(&B::S) -> Result<usize, StoreError>,
) {
    let old = b.open(keyring()).await;
    for n in ["a", "b", "c"] {
        committed(&*old, None, &record(n, 0)).await;
    }
    // More rows than one batch of the streaming pass (500), on either side of them.
    let bulk: Vec<String> = (0..1_100).map(|i| format!("bulk-{i:04}")).collect();
    for n in &bulk {
        committed(&*old, None, &record(n, 0)).await;
    }
    // Stage 1 of a roll-out: key 2 opens but does not seal yet.
    let stage1 = Keyring::from_spec(&format!(
        "2:{}:open,1:{}",
        key(2).to_base64().as_str(),
        key(1).to_base64().as_str()
    ))
    .unwrap();
    assert_eq!(stage1.current(), KeyId(1));
    let both = keyring().with_key(KeyId(2), key(2)).unwrap();
    let s = b.open(both).await;
    committed(&*s, Some(0), &record("b", 1)).await;
    let s1 = b.open(stage1).await;
    assert_eq!(
        s1.load(&id("b")).await.unwrap(),
        Some(record("b", 1)),
        "stage 1 opens key 2"
    );
    committed(&*s1, Some(0), &record("c", 1)).await;
    assert_eq!(
        Keyring::key_id_of(&b.sealed(&id("c")).await).unwrap(),
        KeyId(1),
        "stage 1 seals with key 1"
    );
    // A re-encryption run by a stage-1 process moves nothing: not the rows under
    // key 1 (its sealing key), and not back the one a stage-2 process sealed
    // with key 2 (dropping key 1 later would make it unreadable).
    assert_eq!(reencrypt(&s1).await.unwrap(), 0);
    assert_eq!(
        Keyring::key_id_of(&b.sealed(&id("b")).await).unwrap(),
        KeyId(2)
    );
    assert_eq!(reencrypt(&s).await.unwrap(), 2 + bulk.len());
    assert_eq!(reencrypt(&s).await.unwrap(), 0);
    let only_new = b.open(Keyring::new(KeyId(2), key(2))).await;
    for n in [&bulk[0], &bulk[499], &bulk[500], &bulk[1_099]] {
        assert_eq!(only_new.load(&id(n)).await.unwrap(), Some(record(n, 0)));
    }
    assert_eq!(only_new.load(&id("a")).await.unwrap(), Some(record("a", 0)));
    assert_eq!(only_new.load(&id("b")).await.unwrap(), Some(record("b", 1)));
    assert_eq!(only_new.load(&id("c")).await.unwrap(), Some(record("c", 1)));
    // A row that does not open stops the pass and is left alone.
    let newest = keyring()
        .with_key(KeyId(2), key(2))
        .unwrap()
        .with_key(KeyId(3), key(3))
        .unwrap();
    let s3 = b.open(newest).await;
    let mut bad = b.sealed(&id("b")).await;
    bad[20] ^= 0xff;
    b.set_sealed(&id("b"), &bad).await;
    assert!(matches!(
        reencrypt(&s3).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(b.sealed(&id("b")).await, bad);
}

async fn no_secret_is_stored_in_the_clear<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    for g in 0..3 {
        let r = record("plain", g);
        committed(&*s, if g == 0 { None } else { Some(g - 1) }, &r).await;
    }
    let raw = b.raw_bytes().await;
    assert!(raw.len() > 1000, "the raw read found {} bytes", raw.len());
    assert!(
        !raw.windows(b"-secret-".len()).any(|w| w == b"-secret-"),
        "a token was stored in the clear"
    );
    // The tokens are there, sealed.
    assert_eq!(
        s.load(&id("plain")).await.unwrap(),
        Some(record("plain", 2))
    );
}

fn pending(conn: &str, expires_at: Timestamp) -> PendingAuthorization {
    PendingAuthorization {
        connection: id(conn),
        identity: record(conn, 0).identity,
        redirect_uri: "https://app.example/callback".into(),
        verifier: Some(SecretString::new(format!("PKCE-secret-{conn}"))),
        created_at: T0,
        expires_at,
        reconnect: true,
        replace_realm: false,
    }
}

async fn pending_authorizations_are_taken_once<B: Backend>(b: &B) {
    // Two stores over the same place, like two processes.
    let stores = [b.open(keyring()).await, b.open(keyring()).await];
    let a = pending("a", at(600));
    stores[0].put_pending("key-a", &a, T0).await.unwrap();
    stores[0]
        .put_pending("key-b", &pending("b", at(600)), T0)
        .await
        .unwrap();
    assert_eq!(stores[1].take_pending("key-a").await.unwrap(), Some(a));
    assert_eq!(
        stores[0].take_pending("key-a").await.unwrap(),
        None,
        "used twice"
    );
    assert_eq!(
        stores[1].take_pending("key-a").await.unwrap(),
        None,
        "used twice"
    );
    assert_eq!(stores[0].take_pending("never-put").await.unwrap(), None);
    // Expired ones are dropped as new ones are written; live ones stay.
    stores[0]
        .put_pending("key-old", &pending("old", at(10)), T0)
        .await
        .unwrap();
    stores[1]
        .put_pending("key-new", &pending("new", at(620)), at(20))
        .await
        .unwrap();
    assert_eq!(stores[0].take_pending("key-old").await.unwrap(), None);
    assert!(stores[0].take_pending("key-b").await.unwrap().is_some());
    // Callbacks racing for one state, on both stores: exactly one wins, every time.
    for round in 0..20 {
        let key = format!("race-{round}");
        stores[0]
            .put_pending(&key, &pending("race", at(600)), T0)
            .await
            .unwrap();
        let takers: Vec<_> = (0..6)
            .map(|t| {
                let s = Arc::clone(&stores[t % 2]);
                let key = key.clone();
                tokio::spawn(async move { s.take_pending(&key).await.unwrap().is_some() })
            })
            .collect();
        let mut winners = 0;
        for t in takers {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(
            winners, 1,
            "round {round}: {winners} callbacks took one state"
        );
    }
}

async fn pending_authorizations_are_sealed<B: Backend>(b: &B) {
    let s = b.open(keyring()).await;
    for n in 0..4 {
        let p = pending(&format!("sealed-{n}"), at(600));
        s.put_pending(&format!("key-{n}"), &p, T0).await.unwrap();
    }
    let raw = b.raw_bytes().await;
    assert!(
        !raw.windows(b"PKCE-secret".len())
            .any(|w| w == b"PKCE-secret"),
        "a PKCE verifier was stored in the clear"
    );
    // Sealed under its key: another key's row does not open as it.
    let taken = s.take_pending("key-3").await.unwrap().unwrap();
    assert_eq!(taken.verifier.unwrap().expose(), "PKCE-secret-sealed-3");
}

// ---------------------------------------------------------------------------
// Running each property against each backend
// ---------------------------------------------------------------------------

macro_rules! for_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name(&super::MemoryBackend::new()).await;
            })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name(&super::SqliteBackend::new()).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                if let Some(b) = super::PgBackend::new().await {
                    super::$name(&b).await;
                    b.drop_schema().await;
                }
            })*
        }
    };
}

macro_rules! for_sealed_backends {
    ($($name:ident),* $(,)?) => {
        mod sealed_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name(&super::SqliteBackend::new()).await;
            })*
        }
        mod sealed_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                if let Some(b) = super::PgBackend::new().await {
                    super::$name(&b).await;
                    b.drop_schema().await;
                }
            })*
        }
    };
}

for_backends!(
    insert_only_if_absent,
    cas_success_and_conflict_return_current,
    generation_never_decreases,
    records_round_trip_exactly,
    list_in_id_order,
    lease_held_expired_taken_over,
    release_by_non_owner_does_nothing,
    retry_inherits_what_the_lost_grant_displaced,
    retry_without_displaced_row_reports_none,
    same_owner_new_request_reports_its_own_row,
    release_with_restore_puts_back_the_displaced_row,
    release_with_wrong_request_does_nothing,
    a_committed_swap_releases_the_lease_with_it,
    chained_takeovers_report_the_earliest_start,
    due_for_work_finds_keepalive_and_abandoned,
    keepalive_follows_a_deadline_moved_earlier,
    due_for_work_finds_records_in_doubt,
    due_for_work_pages_by_due_time,
    notices_due_reports_each_notice_in_its_window,
    concurrent_cas_has_one_winner_per_generation,
    concurrent_lease_has_one_holder,
    lease_holders_commit_on_what_their_grant_read,
    lease_holders_commit_on_what_their_grant_read_from_no_record,
    pending_authorizations_are_taken_once,
);

for_sealed_backends!(
    corrupt_ciphertext_is_refused,
    truncated_blob_is_refused,
    ciphertext_swapped_from_another_row_is_refused,
    old_ciphertext_restored_is_refused,
    wrong_key_is_refused,
    keys_rotate,
    no_secret_is_stored_in_the_clear,
    pending_authorizations_are_sealed,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_reencrypt_all() {
    let b = SqliteBackend::new();
    reencrypt_all_moves_rows_to_the_newest_key(&b, async |s: &SqliteStore| s.reencrypt_all().await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_reencrypt_all() {
    if let Some(b) = PgBackend::new().await {
        reencrypt_all_moves_rows_to_the_newest_key(&b, async |s: &PostgresStore| {
            s.reencrypt_all().await
        })
        .await;
        b.drop_schema().await;
    }
}

/// A database written by a version-1 build opens under this one: the migration
/// adds the scan columns, the old rows read back unchanged, and a doubt and a hard
/// deadline written after the upgrade are found by the scans.
#[tokio::test]
async fn sqlite_upgrades_a_version_1_database() {
    let b = SqliteBackend::new();
    {
        let v1 = SqliteStore::open(b.path(), keyring()).unwrap();
        committed(&v1, None, &record("old", 0)).await;
    }
    // Take the file back to schema version 1, as a version-1 build left it.
    {
        let raw = b.raw();
        raw.execute_batch(SQLITE_DROP_V3).unwrap();
        raw.execute_batch(
            "DROP INDEX tokenfence_connections_pending_work_at; \
             DROP INDEX tokenfence_connections_hard_deadline; \
             ALTER TABLE tokenfence_connections DROP COLUMN pending_work_at; \
             ALTER TABLE tokenfence_connections DROP COLUMN hard_deadline; \
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let s = SqliteStore::open(b.path(), keyring()).unwrap();
    let version: i64 = b
        .raw()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, LATEST_SQLITE);
    assert_eq!(s.load(&id("old")).await.unwrap(), Some(record("old", 0)));
    // Version 6 gave the row its idle deadline's day: found by the day's index.
    let undated: i64 = b
        .raw()
        .query_row(
            "SELECT count(*) FROM tokenfence_connections \
             WHERE idle_deadline IS NOT NULL AND idle_day IS NOT idle_deadline / 86400000 * 86400000",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(undated, 0);
    assert_eq!(
        due(&s, T0.saturating_add(days(90)), days(14), 100).await,
        vec![id("old")]
    );
    let mut doubt = record("old", 1);
    doubt.in_doubt_since = Some(at(5));
    committed(&s, Some(0), &doubt).await;
    assert_eq!(due(&s, at(5), days(14), 100).await, vec![id("old")]);
    let deadline = doubt.hard_deadline.unwrap();
    assert_eq!(
        s.notices_due(None, deadline, Duration::ZERO).await.unwrap(),
        vec![id("old")]
    );
}

/// Rows a build before version 6 writes during a rolling deploy (it sets the idle
/// deadline, never its day): the database dates them, so the keep-alive scan finds
/// a row it inserted and one whose deadline it moved earlier across a midnight.
#[tokio::test]
async fn sqlite_keepalive_finds_rows_an_older_build_wrote() {
    let b = SqliteBackend::new();
    let s = SqliteStore::open(b.path(), keyring()).unwrap();
    let (midnight, hour) = (midnight(), Duration::from_secs(3600));
    let mut moved = record("moved", 0);
    moved.idle_deadline = Some(midnight.saturating_add(hour));
    committed(&s, None, &moved).await;
    let raw = b.raw();
    let early = midnight.saturating_sub(hour).as_millis() as i64;
    // As version 5 writes: no idle_day in the statement.
    raw.execute(
        "UPDATE tokenfence_connections SET idle_deadline = ?1, generation = 1 \
         WHERE id = 'moved'",
        [early],
    )
    .unwrap();
    let sealed: (i64, Vec<u8>) = raw
        .query_row(
            "SELECT keepalive_floor, sealed FROM tokenfence_connections WHERE id = 'moved'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    raw.execute(
        "INSERT INTO tokenfence_connections (id, generation, status, idle_deadline, \
         keepalive_floor, updated_at, sealed) VALUES ('inserted', 0, 'active', ?1, ?2, 0, ?3)",
        rusqlite::params![early, sealed.0, sealed.1],
    )
    .unwrap();
    let dated: i64 = raw
        .query_row(
            "SELECT count(*) FROM tokenfence_connections WHERE idle_day = ?1",
            [midnight.saturating_sub(days(1)).as_millis() as i64],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dated, 2);
    let after = midnight.saturating_sub(hour / 2);
    assert_eq!(
        due(&s, after, Duration::ZERO, 10).await,
        vec![id("inserted"), id("moved")]
    );
}

/// What schema 6 is for: a refresh that moves the idle deadline within its day
/// writes no more pages than a bare rewrite of the row's sealed blob (no index
/// page; SQLite writes no page whose content is unchanged), one that moves it to
/// the next day writes more (the day's index).
/// Counted in WAL frames (pages written, and fsynced, by the commit), each commit
/// alone in an emptied log.
#[tokio::test]
async fn sqlite_a_refresh_within_the_day_writes_no_index_page() {
    let b = SqliteBackend::new();
    let s = SqliteStore::open(b.path(), keyring()).unwrap();
    let (midnight, hour) = (midnight(), Duration::from_secs(3600));
    // Enough rows that the index is more than its root page.
    for n in 0..400 {
        let mut r = record(&format!("other-{n:03}"), 0);
        r.idle_deadline = Some(midnight.saturating_add(hour * (n % 48)));
        committed(&s, None, &r).await;
    }
    let at_hour = |h: u32| Some(midnight.saturating_sub(hour * 3).saturating_add(hour * h));
    let raw = b.raw();
    let with_deadline = |g: u64, deadline: Option<Timestamp>| {
        let mut r = record("moving", g);
        r.idle_deadline = deadline;
        r
    };
    committed(&s, None, &with_deadline(0, at_hour(0))).await;
    let wal = b.path().with_extension("db-wal");
    let truncate = || {
        raw.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap();
    };
    let logged = || (std::fs::metadata(&wal).unwrap().len() - 32) / (4096 + 24);
    truncate();
    raw.execute(
        "UPDATE tokenfence_connections SET sealed = randomblob(length(sealed)) \
         WHERE id = 'moving'",
        [],
    )
    .unwrap();
    let mut frames = vec![logged()];
    for (g, h) in [(1, 1), (2, 4)] {
        truncate();
        committed(&s, Some(g - 1), &with_deadline(g, at_hour(h))).await;
        frames.push(logged());
    }
    // Within the day (21:00 to 22:00): the row's pages only, as the bare update.
    // Across midnight (to 01:00): the row's pages and the index's.
    assert!(
        frames[1] == frames[0] && frames[2] > frames[0],
        "WAL frames per commit (bare update, within the day, across midnight): {frames:?}"
    );
}

/// The newest schema versions this build ships (SQLite's version 5 dropped an
/// index PostgreSQL keeps, its version 6 indexes the idle deadline's day).
const LATEST_SQLITE: i64 = 6;
const LATEST_POSTGRES: i64 = 4;

/// Back from the newest schema to version 2: puts back the idle deadline's index
/// version 6 replaced and the lease index version 5 dropped, drops what versions 3
/// (lease request ids) and 4 (pending authorizations) added.
const SQLITE_DROP_V3: &str = "DROP TRIGGER tokenfence_connections_idle_day_insert; \
     DROP TRIGGER tokenfence_connections_idle_day_update; \
     DROP INDEX tokenfence_connections_idle_day; \
     ALTER TABLE tokenfence_connections DROP COLUMN idle_day; \
     CREATE INDEX tokenfence_connections_idle_deadline \
     ON tokenfence_connections (idle_deadline) WHERE idle_deadline IS NOT NULL; \
     CREATE INDEX tokenfence_leases_expires_at \
     ON tokenfence_leases (expires_at); \
     DROP TABLE tokenfence_pending_authorizations; \
     ALTER TABLE tokenfence_leases DROP COLUMN request; \
     ALTER TABLE tokenfence_leases DROP COLUMN displaced_owner; \
     ALTER TABLE tokenfence_leases DROP COLUMN displaced_acquired_at; \
     ALTER TABLE tokenfence_leases DROP COLUMN displaced_expires_at; \
     ALTER TABLE tokenfence_leases DROP COLUMN displaced_generation; \
     ALTER TABLE tokenfence_leases DROP COLUMN displaced_request;";

/// Lease rows written before version 3 (owner, times, generation only), after the
/// upgrade: their request is 0 and they displaced nothing. Unexpired, they exclude
/// others; expired, the next worker is told of them; their holder releases them
/// under request 0; their owner under a new request is told of its own row.
async fn leases_written_before_v3_read_as_request_zero(s: &impl Store) {
    assert_eq!(
        held(s, "old", "B", at(10)).await,
        lease_as("A", LeaseRequestId(0), T0, Some(0))
    );
    assert_eq!(
        took_over(s, "old", "C", req("C"), at(30)).await,
        Some(lease_as("A", LeaseRequestId(0), T0, Some(0)))
    );
    s.release_lease(&id("lease-only"), &worker("A"), LeaseRequestId(0), false)
        .await
        .unwrap();
    assert_eq!(took_over(s, "lease-only", "B", req("B"), at(1)).await, None);
    assert_eq!(
        took_over(s, "other", "A", req("A"), at(1)).await,
        Some(lease_as("A", LeaseRequestId(0), T0, None))
    );
}

/// A database written by a version-2 build, with lease rows, opens under this one:
/// the migration gives the rows request 0 and no displaced row.
#[tokio::test]
async fn sqlite_upgrades_a_version_2_database_with_leases() {
    let b = SqliteBackend::new();
    {
        let v2 = SqliteStore::open(b.path(), keyring()).unwrap();
        committed(&v2, None, &record("old", 0)).await;
    }
    {
        let raw = b.raw();
        raw.execute_batch(SQLITE_DROP_V3).unwrap();
        raw.execute_batch("PRAGMA user_version = 2;").unwrap();
        for conn in ["old", "lease-only", "other"] {
            let generation = (conn == "old").then_some(0_i64);
            raw.execute(
                "INSERT INTO tokenfence_leases (id, owner, acquired_at, expires_at, generation) \
                 VALUES (?1, 'A', ?2, ?3, ?4)",
                rusqlite::params![
                    conn,
                    T0.as_millis() as i64,
                    T0.saturating_add(TTL).as_millis() as i64,
                    generation
                ],
            )
            .unwrap();
        }
    }
    let s = SqliteStore::open(b.path(), keyring()).unwrap();
    let raw = b.raw();
    let version: i64 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, LATEST_SQLITE);
    let upgraded: i64 = raw
        .query_row(
            "SELECT count(*) FROM tokenfence_leases WHERE request = 0 \
             AND displaced_owner IS NULL AND displaced_request IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(upgraded, 3);
    let lease_indexes: i64 = raw
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' \
             AND tbl_name = 'tokenfence_leases' AND sql IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(lease_indexes, 0, "version 5 scans the few lease rows");
    leases_written_before_v3_read_as_request_zero(&s).await;
}

/// The same for a PostgreSQL schema written by a version-2 build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upgrades_a_version_2_schema_with_leases() {
    let Some(b) = PgBackend::new().await else {
        return;
    };
    committed(&*b.open(keyring()).await, None, &record("old", 0)).await;
    let raw = b.raw().await;
    let l = format!("\"{}\".tokenfence_leases", b.schema);
    raw.batch_execute(&format!(
        "ALTER TABLE {l} DROP CONSTRAINT tokenfence_leases_displaced_whole, \
         DROP COLUMN request, DROP COLUMN displaced_owner, \
         DROP COLUMN displaced_acquired_at, DROP COLUMN displaced_expires_at, \
         DROP COLUMN displaced_generation, DROP COLUMN displaced_request; \
         DROP TABLE \"{0}\".tokenfence_pending_authorizations; \
         DELETE FROM \"{0}\".tokenfence_schema_version WHERE version >= 3",
        b.schema
    ))
    .await
    .unwrap();
    for conn in ["old", "lease-only", "other"] {
        let generation = (conn == "old").then_some(0_i64);
        raw.execute(
            &format!(
                "INSERT INTO {l} (id, owner, acquired_at, expires_at, generation) \
                 VALUES ($1, 'A', $2, $3, $4)"
            ),
            &[
                &conn,
                &(T0.as_millis() as i64),
                &(T0.saturating_add(TTL).as_millis() as i64),
                &generation,
            ],
        )
        .await
        .unwrap();
    }
    let s = b.open(keyring()).await;
    let applied: i64 = raw
        .query_one(
            &format!(
                "SELECT max(version) FROM \"{}\".tokenfence_schema_version",
                b.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, LATEST_POSTGRES);
    let upgraded: i64 = raw
        .query_one(
            &format!(
                "SELECT count(*) FROM {l} WHERE request = 0 \
                 AND displaced_owner IS NULL AND displaced_request IS NULL"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(upgraded, 3);
    leases_written_before_v3_read_as_request_zero(&*s).await;
    b.drop_schema().await;
}

#[test]
fn sqlite_many_processes_first_use_at_once() {
    let b = SqliteBackend::new();
    let path = b.path();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || SqliteStore::open(path, keyring()).map(drop))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let version: i64 = b
        .raw()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, LATEST_SQLITE);
    let mode: String = b
        .raw()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(b.dir.path()).unwrap() {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{:?} is mode {mode:o}", entry.path());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_many_processes_first_use_at_once() {
    let Some(b) = PgBackend::new().await else {
        return;
    };
    let b = Arc::new(b);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let b = Arc::clone(&b);
            tokio::spawn(async move {
                let options = PostgresOptions {
                    schema: b.schema.clone(),
                    max_connections: 1,
                    ..PostgresOptions::default()
                };
                PostgresStore::connect_with(&b.url, keyring(), options)
                    .await
                    .map(drop)
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let applied = b
        .raw()
        .await
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".tokenfence_schema_version",
                b.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(applied, LATEST_POSTGRES);
    b.drop_schema().await;
}

/// Issue 9, part 3: on PostgreSQL (the default options), lease expiry is decided
/// by the database's clock, whatever the callers' clocks say: a caller a day
/// ahead cannot take an unexpired lease, and a caller a day behind takes an
/// expired one.
#[tokio::test]
async fn postgres_leases_expire_on_the_database_clock() {
    let Some(b) = PgBackend::new().await else {
        return;
    };
    let options = PostgresOptions {
        schema: b.schema.clone(),
        max_connections: 2,
        ..PostgresOptions::default()
    };
    assert_eq!(options.lease_clock, LeaseClock::Database);
    let s = PostgresStore::connect_with(&b.url, keyring(), options)
        .await
        .unwrap();
    let wall = Timestamp::from_millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    );
    let ahead = wall.saturating_add(days(1));
    let behind = wall.saturating_sub(days(1));
    let ttl = Duration::from_millis(1_500);
    let granted = s
        .acquire_lease(&id("a"), &worker("A"), req("A"), behind, ttl)
        .await
        .unwrap();
    let LeaseOutcome::Granted { lease, .. } = granted else {
        panic!("a free lease is granted: {granted:?}");
    };
    // Stamped on the database's clock, not the caller's day-old one.
    assert!(lease.acquired_at.saturating_since(behind) > Duration::from_secs(3_600));
    let early = s
        .acquire_lease(&id("a"), &worker("B"), req("B"), ahead, ttl)
        .await
        .unwrap();
    assert!(
        matches!(early, LeaseOutcome::Held(_)),
        "a caller a day ahead must not take an unexpired lease: {early:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let late = s
        .acquire_lease(&id("a"), &worker("B"), req("B"), behind, ttl)
        .await
        .unwrap();
    assert!(
        matches!(
            late,
            LeaseOutcome::Granted {
                took_over: Some(_),
                ..
            }
        ),
        "a caller a day behind takes over an expired lease: {late:?}"
    );
    // The scan for abandoned leases judges expiry on the same clock.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(due(&s, behind, days(14), 10).await, vec![id("a")]);
    drop(s);
    b.drop_schema().await;
}

#[tokio::test]
async fn postgres_refuses_bad_configuration_clearly() {
    let Some(b) = PgBackend::new().await else {
        return;
    };
    let bad = PostgresOptions {
        schema: "Robert'); DROP TABLE".into(),
        ..PostgresOptions::default()
    };
    let err = PostgresStore::connect_with(&b.url, keyring(), bad)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    let err = PostgresStore::connect("postgres://user:hunter2@127.0.0.1:1/db?port=x", keyring())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    // A server that is not there is unavailable, not misconfigured, and the
    // password stays out of the message.
    let options = PostgresOptions {
        timeout: Duration::from_secs(2),
        ..PostgresOptions::default()
    };
    let err =
        PostgresStore::connect_with("postgres://user:hunter2@127.0.0.1:1/db", keyring(), options)
            .await
            .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    // Ids PostgreSQL cannot hold are refused before they reach it.
    let s = b.open(keyring()).await;
    let err = s.load(&id("nul\0id")).await.unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    b.drop_schema().await;
}

/// The URL of the test server with TLS required instead of whatever it says.
fn require_tls(url: &str) -> String {
    let url = url
        .replace("sslmode=disable", "sslmode=require")
        .replace("sslmode=prefer", "sslmode=require");
    if url.contains("sslmode=") {
        url
    } else if url.contains('?') {
        format!("{url}&sslmode=require")
    } else {
        format!("{url}?sslmode=require")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_verifies_the_server() {
    let Some(b) = PgBackend::new().await else {
        return;
    };
    let Ok(ca) = std::env::var("TOKENFENCE_PG_CA") else {
        if std::env::var("TOKENFENCE_SKIP_PG_TLS").as_deref() == Ok("1") {
            eprintln!("TOKENFENCE_SKIP_PG_TLS=1: skipping the PostgreSQL TLS test");
            return;
        }
        panic!(
            "TOKENFENCE_PG_CA is not set: the PostgreSQL TLS path cannot be tested. \
             `scripts/postgres start` sets it (a CA that signed the server's certificate); \
             set TOKENFENCE_SKIP_PG_TLS=1 to skip this test on purpose."
        );
    };
    let url = require_tls(&b.url);
    let options = |roots: Option<std::path::PathBuf>| PostgresOptions {
        schema: b.schema.clone(),
        max_connections: 2,
        timeout: Duration::from_secs(10),
        tls_root_certificates: roots,
        lease_clock: LeaseClock::Database,
    };
    // Verified against the CA that signed the server's certificate: works, and
    // sslmode=require means it is TLS or nothing.
    let s = PostgresStore::connect_with(&url, keyring(), options(Some(ca.clone().into())))
        .await
        .unwrap();
    committed(&s, None, &record("tls", 0)).await;
    assert_eq!(s.load(&id("tls")).await.unwrap(), Some(record("tls", 0)));
    // Without that CA the server is not trusted: refused, never silently accepted.
    let err = PostgresStore::connect_with(&url, keyring(), options(None))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("certificate"), "{err}");
    // A CA file without certificates is a configuration error.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = PostgresStore::connect_with(&url, keyring(), options(Some(empty)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    b.drop_schema().await;
}
