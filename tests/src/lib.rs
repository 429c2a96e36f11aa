//! Shared helpers for tokenfence's end-to-end tests: a mock provider on loopback
//! and managers wired to it.

use std::sync::Arc;
use std::time::Duration;
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::store::Store;
use tokenfence::{Provider, TokenManager};
use tokenfence_core::{parse_token_reply, ConnectionId, HttpResponse, Settings, TokenGrant};
use tokenfence_sim::mock::{Control, MockProvider};
use tokenfence_sim::provider::{BehaviourClass, ProviderSpec};

pub mod load;

/// A log sink for tracing subscribers: everything written, kept for searching.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the process-wide tracing subscriber at TRACE, writing into the
/// returned sink. Global, because connection actors run on the runtime's other
/// threads; other tests of the same binary log into it too (only more to search).
pub fn capture_trace() -> Captured {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the first subscriber");
    captured
}

/// A mock provider serving on an ephemeral loopback port.
pub struct Mock {
    /// The running mock.
    pub mock: MockProvider,
    /// Its base URL.
    pub base: String,
}

impl Mock {
    /// Starts a mock of `spec` on 127.0.0.1.
    pub async fn start(spec: ProviderSpec) -> Mock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let mock = MockProvider::new(spec, &base, SystemClock.now());
        tokio::spawn(mock.clone().serve(listener));
        Mock { mock, base }
    }

    /// Starts a mock of a behaviour class with lifetimes scaled to seconds, whose
    /// access tokens live 2 s: the margin adapts to 1 s, so a token is due for
    /// refresh one second after it is issued.
    pub async fn scaled(class: BehaviourClass) -> Mock {
        let spec = ProviderSpec {
            access_ttl: Duration::from_secs(2),
            ..ProviderSpec::scaled(class)
        };
        Self::start(spec).await
    }

    /// The provider profile and production credentials matching this mock.
    pub fn provider(&self) -> Provider {
        let spec = self.mock.spec();
        let client = spec
            .clients
            .iter()
            .find(|c| c.environment == tokenfence_core::Environment::Production)
            .expect("a production client")
            .credentials();
        Provider {
            profile: spec.profile,
            client,
        }
    }

    /// A new grant for the production app, as an authorization would return it.
    pub fn authorize(&self) -> TokenGrant {
        grant_of(&self.mock, &self.provider())
    }
}

/// A new grant of `mock` for `provider`'s client, as an authorization would
/// return it.
pub fn grant_of(mock: &MockProvider, provider: &Provider) -> TokenGrant {
    let answer = mock.control(Control::Authorize {
        client_id: provider.client.client_id.clone(),
    });
    let body = serde_json::to_vec(&answer["tokens"]).expect("json");
    let reply = HttpResponse {
        status: 200,
        headers: vec![],
        body,
    };
    parse_token_reply(&provider.profile, &reply).expect("a grant")
}

/// Short leases and quick retries for a scaled provider (whose 2-second access
/// tokens are due for refresh one second after they are issued: the margin never
/// exceeds half a lifetime).
pub fn eager_settings() -> Settings {
    Settings {
        access_margin: Duration::from_secs(19),
        lease_ttl: Duration::from_secs(4),
        lease_poll: Duration::from_millis(50),
        send_safety: Duration::from_secs(2),
        in_doubt_safety: Duration::from_secs(1),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        config_backoff: Duration::from_secs(1),
        dead_recheck: Duration::from_millis(100),
        ..Settings::default()
    }
}

/// A manager for `mock` over `store`, without the keep-alive task.
pub async fn manager(mock: &Mock, store: Arc<dyn Store>, settings: Settings) -> TokenManager {
    TokenManager::builder()
        .provider(mock.provider())
        .shared_store(store)
        .settings(settings)
        .keepalive_scan(None)
        .build()
        .await
        .expect("manager")
}

/// The connection id the tests use.
pub fn realm() -> ConnectionId {
    ConnectionId("realm-9130350000000001".into())
}
