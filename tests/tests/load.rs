//! The load test, short (the full runs are `tokenfence-load`, README "Load"):
//! 2,000 connections with 4-second access tokens under 16 callers for 10 s, on
//! SQLite and on PostgreSQL: exactly one provider call per rotation (the mock's
//! own counters: a duplicated or refused refresh would be a call without a
//! rotation) and no caller error.

use std::time::Duration;
use tokenfence_tests::load::{run, LoadOptions, LoadStore};

async fn short(store: LoadStore) {
    let report = run(&LoadOptions {
        connections: 2_000,
        duration: Duration::from_secs(10),
        callers: 16,
        access_ttl: Duration::from_secs(4),
        store,
        mock_url: None,
        seed: true,
    })
    .await
    .expect("the load test runs");
    eprintln!("{report:#?}");
    assert_eq!(report.errors, 0, "{:?}", report.error_examples);
    assert!(
        report.rotations > 500,
        "too little load to judge: {report:?}"
    );
    assert_eq!(
        report.provider_calls, report.rotations,
        "a provider call that did not rotate: duplicated or refused"
    );
    assert!(report.tokens_served > 10 * report.rotations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_holds_one_call_per_rotation_under_load() {
    let dir = tempfile::tempdir().unwrap();
    short(LoadStore::Sqlite(dir.path().join("load.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_holds_one_call_per_rotation_under_load() {
    let Ok(url) = std::env::var("TOKENFENCE_PG_URL") else {
        assert_eq!(
            std::env::var("TOKENFENCE_SKIP_PG").as_deref(),
            Ok("1"),
            "set TOKENFENCE_PG_URL (scripts/postgres start) or TOKENFENCE_SKIP_PG=1"
        );
        return;
    };
    // A schema of its own, so the table starts empty.
    let schema = format!("load_test_{}", std::process::id());
    short(LoadStore::Postgres { url, schema }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_refreshes_every_due_idle_connection_once_and_skips_none() {
    let dir = tempfile::tempdir().unwrap();
    let report = tokenfence_tests::load::keepalive(
        2_500,
        16,
        &LoadStore::Sqlite(dir.path().join("sweep.db")),
    )
    .await
    .expect("the keep-alive runs");
    eprintln!("{report:#?}");
    assert_eq!(report.still_due, 0, "a due connection was skipped");
    assert_eq!(report.provider_calls, 2_500, "one refresh per connection");
    assert!(
        report.passes >= 3,
        "passes work at most 1,000 connections each"
    );
}
