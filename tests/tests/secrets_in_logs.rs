//! No secret in any log line of any crate: the manager runs the authorization-code
//! exchange, refreshes (with faults) and disconnects over the SQLite store and the
//! PostgreSQL store with real sealing, with every `tracing` event at TRACE and the
//! `log` records of the other crates (reqwest, hyper, rustls, the SQL drivers)
//! bridged into the same capture. Each secret is searched in raw, URL-encoded,
//! base64 (and inside the Basic header) and hex forms: the client secret, the
//! authorization codes, every refresh and access token, the keyring key.

use base64::Engine as _;
use std::sync::Arc;
use tokenfence::crypto::{EncryptionKey, Keyring};
use tokenfence::store::{PostgresStore, SqliteStore, Store};
use tokenfence::TokenManager;
use tokenfence_core::*;
use tokenfence_sim::mock::{Control, Fault, AUTHORIZE_PATH};
use tokenfence_sim::provider::ProviderSpec;
use tokenfence_tests::*;

/// Every form a secret could take in a log line.
fn forms(secret: &[u8]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut forms = vec![
        b64.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
        secret.iter().map(|b| format!("{b:02x}")).collect(),
    ];
    if let Ok(text) = std::str::from_utf8(secret) {
        forms.push(text.to_owned());
        forms.push(form_urlencoded::byte_serialize(text.as_bytes()).collect());
    }
    forms
}

/// An authorization code from the mock's consent page.
async fn consent(mock: &Mock, client_id: &str) -> String {
    let reply = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!(
            "{}{AUTHORIZE_PATH}?client_id={client_id}&redirect_uri=http://127.0.0.1:1/cb&state=s",
            mock.base
        ))
        .send()
        .await
        .unwrap();
    let location = reply.headers()["location"].to_str().unwrap().to_owned();
    let code = location.split("code=").nth(1).unwrap().split('&').next();
    code.unwrap().to_owned()
}

async fn scenario(
    mock: &Mock,
    store: Arc<dyn Store>,
    id: ConnectionId,
    secrets: &mut Vec<Vec<u8>>,
) {
    let tokens = TokenManager::builder()
        .provider(mock.provider())
        .shared_store(store.clone())
        .settings(eager_settings())
        .keepalive_scan(None)
        .build()
        .await
        .unwrap();
    let provider = mock.provider();
    let code = consent(mock, &provider.client.client_id).await;
    secrets.push(code.clone().into_bytes());
    tokens
        .connect_with_code(&id, SecretString::new(code), "http://127.0.0.1:1/cb", None)
        .await
        .unwrap();
    let mut remember = |r: &ConnectionRecord| {
        secrets.push(r.refresh.expose().as_bytes().to_vec());
        if let Some(a) = &r.access {
            secrets.push(a.token.expose().as_bytes().to_vec());
        }
    };
    remember(&store.load(&id).await.unwrap().unwrap());
    for fault in [None, Some(Fault::ServerError), Some(Fault::Html), None] {
        if let Some(fault) = fault {
            mock.mock.control(Control::Fault { fault, count: 1 });
        }
        let _ = tokens.refresh_now(&id, false).await;
        remember(&store.load(&id).await.unwrap().unwrap());
    }
    tokens.disconnect(&id).await.unwrap();
    tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_of_any_kind_reaches_any_crates_logs() {
    let captured = capture_trace();
    tracing_log::LogTracer::init().expect("the log bridge");

    let mock = Mock::start(ProviderSpec::intuit()).await;
    let provider = mock.provider();
    let client = provider.client.clone();
    let key = EncryptionKey::generate().unwrap();
    let key_b64 = key.to_base64().as_str().to_owned();
    let spec = format!("1:{key_b64}");
    let mut secrets: Vec<Vec<u8>> = vec![
        client.client_secret.expose().as_bytes().to_vec(),
        format!("{}:{}", client.client_id, client.client_secret.expose()).into_bytes(),
        key_b64.clone().into_bytes(),
        base64::engine::general_purpose::STANDARD
            .decode(&key_b64)
            .unwrap(),
    ];

    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open(dir.path().join("t.db"), Keyring::from_spec(&spec).unwrap()).unwrap();
    scenario(
        &mock,
        Arc::new(sqlite),
        ConnectionId("realm-sqlite".into()),
        &mut secrets,
    )
    .await;
    let mut stores = 1;
    match std::env::var("TOKENFENCE_PG_URL") {
        Ok(url) => {
            let pg = PostgresStore::connect(&url, Keyring::from_spec(&spec).unwrap())
                .await
                .unwrap();
            let id = ConnectionId(format!("realm-pg-{}", std::process::id()));
            scenario(&mock, Arc::new(pg), id, &mut secrets).await;
            stores += 1;
        }
        Err(_) => assert!(
            std::env::var("TOKENFENCE_SKIP_PG").is_ok_and(|v| v == "1"),
            "TOKENFENCE_PG_URL is not set: run ./scripts/test, or TOKENFENCE_SKIP_PG=1"
        ),
    }

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    // The capture saw the other crates too, not only tokenfence's own events.
    assert!(logs.contains("tokenfence"), "tokenfence's events");
    assert!(
        logs.contains("hyper") || logs.contains("reqwest"),
        "the HTTP client's log records were not captured"
    );
    if stores == 2 {
        assert!(
            logs.contains("tokio_postgres"),
            "the PostgreSQL driver's records"
        );
    }
    // Short mock tokens ("rt3", "code-1") are matched as whole words, long forms
    // anywhere.
    let words: std::collections::BTreeSet<&str> = logs
        .split(|c: char| !(c.is_ascii_alphanumeric() || "-_+/=%".contains(c)))
        .collect();
    let mut checked = 0;
    for secret in &secrets {
        for form in forms(secret) {
            checked += 1;
            let leaked = if form.len() >= 12 {
                logs.contains(&form)
            } else {
                words.contains(form.as_str())
            };
            assert!(!leaked, "a secret leaked into the logs as {form:?}");
        }
    }
    assert!(
        secrets.len() >= 14 && checked >= 60,
        "{} secrets",
        secrets.len()
    );
}
