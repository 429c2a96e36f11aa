//! The resource API's 401 through the manager: `reject` and `call`. A refused
//! token is never served again; every caller that reports it shares one
//! refresh, in one process and across two; a late report sends nothing; `call`
//! retries once, never more.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::store::{CasOutcome, MemoryStore, Store};
use tokenfence::{ApiResult, ManagerError};
use tokenfence_core::*;

use crate::common::{id, memory_manager, provider, Scripted};

async fn seeded_store() -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let record = ConnectionRecord {
        realm_id: Some("1".into()),
        ..ConnectionRecord::new(
            id(),
            provider().identity(),
            RefreshToken::new("RT-1"),
            SystemClock.now(),
        )
    };
    assert_eq!(
        store.compare_and_swap(None, &record, None).await.unwrap(),
        CasOutcome::Committed
    );
    store
}

/// Past the floor between two refreshes of a connection (1 s by default).
async fn past_the_refresh_floor() {
    tokio::time::sleep(Duration::from_millis(1_100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_reported_by_1000_callers_is_refreshed_once_and_never_served_again() {
    let transport = Scripted::new(Duration::from_millis(50));
    let tokens = memory_manager(seeded_store().await, transport.clone()).await;
    let first = tokens.access_token(&id()).await.unwrap();
    assert_eq!(first.expose(), "AT-2");
    past_the_refresh_floor().await;
    let mut reports = Vec::new();
    for _ in 0..1_000 {
        let (t, token) = (tokens.clone(), first.clone());
        reports.push(tokio::spawn(async move { t.reject(&id(), &token).await }));
    }
    for r in reports {
        assert_eq!(r.await.unwrap().unwrap().expose(), "AT-3");
    }
    assert_eq!(transport.calls.load(Ordering::SeqCst), 2, "one refresh");
    // Neither the hot path nor the machine serves the refused token.
    assert_eq!(tokens.access_token(&id()).await.unwrap().expose(), "AT-3");
    // A late 401 about the old token changes nothing.
    let late = tokens.reject(&id(), &first).await.unwrap();
    assert_eq!(late.expose(), "AT-3");
    assert_eq!(transport.calls.load(Ordering::SeqCst), 2, "nothing sent");
    tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_in_two_processes_is_refreshed_once() {
    let store = seeded_store().await;
    let transport = Scripted::new(Duration::from_millis(20));
    let a = memory_manager(store.clone(), transport.clone()).await;
    let b = memory_manager(store, transport.clone()).await;
    let token = a.access_token(&id()).await.unwrap();
    assert_eq!(
        b.access_token(&id()).await.unwrap(),
        token,
        "from the store"
    );
    past_the_refresh_floor().await;
    assert_eq!(a.reject(&id(), &token).await.unwrap().expose(), "AT-3");
    assert_eq!(b.reject(&id(), &token).await.unwrap().expose(), "AT-3");
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        2,
        "the second process found the new token stored"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_retries_once_with_a_fresh_token_and_never_more() {
    let transport = Scripted::new(Duration::ZERO);
    let tokens = memory_manager(seeded_store().await, transport.clone()).await;
    tokens.access_token(&id()).await.unwrap();
    past_the_refresh_floor().await;
    // The API refuses AT-2 and takes AT-3.
    let attempts = AtomicUsize::new(0);
    let answer = tokens
        .call(&id(), |token| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                match token.expose() {
                    "AT-2" => ApiResult::Unauthorized,
                    other => ApiResult::Done(other.to_string()),
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(answer, "AT-3");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(transport.calls.load(Ordering::SeqCst), 2);
    // An API that refuses every token: two attempts, then the error.
    past_the_refresh_floor().await;
    let attempts = AtomicUsize::new(0);
    let refused = tokens
        .call(&id(), |_| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { ApiResult::<()>::Unauthorized }
        })
        .await;
    assert!(
        matches!(refused, Err(ManagerError::Unauthorized)),
        "{refused:?}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "never more than twice");
    assert_eq!(transport.calls.load(Ordering::SeqCst), 3, "one refresh");
    tokens.shutdown().await;
}

/// Errors say what to do without matching nested enums (`ManagerError::remedy`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do() {
    use tokenfence::{ExistingGrant, ImportOptions, Remedy};
    let transport = Scripted::new(Duration::ZERO);
    let tokens = memory_manager(seeded_store().await, transport.clone()).await;
    let nobody = tokens.access_token(&ConnectionId("nobody".into())).await;
    assert_eq!(nobody.unwrap_err().remedy(), Remedy::NotConnected);
    // A grant the provider no longer accepts: reconnect, and why.
    let dead = ConnectionId("dead".into());
    let grant = ExistingGrant {
        refresh: RefreshToken::new("RT-unknown-to-the-provider"),
        access: None,
        realm_id: None,
        idle_deadline: None,
        hard_deadline: None,
    };
    tokens
        .import(&dead, grant, ImportOptions::default())
        .await
        .unwrap();
    let gone = tokens.access_token(&dead).await.unwrap_err();
    assert_eq!(
        gone.remedy(),
        Remedy::Reconnect(ReauthReason::InvalidGrant),
        "{gone}"
    );
    // An API that refuses every token: look at the authorization.
    tokens.access_token(&id()).await.unwrap();
    past_the_refresh_floor().await;
    let refused = tokens
        .call(&id(), |_| async { ApiResult::<()>::Unauthorized })
        .await
        .unwrap_err();
    assert_eq!(refused.remedy(), Remedy::CheckAuthorization);
    // Right after that refresh, another report: come back at the floor's end.
    let token = tokens.access_token(&id()).await.unwrap();
    let throttled = tokens.reject(&id(), &token).await.unwrap_err();
    assert!(
        matches!(throttled.remedy(), Remedy::RetryAt(_)),
        "{throttled}"
    );
    tokens.shutdown().await;
}
