//! The load test (`tokenfence-load`): one process, N connections in SQLite or
//! PostgreSQL, the mock provider on loopback with strict rotation and short
//! access tokens, callers spread uniformly over all connections. What it
//! measures comes from the harness, not from tokenfence: provider calls and
//! rotations from the mock's counters, latencies and errors from the callers.

use crate::Mock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::crypto::{EncryptionKey, KeyId, Keyring};
use tokenfence::store::{PostgresOptions, PostgresStore, SqliteStore, Store};
use tokenfence::Provider;
use tokenfence::TokenManager;
use tokenfence_core::{parse_token_reply, HttpResponse, TokenGrant};
use tokenfence_core::{ConnectionId, ConnectionRecord, Settings};
use tokenfence_sim::mock::{MockProvider, Stats, TOKEN_PATH};
use tokenfence_sim::provider::{BehaviourClass, ProviderSpec};

/// Where the connections live.
#[derive(Clone, Debug)]
pub enum LoadStore {
    /// A SQLite file at this path (created).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database URL and the schema to use (created; it must hold
    /// no connections yet).
    Postgres {
        /// The database.
        url: String,
        /// The schema.
        schema: String,
    },
}

/// What one run does.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Connections stored before the run.
    pub connections: usize,
    /// How long callers run.
    pub duration: Duration,
    /// Concurrent callers.
    pub callers: usize,
    /// The mock's access-token lifetime (a connection in use refreshes about
    /// every half of it).
    pub access_ttl: Duration,
    /// The store.
    pub store: LoadStore,
    /// Run against a mock provider already serving at this base URL
    /// (`tokenfence-sim mock-provider --profile strict`, shared by several
    /// processes) instead of one in this process.
    pub mock_url: Option<String>,
    /// Store the connections first (off: another process did).
    pub seed: bool,
}

/// What one run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadReport {
    /// Connections.
    pub connections: usize,
    /// Seconds to store them (one compare-and-swap each, 16 at once).
    pub seed_seconds: f64,
    /// A fresh manager's first token, from the store (cold start), milliseconds.
    pub cold_start_ms: f64,
    /// Seconds callers ran.
    pub seconds: f64,
    /// Token requests the mock received.
    pub provider_calls: u64,
    /// Refresh tokens the mock minted (strict rotation: one per accepted refresh).
    pub rotations: u64,
    /// Provider calls per rotation (1.00 when no call was duplicated or refused).
    pub calls_per_rotation: f64,
    /// Rotations per second.
    pub refreshes_per_second: f64,
    /// Tokens callers received.
    pub tokens_served: u64,
    /// Tokens per second.
    pub tokens_per_second: f64,
    /// Calls that found no valid cached token and waited for a refresh.
    pub waited: u64,
    /// Their latency: median, 99th percentile, maximum, milliseconds.
    pub wait_p50_ms: f64,
    /// 99th percentile.
    pub wait_p99_ms: f64,
    /// Maximum.
    pub wait_max_ms: f64,
    /// Errors callers received (must be 0).
    pub errors: u64,
    /// The first few errors, in words.
    pub error_examples: Vec<String>,
    /// Resident memory of the process at the end, MiB.
    pub rss_mib: f64,
}

fn keyring() -> Keyring {
    Keyring::new(KeyId(1), EncryptionKey::from_slice(&[7; 32]).expect("key"))
}

/// Resident set size from /proc (Linux), MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1_000.0
}

/// Settings for short tokens: a lease shorter than the default minute.
fn settings() -> Settings {
    Settings {
        lease_ttl: Duration::from_secs(10),
        send_safety: Duration::from_secs(5),
        in_doubt_safety: Duration::from_secs(1),
        ..Settings::default()
    }
}

/// The mock provider the load runs against: in this process, or another's.
#[derive(Clone)]
enum MockHandle {
    Local(MockProvider),
    Remote { base: String, http: reqwest::Client },
}

impl MockHandle {
    /// In this process, strict rotation, access tokens of `access_ttl`; or the
    /// one at `url` (its own lifetimes).
    async fn start(access_ttl: Duration, url: Option<&str>) -> (MockHandle, Provider) {
        match url {
            None => {
                let mock = Mock::start(ProviderSpec {
                    access_ttl,
                    ..ProviderSpec::scaled(BehaviourClass::StrictRotation)
                })
                .await;
                let provider = mock.provider();
                (MockHandle::Local(mock.mock), provider)
            }
            Some(base) => {
                let spec = ProviderSpec::scaled(BehaviourClass::StrictRotation);
                let mut profile = spec.profile.clone();
                profile.token_url = format!("{base}{TOKEN_PATH}");
                profile.revoke_url = None;
                let provider = Provider {
                    profile,
                    client: spec.clients[0].credentials(),
                };
                let http = reqwest::Client::new();
                (
                    MockHandle::Remote {
                        base: base.into(),
                        http,
                    },
                    provider,
                )
            }
        }
    }

    async fn grant(&self, provider: &Provider) -> Result<TokenGrant, String> {
        match self {
            MockHandle::Local(mock) => Ok(crate::grant_of(mock, provider)),
            MockHandle::Remote { base, http } => {
                let answer: serde_json::Value = http
                    .post(format!("{base}/control"))
                    .json(&serde_json::json!({"op": "authorize", "client_id": provider.client.client_id}))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                let reply = HttpResponse {
                    status: 200,
                    headers: vec![],
                    body: serde_json::to_vec(&answer["tokens"]).map_err(|e| e.to_string())?,
                };
                parse_token_reply(&provider.profile, &reply).map_err(|e| e.to_string())
            }
        }
    }

    async fn stats(&self) -> Result<Stats, String> {
        match self {
            MockHandle::Local(mock) => Ok(mock.stats()),
            MockHandle::Remote { base, http } => http
                .get(format!("{base}/control/stats"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// A grant of the mock per connection, `adjust`ed, stored by compare-and-swap,
/// 16 at once.
async fn seed(
    mock: &MockHandle,
    provider: &Provider,
    store: &Arc<dyn Store>,
    ids: &Arc<Vec<ConnectionId>>,
    adjust: fn(&mut ConnectionRecord),
) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let mut seeders = Vec::new();
    for _ in 0..16 {
        let (store, ids, next, grants, provider) = (
            store.clone(),
            ids.clone(),
            next.clone(),
            mock.clone(),
            provider.clone(),
        );
        seeders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(id) = ids.get(i) else {
                    return Ok::<(), String>(());
                };
                let mut record = ConnectionRecord::from_authorization(
                    id.clone(),
                    provider.identity(),
                    None,
                    grants.grant(&provider).await?,
                    &provider.profile,
                    SystemClock.now(),
                )
                .ok_or_else(|| "the mock's grant has no refresh token".to_string())?;
                adjust(&mut record);
                store
                    .compare_and_swap(None, &record, None)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }));
    }
    for s in seeders {
        s.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

async fn open(store: &LoadStore) -> Result<Arc<dyn Store>, String> {
    Ok(match store {
        LoadStore::Sqlite(path) => {
            Arc::new(SqliteStore::open(path, keyring()).map_err(|e| e.to_string())?)
        }
        LoadStore::Postgres { url, schema } => Arc::new(
            PostgresStore::connect_with(
                url,
                keyring(),
                PostgresOptions {
                    schema: schema.clone(),
                    ..PostgresOptions::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?,
        ),
    })
}

fn ids(n: usize) -> Arc<Vec<ConnectionId>> {
    Arc::new(
        (0..n)
            .map(|i| ConnectionId(format!("load-{i:07}")))
            .collect(),
    )
}

/// Runs the load test.
pub async fn run(opts: &LoadOptions) -> Result<LoadReport, String> {
    let (mock, provider) = MockHandle::start(opts.access_ttl, opts.mock_url.as_deref()).await;
    let store = open(&opts.store).await?;
    let ids = ids(opts.connections);
    let started = Instant::now();
    if opts.seed {
        seed(&mock, &provider, &store, &ids, |_| {}).await?;
    }
    let seed_seconds = started.elapsed().as_secs_f64();

    let tokens = TokenManager::builder()
        .provider(provider)
        .shared_store(store.clone())
        .settings(settings())
        .keepalive_scan(None)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    // Cold start: the first token of a process that has never seen the store.
    let first = Instant::now();
    tokens
        .access_token(&ids[opts.connections / 2])
        .await
        .map_err(|e| e.to_string())?;
    let cold_start_ms = first.elapsed().as_secs_f64() * 1_000.0;

    let before = mock.stats().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let waits = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let started = Instant::now();
    let mut callers = Vec::new();
    for c in 0..opts.callers {
        let (tokens, ids, stop, served, errors, waits) = (
            tokens.clone(),
            ids.clone(),
            stop.clone(),
            served.clone(),
            errors.clone(),
            waits.clone(),
        );
        callers.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(c as u64 + 1) | 1;
            let mut mine = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let id = &ids[(rng % ids.len() as u64) as usize];
                let at = Instant::now();
                let cached = tokens.cached(id).is_some();
                match tokens.access_token(id).await {
                    Ok(_) => {
                        served.fetch_add(1, Ordering::Relaxed);
                        if !cached {
                            mine.push(at.elapsed());
                        }
                    }
                    Err(e) => errors.lock().expect("errors").push(format!("{id}: {e}")),
                }
                if cached {
                    // A caller that got a cached token does its API call now.
                    tokio::task::yield_now().await;
                }
            }
            waits.lock().expect("waits").extend(mine);
        }));
    }
    tokio::time::sleep(opts.duration).await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.map_err(|e| e.to_string())?;
    }
    let seconds = started.elapsed().as_secs_f64();
    tokens.shutdown().await;
    let after = mock.stats().await?;
    let provider_calls = after.token_requests - before.token_requests;
    let rotations = after.rotations - before.rotations;
    let mut waits = std::mem::take(&mut *waits.lock().expect("waits"));
    waits.sort_unstable();
    let errors = std::mem::take(&mut *errors.lock().expect("errors"));
    let tokens_served = served.load(Ordering::Relaxed);
    Ok(LoadReport {
        connections: opts.connections,
        seed_seconds,
        cold_start_ms,
        seconds,
        provider_calls,
        rotations,
        calls_per_rotation: if rotations == 0 {
            0.0
        } else {
            provider_calls as f64 / rotations as f64
        },
        refreshes_per_second: rotations as f64 / seconds,
        tokens_served,
        tokens_per_second: tokens_served as f64 / seconds,
        waited: waits.len() as u64,
        wait_p50_ms: percentile(&waits, 0.50),
        wait_p99_ms: percentile(&waits, 0.99),
        wait_max_ms: waits.last().map_or(0.0, |d| d.as_secs_f64() * 1_000.0),
        errors: errors.len() as u64,
        error_examples: errors.into_iter().take(5).collect(),
        rss_mib: rss_mib(),
    })
}

/// What one keep-alive run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SweepReport {
    /// Connections, every one due for keep-alive.
    pub connections: usize,
    /// Keep-alive passes (`TokenManager::sweep`) until none was due.
    pub passes: usize,
    /// Seconds for all of them.
    pub seconds: f64,
    /// Token requests the mock received.
    pub provider_calls: u64,
    /// Connections the store still reports due afterwards (must be 0).
    pub still_due: usize,
    /// The backpressure limit (`scan_concurrency`).
    pub concurrency: usize,
}

/// Keep-alive of `connections` idle connections, all due at once (their idle
/// deadline 10 days away, inside the 30-day lead): passes until none is due.
pub async fn keepalive(
    connections: usize,
    concurrency: usize,
    store: &LoadStore,
) -> Result<SweepReport, String> {
    let (mock, provider) = MockHandle::start(Duration::from_secs(3_600), None).await;
    let store = open(store).await?;
    let ids = ids(connections);
    seed(&mock, &provider, &store, &ids, |r| {
        let now = SystemClock.now();
        r.refresh_issued_at = now.saturating_sub(tokenfence_core::days(90));
        r.last_refreshed_at = Some(r.refresh_issued_at);
        r.idle_deadline = Some(now.saturating_add(tokenfence_core::days(10)));
    })
    .await?;
    let tokens = TokenManager::builder()
        .provider(provider)
        .shared_store(store.clone())
        .settings(settings())
        .keepalive_scan(None)
        .scan_concurrency(concurrency)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let before = mock.stats().await?;
    let started = Instant::now();
    let mut passes = 0;
    loop {
        let pass = tokens.sweep(None).await.map_err(|e| e.to_string())?;
        passes += 1;
        if pass.due.is_empty() || passes > connections {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    tokens.shutdown().await;
    let lead = Settings::default().keepalive_lead;
    let still_due = store
        .due_for_work(SystemClock.now(), lead, None, connections)
        .await
        .map_err(|e| e.to_string())?
        .len();
    Ok(SweepReport {
        connections,
        passes,
        seconds,
        provider_calls: mock.stats().await?.token_requests - before.token_requests,
        still_due,
        concurrency,
    })
}
