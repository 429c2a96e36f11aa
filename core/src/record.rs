//! The connection record: what the store keeps for one connection, and the lease.

use crate::profile::{ClientFingerprint, Environment, ProviderProfile};
use crate::reply::TokenGrant;
use crate::secret::{AccessToken, RefreshToken};
use crate::time::Timestamp;
use alloc::string::String;
use core::time::Duration;
use serde::{Deserialize, Serialize};

/// A monotonic counter stored with the record, +1 on every committed change. Every
/// write is a compare-and-swap naming the generation it was derived from.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation a commit derived from `self` produces.
    #[must_use]
    pub fn next(self) -> Generation {
        Generation(self.0.saturating_add(1))
    }
}

impl core::fmt::Display for Generation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A grant obtained elsewhere, as an import knows it
/// ([`ConnectionRecord::from_existing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingGrant {
    /// The refresh token.
    pub refresh: RefreshToken,
    /// The access token and its expiry, if known.
    pub access: Option<AccessGrant>,
    /// Intuit realm id (company) or tenant id.
    pub realm_id: Option<String>,
    /// The refresh token's idle deadline, if known.
    pub idle_deadline: Option<Timestamp>,
    /// The grant's hard deadline, if known.
    pub hard_deadline: Option<Timestamp>,
}

/// The caller's name for a connection (for Intuit, one per QuickBooks company).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnectionId(pub String);

impl core::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A worker's name in leases: unique per process and task that refreshes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub String);

/// The name of one lease request, drawn from the machine's entropy. A request
/// retried after its answer was lost carries the same id, so the store recognises
/// its own earlier grant (and what that grant displaced) instead of reporting the
/// requester's own row as a takeover.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct LeaseRequestId(pub u64);

/// Who authorized a connection: provider, environment and client id. A connection is
/// only ever refreshed with credentials of the same identity (S7).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GrantIdentity {
    /// Provider profile name.
    pub provider: String,
    /// Environment of the client that authorized the grant.
    pub environment: Environment,
    /// Client id that authorized the grant.
    pub client_id: String,
}

/// An access token with the instant it stops being valid.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AccessGrant {
    /// The bearer token.
    pub token: AccessToken,
    /// When the provider stops accepting it.
    pub expires_at: Timestamp,
}

/// Why a human must reconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ReauthReason {
    /// The provider rejected the stored refresh token (user disconnected the app,
    /// token revoked) — confirmed by re-reading the store.
    InvalidGrant,
    /// Rejected after the provider's idle deadline passed.
    IdleExpired,
    /// Rejected after the provider's hard deadline passed.
    HardExpired,
    /// A rotation's reply was lost and the profile cannot recover it (no grace
    /// window, or presenting the old token could revoke the family).
    LostRotation,
}

impl core::fmt::Display for ReauthReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ReauthReason::InvalidGrant => "the provider rejected the stored refresh token",
            ReauthReason::IdleExpired => "the refresh token expired after its idle window",
            ReauthReason::HardExpired => "the refresh token reached its hard lifetime",
            ReauthReason::LostRotation => {
                "a rotated refresh token was lost and the provider cannot replay it"
            }
        })
    }
}

/// What went wrong last, for status and metrics. Carries no secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FailureKind {
    /// 5xx from the token endpoint.
    ServerError(u16),
    /// 429 (Retry-After honoured).
    RateLimited,
    /// A reply that is not a readable OAuth response (HTML from a proxy, truncated).
    UnreadableReply,
    /// The request was never sent (connect error, DNS, refused before sending).
    NotSent,
    /// The request may have reached the provider, but no reply came back.
    OutcomeUnknown,
    /// The client credentials were rejected (`invalid_client`).
    ClientRejected,
    /// The provider refused the request itself (`invalid_request`, `invalid_scope`, ...).
    RequestRejected,
    /// The store could not be read or written.
    StoreUnavailable,
    /// Another worker holds the refresh lease (its refresh is in flight, or it
    /// died and its lease has not expired yet) and callers have waited
    /// `max_inline_delay`: come back shortly. Never stored.
    RefreshInProgress,
    /// A refresh succeeded less than `min_refresh_interval` ago and its token is
    /// already inside the margin (a lifetime of a second or two, or a reply slower
    /// than half the lifetime): no second refresh so soon. Never stored.
    RefreshThrottled,
}

impl FailureKind {
    /// Whether the provider refused our client or request: a configuration to fix,
    /// not a trouble that passes with time.
    pub fn is_configuration(self) -> bool {
        matches!(
            self,
            FailureKind::ClientRejected | FailureKind::RequestRejected
        )
    }
}

impl core::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FailureKind::ServerError(s) => write!(f, "provider server error {s}"),
            FailureKind::RateLimited => f.write_str("rate limited by the provider"),
            FailureKind::UnreadableReply => f.write_str("unreadable reply from the provider"),
            FailureKind::NotSent => f.write_str("request could not be sent"),
            FailureKind::OutcomeUnknown => f.write_str("no reply to a sent request"),
            FailureKind::ClientRejected => f.write_str("client credentials rejected"),
            FailureKind::RequestRejected => f.write_str("request rejected by the provider"),
            FailureKind::StoreUnavailable => f.write_str("token store unavailable"),
            FailureKind::RefreshInProgress => {
                f.write_str("a refresh is in progress in another worker")
            }
            FailureKind::RefreshThrottled => {
                f.write_str("refreshed moments ago; the provider's tokens live too briefly")
            }
        }
    }
}

/// Lifecycle status stored with the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    /// Working.
    Active,
    /// Refreshing fails for a transient reason; the next attempt waits for `retry_at`.
    Degraded {
        /// Consecutive failures.
        failures: u32,
        /// No attempt before this instant (no storm across processes).
        retry_at: Timestamp,
        /// The last failure.
        last: FailureKind,
    },
    /// The grant is gone; only a new authorization helps.
    ReauthRequired {
        /// Why.
        reason: ReauthReason,
        /// Since when.
        since: Timestamp,
    },
    /// Disconnected by the user through tokenfence.
    Disconnected {
        /// When.
        at: Timestamp,
    },
}

/// Everything stored for one connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// The caller's name for the connection.
    pub id: ConnectionId,
    /// +1 on every committed change.
    pub generation: Generation,
    /// Who authorized it.
    pub identity: GrantIdentity,
    /// Intuit realm (company) id, or the provider's tenant id.
    pub realm_id: Option<String>,
    /// Current access token, if any.
    pub access: Option<AccessGrant>,
    /// Current refresh token.
    pub refresh: RefreshToken,
    /// When this refresh-token value was first received.
    pub refresh_issued_at: Timestamp,
    /// The provider forgets the refresh token if unused past this instant.
    pub idle_deadline: Option<Timestamp>,
    /// The refresh token dies at this instant whatever happens.
    pub hard_deadline: Option<Timestamp>,
    /// A refresh from this record may have been processed by the provider without
    /// the reply being seen (lost reply, dead lease holder) since this instant.
    pub in_doubt_since: Option<Timestamp>,
    /// When the doubt starts at an unreleased lease that was taken over, that
    /// lease's owner and request. A worker whose lease request lost its answer (so
    /// nothing was sent under the grant) recognises its own request here and undoes
    /// a rotation declared lost because of it. Absent in records written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_doubt_holder: Option<(WorkerId, LeaseRequestId)>,
    /// Lifecycle status.
    pub status: Status,
    /// When the status is a configuration failure (the provider refused the
    /// client or the request): the credentials it belongs to. Others are not held
    /// back by it. Absent in records written before, and then the failure holds
    /// back every client as it used to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_client: Option<ClientFingerprint>,
    /// Set by an import ([`from_existing`](Self::from_existing)) until the first
    /// refresh succeeds: the grant is unproven and what the provider says of it
    /// unknown, so work is due at once (the next keep-alive pass proves it alive
    /// and learns its deadlines). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_at: Option<Timestamp>,
    /// Last successful refresh.
    pub last_refreshed_at: Option<Timestamp>,
    /// Last committed change.
    pub updated_at: Timestamp,
}

impl ConnectionRecord {
    /// An active record holding `refresh` (and no access token), as of `now`, at
    /// generation 0: for importing a grant obtained elsewhere. Deadlines, realm and
    /// access token can be set with struct-update syntax.
    pub fn new(
        id: ConnectionId,
        identity: GrantIdentity,
        refresh: RefreshToken,
        now: Timestamp,
    ) -> ConnectionRecord {
        ConnectionRecord {
            id,
            generation: Generation(0),
            identity,
            realm_id: None,
            access: None,
            refresh,
            refresh_issued_at: now,
            idle_deadline: None,
            hard_deadline: None,
            in_doubt_since: None,
            in_doubt_holder: None,
            status: Status::Active,
            blocked_client: None,
            imported_at: None,
            last_refreshed_at: None,
            updated_at: now,
        }
    }

    /// A record for a grant obtained elsewhere (an import from another system),
    /// kept by tokenfence from now on. Nothing unknown is assumed: an access
    /// token without a known expiry is not served (the first caller refreshes);
    /// unknown deadlines stay unknown (an `invalid_grant` is never blamed on a
    /// guessed idle window); and work is due at once (`imported_at`), so the next
    /// keep-alive pass proves the grant alive and learns its deadlines.
    pub fn from_existing(
        id: ConnectionId,
        identity: GrantIdentity,
        existing: ExistingGrant,
        now: Timestamp,
    ) -> ConnectionRecord {
        ConnectionRecord {
            realm_id: existing.realm_id,
            access: existing.access,
            idle_deadline: existing.idle_deadline,
            hard_deadline: existing.hard_deadline,
            imported_at: Some(now),
            ..ConnectionRecord::new(id, identity, existing.refresh, now)
        }
    }

    /// A record for a freshly authorized grant (authorization-code exchange).
    pub fn from_authorization(
        id: ConnectionId,
        identity: GrantIdentity,
        realm_id: Option<String>,
        grant: TokenGrant,
        profile: &ProviderProfile,
        issued_at: Timestamp,
    ) -> Option<ConnectionRecord> {
        let refresh = grant.refresh.clone()?;
        let base = ConnectionRecord {
            realm_id,
            hard_deadline: profile.hard_lifetime.map(|d| issued_at.saturating_add(d)),
            ..ConnectionRecord::new(id, identity, refresh, issued_at)
        };
        Some(base.with_grant(&grant, profile, issued_at))
    }

    /// The record after a successful refresh whose request was sent at `sent_at`.
    ///
    /// S6: a grant without `refresh_token` keeps the stored one (RFC 6749 §6); one
    /// without `expires_in` gets the profile's default. Lifetimes count from
    /// `sent_at`, the earliest instant the provider could have issued the tokens.
    /// The generation is left as is: the commit sets it.
    pub fn with_grant(
        &self,
        grant: &TokenGrant,
        profile: &ProviderProfile,
        sent_at: Timestamp,
    ) -> ConnectionRecord {
        let rotated = grant.refresh.as_ref().is_some_and(|r| *r != self.refresh);
        let ttl = grant.expires_in.unwrap_or(profile.default_access_ttl);
        ConnectionRecord {
            access: Some(AccessGrant {
                token: grant.access.clone(),
                expires_at: sent_at.saturating_add(ttl),
            }),
            refresh: grant
                .refresh
                .clone()
                .unwrap_or_else(|| self.refresh.clone()),
            refresh_issued_at: if rotated {
                sent_at
            } else {
                self.refresh_issued_at
            },
            idle_deadline: grant
                .refresh_expires_in
                .or(profile.idle_window)
                .map(|d| sent_at.saturating_add(d)),
            hard_deadline: stable_deadline(
                grant.hard_expires_in.map(|d| sent_at.saturating_add(d)),
                self.hard_deadline,
            ),
            in_doubt_since: None,
            in_doubt_holder: None,
            status: Status::Active,
            blocked_client: None,
            imported_at: None,
            last_refreshed_at: Some(sent_at),
            updated_at: sent_at,
            ..self.clone()
        }
    }

    /// The access token, if it stays valid for more than the margin after `now` and
    /// the connection is usable (S5). The margin is `margin` adapted to the token's
    /// lifetime ([`access_margin`](Self::access_margin)).
    pub fn usable_access(&self, now: Timestamp, margin: Duration) -> Option<&AccessToken> {
        match self.status {
            Status::Active | Status::Degraded { .. } => {}
            Status::ReauthRequired { .. } | Status::Disconnected { .. } => return None,
        }
        let margin = self.access_margin(margin);
        self.access
            .as_ref()
            .filter(|a| a.expires_at > now.saturating_add(margin))
            .map(|a| &a.token)
    }

    /// The margin kept before this record's access token expires: `margin`, but
    /// never more than half of the lifetime the provider granted (counted from the
    /// refresh that obtained it). A margin as long as the lifetime would make every
    /// new token unusable at once: a refresh storm that serves nobody (found with
    /// 60-second tokens and the default 5-minute margin).
    pub fn access_margin(&self, margin: Duration) -> Duration {
        match (&self.access, self.last_refreshed_at) {
            (Some(a), Some(issued)) => margin.min(a.expires_at.saturating_since(issued) / 2),
            _ => margin,
        }
    }

    /// When a keep-alive refresh is due: `lead` before the idle deadline, but never
    /// before half of the idle window since the last refresh has passed (a lead
    /// longer than the window must not turn keep-alive into a refresh storm).
    pub fn keepalive_due_at(&self, lead: Duration) -> Option<Timestamp> {
        if !self.is_live() {
            return None;
        }
        let deadline = self.idle_deadline?;
        let since = self.last_refreshed_at.unwrap_or(self.refresh_issued_at);
        let halfway = since.saturating_add(deadline.saturating_since(since) / 2);
        Some(deadline.saturating_sub(lead).max(halfway))
    }

    /// When a refresh is due without any caller: the keep-alive instant; at once
    /// while the record says a refresh may have rotated the token unseen; or, for a
    /// degraded connection, at its recorded retry time. A doubt must be resolved
    /// while the provider's grace window is still open, caller or not; waiting for
    /// the next caller lost Intuit connections whose callers came after the 24-hour
    /// grace (found by the simulator). A degraded connection whose token was still
    /// good stayed degraded until a caller needed a new token, long after the
    /// provider had recovered (found by the simulator). Machines arm their timer
    /// here and stores' `due_for_work` scans report it, so work left by a process
    /// that stopped is picked up by another. Retries still wait for the recorded
    /// retry time, so this is no storm.
    pub fn work_due_at(&self, lead: Duration) -> Option<Timestamp> {
        [self.keepalive_due_at(lead), self.pending_work_at()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The part of [`work_due_at`](Self::work_due_at) that does not depend on the
    /// keep-alive lead: since when a refresh is in doubt, when a degraded
    /// connection's retry is due, or since an import not yet proven by a refresh
    /// (the earliest). `None` unless the record is live. A
    /// connection degraded by a configuration error (the provider refused the
    /// client or the request) is not retried on a timer: that needs a fix, not time,
    /// and a wrong client presented every few minutes can get an app locked out.
    pub fn pending_work_at(&self) -> Option<Timestamp> {
        if !self.is_live() {
            return None;
        }
        let retry = match self.status {
            Status::Degraded { retry_at, last, .. } if !last.is_configuration() => Some(retry_at),
            _ => None,
        };
        [self.in_doubt_since, retry, self.imported_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the grant may still be refreshed (not dead, not disconnected).
    pub fn is_live(&self) -> bool {
        matches!(self.status, Status::Active | Status::Degraded { .. })
    }

    /// The number of consecutive failures recorded.
    pub fn failures(&self) -> u32 {
        match self.status {
            Status::Degraded { failures, .. } => failures,
            _ => 0,
        }
    }
}

/// The hard deadline after a refresh. Providers report it in whole seconds from a
/// moment we only bracket, so each refresh would move it by a little: keep the
/// known deadline unless the new report differs by more than a minute (found by the
/// simulator: `ReconnectSoon` repeated on every refresh).
fn stable_deadline(reported: Option<Timestamp>, known: Option<Timestamp>) -> Option<Timestamp> {
    const TOLERANCE: u64 = 60_000;
    match (reported, known) {
        (Some(new), Some(old)) if new.as_millis().abs_diff(old.as_millis()) <= TOLERANCE => {
            Some(old)
        }
        (Some(new), _) => Some(new),
        (None, old) => old,
    }
}

/// A time-limited claim "I am refreshing this connection". Kept by the store until
/// its owner releases it or another worker takes it over after expiry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it.
    pub owner: WorkerId,
    /// When it was granted.
    pub acquired_at: Timestamp,
    /// When it stops excluding others.
    pub expires_at: Timestamp,
    /// The record generation at the moment it was granted (`None`: no record).
    pub generation: Option<Generation>,
    /// The request it was granted to (0: unknown, or a row a store restored).
    #[serde(default)]
    pub request: LeaseRequestId,
}
