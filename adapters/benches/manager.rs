//! TokenManager figures: the cached hot path next to a bare `RwLock<HashMap>` read
//! (one and two threads, same run), the herd (10,000 callers on one expired
//! connection) against the provider's own latency, and memory per connection with
//! live and with dormant actors.
#![allow(missing_docs, unsafe_code)] // a counting allocator needs `unsafe impl GlobalAlloc`

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, Criterion};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::store::{MemoryStore, Store};
use tokenfence::transport::{Delivery, Transport};
use tokenfence::{Provider, TokenManager};
use tokenfence_core::*;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Answers every refresh after `latency` with a fresh one-hour token.
struct Provider1h {
    latency: Duration,
    calls: AtomicUsize,
}

#[async_trait]
impl Transport for Provider1h {
    async fn send(&self, _request: &HttpRequest) -> Delivery {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.latency).await;
        let body = format!(
            r#"{{"access_token":"AT-{n}-0123456789abcdef0123456789abcdef","refresh_token":"RT-1","expires_in":3600}}"#
        );
        Delivery::Replied(HttpResponse {
            status: 200,
            headers: vec![],
            body: body.into_bytes(),
        })
    }
}

fn provider() -> Provider {
    let mut p = Provider::intuit_production("prod-app", ClientSecret::new("prod-secret"));
    p.profile.token_url = "http://127.0.0.1:9/token".into();
    p
}

fn id(i: usize) -> ConnectionId {
    ConnectionId(format!("realm-{i:08}"))
}

fn record(p: &Provider, i: usize, access_valid: bool) -> ConnectionRecord {
    let now = SystemClock.now();
    ConnectionRecord {
        realm_id: Some(format!("{i}")),
        access: Some(AccessGrant {
            token: AccessToken::new(format!("AT-{i:08}-0123456789abcdef0123456789abcdef")),
            expires_at: if access_valid {
                now.saturating_add(hours(1))
            } else {
                now
            },
        }),
        ..ConnectionRecord::new(
            id(i),
            p.identity(),
            RefreshToken::new(format!("RT-{i:08}-0123456789abcdef")),
            now,
        )
    }
}

async fn manager_with(n: usize, valid: bool, latency: Duration) -> (TokenManager, Arc<Provider1h>) {
    let p = provider();
    let store = MemoryStore::new();
    for i in 0..n {
        store
            .compare_and_swap(None, &record(&p, i, valid), None)
            .await
            .unwrap();
    }
    let transport = Arc::new(Provider1h {
        latency,
        calls: AtomicUsize::new(0),
    });
    let tokens = TokenManager::builder()
        .provider(p)
        .store(store)
        .transport(transport.clone())
        .keepalive_scan(None)
        .build()
        .await
        .unwrap();
    (tokens, transport)
}

/// Runs `op` `iters` times split over `threads` threads; total wall time.
fn threaded(threads: usize, iters: u64, op: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..iters / threads as u64 {
                    op();
                }
            });
        }
    });
    start.elapsed()
}

fn hot_path(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tokens, _) = rt.block_on(manager_with(100, true, Duration::ZERO));
    let conn = id(42);
    rt.block_on(tokens.access_token(&conn)).unwrap();
    assert!(tokens.cached(&conn).is_some());
    let baseline: RwLock<HashMap<ConnectionId, AccessToken>> = RwLock::new(
        (0..100)
            .map(|i| {
                (
                    id(i),
                    AccessToken::new(format!("AT-{i:08}-0123456789abcdef0123456789abcdef")),
                )
            })
            .collect(),
    );
    let mut g = c.benchmark_group("access_token_hot_path");
    for threads in [1usize, 2] {
        g.bench_function(format!("tokenfence_cached/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    black_box(tokens.cached(black_box(&conn)));
                })
            })
        });
        g.bench_function(format!("rwlock_hashmap_baseline/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                threaded(threads, iters, || {
                    black_box(baseline.read().unwrap().get(black_box(&conn)).cloned());
                })
            })
        });
    }
    // The `.await` form as async code pays it: the calls run inside one task
    // (entering the runtime per call, `block_on`, is not part of the call).
    g.bench_function("tokenfence_access_token_async/1_thread", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(tokens.access_token(black_box(&conn)).await.unwrap());
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    rt.block_on(tokens.shutdown());
}

fn herd(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let latency = Duration::from_millis(20);
    let mut g = c.benchmark_group("herd_10000_callers");
    g.sample_size(10);
    g.bench_function("expiry_to_all_served_provider_20ms", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (tokens, transport) = rt.block_on(manager_with(1, false, latency));
                let start = Instant::now();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..10_000)
                        .map(|_| {
                            let t = tokens.clone();
                            tokio::spawn(async move { t.access_token(&id(0)).await })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap().unwrap();
                    }
                });
                total += start.elapsed();
                assert_eq!(transport.calls.load(Ordering::Relaxed), 1);
                rt.block_on(tokens.shutdown());
            }
            total
        })
    });
    g.finish();
}

/// Bytes the manager holds per connection after every connection served one token:
/// with actors alive (the default 30 s linger, measured before it ends) and after
/// they all retired (linger zero: only the dormant slot and its cached token stay).
fn memory(_c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for linger in [Duration::from_secs(30), Duration::ZERO] {
        rt.block_on(memory_with(10_000, linger));
    }
}

async fn memory_with(n: usize, linger: Duration) {
    let p = provider();
    let records: Vec<_> = (0..n).map(|i| record(&p, i, true)).collect();
    let refresh_bytes: usize = records.iter().map(|r| r.refresh.len()).sum();
    let access_bytes: usize = records
        .iter()
        .map(|r| r.access.as_ref().map_or(0, |a| a.token.len()))
        .sum();
    let store = MemoryStore::new();
    for r in &records {
        store.compare_and_swap(None, r, None).await.unwrap();
    }
    drop(records);
    let tokens = TokenManager::builder()
        .provider(provider())
        .store(store)
        .transport(Provider1h {
            latency: Duration::ZERO,
            calls: AtomicUsize::new(0),
        })
        // Scans wake dormant connections whose timer came; none does here.
        .keepalive_scan(Some(Duration::from_secs(3600)))
        .linger(linger)
        .build()
        .await
        .unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..n {
        tokens.access_token(&id(i)).await.unwrap();
    }
    if linger.is_zero() {
        while tokens.live_actors() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    } else {
        assert_eq!(tokens.live_actors(), n);
    }
    let after = LIVE.load(Ordering::Relaxed);
    let per = (after - before) as f64 / n as f64;
    // A live machine holds both tokens; a dormant slot only the cached access token.
    let held = if linger.is_zero() {
        access_bytes
    } else {
        access_bytes + refresh_bytes
    };
    let held = held as f64 / n as f64;
    println!(
        "memory per managed connection, linger {linger:?} ({} live actors): {per:.0} bytes \
         in the manager, of which tokens {held:.0} bytes; {:.0} bytes beyond the tokens",
        tokens.live_actors(),
        per - held
    );
    tokens.shutdown().await;
}

criterion_group!(benches, hot_path, herd, memory);
criterion_main!(benches);
