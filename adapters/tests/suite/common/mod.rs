//! Shared by the TokenManager tests: a scripted in-process provider, a store that
//! counts and can refuse reads, the provider configuration pointing at nothing,
//! and the connection id.
#![allow(dead_code)]

use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenfence::store::{CasOutcome, DueWork, LeaseOutcome, MemoryStore, Store, StoreError};
use tokenfence::transport::{Delivery, Transport};
use tokenfence::Provider;
use tokenfence_core::*;

/// A provider that rotates on every refresh, answering after `delay`.
pub struct Scripted {
    pub calls: AtomicUsize,
    delay: Duration,
    current: Mutex<u32>,
}

impl Scripted {
    pub fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            delay,
            current: Mutex::new(1),
        })
    }
}

#[async_trait]
impl Transport for Scripted {
    async fn send(&self, request: &HttpRequest) -> Delivery {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if request.url.ends_with("/revoke") {
            return Delivery::Replied(HttpResponse {
                status: 200,
                headers: vec![],
                body: vec![],
            });
        }
        let n = {
            let mut current = self.current.lock().unwrap();
            let presented = format!("refresh_token=RT-{}", *current);
            if !request.body.expose().contains(&presented) {
                return Delivery::Replied(HttpResponse {
                    status: 400,
                    headers: vec![],
                    body: br#"{"error":"invalid_grant"}"#.to_vec(),
                });
            }
            *current += 1;
            *current
        };
        let body = format!(
            r#"{{"access_token":"AT-{n}","refresh_token":"RT-{n}","token_type":"bearer","expires_in":3600,"x_refresh_token_expires_in":8726400}}"#
        );
        Delivery::Replied(HttpResponse {
            status: 200,
            headers: vec![],
            body: body.into_bytes(),
        })
    }
}

pub fn provider() -> Provider {
    let mut p = Provider::intuit_production("prod-client", ClientSecret::new("client-secret"));
    p.profile.token_url = "http://127.0.0.1:9/oauth2/v1/tokens/bearer".into();
    p.profile.revoke_url = Some("http://127.0.0.1:9/revoke".into());
    p
}

pub fn id() -> ConnectionId {
    ConnectionId("realm-1".into())
}

/// A memory store that counts record reads (so tests can see the hot path does not
/// touch the store) and refuses them while `down` is set; scans and writes work.
#[derive(Default)]
pub struct Watched {
    pub inner: MemoryStore,
    pub loads: AtomicUsize,
    pub down: AtomicBool,
    /// This many reads panic (a bug in a store, a driver), then reads work.
    pub panics: AtomicUsize,
    /// This many keep-alive scans (`due_for_work`) panic, then scans work.
    pub scan_panics: AtomicUsize,
    /// A record "restored from a backup": while set, every read and every CAS
    /// conflict answers with it.
    pub restored: Mutex<Option<ConnectionRecord>>,
}

/// Takes one from `left` if it is not zero: whether there was one to take.
fn take_one(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Watched {
    fn read(&self) -> Result<(), StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.panics) {
            panic!("the store exploded");
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for Watched {
    async fn load(&self, id: &ConnectionId) -> Result<Option<ConnectionRecord>, StoreError> {
        self.read()?;
        let restored = self.restored.lock().unwrap().clone();
        match restored {
            Some(r) => Ok(Some(r)),
            None => self.inner.load(id).await,
        }
    }
    async fn compare_and_swap(
        &self,
        expected: Option<Generation>,
        record: &ConnectionRecord,
        release: Option<&LeaseRelease>,
    ) -> Result<CasOutcome, StoreError> {
        let restored = self.restored.lock().unwrap().clone();
        match restored {
            Some(r) => Ok(CasOutcome::Conflict(Some(r))),
            None => self.inner.compare_and_swap(expected, record, release).await,
        }
    }
    async fn acquire_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        self.read()?;
        let mut outcome = self
            .inner
            .acquire_lease(id, owner, request, now, ttl)
            .await?;
        if let LeaseOutcome::Granted { record, .. } = &mut outcome {
            if let Some(r) = self.restored.lock().unwrap().clone() {
                *record = Some(r);
            }
        }
        Ok(outcome)
    }
    async fn release_lease(
        &self,
        id: &ConnectionId,
        owner: &WorkerId,
        request: LeaseRequestId,
        restore: bool,
    ) -> Result<(), StoreError> {
        self.inner.release_lease(id, owner, request, restore).await
    }
    async fn due_for_work(
        &self,
        now: Timestamp,
        lead: Duration,
        after: Option<DueWork>,
        limit: usize,
    ) -> Result<Vec<DueWork>, StoreError> {
        if take_one(&self.scan_panics) {
            panic!("the store's scan exploded");
        }
        self.inner.due_for_work(now, lead, after, limit).await
    }
    async fn notices_due(
        &self,
        after: Option<Timestamp>,
        until: Timestamp,
        notice: Duration,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        self.inner.notices_due(after, until, notice).await
    }
    async fn list(&self) -> Result<Vec<ConnectionId>, StoreError> {
        self.inner.list().await
    }
    async fn put_pending(
        &self,
        key: &str,
        pending: &tokenfence_core::PendingAuthorization,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner.put_pending(key, pending, now).await
    }
    async fn take_pending(
        &self,
        key: &str,
    ) -> Result<Option<tokenfence_core::PendingAuthorization>, StoreError> {
        self.inner.take_pending(key).await
    }
}

/// Grants every refresh (no rotation) after `delay`, counting the requests and the
/// most in flight at once.
#[derive(Default)]
pub struct Granting {
    delay: Duration,
    in_flight: AtomicUsize,
    pub most: AtomicUsize,
    pub calls: AtomicUsize,
}

impl Granting {
    pub fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Granting {
            delay,
            ..Default::default()
        })
    }
}

#[async_trait]
impl Transport for Granting {
    async fn send(&self, _: &HttpRequest) -> Delivery {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Delivery::Replied(HttpResponse {
            status: 200,
            headers: vec![],
            body: br#"{"access_token":"AT-k","token_type":"bearer","expires_in":3600}"#.to_vec(),
        })
    }
}

/// Connection `id` of `identity`, due for a keep-alive refresh at `now`: its idle
/// deadline a day away, its refresh token issued 99 days before.
pub fn keepalive_due(id: &str, identity: GrantIdentity, now: Timestamp) -> ConnectionRecord {
    ConnectionRecord {
        idle_deadline: Some(now.saturating_add(Duration::from_secs(86_400))),
        refresh_issued_at: now.saturating_sub(Duration::from_secs(99 * 86_400)),
        ..ConnectionRecord::new(
            ConnectionId(id.into()),
            identity,
            RefreshToken::new(format!("RT-{id}")),
            now,
        )
    }
}

/// Stores each record as a new connection.
pub async fn seed(store: &dyn Store, records: impl IntoIterator<Item = ConnectionRecord>) {
    for r in records {
        assert_eq!(
            store.compare_and_swap(None, &r, None).await.unwrap(),
            CasOutcome::Committed
        );
    }
}

/// A manager for [`provider`] over `store`, answered by `transport`, whose
/// keep-alive passes work on `concurrency` connections at once (no scan task).
pub async fn granting_manager(
    store: Arc<dyn Store>,
    transport: Arc<Granting>,
    concurrency: usize,
) -> tokenfence::TokenManager {
    manager_with(store, transport, concurrency).await
}

/// A manager for [`provider`] over a shared in-memory `store`, answered by
/// `transport` (no scan task).
pub async fn memory_manager(
    store: Arc<MemoryStore>,
    transport: Arc<Scripted>,
) -> tokenfence::TokenManager {
    manager_with(store, transport, 16).await
}

async fn manager_with(
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    concurrency: usize,
) -> tokenfence::TokenManager {
    tokenfence::TokenManager::builder()
        .provider(provider())
        .shared_store(store)
        .transport(transport)
        .keepalive_scan(None)
        .scan_concurrency(concurrency)
        .build()
        .await
        .unwrap()
}

/// A mock provider of `spec` serving on a loopback port, and its base URL.
pub async fn serve_mock(
    spec: tokenfence_sim::provider::ProviderSpec,
) -> (tokenfence_sim::mock::MockProvider, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let mock = tokenfence_sim::mock::MockProvider::new(
        spec,
        &base,
        Timestamp::from_millis(now.as_millis() as u64),
    );
    tokio::spawn(mock.clone().serve(listener));
    (mock, base)
}

/// The authorization code a consent at `authorize_url` by `client_id` redirects
/// with (to `http://127.0.0.1:1/cb`).
pub async fn consent_code(authorize_url: &str, client_id: &str) -> String {
    let consent = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!(
            "{authorize_url}?client_id={client_id}&redirect_uri=http://127.0.0.1:1/cb&state=s"
        ))
        .send()
        .await
        .unwrap();
    let location = consent.headers()["location"].to_str().unwrap();
    let code = location.split("code=").nth(1).unwrap();
    code.split('&').next().unwrap().to_owned()
}
