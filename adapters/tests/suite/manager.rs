//! TokenManager on tokio with the in-memory store and a scripted in-process
//! provider: single-flight, the cached hot path, lifecycle events, connect and
//! disconnect, shutdown.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::store::{CasOutcome, MemoryStore, Store};
use tokenfence::{LifecycleEvent, Provider, TokenManager};
use tokenfence_core::*;

use crate::common::{
    granting_manager, id, keepalive_due, provider, seed, Granting, Scripted, Watched,
};

async fn seeded_store(p: &Provider) -> Arc<Watched> {
    let store = Arc::new(Watched::default());
    let now = SystemClock.now();
    let record = ConnectionRecord {
        realm_id: Some("1".into()),
        ..ConnectionRecord::new(id(), p.identity(), RefreshToken::new("RT-1"), now)
    };
    assert_eq!(
        store.compare_and_swap(None, &record, None).await.unwrap(),
        CasOutcome::Committed
    );
    store
}

async fn manager(store: Arc<Watched>, transport: Arc<Scripted>) -> TokenManager {
    TokenManager::builder()
        .provider(provider())
        .store(store)
        .transport(transport)
        .keepalive_scan(None)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thundering_herd_of_10000_makes_one_provider_call() {
    let p = provider();
    let store = seeded_store(&p).await;
    let transport = Scripted::new(Duration::from_millis(50));
    let tokens = manager(store.clone(), transport.clone()).await;
    let mut tasks = Vec::new();
    for _ in 0..10_000 {
        let t = tokens.clone();
        tasks.push(tokio::spawn(async move { t.access_token(&id()).await }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().expose(), "AT-2");
    }
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        1,
        "exactly one provider call"
    );
    let stored = store.inner.load(&id()).await.unwrap().unwrap();
    assert_eq!(
        stored.refresh.expose(),
        "RT-2",
        "the rotation was persisted"
    );
    tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_connection_actor_answers_its_callers_and_the_next_call_starts_afresh() {
    let p = provider();
    let store = seeded_store(&p).await;
    store.panics.store(1, Ordering::SeqCst);
    let transport = Scripted::new(Duration::ZERO);
    let tokens = manager(store.clone(), transport.clone()).await;
    // The callers waiting when the actor panics are answered, not left hanging.
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let t = tokens.clone();
            tokio::spawn(async move { t.access_token(&id()).await })
        })
        .collect();
    let mut failed = 0;
    for c in callers {
        let answer = tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("a caller was left hanging")
            .unwrap();
        match answer {
            Ok(token) => assert_eq!(token.expose(), "AT-2"),
            Err(tokenfence::ManagerError::ActorFailed) => failed += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(failed >= 1, "the panic reached no caller");
    // The slot was released: the next call starts a fresh actor from the store.
    let token = tokio::time::timeout(Duration::from_secs(10), tokens.access_token(&id()))
        .await
        .expect("wedged after the panic")
        .unwrap();
    assert_eq!(token.expose(), "AT-2");
    assert_eq!(transport.calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokens.live_actors() <= 1, "{}", tokens.live_actors());
    tokens.shutdown().await;
    assert_eq!(tokens.live_actors(), 0, "the dead actor was counted out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_refresh_in_flight_commit_and_release_its_lease() {
    let p = provider();
    let store = seeded_store(&p).await;
    let transport = Scripted::new(Duration::from_millis(400));
    let tokens = manager(store.clone(), transport.clone()).await;
    let caller = {
        let t = tokens.clone();
        tokio::spawn(async move { t.access_token(&id()).await })
    };
    // The refresh is on the wire when the deploy stops the process.
    while transport.calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokens.shutdown().await;
    let stored = store.inner.load(&id()).await.unwrap().unwrap();
    assert_eq!(
        stored.refresh.expose(),
        "RT-2",
        "the rotated token was committed before stopping"
    );
    assert_eq!(stored.in_doubt_since, None);
    assert_eq!(caller.await.unwrap().unwrap().expose(), "AT-2");
    // The lease was released: another worker gets it at once, taking nothing over.
    let now = SystemClock.now();
    let other = WorkerId("next-process".into());
    match store
        .inner
        .acquire_lease(
            &id(),
            &other,
            LeaseRequestId(1),
            now,
            Duration::from_secs(60),
        )
        .await
        .unwrap()
    {
        tokenfence::store::LeaseOutcome::Granted { took_over, .. } => {
            assert_eq!(took_over, None, "a lease was left behind")
        }
        held => panic!("the lease is still held: {held:?}"),
    }
    // And the manager refuses new work.
    assert!(matches!(
        tokens.access_token(&id()).await,
        Err(tokenfence::ManagerError::ShutDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_is_answered_within_the_call_timeout() {
    let p = provider();
    let store = seeded_store(&p).await;
    let transport = Scripted::new(Duration::from_secs(2));
    let tokens = TokenManager::builder()
        .provider(provider())
        .store(store)
        .transport(transport)
        .keepalive_scan(None)
        .call_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = tokens.access_token(&id()).await;
    assert!(
        matches!(answer, Err(tokenfence::ManagerError::TimedOut)),
        "{answer:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    tokens.shutdown().await;
}

#[tokio::test]
async fn cached_token_is_served_without_the_store() {
    let p = provider();
    let store = seeded_store(&p).await;
    let transport = Scripted::new(Duration::ZERO);
    let tokens = manager(store.clone(), transport.clone()).await;
    let first = tokens.access_token(&id()).await.unwrap();
    let loads = store.loads.load(Ordering::SeqCst);
    for _ in 0..1000 {
        assert_eq!(tokens.access_token(&id()).await.unwrap(), first);
    }
    assert_eq!(
        store.loads.load(Ordering::SeqCst),
        loads,
        "no store access on the hot path"
    );
    assert_eq!(transport.calls.load(Ordering::SeqCst), 1);
    tokens.shutdown().await;
}

/// An event callback that panics on one event is still called for the next.
#[tokio::test]
async fn an_event_callback_that_panics_once_hears_later_events() {
    let p = provider();
    let store = seeded_store(&p).await;
    let tokens = manager(store, Scripted::new(Duration::ZERO)).await;
    let seen = Arc::new(Mutex::new(Vec::<Event>::new()));
    let sink = seen.clone();
    tokens.on_event(move |e| {
        if matches!(e.event, Event::Refreshed { .. }) {
            panic!("a bug in the application's handler");
        }
        sink.lock().unwrap().push(e.event.clone());
    });
    tokens.access_token(&id()).await.unwrap();
    assert!(tokens.disconnect(&id()).await.unwrap());
    for _ in 0..500 {
        if !seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Event::Disconnected { revoked: true }]
    );
    tokens.shutdown().await;
}

#[tokio::test]
async fn events_status_and_disconnect() {
    let p = provider();
    let store = seeded_store(&p).await;
    let transport = Scripted::new(Duration::ZERO);
    let tokens = manager(store.clone(), transport.clone()).await;
    let mut events = tokens.subscribe();
    let seen = Arc::new(Mutex::new(Vec::<LifecycleEvent>::new()));
    let sink = seen.clone();
    tokens.on_event(move |e| sink.lock().unwrap().push(e.clone()));

    tokens.access_token(&id()).await.unwrap();
    let e = events.recv().await.unwrap();
    assert_eq!(e.connection, id());
    assert!(matches!(e.event, Event::Refreshed { rotated: true, .. }));
    let status = tokens.status(&id()).await.unwrap().unwrap();
    assert_eq!(status.status, Status::Active);
    assert_eq!(status.generation, Generation(1));

    assert!(
        tokens.disconnect(&id()).await.unwrap(),
        "revocation confirmed"
    );
    let err = tokens.access_token(&id()).await.unwrap_err();
    assert!(
        matches!(
            err,
            tokenfence::ManagerError::Access(AccessError::Disconnected)
        ),
        "{err}"
    );
    assert!(matches!(
        tokens.status(&id()).await.unwrap().unwrap().status,
        Status::Disconnected { .. }
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.event == Event::Disconnected { revoked: true }));
    tokens.shutdown().await;
}

#[tokio::test]
async fn connect_stores_an_authorization_then_serves_it() {
    let p = provider();
    let store = Arc::new(Watched::default());
    let transport = Scripted::new(Duration::ZERO);
    let tokens = manager(store.clone(), transport.clone()).await;
    let grant = parse_token_reply(
        &p.profile,
        &HttpResponse {
            status: 200,
            headers: vec![],
            body: br#"{"access_token":"AT-first","refresh_token":"RT-1","expires_in":3600}"#
                .to_vec(),
        },
    )
    .unwrap();
    let generation = tokens
        .connect(&id(), grant, Some("42".into()))
        .await
        .unwrap();
    assert_eq!(generation, Generation(0));
    assert_eq!(
        tokens.access_token(&id()).await.unwrap().expose(),
        "AT-first"
    );
    assert_eq!(transport.calls.load(Ordering::SeqCst), 0);
    let stored = store.inner.load(&id()).await.unwrap().unwrap();
    assert_eq!(stored.identity.environment, Environment::Production);
    assert_eq!(stored.realm_id.as_deref(), Some("42"));
    tokens.shutdown().await;
}

/// A grant the machine refuses (no refresh token: nothing to keep alive) is
/// answered with the machine's reason, whose remedy is to check the
/// authorization, not as a crashed worker to retry; nothing is stored, and the
/// connection's worker goes on serving.
#[tokio::test]
async fn a_refused_authorization_is_answered_with_its_reason() {
    let p = provider();
    let store = Arc::new(Watched::default());
    let tokens = manager(store.clone(), Scripted::new(Duration::ZERO)).await;
    let reply = |body: &[u8]| {
        parse_token_reply(
            &p.profile,
            &HttpResponse {
                status: 200,
                headers: vec![],
                body: body.to_vec(),
            },
        )
        .unwrap()
    };
    let err = tokens
        .connect(
            &id(),
            reply(br#"{"access_token":"AT-only","expires_in":3600}"#),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tokenfence::ManagerError::Input(InputError::NoRefreshToken)
        ),
        "{err:?}"
    );
    assert!(store.inner.load(&id()).await.unwrap().is_none());
    let generation = tokens
        .connect(
            &id(),
            reply(br#"{"access_token":"AT-1","refresh_token":"RT-1","expires_in":3600}"#),
            None,
        )
        .await
        .unwrap();
    assert_eq!(generation, Generation(0));
    tokens.shutdown().await;
}

#[tokio::test]
async fn unknown_connection_is_a_clear_error() {
    let store = Arc::new(Watched::default());
    let tokens = manager(store, Scripted::new(Duration::ZERO)).await;
    let err = tokens
        .access_token(&ConnectionId("nope".into()))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        tokenfence::ManagerError::Access(AccessError::NotConnected)
    ));
    tokens.shutdown().await;
}

#[tokio::test]
async fn insecure_endpoints_are_refused_at_build() {
    let mut p = provider();
    p.profile.token_url = "http://oauth.example.com/token".into();
    let result = TokenManager::builder()
        .provider(p)
        .store(MemoryStore::new())
        .keepalive_scan(None)
        .build()
        .await;
    assert!(matches!(
        result,
        Err(tokenfence::BuildError::InsecureUrl(_))
    ));
}

#[tokio::test]
async fn settings_that_cannot_work_with_the_provider_are_refused_at_build() {
    let settings = tokenfence_core::Settings {
        send_safety: std::time::Duration::from_secs(90),
        ..Default::default()
    };
    let result = TokenManager::builder()
        .provider(provider())
        .store(MemoryStore::new())
        .settings(settings)
        .keepalive_scan(None)
        .build()
        .await;
    let Err(err) = result else {
        panic!("built with send_safety longer than the lease");
    };
    assert!(matches!(err, tokenfence::BuildError::Settings(_)), "{err}");
    assert!(err.to_string().contains("send_safety"), "{err}");
}

#[tokio::test]
async fn shutdown_stops_every_task() {
    let p = provider();
    let store = seeded_store(&p).await;
    let tokens = manager(store, Scripted::new(Duration::ZERO)).await;
    tokens.access_token(&id()).await.unwrap();
    tokens.shutdown().await;
    let err = tokens.access_token(&ConnectionId("other".into())).await;
    assert!(err.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_pass_over_many_due_connections_opens_few_requests_at_once() {
    let p = provider();
    let store = Arc::new(MemoryStore::new());
    let now = SystemClock.now();
    // 300 connections whose idle deadline is a day away: all due for keep-alive.
    let records = (0..300).map(|i| keepalive_due(&format!("realm-{i}"), p.identity(), now));
    seed(&*store, records).await;
    let transport = Granting::new(Duration::from_millis(20));
    let tokens = granting_manager(store.clone(), transport.clone(), 8).await;
    let sweep = tokens.sweep(None).await.unwrap();
    assert_eq!(sweep.due.len(), 300);
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        300,
        "each refreshed once"
    );
    let most = transport.most.load(Ordering::SeqCst);
    assert!(most <= 8, "{most} requests in flight at once");
    // The pass waited for the outcomes: nothing is due any more.
    let later = SystemClock.now();
    let due = store
        .due_for_work(later, Settings::default().keepalive_lead, None, 1000)
        .await
        .unwrap();
    assert!(due.is_empty(), "{} still due", due.len());
    tokens.shutdown().await;
}

/// A keep-alive scan that panics (a store's bug) does not end keep-alive: the
/// next scan runs on time and refreshes what is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_goes_on_after_a_scan_that_panicked() {
    let p = provider();
    let store = Arc::new(Watched::default());
    store.scan_panics.store(1, Ordering::SeqCst);
    seed(
        &store.inner,
        [keepalive_due("realm-1", p.identity(), SystemClock.now())],
    )
    .await;
    let transport = Granting::new(Duration::ZERO);
    let tokens = TokenManager::builder()
        .provider(p)
        .shared_store(store.clone())
        .transport(transport.clone())
        .keepalive_scan(Some(Duration::from_millis(50)))
        .build()
        .await
        .unwrap();
    for _ in 0..500 {
        if transport.calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.scan_panics.load(Ordering::SeqCst),
        0,
        "the first scan panicked"
    );
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        1,
        "a later scan kept it alive"
    );
    tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_rolled_back_under_a_running_process_is_refused_not_presented() {
    let p = provider();
    let store = Arc::new(Watched::default());
    let now = SystemClock.now();
    let first = ConnectionRecord::new(id(), p.identity(), RefreshToken::new("RT-1"), now);
    assert_eq!(
        store.compare_and_swap(None, &first, None).await.unwrap(),
        CasOutcome::Committed
    );
    let backup = store.inner.load(&id()).await.unwrap().unwrap();
    let transport = Scripted::new(Duration::ZERO);
    let tokens = TokenManager::builder()
        .provider(p)
        .shared_store(store.clone())
        .transport(transport.clone())
        .keepalive_scan(None)
        .build()
        .await
        .unwrap();
    assert_eq!(tokens.access_token(&id()).await.unwrap().expose(), "AT-2");
    assert_eq!(transport.calls.load(Ordering::SeqCst), 1);
    // The database is restored from a backup taken before the rotation: its
    // refresh token (RT-1) is the one the provider rotated away.
    *store.restored.lock().unwrap() = Some(backup);
    let answer = tokio::time::timeout(Duration::from_secs(20), tokens.refresh_now(&id(), false))
        .await
        .expect("no answer: the rolled-back record was believed");
    assert!(
        matches!(
            answer,
            Err(tokenfence::ManagerError::Access(AccessError::Transient {
                kind: FailureKind::StoreUnavailable,
                ..
            }))
        ),
        "{answer:?}"
    );
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        1,
        "the rolled-back token was presented"
    );
    let status = tokens.status(&id()).await;
    let Err(tokenfence::ManagerError::Store(e)) = status else {
        panic!("{status:?}");
    };
    assert!(e.to_string().contains("rolled back"), "{e}");
    tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_deadline_notices_of_many_connections_are_bounded_too() {
    let p = provider();
    let store = Arc::new(MemoryStore::new());
    let now = SystemClock.now();
    // 300 connections not due for keep-alive whose hard deadline is inside the
    // 60-day notice, with no access token: each wake announces and refreshes.
    let records = (0..300).map(|i| ConnectionRecord {
        hard_deadline: Some(now.saturating_add(days(30))),
        ..ConnectionRecord::new(
            ConnectionId(format!("realm-{i}")),
            p.identity(),
            RefreshToken::new(format!("RT-{i}")),
            now,
        )
    });
    seed(&*store, records).await;
    let transport = Granting::new(Duration::from_millis(20));
    let tokens = granting_manager(store.clone(), transport.clone(), 8).await;
    let mut events = tokens.subscribe();
    let sweep = tokens.sweep(None).await.unwrap();
    assert_eq!((sweep.due.len(), sweep.notices.len()), (0, 300));
    assert_eq!(transport.calls.load(Ordering::SeqCst), 300);
    let most = transport.most.load(Ordering::SeqCst);
    assert!(most <= 8, "{most} requests in flight at once");
    let mut notices = 0;
    while let Ok(e) = events.try_recv() {
        notices += usize::from(matches!(e.event, Event::ReconnectSoon { .. }));
    }
    assert_eq!(
        notices, 300,
        "every notice announced by the time the pass returns"
    );
    tokens.shutdown().await;
}
