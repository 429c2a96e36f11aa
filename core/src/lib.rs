//! # tokenfence-core
//!
//! The OAuth 2.0 refresh-token lifecycle as a pure, sans-IO state machine: rotation,
//! leases, compare-and-swap commits, error classification, retries, keep-alive and
//! re-authorization. No I/O, no clock, no randomness: `#![no_std]` with `alloc`.
//! The tokio driver (`tokenfence`), the simulator and the model checker
//! (`tokenfence-sim`) all run this same code.
//!
//! ## The run-loop contract
//!
//! One [`Connection`] per connection per worker. The driver:
//!
//! 1. feeds one [`Input`] with [`Connection::handle_input`], stamped with the
//!    current wall-clock time (`now`);
//! 2. drains [`Connection::poll_output`] until it returns `None`, carrying out each
//!    [`Output`]: store commands (`Load`, `AcquireLease`, `CompareAndSwap`,
//!    `ReleaseLease`), HTTP requests (`Send`), answers to callers (`Deliver`) and
//!    lifecycle events (`Event`);
//! 3. feeds the answer to each store command or request as the next input
//!    (`Loaded`, `LeaseGranted`/`LeaseHeld`, `Committed`/`Conflict`, `Replied`/
//!    `NotSent`/`OutcomeUnknown`, `StoreFailed`); at most one is outstanding;
//! 4. when idle, sleeps until [`Connection::poll_timeout`] and then feeds
//!    [`Input::Timeout`], or until a caller arrives ([`Input::AccessRequested`]).
//!
//! Mutate once, drain everything, then wait: the machine never calls out and never
//! blocks. The hot path, [`Connection::cached_access`], answers without mutation or
//! allocation while the cached access token is valid beyond the margin.
//!
//! Correctness does not rest on the lease (it only prevents duplicate provider
//! calls); it rests on the compare-and-swap on [`Generation`]: a write lands only on
//! the generation it was derived from. After `invalid_grant` the store is re-read
//! before re-auth is declared; tokens that descend from the token still stored are
//! committed even over a record another worker marked dead meanwhile.
//!
//! ## Driving the machine by hand
//!
//! ```
//! use std::sync::Arc;
//! use tokenfence_core::*;
//!
//! let config = Arc::new(Config {
//!     profile: ProviderProfile::intuit(),
//!     client: ClientCredentials {
//!         client_id: "ABc123".into(),
//!         client_secret: ClientSecret::new("secret"),
//!         environment: Environment::Production,
//!     },
//!     worker: WorkerId("worker-1".into()),
//!     settings: Settings::default(),
//! });
//! let now = Timestamp::from_secs(1_800_000_000);
//! let mut conn = Connection::new(ConnectionId("realm-42".into()), config.clone(), 7);
//!
//! // A stored record whose access token has expired.
//! let mut stored = ConnectionRecord {
//!     id: ConnectionId("realm-42".into()),
//!     generation: Generation(3),
//!     identity: config.identity(),
//!     realm_id: Some("42".into()),
//!     access: None,
//!     refresh: RefreshToken::new("RT-old"),
//!     refresh_issued_at: now,
//!     idle_deadline: None,
//!     hard_deadline: None,
//!     in_doubt_since: None,
//!     in_doubt_holder: None,
//!     status: Status::Active,
//!     blocked_client: None,
//!     imported_at: None,
//!     last_refreshed_at: None,
//!     updated_at: now,
//! };
//!
//! conn.handle_input(now, Input::AccessRequested(RequestId(1)))?;
//! assert_eq!(conn.poll_output(), Some(Output::Load));
//! conn.handle_input(now, Input::Loaded(Some(Box::new(stored.clone()))))?;
//! let Some(Output::AcquireLease { request: asked, .. }) = conn.poll_output() else { panic!() };
//! let lease = Lease { owner: config.worker.clone(), acquired_at: now,
//!     expires_at: now.saturating_add(config.settings.lease_ttl), generation: Some(Generation(3)),
//!     request: asked };
//! conn.handle_input(now, Input::LeaseGranted { lease, record: Some(Box::new(stored.clone())), took_over: None })?;
//! let Some(Output::Send(request)) = conn.poll_output() else { panic!("expected a request") };
//! assert_eq!(request.url, "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer");
//!
//! // Intuit answers with a rotated refresh token.
//! let body = br#"{"access_token":"AT-new","refresh_token":"RT-new","token_type":"bearer",
//!                 "expires_in":3600,"x_refresh_token_expires_in":8726400}"#;
//! conn.handle_input(now, Input::Replied(HttpResponse { status: 200, headers: vec![], body: body.to_vec() }))?;
//! // The commit carries the lease's release: the store does both in one step.
//! let Some(Output::CompareAndSwap { expected, record, release: Some(release) }) = conn.poll_output() else { panic!() };
//! assert_eq!((expected, release.request), (Some(Generation(3)), asked));
//! assert_eq!(record.refresh.expose(), "RT-new");
//! stored = *record;
//!
//! conn.handle_input(now, Input::Committed { generation: stored.generation })?;
//! assert!(matches!(conn.poll_output(), Some(Output::Event(Event::Refreshed { rotated: true, .. }))));
//! let Some(Output::Deliver { request: RequestId(1), result: Ok(token) }) = conn.poll_output() else { panic!() };
//! assert_eq!(token.expose(), "AT-new");
//! assert_eq!(conn.poll_output(), None);
//!
//! // From now on the hot path answers without the store.
//! assert!(conn.cached_access(now).is_some());
//! # Ok::<(), InputError>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod connect;
mod httpdate;
pub mod invariants;
mod io;
pub mod lease;
mod machine;
mod profile;
#[cfg(feature = "std")]
mod profile_file;
mod record;
mod reply;
mod request;
mod secret;
mod settings;
mod time;

pub use connect::{Callback, ConnectError, ConnectOptions, PendingAuthorization};
pub use io::{
    AccessError, ConfigError, Event, IdentityField, Input, InputError, LeaseRelease, Output,
    RequestId,
};
pub use machine::{Config, Connection};
pub use profile::{
    ClientAuth, ClientCredentials, ClientFingerprint, Environment, GraceReplay, InDoubtRecovery,
    ProviderProfile, RevokeStyle, Rotation, RotationPolicy,
};
#[cfg(feature = "std")]
pub use profile_file::{ProfileError, BUILT_IN};
pub use record::{
    AccessGrant, ConnectionId, ConnectionRecord, ExistingGrant, FailureKind, Generation,
    GrantIdentity, Lease, LeaseRequestId, ReauthReason, Status, WorkerId,
};
pub use reply::{
    is_usable_token, parse_revoke_reply, parse_token_reply, HttpResponse, Malformation,
    OAuthErrorCode, ReplyError, RetryAfter, TokenGrant, MAX_ACCESS_TTL, MAX_REFRESH_TTL,
    MAX_REPLY_BYTES, MAX_RETRY_AFTER, MAX_TOKEN_BYTES,
};
pub use request::{
    authorization_code_request, refresh_request, revoke_request, Header, HttpRequest,
};
pub use secret::{AccessToken, ClientSecret, RefreshToken, SecretString};
pub use settings::{Settings, SettingsError};
pub use time::{days, hours, minutes, Timestamp};
