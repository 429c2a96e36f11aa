//! `TokenManager`: the tokio driver. One actor task per connection owns that
//! connection's `tokenfence_core::Connection` machine and carries out its commands
//! one at a time; callers share it (single-flight per connection in one process).
//! A valid cached token is served from a lock-free per-connection slot, without the
//! actor, the store or any process-wide lock.
//!
//! An actor whose machine has nothing to do retires after a linger period, leaving
//! a dormant slot (the cache and what the next machine must know); the next
//! command starts a new actor whose machine loads from the store. The hand-off is
//! [`crate::gate`]; MANAGER.md says why it is correct.

use crate::clock::{Clock, SystemClock};
use crate::gate::{Admission, Gate};
use crate::store::{CasOutcome, LeaseOutcome, Store};
use crate::transport::{check_url, Delivery, InsecureUrl, ReqwestTransport, Transport};
use arc_swap::ArcSwapOption;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokenfence_core::{
    authorization_code_request, parse_token_reply, AccessError, AccessToken, ClientCredentials,
    ClientSecret, Config, Connection, ConnectionId, ConnectionRecord, Environment, Event,
    Generation, GrantIdentity, Input, InputError, LeaseRelease, Output, ProviderProfile,
    ReauthReason, RefreshToken, ReplyError, RequestId, SecretString, Settings, SettingsError,
    Status, Timestamp, WorkerId,
};
use tokio::sync::{broadcast, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// A provider profile with the client credentials to use with it.
#[derive(Clone, Debug)]
pub struct Provider {
    /// The provider's behaviour and endpoints.
    pub profile: ProviderProfile,
    /// The client identity.
    pub client: ClientCredentials,
}

impl Provider {
    /// Any provider `profile` with an app's client id and secret (no
    /// environment to pick: see [`ClientCredentials::new`]).
    pub fn new(
        profile: ProviderProfile,
        client_id: impl Into<String>,
        secret: ClientSecret,
    ) -> Self {
        Provider {
            profile,
            client: ClientCredentials::new(client_id, secret),
        }
    }

    /// Intuit QuickBooks Online with production credentials.
    pub fn intuit_production(client_id: impl Into<String>, secret: ClientSecret) -> Self {
        Self::intuit(client_id, secret, Environment::Production)
    }

    /// Intuit QuickBooks Online with development (sandbox) credentials.
    pub fn intuit_sandbox(client_id: impl Into<String>, secret: ClientSecret) -> Self {
        Self::intuit(client_id, secret, Environment::Sandbox)
    }

    /// The identity a connection authorized with this provider and client gets.
    pub fn identity(&self) -> GrantIdentity {
        GrantIdentity {
            provider: self.profile.name.clone(),
            environment: self.client.environment,
            client_id: self.client.client_id.clone(),
        }
    }

    fn intuit(
        client_id: impl Into<String>,
        secret: ClientSecret,
        environment: Environment,
    ) -> Self {
        Provider {
            profile: ProviderProfile::intuit(),
            client: ClientCredentials {
                client_id: client_id.into(),
                client_secret: secret,
                environment,
            },
        }
    }
}

/// A lifecycle event of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// Which connection.
    pub connection: ConnectionId,
    /// What happened.
    pub event: Event,
}

/// What `status` reports: no secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// Lifecycle status.
    pub status: Status,
    /// Stored generation.
    pub generation: Generation,
    /// When the current access token expires.
    pub access_expires_at: Option<Timestamp>,
    /// The refresh token's idle deadline.
    pub idle_deadline: Option<Timestamp>,
    /// The refresh token's hard deadline.
    pub hard_deadline: Option<Timestamp>,
    /// Last successful refresh.
    pub last_refreshed_at: Option<Timestamp>,
    /// Provider realm (Intuit company id).
    pub realm_id: Option<String>,
    /// Imported and not yet proven by a refresh: since when.
    pub imported_at: Option<Timestamp>,
    /// The provider, environment and client the connection was authorized with.
    pub identity: GrantIdentity,
}

impl From<&ConnectionRecord> for ConnectionStatus {
    fn from(r: &ConnectionRecord) -> Self {
        ConnectionStatus {
            status: r.status,
            generation: r.generation,
            access_expires_at: r.access.as_ref().map(|a| a.expires_at),
            idle_deadline: r.idle_deadline,
            hard_deadline: r.hard_deadline,
            last_refreshed_at: r.last_refreshed_at,
            realm_id: r.realm_id.clone(),
            imported_at: r.imported_at,
            identity: r.identity.clone(),
        }
    }
}

/// Why a `TokenManager` call failed. Never carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The connection's lifecycle answered with an error.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The input was refused (e.g. an authorization without a refresh token).
    #[error(transparent)]
    Input(#[from] InputError),
    /// The provider's reply to an authorization-code exchange was not a grant.
    #[error("authorization code exchange failed: {0}")]
    Exchange(#[from] ReplyError),
    /// The authorization-code exchange got no reply.
    #[error("authorization code exchange got no reply")]
    ExchangeUnanswered,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The manager is shutting down.
    #[error("the token manager is shut down")]
    ShutDown,
    /// The connection's actor failed unexpectedly (it panicked); the next call
    /// starts a fresh one from the store.
    #[error("the connection's worker failed unexpectedly; retry")]
    ActorFailed,
    /// No answer within the call timeout (see `TokenManagerBuilder::call_timeout`).
    #[error("no answer within the call timeout")]
    TimedOut,
    /// [`TokenManager::call`]: the API refused a token obtained after reporting
    /// its predecessor (the app may lack a scope, or the user's access to the
    /// company was removed). Not retried again.
    #[error("the API refused the access token twice, the second one fresh")]
    Unauthorized,
    /// An import (or a connection with one of several registered clients) found
    /// the connection changed by another writer between its read and its write;
    /// nothing was written. Run it again.
    #[error("the connection changed while it was being written; nothing was written, try again")]
    ImportRaced,
    /// No registered provider has this provider name, environment and client id.
    #[error("no registered client is {0}")]
    UnknownClient(String),
    /// The authorization-code flow refused a callback (unknown or used state,
    /// expired, another realm than the connection's, not a redirect): nothing
    /// stored changed.
    #[error(transparent)]
    Connect(#[from] tokenfence_core::ConnectError),
}

/// What a caller should do about a [`ManagerError`] ([`ManagerError::remedy`]):
/// the error's meaning without matching nested enums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Remedy {
    /// The grant is gone (why): ask the user to reconnect; retrying will not help.
    Reconnect(ReauthReason),
    /// Disconnected through tokenfence: reconnect only if the user wants to.
    Disconnected,
    /// There is no such connection in the store.
    NotConnected,
    /// The configuration must change (client credentials, environment, the
    /// registered clients, the store's settings); nothing was sent.
    FixConfiguration,
    /// Temporary trouble: try again at this instant (the connection is fine).
    RetryAt(Timestamp),
    /// Temporary trouble of this process or its store: try again shortly.
    RetrySoon,
    /// The API refused fresh tokens too, or the provider refused an authorization:
    /// look at the app's scopes, the user's access, the consent.
    CheckAuthorization,
    /// The manager is shutting down.
    ShutDown,
    /// The consent flow refused its callback (unknown, used or expired state, not
    /// a redirect, another company than the connection's): nothing changed;
    /// send the user through `begin_connect` again.
    BeginConnectAgain,
}

/// What an API call made with an access token came to ([`TokenManager::call`]).
#[derive(Debug)]
pub enum ApiResult<T> {
    /// The API took the token (whatever else it answered).
    Done(T),
    /// The API answered 401: the token was refused.
    Unauthorized,
}

impl ManagerError {
    /// What to do about this error: reconnect (and why), fix the configuration,
    /// or retry (and when).
    pub fn remedy(&self) -> Remedy {
        use crate::store::StoreError;
        match self {
            ManagerError::Access(e) => match e {
                AccessError::ReauthRequired(reason) => Remedy::Reconnect(*reason),
                AccessError::Disconnected => Remedy::Disconnected,
                AccessError::NotConnected => Remedy::NotConnected,
                AccessError::Config(_) => Remedy::FixConfiguration,
                AccessError::Transient { retry_at, .. } => Remedy::RetryAt(*retry_at),
                _ => Remedy::RetrySoon,
            },
            ManagerError::Store(StoreError::Config(_)) | ManagerError::UnknownClient(_) => {
                Remedy::FixConfiguration
            }
            ManagerError::Store(_)
            | ManagerError::ActorFailed
            | ManagerError::TimedOut
            | ManagerError::ImportRaced
            | ManagerError::ExchangeUnanswered => Remedy::RetrySoon,
            ManagerError::Input(_) | ManagerError::Exchange(_) | ManagerError::Unauthorized => {
                Remedy::CheckAuthorization
            }
            ManagerError::ShutDown => Remedy::ShutDown,
            ManagerError::Connect(tokenfence_core::ConnectError::NoAuthorizeUrl(_)) => {
                Remedy::FixConfiguration
            }
            ManagerError::Connect(_) => Remedy::BeginConnectAgain,
        }
    }
}

/// Why a `TokenManager` could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A required part is missing.
    #[error("token manager needs a {0}")]
    Missing(&'static str),
    /// An endpoint is not https (or loopback http).
    #[error(transparent)]
    InsecureUrl(#[from] InsecureUrl),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The settings cannot work with the provider.
    #[error("settings: {0}")]
    Settings(#[from] SettingsError),
    /// The operating system gave no randomness for this process's worker id (no
    /// fixed fallback: two processes must never share one).
    #[error("no randomness for the worker id: {0}")]
    Entropy(String),
    /// Two registered providers have the same provider name, environment and
    /// client id: a stored connection could not tell which to use.
    #[error("the client {0} is registered twice")]
    DuplicateClient(String),
}

type PendingInput = Pin<Box<dyn Future<Output = Input> + Send>>;

enum Command {
    Access(oneshot::Sender<Result<AccessToken, AccessError>>),
    /// The record was written outside the machine (an import, a connection with
    /// another registered client): re-read it, and once idle, serve it with the
    /// registered client its identity names.
    Reconfigure,
    /// The API refused `token` ([`Input::Rejected`]).
    Rejected(
        oneshot::Sender<Result<AccessToken, AccessError>>,
        AccessToken,
    ),
    /// Refresh now and answer with the outcome ([`Input::RefreshNow`]).
    RefreshNow {
        tx: oneshot::Sender<Result<AccessToken, AccessError>>,
        clear_block: bool,
    },
    Input(Box<Input>),
    Notify(Box<Input>, oneshot::Sender<Result<Event, InputError>>),
    /// A dormant connection's timer came (or its notice): load the record and let
    /// the machine act; the answer, if anyone waits for it, says when it is done.
    Wake(Option<oneshot::Sender<Result<AccessToken, AccessError>>>),
}

struct Cached {
    token: AccessToken,
    usable_until: Timestamp,
    generation: Generation,
}

struct Slot {
    cache: ArcSwapOption<Cached>,
    gate: Gate<Command, Dormant>,
    /// Wakes the running actor when a command is queued.
    wake: Notify,
}

/// What a retired actor leaves for the next one of its connection.
#[derive(Clone, Copy, Default)]
struct Dormant {
    /// The hard deadline `ReconnectSoon` was emitted for (not to repeat it).
    warned_deadline: Option<Timestamp>,
    /// The machine's next timer: the keep-alive task wakes the slot then.
    wake_at: Option<Timestamp>,
    /// When the last actor retired (`None`: never ran).
    retired_at: Option<Timestamp>,
}

struct Inner {
    /// The default client's configuration (the first registered).
    config: Arc<Config>,
    /// Every registered client's, the default first.
    configs: Vec<Arc<Config>>,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    /// Read without locks (papaya): the hot path scales with threads.
    slots: papaya::HashMap<ConnectionId, Arc<Slot>>,
    /// Ids the store did not have, until when that answer is reused.
    unknown: papaya::HashMap<ConnectionId, Timestamp>,
    /// Ids whose stored record could not be read: until when, and why.
    quarantined: papaya::HashMap<ConnectionId, (Timestamp, String)>,
    /// Ids a keep-alive pass found it cannot work (another client's, dead,
    /// disconnected): skipped by passes until then.
    unworkable: papaya::HashMap<ConnectionId, Timestamp>,
    /// Dormant slots idle this long are evicted with their cached token.
    evict_after: Duration,
    events: broadcast::Sender<LifecycleEvent>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    entropy: AtomicU64,
    /// How long an actor with nothing to do waits before it retires.
    linger: Duration,
    /// How long a shutting-down actor lets a refresh in flight finish.
    shutdown_grace: Duration,
    /// The longest a caller waits for an actor's answer.
    call_timeout: Duration,
    /// How many connections one sweep works on at once.
    scan_concurrency: usize,
    /// Whether the keep-alive task runs, waking dormant slots whose timer came.
    sweeps: bool,
    /// Actors running now.
    actors: AtomicUsize,
}

/// Keeps OAuth connections alive and hands out access tokens.
///
/// Cloning is cheap; all clones share one set of connections.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

/// Builds a [`TokenManager`].
pub struct TokenManagerBuilder {
    providers: Vec<Provider>,
    store: Option<Arc<dyn Store>>,
    transport: Option<Arc<dyn Transport>>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    worker: Option<WorkerId>,
    keepalive_scan: Option<Duration>,
    linger: Duration,
    shutdown_grace: Duration,
    call_timeout: Duration,
    scan_concurrency: usize,
    evict_after: Duration,
}

/// At most this many ids are remembered as unknown to the store at once.
const MAX_NEGATIVE: usize = 10_000;

impl TokenManager {
    /// Starts building a manager.
    pub fn builder() -> TokenManagerBuilder {
        TokenManagerBuilder {
            providers: Vec::new(),
            store: None,
            transport: None,
            clock: Arc::new(SystemClock),
            settings: Settings::default(),
            worker: None,
            keepalive_scan: Some(Duration::from_secs(60)),
            linger: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(15),
            call_timeout: Duration::from_secs(60),
            scan_concurrency: 16,
            evict_after: Duration::from_secs(15 * 60),
        }
    }

    /// An access token for `id`: the cached one while it is valid beyond the margin
    /// (no store, no lock, no waiting), otherwise one refresh shared by every caller
    /// of this process.
    pub async fn access_token(&self, id: &ConnectionId) -> Result<AccessToken, ManagerError> {
        if let Some(token) = self.cached(id) {
            return Ok(token);
        }
        if self.known_unknown(id) {
            return Err(AccessError::NotConnected.into());
        }
        if let Some(e) = self.inner.quarantined(id) {
            return Err(e.into());
        }
        let (tx, rx) = oneshot::channel();
        self.submit(id, Command::Access(tx))?;
        self.answer(rx).await?.map_err(|e| self.explain(id, e))
    }

    /// Refreshes now, whatever the cached token says, and says what happened: the
    /// token of a refresh that committed after the call, or why there is none
    /// (client rejected and until when, re-authorization required, ...).
    ///
    /// With `clear_block`, a configuration failure recorded with these same
    /// credentials does not hold the refresh back (an operator fixed the app's
    /// settings at the provider). Other credentials are never held back by it.
    pub async fn refresh_now(
        &self,
        id: &ConnectionId,
        clear_block: bool,
    ) -> Result<AccessToken, ManagerError> {
        if let Some(e) = self.inner.quarantined(id) {
            return Err(e.into());
        }
        let (tx, rx) = oneshot::channel();
        self.submit(id, Command::RefreshNow { tx, clear_block })?;
        self.answer(rx).await?.map_err(|e| self.explain(id, e))
    }

    /// The resource API answered 401 for `token`: returns the token to retry
    /// with. If `token` is the one this connection serves, it is never served
    /// again and one refresh runs for every caller that reports it (single-flight
    /// in this process, the lease across processes: a process that finds a newer
    /// token stored sends nothing). A report about an older token (a late 401)
    /// changes nothing and returns the current one. If the refresh meets
    /// `invalid_grant`, the usual rules apply (re-read, then re-authorization).
    pub async fn reject(
        &self,
        id: &ConnectionId,
        token: &AccessToken,
    ) -> Result<AccessToken, ManagerError> {
        if let Some(slot) = self.inner.slots.pin().get(id) {
            // Stop the hot path serving it now; the actor settles the cache once
            // its machine has the report.
            if slot
                .cache
                .load()
                .as_ref()
                .is_some_and(|c| c.token == *token)
            {
                slot.cache.store(None);
            }
        }
        if let Some(e) = self.inner.quarantined(id) {
            return Err(e.into());
        }
        let (tx, rx) = oneshot::channel();
        self.submit(id, Command::Rejected(tx, token.clone()))?;
        self.answer(rx).await?.map_err(|e| self.explain(id, e))
    }

    /// Calls the resource API with the connection's access token; if it answers
    /// 401 ([`ApiResult::Unauthorized`]), reports the token ([`reject`](Self::reject))
    /// and calls once more with the token that returns. Never more than twice: a
    /// second 401 is [`ManagerError::Unauthorized`].
    ///
    /// ```no_run
    /// # async fn f(tokens: tokenfence::TokenManager, http: reqwest::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokenfence::{ApiResult, core::ConnectionId};
    /// let id = ConnectionId("4620816365".into());
    /// let url = "https://quickbooks.api.intuit.com/v3/company/4620816365/companyinfo/4620816365";
    /// let reply = tokens
    ///     .call(&id, |token| {
    ///         let request = http.get(url).bearer_auth(token.expose()).send();
    ///         async move {
    ///             match request.await {
    ///                 Ok(r) if r.status() == 401 => ApiResult::Unauthorized,
    ///                 other => ApiResult::Done(other),
    ///             }
    ///         }
    ///     })
    ///     .await??;
    /// # Ok(()) }
    /// ```
    pub async fn call<T, F, Fut>(&self, id: &ConnectionId, mut api: F) -> Result<T, ManagerError>
    where
        F: FnMut(AccessToken) -> Fut,
        Fut: Future<Output = ApiResult<T>>,
    {
        let token = self.access_token(id).await?;
        if let ApiResult::Done(done) = api(token.clone()).await {
            return Ok(done);
        }
        let fresh = self.reject(id, &token).await?;
        match api(fresh).await {
            ApiResult::Done(done) => Ok(done),
            ApiResult::Unauthorized => Err(ManagerError::Unauthorized),
        }
    }

    /// The machine configuration (provider, client, settings).
    pub(crate) fn config(&self) -> &Config {
        &self.inner.config
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Every registered client's identity, the default first.
    pub fn registered_identities(&self) -> Vec<GrantIdentity> {
        self.inner.configs.iter().map(|c| c.identity()).collect()
    }

    /// `id` was written outside its machine (an import): forget what this
    /// process concluded about it and let a live machine re-read it.
    pub(crate) fn stored_elsewhere(&self, id: &ConnectionId) {
        let _ = self.inner.unknown.pin().remove(id);
        let _ = self.inner.quarantined.pin().remove(id);
        let _ = self.inner.unworkable.pin().remove(id);
        let live = self
            .inner
            .slots
            .pin()
            .get(id)
            .map(|slot| slot.cache.store(None));
        if live.is_some() {
            let _ = self.submit(id, Command::Reconfigure);
        }
    }

    /// The hot path alone: the cached token if valid beyond the margin.
    pub fn cached(&self, id: &ConnectionId) -> Option<AccessToken> {
        let slots = self.inner.slots.pin();
        let cached = slots.get(id)?.cache.load();
        let cached = cached.as_ref()?;
        // `usable_until` keeps a margin of half a second at least (half of a
        // lifetime given in whole seconds): a clock read a few
        // milliseconds behind cannot serve a token the API would refuse.
        (cached.usable_until > self.inner.clock.now_coarse()).then(|| cached.token.clone())
    }

    /// Stores the tokens of an authorization (the reply of an authorization-code
    /// exchange) as connection `id` of the default client, replacing whatever was
    /// stored.
    pub async fn connect(
        &self,
        id: &ConnectionId,
        grant: tokenfence_core::TokenGrant,
        realm_id: Option<String>,
    ) -> Result<Generation, ManagerError> {
        let client = self.inner.config.identity();
        self.connect_as(&client, id, grant, realm_id).await
    }

    /// [`connect`](Self::connect) for the registered client `client` (its
    /// [`Provider::identity`]).
    pub async fn connect_as(
        &self,
        client: &GrantIdentity,
        id: &ConnectionId,
        grant: tokenfence_core::TokenGrant,
        realm_id: Option<String>,
    ) -> Result<Generation, ManagerError> {
        let config = self.registered(client)?;
        if self.inner.configs.len() == 1 {
            let authorized = Input::Authorized {
                grant: grant.clone(),
                realm_id: realm_id.clone(),
            };
            match self.notify(id, authorized).await {
                Ok(Event::Connected { generation }) => return Ok(generation),
                // Shutting down: the workers take no more commands, but tokens
                // already issued (a callback caught by a deploy) are written
                // here, as with several clients.
                Err(ManagerError::ShutDown) => {}
                Ok(_) => return Err(ManagerError::ShutDown),
                Err(e) => return Err(e),
            }
        }
        // Several clients (the connection's machine may serve another one), or
        // shutting down: the record is written here, through compare-and-swap
        // like every write.
        let now = self.inner.clock.now();
        let record = ConnectionRecord::from_authorization(
            id.clone(),
            config.identity(),
            realm_id,
            grant,
            &config.profile,
            now,
        )
        .ok_or(InputError::NoRefreshToken)?;
        let expected = self.inner.store.load(id).await?.map(|r| r.generation);
        let generation = self.write_outside(expected, record).await?;
        let _ = self.inner.events.send(LifecycleEvent {
            connection: id.clone(),
            event: Event::Connected { generation },
        });
        Ok(generation)
    }

    /// Exchanges an authorization code (from the consent redirect) and stores the
    /// tokens as connection `id` of the default client.
    pub async fn connect_with_code(
        &self,
        id: &ConnectionId,
        code: SecretString,
        redirect_uri: &str,
        realm_id: Option<String>,
    ) -> Result<Generation, ManagerError> {
        let client = self.inner.config.identity();
        self.connect_with_code_as(&client, id, code, redirect_uri, realm_id)
            .await
    }

    /// [`connect_with_code`](Self::connect_with_code) for the registered client
    /// `client`: the code is exchanged with that client's credentials.
    pub async fn connect_with_code_as(
        &self,
        client: &GrantIdentity,
        id: &ConnectionId,
        code: SecretString,
        redirect_uri: &str,
        realm_id: Option<String>,
    ) -> Result<Generation, ManagerError> {
        let c = self.registered(client)?;
        let grant = self.exchange_code(&c, &code, redirect_uri, None).await?;
        self.connect_as(client, id, grant, realm_id).await
    }

    /// Exchanges an authorization code with `c`'s credentials (and the PKCE
    /// verifier, if the consent sent a challenge).
    pub(crate) async fn exchange_code(
        &self,
        c: &Config,
        code: &SecretString,
        redirect_uri: &str,
        verifier: Option<&SecretString>,
    ) -> Result<tokenfence_core::TokenGrant, ManagerError> {
        let deadline = self.inner.clock.now().saturating_add(c.settings.lease_ttl);
        let request = authorization_code_request(
            &c.profile,
            &c.client,
            code,
            redirect_uri,
            verifier,
            deadline,
        );
        match self.inner.transport.send(&request).await {
            Delivery::Replied(reply) => parse_token_reply(&c.profile, &reply).map_err(|e| {
                // The provider's text may echo what it was sent.
                let mut sent = vec![code.expose(), c.client.client_secret.expose()];
                sent.extend(verifier.map(SecretString::expose));
                ManagerError::Exchange(e.redacted(&sent))
            }),
            Delivery::NotSent | Delivery::OutcomeUnknown => Err(ManagerError::ExchangeUnanswered),
        }
    }

    /// Presents `refresh` to the revocation endpoint of `c`'s provider; whether
    /// the provider confirmed (2xx).
    pub(crate) async fn revoke_at_provider(&self, c: &Config, refresh: &RefreshToken) -> bool {
        let deadline = self.inner.clock.now().saturating_add(c.settings.lease_ttl);
        let Some(request) =
            tokenfence_core::revoke_request(&c.profile, &c.client, refresh, deadline)
        else {
            return false;
        };
        matches!(
            self.inner.transport.send(&request).await,
            Delivery::Replied(reply) if (200..300).contains(&reply.status)
        )
    }

    /// The registered client `client` names.
    pub(crate) fn registered(&self, client: &GrantIdentity) -> Result<Arc<Config>, ManagerError> {
        self.inner
            .config_for(client)
            .cloned()
            .ok_or_else(|| ManagerError::UnknownClient(describe(client)))
    }

    /// Writes `record` (a new generation over `expected`) outside its machine,
    /// then lets this process's view of the connection follow.
    pub(crate) async fn write_outside(
        &self,
        expected: Option<Generation>,
        record: ConnectionRecord,
    ) -> Result<Generation, ManagerError> {
        let generation = expected.map_or(Generation(0), Generation::next);
        let record = ConnectionRecord {
            generation,
            ..record
        };
        match self
            .inner
            .store
            .compare_and_swap(expected, &record, None)
            .await?
        {
            CasOutcome::Committed => {
                self.stored_elsewhere(&record.id);
                Ok(generation)
            }
            CasOutcome::Conflict(_) => Err(ManagerError::ImportRaced),
        }
    }

    /// Revokes the connection at the provider, then marks it disconnected. Returns
    /// whether the provider confirmed the revocation.
    pub async fn disconnect(&self, id: &ConnectionId) -> Result<bool, ManagerError> {
        match self.notify(id, Input::Disconnect).await? {
            Event::Disconnected { revoked } => Ok(revoked),
            _ => Err(ManagerError::ShutDown),
        }
    }

    /// What the store says about `id` (no secrets).
    pub async fn status(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<ConnectionStatus>, ManagerError> {
        let record = self.inner.store.load(id).await?;
        Ok(record.as_ref().map(ConnectionStatus::from))
    }

    /// Lifecycle events of every connection of this manager.
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.inner.events.subscribe()
    }

    /// Calls `callback` for every lifecycle event until shutdown. A callback that
    /// panics on one event is logged and counted
    /// (`tokenfence_event_callback_panics_total`) and still called for the next:
    /// one bad event must not silence every later `ReauthRequired`.
    pub fn on_event(&self, callback: impl Fn(&LifecycleEvent) + Send + 'static) {
        let mut events = self.subscribe();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    event = events.recv() => match event {
                        Ok(e) => {
                            let call = std::panic::AssertUnwindSafe(|| callback(&e));
                            if std::panic::catch_unwind(call).is_err() {
                                metrics::counter!("tokenfence_event_callback_panics_total")
                                    .increment(1);
                                tracing::error!(
                                    connection = %e.connection,
                                    event = ?e.event,
                                    "the event callback panicked; it is called for later events"
                                );
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "event callback lagged");
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
        });
    }

    /// Asks the connection to refresh now for liveness (what the keep-alive task
    /// does for connections the store reports as due).
    pub fn maintain(&self, id: &ConnectionId) {
        let _ = self.submit(id, Command::Input(Box::new(Input::Maintain)));
    }

    /// One keep-alive pass, what the keep-alive task does every scan period:
    /// wakes the dormant slots whose machine's timer came; asks every connection
    /// the store reports as due for work ([`Store::due_for_work`]: keep-alive due, a
    /// refresh in doubt, a degraded connection's retry, an abandoned lease) to
    /// refresh, at most `scan_concurrency` at once, and waits for their outcomes;
    /// and wakes the connections whose `ReconnectSoon` notice fell due after
    /// `notices_after` (`None`: all those due by now, as on a process's first pass)
    /// so that their machines announce it. Pass the returned
    /// [`Sweep::scanned_until`] as `notices_after` next time.
    pub async fn sweep(&self, notices_after: Option<Timestamp>) -> Result<Sweep, ManagerError> {
        self.evict_idle();
        let timers = self.dormant_due();
        let now = self.inner.clock.now();
        let settings = &self.inner.config.settings;
        let store = &self.inner.store;
        // Earliest due first, a page at a time. Rows that cannot be worked stay
        // due in the store (quarantined, another client's, dead with an expired
        // lease): page past them, so that they never crowd out a connection that
        // can be worked, however many sit ahead of it.
        let mut due: Vec<ConnectionId> = Vec::new();
        let mut after = None;
        while due.len() < SCAN_LIMIT {
            let page = store
                .due_for_work(now, settings.keepalive_lead, after, SCAN_LIMIT)
                .await?;
            let last_page = page.len() < SCAN_LIMIT;
            after = page.last().cloned();
            due.extend(
                page.into_iter()
                    .map(|d| d.id)
                    .filter(|id| self.inner.quarantined(id).is_none() && !self.unworkable(id, now)),
            );
            if last_page {
                break;
            }
        }
        due.truncate(SCAN_LIMIT);
        let notices = store
            .notices_due(notices_after, now, settings.reconnect_notice)
            .await?;
        // At most `scan_concurrency` connections at once, each to its outcome.
        self.bounded(due.iter().cloned(), Self::keep_alive_one)
            .await;
        // Wakes (a dormant timer, a notice: the machine announces it once it has read
        // the record, and refreshes if the token needs it) are bounded the same way.
        let mut wakes: Vec<ConnectionId> =
            timers.into_iter().chain(notices.iter().cloned()).collect();
        wakes.sort();
        wakes.dedup();
        self.bounded(wakes, Self::wake_one).await;
        Ok(Sweep {
            due,
            notices,
            scanned_until: now,
        })
    }

    /// Runs `job` for each id, at most `scan_concurrency` at once, and waits for
    /// them all (a pass's backpressure).
    async fn bounded<F, Fut>(&self, ids: impl IntoIterator<Item = ConnectionId>, job: F)
    where
        F: Fn(TokenManager, ConnectionId) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let limit = Arc::new(tokio::sync::Semaphore::new(self.inner.scan_concurrency));
        let mut work = tokio::task::JoinSet::new();
        for id in ids {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            if self.inner.shutdown.is_cancelled() {
                break;
            }
            let job = job(self.clone(), id);
            work.spawn(async move {
                job.await;
                drop(permit);
            });
        }
        while work.join_next().await.is_some() {}
    }

    /// A keep-alive pass's refresh of `id`; what no pass can work is skipped by
    /// the next ones for an hour.
    async fn keep_alive_one(self, id: ConnectionId) {
        tracing::debug!(connection = %id, "due for work");
        if let Err(e) = self.refresh_now(&id, false).await {
            tracing::debug!(connection = %id, error = %e, "keep-alive refresh");
            if let ManagerError::Access(
                AccessError::Config(_)
                | AccessError::ReauthRequired(_)
                | AccessError::Disconnected
                | AccessError::NotConnected,
            ) = e
            {
                // No pass can do anything for it until a person does.
                let until = self.inner.clock.now().saturating_add(QUARANTINE);
                self.inner.unworkable.pin().insert(id, until);
            }
        }
    }

    /// A keep-alive pass's wake of `id`, until its machine has acted.
    async fn wake_one(self, id: ConnectionId) {
        tracing::debug!(connection = %id, "woken");
        let (tx, rx) = oneshot::channel();
        if self.submit(&id, Command::Wake(Some(tx))).is_ok() {
            let _ = self.answer(rx).await;
        }
    }

    /// Stops every task and waits for them. A refresh already sent is let finish
    /// and commit (and its lease released) first, for at most the builder's
    /// `shutdown_grace` (15 s): a deploy mid-refresh leaves no doubt behind. New
    /// calls, and callers still waiting at the end, get [`ManagerError::ShutDown`].
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.slots.pin().clear();
    }

    /// How many connections have a running actor; the others are dormant (their
    /// cached token is still served, and the next command starts an actor).
    pub fn live_actors(&self) -> usize {
        self.inner.actors.load(Ordering::SeqCst)
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Runs `work` on the manager's task tracker (shutdown waits for it), to the
    /// end even if the caller stops waiting; its result, or the task's failure.
    pub(crate) fn spawn_task<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.inner.tasks.spawn(work)
    }

    /// This manager's worker id (unique per process incarnation).
    pub fn worker(&self) -> &WorkerId {
        &self.inner.config.worker
    }

    async fn notify(&self, id: &ConnectionId, input: Input) -> Result<Event, ManagerError> {
        // A connection being made is not unknown any more.
        let _ = self.inner.unknown.pin().remove(id);
        let (tx, rx) = oneshot::channel();
        self.submit(id, Command::Notify(Box::new(input), tx))?;
        Ok(self.answer(rx).await??)
    }

    /// The actor's answer, within the call timeout.
    async fn answer<T>(&self, rx: oneshot::Receiver<T>) -> Result<T, ManagerError> {
        match tokio::time::timeout(self.inner.call_timeout, rx).await {
            Ok(answer) => answer.map_err(|_| self.lost_answer()),
            Err(_) => Err(ManagerError::TimedOut),
        }
    }

    /// The actor's error for `id`, or why its row is quarantined.
    fn explain(&self, id: &ConnectionId, e: AccessError) -> ManagerError {
        match self.inner.quarantined(id) {
            Some(corrupt) => corrupt.into(),
            None => e.into(),
        }
    }

    /// Why an answer never came: shutdown, or the actor died.
    fn lost_answer(&self) -> ManagerError {
        if self.inner.shutdown.is_cancelled() {
            ManagerError::ShutDown
        } else {
            ManagerError::ActorFailed
        }
    }

    /// Hands `command` to the connection's actor, starting one if it is dormant.
    fn submit(&self, id: &ConnectionId, mut command: Command) -> Result<(), ManagerError> {
        loop {
            if self.inner.shutdown.is_cancelled() {
                return Err(ManagerError::ShutDown);
            }
            let slot = self.slot(id);
            match slot.gate.submit(command) {
                Admission::Queued => slot.wake.notify_one(),
                Admission::Spawn(dormant) => self.spawn_actor(id, slot, dormant),
                Admission::Closed(_) => return Err(ManagerError::ShutDown),
                Admission::Evicted(c) => {
                    // Evicted since we looked it up: a fresh slot.
                    let _ = self
                        .inner
                        .slots
                        .pin()
                        .remove_if(id, |_, s| Arc::ptr_eq(s, &slot));
                    command = c;
                    continue;
                }
            }
            return Ok(());
        }
    }

    /// Whether a keep-alive pass found `id` unworkable less than an hour ago.
    fn unworkable(&self, id: &ConnectionId, now: Timestamp) -> bool {
        until_later(&self.inner.unworkable, id, now)
    }

    /// Whether the store was found not to have `id` moments ago.
    fn known_unknown(&self, id: &ConnectionId) -> bool {
        until_later(&self.inner.unknown, id, self.inner.clock.now())
    }

    /// Evicts dormant slots idle longer than `evict_after` (no timer pending) and
    /// forgets expired negative answers.
    fn evict_idle(&self) {
        let now = self.inner.clock.now();
        let idle = self.inner.evict_after;
        let old = |d: &Dormant| {
            d.wake_at.is_none()
                && d.retired_at
                    .is_some_and(|t| now.saturating_since(t) >= idle)
        };
        self.inner
            .slots
            .pin()
            .retain(|_, slot| !slot.gate.evict(old));
        self.inner.unknown.pin().retain(|_, until| *until > now);
        self.inner
            .quarantined
            .pin()
            .retain(|_, (until, _)| *until > now);
        self.inner.unworkable.pin().retain(|_, until| *until > now);
    }

    /// Connections with a slot in this process (running or dormant).
    pub fn slots(&self) -> usize {
        self.inner.slots.len()
    }

    fn slot(&self, id: &ConnectionId) -> Arc<Slot> {
        let slots = self.inner.slots.pin();
        if let Some(slot) = slots.get(id) {
            return slot.clone();
        }
        slots
            .get_or_insert_with(id.clone(), || {
                Arc::new(Slot {
                    cache: ArcSwapOption::empty(),
                    gate: Gate::new(Dormant::default()),
                    wake: Notify::new(),
                })
            })
            .clone()
    }

    /// Starts the one actor of `slot` (the gate said it had none).
    fn spawn_actor(&self, id: &ConnectionId, slot: Arc<Slot>, dormant: Dormant) {
        let entropy = self.inner.entropy.fetch_add(0x9E37_79B9, Ordering::Relaxed);
        let machine = Connection::new(id.clone(), self.inner.config.clone(), entropy)
            .with_warned_deadline(dormant.warned_deadline);
        let actor = Actor {
            inner: self.inner.clone(),
            slot: slot.clone(),
            machine,
            waiters: HashMap::new(),
            notify: Vec::new(),
            admitted_notify: false,
            next_request: 0,
            warned_deadline: dormant.warned_deadline,
            heard_store: false,
            woken: false,
            store_failed: false,
            reconfigure: self.inner.configs.len() > 1,
        };
        self.inner.actors.fetch_add(1, Ordering::SeqCst);
        let span = tracing::info_span!("connection", id = %id);
        let run = self.inner.tasks.spawn(actor.run().instrument(span.clone()));
        // A panic in the actor (a store, a transport, a bug) must not wedge the
        // connection until restart: its callers are answered (their channels
        // close with the actor), what was queued for it is answered the same way,
        // and the slot goes dormant so the next call starts a fresh actor from
        // the store. The panic's message is not logged (it is not ours to vet).
        let inner = self.inner.clone();
        let supervise = async move {
            let Err(e) = run.await else { return };
            if !e.is_panic() {
                return;
            }
            tracing::error!("connection actor panicked; the next call starts a fresh one");
            metrics::counter!("tokenfence_actor_panics_total").increment(1);
            inner.actors.fetch_sub(1, Ordering::SeqCst);
            drop(slot.gate.abandon(dormant));
        };
        self.inner.tasks.spawn(supervise.instrument(span));
    }

    /// The dormant slots whose machine's timer has come (a `ReconnectSoon` notice,
    /// for instance: the store's keep-alive scan does not cover it).
    fn dormant_due(&self) -> Vec<ConnectionId> {
        let now = self.inner.clock.now();
        self.inner
            .slots
            .pin()
            .iter()
            .filter(|(_, s)| s.gate.dormant(|d| d.wake_at.is_some_and(|t| t <= now)) == Some(true))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl TokenManagerBuilder {
    /// A provider and the client credentials to use with it (at least one).
    /// Call it again to register more (Intuit production and sandbox clients,
    /// other providers): every stored connection is served with the registered
    /// client its identity names (provider, environment, client id); one that
    /// names none is a configuration error and nothing is sent (S7). The first
    /// registered is the default: `connect`, `connect_with_code` and `import`
    /// use it, and the `_as` forms take another.
    pub fn provider(mut self, provider: Provider) -> Self {
        self.providers.push(provider);
        self
    }

    /// The store (required).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A store shared with other code.
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The transport (default: reqwest with rustls).
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Margins, lease and retry settings.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// The worker id (default: process id plus a random suffix, unique per
    /// incarnation, as leases require).
    pub fn worker(mut self, worker: WorkerId) -> Self {
        self.worker = Some(worker);
        self
    }

    /// How often the keep-alive task scans the store and wakes dormant connections
    /// whose timer came (`None`: no keep-alive task; then an actor whose machine
    /// has a timer never retires, since nothing would wake it).
    pub fn keepalive_scan(mut self, every: Option<Duration>) -> Self {
        self.keepalive_scan = every;
        self
    }

    /// How long a connection's actor with nothing to do stays before it retires,
    /// leaving only the cached token (default 30 s). Zero retires at once.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// How long a dormant connection's slot (its cached token and what its next
    /// actor must know) stays after its last actor retired (default 15 min); then
    /// a keep-alive pass evicts it and the next call reads the store again. Memory
    /// is thus bounded by the connections used within that time.
    pub fn evict_after(mut self, idle: Duration) -> Self {
        self.evict_after = idle;
        self
    }

    /// How many connections a keep-alive pass ([`TokenManager::sweep`]) works on at
    /// once (default 16): a cold start with 100,000 due connections opens at most
    /// this many provider requests, not 100,000.
    pub fn scan_concurrency(mut self, n: usize) -> Self {
        self.scan_concurrency = n;
        self
    }

    /// How long [`TokenManager::shutdown`] lets a refresh already sent finish and
    /// commit (default 15 s): a deploy mid-refresh must not leave a doubt.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// The longest a caller of [`TokenManager::access_token`] or
    /// [`TokenManager::refresh_now`] waits for an answer (default 60 s); then
    /// [`ManagerError::TimedOut`].
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Checks the configuration and starts the keep-alive task.
    pub async fn build(self) -> Result<TokenManager, BuildError> {
        if self.providers.is_empty() {
            return Err(BuildError::Missing("provider"));
        }
        let store: Arc<dyn Store> = Arc::new(crate::store::RollbackGuard::new(
            self.store.ok_or(BuildError::Missing("store"))?,
        ));
        let mut identities = std::collections::BTreeSet::new();
        for provider in &self.providers {
            self.settings.check(&provider.profile)?;
            check_url(&provider.profile.token_url)?;
            if let Some(url) = &provider.profile.revoke_url {
                check_url(url)?;
            }
            if !identities.insert(provider.identity()) {
                return Err(BuildError::DuplicateClient(describe(&provider.identity())));
            }
        }
        let transport: Arc<dyn Transport> = match self.transport {
            Some(t) => t,
            None => Arc::new(ReqwestTransport::new(self.clock.clone())?),
        };
        let seed = getrandom::u64().map_err(|e| BuildError::Entropy(e.to_string()))?;
        let worker = self
            .worker
            .unwrap_or_else(|| WorkerId(format!("pid{}-{:016x}", std::process::id(), seed)));
        let configs: Vec<Arc<Config>> = self
            .providers
            .into_iter()
            .map(|p| {
                Arc::new(Config {
                    profile: p.profile,
                    client: p.client,
                    worker: worker.clone(),
                    settings: self.settings.clone(),
                })
            })
            .collect();
        let config = configs[0].clone();
        let manager = TokenManager {
            inner: Arc::new(Inner {
                config,
                configs,
                store,
                transport,
                clock: self.clock,
                slots: papaya::HashMap::new(),
                unknown: papaya::HashMap::new(),
                quarantined: papaya::HashMap::new(),
                unworkable: papaya::HashMap::new(),
                evict_after: self.evict_after,
                events: broadcast::channel(1024).0,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                entropy: AtomicU64::new(seed),
                linger: self.linger,
                shutdown_grace: self.shutdown_grace,
                call_timeout: self.call_timeout,
                scan_concurrency: self.scan_concurrency.max(1),
                sweeps: self.keepalive_scan.is_some(),
                actors: AtomicUsize::new(0),
            }),
        };
        if let Some(every) = self.keepalive_scan {
            let m = manager.clone();
            manager
                .inner
                .tasks
                .spawn(async move { m.keepalive_loop(every).await });
        }
        Ok(manager)
    }
}

impl TokenManager {
    async fn keepalive_loop(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        let mut notices_after = None;
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Each pass on its own task: a pass that panics (a store's bug) is
            // logged and counted, and the next tick scans again; keep-alive must
            // not stop silently.
            let m = self.clone();
            let pass = self.spawn_task(async move { m.sweep(notices_after).await });
            match pass.await {
                Ok(Ok(sweep)) => notices_after = Some(sweep.scanned_until),
                Ok(Err(e)) => tracing::warn!(error = %e, "keep-alive scan failed"),
                // The panic's message is not logged (it may carry a row's data).
                Err(e) if e.is_panic() => {
                    metrics::counter!("tokenfence_keepalive_panics_total").increment(1);
                    tracing::error!("a keep-alive scan panicked; the next one runs on time");
                }
                Err(_) => tracing::warn!("a keep-alive scan was cancelled"),
            }
        }
    }
}

/// What one [`TokenManager::sweep`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sweep {
    /// Connections asked to refresh (due for work).
    pub due: Vec<ConnectionId>,
    /// Connections woken to announce their `ReconnectSoon` notice.
    pub notices: Vec<ConnectionId>,
    /// The instant the notice scan covered (pass it to the next sweep).
    pub scanned_until: Timestamp,
}

/// The task that owns one connection's machine.
struct Actor {
    inner: Arc<Inner>,
    slot: Arc<Slot>,
    machine: Connection,
    waiters: HashMap<RequestId, oneshot::Sender<Result<AccessToken, AccessError>>>,
    notify: Vec<oneshot::Sender<Result<Event, InputError>>>,
    next_request: u64,
    /// The hard deadline this connection's actors already warned about.
    warned_deadline: Option<Timestamp>,
    /// Whether the machine has heard from the store yet: until then it knows
    /// nothing, and the cached token its predecessor left stays.
    heard_store: bool,
    /// Whether a wake started this work (a timer of a dormant slot, or a notice
    /// the keep-alive pass reported once).
    woken: bool,
    /// Whether the last store command failed.
    store_failed: bool,
    /// The input being handled came from a `Command::Notify`, whose sender is
    /// the last in `notify`.
    admitted_notify: bool,
    /// Pick the registered client the stored identity names before the next
    /// piece of work (at start, and after a write outside the machine).
    reconfigure: bool,
}

async fn next_pending(pending: &mut Option<PendingInput>) -> Input {
    match pending.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl Actor {
    async fn run(mut self) {
        let mut pending: Option<PendingInput> = None;
        // Shutting down: until when a refresh in flight may still finish.
        let mut draining: Option<tokio::time::Instant> = None;
        loop {
            self.drain(&mut pending).await;
            if draining.is_some() && !self.has_work_in_flight(&pending) {
                break;
            }
            if self.reconfigure
                && pending.is_none()
                && !self.machine.is_busy()
                && self.machine.waiting() == 0
            {
                self.reconfigure = false;
                self.choose_config().await;
            }
            let now = self.inner.clock.now();
            let after = |t: Timestamp| tokio::time::Instant::now() + t.saturating_since(now);
            let sleep = self.machine.poll_timeout().map(after);
            let input = match self.slot.gate.take() {
                Some(command) => self.admit(command),
                None => {
                    let retire = (pending.is_none() && draining.is_none())
                        .then(|| self.may_retire_at(now))
                        .flatten()
                        .map(after);
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled(), if draining.is_none() => {
                            if !self.has_work_in_flight(&pending) {
                                break;
                            }
                            // A refresh was sent (or fresh tokens await their
                            // commit): let it land, so a deploy leaves no doubt.
                            // New commands are refused meanwhile.
                            tracing::info!("shutting down after the refresh in flight");
                            drop(self.slot.gate.close());
                            draining = Some(tokio::time::Instant::now() + self.inner.shutdown_grace);
                            continue;
                        }
                        _ = sleep_until(draining), if draining.is_some() => break,
                        _ = self.slot.wake.notified() => continue,
                        input = next_pending(&mut pending), if pending.is_some() => {
                            pending = None;
                            self.heard_store = true;
                            self.store_failed = matches!(input, Input::StoreFailed);
                            input
                        }
                        _ = sleep_until(sleep), if sleep.is_some() => Input::Timeout,
                        _ = sleep_until(retire), if retire.is_some() => {
                            let parting = Dormant {
                                warned_deadline: self.warned_deadline,
                                wake_at: self.wake_at(now),
                                retired_at: Some(now),
                            };
                            if self.slot.gate.retire(parting) {
                                self.forget_if_unknown(now);
                                self.inner.actors.fetch_sub(1, Ordering::SeqCst);
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            let now = self.inner.clock.now();
            let admitted_notify = std::mem::take(&mut self.admitted_notify);
            if let Err(e) = self.machine.handle_input(now, input) {
                // A refused user input (e.g. an authorization without a refresh
                // token): tell whoever asked it, and only them (a disconnect
                // asked before still goes ahead).
                tracing::warn!(error = %e, "input refused");
                if let Some(tx) = admitted_notify.then(|| self.notify.pop()).flatten() {
                    let _ = tx.send(Err(e));
                }
            }
            if self.store_failed
                && !self.waiters.is_empty()
                && self.inner.quarantined(self.machine.id()).is_some()
            {
                // No retries for an unreadable row: callers hear it at once.
                let retry_at = now.saturating_add(QUARANTINE);
                for (_, tx) in self.waiters.drain() {
                    let _ = tx.send(Err(AccessError::Transient {
                        kind: tokenfence_core::FailureKind::StoreUnavailable,
                        retry_at,
                    }));
                }
            }
        }
        // Shut down: later commands are refused, queued ones dropped (their callers
        // learn of the shutdown).
        drop(self.slot.gate.close());
        self.inner.actors.fetch_sub(1, Ordering::SeqCst);
    }

    /// A connection the store does not have keeps no slot (an id from a caller is
    /// not a reason to hold memory): the slot is evicted, and the negative answer
    /// is cached for `dead_recheck`.
    fn forget_if_unknown(&self, now: Timestamp) {
        let unknown = self.heard_store && !self.store_failed && self.machine.record().is_none();
        if !unknown || !self.slot.gate.evict(|_| true) {
            return;
        }
        let id = self.machine.id();
        let _ = self
            .inner
            .slots
            .pin()
            .remove_if(id, |_, s| Arc::ptr_eq(s, &self.slot));
        let negative = self.inner.unknown.pin();
        if negative.len() < MAX_NEGATIVE {
            let until = now.saturating_add(self.inner.config.settings.dead_recheck);
            negative.insert(id.clone(), until);
        }
    }

    /// Whether stopping now could lose something: a store command or provider
    /// request outstanding, or fresh tokens not committed.
    fn has_work_in_flight(&self, pending: &Option<PendingInput>) -> bool {
        pending.is_some() || self.machine.uncommitted().is_some()
    }

    /// Serves the connection with the registered client its stored identity
    /// names (a new machine, before any piece of work); a record that names none
    /// keeps the default, whose machine refuses it (S7). Only with several
    /// registered clients.
    async fn choose_config(&mut self) {
        let id = self.machine.id().clone();
        let record = match self.inner.store.load(&id).await {
            Ok(Some(record)) => record,
            Ok(None) => return,
            // Pick again before the next piece of work: a read that failed once
            // must not leave the machine on the default client, refusing the
            // connection as another client's until the actor retires.
            Err(_) => {
                self.reconfigure = true;
                return;
            }
        };
        let Some(config) = self.inner.config_for(&record.identity) else {
            return;
        };
        if config.identity() == self.machine.config().identity() {
            return;
        }
        let entropy = self.inner.entropy.fetch_add(0x9E37_79B9, Ordering::Relaxed);
        self.machine =
            Connection::new(id, config.clone(), entropy).with_warned_deadline(self.warned_deadline);
        self.slot.cache.store(None);
    }

    /// The machine input for a command.
    fn admit(&mut self, command: Command) -> Input {
        self.next_request += 1;
        let request = RequestId(self.next_request);
        match command {
            Command::Access(tx) => {
                self.waiters.insert(request, tx);
                Input::AccessRequested(request)
            }
            Command::Reconfigure => {
                self.reconfigure = self.inner.configs.len() > 1;
                Input::StoreChanged
            }
            Command::Rejected(tx, token) => {
                self.waiters.insert(request, tx);
                Input::Rejected { request, token }
            }
            Command::RefreshNow { tx, clear_block } => {
                self.waiters.insert(request, tx);
                Input::RefreshNow {
                    request,
                    clear_block,
                }
            }
            Command::Input(input) => *input,
            Command::Notify(input, tx) => {
                self.notify.push(tx);
                self.admitted_notify = true;
                *input
            }
            // An access nobody waits for: the machine loads the record and acts on
            // its timers (a due warning is emitted, a due keep-alive then fires).
            Command::Wake(tx) => {
                self.woken = true;
                if let Some(tx) = tx {
                    self.waiters.insert(request, tx);
                }
                Input::AccessRequested(request)
            }
        }
    }

    /// When the dormant slot should be woken again: the machine's next timer; or,
    /// if a wake could not read the record (the store was down), at the next pass,
    /// so that a notice reported once is not lost with it.
    fn wake_at(&self, now: Timestamp) -> Option<Timestamp> {
        let m = &self.machine;
        let unread = self.woken && self.store_failed && m.record().is_none();
        m.poll_timeout()
            .or_else(|| unread.then(|| m.retry_gate_at(now).unwrap_or(now)))
    }

    /// When this actor may retire if nothing else happens: `None` while work is
    /// outstanding (callers, a store command or request, a user action, fresh tokens
    /// not committed, a lease wait) or a machine timer comes before the linger ends.
    /// A retry gate in the future postpones retirement until it has passed.
    fn may_retire_at(&self, now: Timestamp) -> Option<Timestamp> {
        let m = &self.machine;
        let idle = self.waiters.is_empty()
            && self.notify.is_empty()
            && !m.is_busy()
            && m.waiting() == 0
            && m.in_flight().is_none()
            && m.uncommitted().is_none();
        if !idle {
            return None;
        }
        let at = m
            .retry_gate_at(now)
            .unwrap_or(now)
            .saturating_add(self.inner.linger);
        match m.poll_timeout() {
            None => Some(at),
            // A later timer is the keep-alive task's to honour (`wake_due`).
            Some(t) if self.inner.sweeps && t > at => Some(at),
            Some(_) => None,
        }
    }

    /// Carries out every output; a store command or a request becomes `pending`.
    async fn drain(&mut self, pending: &mut Option<PendingInput>) {
        while let Some(output) = self.machine.poll_output() {
            match output {
                Output::Deliver { request, result } => {
                    if let Some(tx) = self.waiters.remove(&request) {
                        let _ = tx.send(result);
                    }
                }
                Output::Event(event) => self.publish(event),
                Output::ReleaseLease(release) => {
                    // Awaited inline so that it cannot overtake our next acquisition.
                    let LeaseRelease {
                        owner,
                        request,
                        restore,
                    } = release;
                    if let Err(e) = self
                        .inner
                        .store
                        .release_lease(self.machine.id(), &owner, request, restore)
                        .await
                    {
                        tracing::warn!(error = %e, "lease release failed; it will expire");
                    }
                }
                command => *pending = Some(self.execute(command)),
            }
        }
        self.refresh_cache();
    }

    fn execute(&self, output: Output) -> PendingInput {
        let inner = self.inner.clone();
        let store = self.inner.store.clone();
        let transport = self.inner.transport.clone();
        let id = self.machine.id().clone();
        let now = self.inner.clock.now();
        let provider = self.machine.config().profile.name.clone();
        let profile_tid = self.machine.config().profile.clone();
        Box::pin(async move {
            match output {
                // A quarantined row is not read again until its time is up.
                Output::Load if inner.quarantined(&id).is_some() => Input::StoreFailed,
                Output::Load => match store.load(&id).await {
                    Ok(r) => Input::Loaded(r.map(Box::new)),
                    Err(e) => store_failed(&inner, &id, e),
                },
                Output::AcquireLease {
                    owner,
                    ttl,
                    request,
                } => match store.acquire_lease(&id, &owner, request, now, ttl).await {
                    Ok(LeaseOutcome::Granted {
                        lease,
                        record,
                        took_over,
                    }) => Input::LeaseGranted {
                        lease,
                        record: record.map(Box::new),
                        took_over,
                    },
                    Ok(LeaseOutcome::Held(holder)) => {
                        // Another worker is refreshing: this one waits for it.
                        metrics::counter!("tokenfence_lease_waits_total").increment(1);
                        Input::LeaseHeld { holder }
                    }
                    Err(e) => store_failed(&inner, &id, e),
                },
                Output::CompareAndSwap {
                    expected,
                    record,
                    release,
                } => {
                    match store
                        .compare_and_swap(expected, &record, release.as_ref())
                        .await
                    {
                        Ok(CasOutcome::Committed) => Input::Committed {
                            generation: record.generation,
                        },
                        Ok(CasOutcome::Conflict(current)) => Input::Conflict {
                            current: current.map(Box::new),
                        },
                        Err(e) => store_failed(&inner, &id, e),
                    }
                }
                Output::Send(request) => {
                    let started = std::time::Instant::now();
                    let span = tracing::info_span!("refresh", url = %request.url, tid = tracing::field::Empty);
                    let delivery = transport.send(&request).instrument(span.clone()).await;
                    let outcome = match &delivery {
                        Delivery::Replied(r) => {
                            if let Some(tid) = r.transaction_id(&profile_tid) {
                                span.record("tid", tid.as_str());
                            }
                            status_class(r.status)
                        }
                        Delivery::NotSent => "not_sent",
                        Delivery::OutcomeUnknown => "unknown",
                    };
                    metrics::counter!("tokenfence_provider_requests_total",
                        "provider" => provider.clone(), "outcome" => outcome)
                    .increment(1);
                    metrics::histogram!("tokenfence_provider_request_seconds", "provider" => provider)
                        .record(started.elapsed().as_secs_f64());
                    match delivery {
                        Delivery::Replied(r) => Input::Replied(r),
                        Delivery::NotSent => Input::NotSent,
                        Delivery::OutcomeUnknown => Input::OutcomeUnknown,
                    }
                }
                // Deliver, Event and ReleaseLease are handled in `drain`.
                Output::Deliver { .. } | Output::Event(_) | Output::ReleaseLease(_) => {
                    Input::StoreChanged
                }
            }
        })
    }

    fn publish(&mut self, event: Event) {
        let provider = self.machine.config().profile.name.clone();
        let (name, detail) = event_labels(&event);
        metrics::counter!("tokenfence_events_total", "provider" => provider, "event" => name, "detail" => detail)
            .increment(1);
        match &event {
            Event::ReauthRequired { reason } => {
                tracing::error!(?reason, "connection needs re-authorization")
            }
            Event::ReconnectSoon { deadline } => {
                self.warned_deadline = Some(*deadline);
                tracing::warn!(%deadline, "refresh token nears its hard deadline")
            }
            Event::Degraded { kind, retry_at } => {
                tracing::warn!(%kind, %retry_at, "refresh failing")
            }
            Event::IgnoredReplyFields { fields } => {
                tracing::warn!(
                    ?fields,
                    "provider sent unusable optional fields; treated as absent"
                )
            }
            other => tracing::info!(event = ?other, "lifecycle"),
        }
        if matches!(event, Event::Connected { .. } | Event::Disconnected { .. }) {
            for tx in self.notify.drain(..) {
                let _ = tx.send(Ok(event.clone()));
            }
        }
        let _ = self.inner.events.send(LifecycleEvent {
            connection: self.machine.id().clone(),
            event,
        });
    }

    fn refresh_cache(&self) {
        let record = self.machine.record();
        if record.is_none() && !self.heard_store {
            return;
        }
        let now = self.inner.clock.now();
        let margin = self.inner.config.settings.access_margin;
        let fresh = self.machine.cached_access(now).is_some();
        let current = self.slot.cache.load();
        let generation = record.map(|r| r.generation);
        if fresh && current.as_ref().map(|c| c.generation) == generation {
            return;
        }
        let next = record.filter(|_| fresh).and_then(|r| {
            let access = r.access.as_ref()?;
            Some(Arc::new(Cached {
                token: access.token.clone(),
                usable_until: access.expires_at.saturating_sub(r.access_margin(margin)),
                generation: r.generation,
            }))
        });
        self.slot.cache.store(next);
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn store_failed(inner: &Inner, id: &ConnectionId, e: crate::store::StoreError) -> Input {
    use crate::store::StoreError;
    let kind = match &e {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Corrupt { .. } => "corrupt",
        StoreError::Config(_) => "config",
        StoreError::RolledBack { .. } => "rolled_back",
    };
    metrics::counter!("tokenfence_store_errors_total", "kind" => kind).increment(1);
    if let StoreError::Corrupt { reason, .. } = &e {
        inner.quarantine(id, reason);
    } else {
        tracing::warn!(error = %e, "store operation failed");
    }
    Input::StoreFailed
}

/// Fills `bytes` from the OS's randomness; `what` says what they are for.
pub(crate) fn random(bytes: &mut [u8], what: &str) -> Result<(), ManagerError> {
    getrandom::fill(bytes).map_err(|e| {
        ManagerError::Store(crate::store::StoreError::Config(format!(
            "no randomness for {what}: {e}"
        )))
    })
}

/// An identity in words: `provider/environment/client id`.
pub(crate) fn describe(identity: &GrantIdentity) -> String {
    format!(
        "{}/{}/{}",
        identity.provider, identity.environment, identity.client_id
    )
}

impl Inner {
    /// The registered client a stored identity names.
    pub(crate) fn config_for(&self, identity: &GrantIdentity) -> Option<&Arc<Config>> {
        self.configs.iter().find(|c| c.identity() == *identity)
    }

    /// A row that cannot be read is not a store outage: callers are told at once
    /// for `QUARANTINE` (then it is read again, in case an operator repaired it),
    /// and keep-alive passes skip it.
    fn quarantine(&self, id: &ConnectionId, reason: &str) {
        let until = self.clock.now().saturating_add(QUARANTINE);
        let fresh = self
            .quarantined
            .pin()
            .insert(id.clone(), (until, reason.to_owned()))
            .is_none();
        if fresh {
            tracing::error!(connection = %id, %reason, "stored record unreadable; quarantined");
            let provider = self.config.profile.name.clone();
            let (name, detail) = event_labels(&Event::Quarantined);
            metrics::counter!("tokenfence_events_total", "provider" => provider, "event" => name, "detail" => detail)
                .increment(1);
            let _ = self.events.send(LifecycleEvent {
                connection: id.clone(),
                event: Event::Quarantined,
            });
        }
    }

    /// Why `id` is quarantined now, if it is.
    fn quarantined(&self, id: &ConnectionId) -> Option<crate::store::StoreError> {
        let now = self.clock.now();
        let q = self.quarantined.pin();
        let (until, reason) = q.get(id)?;
        (*until > now).then(|| crate::store::StoreError::Corrupt {
            id: id.clone(),
            reason: format!("quarantined: {reason}"),
        })
    }
}

/// Whether `map` holds `id` until a time after `now`.
fn until_later(
    map: &papaya::HashMap<ConnectionId, Timestamp>,
    id: &ConnectionId,
    now: Timestamp,
) -> bool {
    map.pin().get(id).is_some_and(|until| *until > now)
}

/// Connections one keep-alive pass works on at most.
const SCAN_LIMIT: usize = 1000;

/// How long an unreadable record is quarantined before it is read again.
const QUARANTINE: Duration = Duration::from_secs(3600);

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        400 => "400",
        401 => "401",
        403 => "403",
        429 => "429",
        500..=599 => "5xx",
        _ => "other",
    }
}

fn event_labels(event: &Event) -> (&'static str, String) {
    match event {
        Event::Connected { .. } => ("connected", String::new()),
        Event::IgnoredReplyFields { fields } => ("ignored_reply_fields", fields.join(",")),
        Event::Refreshed { rotated, .. } => (
            "refreshed",
            if *rotated { "rotated" } else { "same" }.into(),
        ),
        Event::Degraded { kind, .. } => ("degraded", format!("{kind:?}")),
        Event::Recovered { .. } => ("recovered", String::new()),
        Event::ReauthRequired { reason } => ("reauth_required", format!("{reason:?}")),
        Event::ReconnectSoon { .. } => ("reconnect_soon", String::new()),
        Event::Disconnected { revoked } => ("disconnected", revoked.to_string()),
        Event::Quarantined => ("quarantined", String::new()),
        Event::AccessRejected => ("access_rejected", String::new()),
    }
}
