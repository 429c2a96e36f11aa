//! Rows a keep-alive pass cannot work do not starve the others. Unreadable rows
//! (corrupt, foreign ciphertext, a key the keyring lacks) are quarantined: a
//! distinct event, callers told at once, never retried as if the store were down,
//! and skipped by passes; rows of another client (or dead, or disconnected) are
//! skipped too. 2,000 of any of them due before a due connection do not starve
//! it: passes take the earliest due first and page past what they cannot work.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::crypto::{EncryptionKey, KeyId, Keyring};
use tokenfence::store::{SqliteStore, Store, StoreError};
use tokenfence::ManagerError;
use tokenfence_core::*;

use crate::common::{granting_manager, keepalive_due, provider, seed, Granting};

/// The connection that can be worked: due (keep-alive) a day after the 2,000
/// that cannot, whose ids sort after it (neither id order nor a fixed limit
/// reaches it when passes meet those first).
fn healthy(identity: GrantIdentity, now: Timestamp) -> ConnectionRecord {
    let mut r = keepalive_due("0-due", identity, now);
    r.idle_deadline = r.idle_deadline.map(|d| d.saturating_add(days(1)));
    r
}

/// Keep-alive passes until the first request; at most three (2,000 rows a
/// pass cannot work are met by the first two, at most 1,000 each).
async fn passes_until_served(tokens: &tokenfence::TokenManager, transport: &Granting) {
    let mut passes = 0;
    while transport.calls.load(Ordering::SeqCst) == 0 {
        passes += 1;
        assert!(passes <= 3, "the healthy connection was starved");
        tokens.sweep(None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_corrupt_rows_ahead_of_a_due_connection_do_not_starve_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.db");
    let key = EncryptionKey::from_slice(&[7; 32]).unwrap();
    let store = Arc::new(SqliteStore::open(&path, Keyring::new(KeyId(1), key)).unwrap());
    let p = provider();
    let now = SystemClock.now();
    // 2,000 rows due before the healthy one, then made unreadable.
    let records = (0..2_000).map(|i| keepalive_due(&format!("a-{i:04}"), p.identity(), now));
    seed(&*store, records.chain([healthy(p.identity(), now)])).await;
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.busy_timeout(Duration::from_secs(10)).unwrap();
    let n = raw
        .execute(
            "UPDATE tokenfence_connections SET sealed = zeroblob(40) WHERE id LIKE 'a-%'",
            [],
        )
        .unwrap();
    assert_eq!(n, 2_000);

    let transport = Granting::new(Duration::ZERO);
    let tokens = granting_manager(store.clone(), transport.clone(), 16).await;
    let mut events = tokens.subscribe();
    let announced = tokio::spawn(async move {
        let mut quarantined = std::collections::BTreeMap::new();
        while let Ok(e) = events.recv().await {
            if e.event == Event::Quarantined {
                *quarantined.entry(e.connection.clone()).or_insert(0) += 1;
            }
        }
        quarantined
    });
    passes_until_served(&tokens, &transport).await;
    let healthy = store
        .load(&ConnectionId("0-due".into()))
        .await
        .unwrap()
        .unwrap();
    assert!(healthy.last_refreshed_at.is_some(), "kept alive");
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        1,
        "nothing sent for a corrupt row"
    );
    // A caller is told at once, with the reason, not after store-outage retries.
    let started = std::time::Instant::now();
    let answer = tokens.access_token(&ConnectionId("a-0042".into())).await;
    assert!(
        matches!(answer, Err(ManagerError::Store(StoreError::Corrupt { .. }))),
        "{answer:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    tokens.shutdown().await;
    drop(tokens); // closes the event channel
                  // Every unreadable row the passes met was announced once, as what it is.
    let quarantined = tokio::time::timeout(Duration::from_secs(10), announced)
        .await
        .expect("the event channel closed")
        .unwrap();
    assert!(quarantined.len() >= 1_000, "{}", quarantined.len());
    assert!(quarantined.values().all(|n| *n == 1), "announced twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_rows_of_another_client_ahead_of_a_due_connection_do_not_starve_it() {
    let store = Arc::new(tokenfence::store::MemoryStore::new());
    let p = provider();
    let now = SystemClock.now();
    let other = GrantIdentity {
        client_id: "someone-elses-app".into(),
        ..p.identity()
    };
    let records = (0..2_000).map(|i| keepalive_due(&format!("a-{i:04}"), other.clone(), now));
    seed(&*store, records.chain([healthy(p.identity(), now)])).await;
    let transport = Granting::new(Duration::ZERO);
    let tokens = granting_manager(store.clone(), transport.clone(), 16).await;
    passes_until_served(&tokens, &transport).await;
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        1,
        "sent with the wrong client"
    );
    tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_dead_rows_with_expired_leases_ahead_of_a_due_connection_do_not_starve_it() {
    let store = Arc::new(tokenfence::store::MemoryStore::new());
    let p = provider();
    let now = SystemClock.now();
    // Dead grants whose holder died mid-lease: due as abandoned leases since
    // their expiry, long before the healthy connection.
    let dead = (0..2_000).map(|i| {
        let mut r = keepalive_due(&format!("a-{i:04}"), p.identity(), now);
        r.status = Status::ReauthRequired {
            reason: ReauthReason::InvalidGrant,
            since: now,
        };
        r
    });
    seed(&*store, dead.chain([healthy(p.identity(), now)])).await;
    let gone = WorkerId("a-process-that-died".into());
    let long_ago = now.saturating_sub(days(30));
    for i in 0..2_000 {
        let outcome = store
            .acquire_lease(
                &ConnectionId(format!("a-{i:04}")),
                &gone,
                LeaseRequestId(1),
                long_ago,
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(matches!(
            outcome,
            tokenfence::store::LeaseOutcome::Granted { .. }
        ));
    }
    assert_eq!(
        store
            .due_for_work(now, Duration::ZERO, None, 1)
            .await
            .unwrap()[0]
            .id
            .0,
        "a-0000",
        "the dead rows come first"
    );
    let transport = Granting::new(Duration::ZERO);
    let tokens = granting_manager(store.clone(), transport.clone(), 16).await;
    passes_until_served(&tokens, &transport).await;
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        1,
        "sent for a dead grant"
    );
    tokens.shutdown().await;
}
