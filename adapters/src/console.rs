//! The operator console (`tokenfence serve`): every connection with its status,
//! deadlines and what to do, a Reconnect button that runs the consent flow, the
//! provider's callback, Intuit's disconnect landing page, `/metrics` in the
//! Prometheus text format and `/healthz`.
//!
//! Safe by default: no token or secret is ever rendered (the pages are built
//! from [`ConnectionStatus`], which has none); state-changing routes are POST
//! with a per-process CSRF token; with an admin token (required off loopback,
//! [`ConsoleConfig::admin_token`]) every route but the provider's callback, the
//! disconnect landing page and `/healthz` asks for it (`Authorization: Bearer`,
//! or the cookie `/login?token=` sets). Errors are shown as sentences in the
//! page, never as stack traces.

use crate::manager::{ConnectionStatus, ManagerError, TokenManager};
use crate::store::StoreError;
use crate::{ConnectOptions, ConnectOutcome};
use axum::extract::{Form, Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use std::fmt::Write as _;
use std::sync::Arc;
use tokenfence_core::{ConnectionId, ConnectionRecord, Status, Timestamp};

/// How the console is set up.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    /// The console's address as the browser and the provider reach it, e.g.
    /// `http://127.0.0.1:8080`: the redirect URI is this plus `/callback`.
    pub public_url: String,
    /// The admin token every operator route asks for, if set.
    pub admin_token: Option<String>,
    /// Connections per page.
    pub page_size: usize,
    /// Render metrics from this handle at `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

struct Console {
    tokens: TokenManager,
    config: ConsoleConfig,
    /// Per process: forms carry it, POSTs must.
    csrf: String,
}

type Shared = State<Arc<Console>>;

/// The console's routes over `tokens`.
pub fn router(tokens: TokenManager, config: ConsoleConfig) -> Result<Router, ManagerError> {
    let mut bytes = [0u8; 24];
    crate::manager::random(&mut bytes, "the CSRF token")?;
    let csrf = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let console = Arc::new(Console {
        tokens,
        config,
        csrf,
    });
    Ok(Router::new()
        .route("/", get(index))
        .route("/login", get(login))
        .route("/connections/{id}/reconnect", post(reconnect))
        .route("/callback", get(callback))
        .route("/disconnected", get(disconnected))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(console))
}

const COOKIE: &str = "tokenfence_admin";

impl Console {
    /// `None` when the request may pass; else the answer to send.
    fn refuse(&self, headers: &HeaderMap) -> Option<Response> {
        let token = self.config.admin_token.as_deref()?;
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .next();
        let ok = [bearer, cookie]
            .into_iter()
            .flatten()
            .any(|given| constant_time_eq(given.as_bytes(), token.as_bytes()));
        (!ok).then(|| {
            page(
                StatusCode::UNAUTHORIZED,
                "Sign in",
                "<p>This console needs the admin token: open <code>/login?token=...</code> once, or send <code>Authorization: Bearer ...</code>.</p>",
            )
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Text for HTML.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A segment of a URL path.
fn path_segment(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>tokenfence: {t}</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}}\
         .dead{{color:#b00020;font-weight:bold}}.warn{{color:#a15c00}}.ok{{color:#1b6e20}}\
         .notice{{background:#eef;padding:.5em;margin:1em 0}}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    );
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' https: http:",
            ),
        ],
        Html(html),
    )
        .into_response()
}

fn date(t: Option<Timestamp>) -> String {
    t.map_or("—".into(), |t| {
        let mut text = crate::clock::rfc3339(t);
        if text.ends_with('Z') {
            text.truncate(16);
        }
        text.replace('T', " ")
    })
}

fn days_left(t: Option<Timestamp>, now: Timestamp) -> Option<i64> {
    t.map(|t| {
        let (span, sign) = if t >= now {
            (t.saturating_since(now), 1)
        } else {
            (now.saturating_since(t), -1)
        };
        sign * (span.as_secs() / 86_400) as i64
    })
}

/// The status in words, and its CSS class.
fn status_words(s: &Status) -> (String, &'static str) {
    match s {
        Status::Active => ("active".into(), "ok"),
        Status::Degraded { failures, last, .. } => (
            format!("degraded: {failures} failure(s), last {last}"),
            "warn",
        ),
        Status::ReauthRequired { reason, .. } => {
            let why = match reason {
                tokenfence_core::ReauthReason::InvalidGrant => "invalid grant",
                tokenfence_core::ReauthReason::LostRotation => "lost rotation",
                tokenfence_core::ReauthReason::IdleExpired => "idle expiry",
                tokenfence_core::ReauthReason::HardExpired => "hard expiry",
            };
            (format!("needs reconnect ({why}: {reason})"), "dead")
        }
        Status::Disconnected { .. } => ("disconnected".into(), "dead"),
    }
}

fn needs_reconnect(s: &ConnectionStatus) -> bool {
    matches!(
        s.status,
        Status::ReauthRequired { .. } | Status::Disconnected { .. }
    )
}

/// Every stored record, and the rows that cannot be read (with why), in id order.
/// A row is unreadable when the store answers and the row itself is wrong (the
/// keyring cannot open it, or it is older than one seen); a store that does not
/// answer fails the whole scan, so that an outage is not shown as bad rows.
async fn every_record(
    tokens: &TokenManager,
) -> Result<(Vec<ConnectionRecord>, Vec<(ConnectionId, String)>), StoreError> {
    let store = tokens.store();
    let mut records = Vec::new();
    let mut unreadable = Vec::new();
    for id in store.list().await? {
        match store.load(&id).await {
            Ok(Some(r)) => records.push(r),
            Ok(None) => {}
            Err(e @ (StoreError::Corrupt { .. } | StoreError::RolledBack { .. })) => {
                unreadable.push((id, e.to_string()))
            }
            Err(e) => return Err(e),
        }
    }
    Ok((records, unreadable))
}

#[derive(serde::Deserialize, Default)]
struct ListQuery {
    /// `reconnect` (needs reconnect) or `deadline` (a deadline within 60 days).
    filter: Option<String>,
    page: Option<usize>,
    notice: Option<String>,
}

async fn index(State(c): Shared, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if let Some(refused) = c.refuse(&headers) {
        return refused;
    }
    let (records, unreadable) = match every_record(&c.tokens).await {
        Ok(scan) => scan,
        Err(e) => {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Connections",
                &format!(
                    "<p class=dead>The store did not answer: {}</p>",
                    esc(&e.to_string())
                ),
            )
        }
    };
    let now = c.tokens.now();
    let mut rows: Vec<_> = records
        .iter()
        .map(|r| (r.id.clone(), ConnectionStatus::from(r)))
        .collect();
    let soon = |s: &ConnectionStatus| {
        [s.idle_deadline, s.hard_deadline]
            .into_iter()
            .filter_map(|d| days_left(d, now))
            .any(|d| d < 60)
    };
    rows.retain(|(_, s)| match q.filter.as_deref() {
        Some("reconnect") => needs_reconnect(s),
        Some("deadline") => soon(s),
        _ => true,
    });
    let per = c.config.page_size.max(1);
    let pages = rows.len().div_ceil(per).max(1);
    let at = q.page.unwrap_or(1).clamp(1, pages);
    let mut body = String::new();
    if let Some(n) = &q.notice {
        let _ = write!(body, "<p class=notice id=notice>{}</p>", esc(n));
    }
    let filter = q.filter.as_deref().unwrap_or("");
    let _ = write!(
        body,
        "<p><a href=\"/\">all</a> · <a href=\"/?filter=reconnect\">needs reconnect</a> · \
         <a href=\"/?filter=deadline\">deadline within 60 days</a> · {} connection(s)</p>\
         <table id=connections><tr><th>connection</th><th>provider</th><th>realm</th><th>status</th>\
         <th>last refresh</th><th>idle deadline</th><th>hard deadline</th><th>access token</th><th></th></tr>",
        rows.len()
    );
    for (id, s) in rows.iter().skip((at - 1) * per).take(per) {
        let (words, class) = status_words(&s.status);
        let left = |d: Option<Timestamp>| match days_left(d, now) {
            Some(n) if n < 0 => format!("{} (passed)", date(d)),
            Some(n) => format!("{} ({n} days left)", date(d)),
            None => "unknown".into(),
        };
        let access = match s.access_expires_at {
            _ if needs_reconnect(s) => "not served".into(),
            Some(t) if t > now => format!("valid {} min", t.saturating_since(now).as_secs() / 60),
            Some(_) => "expired".into(),
            None => "none".into(),
        };
        let button = format!(
            "<form method=post action=\"/connections/{}/reconnect\"><input type=hidden name=csrf value=\"{}\">\
             <button type=submit>Reconnect</button></form>",
            path_segment(&id.0),
            c.csrf
        );
        let _ = write!(
            body,
            "<tr data-id=\"{}\"><td>{}</td><td>{}/{}</td><td>{}</td><td class={class}>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{button}</td></tr>",
            esc(&id.0),
            esc(&id.0),
            esc(&s.identity.provider),
            s.identity.environment,
            esc(s.realm_id.as_deref().unwrap_or("—")),
            esc(&words),
            date(s.last_refreshed_at),
            left(s.idle_deadline),
            left(s.hard_deadline),
            access,
        );
    }
    body.push_str("</table>");
    if pages > 1 {
        let _ = write!(body, "<p>page {at} of {pages}");
        for (label, to) in [("previous", at.saturating_sub(1)), ("next", at + 1)] {
            if (1..=pages).contains(&to) && to != at {
                let _ = write!(
                    body,
                    " · <a href=\"/?filter={}&page={to}\">{label}</a>",
                    esc(filter)
                );
            }
        }
        body.push_str("</p>");
    }
    for (id, e) in unreadable {
        let _ = write!(
            body,
            "<p class=dead>{}: unreadable ({})</p>",
            esc(&id.0),
            esc(&e)
        );
    }
    page(StatusCode::OK, "Connections", &body)
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

async fn login(State(c): Shared, Query(q): Query<Login>) -> Response {
    let Some(token) = c.config.admin_token.as_deref() else {
        return Redirect::to("/").into_response();
    };
    if !constant_time_eq(q.token.as_bytes(), token.as_bytes()) {
        return page(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            "<p class=dead>Wrong token.</p>",
        );
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct Csrf {
    csrf: String,
}

async fn reconnect(
    State(c): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<Csrf>,
) -> Response {
    if let Some(refused) = c.refuse(&headers) {
        return refused;
    }
    if !constant_time_eq(form.csrf.as_bytes(), c.csrf.as_bytes()) {
        return page(
            StatusCode::FORBIDDEN,
            "Reconnect",
            "<p class=dead>This form is stale or did not come from this console: reload the page and try again.</p>",
        );
    }
    let redirect_uri = format!("{}/callback", c.config.public_url.trim_end_matches('/'));
    match c
        .tokens
        .begin_connect(&ConnectionId(id), &redirect_uri, ConnectOptions::default())
        .await
    {
        Ok(begun) => Redirect::to(&begun.url).into_response(),
        Err(e) => page(
            StatusCode::BAD_GATEWAY,
            "Reconnect",
            &format!("<p class=dead>Could not begin: {}</p>", esc(&e.to_string())),
        ),
    }
}

fn back_with(notice: &str) -> Response {
    let q: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("notice", notice)
        .finish();
    Redirect::to(&format!("/?{q}")).into_response()
}

async fn callback(State(c): Shared, RawQuery(query): RawQuery) -> Response {
    match c
        .tokens
        .finish_connect(query.as_deref().unwrap_or(""))
        .await
    {
        Ok(ConnectOutcome::Connected {
            connection,
            realm_id,
            reconnected,
            ..
        }) => back_with(&format!(
            "{} {connection}{}",
            if reconnected {
                "Reconnected"
            } else {
                "Connected"
            },
            realm_id.map_or(String::new(), |r| format!(" (company {r})"))
        )),
        Ok(ConnectOutcome::Denied {
            connection, error, ..
        }) => back_with(&format!(
            "{connection} was not authorized ({error}): nothing changed"
        )),
        Err(e) => page(
            StatusCode::BAD_REQUEST,
            "Connect",
            &format!(
                "<p class=dead>{}</p><p><a href=\"/\">Back to the connections</a></p>",
                esc(&e.to_string())
            ),
        ),
    }
}

#[derive(serde::Deserialize)]
struct Landing {
    #[serde(rename = "realmId")]
    realm_id: Option<String>,
}

/// Intuit's disconnect landing page: where QuickBooks sends the user after they
/// disconnected the app. It changes nothing (a GET anyone can send); the next
/// refresh finds the grant gone, and the console offers Reconnect.
async fn disconnected(Query(q): Query<Landing>) -> Response {
    let company = q
        .realm_id
        .map_or(String::new(), |r| format!(" for company {}", esc(&r)));
    page(
        StatusCode::OK,
        "Disconnected",
        &format!(
            "<p>The app was disconnected from QuickBooks{company}. Syncing stops until it is \
             reconnected: an administrator can reconnect it from the connections page.</p>"
        ),
    )
}

/// How long `/metrics` reads the store before it reports the scan failed.
const SCAN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn metrics(State(c): Shared, headers: HeaderMap) -> Response {
    if let Some(refused) = c.refuse(&headers) {
        return refused;
    }
    let Some(handle) = &c.config.metrics else {
        return (
            StatusCode::NOT_FOUND,
            "metrics are not recorded by this process\n",
        )
            .into_response();
    };
    // Connections by status, counted now from the store.
    let mut counts = std::collections::BTreeMap::<(String, &str), u64>::new();
    // Within a scrape's time (Prometheus waits 10 s by default): a store that
    // hangs counts as one that failed.
    let scan = tokio::time::timeout(SCAN_TIMEOUT, every_record(&c.tokens))
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "no answer within the scrape".into(),
            ))
        });
    if let Ok((records, _)) = &scan {
        for r in records {
            let status = crate::store::status_name(&r.status);
            *counts
                .entry((r.identity.provider.clone(), status))
                .or_default() += 1;
        }
    }
    let mut text = handle.render();
    let _ = writeln!(
        text,
        "# HELP tokenfence_store_scan_ok Whether this scrape read the whole store (0: the store did not answer, and the connection gauges are missing).\n# TYPE tokenfence_store_scan_ok gauge\ntokenfence_store_scan_ok {}",
        u8::from(scan.is_ok())
    );
    let Ok((_, unreadable)) = scan else {
        return ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response();
    };
    let unreadable = unreadable.len();
    text.push_str("# HELP tokenfence_connections Connections in the store by provider and status.\n# TYPE tokenfence_connections gauge\n");
    for ((provider, status), n) in counts {
        let _ = writeln!(
            text,
            "tokenfence_connections{{provider=\"{provider}\",status=\"{status}\"}} {n}"
        );
    }
    let _ = writeln!(
        text,
        "# HELP tokenfence_connections_unreadable Rows the keyring cannot open.\n# TYPE tokenfence_connections_unreadable gauge\ntokenfence_connections_unreadable {unreadable}"
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The store answers, and the keyring opens a row (the first one, if any).
async fn healthz(State(c): Shared) -> Response {
    let store = c.tokens.store();
    let checked = async {
        let ids = store.list().await?;
        if let Some(first) = ids.first() {
            store.load(first).await?;
        }
        Ok::<_, crate::store::StoreError>(ids.len())
    };
    match checked.await {
        Ok(n) => (
            StatusCode::OK,
            format!("ok: the store answers, {n} connection(s)\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {e}\n")).into_response(),
    }
}
