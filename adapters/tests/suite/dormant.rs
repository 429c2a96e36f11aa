//! Dormant connections: an actor with nothing to do retires (linger zero here),
//! its cached token is still served, the next command starts a new actor that
//! single-flights like the first, a `ReconnectSoon` already emitted is not emitted
//! again by the new machine, the keep-alive task wakes a dormant connection
//! whose warning comes due, and a process that starts announces the warnings
//! already due without waiting for a caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::store::{MemoryStore, Store};
use tokenfence::{LifecycleEvent, TokenManager};
use tokenfence_core::*;

use crate::common::{id, provider, Scripted, Watched};

/// A clock the test moves by hand.
#[derive(Clone)]
struct Manual(Arc<AtomicU64>);

impl Manual {
    fn new() -> Self {
        Manual(Arc::new(AtomicU64::new(SystemClock.now().as_millis())))
    }
    fn advance(&self, by: Duration) {
        self.0
            .fetch_add(u64::try_from(by.as_millis()).unwrap(), Ordering::SeqCst);
    }
}

impl Clock for Manual {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst))
    }
}

fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

fn days(n: u64) -> Duration {
    hours(n * 24)
}

struct Setup {
    tokens: TokenManager,
    transport: Arc<Scripted>,
    clock: Manual,
}

/// A manager over one stored connection (RT-1, built by `record`), whose actors
/// retire as soon as they have nothing to do, with a keep-alive scan every minute.
async fn setup(record: impl FnOnce(ConnectionRecord, Timestamp) -> ConnectionRecord) -> Setup {
    setup_on(Arc::new(MemoryStore::new()), record).await
}

/// [`setup`] over `store`.
async fn setup_on(
    store: Arc<dyn Store>,
    record: impl FnOnce(ConnectionRecord, Timestamp) -> ConnectionRecord,
) -> Setup {
    let p = provider();
    let clock = Manual::new();
    let now = clock.now();
    let base = ConnectionRecord::new(id(), p.identity(), RefreshToken::new("RT-1"), now);
    store
        .compare_and_swap(None, &record(base, now), None)
        .await
        .unwrap();
    let transport = Scripted::new(Duration::from_millis(20));
    let tokens = TokenManager::builder()
        .provider(p)
        .shared_store(store)
        .transport(transport.clone())
        .clock(clock.clone())
        .keepalive_scan(Some(Duration::from_secs(60)))
        .linger(Duration::ZERO)
        .build()
        .await
        .unwrap();
    Setup {
        tokens,
        transport,
        clock,
    }
}

/// A manager over a connection whose access token (AT-1) is valid for 3 hours and
/// whose hard deadline is `deadline_in` from now.
async fn warned_in(deadline_in: Duration) -> Setup {
    setup(|r, now| ConnectionRecord {
        access: Some(AccessGrant {
            token: AccessToken::new("AT-1"),
            expires_at: now.saturating_add(hours(3)),
        }),
        hard_deadline: Some(now.saturating_add(deadline_in)),
        ..r
    })
    .await
}

/// Waits (virtual time) up to `within` for one `ReconnectSoon`, checks that waking
/// the connection refreshed nothing (its access token is valid), and that later
/// keep-alive passes do not announce it again.
async fn warned_once(
    s: &Setup,
    events: &mut tokio::sync::broadcast::Receiver<LifecycleEvent>,
    within: Duration,
) {
    let warned = tokio::time::timeout(within, events.recv())
        .await
        .expect("announced by a keep-alive pass")
        .unwrap();
    assert!(
        matches!(warned.event, Event::ReconnectSoon { .. }),
        "{warned:?}"
    );
    until_dormant(&s.tokens).await;
    assert_eq!(
        s.transport.calls.load(Ordering::SeqCst),
        0,
        "the wake refreshed nothing: the access token was still valid"
    );
    s.clock.advance(Duration::from_secs(1800));
    tokio::time::sleep(Duration::from_secs(600)).await;
    until_dormant(&s.tokens).await;
    let later = drain(events);
    assert_eq!(reconnect_soon(&later), 0, "{later:?}");
}

/// Lets the runtime run until every actor has retired.
async fn until_dormant(tokens: &TokenManager) {
    while tokens.live_actors() > 0 {
        tokio::task::yield_now().await;
    }
}

fn drain(events: &mut tokio::sync::broadcast::Receiver<LifecycleEvent>) -> Vec<Event> {
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e.event);
    }
    seen
}

fn reconnect_soon(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::ReconnectSoon { .. }))
        .count()
}

async fn herd(tokens: &TokenManager, callers: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let t = tokens.clone();
            tokio::spawn(async move { t.access_token(&id()).await })
        })
        .collect();
    let mut served = Vec::new();
    for task in tasks {
        served.push(task.await.unwrap().unwrap().expose().to_string());
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dormant_connection_respawns_and_still_single_flights() {
    let s = setup(|r, _| r).await;
    assert_eq!(s.tokens.live_actors(), 0, "no actor before the first use");

    let served = herd(&s.tokens, 10_000).await;
    assert!(served.iter().all(|t| t == "AT-2"));
    assert_eq!(s.transport.calls.load(Ordering::SeqCst), 1);

    until_dormant(&s.tokens).await;
    let cached = s
        .tokens
        .cached(&id())
        .expect("a dormant slot keeps its cache");
    assert_eq!(cached.expose(), "AT-2");
    assert_eq!(s.tokens.live_actors(), 0, "the hot path starts no actor");

    // The token expires: the next callers meet a dormant slot, a new actor (and
    // machine, loading from the store) refreshes once for all of them. With a
    // linger of zero, actors may retire and respawn during the herd itself.
    s.clock.advance(hours(2));
    assert!(s.tokens.cached(&id()).is_none());
    let served = herd(&s.tokens, 10_000).await;
    assert!(
        served.iter().all(|t| t == "AT-3"),
        "one refresh, every caller"
    );
    assert_eq!(s.transport.calls.load(Ordering::SeqCst), 2);

    until_dormant(&s.tokens).await;
    s.tokens.shutdown().await;
}

#[tokio::test]
async fn reconnect_soon_is_not_repeated_by_a_respawned_machine() {
    // The hard deadline is within the notice (60 days) from the start.
    let s = setup(|r, now| ConnectionRecord {
        hard_deadline: Some(now.saturating_add(days(10))),
        ..r
    })
    .await;
    let mut events = s.tokens.subscribe();

    assert_eq!(s.tokens.access_token(&id()).await.unwrap().expose(), "AT-2");
    until_dormant(&s.tokens).await;
    let first = drain(&mut events);
    assert_eq!(reconnect_soon(&first), 1, "{first:?}");

    // Each expiry respawns an actor; the deadline (kept by every refresh) was
    // already announced.
    for n in 3..6 {
        s.clock.advance(hours(2));
        let token = s.tokens.access_token(&id()).await.unwrap();
        assert_eq!(token.expose(), format!("AT-{n}"));
        until_dormant(&s.tokens).await;
    }
    let later = drain(&mut events);
    let refreshed = later
        .iter()
        .filter(|e| matches!(e, Event::Refreshed { .. }))
        .count();
    assert_eq!(refreshed, 3, "three respawns did work: {later:?}");
    assert_eq!(reconnect_soon(&later), 0, "{later:?}");
    s.tokens.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_keepalive_task_wakes_a_dormant_connection_for_its_warning() {
    // The access token is valid for 3 hours; the notice period starts in 1 hour.
    let s = warned_in(days(60) + hours(1)).await;
    let mut events = s.tokens.subscribe();

    assert_eq!(s.tokens.access_token(&id()).await.unwrap().expose(), "AT-1");
    until_dormant(&s.tokens).await;
    assert!(drain(&mut events).is_empty(), "no warning yet");

    // The warning comes due while the connection is dormant and nobody asks: the
    // next keep-alive tick (virtual time) wakes it.
    s.clock.advance(hours(2));
    warned_once(&s, &mut events, Duration::from_secs(3600)).await;
    // (Dormant for over `evict_after` by now: served from the store again.)
    assert_eq!(s.tokens.access_token(&id()).await.unwrap().expose(), "AT-1");
    until_dormant(&s.tokens).await;
    assert_eq!(s.transport.calls.load(Ordering::SeqCst), 0);
    s.tokens.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_starting_process_announces_a_due_warning_without_a_caller() {
    // A record left by another process: the hard deadline is 10 days away (inside
    // the 60-day notice), the access token valid for 3 hours, and this process has
    // never touched the connection.
    let s = warned_in(days(10)).await;
    let mut events = s.tokens.subscribe();

    warned_once(&s, &mut events, Duration::from_secs(60)).await;
    s.tokens.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_notice_reported_while_the_store_cannot_be_read_is_announced_when_it_can() {
    // As above, but the store refuses reads (not scans) when the process starts.
    let store = Arc::new(Watched::default());
    store.down.store(true, Ordering::SeqCst);
    let s = setup_on(store.clone(), |r, now| ConnectionRecord {
        access: Some(AccessGrant {
            token: AccessToken::new("AT-1"),
            expires_at: now.saturating_add(hours(3)),
        }),
        hard_deadline: Some(now.saturating_add(days(10))),
        ..r
    })
    .await;
    let mut events = s.tokens.subscribe();
    // Ten minutes of failed reads: the wake's retries run out and its actor retires.
    for _ in 0..10 {
        s.clock.advance(Duration::from_secs(60));
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    assert_eq!(reconnect_soon(&drain(&mut events)), 0, "nothing read yet");

    // Reads work again: a later pass wakes the slot again and the notice comes.
    store.down.store(false, Ordering::SeqCst);
    s.clock.advance(Duration::from_secs(300));
    warned_once(&s, &mut events, Duration::from_secs(300)).await;
    s.tokens.shutdown().await;
}

/// Resident memory of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_the_store_does_not_have_keep_no_slot_and_their_answer_is_cached() {
    let store = Arc::new(Watched::default());
    let s = setup_on(store.clone(), |r, _| r).await;
    for i in 0..1000 {
        let unknown = ConnectionId(format!("nobody-{i}"));
        assert!(matches!(
            s.tokens.access_token(&unknown).await,
            Err(tokenfence::ManagerError::Access(AccessError::NotConnected))
        ));
    }
    until_dormant(&s.tokens).await;
    assert_eq!(s.tokens.slots(), 0, "unknown ids hold slots");
    // Asked again at once: answered without the store.
    let loads = store.loads.load(Ordering::SeqCst);
    for i in 0..1000 {
        let unknown = ConnectionId(format!("nobody-{i}"));
        assert!(s.tokens.access_token(&unknown).await.is_err());
    }
    assert_eq!(
        store.loads.load(Ordering::SeqCst),
        loads,
        "the store was asked again"
    );
    // Briefly: after `dead_recheck` the store is asked again.
    s.clock.advance(Duration::from_secs(2));
    assert!(s
        .tokens
        .access_token(&ConnectionId("nobody-1".into()))
        .await
        .is_err());
    assert_eq!(store.loads.load(Ordering::SeqCst), loads + 1);
    s.tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dormant_slots_are_evicted_after_a_while_and_come_back_from_the_store() {
    let s = setup(|r, now| ConnectionRecord {
        access: Some(AccessGrant {
            token: AccessToken::new("AT-1"),
            expires_at: now.saturating_add(hours(3)),
        }),
        ..r
    })
    .await;
    assert_eq!(s.tokens.access_token(&id()).await.unwrap().expose(), "AT-1");
    until_dormant(&s.tokens).await;
    assert_eq!(s.tokens.slots(), 1);
    assert!(s.tokens.cached(&id()).is_some(), "dormant, still served");
    s.tokens.sweep(None).await.unwrap();
    assert_eq!(s.tokens.slots(), 1, "not evicted before its time");
    s.clock.advance(Duration::from_secs(16 * 60));
    s.tokens.sweep(None).await.unwrap();
    assert_eq!(s.tokens.slots(), 0, "idle past evict_after: evicted");
    assert!(
        s.tokens.cached(&id()).is_none(),
        "the cached token went with it"
    );
    assert_eq!(s.tokens.access_token(&id()).await.unwrap().expose(), "AT-1");
    assert_eq!(s.transport.calls.load(Ordering::SeqCst), 0);
    s.tokens.shutdown().await;
}

/// Run with `--nocapture` for the figure in the README.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_through_100000_distinct_ids_leaves_memory_bounded() {
    let s = setup(|r, _| r).await;
    let before = rss_kib();
    for i in 0..100_000 {
        let unknown = ConnectionId(format!("churn-{i:06}"));
        let _ = s.tokens.access_token(&unknown).await;
    }
    until_dormant(&s.tokens).await;
    let after = rss_kib();
    assert_eq!(s.tokens.slots(), 0);
    // The negative answers are forgotten by the next keep-alive pass after they expire.
    s.clock.advance(Duration::from_secs(2));
    s.tokens.sweep(None).await.unwrap();
    let swept = rss_kib();
    eprintln!(
        "100000 distinct unknown ids: RSS {before} KiB before, {after} KiB after ({} KiB more), \
         {swept} KiB after the next keep-alive pass; slots {}",
        after.saturating_sub(before),
        s.tokens.slots()
    );
    s.tokens.shutdown().await;
}
