//! Differential test: random sequences of store operations applied to MemoryStore
//! (the reference) and to SqliteStore / PostgresStore must give identical answers,
//! operation by operation. Times, leads, limits, owners, lease request ids,
//! statuses and deadlines are drawn from small ranges so that leases expire,
//! conflicts happen and keep-alive boundaries are crossed often; acquisitions and
//! releases often reuse the last grant's owner and request, so that retries after a
//! lost answer, releases with and without restore, and stale requests come up.
//!
//! Pending authorizations (the connect flow's states) are put and taken too, and
//! the reference store's answers are also held to the protocol's own model: a
//! state is taken at most once per put, and expired ones are dropped.
//!
//! A failure prints the seed and the operation; `TOKENFENCE_DIFF_SEED=<n>` replays
//! one sequence. PostgreSQL follows the same rule as the conformance suite:
//! `TOKENFENCE_PG_URL` or an explicit `TOKENFENCE_SKIP_PG=1`.

use std::collections::BTreeMap;
use std::time::Duration;
use tokenfence::crypto::{EncryptionKey, KeyId, Keyring};
use tokenfence::store::{
    CasOutcome, DueWork, LeaseClock, LeaseOutcome, MemoryStore, PostgresOptions, PostgresStore,
    SqliteStore, Store,
};
use tokenfence_core::{
    AccessGrant, AccessToken, ConnectionId, ConnectionRecord, Environment, FailureKind, Generation,
    GrantIdentity, LeaseRelease, LeaseRequestId, PendingAuthorization, ReauthReason, RefreshToken,
    SecretString, Status, Timestamp, WorkerId,
};

/// A minute before a UTC midnight: idle deadlines, drawn within 200 s of it, fall
/// on both sides of a day, which the SQLite store indexes them by.
const T0: Timestamp = Timestamp::from_secs(1_800_057_540);
const OPS: usize = 40;

/// xorshift64*: small, deterministic, good enough to pick test operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn secs(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max * 1000 + 1))
    }
}

#[derive(Debug)]
enum Op {
    Load(ConnectionId),
    /// A compare-and-swap, half the time releasing a lease with it.
    Cas(
        Option<Generation>,
        Box<ConnectionRecord>,
        Option<LeaseRelease>,
    ),
    Acquire(ConnectionId, WorkerId, LeaseRequestId, Timestamp, Duration),
    Release(ConnectionId, WorkerId, LeaseRequestId, bool),
    Due(Timestamp, Duration, Option<DueWork>, usize),
    Notices(Option<Timestamp>, Timestamp, Duration),
    List,
    /// Keep a pending authorization under a state key (expiring at the instant),
    /// at `now` (which drops those expired before it).
    PutPending(String, Timestamp, Timestamp),
    /// Take the one under a state key.
    TakePending(String),
}

fn random_record(rng: &mut Rng, id: &str, generation: u64) -> ConnectionRecord {
    let issued = T0.saturating_sub(rng.secs(100));
    let status = match rng.below(5) {
        0 => Status::Degraded {
            failures: 1,
            retry_at: T0,
            last: FailureKind::ServerError(502),
        },
        1 => Status::ReauthRequired {
            reason: ReauthReason::InvalidGrant,
            since: T0,
        },
        2 => Status::Disconnected { at: T0 },
        _ => Status::Active,
    };
    ConnectionRecord {
        id: ConnectionId(id.into()),
        generation: Generation(generation),
        identity: GrantIdentity {
            provider: "intuit".into(),
            environment: Environment::Sandbox,
            client_id: "client".into(),
        },
        realm_id: None,
        access: Some(AccessGrant {
            token: AccessToken::new(format!("AT-{}", rng.next())),
            expires_at: T0.saturating_add(rng.secs(3600)),
        }),
        refresh: RefreshToken::new(format!("RT-{}", rng.next())),
        refresh_issued_at: issued,
        idle_deadline: (rng.below(4) != 0).then(|| T0.saturating_add(rng.secs(200))),
        hard_deadline: (rng.below(2) == 0).then(|| T0.saturating_add(rng.secs(200))),
        in_doubt_since: (rng.below(4) == 0).then(|| T0.saturating_add(rng.secs(100))),
        in_doubt_holder: (rng.below(4) == 0)
            .then(|| (WorkerId("w".into()), LeaseRequestId(rng.below(9)))),
        status,
        blocked_client: None,
        imported_at: None,
        last_refreshed_at: (rng.below(2) == 0).then(|| issued.saturating_add(rng.secs(50))),
        updated_at: T0,
    }
}

/// The owner and request of the last grant of each connection.
type Grants = BTreeMap<ConnectionId, (WorkerId, LeaseRequestId)>;

fn random_op(rng: &mut Rng, grants: &Grants) -> Op {
    let ids = ["a", "b", "c"];
    let owners = ["w1", "w2", "w3"];
    let id = ConnectionId((*rng.pick(&ids)).into());
    let now = T0.saturating_add(rng.secs(120));
    // Half the time the last grant's owner and request (a retry, a release by the
    // holder), else any owner and request.
    let requester = |rng: &mut Rng| match grants.get(&id) {
        Some(last) if rng.below(2) == 0 => last.clone(),
        _ => (
            WorkerId((*rng.pick(&owners)).into()),
            LeaseRequestId(rng.below(3)),
        ),
    };
    let state = |rng: &mut Rng| format!("state-{}", rng.below(3));
    match rng.below(13) {
        11 => {
            let key = state(rng);
            Op::PutPending(key, T0.saturating_add(rng.secs(120)), now)
        }
        12 => Op::TakePending(state(rng)),
        0 => Op::Load(id),
        1..=3 => {
            let expected = match rng.below(4) {
                0 => None,
                _ => Some(Generation(rng.below(5))),
            };
            let next = expected.map_or(0, |g| g.0 + 1);
            let release = (rng.below(2) == 0).then(|| {
                let (owner, request) = requester(rng);
                LeaseRelease {
                    owner,
                    request,
                    restore: rng.below(2) == 0,
                }
            });
            Op::Cas(expected, Box::new(random_record(rng, &id.0, next)), release)
        }
        4..=6 => {
            let (owner, request) = requester(rng);
            Op::Acquire(
                id,
                owner,
                request,
                now,
                *rng.pick(&[
                    Duration::ZERO,
                    Duration::from_secs(30),
                    Duration::from_secs(90),
                ]),
            )
        }
        7 => {
            let (owner, request) = requester(rng);
            Op::Release(id, owner, request, rng.below(2) == 0)
        }
        8 => Op::Due(
            now,
            *rng.pick(&[
                Duration::ZERO,
                Duration::from_secs(10),
                Duration::from_secs(100),
                Duration::from_secs(86_400_000),
            ]),
            // Half the time a page after some (due, id): a random instant and id.
            (rng.below(2) == 0).then(|| DueWork {
                at: T0.saturating_add(rng.secs(120)),
                id: ConnectionId((*rng.pick(&ids)).into()),
            }),
            *rng.pick(&[0, 1, 2, 10]),
        ),
        9 => Op::Notices(
            (rng.below(3) != 0).then(|| T0.saturating_add(rng.secs(60))),
            now,
            *rng.pick(&[Duration::ZERO, Duration::from_secs(50)]),
        ),
        _ => Op::List,
    }
}

/// The answer of one operation, compared in full (tokens included: `Debug`
/// redacts them, `PartialEq` does not).
#[derive(Debug, PartialEq)]
enum Answer {
    Record(Option<ConnectionRecord>),
    Cas(CasOutcome),
    Lease(LeaseOutcome),
    Released,
    Due(Vec<DueWork>),
    Ids(Vec<ConnectionId>),
    Pending(Option<PendingAuthorization>),
}

/// A pending authorization that names its key and expiry, so a wrong one cannot
/// pass for the right one.
fn pending(key: &str, expires_at: Timestamp) -> PendingAuthorization {
    PendingAuthorization {
        connection: ConnectionId(format!("for-{key}")),
        identity: GrantIdentity {
            provider: "intuit".into(),
            environment: Environment::Sandbox,
            client_id: "app".into(),
        },
        redirect_uri: format!("https://app.example/cb?{key}"),
        verifier: Some(SecretString::new(format!(
            "verifier-{key}-{}",
            expires_at.as_millis()
        ))),
        created_at: T0,
        expires_at,
        reconnect: false,
        replace_realm: false,
    }
}

async fn apply(store: &dyn Store, op: &Op) -> Answer {
    match op {
        Op::Load(id) => Answer::Record(store.load(id).await.unwrap()),
        Op::Cas(expected, record, release) => Answer::Cas(
            store
                .compare_and_swap(*expected, record, release.as_ref())
                .await
                .unwrap(),
        ),
        Op::Acquire(id, owner, request, now, ttl) => Answer::Lease(
            store
                .acquire_lease(id, owner, *request, *now, *ttl)
                .await
                .unwrap(),
        ),
        Op::Release(id, owner, request, restore) => {
            store
                .release_lease(id, owner, *request, *restore)
                .await
                .unwrap();
            Answer::Released
        }
        Op::Due(now, lead, after, limit) => Answer::Due(
            store
                .due_for_work(*now, *lead, after.clone(), *limit)
                .await
                .unwrap(),
        ),
        Op::Notices(after, until, notice) => {
            Answer::Ids(store.notices_due(*after, *until, *notice).await.unwrap())
        }
        Op::List => Answer::Ids(store.list().await.unwrap()),
        Op::PutPending(key, expires_at, now) => {
            store
                .put_pending(key, &pending(key, *expires_at), *now)
                .await
                .unwrap();
            Answer::Released
        }
        Op::TakePending(key) => Answer::Pending(store.take_pending(key).await.unwrap()),
    }
}

fn keyring() -> Keyring {
    Keyring::new(KeyId(1), EncryptionKey::from_slice(&[3; 32]).unwrap())
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("TOKENFENCE_DIFF_SEED") {
        Ok(s) => vec![s.parse().expect("TOKENFENCE_DIFF_SEED is a number")],
        Err(_) => default.collect(),
    }
}

/// How often each interesting answer came up: the sequences must reach them, or
/// the comparison proves little (a vacuity guard).
#[derive(Debug, Default)]
struct Seen {
    committed: u32,
    conflicts: u32,
    held: u32,
    took_over: u32,
    /// Grants to the owner and request of the connection's last grant.
    retries: u32,
    /// Releases with restore by the owner and request of the last grant.
    restores: u32,
    /// Commits that released the last grant with them.
    released_by_commit: u32,
    due: u32,
    /// Pending authorizations taken, and takes that found none (used, expired
    /// and dropped, never put).
    taken: u32,
    taken_none: u32,
}

async fn run_against(
    seed: u64,
    reference: &MemoryStore,
    store: &dyn Store,
    name: &str,
    seen: &mut Seen,
) {
    let mut rng = Rng::new(seed);
    let mut grants = Grants::new();
    // What a state key holds, by the protocol's own rule (a put replaces; a take
    // empties; a put at `now` drops what expired before `now`): the reference
    // store is held to it too.
    let mut kept: BTreeMap<String, Timestamp> = BTreeMap::new();
    for step in 0..OPS {
        let op = random_op(&mut rng, &grants);
        let want = apply(reference, &op).await;
        let got = apply(store, &op).await;
        assert_eq!(
            got, want,
            "{name} differs from MemoryStore at seed {seed}, step {step}: {op:?}"
        );
        match &op {
            Op::PutPending(key, expires_at, now) => {
                kept.retain(|_, e| *e >= *now);
                kept.insert(key.clone(), *expires_at);
            }
            Op::TakePending(key) => {
                let model = kept.remove(key).map(|e| pending(key, e));
                assert_eq!(
                    want,
                    Answer::Pending(model),
                    "seed {seed}, step {step}: {op:?}"
                );
                match want {
                    Answer::Pending(Some(_)) => seen.taken += 1,
                    _ => seen.taken_none += 1,
                }
            }
            _ => {}
        }
        match &op {
            Op::Acquire(id, owner, request, ..)
                if matches!(want, Answer::Lease(LeaseOutcome::Granted { .. })) =>
            {
                let grant = (owner.clone(), *request);
                if grants.get(id) == Some(&grant) {
                    seen.retries += 1;
                }
                grants.insert(id.clone(), grant);
            }
            Op::Release(id, owner, request, restore)
                if grants.get(id) == Some(&(owner.clone(), *request)) =>
            {
                seen.restores += u32::from(*restore);
                grants.remove(id);
            }
            Op::Cas(_, record, Some(r))
                if want == Answer::Cas(CasOutcome::Committed)
                    && grants.get(&record.id) == Some(&(r.owner.clone(), r.request)) =>
            {
                seen.released_by_commit += 1;
                grants.remove(&record.id);
            }
            _ => {}
        }
        match want {
            Answer::Cas(CasOutcome::Committed) => seen.committed += 1,
            Answer::Cas(CasOutcome::Conflict(_)) => seen.conflicts += 1,
            Answer::Lease(LeaseOutcome::Held(_)) => seen.held += 1,
            Answer::Lease(LeaseOutcome::Granted {
                took_over: Some(_), ..
            }) => seen.took_over += 1,
            Answer::Due(due) if !due.is_empty() => seen.due += 1,
            _ => {}
        }
    }
}

fn assert_reached(seen: &Seen) {
    eprintln!("{seen:?}");
    let Seen {
        committed,
        conflicts,
        held,
        took_over,
        retries,
        restores,
        released_by_commit,
        due,
        taken,
        taken_none,
    } = *seen;
    assert!(
        committed >= 20
            && conflicts >= 20
            && held >= 10
            && took_over >= 10
            && retries >= 10
            && restores >= 5
            && released_by_commit >= 5
            && due >= 10
            && taken >= 10
            && taken_none >= 10,
        "the random sequences missed a case: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_answers_like_memory() {
    let mut seen = Seen::default();
    for seed in seeds(0..50) {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(dir.path().join("diff.db"), keyring()).unwrap();
        run_against(seed, &MemoryStore::new(), &sqlite, "SqliteStore", &mut seen).await;
    }
    if std::env::var("TOKENFENCE_DIFF_SEED").is_err() {
        assert_reached(&seen);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_answers_like_memory() {
    let Ok(url) = std::env::var("TOKENFENCE_PG_URL") else {
        if std::env::var("TOKENFENCE_SKIP_PG").as_deref() == Ok("1") {
            eprintln!("TOKENFENCE_SKIP_PG=1: skipping the PostgreSQL differential test");
            return;
        }
        panic!(
            "TOKENFENCE_PG_URL is not set, so the PostgreSQL store cannot be tested. \
             Start a throwaway server with `eval \"$(scripts/postgres start)\"`, \
             or set TOKENFENCE_SKIP_PG=1 to skip the PostgreSQL tests on purpose."
        );
    };
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut seen = Seen::default();
    for seed in seeds(0..25) {
        let schema = format!("tf_diff_{}_{seed}", std::process::id());
        let options = PostgresOptions {
            schema: schema.clone(),
            max_connections: 2,
            lease_clock: LeaseClock::Caller,
            ..PostgresOptions::default()
        };
        let pg = PostgresStore::connect_with(&url, keyring(), options)
            .await
            .unwrap();
        run_against(seed, &MemoryStore::new(), &pg, "PostgresStore", &mut seen).await;
        admin
            .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .await
            .unwrap();
    }
    if std::env::var("TOKENFENCE_DIFF_SEED").is_err() {
        assert_reached(&seen);
    }
}
