//! The provider model served over real HTTP: `tokenfence-sim mock-provider`.
//!
//! The same sans-IO [`Provider`] that the model checker and the simulator use
//! answers the token and revocation endpoints, so adapter tests and users' own
//! integration tests meet a provider that rotates, expires and drops replies like
//! the real one. A control endpoint injects faults, revokes grants, advances the
//! provider's clock and reports what happened.
//!
//! | endpoint | what |
//! |---|---|
//! | `POST /oauth2/v1/tokens/bearer` | token endpoint (refresh_token, authorization_code) |
//! | `POST /v2/oauth2/tokens/revoke` | revocation (Intuit's JSON style) |
//! | `GET /connect/oauth2` | consent: redirects to `redirect_uri` with `code`, `state`, `realmId` |
//! | `POST /control` | JSON command: `fault`, `revoke`, `advance`, `authorize` |
//! | `GET /control/stats` | counters as JSON |

use crate::provider::{GrantId, Outcome, Provider, ProviderSpec, RejectCause};
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenfence_core::{Header, HttpRequest, HttpResponse, SecretString, Timestamp};

/// Token endpoint path.
pub const TOKEN_PATH: &str = "/oauth2/v1/tokens/bearer";
/// Revocation endpoint path.
pub const REVOKE_PATH: &str = "/v2/oauth2/tokens/revoke";
/// Consent endpoint path.
pub const AUTHORIZE_PATH: &str = "/connect/oauth2";

/// A fault applied to the next token-endpoint requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// 503 with an empty body, request not processed.
    #[serde(rename = "5xx")]
    ServerError,
    /// 429 with `Retry-After: 1`, request not processed.
    #[serde(rename = "429")]
    RateLimited,
    /// 502 with an HTML page from a "proxy", request not processed.
    Html,
    /// Processed by the provider (it may rotate), then the reply is never sent: the
    /// connection hangs until the client gives up.
    LoseReply,
    /// Processed, then answered with a truncated body.
    Truncated,
}

/// A command for `POST /control`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Control {
    /// Apply `fault` to the next `count` token requests.
    Fault {
        /// Which fault.
        fault: Fault,
        /// How many requests.
        #[serde(default = "one")]
        count: u32,
    },
    /// The user disconnects the app: end a grant (by index), or every grant.
    Revoke {
        /// Grant index; all grants when absent.
        grant: Option<usize>,
    },
    /// Move the provider's clock forward.
    Advance {
        /// Seconds.
        secs: u64,
    },
    /// Consent without the browser dance: a new grant; answers with its token JSON.
    Authorize {
        /// Client id of the app (see the mock's startup banner).
        client_id: String,
    },
    /// Whether the consent endpoint shows a page with Connect and Deny buttons
    /// (for a person or a browser test) instead of answering at once.
    ConsentPage {
        /// Show the page.
        on: bool,
    },
}

fn one() -> u32 {
    1
}

/// Counters reported by `GET /control/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests to the token endpoint.
    pub token_requests: u64,
    /// Successful refreshes.
    pub refreshes: u64,
    /// Refreshes that minted a new refresh token.
    pub rotations: u64,
    /// Replays inside a grace window.
    pub grace_replays: u64,
    /// `invalid_grant` answers by cause.
    pub rejections: BTreeMap<String, u64>,
    /// `invalid_client` answers.
    pub client_rejections: u64,
    /// Faults applied.
    pub faults: u64,
    /// Grants issued.
    pub grants: u64,
}

struct Code {
    client_id: String,
    grant: Option<GrantId>,
    /// The redirect URI of the consent (the exchange must repeat it).
    redirect_uri: String,
    /// The PKCE S256 challenge of the consent, if it sent one.
    challenge: Option<String>,
}

struct MockState {
    provider: Provider,
    base_url: String,
    epoch: Timestamp,
    started: tokio::time::Instant,
    offset: Duration,
    faults: VecDeque<Fault>,
    codes: BTreeMap<String, Code>,
    next_code: u64,
    stats: Stats,
    consent_page: bool,
}

impl MockState {
    fn now(&self) -> Timestamp {
        self.epoch
            .saturating_add(self.started.elapsed())
            .saturating_add(self.offset)
    }
}

/// A running mock provider's shared state.
#[derive(Clone)]
pub struct MockProvider {
    state: Arc<Mutex<MockState>>,
}

impl MockProvider {
    /// A mock for `spec` served at `base_url` (e.g. `http://127.0.0.1:8080`), whose
    /// clock starts at `epoch` (the wall time now) and runs in real time. The spec's
    /// endpoints are rewritten to point at `base_url`.
    pub fn new(mut spec: ProviderSpec, base_url: &str, epoch: Timestamp) -> Self {
        spec.profile.token_url = format!("{base_url}{TOKEN_PATH}");
        spec.profile.revoke_url = Some(format!("{base_url}{REVOKE_PATH}"));
        spec.profile.authorize_url = Some(format!("{base_url}{AUTHORIZE_PATH}"));
        let state = MockState {
            provider: Provider::new(Arc::new(spec)),
            base_url: base_url.into(),
            epoch,
            started: tokio::time::Instant::now(),
            offset: Duration::ZERO,
            faults: VecDeque::new(),
            codes: BTreeMap::new(),
            next_code: 0,
            stats: Stats::default(),
            consent_page: false,
        };
        MockProvider {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// The client-side profile that matches this mock (endpoints included).
    pub fn spec(&self) -> ProviderSpec {
        self.with(|s| s.provider.spec().clone())
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.with(|s| s.stats.clone())
    }

    /// Applies a control command; returns the JSON answer.
    pub fn control(&self, command: Control) -> serde_json::Value {
        self.with(|s| match command {
            Control::Fault { fault, count } => {
                s.faults.extend(std::iter::repeat_n(fault, count as usize));
                serde_json::json!({ "queued": s.faults.len() })
            }
            Control::Revoke { grant } => {
                let all = s.stats.grants as usize;
                let targets: Vec<usize> = grant.map_or_else(|| (0..all).collect(), |g| vec![g]);
                for g in &targets {
                    s.provider.revoke_by_user(GrantId(*g));
                }
                serde_json::json!({ "revoked": targets })
            }
            Control::Advance { secs } => {
                s.offset += Duration::from_secs(secs);
                serde_json::json!({ "now_ms": s.now().as_millis() })
            }
            Control::Authorize { client_id } => {
                let now = s.now();
                let (grant, reply) = s.provider.authorize(&client_id, now);
                s.stats.grants += 1;
                let body: serde_json::Value =
                    serde_json::from_slice(&reply.body).unwrap_or_default();
                serde_json::json!({ "grant": grant.0, "tokens": body })
            }
            Control::ConsentPage { on } => {
                s.consent_page = on;
                serde_json::json!({ "consent_page": on })
            }
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut MockState) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// The axum router serving every endpoint.
    pub fn router(&self) -> Router {
        Router::new()
            .route(TOKEN_PATH, post(token))
            .route(REVOKE_PATH, post(revoke))
            .route(AUTHORIZE_PATH, get(authorize))
            .route("/control", post(control))
            .route("/control/stats", get(stats))
            .with_state(self.clone())
    }

    /// Serves on `listener` until the future is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }
}

fn to_request(url: String, headers: &HeaderMap, body: String) -> HttpRequest {
    let keep = ["authorization", "content-type", "accept"];
    let headers = keep
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some(Header {
                name,
                value: SecretString::new(value),
            })
        })
        .collect();
    HttpRequest {
        method: "POST",
        url,
        headers,
        body: SecretString::new(body),
        send_deadline: Timestamp::EPOCH,
    }
}

fn to_response(reply: HttpResponse) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        axum::http::HeaderValue::from_static("application/json"),
    );
    for (name, value) in reply.headers {
        if let (Ok(n), Ok(v)) = (
            axum::http::HeaderName::try_from(name),
            axum::http::HeaderValue::try_from(value),
        ) {
            headers.insert(n, v);
        }
    }
    response
}

async fn token(State(mock): State<MockProvider>, headers: HeaderMap, body: String) -> Response {
    let form: BTreeMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if form.get("grant_type").map(String::as_str) == Some("authorization_code") {
        return mock.with(|s| {
            let request = to_request(format!("{}{TOKEN_PATH}", s.base_url), &headers, body);
            let client = s
                .provider
                .authenticated(&request)
                .map(|c| c.client_id.clone());
            exchange_code(s, client, &form)
        });
    }
    let (fault, reply, tid) = mock.with(|s| {
        s.stats.token_requests += 1;
        let fault = s.faults.pop_front();
        if fault.is_some() {
            s.stats.faults += 1;
        }
        let tid = format!("mock-{}", s.stats.token_requests);
        if matches!(
            fault,
            Some(Fault::ServerError | Fault::RateLimited | Fault::Html)
        ) {
            return (fault, None, tid);
        }
        let url = format!("{}{TOKEN_PATH}", s.base_url);
        let now = s.now();
        let (reply, outcome) = s.provider.handle(&to_request(url, &headers, body), now);
        count(&mut s.stats, &outcome);
        (fault, Some(reply), tid)
    });
    let with_tid = |mut r: Response| {
        if let Ok(v) = axum::http::HeaderValue::try_from(tid.as_str()) {
            r.headers_mut().insert("intuit_tid", v);
        }
        r
    };
    match (fault, reply) {
        (Some(Fault::ServerError), _) => with_tid(StatusCode::SERVICE_UNAVAILABLE.into_response()),
        (Some(Fault::RateLimited), _) => {
            with_tid((StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response())
        }
        (Some(Fault::Html), _) => with_tid(
            (
                StatusCode::BAD_GATEWAY,
                [("content-type", "text/html")],
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            )
                .into_response(),
        ),
        (Some(Fault::LoseReply), _) => {
            // Processed; the reply never comes. The client times out.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        (Some(Fault::Truncated), Some(mut reply)) => {
            reply.body.truncate(reply.body.len() / 2);
            with_tid(to_response(reply))
        }
        (_, Some(reply)) => with_tid(to_response(reply)),
        (_, None) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn count(stats: &mut Stats, outcome: &Outcome) {
    match outcome {
        Outcome::Refreshed {
            minted,
            grace_replay,
            ..
        } => {
            stats.refreshes += 1;
            stats.rotations += u64::from(*minted);
            stats.grace_replays += u64::from(*grace_replay);
        }
        Outcome::Rejected { cause, .. } => {
            *stats
                .rejections
                .entry(cause_name(*cause).into())
                .or_default() += 1;
        }
        Outcome::ClientRejected => stats.client_rejections += 1,
        Outcome::BadRequest | Outcome::Revoked { .. } | Outcome::NotFound => {}
    }
}

fn cause_name(cause: RejectCause) -> &'static str {
    match cause {
        RejectCause::Unknown => "unknown",
        RejectCause::WrongClient => "wrong-client",
        RejectCause::UserRevoked => "user-revoked",
        RejectCause::FamilyRevoked => "family-revoked",
        RejectCause::IdleExpired => "idle-expired",
        RejectCause::HardExpired => "hard-expired",
        RejectCause::RotatedAway => "rotated-away",
    }
}

/// The authorization-code exchange. A code works once; presenting it again
/// revokes what it issued (as Intuit staff describe).
fn exchange_code(
    s: &mut MockState,
    client: Option<String>,
    form: &BTreeMap<String, String>,
) -> Response {
    let invalid = || {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid_grant" })),
        )
            .into_response()
    };
    let Some(code) = form.get("code").and_then(|c| s.codes.get_mut(c)) else {
        return invalid();
    };
    // The client must authenticate (id and secret) as the one the code was issued to.
    if client.as_deref() != Some(code.client_id.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({ "error": "invalid_client" })),
        )
            .into_response();
    }
    if let Some(grant) = code.grant {
        s.provider.revoke_by_user(grant);
        return invalid();
    }
    // RFC 6749 §4.1.3: the same redirect URI; RFC 7636 §4.6: the verifier whose
    // S256 is the challenge.
    if form.get("redirect_uri") != Some(&code.redirect_uri) {
        return invalid();
    }
    if let Some(challenge) = &code.challenge {
        let verified = form.get("code_verifier").is_some_and(|v| {
            tokenfence_core::connect::pkce_challenge(&SecretString::new(v.as_str())) == *challenge
        });
        if !verified {
            return invalid();
        }
    }
    let client_id = code.client_id.clone();
    let now = s.now();
    let (grant, reply) = s.provider.authorize(&client_id, now);
    if let Some(code) = form.get("code").and_then(|c| s.codes.get_mut(c)) {
        code.grant = Some(grant);
    }
    s.stats.grants += 1;
    to_response(reply)
}

async fn revoke(State(mock): State<MockProvider>, headers: HeaderMap, body: String) -> Response {
    mock.with(|s| {
        let url = format!("{}{REVOKE_PATH}", s.base_url);
        let now = s.now();
        let (reply, _) = s.provider.handle(&to_request(url, &headers, body), now);
        to_response(reply)
    })
}

#[derive(Deserialize)]
struct Consent {
    client_id: String,
    redirect_uri: String,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    /// Test hook: the company the user picks.
    mock_realm: Option<String>,
    /// Test hook: the user clicks "deny".
    mock_deny: Option<String>,
    /// The consent page's Connect button.
    mock_decision: Option<String>,
}

/// The consent page: the app asks for access; Connect and Deny resubmit the same
/// request with the decision.
fn consent_page(client_id: &str, raw_query: &str) -> Response {
    let hidden: String = form_urlencoded::parse(raw_query.as_bytes())
        .map(|(k, v)| {
            format!(
                "<input type=hidden name=\"{}\" value=\"{}\">",
                html_escape(&k),
                html_escape(&v)
            )
        })
        .collect();
    let page = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Mock provider: consent</title></head>\
         <body style=\"font-family:system-ui,sans-serif;margin:2em\"><h1>Connect to the mock provider?</h1>\
         <p>The app <b>{}</b> asks to access your company's data.</p>\
         <form method=get>{hidden}<button id=connect name=mock_decision value=allow>Connect</button> \
         <button id=deny name=mock_deny value=1>Deny</button></form></body></html>",
        html_escape(client_id)
    );
    (
        StatusCode::OK,
        [("content-type", "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The consent page, answered at once as if the user clicked: a redirect to
/// `redirect_uri` with `code`, `state` and `realmId` (the company: `mock_realm`,
/// or 9130350000000001), or with `error=access_denied` when `mock_deny` is set.
/// A PKCE challenge (S256 only) is kept with the code.
async fn authorize(
    State(mock): State<MockProvider>,
    RawQuery(raw): RawQuery,
    Query(q): Query<Consent>,
) -> Response {
    if mock.with(|s| s.consent_page) && q.mock_deny.is_none() && q.mock_decision.is_none() {
        return consent_page(&q.client_id, raw.as_deref().unwrap_or(""));
    }
    let mut location = q.redirect_uri.clone();
    location.push(if location.contains('?') { '&' } else { '?' });
    if q.mock_deny.is_some() {
        location.push_str("error=access_denied&error_description=The%20user%20denied%20access");
    } else {
        if q.code_challenge.is_some() && q.code_challenge_method.as_deref() != Some("S256") {
            return StatusCode::BAD_REQUEST.into_response();
        }
        let code = mock.with(|s| {
            s.next_code += 1;
            let code = format!("code-{}", s.next_code);
            s.codes.insert(
                code.clone(),
                Code {
                    client_id: q.client_id.clone(),
                    grant: None,
                    redirect_uri: q.redirect_uri.clone(),
                    challenge: q.code_challenge.clone(),
                },
            );
            code
        });
        let realm = q.mock_realm.as_deref().unwrap_or("9130350000000001");
        location.push_str(&format!("code={code}&realmId="));
        location.extend(form_urlencoded::byte_serialize(realm.as_bytes()));
    }
    if let Some(state) = q.state {
        location.push_str("&state=");
        location.extend(form_urlencoded::byte_serialize(state.as_bytes()));
    }
    match location.parse::<Uri>() {
        Ok(_) => (StatusCode::FOUND, [("location", location)]).into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

async fn control(State(mock): State<MockProvider>, Json(command): Json<Control>) -> Response {
    Json(mock.control(command)).into_response()
}

async fn stats(State(mock): State<MockProvider>) -> Response {
    Json(mock.stats()).into_response()
}
