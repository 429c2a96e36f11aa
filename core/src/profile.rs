//! Provider profiles: everything tokenfence must know about an OAuth provider, as data.
//!
//! Intuit QuickBooks Online (production and sandbox) is built in, with a generic
//! RFC 6749 profile and the behaviour classes of the design (non-rotating, strict
//! rotation, rotation with a grace window, periodic rotation, reuse detection), so a
//! profile for another provider is a few lines.

use crate::secret::ClientSecret;
use crate::time::{days, hours, minutes};
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;
use serde::{Deserialize, Serialize};

/// The environment a client identity belongs to. Intuit issues one client id/secret
/// for Development (sandbox) and another for Production; tokens never cross over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Environment {
    /// Live customer data.
    Production,
    /// Test companies.
    Sandbox,
}

impl core::fmt::Display for Environment {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Environment::Production => "production",
            Environment::Sandbox => "sandbox",
        })
    }
}

/// When the provider hands out a new refresh-token value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rotation {
    /// The same refresh token for the life of the grant (Google, HubSpot, Zoho).
    Never,
    /// A new refresh token on every refresh (Xero, Slack, GitHub Apps, Atlassian).
    EveryRefresh,
    /// The value changes at most once per period (Intuit: about once a day).
    Periodic {
        /// Minimum time between two rotations.
        period: Duration,
    },
}

/// What presenting the previous refresh token inside its grace window returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GraceReplay {
    /// The same successor again.
    Idempotent,
    /// Another successor (a fork of the family).
    Fork,
}

/// How the provider rotates refresh tokens and what it forgives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RotationPolicy {
    /// When new values are issued.
    pub rotation: Rotation,
    /// How long a rotated-away token keeps working; zero means it dies at once.
    pub grace: Duration,
    /// What a replay inside the grace window returns.
    pub grace_replay: GraceReplay,
    /// Presenting a rotated-away token outside the grace window revokes the whole
    /// family (RFC 9700 reuse detection).
    pub reuse_detection: bool,
}

/// What a worker may do when a refresh it (or a dead lease holder) sent may have been
/// processed by the provider without anybody seeing the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InDoubtRecovery {
    /// Presenting the same refresh token again is safe: the provider still accepts it
    /// (no rotation, or the grace window is still open).
    PresentAgain,
    /// Presenting it again cannot harm the family, but it may be rejected: a
    /// rejection then means the rotation is lost, not that the user revoked.
    PresentAgainMayBeLost,
    /// Presenting it again could be a replay that revokes the family; the rotation
    /// must be declared lost.
    DeclareLost,
}

impl RotationPolicy {
    /// A provider that never rotates.
    pub const NEVER: RotationPolicy = RotationPolicy {
        rotation: Rotation::Never,
        grace: Duration::ZERO,
        grace_replay: GraceReplay::Idempotent,
        reuse_detection: false,
    };

    /// Whether presenting a token can change it although a presentation processed
    /// just before left it in place: a forking provider mints a sibling on a replay
    /// inside the grace window; a periodic one rotates once its period is over.
    pub fn later_presentation_may_rotate(&self) -> bool {
        self.grace_replay == GraceReplay::Fork || matches!(self.rotation, Rotation::Periodic { .. })
    }

    /// What to do when a refresh sent at `in_doubt_since` may have rotated the token.
    /// `safety` is subtracted from the grace window to allow for clock skew and the
    /// time the next request takes.
    pub fn in_doubt_recovery(
        &self,
        in_doubt_since: crate::Timestamp,
        now: crate::Timestamp,
        safety: Duration,
    ) -> InDoubtRecovery {
        if self.rotation == Rotation::Never {
            return InDoubtRecovery::PresentAgain;
        }
        let elapsed = now.saturating_since(in_doubt_since);
        if elapsed.saturating_add(safety) < self.grace {
            InDoubtRecovery::PresentAgain
        } else if self.reuse_detection {
            InDoubtRecovery::DeclareLost
        } else {
            InDoubtRecovery::PresentAgainMayBeLost
        }
    }
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientAuth {
    /// `Authorization: Basic base64(client_id:client_secret)` (Intuit, most providers).
    BasicHeader,
    /// `client_id` and `client_secret` in the form body.
    FormBody,
}

/// How the revocation endpoint takes the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RevokeStyle {
    /// Intuit: JSON body `{"token": "..."}` with client authentication.
    JsonToken,
    /// RFC 7009: form body `token=...&token_type_hint=refresh_token`.
    FormToken,
}

/// Everything tokenfence needs to know about one provider, as data.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProviderProfile {
    /// Stable name stored with each connection, e.g. `"intuit"`.
    pub name: String,
    /// Token endpoint (refresh and authorization-code exchange).
    pub token_url: String,
    /// Revocation endpoint, if the provider has one.
    pub revoke_url: Option<String>,
    /// Body format of the revocation request.
    pub revoke_style: RevokeStyle,
    /// Authorization endpoint for the consent redirect.
    pub authorize_url: Option<String>,
    /// Client authentication method.
    pub client_auth: ClientAuth,
    /// Send Intuit's `x-include-refresh-token-hard-expires-in: true` header.
    pub ask_hard_expiry: bool,
    /// Response header naming the provider's transaction id (Intuit: `intuit_tid`).
    pub transaction_id_header: Option<String>,
    /// Rotation behaviour.
    pub rotation: RotationPolicy,
    /// Access-token lifetime assumed when a response omits `expires_in` (S6).
    pub default_access_ttl: Duration,
    /// Refresh token dies after this long unused (Intuit: 100 days, rolling).
    pub idle_window: Option<Duration>,
    /// Refresh token dies this long after the original authorization whatever happens
    /// (Intuit: 5 years).
    pub hard_lifetime: Option<Duration>,
    /// Provider-specific error codes that mean `invalid_grant` (GitHub:
    /// `bad_refresh_token`).
    pub invalid_grant_aliases: Vec<String>,
    /// Scopes a consent asks for unless the caller names others.
    pub scopes: Vec<String>,
    /// Send a PKCE challenge (RFC 7636, S256) with the consent and the verifier
    /// with the code exchange. On by default: RFC 9700 asks for it, and a server
    /// that does not know the parameters ignores them (RFC 6749 §3.1).
    pub pkce: bool,
    /// Further query parameters of the consent URL, sorted by name (Google:
    /// `access_type=offline`, `prompt=consent`, without which no refresh token).
    pub authorize_params: Vec<(String, String)>,
}

impl ProviderProfile {
    /// A plain RFC 6749 provider: Basic auth, no rotation, 1 h default access lifetime.
    pub fn generic(name: impl Into<String>, token_url: impl Into<String>) -> Self {
        ProviderProfile {
            name: name.into(),
            token_url: token_url.into(),
            revoke_url: None,
            revoke_style: RevokeStyle::FormToken,
            authorize_url: None,
            client_auth: ClientAuth::BasicHeader,
            ask_hard_expiry: false,
            transaction_id_header: None,
            rotation: RotationPolicy::NEVER,
            default_access_ttl: hours(1),
            idle_window: None,
            hard_lifetime: None,
            invalid_grant_aliases: Vec::new(),
            scopes: Vec::new(),
            pkce: true,
            authorize_params: Vec::new(),
        }
    }

    /// Intuit QuickBooks Online. Sandbox and production share every OAuth endpoint;
    /// what differs is the client identity, which tokenfence stores with each
    /// connection and checks before every request.
    pub fn intuit() -> Self {
        ProviderProfile {
            name: "intuit".into(),
            token_url: "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer".into(),
            revoke_url: Some("https://developer.api.intuit.com/v2/oauth2/tokens/revoke".into()),
            revoke_style: RevokeStyle::JsonToken,
            authorize_url: Some("https://appcenter.intuit.com/connect/oauth2".into()),
            client_auth: ClientAuth::BasicHeader,
            ask_hard_expiry: true,
            transaction_id_header: Some("intuit_tid".into()),
            rotation: RotationPolicy {
                rotation: Rotation::Periodic { period: hours(24) },
                grace: hours(24),
                grace_replay: GraceReplay::Idempotent,
                reuse_detection: false,
            },
            default_access_ttl: hours(1),
            idle_window: Some(days(100)),
            hard_lifetime: Some(days(5 * 365)),
            invalid_grant_aliases: Vec::new(),
            scopes: alloc::vec!["com.intuit.quickbooks.accounting".into()],
            pkce: true,
            authorize_params: Vec::new(),
        }
    }

    /// Xero: rotates on every refresh, previous token valid 30 minutes, 60-day idle.
    pub fn xero() -> Self {
        ProviderProfile {
            revoke_url: Some("https://identity.xero.com/connect/revocation".into()),
            authorize_url: Some("https://login.xero.com/identity/connect/authorize".into()),
            rotation: Self::grace_policy(minutes(30), false),
            default_access_ttl: minutes(30),
            idle_window: Some(days(60)),
            scopes: alloc::vec!["offline_access".into()],
            ..Self::generic("xero", "https://identity.xero.com/connect/token")
        }
    }

    /// Atlassian (Jira, Confluence): rotation with a 10-minute grace and reuse
    /// detection, 90-day idle window, 365-day cap.
    pub fn atlassian() -> Self {
        ProviderProfile {
            authorize_url: Some("https://auth.atlassian.com/authorize".into()),
            rotation: Self::grace_policy(minutes(10), true),
            idle_window: Some(days(90)),
            hard_lifetime: Some(days(365)),
            client_auth: ClientAuth::FormBody,
            scopes: alloc::vec!["offline_access".into()],
            authorize_params: alloc::vec![
                ("audience".into(), "api.atlassian.com".into()),
                ("prompt".into(), "consent".into()),
            ],
            ..Self::generic("atlassian", "https://auth.atlassian.com/oauth/token")
        }
    }

    /// Google: never rotates; refresh tokens die after six months unused.
    pub fn google() -> Self {
        ProviderProfile {
            revoke_url: Some("https://oauth2.googleapis.com/revoke".into()),
            authorize_url: Some("https://accounts.google.com/o/oauth2/v2/auth".into()),
            client_auth: ClientAuth::FormBody,
            idle_window: Some(days(182)),
            authorize_params: alloc::vec![
                ("access_type".into(), "offline".into()),
                ("prompt".into(), "consent".into()),
            ],
            ..Self::generic("google", "https://oauth2.googleapis.com/token")
        }
    }

    /// GitHub App user tokens: strict rotation, no grace, error code
    /// `bad_refresh_token`. Each refresh token lives six months from its issue and
    /// every refresh issues a new one (`refresh_token_expires_in` in each reply):
    /// a window that a refresh renews, not a cap counted from the authorization
    /// (with one, every GitHub connection was told to reconnect at four months).
    pub fn github_app() -> Self {
        ProviderProfile {
            client_auth: ClientAuth::FormBody,
            rotation: Self::grace_policy(Duration::ZERO, false),
            default_access_ttl: hours(8),
            idle_window: Some(days(182)),
            invalid_grant_aliases: alloc::vec!["bad_refresh_token".into()],
            ..Self::generic("github", "https://github.com/login/oauth/access_token")
        }
    }

    /// Behaviour class: strict rotation with reuse detection and no grace (Auth0 with
    /// zero leeway, RFC 9700 servers). The strictest profile tokenfence supports.
    pub fn strict_reuse_detecting(name: impl Into<String>, token_url: impl Into<String>) -> Self {
        ProviderProfile {
            rotation: Self::grace_policy(Duration::ZERO, true),
            ..Self::generic(name, token_url)
        }
    }

    /// Behaviour class: rotation on every refresh with a grace window for the
    /// previous token, with or without reuse detection outside it.
    pub fn grace_policy(grace: Duration, reuse_detection: bool) -> RotationPolicy {
        RotationPolicy {
            rotation: Rotation::EveryRefresh,
            grace,
            grace_replay: GraceReplay::Idempotent,
            reuse_detection,
        }
    }

    /// Whether `code` (an OAuth `error` value) means the grant is invalid in this
    /// provider's dialect.
    pub fn means_invalid_grant(&self, code: &str) -> bool {
        code == "invalid_grant" || self.invalid_grant_aliases.iter().any(|a| a == code)
    }
}

/// The client identity a connection is refreshed with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientCredentials {
    /// Public client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: ClientSecret,
    /// Which environment these credentials belong to.
    pub environment: Environment,
}

impl ClientCredentials {
    /// Credentials for a provider without separate environments (every one but
    /// Intuit): the environment is `Production`, which such providers never
    /// check. Intuit apps say which with [`Environment`] (or
    /// `Provider::intuit_sandbox`).
    pub fn new(client_id: impl Into<String>, client_secret: ClientSecret) -> Self {
        ClientCredentials {
            client_id: client_id.into(),
            client_secret,
            environment: Environment::Production,
        }
    }

    /// A fingerprint of the client id and secret (SHA-256, first 8 bytes): what a
    /// record keeps to say which credentials a configuration failure belongs to.
    /// It identifies credentials; it does not reveal the secret.
    pub fn fingerprint(&self) -> ClientFingerprint {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"tokenfence client fingerprint v1\0");
        h.update(self.client_id.as_bytes());
        h.update(b"\0");
        h.update(self.client_secret.expose().as_bytes());
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        ClientFingerprint(u64::from_be_bytes(first))
    }
}

/// Which client credentials something belongs to: see
/// [`ClientCredentials::fingerprint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ClientFingerprint(pub u64);

impl core::fmt::Display for ClientFingerprint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timestamp;

    #[test]
    fn intuit_in_doubt_is_recoverable_within_the_grace_day() {
        let p = ProviderProfile::intuit().rotation;
        let t0 = Timestamp::from_secs(1_000);
        let safety = minutes(5);
        assert_eq!(
            p.in_doubt_recovery(t0, t0.saturating_add(hours(23)), safety),
            InDoubtRecovery::PresentAgain
        );
        assert_eq!(
            p.in_doubt_recovery(t0, t0.saturating_add(hours(25)), safety),
            InDoubtRecovery::PresentAgainMayBeLost
        );
    }

    #[test]
    fn reuse_detection_without_grace_never_presents_again() {
        let p = ProviderProfile::strict_reuse_detecting("s", "https://s.example/token").rotation;
        let t0 = Timestamp::from_secs(1_000);
        assert_eq!(
            p.in_doubt_recovery(t0, t0, Duration::ZERO),
            InDoubtRecovery::DeclareLost
        );
    }
}
