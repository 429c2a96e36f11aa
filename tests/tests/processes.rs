//! Many OS processes sharing one store: eight `tf-worker` processes hammer the same
//! connections through several rotations of a strict, reuse-detecting provider.
//! Then a worker is killed with SIGKILL between the provider's reply and its commit.
//! Runs on a shared SQLite file and on PostgreSQL (`TOKENFENCE_PG_URL`, started by
//! `scripts/test`; set `TOKENFENCE_SKIP_PG=1` to run without it on purpose).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokenfence::crypto::{EncryptionKey, Keyring};
use tokenfence::store::{PostgresStore, SqliteStore, Store};
use tokenfence_core::{ConnectionId, ReauthReason, Status};
use tokenfence_sim::provider::BehaviourClass;
use tokenfence_tests::*;

const WORKERS: usize = 8;
const CONNECTIONS: usize = 3;

struct Shared {
    arg: String,
    /// Connection ids are `{prefix}-{i}`: unique per test, so tests can share a
    /// PostgreSQL database.
    prefix: String,
    keyring: String,
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("realm-{}-{nanos}", std::process::id())
}

fn keyring_spec() -> String {
    let key = EncryptionKey::generate().expect("key");
    format!("1:{}", key.to_base64().as_str())
}

async fn sqlite() -> Shared {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokens.db");
    let keyring = keyring_spec();
    let store =
        SqliteStore::open(&path, Keyring::from_spec(&keyring).expect("keyring")).expect("open");
    Shared {
        arg: format!("sqlite:{}", path.display()),
        prefix: unique_prefix(),
        keyring,
        store: Arc::new(store),
        _dir: Some(dir),
    }
}

async fn postgres() -> Option<Shared> {
    let Ok(url) = std::env::var("TOKENFENCE_PG_URL") else {
        assert!(
            std::env::var("TOKENFENCE_SKIP_PG").is_ok_and(|v| v == "1"),
            "TOKENFENCE_PG_URL is not set: run ./scripts/test (it starts PostgreSQL), \
             or set TOKENFENCE_SKIP_PG=1 to skip the PostgreSQL tests on purpose"
        );
        return None;
    };
    let keyring = keyring_spec();
    let store = PostgresStore::connect(&url, Keyring::from_spec(&keyring).expect("keyring"))
        .await
        .expect("connect");
    Some(Shared {
        arg: format!("postgres:{url}"),
        prefix: unique_prefix(),
        keyring,
        store: Arc::new(store),
        _dir: None,
    })
}

fn id(shared: &Shared, i: usize) -> ConnectionId {
    ConnectionId(format!("{}-{i}", shared.prefix))
}

async fn seed(mock: &Mock, shared: &Shared) {
    let tokens = manager(mock, shared.store.clone(), eager_settings()).await;
    for i in 0..CONNECTIONS {
        tokens
            .connect(&id(shared, i), mock.authorize(), None)
            .await
            .expect("connect");
    }
    tokens.shutdown().await;
}

fn spawn(
    mock: &Mock,
    shared: &Shared,
    class: BehaviourClass,
    seconds: u64,
    extra: &[&str],
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_tf-worker"))
        .args([
            &shared.arg,
            &shared.keyring,
            &mock.base,
            class.name(),
            &CONNECTIONS.to_string(),
            &seconds.to_string(),
            &shared.prefix,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tf-worker")
}

fn finish(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "worker failed: {:?}", out.status);
    serde_json::from_slice(&out.stdout).expect("worker summary")
}

async fn hammer(shared: Shared) {
    let class = BehaviourClass::ReuseDetection;
    let mock = Mock::scaled(class).await;
    seed(&mock, &shared).await;
    let children: Vec<_> = (0..WORKERS)
        .map(|_| spawn(&mock, &shared, class, 5, &[]))
        .collect();
    let summaries: Vec<_> =
        tokio::task::spawn_blocking(move || children.into_iter().map(finish).collect::<Vec<_>>())
            .await
            .expect("join");
    let served: u64 = summaries
        .iter()
        .map(|s| s["served"].as_u64().unwrap_or(0))
        .sum();
    for s in &summaries {
        assert_eq!(
            s["errors"].as_array().map(Vec::len),
            Some(0),
            "worker errors: {s}"
        );
    }
    let stats = mock.mock.stats();
    assert!(stats.rejections.is_empty(), "zero invalid_grant: {stats:?}");
    assert_eq!(stats.client_rejections, 0);
    assert!(
        stats.rotations >= (CONNECTIONS as u64) * 3,
        "several rotations each: {stats:?}"
    );
    assert_eq!(
        stats.token_requests, stats.rotations,
        "one provider call per rotation: {stats:?}"
    );
    for i in 0..CONNECTIONS {
        let record = shared
            .store
            .load(&id(&shared, i))
            .await
            .expect("load")
            .expect("record");
        assert_eq!(record.status, Status::Active, "connection {i} alive");
    }
    eprintln!(
        "{WORKERS} processes: {served} tokens served, {} rotations, {} provider calls",
        stats.rotations, stats.token_requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_share_a_sqlite_file_without_a_single_invalid_grant() {
    hammer(sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_share_postgres_without_a_single_invalid_grant() {
    if let Some(shared) = postgres().await {
        hammer(shared).await;
    }
}

/// SIGKILL between the provider's reply and the commit; the survivors carry on.
async fn killed_between_reply_and_commit(
    shared: Shared,
    class: BehaviourClass,
) -> (Status, tokenfence_sim::mock::Stats) {
    let mock = Mock::scaled(class).await;
    seed(&mock, &shared).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let marker = format!("{}.replied", shared.prefix);
    let marker = std::env::temp_dir().join(marker);
    let _ = std::fs::remove_file(&marker);
    let victim = spawn(
        &mock,
        &shared,
        class,
        30,
        &["--hang-after-reply", &marker.display().to_string()],
    );
    let mut victim = Some(victim);
    for _ in 0..200 {
        if marker.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(marker.exists(), "the victim received a refresh reply");
    if let Some(mut v) = victim.take() {
        v.kill().expect("SIGKILL");
        let _ = v.wait();
    }
    let _ = std::fs::remove_file(&marker);
    let survivors: Vec<_> = (0..3)
        .map(|_| spawn(&mock, &shared, class, 8, &[]))
        .collect();
    tokio::task::spawn_blocking(move || {
        for c in survivors {
            let _ = c.wait_with_output();
        }
    })
    .await
    .expect("join");
    let record = shared
        .store
        .load(&id(&shared, 0))
        .await
        .expect("load")
        .expect("record");
    (record.status, mock.mock.stats())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_reply_and_commit_is_recovered_under_a_grace_window() {
    let (status, stats) =
        killed_between_reply_and_commit(sqlite().await, BehaviourClass::GraceIdempotent).await;
    assert_eq!(status, Status::Active, "{stats:?}");
    assert!(
        stats.grace_replays >= 1,
        "recovered through the grace window: {stats:?}"
    );
    assert!(stats.rejections.is_empty(), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_reply_and_commit_is_explicit_lost_rotation_without_grace() {
    let (status, stats) =
        killed_between_reply_and_commit(sqlite().await, BehaviourClass::ReuseDetection).await;
    assert!(
        matches!(
            status,
            Status::ReauthRequired {
                reason: ReauthReason::LostRotation,
                ..
            }
        ),
        "{status:?} {stats:?}"
    );
    assert!(
        !stats.rejections.contains_key("family-revoked"),
        "never replayed into reuse detection: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_reply_and_commit_on_postgres() {
    if let Some(shared) = postgres().await {
        let (status, stats) =
            killed_between_reply_and_commit(shared, BehaviourClass::GraceIdempotent).await;
        assert_eq!(status, Status::Active, "{stats:?}");
        assert!(stats.grace_replays >= 1, "{stats:?}");
    }
}
