//! Connect and reconnect through the authorization-code flow, end to end against
//! the mock provider over loopback HTTP and a sealed SQLite store: begin → consent
//! → callback → Active; a replayed, forged or expired state, `access_denied`, and
//! a reconnect that comes back for another company each a clear outcome with
//! nothing stored changed; a callback finished by another process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::crypto::{EncryptionKey, KeyId, Keyring};
use tokenfence::store::{SqliteStore, Store};
use tokenfence::{ConnectOutcome, ManagerError, Provider, Remedy, TokenManager};
use tokenfence_core::*;
use tokenfence_sim::mock::{Control, MockProvider};
use tokenfence_sim::provider::ProviderSpec;

use crate::common::serve_mock;

const CALLBACK: &str = "http://127.0.0.1:1/qbo/callback";

/// The system clock, moved forward on demand (the pending authorization's ten
/// minutes pass in a test).
#[derive(Clone, Default)]
struct Later(Arc<AtomicU64>);

impl Clock for Later {
    fn now(&self) -> Timestamp {
        SystemClock
            .now()
            .saturating_add(Duration::from_secs(self.0.load(Ordering::SeqCst)))
    }
}

struct World {
    mock: MockProvider,
    store: SqliteStore,
    clock: Later,
    tokens: TokenManager,
    _dir: tempfile::TempDir,
}

fn keyring() -> Keyring {
    Keyring::new(KeyId(1), EncryptionKey::from_slice(&[9; 32]).unwrap())
}

async fn manager(mock: &MockProvider, store: &SqliteStore, clock: Later) -> TokenManager {
    let provider = Provider {
        profile: mock.spec().profile,
        client: mock.spec().clients[0].credentials(),
    };
    TokenManager::builder()
        .provider(provider)
        .store(store.clone())
        .clock(clock)
        .keepalive_scan(None)
        .build()
        .await
        .unwrap()
}

async fn world() -> World {
    let (mock, _) = serve_mock(ProviderSpec::intuit()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("tokens.db"), keyring()).unwrap();
    let clock = Later::default();
    let tokens = manager(&mock, &store, clock.clone()).await;
    World {
        mock,
        store,
        clock,
        tokens,
        _dir: dir,
    }
}

/// The user at the consent page (`extra`: the mock's test hooks, e.g. the
/// company picked or "deny"): the query of the redirect back to the app.
async fn consent(url: &str, extra: &str) -> String {
    let reply = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{url}{extra}"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 302, "{url}");
    let location = reply.headers()["location"].to_str().unwrap();
    assert!(location.starts_with(CALLBACK), "{location}");
    location.split_once('?').unwrap().1.to_owned()
}

fn id() -> ConnectionId {
    ConnectionId("qbo-4620816365".into())
}

async fn stored(w: &World) -> ConnectionRecord {
    w.store.load(&id()).await.unwrap().unwrap()
}

async fn begin(w: &World, options: ConnectOptions) -> String {
    w.tokens
        .begin_connect(&id(), CALLBACK, options)
        .await
        .unwrap()
        .url
}

fn connect_error(result: Result<ConnectOutcome, ManagerError>) -> ConnectError {
    match result {
        Err(ManagerError::Connect(e)) => e,
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_then_every_wrong_callback_changes_nothing() {
    let w = world().await;
    let mut events = w.tokens.subscribe();

    // A new connection: begin → consent → callback → Active.
    let begun = w
        .tokens
        .begin_connect(&id(), CALLBACK, ConnectOptions::default())
        .await
        .unwrap();
    assert!(!begun.reconnect);
    let url = begun.url;
    assert!(
        url.contains("scope=com.intuit.quickbooks.accounting"),
        "{url}"
    );
    assert!(url.contains("code_challenge=") && url.contains("code_challenge_method=S256"));
    let query = consent(&url, "").await;
    let started = Instant::now();
    let outcome = w.tokens.finish_connect(&query).await.unwrap();
    let took = started.elapsed();
    assert_eq!(
        outcome,
        ConnectOutcome::Connected {
            connection: id(),
            generation: Generation(0),
            realm_id: Some("9130350000000001".into()),
            reconnected: false,
            old_grant_revoked: None,
        }
    );
    eprintln!("callback to Active (exchange over loopback, SQLite commit): {took:?}");
    assert!(matches!(
        events.recv().await.unwrap().event,
        Event::Connected { .. }
    ));
    assert!(w.tokens.access_token(&id()).await.is_ok());
    let before = stored(&w).await;
    let grants = w.mock.stats().grants;

    // The same callback again (a reload, a replay): the state was used.
    let replay = w.tokens.finish_connect(&query).await;
    assert_eq!(
        replay.as_ref().unwrap_err().remedy(),
        Remedy::BeginConnectAgain
    );
    assert_eq!(connect_error(replay), ConnectError::UnknownState);
    // A forged state, a callback that is not one.
    let forged = query.replace("state=", "state=x");
    assert_eq!(
        connect_error(w.tokens.finish_connect(&forged).await),
        ConnectError::UnknownState
    );
    assert!(matches!(
        connect_error(w.tokens.finish_connect("code=abc").await),
        ConnectError::BadCallback(_)
    ));
    // The user denies: an outcome, not an error.
    let url = begin(&w, ConnectOptions::default()).await;
    let denied = w
        .tokens
        .finish_connect(&consent(&url, "&mock_deny=1").await)
        .await
        .unwrap();
    assert!(
        matches!(&denied, ConnectOutcome::Denied { error, .. } if error == "access_denied"),
        "{denied:?}"
    );
    // A reconnect that comes back for another company: refused before the code
    // is exchanged.
    let begun = w
        .tokens
        .begin_connect(&id(), CALLBACK, ConnectOptions::default())
        .await
        .unwrap();
    assert!(begun.reconnect);
    let other_company = consent(&begun.url, "&mock_realm=1111").await;
    let refused = connect_error(w.tokens.finish_connect(&other_company).await);
    assert!(
        matches!(&refused, ConnectError::RealmMismatch { expected, got, .. } if expected == "9130350000000001" && got == "1111"),
        "{refused:?}"
    );
    // Expired: ten minutes at the consent page.
    let url = begin(&w, ConnectOptions::default()).await;
    let query = consent(&url, "").await;
    w.clock.0.store(601, Ordering::SeqCst);
    assert!(matches!(
        connect_error(w.tokens.finish_connect(&query).await),
        ConnectError::Expired { .. }
    ));
    w.clock.0.store(0, Ordering::SeqCst);

    // None of it changed the connection or exchanged a code.
    assert_eq!(stored(&w).await, before);
    assert_eq!(w.mock.stats().grants, grants);
    w.tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_revives_a_dead_connection_and_may_replace_the_company() {
    let w = world().await;
    let url = begin(&w, ConnectOptions::default()).await;
    w.tokens
        .finish_connect(&consent(&url, "").await)
        .await
        .unwrap();
    // The user disconnects the app at Intuit: the next refresh finds the grant gone.
    w.mock.control(Control::Revoke { grant: None });
    let first = stored(&w).await;
    let _ = w.tokens.refresh_now(&id(), false).await;
    assert!(matches!(
        stored(&w).await.status,
        Status::ReauthRequired { .. }
    ));

    // Another process has the dead verdict cached.
    let other_store = SqliteStore::open(w._dir.path().join("tokens.db"), keyring()).unwrap();
    let other = manager(&w.mock, &other_store, Later::default()).await;
    assert!(matches!(
        other.access_token(&id()).await,
        Err(ManagerError::Access(AccessError::ReauthRequired(_)))
    ));

    // Reconnect: the same company, a new generation, Active again.
    let url = begin(&w, ConnectOptions::default()).await;
    let outcome = w
        .tokens
        .finish_connect(&consent(&url, "").await)
        .await
        .unwrap();
    let ConnectOutcome::Connected {
        generation,
        reconnected,
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert!(reconnected);
    assert!(generation > first.generation);
    assert_eq!(stored(&w).await.status, Status::Active);
    assert!(w.tokens.access_token(&id()).await.is_ok());
    // The other process sees the revived connection within `dead_recheck`.
    tokio::time::sleep(Settings::default().dead_recheck + Duration::from_millis(100)).await;
    assert!(other.access_token(&id()).await.is_ok());
    other.shutdown().await;

    // Another company, allowed by the caller: replaced, the old grant revoked.
    let old = stored(&w).await.refresh;
    let options = ConnectOptions {
        replace_realm: true,
        ..ConnectOptions::default()
    };
    let url = begin(&w, options).await;
    let outcome = w
        .tokens
        .finish_connect(&consent(&url, "&mock_realm=2222").await)
        .await
        .unwrap();
    assert!(
        matches!(&outcome, ConnectOutcome::Connected { realm_id: Some(r), old_grant_revoked: Some(true), .. } if r == "2222"),
        "{outcome:?}"
    );
    assert_eq!(stored(&w).await.realm_id.as_deref(), Some("2222"));
    assert_ne!(stored(&w).await.refresh, old);
    w.tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_lands_on_another_process_and_two_racing_callbacks_make_one_connection() {
    let w = world().await;
    // Another process over the same database.
    let other_store = SqliteStore::open(w._dir.path().join("tokens.db"), keyring()).unwrap();
    let other = manager(&w.mock, &other_store, Later::default()).await;
    let url = begin(&w, ConnectOptions::default()).await;
    let query = consent(&url, "").await;
    // The same callback delivered twice at once (a double click, a retrying proxy),
    // once to each process: one connects, the other is told the state was used.
    let (a, b) = tokio::join!(
        w.tokens.finish_connect(&query),
        other.finish_connect(&query)
    );
    let outcomes = [a, b];
    let connected = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(connected, 1, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .any(|o| matches!(o, Err(ManagerError::Connect(ConnectError::UnknownState)))));
    assert_eq!(w.mock.stats().grants, 1, "the code was exchanged once");
    assert_eq!(stored(&w).await.generation, Generation(0));
    other.shutdown().await;
    w.tokens.shutdown().await;
}

/// Delivers each reply `delay` after the provider sent it, and says when the
/// provider has answered (`answered`).
struct SlowReplies {
    inner: tokenfence::transport::ReqwestTransport,
    delay: Duration,
    answered: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl tokenfence::transport::Transport for SlowReplies {
    async fn send(&self, request: &HttpRequest) -> tokenfence::transport::Delivery {
        let delivery = self.inner.send(request).await;
        self.answered.notify_one();
        tokio::time::sleep(self.delay).await;
        delivery
    }
}

/// A second manager on `w`'s store whose replies arrive 400 ms after the
/// provider answered, and the signal of that answer.
async fn slow_manager(w: &World) -> (TokenManager, Arc<tokio::sync::Notify>) {
    let answered = Arc::new(tokio::sync::Notify::new());
    let transport = SlowReplies {
        inner: tokenfence::transport::ReqwestTransport::new(Arc::new(w.clock.clone())).unwrap(),
        delay: Duration::from_millis(400),
        answered: answered.clone(),
    };
    let tokens = TokenManager::builder()
        .provider(Provider {
            profile: w.mock.spec().profile,
            client: w.mock.spec().clients[0].credentials(),
        })
        .store(w.store.clone())
        .clock(w.clock.clone())
        .transport(Arc::new(transport))
        .keepalive_scan(None)
        .build()
        .await
        .unwrap();
    (tokens, answered)
}

/// A slow manager on `w`'s store, the query of a callback for `id()` it began
/// (the user having consented), and the signal that the provider answered.
async fn slow_callback(w: &World) -> (TokenManager, String, Arc<tokio::sync::Notify>) {
    let (tokens, answered) = slow_manager(w).await;
    let begun = tokens
        .begin_connect(&id(), CALLBACK, ConnectOptions::default())
        .await
        .unwrap();
    let query = consent(&begun.url, "").await;
    (tokens, query, answered)
}

/// The caller of `finish_connect` gives up (its web framework's timeout) after
/// the provider issued the tokens but before they reached the process: the
/// state is used up, so the tokens must be stored all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_whose_caller_gives_up_still_stores_the_grant() {
    let w = world().await;
    let (tokens, query, answered) = slow_callback(&w).await;
    // The caller stops waiting once the provider has issued the tokens.
    tokio::select! {
        r = tokens.finish_connect(&query) => panic!("finished before the reply came: {r:?}"),
        _ = answered.notified() => {}
    }
    let mut record = None;
    for _ in 0..200 {
        record = w.store.load(&id()).await.unwrap();
        if record.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = record.expect("the grant was stored after its caller gave up");
    assert_eq!(record.status, Status::Active);
    assert!(tokens.access_token(&id()).await.is_ok());
    tokens.shutdown().await;
    w.tokens.shutdown().await;
}

/// A deploy shuts the process down while a callback's code is being exchanged:
/// the tokens are stored all the same (shutdown waits for them). A callback that
/// arrives once shutdown began leaves its state for another process to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_callback_still_stores_the_grant() {
    let w = world().await;
    let (tokens, query, answered) = slow_callback(&w).await;
    let finishing = {
        let tokens = tokens.clone();
        tokio::spawn(async move { tokens.finish_connect(&query).await })
    };
    answered.notified().await;
    tokens.shutdown().await;
    let outcome = finishing.await.unwrap();
    assert!(
        matches!(outcome, Ok(ConnectOutcome::Connected { .. })),
        "{outcome:?}"
    );
    assert_eq!(stored(&w).await.status, Status::Active);

    let other = ConnectionId("qbo-other".into());
    let begun = w
        .tokens
        .begin_connect(&other, CALLBACK, ConnectOptions::default())
        .await
        .unwrap();
    let query = consent(&begun.url, "").await;
    let refused = tokens.finish_connect(&query).await;
    assert!(
        matches!(refused, Err(ManagerError::ShutDown)),
        "{refused:?}"
    );
    let finished = w.tokens.finish_connect(&query).await;
    assert!(
        matches!(finished, Ok(ConnectOutcome::Connected { .. })),
        "another process finishes it: {finished:?}"
    );
    w.tokens.shutdown().await;
}
