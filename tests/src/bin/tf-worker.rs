//! A worker process for the many-process tests: builds a `TokenManager` over a
//! shared store (SQLite file or PostgreSQL) and asks for tokens of every connection
//! in a loop, then prints what it got as one JSON line.
//!
//! ```text
//! tf-worker STORE KEYRING MOCK_BASE CLASS CONNECTIONS SECONDS PREFIX [--hang-after-reply MARKER]
//! ```
//! STORE is `sqlite:PATH` or `postgres:URL`; the connections are `PREFIX-0`, `PREFIX-1`, ... With `--hang-after-reply`, the first
//! refresh reply is received, MARKER is written, and the process hangs before the
//! core can commit (the test then kills it with SIGKILL).

use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenfence::clock::SystemClock;
use tokenfence::crypto::Keyring;
use tokenfence::store::{PostgresStore, SqliteStore, Store};
use tokenfence::transport::{Delivery, ReqwestTransport, Transport};
use tokenfence::{ManagerError, Provider, TokenManager};
use tokenfence_core::{ConnectionId, HttpRequest};
use tokenfence_sim::provider::{BehaviourClass, ProviderSpec};

/// Hangs forever after the first refresh reply, having written `marker`.
struct HangAfterReply {
    inner: ReqwestTransport,
    marker: String,
    armed: AtomicBool,
}

#[async_trait]
impl Transport for HangAfterReply {
    async fn send(&self, request: &HttpRequest) -> Delivery {
        let delivery = self.inner.send(request).await;
        if matches!(delivery, Delivery::Replied(ref r) if r.status == 200)
            && self.armed.swap(false, Ordering::SeqCst)
        {
            let _ = std::fs::write(&self.marker, b"replied");
            std::future::pending::<()>().await;
        }
        delivery
    }
}

fn fail(message: &str) -> ! {
    eprintln!("tf-worker: {message}");
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 8 {
        fail("usage: tf-worker STORE KEYRING MOCK_BASE CLASS CONNECTIONS SECONDS PREFIX [--hang-after-reply MARKER]");
    }
    let keyring = Keyring::from_spec(&args[2]).unwrap_or_else(|e| fail(&e.to_string()));
    let store: Arc<dyn Store> = match args[1].split_once(':') {
        Some(("sqlite", path)) => {
            Arc::new(SqliteStore::open(path, keyring).unwrap_or_else(|e| fail(&e.to_string())))
        }
        Some(("postgres", url)) => Arc::new(
            PostgresStore::connect(url, keyring)
                .await
                .unwrap_or_else(|e| fail(&e.to_string())),
        ),
        _ => fail("STORE is sqlite:PATH or postgres:URL"),
    };
    let base = &args[3];
    let class = BehaviourClass::from_name(&args[4]).unwrap_or_else(|| fail("unknown class"));
    let connections: usize = args[5].parse().unwrap_or_else(|_| fail("CONNECTIONS"));
    let seconds: u64 = args[6].parse().unwrap_or_else(|_| fail("SECONDS"));
    let mut spec = ProviderSpec::scaled(class);
    spec.profile.token_url = format!("{base}{}", tokenfence_sim::mock::TOKEN_PATH);
    spec.profile.revoke_url = Some(format!("{base}{}", tokenfence_sim::mock::REVOKE_PATH));
    let client = spec
        .clients
        .iter()
        .find(|c| c.environment == tokenfence_core::Environment::Production)
        .unwrap_or_else(|| fail("no production client"))
        .credentials();
    let transport =
        ReqwestTransport::new(Arc::new(SystemClock)).unwrap_or_else(|e| fail(&e.to_string()));
    let mut builder = TokenManager::builder()
        .provider(Provider {
            profile: spec.profile,
            client,
        })
        .shared_store(store)
        .settings(tokenfence_tests::eager_settings())
        .keepalive_scan(None);
    let prefix = &args[7];
    builder = match args.get(8).map(String::as_str) {
        Some("--hang-after-reply") => builder.transport(HangAfterReply {
            inner: transport,
            marker: args.get(9).cloned().unwrap_or_else(|| fail("MARKER")),
            armed: AtomicBool::new(true),
        }),
        _ => builder.transport(transport),
    };
    let tokens = builder
        .build()
        .await
        .unwrap_or_else(|e| fail(&e.to_string()));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut served, mut errors) = (0u64, Vec::<String>::new());
    while Instant::now() < deadline {
        for i in 0..connections {
            let id = ConnectionId(format!("{prefix}-{i}"));
            match tokens.access_token(&id).await {
                Ok(_) => served += 1,
                Err(ManagerError::Access(e)) => errors.push(format!("{e:?}")),
                Err(e) => errors.push(e.to_string()),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokens.shutdown().await;
    errors.sort();
    errors.dedup();
    println!(
        "{}",
        serde_json::json!({ "served": served, "errors": errors })
    );
}
