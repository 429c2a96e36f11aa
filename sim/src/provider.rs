//! A sans-IO model of an OAuth 2.0 provider's token endpoint, with ghost state.
//!
//! The same model answers the model checker, the simulator and the mock HTTP server:
//! it takes the exact [`HttpRequest`] the core built (form body, Basic auth header)
//! and returns an [`HttpResponse`] with the JSON bodies a real provider sends
//! (Intuit's by default). Time is an argument of every call; nothing here reads a
//! clock.
//!
//! Besides answering, the model keeps *ghost state* that no client can see: every
//! refresh token ever issued, which ones it would accept now, whether the family was
//! revoked and why, whether a rotated-away token was replayed outside its grace
//! window, and which successors were issued in replies that never reached a live
//! worker. [`GrantTruth`] exposes it to the invariant predicates of
//! `tokenfence_core::invariants` through [`ProviderTruth`].
//!
//! Token values are small and deterministic (`rt1`, `rt2`, `at1`...): they are fake,
//! they keep model-checker states small, and they make traces readable.

use base64::Engine as _;
use core::time::Duration;
use serde_json::json;
use std::sync::Arc;
use tokenfence_core::invariants::ProviderTruth;
use tokenfence_core::{
    ClientAuth, ClientCredentials, ClientSecret, Environment, GraceReplay, HttpRequest,
    HttpResponse, ProviderProfile, RefreshToken, RevokeStyle, Rotation, RotationPolicy, Timestamp,
};

/// The behaviour classes of INVARIANTS.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BehaviourClass {
    /// Never rotates and omits `refresh_token` from refresh replies (Zoho; Google
    /// sends none either); refresh tokens die after an idle window (Google).
    NonRotating,
    /// A new refresh token on every refresh; the old one dies at once (Slack, GitHub Apps).
    StrictRotation,
    /// Rotation on every refresh; the previous token keeps working for a grace window
    /// and presenting it there returns the same successor (Xero, Intuit).
    GraceIdempotent,
    /// Like [`GraceIdempotent`](Self::GraceIdempotent), but a replay inside the window
    /// mints another successor (a fork of the family).
    GraceFork,
    /// Intuit: the value changes at most once per period, the previous one stays valid
    /// for a grace window, idle expiry (rolling) and a hard cap reported through
    /// `x_refresh_token_hard_expires_in`.
    Periodic,
    /// Strict rotation with reuse detection: presenting a rotated-away token revokes
    /// the whole family (Auth0 without leeway, RFC 9700).
    ReuseDetection,
}

impl BehaviourClass {
    /// Every class, in a stable order.
    pub const ALL: [BehaviourClass; 6] = [
        BehaviourClass::NonRotating,
        BehaviourClass::StrictRotation,
        BehaviourClass::GraceIdempotent,
        BehaviourClass::GraceFork,
        BehaviourClass::Periodic,
        BehaviourClass::ReuseDetection,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BehaviourClass::NonRotating => "non-rotating",
            BehaviourClass::StrictRotation => "strict",
            BehaviourClass::GraceIdempotent => "grace-idempotent",
            BehaviourClass::GraceFork => "grace-fork",
            BehaviourClass::Periodic => "periodic",
            BehaviourClass::ReuseDetection => "reuse-detection",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// A profile of this class (lifetimes of the provider it is named after).
    pub fn profile(self) -> ProviderProfile {
        let generic = ProviderProfile::generic("oauth", "https://oauth.example.test/token");
        let every = |grace, grace_replay, reuse_detection| RotationPolicy {
            rotation: Rotation::EveryRefresh,
            grace,
            grace_replay,
            reuse_detection,
        };
        let rotation = match self {
            BehaviourClass::NonRotating => {
                return ProviderProfile {
                    idle_window: Some(tokenfence_core::days(182)),
                    ..generic
                }
            }
            BehaviourClass::Periodic => return ProviderProfile::intuit(),
            BehaviourClass::StrictRotation => every(Duration::ZERO, GraceReplay::Idempotent, false),
            BehaviourClass::GraceIdempotent => {
                every(tokenfence_core::minutes(30), GraceReplay::Idempotent, false)
            }
            BehaviourClass::GraceFork => {
                every(tokenfence_core::minutes(30), GraceReplay::Fork, false)
            }
            BehaviourClass::ReuseDetection => every(Duration::ZERO, GraceReplay::Idempotent, true),
        };
        ProviderProfile {
            rotation,
            ..generic
        }
    }
}

impl core::fmt::Display for BehaviourClass {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A client registered with the provider (an app's id and secret for one environment).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegisteredClient {
    /// Public client id.
    pub client_id: String,
    /// Client secret (fake in every harness).
    pub client_secret: String,
    /// Which environment the credentials belong to.
    pub environment: Environment,
}

impl RegisteredClient {
    /// The credentials a correctly configured client of this app uses.
    pub fn credentials(&self) -> ClientCredentials {
        ClientCredentials {
            client_id: self.client_id.clone(),
            client_secret: ClientSecret::new(self.client_secret.clone()),
            environment: self.environment,
        }
    }
}

/// What the provider really does: the truth the client's profile tries to describe.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProviderSpec {
    /// The client-side profile that describes this provider correctly.
    pub profile: ProviderProfile,
    /// `expires_in` of access tokens.
    pub access_ttl: Duration,
    /// When the provider does not rotate, whether it repeats the refresh token in the
    /// reply (`true`) or omits it (`false`, RFC 6749 §6 "keep the one you have").
    pub echo_refresh_token: bool,
    /// Apps registered with the provider.
    pub clients: Vec<RegisteredClient>,
}

impl ProviderSpec {
    /// The production and sandbox apps every built-in spec registers.
    pub fn default_clients() -> Vec<RegisteredClient> {
        vec![
            RegisteredClient {
                client_id: "prod-app".into(),
                client_secret: "prod-secret".into(),
                environment: Environment::Production,
            },
            RegisteredClient {
                client_id: "sandbox-app".into(),
                client_secret: "sandbox-secret".into(),
                environment: Environment::Sandbox,
            },
        ]
    }

    /// A provider of `class` with lifetimes scaled down to seconds, for the model
    /// checker: [`scaled_profile`](Self::scaled_profile) of the class's profile.
    pub fn scaled(class: BehaviourClass) -> Self {
        Self::scaled_profile(&class.profile())
    }

    /// The provider `profile` describes, with lifetimes scaled down to seconds for
    /// the model checker: access tokens live 20 s, grace windows 30 s (40 s under
    /// periodic rotation, whose period is 40 s), idle windows 60 s, hard caps 200 s.
    /// What the properties depend on is kept: the rotation mode, whether there is a
    /// grace window, what a replay inside it returns, reuse detection, whether there
    /// is an idle window and a hard cap, client authentication and error dialect.
    /// The relations that matter hold: grace windows and periods are much longer
    /// than a lease, idle windows longer than the keep-alive lead.
    pub fn scaled_profile(profile: &ProviderProfile) -> Self {
        let s = Duration::from_secs;
        let p = &profile.rotation;
        let (rotation, grace) = match p.rotation {
            Rotation::Periodic { .. } => (
                Rotation::Periodic { period: s(40) },
                if p.grace.is_zero() { p.grace } else { s(40) },
            ),
            r => (r, if p.grace.is_zero() { p.grace } else { s(30) }),
        };
        let profile = ProviderProfile {
            rotation: RotationPolicy {
                rotation,
                grace,
                ..*p
            },
            default_access_ttl: s(20),
            idle_window: profile.idle_window.map(|_| s(60)),
            hard_lifetime: profile.hard_lifetime.map(|_| s(200)),
            ..profile.clone()
        };
        ProviderSpec {
            access_ttl: s(20),
            ..Self::of_profile(profile)
        }
    }

    /// The provider `profile` describes, with its real lifetimes: access tokens
    /// live `default_access_ttl`; a provider that never rotates omits
    /// `refresh_token` from refresh replies (RFC 6749 §6 allows it, and it is the
    /// case a client gets wrong); the default production and sandbox apps.
    pub fn of_profile(profile: ProviderProfile) -> Self {
        ProviderSpec {
            access_ttl: profile.default_access_ttl,
            echo_refresh_token: profile.rotation.rotation != Rotation::Never,
            profile,
            clients: Self::default_clients(),
        }
    }

    /// Intuit QuickBooks Online with its real lifetimes (PROVIDERS.md): 1 h access
    /// tokens, a new refresh-token value about once per 24 h with the previous one
    /// valid 24 h more, 100-day rolling idle expiry, 5-year hard cap.
    pub fn intuit() -> Self {
        Self::of_profile(ProviderProfile::intuit())
    }

    fn client(&self, id: &str) -> Option<&RegisteredClient> {
        self.clients.iter().find(|c| c.client_id == id)
    }
}

/// Index of a grant (one authorization, one refresh-token family) in a [`Provider`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantId(pub usize);

/// Why the provider ended a grant before its deadlines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GrantEnd {
    /// The user disconnected the app at the provider (or through a revocation call).
    UserRevoked,
    /// A rotated-away token was replayed outside its grace window and the provider
    /// revoked the whole family (reuse detection).
    ReuseDetected,
}

/// A refresh token's number: the provider mints `rt1`, `rt2`, ... in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenNo(u32);

impl TokenNo {
    /// The number of a token value this provider could have minted.
    pub fn parse(value: &str) -> Option<TokenNo> {
        let digits = value.strip_prefix("rt")?;
        if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().filter(|n| *n > 0).map(TokenNo)
    }

    fn index(self) -> usize {
        self.0 as usize - 1
    }
}

impl std::fmt::Display for TokenNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rt{}", self.0)
    }
}

/// One refresh token ever issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IssuedToken {
    /// The family it belongs to.
    pub grant: GrantId,
    /// The token it was issued in exchange for (`None`: issued by the authorization).
    pub parent: Option<TokenNo>,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When a successor replaced it (its grace window starts here).
    pub rotated_at: Option<Timestamp>,
    /// The successor handed out when it was rotated.
    pub successor: Option<TokenNo>,
    /// The token that took its place as the family's current one (its successor,
    /// or under [`GraceReplay::Fork`] the sibling a replay minted, demoting it).
    pub replaced_by: Option<TokenNo>,
    /// Issued in a reply that no live worker received (lost on the wire, unreadable,
    /// or its receiver crashed before storing it).
    pub lost: bool,
}

/// One authorization: a family of refresh tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Grant {
    /// The client the grant was authorized for.
    pub client_id: String,
    /// Last successful refresh (the idle clock restarts here).
    pub last_used: Timestamp,
    /// The family dies here whatever happens.
    pub hard_deadline: Option<Timestamp>,
    /// The newest refresh token of the family.
    pub current: String,
    /// Whether and why the provider ended the grant early.
    pub ended: Option<GrantEnd>,
    /// Rotated-away tokens presented outside their grace window.
    pub replays_outside_grace: u8,
    /// Replays inside a grace window that re-delivered a lost successor.
    pub grace_recoveries: u8,
    /// The newest access token and its expiry.
    pub access: Option<(String, Timestamp)>,
}

/// What happened at the provider in one exchange (ghost information for harnesses
/// and reports; clients only see the [`HttpResponse`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A refresh succeeded.
    Refreshed {
        /// The family.
        grant: GrantId,
        /// The refresh token presented.
        presented: String,
        /// The refresh token the client should hold now (possibly the presented one).
        refresh: String,
        /// Whether a new refresh token was minted.
        minted: bool,
        /// Whether the presented token was already rotated away (a replay inside
        /// its grace window).
        grace_replay: bool,
        /// Whether that replay re-delivered a successor whose reply had been lost.
        recovered_lost: bool,
    },
    /// `invalid_grant`.
    Rejected {
        /// The family, if the token is known.
        grant: Option<GrantId>,
        /// Why.
        cause: RejectCause,
    },
    /// `invalid_client` (unknown client id or wrong secret).
    ClientRejected,
    /// A malformed request (`invalid_request`, `unsupported_grant_type`).
    BadRequest,
    /// A revocation request was answered.
    Revoked {
        /// The family revoked, if the token was known.
        grant: Option<GrantId>,
    },
    /// Not an endpoint of this provider.
    NotFound,
}

/// Why a refresh token was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectCause {
    /// Never issued.
    Unknown,
    /// Issued to another client id (another app or environment).
    WrongClient,
    /// The user revoked the grant.
    UserRevoked,
    /// The family was revoked after a replay (reuse detection).
    FamilyRevoked,
    /// The idle window passed.
    IdleExpired,
    /// The hard deadline passed.
    HardExpired,
    /// A rotated-away token outside its grace window.
    RotatedAway,
}

/// Every refresh token a provider minted, in minting order: `rt{n}` is entry `n - 1`,
/// so a lookup by value is an index, not a search (the simulator looks tokens up
/// after every step).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Tokens(Vec<IssuedToken>);

impl Tokens {
    fn get(&self, value: &str) -> Option<&IssuedToken> {
        self.at(TokenNo::parse(value)?)
    }

    fn get_mut(&mut self, value: &str) -> Option<&mut IssuedToken> {
        self.0.get_mut(TokenNo::parse(value)?.index())
    }

    fn at(&self, no: TokenNo) -> Option<&IssuedToken> {
        self.0.get(no.index())
    }

    fn values(&self) -> impl Iterator<Item = &IssuedToken> {
        self.0.iter()
    }

    fn numbered(&self) -> impl Iterator<Item = (TokenNo, &IssuedToken)> {
        (1..).map(TokenNo).zip(&self.0)
    }

    /// Appends a token and returns its value.
    fn push(&mut self, token: IssuedToken) -> String {
        self.0.push(token);
        TokenNo(u32::try_from(self.0.len()).unwrap_or(u32::MAX)).to_string()
    }
}

/// The provider: the ghost record of every grant and token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Provider {
    spec: Arc<ProviderSpec>,
    grants: Vec<Grant>,
    tokens: Tokens,
    minted_access: u32,
    /// How many tokens are marked lost now (a fast path for `successor_lost`).
    lost_now: usize,
}

impl Provider {
    /// A provider with no grants.
    pub fn new(spec: Arc<ProviderSpec>) -> Self {
        Provider {
            spec,
            grants: Vec::new(),
            tokens: Tokens::default(),
            minted_access: 0,
            lost_now: 0,
        }
    }

    /// The spec.
    pub fn spec(&self) -> &ProviderSpec {
        &self.spec
    }

    /// A grant's ghost record.
    pub fn grant(&self, id: GrantId) -> Option<&Grant> {
        self.grants.get(id.0)
    }

    /// A token's ghost record.
    pub fn token(&self, value: &str) -> Option<&IssuedToken> {
        self.tokens.get(value)
    }

    /// Every refresh token ever issued, by number.
    pub fn tokens(&self) -> impl Iterator<Item = (TokenNo, &IssuedToken)> {
        self.tokens.numbered()
    }

    /// The user consented: a new grant for `client_id`, as the authorization-code
    /// exchange would return it. Returns the grant and the token response.
    pub fn authorize(&mut self, client_id: &str, now: Timestamp) -> (GrantId, HttpResponse) {
        let id = GrantId(self.grants.len());
        let refresh = self.mint_refresh(id, None, now);
        let hard_deadline = self
            .spec
            .profile
            .hard_lifetime
            .map(|d| now.saturating_add(d));
        self.grants.push(Grant {
            client_id: client_id.into(),
            last_used: now,
            hard_deadline,
            current: refresh.clone(),
            ended: None,
            replays_outside_grace: 0,
            grace_recoveries: 0,
            access: None,
        });
        let reply = self.success(id, Some(&refresh), true, now);
        (id, reply)
    }

    /// The user disconnects the app at the provider: the grant ends.
    pub fn revoke_by_user(&mut self, grant: GrantId) {
        if let Some(g) = self.grants.get_mut(grant.0) {
            g.ended.get_or_insert(GrantEnd::UserRevoked);
        }
    }

    /// Answers one request to the token or revocation endpoint at `now`.
    pub fn handle(&mut self, request: &HttpRequest, now: Timestamp) -> (HttpResponse, Outcome) {
        let profile = &self.spec.profile;
        if request.method != "POST" {
            return (not_found(), Outcome::NotFound);
        }
        let is_revoke = profile.revoke_url.as_deref() == Some(request.url.as_str());
        if request.url != profile.token_url && !is_revoke {
            return (not_found(), Outcome::NotFound);
        }
        let form: Vec<(String, String)> =
            if is_revoke && profile.revoke_style == RevokeStyle::JsonToken {
                serde_json::from_str::<serde_json::Value>(request.body.expose())
                    .ok()
                    .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_owned))
                    .map(|t| vec![("token".to_owned(), t)])
                    .unwrap_or_default()
            } else {
                form_urlencoded::parse(request.body.expose().as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            };
        let field = |name: &str| form_field(&form, name);
        let Some(client) = self.authenticate(request, &form) else {
            return (
                error_reply(401, "invalid_client", None),
                Outcome::ClientRejected,
            );
        };
        let client_id = client.client_id.clone();
        if is_revoke {
            let grant = field("token")
                .and_then(|t| self.tokens.get(t))
                .map(|t| t.grant);
            if let Some(g) = grant {
                self.revoke_by_user(g);
            }
            return (ok_reply(b"".to_vec()), Outcome::Revoked { grant });
        }
        match field("grant_type") {
            Some("refresh_token") => {}
            Some(_) => {
                return (
                    error_reply(400, "unsupported_grant_type", None),
                    Outcome::BadRequest,
                )
            }
            None => {
                return (
                    error_reply(400, "invalid_request", None),
                    Outcome::BadRequest,
                )
            }
        }
        let Some(presented) = field("refresh_token").map(str::to_owned) else {
            return (
                error_reply(400, "invalid_request", None),
                Outcome::BadRequest,
            );
        };
        self.refresh(&presented, &client_id, now)
    }

    /// The registered client a form-encoded token request authenticates as (id
    /// and secret, by the profile's client authentication), if any.
    pub fn authenticated(&self, request: &HttpRequest) -> Option<&RegisteredClient> {
        let form: Vec<(String, String)> = form_urlencoded::parse(request.body.expose().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        self.authenticate(request, &form)
    }

    fn authenticate(
        &self,
        request: &HttpRequest,
        form: &[(String, String)],
    ) -> Option<&RegisteredClient> {
        let field = |name: &str| form_field(form, name);
        let (id, secret) = match self.spec.profile.client_auth {
            ClientAuth::BasicHeader => {
                let value = request.header("authorization")?;
                let encoded = value.strip_prefix("Basic ")?;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()?;
                let raw = String::from_utf8(raw).ok()?;
                let (id, secret) = raw.split_once(':')?;
                (id.to_owned(), secret.to_owned())
            }
            ClientAuth::FormBody => (
                field("client_id")?.to_owned(),
                field("client_secret")?.to_owned(),
            ),
        };
        self.spec.client(&id).filter(|c| c.client_secret == secret)
    }

    fn refresh(
        &mut self,
        presented: &str,
        client_id: &str,
        now: Timestamp,
    ) -> (HttpResponse, Outcome) {
        let reject = |grant, cause, description: &str| {
            (
                error_reply(400, "invalid_grant", Some(description)),
                Outcome::Rejected { grant, cause },
            )
        };
        let Some(token) = self.tokens.get(presented).copied() else {
            return reject(
                None,
                RejectCause::Unknown,
                "Incorrect or invalid refresh token",
            );
        };
        let gid = token.grant;
        let spec = Arc::clone(&self.spec);
        let policy = spec.profile.rotation;
        let Some(grant) = self.grants.get(gid.0).cloned() else {
            return reject(
                None,
                RejectCause::Unknown,
                "Incorrect or invalid refresh token",
            );
        };
        if grant.client_id != client_id {
            return reject(
                Some(gid),
                RejectCause::WrongClient,
                "Incorrect Token type or clientID",
            );
        }
        if let Some(end) = grant.ended {
            let cause = match end {
                GrantEnd::UserRevoked => RejectCause::UserRevoked,
                GrantEnd::ReuseDetected => RejectCause::FamilyRevoked,
            };
            return reject(Some(gid), cause, "Incorrect or invalid refresh token");
        }
        if grant.hard_deadline.is_some_and(|d| now >= d) {
            return reject(
                Some(gid),
                RejectCause::HardExpired,
                "Incorrect or invalid refresh token",
            );
        }
        if self.idle_expired(&grant, now) {
            return reject(
                Some(gid),
                RejectCause::IdleExpired,
                "Incorrect or invalid refresh token",
            );
        }
        let is_current = grant.current == presented;
        let in_grace = token
            .rotated_at
            .is_some_and(|r| now < r.saturating_add(policy.grace));
        if !is_current && !in_grace {
            let g = &mut self.grants[gid.0];
            g.replays_outside_grace = g.replays_outside_grace.saturating_add(1);
            if policy.reuse_detection {
                g.ended = Some(GrantEnd::ReuseDetected);
            }
            return reject(
                Some(gid),
                RejectCause::RotatedAway,
                "Incorrect or invalid refresh token",
            );
        }
        let (refresh, minted, recovered_lost) = if is_current {
            let rotate = match policy.rotation {
                Rotation::Never => false,
                Rotation::EveryRefresh => true,
                Rotation::Periodic { period } => now >= token.issued_at.saturating_add(period),
            };
            if rotate {
                let next = self.mint_refresh(gid, Some(presented), now);
                self.retire(presented, &next, now);
                self.grants[gid.0].current = next.clone();
                (next, true, false)
            } else {
                (presented.to_owned(), false, false)
            }
        } else {
            // A rotated-away token inside its grace window.
            let previous = token
                .successor
                .map_or_else(|| grant.current.clone(), |n| n.to_string());
            let recovered = self.tokens.get(&previous).is_some_and(|t| t.lost);
            match policy.grace_replay {
                GraceReplay::Idempotent => (previous, false, recovered),
                GraceReplay::Fork => {
                    let next = self.mint_refresh(gid, Some(presented), now);
                    let current = grant.current.clone();
                    if let Some(t) = self.tokens.get_mut(&current) {
                        t.rotated_at.get_or_insert(now);
                        t.replaced_by = TokenNo::parse(&next);
                    }
                    if let Some(t) = self.tokens.get_mut(presented) {
                        t.successor = TokenNo::parse(&next);
                    }
                    self.grants[gid.0].current = next.clone();
                    (next, true, recovered)
                }
            }
        };
        let g = &mut self.grants[gid.0];
        g.last_used = now;
        if recovered_lost {
            g.grace_recoveries = g.grace_recoveries.saturating_add(1);
        }
        let send_refresh = minted || !is_current || spec.echo_refresh_token;
        let reply = self.success(gid, send_refresh.then_some(refresh.as_str()), false, now);
        let outcome = Outcome::Refreshed {
            grant: gid,
            presented: presented.to_owned(),
            refresh,
            minted,
            grace_replay: !is_current,
            recovered_lost,
        };
        (reply, outcome)
    }

    fn idle_expired(&self, grant: &Grant, now: Timestamp) -> bool {
        self.spec
            .profile
            .idle_window
            .is_some_and(|d| now >= grant.last_used.saturating_add(d))
    }

    fn mint_refresh(&mut self, grant: GrantId, parent: Option<&str>, now: Timestamp) -> String {
        self.tokens.push(IssuedToken {
            grant,
            parent: parent.and_then(TokenNo::parse),
            issued_at: now,
            rotated_at: None,
            successor: None,
            replaced_by: None,
            lost: false,
        })
    }

    fn retire(&mut self, old: &str, successor: &str, now: Timestamp) {
        if let Some(t) = self.tokens.get_mut(old) {
            t.rotated_at = Some(now);
            t.successor = TokenNo::parse(successor);
            t.replaced_by = TokenNo::parse(successor);
        }
    }

    fn success(
        &mut self,
        grant: GrantId,
        refresh: Option<&str>,
        authorization: bool,
        now: Timestamp,
    ) -> HttpResponse {
        self.minted_access += 1;
        let access = format!("at{}", self.minted_access);
        let spec = &self.spec;
        let ttl = spec.access_ttl;
        let g = &mut self.grants[grant.0];
        g.access = Some((access.clone(), now.saturating_add(ttl)));
        // The JSON a `json!` object would serialize to (keys in sorted order),
        // written directly: this is the simulator's hottest path. Token values are
        // minted here (`at7`, `rt3`) and never need escaping.
        use std::fmt::Write as _;
        let mut body = String::with_capacity(200);
        let _ = write!(
            body,
            r#"{{"access_token":"{access}","expires_in":{}"#,
            ttl.as_secs()
        );
        if let Some(r) = refresh {
            let _ = write!(body, r#","refresh_token":"{r}""#);
        }
        body.push_str(r#","token_type":"bearer""#);
        if let Some(idle) = spec.profile.idle_window {
            let _ = write!(body, r#","x_refresh_token_expires_in":{}"#, idle.as_secs());
        }
        if let (Some(hard), true) = (
            g.hard_deadline,
            spec.profile.ask_hard_expiry || authorization,
        ) {
            let left = hard.saturating_since(now).as_secs();
            if left > 0 {
                let _ = write!(body, r#","x_refresh_token_hard_expires_in":{left}"#);
            }
        }
        body.push('}');
        let mut reply = ok_reply(body.into_bytes());
        if let Some(tid) = &spec.profile.transaction_id_header {
            reply
                .headers
                .push((tid.clone(), format!("tid-{}", self.minted_access)));
        }
        reply
    }

    /// The successor `token` was issued in a reply that no live worker received.
    pub fn mark_lost(&mut self, token: &str) {
        if let Some(t) = self.tokens.get_mut(token).filter(|t| t.parent.is_some()) {
            if !t.lost {
                self.lost_now += 1;
            }
            t.lost = true;
        }
    }

    /// A live worker received `token` after all.
    pub fn mark_received(&mut self, token: &str) {
        if let Some(t) = self.tokens.get_mut(token) {
            if t.lost {
                self.lost_now -= 1;
            }
            t.lost = false;
        }
    }

    /// Whether `token` would be accepted in a refresh at `now`.
    pub fn accepts(&self, token: &str, now: Timestamp) -> bool {
        let Some(t) = self.tokens.get(token) else {
            return false;
        };
        let Some(g) = self.grants.get(t.grant.0) else {
            return false;
        };
        if g.ended.is_some()
            || g.hard_deadline.is_some_and(|d| now >= d)
            || self.idle_expired(g, now)
        {
            return false;
        }
        let grace = self.spec.profile.rotation.grace;
        g.current == token || t.rotated_at.is_some_and(|r| now < r.saturating_add(grace))
    }

    /// Whether the provider itself ended `grant` by `now`: user revocation, idle or
    /// hard expiry (not a revocation we caused by a replay).
    pub fn ended_by_provider(&self, grant: GrantId, now: Timestamp) -> bool {
        self.grants.get(grant.0).is_some_and(|g| {
            g.ended == Some(GrantEnd::UserRevoked)
                || g.hard_deadline.is_some_and(|d| now >= d)
                || self.idle_expired(g, now)
        })
    }

    /// Instants after `now` at which the provider's behaviour for `grant` changes by
    /// itself: grace windows closing, the idle and hard deadlines, the next periodic
    /// rotation. Harnesses with a discrete clock advance to these.
    pub fn deadlines(&self, grant: GrantId, now: Timestamp, out: &mut Vec<Timestamp>) {
        let Some(g) = self.grants.get(grant.0) else {
            return;
        };
        let policy = self.spec.profile.rotation;
        for t in self.tokens.values().filter(|t| t.grant == grant) {
            if let Some(r) = t.rotated_at {
                out.push(r.saturating_add(policy.grace));
            }
        }
        if let Some(idle) = self.spec.profile.idle_window {
            out.push(g.last_used.saturating_add(idle));
        }
        out.extend(g.hard_deadline);
        if let (Rotation::Periodic { period }, Some(t)) =
            (policy.rotation, self.tokens.get(&g.current))
        {
            out.push(t.issued_at.saturating_add(period));
        }
        out.retain(|t| *t > now);
    }

    /// The ghost truth about `grant` at `now`, for the invariant predicates.
    pub fn truth(&self, grant: GrantId, now: Timestamp) -> GrantTruth<'_> {
        GrantTruth {
            provider: self,
            grant,
            now,
        }
    }
}

/// What the provider knows about one grant at one instant; implements
/// [`ProviderTruth`] for `tokenfence_core::invariants`.
#[derive(Clone, Copy, Debug)]
pub struct GrantTruth<'a> {
    provider: &'a Provider,
    grant: GrantId,
    now: Timestamp,
}

impl ProviderTruth for GrantTruth<'_> {
    fn accepts(&self, token: &RefreshToken) -> bool {
        self.provider
            .token(token.expose())
            .is_some_and(|t| t.grant == self.grant)
            && self.provider.accepts(token.expose(), self.now)
    }

    fn ended_by_provider(&self) -> bool {
        self.provider.ended_by_provider(self.grant, self.now)
    }

    /// A replay outside the grace window that the provider punished by revoking the
    /// family. Replays a provider without reuse detection merely rejects are how a
    /// worker in doubt learns that a rotation was lost (`PresentAgainMayBeLost`);
    /// harnesses that want to forbid those too check them separately.
    fn replayed_outside_grace(&self) -> bool {
        self.provider
            .grant(self.grant)
            .is_some_and(|g| g.ended == Some(GrantEnd::ReuseDetected))
    }

    /// Also when the token that replaced `token` as the family's current one (a
    /// fork sibling demoting it) went to nobody.
    fn successor_lost(&self, token: &RefreshToken) -> bool {
        let tokens = &self.provider.tokens;
        let replaced_by_lost = || {
            tokens
                .get(token.expose())
                .and_then(|t| t.replaced_by)
                .and_then(|r| tokens.at(r))
                .is_some_and(|r| r.lost)
        };
        let me = TokenNo::parse(token.expose());
        self.provider.lost_now > 0
            && (tokens
                .values()
                .any(|t| t.lost && t.grant == self.grant && me.is_some() && t.parent == me)
                || replaced_by_lost())
    }
}

fn form_field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn json_reply(status: u16, body: Vec<u8>) -> HttpResponse {
    HttpResponse {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    }
}

fn ok_reply(body: Vec<u8>) -> HttpResponse {
    json_reply(200, body)
}

fn error_reply(status: u16, error: &str, description: Option<&str>) -> HttpResponse {
    let body = match description {
        Some(d) => json!({ "error_description": d, "error": error }),
        None => json!({ "error": error }),
    };
    json_reply(status, body.to_string().into_bytes())
}

fn not_found() -> HttpResponse {
    HttpResponse {
        status: 404,
        headers: vec![("content-type".into(), "text/html".into())],
        body: b"<html><body>Not Found</body></html>".to_vec(),
    }
}

/// A 5xx from the token endpoint (the provider did not process the request).
pub fn server_error(status: u16) -> HttpResponse {
    HttpResponse {
        status,
        headers: vec![("content-type".into(), "text/html".into())],
        body: b"<html><head><title>503 Service Temporarily Unavailable</title></head></html>"
            .to_vec(),
    }
}

/// HTTP 429 with `Retry-After` in seconds.
pub fn rate_limited(retry_after_secs: u64) -> HttpResponse {
    HttpResponse {
        status: 429,
        headers: vec![("retry-after".into(), retry_after_secs.to_string())],
        body: br#"{"error":"rate_limited"}"#.to_vec(),
    }
}

/// `reply` cut short in the middle of its body (a connection reset mid-reply, a
/// proxy that truncates): a success status with unusable JSON.
pub fn truncated(mut reply: HttpResponse) -> HttpResponse {
    let keep = reply.body.len() / 2;
    reply.body.truncate(keep);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfence_core::{parse_token_reply, refresh_request};

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_secs(secs)
    }

    fn setup(class: BehaviourClass) -> (Provider, GrantId, ClientCredentials, ProviderProfile) {
        let spec = Arc::new(ProviderSpec::scaled(class));
        let creds = spec.clients[0].credentials();
        let profile = spec.profile.clone();
        let mut p = Provider::new(spec);
        let (g, _) = p.authorize("prod-app", at(100));
        (p, g, creds, profile)
    }

    fn present(
        p: &mut Provider,
        profile: &ProviderProfile,
        creds: &ClientCredentials,
        token: &str,
        now: Timestamp,
    ) -> (HttpResponse, Outcome) {
        let req = refresh_request(profile, creds, &RefreshToken::new(token), now);
        p.handle(&req, now)
    }

    #[test]
    fn strict_rotation_rejects_the_old_token_at_once() {
        let (mut p, g, creds, profile) = setup(BehaviourClass::StrictRotation);
        let (reply, outcome) = present(&mut p, &profile, &creds, "rt1", at(101));
        let grant = parse_token_reply(&profile, &reply).expect("a grant");
        assert_eq!(grant.refresh.as_ref().map(|r| r.expose()), Some("rt2"));
        assert!(matches!(outcome, Outcome::Refreshed { minted: true, .. }));
        let (reply, outcome) = present(&mut p, &profile, &creds, "rt1", at(101));
        assert_eq!(reply.status, 400);
        assert!(String::from_utf8_lossy(&reply.body).contains("invalid_grant"));
        assert_eq!(
            outcome,
            Outcome::Rejected {
                grant: Some(g),
                cause: RejectCause::RotatedAway
            }
        );
        assert!(!p.truth(g, at(101)).replayed_outside_grace());
        assert!(p.accepts("rt2", at(101)));
    }

    #[test]
    fn reuse_detection_revokes_the_family() {
        let (mut p, g, creds, profile) = setup(BehaviourClass::ReuseDetection);
        present(&mut p, &profile, &creds, "rt1", at(101));
        present(&mut p, &profile, &creds, "rt1", at(102));
        assert!(p.truth(g, at(102)).replayed_outside_grace());
        assert!(!p.accepts("rt2", at(102)));
        assert!(!p.truth(g, at(102)).ended_by_provider());
    }

    #[test]
    fn grace_idempotent_returns_the_same_successor_and_fork_mints_another() {
        let (mut p, _, creds, profile) = setup(BehaviourClass::GraceIdempotent);
        present(&mut p, &profile, &creds, "rt1", at(101));
        p.mark_lost("rt2");
        let (_, o) = present(&mut p, &profile, &creds, "rt1", at(110));
        assert!(
            matches!(o, Outcome::Refreshed { ref refresh, recovered_lost: true, .. } if refresh == "rt2")
        );
        let (r, _) = present(&mut p, &profile, &creds, "rt1", at(131));
        assert_eq!(r.status, 400, "grace window of 30 s has closed");

        let (mut p, _, creds, profile) = setup(BehaviourClass::GraceFork);
        present(&mut p, &profile, &creds, "rt1", at(101));
        let (_, o) = present(&mut p, &profile, &creds, "rt1", at(110));
        assert!(matches!(o, Outcome::Refreshed { ref refresh, .. } if refresh == "rt3"));
        assert!(
            p.accepts("rt2", at(110)),
            "the other branch is in its grace window"
        );
        assert!(!p.accepts("rt2", at(140)));
        assert!(p.accepts("rt3", at(140)));
    }

    #[test]
    fn periodic_rotation_keeps_the_value_within_the_period_and_reports_deadlines() {
        let (mut p, g, creds, profile) = setup(BehaviourClass::Periodic);
        let (reply, _) = present(&mut p, &profile, &creds, "rt1", at(120));
        let body = String::from_utf8(reply.body.clone()).expect("utf-8");
        assert!(body.contains(r#""refresh_token":"rt1""#), "{body}");
        assert!(
            body.contains(r#""x_refresh_token_expires_in":60"#),
            "{body}"
        );
        assert!(
            body.contains(r#""x_refresh_token_hard_expires_in":180"#),
            "{body}"
        );
        assert!(reply.header("intuit_tid").is_some());
        let (reply, _) = present(&mut p, &profile, &creds, "rt1", at(141));
        assert!(String::from_utf8_lossy(&reply.body).contains(r#""refresh_token":"rt2""#));
        assert!(
            p.accepts("rt1", at(180)),
            "previous value valid for the grace window"
        );
        // Idle expiry: 60 s after the last use.
        assert!(!p.accepts("rt2", at(201)));
        assert!(p.truth(g, at(201)).ended_by_provider());
    }

    #[test]
    fn non_rotating_omits_the_refresh_token() {
        let (mut p, _, creds, profile) = setup(BehaviourClass::NonRotating);
        let (reply, _) = present(&mut p, &profile, &creds, "rt1", at(101));
        let grant = parse_token_reply(&profile, &reply).expect("a grant");
        assert_eq!(grant.refresh, None);
        assert_eq!(grant.expires_in, Some(Duration::from_secs(20)));
    }

    #[test]
    fn wrong_client_and_wrong_secret_are_told_apart() {
        let (mut p, _, _, profile) = setup(BehaviourClass::Periodic);
        let sandbox = ProviderSpec::default_clients()[1].credentials();
        let (reply, outcome) = present(&mut p, &profile, &sandbox, "rt1", at(101));
        assert!(String::from_utf8_lossy(&reply.body).contains("Incorrect Token type or clientID"));
        assert!(matches!(
            outcome,
            Outcome::Rejected {
                cause: RejectCause::WrongClient,
                ..
            }
        ));
        let bad = ClientCredentials {
            client_secret: ClientSecret::new("nope"),
            ..ProviderSpec::default_clients()[0].credentials()
        };
        let (reply, outcome) = present(&mut p, &profile, &bad, "rt1", at(101));
        assert_eq!(reply.status, 401);
        assert_eq!(outcome, Outcome::ClientRejected);
    }

    #[test]
    fn user_revocation_ends_the_grant() {
        let (mut p, g, creds, profile) = setup(BehaviourClass::GraceIdempotent);
        p.revoke_by_user(g);
        let (reply, _) = present(&mut p, &profile, &creds, "rt1", at(101));
        assert_eq!(reply.status, 400);
        assert!(p.truth(g, at(101)).ended_by_provider());
    }
}
