//! Reading what the provider answered: token responses, RFC 6749 §5.2 error bodies,
//! provider dialects, and everything else a proxy or a broken server may send.
//!
//! Parsing never panics and never trusts a value it has not checked: bodies are
//! capped, tokens must be RFC 6749 `VSCHAR`s (so they are safe in a header), and
//! lifetimes must be positive and plausible.
//!
//! **The tokens decide.** A success reply whose access token (and refresh token, if
//! sent) is usable is a grant, whatever its informational members say: an optional
//! member that is present but unusable (a lifetime of 0, -1, `"soon"` or `{}`, a
//! `token_type` other than bearer) is treated as absent and named in
//! [`TokenGrant::ignored`]. Throwing the reply away instead would throw away a
//! rotated refresh token. Only a missing or unusable access token, an unusable
//! refresh token, or a body that is not a token reply make a success unusable.

use crate::profile::ProviderProfile;
use crate::record::FailureKind;
use crate::secret::{AccessToken, RefreshToken};
use crate::time::{days, Timestamp};
use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Replies larger than this are rejected unread; transports should stop reading here.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest access-token lifetime accepted.
pub const MAX_ACCESS_TTL: Duration = days(366);
/// Longest refresh-token lifetime accepted.
pub const MAX_REFRESH_TTL: Duration = days(20 * 366);
/// Longest Retry-After honoured.
pub const MAX_RETRY_AFTER: Duration = days(1);
const MAX_TEXT: usize = 200;

/// An HTTP response as the transport received it.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers as received (names compared case-insensitively).
    pub headers: Vec<(String, String)>,
    /// Body bytes (may contain tokens; redacted in `Debug`).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The provider's transaction id (Intuit's `intuit_tid`), sanitized for logs.
    pub fn transaction_id(&self, profile: &ProviderProfile) -> Option<String> {
        let name = profile.transaction_id_header.as_deref()?;
        self.header(name).map(sanitize)
    }
}

impl core::fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "HttpResponse {{ status: {}, headers: {}, body: <redacted {} bytes> }}",
            self.status,
            self.headers.len(),
            self.body.len()
        )
    }
}

/// A successful token response, checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenGrant {
    /// New access token.
    pub access: AccessToken,
    /// New refresh token; `None` means "keep the one you have" (RFC 6749 §6).
    pub refresh: Option<RefreshToken>,
    /// Access-token lifetime; `None` means "use the profile default".
    pub expires_in: Option<Duration>,
    /// Time until the refresh token's idle deadline (Intuit `x_refresh_token_expires_in`).
    pub refresh_expires_in: Option<Duration>,
    /// Time until the refresh token's hard deadline (Intuit
    /// `x_refresh_token_hard_expires_in`).
    pub hard_expires_in: Option<Duration>,
    /// Optional members that were present but unusable and so were treated as
    /// absent, by their names in the reply (for a warning and a metric).
    pub ignored: Vec<&'static str>,
}

/// When a provider asked to be called again (RFC 9110 §10.2.3 `Retry-After`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryAfter {
    /// `delay-seconds`, capped at [`MAX_RETRY_AFTER`].
    Delay(Duration),
    /// An `HTTP-date`, as a wall-clock instant.
    At(Timestamp),
}

impl RetryAfter {
    /// How long to wait from `now`, capped at [`MAX_RETRY_AFTER`] (a date in the
    /// past is no wait).
    pub fn delay_from(self, now: Timestamp) -> Duration {
        match self {
            RetryAfter::Delay(d) => d.min(MAX_RETRY_AFTER),
            RetryAfter::At(t) => t.saturating_since(now).min(MAX_RETRY_AFTER),
        }
    }
}

/// The standard OAuth error codes, and the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OAuthErrorCode {
    /// The grant is expired, revoked or not this client's (or a dialect alias).
    InvalidGrant,
    /// Client authentication failed.
    InvalidClient,
    /// The client may not use this grant type.
    UnauthorizedClient,
    /// The request is malformed.
    InvalidRequest,
    /// The grant type is unsupported.
    UnsupportedGrantType,
    /// The scope is invalid.
    InvalidScope,
    /// The server is temporarily unavailable or in trouble: `temporarily_unavailable`
    /// or `server_error` (RFC 6749 §4.1.2.1 defines both; providers send them from
    /// the token endpoint too). Transient: retried with back-off.
    TemporarilyUnavailable,
    /// Any other code.
    Other,
}

/// What exactly is wrong with a reply body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Malformation {
    /// No body at all.
    #[error("empty body")]
    Empty,
    /// Larger than [`MAX_REPLY_BYTES`].
    #[error("body of {0} bytes exceeds the cap")]
    TooLarge(usize),
    /// Not JSON (an HTML page from a proxy, a truncated body).
    #[error("body is not JSON")]
    NotJson,
    /// JSON, but not an object.
    #[error("body is not a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    /// A field has the wrong JSON type.
    #[error("field `{0}` has the wrong type")]
    WrongType(&'static str),
    /// A token field is empty, too long or has characters a token may not have.
    #[error("field `{0}` is not a valid token")]
    BadToken(&'static str),
    /// A lifetime is zero, negative, fractional or implausibly long.
    #[error("field `{0}` is not a plausible lifetime")]
    BadLifetime(&'static str),
    /// `token_type` is not `bearer`.
    #[error("token_type is not bearer")]
    NotBearer,
}

/// Why a reply is not a usable token grant. Carries nothing of the request, but
/// an RFC 6749 error's `code` and `description` are the provider's text: some
/// servers echo what they were sent ("Invalid authorization code: ..."); a caller
/// that sent a secret removes it with [`redacted`](Self::redacted) before the
/// error is shown or logged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ReplyError {
    /// An RFC 6749 §5.2 error response.
    #[error("provider refused with `{code}` (HTTP {status}){}", description.as_deref().map(|d| alloc::format!(": {d}")).unwrap_or_default())]
    OAuth {
        /// HTTP status.
        status: u16,
        /// Classified code.
        kind: OAuthErrorCode,
        /// The code as sent, sanitized and truncated.
        code: String,
        /// `error_description`, sanitized and truncated.
        description: Option<String>,
    },
    /// HTTP 429.
    #[error("rate limited (HTTP 429)")]
    RateLimited {
        /// The `Retry-After` header, if it was readable.
        retry_after: Option<RetryAfter>,
    },
    /// HTTP 5xx or 408: the provider is in trouble.
    #[error("provider server error (HTTP {status})")]
    ServerError {
        /// HTTP status.
        status: u16,
        /// The `Retry-After` header, if it was readable.
        retry_after: Option<RetryAfter>,
    },
    /// HTTP 401 without an OAuth error body: client authentication failed at the
    /// door (RFC 6749 §5.2 allows a bare `WWW-Authenticate` challenge). A
    /// configuration problem: retried only on the slow configuration timer, since
    /// repeated bad-client attempts can get an app locked out.
    #[error("client authentication refused (HTTP {status}, no OAuth error body)")]
    Unauthorized {
        /// HTTP status.
        status: u16,
    },
    /// A non-success reply that is not an OAuth error (proxy page, redirect,
    /// garbage): not grounds for believing anything about the grant.
    #[error("unreadable reply (HTTP {status}): {problem}")]
    Unreadable {
        /// HTTP status.
        status: u16,
        /// What is wrong with it.
        problem: Malformation,
    },
    /// A success status with a body that is not a usable grant. The provider may
    /// have rotated the refresh token anyway, so the outcome is in doubt.
    #[error("unusable success reply (HTTP {status}): {problem}")]
    MalformedSuccess {
        /// HTTP status.
        status: u16,
        /// What is wrong with it.
        problem: Malformation,
    },
}

impl ReplyError {
    /// This error with every occurrence of each of `secrets` (what the request
    /// carried: a code, a verifier, a token, the client secret) in the provider's
    /// text replaced by `<redacted>`, and a text cut off inside one (the
    /// description is truncated) ending in `<redacted>` instead of its start.
    pub fn redacted(self, secrets: &[&str]) -> ReplyError {
        match self {
            ReplyError::OAuth {
                status,
                kind,
                code,
                description,
            } => ReplyError::OAuth {
                status,
                kind,
                code: redact(code, secrets),
                description: description.map(|d| redact(d, secrets)),
            },
            other => other,
        }
    }

    /// The failure kind for status and metrics.
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            ReplyError::OAuth {
                kind: OAuthErrorCode::InvalidClient | OAuthErrorCode::UnauthorizedClient,
                ..
            } => FailureKind::ClientRejected,
            ReplyError::OAuth {
                kind: OAuthErrorCode::TemporarilyUnavailable,
                status,
                ..
            } => FailureKind::ServerError(*status),
            ReplyError::OAuth { .. } => FailureKind::RequestRejected,
            ReplyError::Unauthorized { .. } => FailureKind::ClientRejected,
            ReplyError::RateLimited { .. } => FailureKind::RateLimited,
            ReplyError::ServerError { status, .. } => FailureKind::ServerError(*status),
            ReplyError::Unreadable { .. } => FailureKind::UnreadableReply,
            ReplyError::MalformedSuccess { .. } => FailureKind::OutcomeUnknown,
        }
    }
}

/// Reads a token-endpoint reply.
pub fn parse_token_reply(
    profile: &ProviderProfile,
    reply: &HttpResponse,
) -> Result<TokenGrant, ReplyError> {
    let status = reply.status;
    let retry_after = || reply.header("retry-after").and_then(parse_retry_after);
    match status {
        429 => {
            return Err(ReplyError::RateLimited {
                retry_after: retry_after(),
            })
        }
        408 | 500..=599 => {
            return Err(ReplyError::ServerError {
                status,
                retry_after: retry_after(),
            })
        }
        _ => {}
    }
    let success = (200..300).contains(&status);
    let fail = |problem| {
        if success {
            ReplyError::MalformedSuccess { status, problem }
        } else {
            ReplyError::Unreadable { status, problem }
        }
    };
    let object = match json_object(&reply.body) {
        Ok(object) => object,
        Err(_) if status == 401 => return Err(ReplyError::Unauthorized { status }),
        Err(problem) => return Err(fail(problem)),
    };
    if success && object.access_token.is_none() && object.error.is_some() {
        // GitHub answers token-endpoint errors with HTTP 200 and an RFC 6749 body.
        Err(oauth_error(profile, status, &object).map_err(fail)?)
    } else if success {
        grant_from(&object).map_err(fail)
    } else if (400..500).contains(&status) {
        match oauth_error(profile, status, &object) {
            Ok(err) => Err(err),
            Err(_) if status == 401 => Err(ReplyError::Unauthorized { status }),
            Err(problem) => Err(fail(problem)),
        }
    } else {
        Err(fail(Malformation::Missing("error")))
    }
}

/// Reads a revocation reply (RFC 7009): `Ok(true)` when revoked (200), `Ok(false)`
/// when the provider says the token is unknown or already invalid.
pub fn parse_revoke_reply(
    profile: &ProviderProfile,
    reply: &HttpResponse,
) -> Result<bool, ReplyError> {
    match reply.status {
        200..=299 => Ok(true),
        _ => match parse_token_reply(profile, reply) {
            Err(ReplyError::OAuth {
                kind: OAuthErrorCode::InvalidGrant,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
            Ok(_) => Err(ReplyError::Unreadable {
                status: reply.status,
                problem: Malformation::NotAnObject,
            }),
        },
    }
}

fn json_object(body: &[u8]) -> Result<Fields<'_>, Malformation> {
    if body.len() > MAX_REPLY_BYTES {
        return Err(Malformation::TooLarge(body.len()));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Malformation::Empty);
    }
    match serde_json::from_slice::<Top<'_>>(body) {
        Ok(Top(Some(fields))) => Ok(fields),
        Ok(Top(None)) => Err(Malformation::NotAnObject),
        Err(_) => Err(Malformation::NotJson),
    }
}

/// The fields of a reply object this module reads; every other member is skipped
/// (but must be valid JSON). A repeated member counts as its last occurrence.
#[derive(Default)]
struct Fields<'a> {
    access_token: Option<Raw<'a>>,
    refresh_token: Option<Raw<'a>>,
    token_type: Option<Raw<'a>>,
    expires_in: Option<Raw<'a>>,
    x_refresh_token_expires_in: Option<Raw<'a>>,
    refresh_token_expires_in: Option<Raw<'a>>,
    x_refresh_token_hard_expires_in: Option<Raw<'a>>,
    error: Option<Raw<'a>>,
    error_description: Option<Raw<'a>>,
}

/// One member's value, as much of it as matters.
enum Raw<'a> {
    Null,
    Str(Cow<'a, str>),
    /// A number: `Some` if it is a non-negative integer that fits in `u64`.
    Num(Option<u64>),
    /// A boolean, array or object.
    Other,
}

/// A whole body: `Some` fields if it is an object.
struct Top<'a>(Option<Fields<'a>>);

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top<'de>;

    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
        let mut o = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::AccessToken => &mut o.access_token,
                Key::RefreshToken => &mut o.refresh_token,
                Key::TokenType => &mut o.token_type,
                Key::ExpiresIn => &mut o.expires_in,
                Key::XRefreshTokenExpiresIn => &mut o.x_refresh_token_expires_in,
                Key::RefreshTokenExpiresIn => &mut o.refresh_token_expires_in,
                Key::XRefreshTokenHardExpiresIn => &mut o.x_refresh_token_hard_expires_in,
                Key::Error => &mut o.error,
                Key::ErrorDescription => &mut o.error_description,
                Key::Other => {
                    map.next_value::<Skip>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value::<Raw<'de>>()?);
        }
        Ok(Top(Some(o)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top<'de>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Top(None))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Top<'de>, E> {
        Ok(Top(None))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Top<'de>, E> {
        Ok(Top(None))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Top<'de>, E> {
        Ok(Top(None))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Top<'de>, E> {
        Ok(Top(None))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Top<'de>, E> {
        Ok(Top(None))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Top<'de>, E> {
        Ok(Top(None))
    }
}

/// A value read and thrown away. Read through `deserialize_any` like any value, so
/// serde_json's nesting limit applies to skipped members too (it does not to
/// `IgnoredAny`): a body nested past it is `NotJson` wherever the nesting is.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// The member names this module reads.
enum Key {
    AccessToken,
    RefreshToken,
    TokenType,
    ExpiresIn,
    XRefreshTokenExpiresIn,
    RefreshTokenExpiresIn,
    XRefreshTokenHardExpiresIn,
    Error,
    ErrorDescription,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
        Ok(match name {
            "access_token" => Key::AccessToken,
            "refresh_token" => Key::RefreshToken,
            "token_type" => Key::TokenType,
            "expires_in" => Key::ExpiresIn,
            "x_refresh_token_expires_in" => Key::XRefreshTokenExpiresIn,
            "refresh_token_expires_in" => Key::RefreshTokenExpiresIn,
            "x_refresh_token_hard_expires_in" => Key::XRefreshTokenHardExpiresIn,
            "error" => Key::Error,
            "error_description" => Key::ErrorDescription,
            _ => Key::Other,
        })
    }
}

impl<'de> Deserialize<'de> for Raw<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw<'de>;

    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Raw<'de>, E> {
        Ok(Raw::Null)
    }
    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Owned(s.into())))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Owned(s)))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Raw<'de>, E> {
        Ok(Raw::Num(Some(n)))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Raw<'de>, E> {
        Ok(Raw::Num(u64::try_from(n).ok()))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Raw<'de>, E> {
        Ok(Raw::Num(None))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Raw<'de>, E> {
        Ok(Raw::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw<'de>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Raw::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw<'de>, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Raw::Other)
    }
}

fn grant_from(o: &Fields<'_>) -> Result<TokenGrant, Malformation> {
    let access =
        token(&o.access_token, "access_token")?.ok_or(Malformation::Missing("access_token"))?;
    let refresh = token(&o.refresh_token, "refresh_token")?
        .filter(|t| !t.is_empty())
        .map(RefreshToken::new);
    let mut ignored = Vec::new();
    match &o.token_type {
        None | Some(Raw::Null) => {}
        Some(Raw::Str(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(_) => ignored.push("token_type"),
    }
    let mut optional = |raw: &Option<Raw<'_>>, field, max| match lifetime(raw, field, max) {
        Ok(d) => d,
        Err(_) => {
            ignored.push(field);
            None
        }
    };
    let expires_in = optional(&o.expires_in, "expires_in", MAX_ACCESS_TTL);
    let x_idle = optional(
        &o.x_refresh_token_expires_in,
        "x_refresh_token_expires_in",
        MAX_REFRESH_TTL,
    );
    let idle = optional(
        &o.refresh_token_expires_in,
        "refresh_token_expires_in",
        MAX_REFRESH_TTL,
    );
    let hard_expires_in = optional(
        &o.x_refresh_token_hard_expires_in,
        "x_refresh_token_hard_expires_in",
        MAX_REFRESH_TTL,
    );
    Ok(TokenGrant {
        access: AccessToken::new(access),
        refresh,
        expires_in,
        refresh_expires_in: x_idle.or(idle),
        hard_expires_in,
        ignored,
    })
}

/// Whether `s` can be a token: printable ASCII, at most [`MAX_TOKEN_BYTES`]
/// (a control character in a token would end up in a header or a form body).
pub fn is_usable_token(s: &str) -> bool {
    s.len() <= MAX_TOKEN_BYTES && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A token field: absent/null is `None`; `""` is `Some("")` for the caller to judge.
fn token<'a>(
    raw: &'a Option<Raw<'_>>,
    field: &'static str,
) -> Result<Option<&'a str>, Malformation> {
    match raw {
        None | Some(Raw::Null) => Ok(None),
        Some(Raw::Str(s)) => {
            if !is_usable_token(s) || (field == "access_token" && s.is_empty()) {
                Err(Malformation::BadToken(field))
            } else {
                Ok(Some(s))
            }
        }
        Some(_) => Err(Malformation::WrongType(field)),
    }
}

/// A lifetime in seconds: a positive integer (or a string of digits, which some
/// providers send), at most `max`.
fn lifetime(
    raw: &Option<Raw<'_>>,
    field: &'static str,
    max: Duration,
) -> Result<Option<Duration>, Malformation> {
    let secs = match raw {
        None | Some(Raw::Null) => return Ok(None),
        Some(Raw::Num(n)) => *n,
        Some(Raw::Str(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().ok()
        }
        Some(Raw::Str(_)) => None,
        Some(Raw::Other) => return Err(Malformation::WrongType(field)),
    };
    match secs {
        Some(s) if s > 0 && Duration::from_secs(s) <= max => Ok(Some(Duration::from_secs(s))),
        _ => Err(Malformation::BadLifetime(field)),
    }
}

fn oauth_error(
    profile: &ProviderProfile,
    status: u16,
    o: &Fields<'_>,
) -> Result<ReplyError, Malformation> {
    let code = match &o.error {
        Some(Raw::Str(c)) if !c.is_empty() => c.as_ref(),
        Some(Raw::Str(_)) | None | Some(Raw::Null) => return Err(Malformation::Missing("error")),
        Some(_) => return Err(Malformation::WrongType("error")),
    };
    let kind = if profile.means_invalid_grant(code) {
        OAuthErrorCode::InvalidGrant
    } else {
        match code {
            "invalid_client" => OAuthErrorCode::InvalidClient,
            "unauthorized_client" => OAuthErrorCode::UnauthorizedClient,
            "invalid_request" => OAuthErrorCode::InvalidRequest,
            "unsupported_grant_type" => OAuthErrorCode::UnsupportedGrantType,
            "invalid_scope" => OAuthErrorCode::InvalidScope,
            "temporarily_unavailable" | "server_error" => OAuthErrorCode::TemporarilyUnavailable,
            _ => OAuthErrorCode::Other,
        }
    };
    let description = match &o.error_description {
        Some(Raw::Str(d)) => Some(sanitize(d)),
        _ => None,
    };
    Ok(ReplyError::OAuth {
        status,
        kind,
        code: sanitize(code),
        description,
    })
}

/// `text` with each of `secrets` replaced (see [`ReplyError::redacted`]). Secrets
/// shorter than 4 bytes are left alone: they would match ordinary words.
fn redact(mut text: String, secrets: &[&str]) -> String {
    const MARK: &str = "<redacted>";
    let truncated = text.chars().count() >= MAX_TEXT;
    // Longest first: a secret that contains another is replaced whole.
    let mut secrets: Vec<&str> = secrets.iter().copied().filter(|s| s.len() >= 4).collect();
    secrets.sort_by_key(|s| core::cmp::Reverse(s.len()));
    for secret in secrets {
        text = text.replace(secret, MARK);
        if !truncated {
            continue;
        }
        // The longest start of the secret that the text ends with (at least 4
        // bytes), as truncation leaves it.
        let cut = (4..secret.len())
            .rev()
            .filter(|k| secret.is_char_boundary(*k))
            .find(|k| text.ends_with(&secret[..*k]));
        if let Some(k) = cut {
            text.truncate(text.len() - k);
            text.push_str(MARK);
        }
    }
    text
}

/// `delay-seconds` or an `HTTP-date` in any of the three forms RFC 9110 §5.6.7
/// requires a recipient to accept. Anything else is no `Retry-After`.
fn parse_retry_after(v: &str) -> Option<RetryAfter> {
    let v = v.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a very long time".
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(RetryAfter::Delay(
            Duration::from_secs(secs).min(MAX_RETRY_AFTER),
        ));
    }
    crate::httpdate::parse(v).map(RetryAfter::At)
}

/// Printable ASCII only, at most [`MAX_TEXT`] characters: safe for any log line.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_TEXT)
        .collect()
}
