//! Store commits per second, SQLite and PostgreSQL, on this machine.
//!
//! Each element is one durable commit:
//! - `cas`: a compare-and-swap of the next generation of one connection
//!   (sealing included), one after another;
//! - `refresh_cycle`: what one refresh costs the store — acquire the lease (reading
//!   the record), then compare-and-swap releasing the lease: two transactions;
//! - `cas_8_tasks`: eight tasks each committing to its own connection at once
//!   (throughput under concurrency);
//! - `bare_update` and `bare_update_8`: the engine without tokenfence, side by
//!   side in the same run: the same guarded `UPDATE ... WHERE id = ? AND
//!   generation = ?` of the same table, indexes and row (the sealed blob the
//!   store wrote), with the same pragmas (SQLite: WAL, `synchronous = FULL`,
//!   `BEGIN IMMEDIATE`; PostgreSQL: one statement, autocommit), by one writer and
//!   by eight at once, each on its own row and connection. Compare `cas` with
//!   `bare_update` (and `cas_8_tasks` with `bare_update_8`): the ratio is what
//!   the store costs beyond its engine.
//!
//! PostgreSQL needs `TOKENFENCE_PG_URL` (`eval "$(scripts/postgres start)"`);
//! without it those benchmarks are skipped with a note.
//!
//! ```text
//! cargo bench -p tokenfence --bench stores
//! ```

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenfence::crypto::{EncryptionKey, KeyId, Keyring};
use tokenfence::store::{
    CasOutcome, LeaseOutcome, PostgresOptions, PostgresStore, SqliteStore, Store,
};
use tokenfence_core::{
    days, AccessGrant, AccessToken, ConnectionId, ConnectionRecord, Environment, Generation,
    GrantIdentity, LeaseRelease, LeaseRequestId, RefreshToken, Status, Timestamp, WorkerId,
};

const T0: Timestamp = Timestamp::from_secs(1_800_000_000);

fn keyring() -> Keyring {
    Keyring::new(
        KeyId(1),
        EncryptionKey::from_slice(&[7; 32]).expect("32 bytes"),
    )
}

/// A record with Intuit-sized tokens, as the refresh that made `generation` left
/// it: a new access token and idle deadline (one access-token lifetime, an hour,
/// later per generation: Intuit's cadence for a connection in use), the
/// five-year cap unchanged.
fn record(conn: &str, generation: u64) -> ConnectionRecord {
    let at = T0.saturating_add(Duration::from_secs(3600 * generation));
    ConnectionRecord {
        id: ConnectionId(conn.into()),
        generation: Generation(generation),
        identity: GrantIdentity {
            provider: "intuit".into(),
            environment: Environment::Production,
            client_id: "ABxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".into(),
        },
        realm_id: Some("9130354781226646".into()),
        access: Some(AccessGrant {
            token: AccessToken::new("a".repeat(900)),
            expires_at: at.saturating_add(Duration::from_secs(3600)),
        }),
        refresh: RefreshToken::new(format!("AB11{:046}", generation)),
        refresh_issued_at: at,
        idle_deadline: Some(at.saturating_add(days(100))),
        hard_deadline: Some(T0.saturating_add(days(5 * 365))),
        in_doubt_since: None,
        in_doubt_holder: None,
        status: Status::Active,
        blocked_client: None,
        imported_at: None,
        last_refreshed_at: Some(at),
        updated_at: at,
    }
}

/// Commits `iters` generations of `conn` one after another, from the stored one.
async fn cas_run(store: &dyn Store, conn: &str, iters: u64) -> Duration {
    let id = ConnectionId(conn.into());
    let mut g = match store.load(&id).await.expect("load") {
        Some(r) => r.generation.0,
        None => {
            let outcome = store.compare_and_swap(None, &record(conn, 0), None).await;
            assert_eq!(outcome.expect("insert"), CasOutcome::Committed);
            0
        }
    };
    let start = Instant::now();
    for _ in 0..iters {
        let next = record(conn, g + 1);
        let outcome = store
            .compare_and_swap(Some(Generation(g)), &next, None)
            .await;
        assert_eq!(outcome.expect("cas"), CasOutcome::Committed);
        g += 1;
    }
    start.elapsed()
}

async fn refresh_cycle_run(store: &dyn Store, conn: &str, iters: u64) -> Duration {
    let id = ConnectionId(conn.into());
    let owner = WorkerId("bench".into());
    cas_run(store, conn, 0).await;
    let start = Instant::now();
    for i in 0..iters {
        let now = T0.saturating_add(Duration::from_millis(i));
        let request = LeaseRequestId(i);
        let lease = store
            .acquire_lease(&id, &owner, request, now, Duration::from_secs(30))
            .await
            .expect("lease");
        let LeaseOutcome::Granted {
            record: Some(current),
            ..
        } = lease
        else {
            panic!("lease not granted: {lease:?}")
        };
        let g = current.generation.0;
        let release = LeaseRelease {
            owner: owner.clone(),
            request,
            restore: false,
        };
        let outcome = store
            .compare_and_swap(Some(Generation(g)), &record(conn, g + 1), Some(&release))
            .await;
        assert_eq!(outcome.expect("cas"), CasOutcome::Committed);
    }
    start.elapsed()
}

async fn parallel_run(store: Arc<dyn Store>, prefix: &str, iters: u64) -> Duration {
    const TASKS: u64 = 8;
    for t in 0..TASKS {
        cas_run(&*store, &format!("{prefix}-{t}"), 0).await;
    }
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = Arc::clone(&store);
            let conn = format!("{prefix}-{t}");
            // Spread `iters` commits over the tasks.
            let n = iters / TASKS + u64::from(t < iters % TASKS);
            tokio::spawn(async move { cas_run(&*store, &conn, n).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    start.elapsed()
}

/// A row as the store wrote it, for the bare engine to rewrite: the sealed blob
/// and the plain columns.
type Row = (String, i64, Vec<u8>);

/// The bare engine: a guarded update of `conn`'s row, `iters` times in a row.
trait Bare: Send + Sync {
    fn run(&self, conn: &str, iters: u64) -> Duration;
}

/// SQLite without tokenfence: its own connection to the store's file.
struct BareSqlite {
    path: std::path::PathBuf,
}

impl BareSqlite {
    fn row(conn: &rusqlite::Connection, id: &str) -> Row {
        conn.query_row(
            "SELECT status, generation, sealed FROM tokenfence_connections WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("row")
    }
}

impl Bare for BareSqlite {
    fn run(&self, id: &str, iters: u64) -> Duration {
        let mut conn = rusqlite::Connection::open(&self.path).expect("open");
        conn.busy_timeout(Duration::from_secs(10)).expect("busy");
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .expect("wal");
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "synchronous", "FULL")
            .expect("sync");
        let (status, mut g, sealed) = Self::row(&conn, id);
        let start = Instant::now();
        for _ in 0..iters {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .expect("begin");
            let changed = tx
                .prepare_cached(
                    "UPDATE tokenfence_connections SET generation = ?2, status = ?3, \
                     sealed = ?4 WHERE id = ?1 AND generation = ?5",
                )
                .and_then(|mut st| st.execute(rusqlite::params![id, g + 1, status, sealed, g]))
                .expect("update");
            assert_eq!(changed, 1);
            tx.commit().expect("commit");
            g += 1;
        }
        start.elapsed()
    }
}

/// PostgreSQL without tokenfence: its own connection, the store's table.
struct BarePostgres {
    url: String,
    table: String,
    rt: tokio::runtime::Handle,
}

impl Bare for BarePostgres {
    fn run(&self, id: &str, iters: u64) -> Duration {
        let (url, table, id) = (self.url.clone(), self.table.clone(), id.to_owned());
        // On the runtime's workers, as the store's own client runs.
        let updates = async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let row = client
                .query_one(
                    &format!("SELECT status, generation, sealed FROM {table} WHERE id = $1"),
                    &[&id],
                )
                .await
                .expect("row");
            let (status, mut g, sealed): (String, i64, Vec<u8>) =
                (row.get(0), row.get(1), row.get(2));
            let update = client
                .prepare(&format!(
                    "UPDATE {table} SET generation = $2, status = $3, sealed = $4 \
                     WHERE id = $1 AND generation = $5"
                ))
                .await
                .expect("prepare");
            let start = Instant::now();
            for _ in 0..iters {
                let changed = client
                    .execute(&update, &[&id, &(g + 1), &status, &sealed, &g])
                    .await
                    .expect("update");
                assert_eq!(changed, 1);
                g += 1;
            }
            start.elapsed()
        };
        let task = self.rt.spawn(updates);
        self.rt.block_on(task).expect("bare task")
    }
}

/// `iters` guarded updates spread over eight writers at once, each on its own
/// row and connection.
fn bare_parallel(bare: &Arc<dyn Bare>, prefix: &str, iters: u64) -> Duration {
    const WRITERS: u64 = 8;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..WRITERS {
            let n = iters / WRITERS + u64::from(t < iters % WRITERS);
            let bare = Arc::clone(bare);
            scope.spawn(move || bare.run(&format!("{prefix}-{t}"), n));
        }
    });
    start.elapsed()
}

/// Runs `run` on the runtime's workers and waits for it.
fn on_workers(
    rt: &tokio::runtime::Runtime,
    run: impl std::future::Future<Output = Duration> + Send + 'static,
) -> Duration {
    rt.block_on(rt.spawn(run)).expect("bench task")
}

fn bench_store(
    c: &mut Criterion,
    name: &str,
    rt: &tokio::runtime::Runtime,
    store: Arc<dyn Store>,
    bare: Arc<dyn Bare>,
) {
    let mut group = c.benchmark_group(format!("store_commits/{name}"));
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    // Every loop runs on the runtime's workers, where a driver's store calls run
    // (from `block_on`'s thread each round trip would cross threads).
    group.bench_function("cas", |b| {
        b.iter_custom(|iters| {
            let store = Arc::clone(&store);
            on_workers(
                rt,
                async move { cas_run(&*store, "bench-cas", iters).await },
            )
        })
    });
    group.bench_function("refresh_cycle", |b| {
        b.iter_custom(|iters| {
            let store = Arc::clone(&store);
            on_workers(rt, async move {
                refresh_cycle_run(&*store, "bench-cycle", iters).await
            })
        })
    });
    group.bench_function("cas_8_tasks", |b| {
        b.iter_custom(|iters| on_workers(rt, parallel_run(Arc::clone(&store), "bench-par", iters)))
    });
    // The bare engine on rows the store wrote (same size, same table).
    rt.block_on(async {
        cas_run(&*store, "bench-bare", 0).await;
        for t in 0..8 {
            cas_run(&*store, &format!("bench-bare-par-{t}"), 0).await;
        }
    });
    group.bench_function("bare_update", |b| {
        b.iter_custom(|iters| bare.run("bench-bare", iters))
    });
    group.bench_function("bare_update_8", |b| {
        b.iter_custom(|iters| bare_parallel(&bare, "bench-bare-par", iters))
    });
    group.finish();
    paired(name, rt, &store, &bare);
}

/// The ratios again, paired: criterion measures each loop for seconds, one after
/// the other, and a shared disk's fsync latency drifts more than the store's cost
/// between them. Here each round runs the store's CAS, its refresh cycle and the
/// bare update back to back (fifty commits each, twenty-five cycles), and the ratios are of
/// the same round; printed as the median and range over the rounds.
fn paired(name: &str, rt: &tokio::runtime::Runtime, store: &Arc<dyn Store>, bare: &Arc<dyn Bare>) {
    const ROUNDS: usize = 60;
    const COMMITS: u64 = 50;
    let per_s = |d: Duration, n: u64| n as f64 / d.as_secs_f64();
    let (mut cas, mut cycle) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let s = Arc::clone(store);
        let c = on_workers(rt, async move { cas_run(&*s, "bench-cas", COMMITS).await });
        let s = Arc::clone(store);
        let r = on_workers(rt, async move {
            refresh_cycle_run(&*s, "bench-cycle", COMMITS / 2).await
        });
        let b = per_s(bare.run("bench-bare", COMMITS), COMMITS);
        cas.push(per_s(c, COMMITS) / b);
        cycle.push(per_s(r, COMMITS / 2) / b);
    }
    let show = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!(
            "median {:.0}% (range {:.0}-{:.0}%)",
            100.0 * v[v.len() / 2],
            100.0 * v[0],
            100.0 * v[v.len() - 1]
        )
    };
    println!(
        "{name}, paired over {ROUNDS} rounds, of the bare guarded UPDATE: CAS {}; refresh cycle {}",
        show(&mut cas),
        show(&mut cycle)
    );
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // Under target/, on the same disk as the build: fsync is real here.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let path = dir.path().join("bench.db");
    let sqlite = SqliteStore::open(&path, keyring()).expect("sqlite");
    bench_store(
        c,
        "sqlite",
        &rt,
        Arc::new(sqlite),
        Arc::new(BareSqlite { path }),
    );

    match std::env::var("TOKENFENCE_PG_URL") {
        Ok(url) => {
            let schema = format!("tf_bench_{}", std::process::id());
            let options = PostgresOptions {
                schema: schema.clone(),
                ..PostgresOptions::default()
            };
            let pg = rt
                .block_on(PostgresStore::connect_with(&url, keyring(), options))
                .expect("postgres");
            let bare = BarePostgres {
                url: url.clone(),
                table: format!("\"{schema}\".tokenfence_connections"),
                rt: rt.handle().clone(),
            };
            bench_store(c, "postgres", &rt, Arc::new(pg), Arc::new(bare));
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                    .await
                    .expect("drop schema");
            });
        }
        Err(_) => eprintln!(
            "TOKENFENCE_PG_URL is not set: PostgreSQL benchmarks skipped \
             (eval \"$(scripts/postgres start)\" first)"
        ),
    }
}

criterion_group!(benches, stores);
criterion_main!(benches);
