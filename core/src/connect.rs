//! The authorization-code flow as pure functions: the consent URL with `state` and
//! PKCE (S256) built from injected entropy, the pending authorization that the
//! callback must match, and the callback's query parsed into a typed outcome.
//!
//! The driver persists the [`PendingAuthorization`] (sealed) under the hash of its
//! state, so the callback may land on another process; it takes it back exactly
//! once ([`state_key`]), checks it with [`PendingAuthorization::check`], exchanges
//! the code with [`authorization_code_request`](crate::authorization_code_request)
//! and the verifier, and commits through the machine.

use crate::profile::{ClientCredentials, ProviderProfile};
use crate::record::{ConnectionId, ConnectionRecord, GrantIdentity};
use crate::secret::SecretString;
use crate::time::Timestamp;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use base64::Engine as _;
use core::time::Duration;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long a consent may take before its callback is refused.
pub const PENDING_TTL: Duration = Duration::from_secs(600);

/// Entropy for one authorization: 32 bytes of `state`, 32 of PKCE verifier.
pub type ConnectEntropy = [u8; 64];

/// What the caller of `begin` chooses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Scopes to ask for; `None`: the profile's.
    pub scopes: Option<Vec<String>>,
    /// On a reconnect, accept a callback for another company (realm) than the
    /// connection's: the connection is replaced and its old grant revoked.
    pub replace_realm: bool,
}

/// An authorization begun and not yet finished: what the callback must match.
/// Holds the PKCE verifier: store it sealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAuthorization {
    /// The connection the grant is for.
    pub connection: ConnectionId,
    /// The client that asked (its credentials exchange the code).
    pub identity: GrantIdentity,
    /// The redirect URI sent (the exchange must repeat it).
    pub redirect_uri: String,
    /// PKCE verifier, when the provider takes PKCE.
    pub verifier: Option<SecretString>,
    /// When it was begun.
    pub created_at: Timestamp,
    /// After this the callback is refused.
    pub expires_at: Timestamp,
    /// The connection existed when the flow began (a reconnect).
    pub reconnect: bool,
    /// See [`ConnectOptions::replace_realm`].
    pub replace_realm: bool,
}

/// The consent URL to send the user to, and what to keep until the callback.
#[derive(Clone, Debug)]
pub struct Authorization {
    /// The provider's consent URL (carries `state` and the PKCE challenge, no secret).
    pub url: String,
    /// The `state` value (the key of the pending authorization).
    pub state: SecretString,
    /// What the callback must match.
    pub pending: PendingAuthorization,
}

/// Why an authorization cannot begin or finish. Never carries a code, a state or a
/// token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The profile has no authorization endpoint.
    #[error("provider {0} has no authorize_url in its profile")]
    NoAuthorizeUrl(String),
    /// The callback's query is not a provider's redirect (no `state`, no `code`
    /// and no `error`, a value repeated).
    #[error("the callback is not an authorization redirect: {0}")]
    BadCallback(&'static str),
    /// No pending authorization has this state: forged, already used, or begun
    /// against another store.
    #[error("unknown or already used state: nothing was changed")]
    UnknownState,
    /// The consent took longer than [`PENDING_TTL`].
    #[error("the authorization expired (begun at {created_at:?}, expired at {expires_at:?}): begin again")]
    Expired {
        /// When it was begun.
        created_at: Timestamp,
        /// When it expired.
        expires_at: Timestamp,
    },
    /// A reconnect came back for another company than the connection's.
    #[error("the reconnect came back for realm {got}, but connection {connection} is realm {expected}: nothing was changed")]
    RealmMismatch {
        /// The connection.
        connection: ConnectionId,
        /// Its realm.
        expected: String,
        /// The callback's realm (`none` when absent).
        got: String,
    },
}

/// The callback, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Callback {
    /// Consent given.
    Code {
        /// The state sent.
        state: SecretString,
        /// The authorization code (single use).
        code: SecretString,
        /// Intuit's `realmId` (the company).
        realm_id: Option<String>,
    },
    /// The provider redirected with an error (the user denied, or a bad request).
    Denied {
        /// The state sent.
        state: SecretString,
        /// The OAuth error code (`access_denied`, ...).
        error: String,
        /// `error_description`, if any (provider text, no secret).
        description: Option<String>,
    },
}

impl Callback {
    /// Parses the raw query string of the redirect (with or without a leading `?`,
    /// or a whole URL).
    pub fn parse(query: &str) -> Result<Callback, ConnectError> {
        let query = query.split_once('?').map_or(query, |(_, q)| q);
        let query = query.split('#').next().unwrap_or("");
        let (mut state, mut code, mut realm, mut error, mut description) =
            (None, None, None, None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "state" => &mut state,
                "code" => &mut code,
                "realmId" => &mut realm,
                "error" => &mut error,
                "error_description" => &mut description,
                _ => continue,
            };
            if slot.is_some() {
                return Err(ConnectError::BadCallback("a parameter is repeated"));
            }
            *slot = Some(value.into_owned());
        }
        let state = state
            .filter(|s| !s.is_empty())
            .map(SecretString::new)
            .ok_or(ConnectError::BadCallback("no state"))?;
        match (error, code) {
            (Some(error), _) => Ok(Callback::Denied {
                state,
                error: printable(&error, 64),
                description: description.map(|d| printable(&d, 256)),
            }),
            (None, Some(code)) if !code.is_empty() => Ok(Callback::Code {
                state,
                code: SecretString::new(code),
                realm_id: realm.filter(|r| !r.is_empty()),
            }),
            (None, _) => Err(ConnectError::BadCallback("neither code nor error")),
        }
    }

    /// The state the callback carries.
    pub fn state(&self) -> &SecretString {
        match self {
            Callback::Code { state, .. } | Callback::Denied { state, .. } => state,
        }
    }
}

/// Provider text kept for an error message: printable characters, bounded.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The key a pending authorization is stored under: SHA-256 of its state, hex.
/// The state itself is never stored.
pub fn state_key(state: &SecretString) -> String {
    let digest = Sha256::digest(state.expose().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The PKCE S256 challenge of `verifier` (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &SecretString) -> String {
    b64(&Sha256::digest(verifier.expose().as_bytes()))
}

/// Begins an authorization of `connection` for `client` at `profile`: the
/// consent URL and the pending authorization to keep. `existing` is the
/// connection as stored now (a reconnect must come back for its realm).
#[allow(clippy::too_many_arguments)] // each is one fact of the flow
pub fn begin(
    profile: &ProviderProfile,
    client: &ClientCredentials,
    connection: &ConnectionId,
    redirect_uri: &str,
    options: &ConnectOptions,
    existing: Option<&ConnectionRecord>,
    entropy: &ConnectEntropy,
    now: Timestamp,
) -> Result<Authorization, ConnectError> {
    let authorize = profile
        .authorize_url
        .as_deref()
        .ok_or_else(|| ConnectError::NoAuthorizeUrl(profile.name.clone()))?;
    let state = SecretString::new(b64(&entropy[..32]));
    let verifier = profile.pkce.then(|| SecretString::new(b64(&entropy[32..])));
    let scopes = options.scopes.as_ref().unwrap_or(&profile.scopes).join(" ");
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("client_id", &client.client_id)
        .append_pair("response_type", "code")
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("state", state.expose());
    if !scopes.is_empty() {
        query.append_pair("scope", &scopes);
    }
    if let Some(v) = &verifier {
        query
            .append_pair("code_challenge", &pkce_challenge(v))
            .append_pair("code_challenge_method", "S256");
    }
    for (k, v) in &profile.authorize_params {
        query.append_pair(k, v);
    }
    let separator = if authorize.contains('?') { '&' } else { '?' };
    let url = format!("{authorize}{separator}{}", query.finish());
    let identity = GrantIdentity {
        provider: profile.name.clone(),
        environment: client.environment,
        client_id: client.client_id.clone(),
    };
    Ok(Authorization {
        url,
        state,
        pending: PendingAuthorization {
            connection: connection.clone(),
            identity,
            redirect_uri: redirect_uri.into(),
            verifier,
            created_at: now,
            expires_at: now.saturating_add(PENDING_TTL),
            reconnect: existing.is_some(),
            replace_realm: options.replace_realm,
        },
    })
}

impl PendingAuthorization {
    /// Whether a callback taken at `now` for `realm_id` may be exchanged, given
    /// the connection as stored now: not expired; a connection that has a realm
    /// comes back for it unless the caller allowed a replacement. `Ok(true)`: the
    /// realm changes (revoke the old grant once the new one is stored).
    pub fn check(
        &self,
        realm_id: Option<&str>,
        stored: Option<&ConnectionRecord>,
        now: Timestamp,
    ) -> Result<bool, ConnectError> {
        if now >= self.expires_at {
            return Err(ConnectError::Expired {
                created_at: self.created_at,
                expires_at: self.expires_at,
            });
        }
        let Some(expected) = stored.and_then(|r| r.realm_id.as_deref()) else {
            return Ok(false);
        };
        if realm_id == Some(expected) {
            return Ok(false);
        }
        if self.replace_realm {
            return Ok(true);
        }
        Err(ConnectError::RealmMismatch {
            connection: self.connection.clone(),
            expected: expected.into(),
            got: realm_id.unwrap_or("none").into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Environment;
    use crate::ClientSecret;

    fn client() -> ClientCredentials {
        ClientCredentials {
            client_id: "app".into(),
            client_secret: ClientSecret::new("s"),
            environment: Environment::Production,
        }
    }

    fn pending(
        profile: &ProviderProfile,
        existing: Option<&ConnectionRecord>,
        replace: bool,
    ) -> Authorization {
        let options = ConnectOptions {
            replace_realm: replace,
            ..ConnectOptions::default()
        };
        begin(
            profile,
            &client(),
            &ConnectionId("c".into()),
            "https://app.example/cb",
            &options,
            existing,
            &core::array::from_fn(|i| i as u8),
            Timestamp::from_secs(1_000),
        )
        .unwrap()
    }

    #[test]
    fn the_consent_url_carries_state_scope_and_the_pkce_challenge() {
        let profile = ProviderProfile {
            pkce: true,
            ..ProviderProfile::intuit()
        };
        let a = pending(&profile, None, false);
        assert!(a.url.starts_with("https://appcenter.intuit.com/connect/oauth2?client_id=app&response_type=code&redirect_uri=https%3A%2F%2Fapp.example%2Fcb&state="));
        assert!(a.url.contains("&scope=com.intuit.quickbooks.accounting"));
        let verifier = a.pending.verifier.clone().unwrap();
        assert_eq!(verifier.len(), 43, "32 bytes, base64url");
        assert!(a.url.contains(&format!(
            "code_challenge={}&code_challenge_method=S256",
            pkce_challenge(&verifier)
        )));
        assert!(
            !a.url.contains(verifier.expose()),
            "the verifier stays home"
        );
        assert!(a.url.contains(&format!("state={}", a.state.expose())));
        assert_eq!(a.pending.expires_at, Timestamp::from_secs(1_600));
        // Another draw, another state.
        let b = begin(
            &profile,
            &client(),
            &ConnectionId("c".into()),
            "https://app.example/cb",
            &ConnectOptions::default(),
            None,
            &[8; 64],
            Timestamp::from_secs(1_000),
        )
        .unwrap();
        assert_ne!(a.state, b.state);
        assert_ne!(state_key(&a.state), state_key(&b.state));
    }

    #[test]
    fn rfc_7636_appendix_b_challenge() {
        let verifier = SecretString::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
        assert_eq!(
            pkce_challenge(&verifier),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn callbacks_parse_into_typed_outcomes() {
        let c = Callback::parse("?code=abc&state=xyz&realmId=4620816365").unwrap();
        assert_eq!(
            c,
            Callback::Code {
                state: SecretString::new("xyz"),
                code: SecretString::new("abc"),
                realm_id: Some("4620816365".into())
            }
        );
        let d = Callback::parse("https://app.example/cb?error=access_denied&error_description=User%20said%20no&state=xyz").unwrap();
        assert!(
            matches!(d, Callback::Denied { ref error, ref description, .. } if error == "access_denied" && description.as_deref() == Some("User said no"))
        );
        for (q, why) in [
            ("code=abc", "no state"),
            ("state=&code=abc", "no state"),
            ("state=x", "neither code nor error"),
            ("state=x&code=", "neither code nor error"),
            ("state=x&state=y&code=a", "a parameter is repeated"),
            ("", "no state"),
        ] {
            assert_eq!(
                Callback::parse(q),
                Err(ConnectError::BadCallback(why)),
                "{q}"
            );
        }
    }

    #[test]
    fn a_reconnect_must_come_back_for_the_same_realm() {
        let profile = ProviderProfile::intuit();
        let existing = crate::ExistingGrant {
            refresh: crate::RefreshToken::new("r"),
            access: None,
            realm_id: Some("111".into()),
            idle_deadline: None,
            hard_deadline: None,
        };
        let identity = GrantIdentity {
            provider: "intuit".into(),
            environment: Environment::Production,
            client_id: "app".into(),
        };
        let record = ConnectionRecord::from_existing(
            ConnectionId("c".into()),
            identity,
            existing,
            Timestamp::from_secs(900),
        );
        let now = Timestamp::from_secs(1_100);
        let stored = Some(&record);
        let mismatch =
            |r: Result<bool, ConnectError>| matches!(r, Err(ConnectError::RealmMismatch { .. }));
        let a = pending(&profile, stored, false);
        assert!(a.pending.reconnect);
        assert_eq!(a.pending.check(Some("111"), stored, now), Ok(false));
        assert!(mismatch(a.pending.check(Some("222"), stored, now)));
        assert!(mismatch(a.pending.check(None, stored, now)));
        let replace = pending(&profile, stored, true);
        assert_eq!(replace.pending.check(Some("222"), stored, now), Ok(true));
        // A new connection records whatever realm comes back; one created while
        // the user was at the consent page is held to its realm.
        let new = pending(&profile, None, false);
        assert_eq!(new.pending.check(Some("222"), None, now), Ok(false));
        assert!(mismatch(new.pending.check(Some("222"), stored, now)));
        // Ten minutes, then refused.
        let late = Timestamp::from_secs(1_600);
        assert!(matches!(
            a.pending.check(Some("111"), stored, late),
            Err(ConnectError::Expired { .. })
        ));
    }
}
