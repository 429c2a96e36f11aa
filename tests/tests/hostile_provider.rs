//! A provider that misbehaves at the HTTP level (a reply over the size cap, a
//! slow-loris trickle) and a run of the main scenarios with tracing at TRACE
//! captured: clear errors, nothing stored lost, no secret in any log line.

use std::sync::Arc;
use std::time::Duration;
use tokenfence::store::{MemoryStore, Store};
use tokenfence::{ManagerError, Provider, TokenManager};
use tokenfence_core::*;
use tokenfence_sim::mock::{Control, Fault};
use tokenfence_sim::provider::BehaviourClass;
use tokenfence_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw TCP "provider" that answers every request with `reply(n)` for the n-th
/// connection, written in `chunks` with `pause` between them.
async fn raw_provider(reply: Vec<u8>, chunk: usize, pause: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = socket.read(&mut buf).await;
                for part in reply.chunks(chunk) {
                    if socket.write_all(part).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
        }
    });
    base
}

fn provider_at(base: &str) -> Provider {
    let mut p = Provider::intuit_production("prod-app", ClientSecret::new("prod-secret"));
    p.profile.token_url = format!("{base}/oauth2/v1/tokens/bearer");
    p.profile.revoke_url = None;
    p
}

async fn seeded(p: &Provider) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let now = tokenfence::clock::Clock::now(&tokenfence::clock::SystemClock);
    let record = ConnectionRecord::new(
        realm(),
        p.identity(),
        RefreshToken::new("RT-kept-safe"),
        now,
    );
    store.compare_and_swap(None, &record, None).await.unwrap();
    store
}

async fn try_once(base: &str) -> (Result<AccessToken, ManagerError>, ConnectionRecord) {
    let p = provider_at(base);
    let store = seeded(&p).await;
    let settings = Settings {
        max_attempts: 1,
        ..eager_settings()
    };
    let tokens = TokenManager::builder()
        .provider(p)
        .shared_store(store.clone())
        .settings(settings)
        .keepalive_scan(None)
        .build()
        .await
        .unwrap();
    let result = tokens.access_token(&realm()).await;
    tokens.shutdown().await;
    (result, store.load(&realm()).await.unwrap().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_over_the_size_cap_is_rejected_and_nothing_is_lost() {
    let body = format!(
        r#"{{"access_token":"{}","token_type":"bearer"}}"#,
        "A".repeat(MAX_REPLY_BYTES)
    );
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let base = raw_provider(reply.into_bytes(), 64 * 1024, Duration::ZERO).await;
    let (result, stored) = try_once(&base).await;
    assert!(
        matches!(
            result,
            Err(ManagerError::Access(AccessError::Transient {
                kind: FailureKind::OutcomeUnknown,
                ..
            }))
        ),
        "{result:?}"
    );
    assert_eq!(stored.refresh.expose(), "RT-kept-safe");
    assert!(
        stored.in_doubt_since.is_some(),
        "an unusable 200 is an outcome in doubt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_provider_times_out_as_outcome_unknown() {
    let body = r#"{"access_token":"AT","token_type":"bearer","expires_in":3600}"#;
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // One byte every 200 ms: the 2-second budget runs out long before the end.
    let base = raw_provider(reply.into_bytes(), 1, Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (result, stored) = try_once(&base).await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "bounded by the deadline"
    );
    assert!(
        matches!(
            result,
            Err(ManagerError::Access(AccessError::Transient {
                kind: FailureKind::OutcomeUnknown,
                ..
            }))
        ),
        "{result:?}"
    );
    assert_eq!(stored.refresh.expose(), "RT-kept-safe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_not_sent() {
    // Bind then drop: nothing listens on the port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (result, stored) = try_once(&format!("http://127.0.0.1:{port}")).await;
    assert!(
        matches!(
            result,
            Err(ManagerError::Access(AccessError::Transient {
                kind: FailureKind::NotSent,
                ..
            }))
        ),
        "{result:?}"
    );
    assert_eq!(stored.in_doubt_since, None, "not sent: nothing in doubt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_trace_logs_of_the_main_scenarios() {
    let captured = capture_trace();

    let mut secrets: Vec<String> = vec!["prod-secret".into()];
    for class in [
        BehaviourClass::StrictRotation,
        BehaviourClass::GraceIdempotent,
    ] {
        let mock = Mock::scaled(class).await;
        let store = Arc::new(MemoryStore::new());
        let tokens = manager(&mock, store.clone(), eager_settings()).await;
        let grant = mock.authorize();
        secrets.push(grant.access.expose().into());
        secrets.extend(grant.refresh.iter().map(|r| r.expose().to_string()));
        tokens.connect(&realm(), grant, None).await.unwrap();
        // A lost reply under strict rotation without grace is an explicit
        // LostRotation by design; exercise lost replies where grace recovers them.
        let faults: &[Option<Fault>] = match class {
            BehaviourClass::GraceIdempotent => &[
                None,
                Some(Fault::ServerError),
                Some(Fault::LoseReply),
                Some(Fault::Truncated),
            ],
            _ => &[None, Some(Fault::ServerError), Some(Fault::Html)],
        };
        for &fault in faults {
            if let Some(fault) = fault {
                mock.mock.control(Control::Fault { fault, count: 1 });
            }
            tokio::time::sleep(Duration::from_millis(1100)).await;
            secrets.push(tokens.access_token(&realm()).await.unwrap().expose().into());
            let r = store.load(&realm()).await.unwrap().unwrap();
            secrets.push(r.refresh.expose().into());
        }
        mock.mock.control(Control::Revoke { grant: None });
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(tokens.access_token(&realm()).await.is_err());
        tokens.disconnect(&realm()).await.unwrap();
        tokens.shutdown().await;
    }
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.lines().count() > 20,
        "tracing captured the run:\n{logs}"
    );
    assert!(logs.contains("refresh"), "spans are there");
    // Mock tokens are short ("rt3"); match them as whole words.
    let words: std::collections::BTreeSet<&str> = logs
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_')
        .collect();
    for secret in &secrets {
        assert!(
            !words.contains(secret.as_str()),
            "secret {secret:?} leaked into the logs"
        );
    }
}
