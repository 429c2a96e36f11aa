//! The fuzz harness, shared WITHOUT copies by
//! - the cargo-fuzz targets in `fuzz/fuzz_targets/` (`#[path = ...] mod harness;`),
//! - `core/tests/fuzz_corpora.rs`, which runs the checked-in seed corpora as ordinary
//!   tests, so CI exercises them without a fuzzing toolchain,
//! - `core/tests/hostile_replies.rs`, which runs the hostile-reply corpus.
//!
//! Two entry points:
//! - [`check_reply`]: bytes in the reply-file format (see [`parse_case`]) →
//!   `parse_token_reply` / `parse_revoke_reply` under several profiles, and the same
//!   reply fed to a machine that is waiting for it in the middle of a refresh;
//! - [`check_machine`]: bytes decoded into a run of inputs for one or two
//!   `Connection`s sharing a small in-memory store, with the predicates of
//!   `tokenfence_core::invariants` checked after every input.
//!
//! Every check panics on failure: that is what the fuzzer reports.
#![allow(dead_code)] // each includer uses a different subset

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokenfence_core::invariants::{self, ProviderTruth, SenderGhost, Unsettled};
use tokenfence_core::lease::{self, LeaseSlot};
use tokenfence_core::*;

/// Start of every run: 2027-01-15.
pub const T0: Timestamp = Timestamp::from_secs(1_800_000_000);
/// Every secret the harness makes contains this marker, and no output, event or
/// error may show it.
pub const SECRET_MARK: &str = "SECRET";
/// The client secret of every harness config.
pub const CLIENT_SECRET: &str = "csSECRET-client-secret-7f3a";
/// The refresh token stored before a refresh in [`reply_in_flight`].
pub const STORED_REFRESH: &str = "rtSECRET-stored-0001";
/// The (expired) access token stored before a refresh in [`reply_in_flight`].
pub const STORED_ACCESS: &str = "atSECRET-stored-0001";
/// Base64 of `fuzz-client:csSECRET-client-secret-7f3a`, as sent in Basic auth.
pub const BASIC_CREDENTIALS: &str = "ZnV6ei1jbGllbnQ6Y3NTRUNSRVQtY2xpZW50LXNlY3JldC03ZjNh";
const CLIENT_ID: &str = "fuzz-client";
const SANDBOX_CLIENT_ID: &str = "fuzz-sandbox-client";

// ---------------------------------------------------------------------------
// The reply-file format
// ---------------------------------------------------------------------------

/// One decoded reply file: `# key: value` metadata and the HTTP response.
#[derive(Debug, Clone)]
pub struct ReplyCase {
    /// `# key: value` lines before the status line, in order.
    pub meta: Vec<(String, String)>,
    /// The reply as a transport would hand it over.
    pub response: HttpResponse,
}

impl ReplyCase {
    /// The first metadata value for `key`.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Decodes the reply-file format (documented in `core/tests/replies/README.md`):
///
/// ```text
/// # expect: MalformedSuccess NotJson      <- optional metadata lines
/// 200                                     <- status line (digits)
/// content-type: text/html                 <- optional header lines
///                                         <- one empty line
/// <body: raw bytes to the end of the file>
/// ```
///
/// Total on every input (the fuzzer feeds it arbitrary bytes): a status line without
/// digits means 200, a number above 65535 wraps, a header line without `:` is a
/// header with an empty value, a missing empty line means an empty body. With the
/// metadata `# body: escaped`, `\xHH` in the body stands for the byte HH.
pub fn parse_case(data: &[u8]) -> ReplyCase {
    let mut rest = data;
    let mut meta = Vec::new();
    while rest.first() == Some(&b'#') {
        let (line, r) = split_line(rest);
        rest = r;
        let text = String::from_utf8_lossy(trim_cr(&line[1..]));
        if let Some((k, v)) = text.split_once(':') {
            meta.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let (status_line, r) = split_line(rest);
    rest = r;
    let digits: Vec<u8> = status_line
        .iter()
        .copied()
        .filter(u8::is_ascii_digit)
        .collect();
    let status = if digits.is_empty() {
        200
    } else {
        let n = digits.iter().fold(0u32, |n, d| {
            n.wrapping_mul(10).wrapping_add(u32::from(d - b'0')) % 65_536
        });
        u16::try_from(n).unwrap_or(200)
    };
    let mut headers = Vec::new();
    while !rest.is_empty() {
        let (line, r) = split_line(rest);
        rest = r;
        let line = trim_cr(line);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        let (name, value) = text.split_once(':').unwrap_or((&text, ""));
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let escaped = meta
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("body") && v.eq_ignore_ascii_case("escaped"));
    let body = if escaped {
        unescape(rest)
    } else {
        rest.to_vec()
    };
    ReplyCase {
        meta,
        response: HttpResponse {
            status,
            headers,
            body,
        },
    }
}

fn unescape(data: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'\\' && data.get(i + 1) == Some(&b'x') {
            if let (Some(h), Some(l)) = (
                data.get(i + 2).and_then(|&b| hex(b)),
                data.get(i + 3).and_then(|&b| hex(b)),
            ) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(0));
                i += 4;
                continue;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

/// The kind of a reply error, as written in a corpus file's `# expect:` line:
/// `OAuth InvalidGrant`, `RateLimited 86400s`, `RateLimited none`, `ServerError`,
/// `Unreadable NotJson`, `MalformedSuccess BadToken(access_token)`, ...
/// How a reply file's `# expect:` line names an outcome: [`describe`] for an error,
/// `Grant` for a grant, `Grant ignoring a,b` when optional members were ignored.
pub fn describe_parsed(parsed: &Result<TokenGrant, ReplyError>) -> String {
    match parsed {
        Ok(grant) if grant.ignored.is_empty() => "Grant".into(),
        Ok(grant) => format!("Grant ignoring {}", grant.ignored.join(",")),
        Err(err) => describe(err),
    }
}

/// Names a reply error the way a reply file's `# expect:` line does.
pub fn describe(err: &ReplyError) -> String {
    let retry = |r: &Option<RetryAfter>| match r {
        Some(RetryAfter::Delay(d)) => format!("{}s", d.as_secs()),
        Some(RetryAfter::At(t)) => format!("at {}", t.as_millis() / 1000),
        None => "none".into(),
    };
    let problem = |p: &Malformation| format!("{p:?}").replace('"', "");
    match err {
        ReplyError::OAuth { kind, .. } => format!("OAuth {kind:?}"),
        ReplyError::RateLimited { retry_after } => format!("RateLimited {}", retry(retry_after)),
        ReplyError::ServerError {
            retry_after: None, ..
        } => "ServerError".into(),
        ReplyError::ServerError { retry_after, .. } => {
            format!("ServerError {}", retry(retry_after))
        }
        ReplyError::Unauthorized { .. } => "Unauthorized".into(),
        ReplyError::Unreadable { problem: p, .. } => format!("Unreadable {}", problem(p)),
        ReplyError::MalformedSuccess { problem: p, .. } => {
            format!("MalformedSuccess {}", problem(p))
        }
    }
}

/// The profiles replies are checked under: Intuit (the first-class target), a plain
/// RFC 6749 provider, GitHub (an `invalid_grant` alias) and a strict reuse-detecting
/// provider (a lost rotation cannot be retried).
pub fn profiles() -> &'static [ProviderProfile; 4] {
    static PROFILES: OnceLock<[ProviderProfile; 4]> = OnceLock::new();
    PROFILES.get_or_init(|| {
        [
            ProviderProfile::intuit(),
            ProviderProfile::generic("generic", "https://auth.example.invalid/token"),
            ProviderProfile::github_app(),
            ProviderProfile::strict_reuse_detecting("strict", "https://strict.example.invalid/t"),
        ]
    })
}

/// The profile a corpus file names with `# profile:` (default Intuit).
pub fn profile_named(name: Option<&str>) -> &'static ProviderProfile {
    let p = profiles();
    match name {
        None | Some("intuit") => &p[0],
        Some("generic") => &p[1],
        Some("github") => &p[2],
        Some("strict") => &p[3],
        Some(other) => panic!("unknown profile `{other}` in a reply file"),
    }
}

// ---------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Panics if `text` shows a harness secret.
pub fn assert_no_secret(what: &str, text: &str) {
    for secret in [SECRET_MARK, CLIENT_SECRET, BASIC_CREDENTIALS] {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

fn assert_token(field: &str, t: &str) {
    assert!(!t.is_empty(), "accepted an empty {field}");
    assert!(t.len() <= MAX_TOKEN_BYTES, "accepted an oversized {field}");
    assert!(
        t.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "accepted a {field} that is not VSCHAR"
    );
}

/// The `Retry-After` the parser read, against what the harness reads itself: digits
/// are seconds (capped at a day), a date is what the `httpdate` crate reads.
fn assert_retry_after(reply: &HttpResponse, parsed: &Option<RetryAfter>) {
    let header = reply.header("retry-after").map(str::trim);
    let expected = header.and_then(|h| {
        if !h.is_empty() && h.bytes().all(|b| b.is_ascii_digit()) {
            let secs = h.parse::<u64>().unwrap_or(u64::MAX);
            return Some(RetryAfter::Delay(
                Duration::from_secs(secs).min(MAX_RETRY_AFTER),
            ));
        }
        // httpdate does not check the space between the date and the time of the
        // RFC 850 form ("Sunday, 06-Nov-94:08:49:37 GMT" passes): the core does.
        let rfc850_time = h
            .split_once("day, ")
            .map(|(_, rest)| rest.as_bytes().get(9));
        if rfc850_time.is_some_and(|b| b != Some(&b' ')) {
            return None;
        }
        let at = httpdate::parse_http_date(h).ok()?;
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Some(RetryAfter::At(Timestamp::from_secs(secs)))
    });
    assert_eq!(*parsed, expected, "Retry-After {header:?}");
}

fn assert_lifetime(field: &str, d: Option<Duration>, max: Duration) {
    if let Some(d) = d {
        assert!(
            d > Duration::ZERO && d <= max && d.subsec_nanos() == 0,
            "accepted {field} = {d:?}"
        );
    }
}

fn assert_log_safe(field: &str, s: &str) {
    assert!(s.len() <= 200, "{field} not truncated: {} bytes", s.len());
    assert!(
        s.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "{field} carries unprintable characters: {s:?}"
    );
}

/// `parse_token_reply` and `parse_revoke_reply` on one reply under one profile:
/// never panics, and whatever comes out is consistent and checked.
pub fn check_parsed(
    profile: &ProviderProfile,
    reply: &HttpResponse,
) -> Result<TokenGrant, ReplyError> {
    let parsed = parse_token_reply(profile, reply);
    let status = reply.status;
    let success = (200..300).contains(&status);
    let server_trouble = status == 408 || (500..600).contains(&status);
    match &parsed {
        Ok(grant) => {
            assert!(success, "a grant from HTTP {status}");
            assert!(
                reply.body.len() <= MAX_REPLY_BYTES,
                "a grant from a huge body"
            );
            assert_token("access_token", grant.access.expose());
            if let Some(r) = &grant.refresh {
                assert_token("refresh_token", r.expose());
            }
            assert_lifetime("expires_in", grant.expires_in, MAX_ACCESS_TTL);
            assert_lifetime(
                "refresh_expires_in",
                grant.refresh_expires_in,
                MAX_REFRESH_TTL,
            );
            assert_lifetime("hard_expires_in", grant.hard_expires_in, MAX_REFRESH_TTL);
        }
        Err(err) => {
            match err {
                ReplyError::RateLimited { retry_after } => {
                    assert_eq!(status, 429);
                    assert_retry_after(reply, retry_after);
                }
                ReplyError::ServerError {
                    status: s,
                    retry_after,
                } => {
                    assert_eq!(*s, status);
                    assert!(server_trouble, "ServerError for HTTP {status}");
                    assert_retry_after(reply, retry_after);
                }
                ReplyError::Unauthorized { status: s } => {
                    assert_eq!((*s, status), (401, 401));
                    assert_eq!(err.failure_kind(), FailureKind::ClientRejected);
                }
                ReplyError::OAuth {
                    status: s,
                    code,
                    description,
                    kind,
                } => {
                    assert_eq!(*s, status);
                    assert!(status != 429 && !server_trouble, "OAuth for HTTP {status}");
                    assert_log_safe("code", code);
                    if let Some(d) = description {
                        assert_log_safe("description", d);
                    }
                    if *kind == OAuthErrorCode::InvalidGrant {
                        assert!(
                            code == "invalid_grant"
                                || profile.invalid_grant_aliases.iter().any(|a| a == code),
                            "InvalidGrant from code {code:?}"
                        );
                    }
                }
                ReplyError::Unreadable { status: s, .. } => {
                    assert_eq!(*s, status);
                    assert!(!success && status != 429 && !server_trouble);
                }
                ReplyError::MalformedSuccess { status: s, .. } => {
                    assert_eq!(*s, status);
                    assert!(success, "MalformedSuccess for HTTP {status}");
                }
            }
            let shown = format!("{err} / {err:?} / {}", err.failure_kind());
            if !contains(&reply.body, SECRET_MARK.as_bytes()) {
                assert_no_secret("a reply error", &shown);
            }
        }
    }
    match parse_revoke_reply(profile, reply) {
        Ok(true) => assert!(success, "revoked by HTTP {status}"),
        Ok(false) => assert!(
            !success
                && matches!(
                    parsed,
                    Err(ReplyError::OAuth {
                        kind: OAuthErrorCode::InvalidGrant,
                        ..
                    })
                ),
            "`unknown token` from a reply that is not invalid_grant"
        ),
        Err(e) => {
            assert!(!success, "revocation error for HTTP {status}");
            assert_eq!(
                Err(e),
                parsed.clone().map(|_| ()),
                "revoke and token disagree"
            );
        }
    }
    parsed
}

/// S9 as seen by one stored record: `after` keeps every token, the identity and the
/// deadlines of `before` (a status change is allowed).
pub fn assert_keeps_tokens(before: &ConnectionRecord, after: &ConnectionRecord) {
    let same = |what: &str, ok: bool| assert!(ok, "a rejected reply changed the stored {what}");
    same("refresh token", after.refresh == before.refresh);
    same("access token", after.access == before.access);
    same("identity", after.identity == before.identity);
    same("connection id", after.id == before.id);
    same("realm id", after.realm_id == before.realm_id);
    same(
        "refresh issue time",
        after.refresh_issued_at == before.refresh_issued_at,
    );
    same("idle deadline", after.idle_deadline == before.idle_deadline);
    same("hard deadline", after.hard_deadline == before.hard_deadline);
    same(
        "last refresh time",
        after.last_refreshed_at == before.last_refreshed_at,
    );
}

fn config(profile: &ProviderProfile, worker: &str, environment: Environment) -> Arc<Config> {
    Arc::new(Config {
        profile: profile.clone(),
        client: ClientCredentials {
            client_id: match environment {
                Environment::Production => CLIENT_ID.into(),
                Environment::Sandbox => SANDBOX_CLIENT_ID.into(),
            },
            client_secret: ClientSecret::new(CLIENT_SECRET),
            environment,
        },
        worker: WorkerId(worker.into()),
        settings: Settings::default(),
    })
}

fn connection_id() -> ConnectionId {
    ConnectionId("realm-4620816365".into())
}

/// The record stored before [`reply_in_flight`]: access token expired, refresh token
/// [`STORED_REFRESH`], generation 7.
pub fn stored_record(config: &Config, now: Timestamp) -> ConnectionRecord {
    ConnectionRecord {
        id: connection_id(),
        generation: Generation(7),
        identity: config.identity(),
        realm_id: Some("4620816365".into()),
        access: Some(AccessGrant {
            token: AccessToken::new(STORED_ACCESS),
            expires_at: now.saturating_sub(Duration::from_secs(60)),
        }),
        refresh: RefreshToken::new(STORED_REFRESH),
        refresh_issued_at: now.saturating_sub(hours(20)),
        idle_deadline: Some(now.saturating_add(days(90))),
        hard_deadline: Some(now.saturating_add(days(4 * 365))),
        in_doubt_since: None,
        in_doubt_holder: None,
        status: Status::Active,
        blocked_client: None,
        imported_at: None,
        last_refreshed_at: Some(now.saturating_sub(minutes(61))),
        updated_at: now.saturating_sub(minutes(61)),
    }
}

/// What [`reply_in_flight`] saw.
#[derive(Debug)]
pub struct InFlight {
    /// The record before the reply.
    pub before: ConnectionRecord,
    /// The record stored at the end.
    pub after: ConnectionRecord,
    /// Every output drained after the reply, in order.
    pub outputs: Vec<Output>,
    /// How the reply parsed.
    pub parsed: Result<TokenGrant, ReplyError>,
}

/// Drives a machine to the middle of a refresh (AccessRequested → Load → Loaded →
/// AcquireLease → LeaseGranted → Send, as in the lib.rs example), feeds `reply` as
/// `Input::Replied`, and plays a faithful store until the machine waits. Checks S5,
/// S6, S7, S9 and that no output shows a secret.
pub fn reply_in_flight(profile: &ProviderProfile, reply: HttpResponse) -> InFlight {
    let config = config(profile, "worker-1", Environment::Production);
    let now = T0;
    let before = stored_record(&config, now);
    let mut conn = Connection::new(connection_id(), config.clone(), 0x5eed);
    let expect = |conn: &mut Connection, what: &str| -> Output {
        let out = conn.poll_output();
        out.unwrap_or_else(|| panic!("expected {what}"))
    };
    conn.handle_input(now, Input::AccessRequested(RequestId(1)))
        .expect("a caller is always accepted");
    assert_eq!(expect(&mut conn, "Load"), Output::Load);
    conn.handle_input(now, Input::Loaded(Some(Box::new(before.clone()))))
        .expect("Loaded answers Load");
    let Output::AcquireLease { owner, ttl, .. } = expect(&mut conn, "AcquireLease") else {
        panic!("expected AcquireLease");
    };
    let mut lease = Lease {
        owner,
        acquired_at: now,
        expires_at: now.saturating_add(ttl),
        generation: Some(before.generation),
        request: LeaseRequestId(1),
    };
    conn.handle_input(
        now,
        Input::LeaseGranted {
            lease: lease.clone(),
            record: Some(Box::new(before.clone())),
            took_over: None,
        },
    )
    .expect("LeaseGranted answers AcquireLease");
    let Output::Send(request) = expect(&mut conn, "Send") else {
        panic!("expected Send");
    };
    check_send(&conn, &request);
    assert!(request
        .body
        .expose()
        .contains(&format!("refresh_token={STORED_REFRESH}")));
    assert_eq!(conn.poll_output(), None);

    let parsed = parse_token_reply(profile, &reply);
    // The access lifetime as the harness reads the body itself: a positive whole
    // number of seconds up to a year (or such a digit string), else the default.
    let granted_lifetime = serde_json::from_slice::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|body| match &body["expires_in"] {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) if s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
            _ => None,
        })
        .map(Duration::from_secs)
        .filter(|d| !d.is_zero() && *d <= MAX_ACCESS_TTL)
        .unwrap_or(profile.default_access_ttl);
    let reply_at = now.saturating_add(Duration::from_secs(1));
    conn.handle_input(reply_at, Input::Replied(reply))
        .expect("Replied answers Send");

    let mut store = before.clone();
    let mut outputs = Vec::new();
    let mut first_cas = true;
    for _ in 0..16 {
        let mut answer = None;
        while let Some(out) = conn.poll_output() {
            assert_no_secret("an output", &format!("{out:?}"));
            match &out {
                Output::CompareAndSwap {
                    expected, record, ..
                } => {
                    assert!(answer.is_none(), "two store commands outstanding");
                    assert_eq!(
                        *expected,
                        Some(store.generation),
                        "CAS on a stale generation"
                    );
                    invariants::generation_monotonic(store.generation, record.generation).unwrap();
                    match &parsed {
                        Err(_) => assert_keeps_tokens(&before, record),
                        Ok(grant) if first_cas => {
                            invariants::keeps_what_was_not_replaced(
                                &before, grant, record, profile, now,
                            )
                            .unwrap();
                            assert_eq!(
                                record.access.as_ref().map(|a| &a.token),
                                Some(&grant.access)
                            );
                        }
                        Ok(_) => {}
                    }
                    first_cas = false;
                    store = (**record).clone();
                    answer = Some(Input::Committed {
                        generation: record.generation,
                    });
                }
                Output::Load => {
                    assert!(answer.is_none(), "two store commands outstanding");
                    answer = Some(Input::Loaded(Some(Box::new(store.clone()))));
                }
                Output::AcquireLease {
                    owner,
                    ttl,
                    request,
                } => {
                    assert!(answer.is_none(), "two store commands outstanding");
                    lease = Lease {
                        owner: owner.clone(),
                        acquired_at: reply_at,
                        expires_at: reply_at.saturating_add(*ttl),
                        generation: Some(store.generation),
                        request: *request,
                    };
                    answer = Some(Input::LeaseGranted {
                        lease: lease.clone(),
                        record: Some(Box::new(store.clone())),
                        took_over: None,
                    });
                }
                Output::Send(request) => check_send(&conn, request),
                Output::Deliver {
                    result: Ok(token), ..
                } => {
                    let access = store.access.as_ref().filter(|a| a.token == *token);
                    let access = access.expect("served a token that is not the stored one");
                    invariants::fresh_serve(
                        store.generation,
                        access.expires_at,
                        reply_at,
                        config.settings.access_margin.min(granted_lifetime / 2),
                        store.generation,
                    )
                    .unwrap();
                }
                Output::Deliver { result: Err(e), .. } => {
                    assert_no_secret("an access error", &e.to_string());
                }
                Output::Event(_) | Output::ReleaseLease(_) => {}
            }
            outputs.push(out);
        }
        let Some(input) = answer else { break };
        conn.handle_input(reply_at, input)
            .expect("a faithful store answer is accepted");
    }
    if parsed.is_err() {
        assert_keeps_tokens(&before, &store);
        assert_no_secret("the connection", &format!("{conn:?}"));
    }
    InFlight {
        before,
        after: store,
        outputs,
        parsed,
    }
}

/// S7 on a request the machine asked to send: the record it is sent for (the
/// in-flight refresh base, or the record for a revocation) has this config's
/// identity, and the request is authenticated with this config's client.
fn check_send(conn: &Connection, request: &HttpRequest) {
    let record = conn
        .in_flight()
        .or(conn.record())
        .expect("a request without a record");
    invariants::right_credentials(conn.config(), record).unwrap();
    let client = &conn.config().client;
    let authenticated = request
        .header("authorization")
        .is_some_and(|h| h.starts_with("Basic "))
        || request
            .body
            .expose()
            .contains(client.client_secret.expose());
    assert!(authenticated, "request without client authentication");
    assert_no_secret("a request", &format!("{request:?}"));
}

/// Fuzz entry point 1: `data` in the reply-file format.
pub fn check_reply(data: &[u8]) {
    let case = parse_case(data);
    for profile in profiles() {
        let _ = check_parsed(profile, &case.response);
    }
    let profile = &profiles()[data.len() % profiles().len()];
    let _ = reply_in_flight(profile, case.response);
}

// ---------------------------------------------------------------------------
// Machine inputs
// ---------------------------------------------------------------------------

/// What a run of [`check_machine_stats`] reached: vacuity guards for the corpus.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Inputs fed.
    pub inputs: usize,
    /// Inputs refused with `InputError`.
    pub refused: usize,
    /// Refresh and revocation requests sent.
    pub sends: usize,
    /// Compare-and-swaps applied by the store.
    pub commits: usize,
    /// Compare-and-swaps that found another generation.
    pub conflicts: usize,
    /// Tokens served to callers.
    pub served: usize,
    /// `ReauthRequired` events.
    pub reauths: usize,
    /// `Refreshed` events with a rotated refresh token.
    pub rotations: usize,
    /// Rejected provider replies fed while a refresh was in flight.
    pub rejected_replies: usize,
    /// Callers refused because the record belongs to another identity (S7).
    pub identity_refusals: usize,
    /// `ReauthRequired(LostRotation)` events (each judged by S4 from the ghost).
    pub lost_rotations: usize,
    /// Lease requests or commits carried out whose answer was lost.
    pub lost_answers: usize,
}

#[derive(Debug, Clone)]
enum Pending {
    Load,
    Lease {
        owner: WorkerId,
        ttl: Duration,
        request: LeaseRequestId,
    },
    /// A compare-and-swap, with the lease release it carries.
    Cas(
        Option<Generation>,
        Box<ConnectionRecord>,
        Option<LeaseRelease>,
    ),
    /// A request sent: a refresh (S4's ghost tracks it) or a revocation.
    Send {
        sent_at: Timestamp,
        refresh: bool,
    },
}

struct Worker {
    conn: Connection,
    pending: Option<Pending>,
    /// Newest generation this worker has been shown.
    newest: Generation,
    /// Requests not yet answered.
    callers: BTreeSet<u64>,
    /// When the store granted this worker the lease it was last told of.
    lease_at: Option<Timestamp>,
    /// S4's ghost: this worker's refresh request not yet settled.
    ghost: SenderGhost,
    /// The access token this worker served last (what a 401 is reported for).
    served: Option<AccessToken>,
    /// Tokens its callers reported refused by the API, and whether a provider
    /// reply fed after the report carried the token again (R1 then allows it).
    refused: Vec<(AccessToken, bool)>,
}

/// A deliberately broken store, to show that the checks bite (never fuzzed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMutant {
    /// B1: every compare-and-swap lands, whatever generation is stored.
    WriteUnconditionally,
}

/// What the fuzz world's provider is known to have done (ghost state for S4): the
/// replies are arbitrary, so a token counts as rejected once a reply read as
/// `invalid_grant` answered a refresh presenting it, or another process wrote
/// the record dead. Nothing else is known, so nothing else is claimed.
struct FuzzTruth<'a> {
    rejected: &'a BTreeSet<String>,
}

impl ProviderTruth for FuzzTruth<'_> {
    fn accepts(&self, token: &RefreshToken) -> bool {
        !self.rejected.contains(token.expose())
    }
    fn ended_by_provider(&self) -> bool {
        false
    }
    fn replayed_outside_grace(&self) -> bool {
        false
    }
    fn successor_lost(&self, _: &RefreshToken) -> bool {
        false
    }
}

struct World<'a> {
    bytes: &'a [u8],
    pos: usize,
    now: Timestamp,
    profile: ProviderProfile,
    store: Option<ConnectionRecord>,
    /// The lease row, as `tokenfence_core::lease` keeps it.
    lease: Option<LeaseSlot>,
    /// The generation stored after the last write (S1: never decreases).
    last_generation: Option<Generation>,
    mutant: Option<StoreMutant>,
    /// Tokens the provider is known to reject (S4's truth).
    rejected: BTreeSet<String>,
    /// S4's ghost at connection level: refresh requests sent whose outcome will
    /// never reach the store.
    unsettled: Vec<Unsettled>,
    /// Leases of another owner taken over with nothing committed since their grant
    /// (nobody can know whether a request was sent under them): S4 only, the rule
    /// of the model checker and the simulator.
    taken_over: Vec<Unsettled>,
    /// The owner of the row the last lease grant replaced: a chain the store
    /// reports under the requester's own name (its earlier row, which another
    /// worker's row displaced since) still holds another worker's lease.
    replaced_owner: Option<WorkerId>,
    /// Every record the store has held.
    history: Vec<ConnectionRecord>,
    /// Tokens a provider reply that parsed, or an authorization, handed out.
    issued: BTreeSet<String>,
    workers: Vec<Worker>,
    minted: u64,
    next_request: u64,
    stats: Stats,
}

pub const STEPS: [Duration; 12] = [
    Duration::ZERO,
    Duration::from_millis(400),
    Duration::from_secs(5),
    Duration::from_secs(31),
    Duration::from_secs(61),
    minutes(5),
    minutes(56),
    hours(1),
    hours(25),
    days(31),
    days(71),
    days(2 * 365),
];

const STATUSES: [u16; 16] = [
    200, 201, 204, 301, 400, 401, 403, 404, 408, 429, 500, 502, 503, 100, 0, 999,
];

/// `tokenfence_core::lease::release` for the one row.
fn release(row: &mut Option<LeaseSlot>, release: &LeaseRelease) {
    let LeaseRelease {
        owner,
        request,
        restore,
    } = release;
    if let Some(left) = lease::release(row.as_ref(), owner, *request, *restore) {
        *row = left;
    }
}

impl World<'_> {
    /// `tokenfence_core::lease::acquire` for the one row.
    fn acquire_lease(&mut self, owner: &WorkerId, request: LeaseRequestId, ttl: Duration) -> Input {
        let generation = self.store.as_ref().map(|r| r.generation);
        match lease::acquire(
            self.lease.as_ref(),
            owner,
            request,
            generation,
            self.now,
            ttl,
        ) {
            lease::Acquired::Held(holder) => Input::LeaseHeld { holder },
            lease::Acquired::Granted { slot, took_over } => {
                let lease = slot.lease.clone();
                self.replaced_owner = self.lease.as_ref().map(|s| s.lease.owner.clone());
                self.lease = Some(slot);
                Input::LeaseGranted {
                    lease,
                    record: self.store.clone().map(Box::new),
                    took_over,
                }
            }
        }
    }

    /// S1 at every write that lands, apart from any equality check of the store:
    /// derived from `base`, it lands on `stored`, and the generation goes up.
    fn landed(&mut self, base: Option<Generation>, stored: Option<Generation>, now: Generation) {
        if let Err(v) = invariants::commit_on_current(base, stored) {
            panic!("{v}");
        }
        if let Some(last) = self.last_generation.or(stored) {
            if let Err(v) = invariants::generation_monotonic(last, now) {
                panic!("{v}");
            }
        }
        self.last_generation = Some(now);
    }

    /// Keeps a request whose outcome will never reach the store (S4's ghost).
    fn keep(&mut self, u: Option<Unsettled>) {
        invariants::keep_unsettled(&mut self.unsettled, u);
    }

    /// S4 on the stored record, judged from the ghost: the tokens the provider
    /// rejected and the refresh requests really sent and never settled, never the
    /// doubt the core recorded.
    fn check_reauth(&self) {
        let Some(stored) = &self.store else {
            return;
        };
        let truth = FuzzTruth {
            rejected: &self.rejected,
        };
        let senders = self.workers.iter().filter_map(|w| w.ghost.unsettled());
        let safety = Settings::default().in_doubt_safety;
        if let Err(v) = invariants::sound_reauth_within(
            stored,
            &self.profile,
            safety,
            &truth,
            self.unsettled.iter().chain(&self.taken_over).chain(senders),
        ) {
            let senders: Vec<_> = self.workers.iter().map(|w| w.ghost.unsettled()).collect();
            panic!(
                "{v}: stored {stored:?}, unsettled {:?} + {senders:?}, taken over {:?}",
                self.unsettled, self.taken_over
            );
        }
    }

    fn byte(&mut self) -> Option<u8> {
        let b = self.bytes.get(self.pos).copied();
        self.pos += 1;
        b
    }

    fn mint(&mut self) -> u64 {
        self.minted += 1;
        self.minted
    }

    fn record(&self, config: &Config, variant: u8) -> ConnectionRecord {
        let now = self.now;
        let mut r = ConnectionRecord {
            id: connection_id(),
            generation: Generation(3),
            identity: config.identity(),
            realm_id: Some("4620816365".into()),
            access: Some(AccessGrant {
                token: AccessToken::new("atSECRET-0"),
                expires_at: now.saturating_sub(Duration::from_secs(1)),
            }),
            refresh: RefreshToken::new("rtSECRET-0"),
            refresh_issued_at: now.saturating_sub(hours(3)),
            idle_deadline: self.profile.idle_window.map(|d| now.saturating_add(d)),
            hard_deadline: self.profile.hard_lifetime.map(|d| now.saturating_add(d)),
            in_doubt_since: None,
            in_doubt_holder: None,
            status: Status::Active,
            blocked_client: None,
            imported_at: None,
            last_refreshed_at: None,
            updated_at: now,
        };
        match variant {
            2 => {
                if let Some(a) = r.access.as_mut() {
                    a.expires_at = now.saturating_add(minutes(50));
                }
            }
            3 => {
                r.status = Status::Degraded {
                    failures: 2,
                    retry_at: now.saturating_add(Duration::from_secs(3)),
                    last: FailureKind::ServerError(503),
                }
            }
            4 => {
                r.status = Status::ReauthRequired {
                    reason: ReauthReason::InvalidGrant,
                    since: now,
                }
            }
            5 => r.in_doubt_since = Some(now.saturating_sub(minutes(30))),
            6 => {
                r.identity.environment = Environment::Sandbox;
                r.identity.client_id = SANDBOX_CLIENT_ID.into();
            }
            7 => {
                r.idle_deadline = Some(now.saturating_add(days(2)));
                r.hard_deadline = Some(now.saturating_add(days(20)));
            }
            _ => {}
        }
        r
    }
}

/// Fuzz entry point 2: `data` decoded into a run of inputs (see [`check_machine_stats`]).
pub fn check_machine(data: &[u8]) {
    let _ = check_machine_stats(data);
}

/// Decodes `data` and runs it, checking the invariants after every input.
///
/// Byte 0 picks the profile (`% 4`: Intuit, Xero, GitHub, strict reuse detection);
/// byte 1 sets up the world: bit 0 a second worker, bit 1 that worker configured for
/// the sandbox (another identity), bits 2..5 the initial record (0 none, 1 expired
/// access, 2 valid access, 3 degraded, 4 re-auth required, 5 in doubt, 6 sandbox
/// identity, 7 near its idle and hard deadlines). Then each byte is one operation on
/// worker `(op / 16) % workers`, `op % 16` saying which (`+n`: argument bytes read):
///
/// | op | what |
/// |---|---|
/// | 0 | a caller asks for a token |
/// | 1 (+1) | a caller asks for a token (even), or reports a 401 for the token this worker served last (odd) |
/// | 2 | the store answers the outstanding store command faithfully |
/// | 3 | `Maintain` (a scheduler's keep-alive nudge) |
/// | 4 | `StoreFailed` |
/// | 5, 6 (+1..) | a provider reply: `% 8` rotating, no refresh token, echoed refresh token, invalid_grant, HTML 503, 429 (+1: Retry-After / 7), invalid_client, arbitrary (+1 status index, +1 length, + that many body bytes) |
/// | 7 (+1) | `NotSent` (even) or `OutcomeUnknown` (odd) |
/// | 8 | time jumps to `poll_timeout()` (if later), then `Timeout` |
/// | 9 (+1) | time advances by one of [`STEPS`] |
/// | 10 | `StoreChanged` |
/// | 11 (+1, +1) | another process writes the store directly: `% 5` rotation, re-auth, disconnect, a no-op commit, or takes the lease (+1: seconds) |
/// | 12 | `Disconnect` |
/// | 13 (+1) | `Authorized` with fresh tokens (without a refresh token if `% 4 == 0`) |
/// | 14 (+1) | a driver bug: an input the machine is not waiting for |
/// | 15 (+1) | the store answers a `Load` with an older record (a lagging replica); a lease request or a compare-and-swap it carries out, but the answer is lost (`StoreFailed`) |
///
/// Inputs that do not match the outstanding command are fed anyway: the machine
/// must refuse them and change nothing.
///
/// The store keeps leases as `tokenfence_core::lease` says (request ids, the displaced
/// row, release with restore). After every operation, S4 is judged from ghost
/// state: the refresh requests really sent whose outcome never reached the store,
/// and the tokens a reply or another process showed rejected.
pub fn check_machine_stats(data: &[u8]) -> Stats {
    run_machine(data, None)
}

/// [`check_machine_stats`] with a broken store, to show that the checks bite.
pub fn check_machine_mutant(data: &[u8], mutant: StoreMutant) -> Stats {
    run_machine(data, Some(mutant))
}

fn run_machine(data: &[u8], mutant: Option<StoreMutant>) -> Stats {
    let mut w = World {
        bytes: data,
        pos: 0,
        now: T0,
        profile: ProviderProfile::intuit(),
        store: None,
        lease: None,
        last_generation: None,
        mutant,
        rejected: BTreeSet::new(),
        unsettled: Vec::new(),
        taken_over: Vec::new(),
        replaced_owner: None,
        history: Vec::new(),
        issued: BTreeSet::new(),
        workers: Vec::new(),
        minted: 0,
        next_request: 0,
        stats: Stats::default(),
    };
    let p = w.byte().unwrap_or(0);
    w.profile = match p % 4 {
        0 => ProviderProfile::intuit(),
        1 => ProviderProfile::xero(),
        2 => ProviderProfile::github_app(),
        _ => ProviderProfile::strict_reuse_detecting("strict", "https://strict.example.invalid/t"),
    };
    let setup = w.byte().unwrap_or(0);
    let c1 = config(&w.profile, "worker-1", Environment::Production);
    let mut configs = vec![c1.clone()];
    if setup & 1 == 1 {
        let env = if setup & 2 == 2 {
            Environment::Sandbox
        } else {
            Environment::Production
        };
        configs.push(config(&w.profile, "worker-2", env));
    }
    let variant = (setup >> 2) & 7;
    if variant != 0 {
        let r = w.record(&c1, variant);
        w.issued.insert(r.refresh.expose().to_string());
        // What came before the run: a re-auth flag means the provider rejected
        // the token; a doubt means a process sent it and never learnt the outcome.
        if matches!(r.status, Status::ReauthRequired { .. }) {
            w.rejected.insert(r.refresh.expose().to_string());
        }
        if let Some(since) = r.in_doubt_since {
            w.unsettled.push(Unsettled {
                token: r.refresh.clone(),
                lease_at: since,
                generation: Some(r.generation),
            });
        }
        w.last_generation = Some(r.generation);
        w.history.push(r.clone());
        w.store = Some(r);
    }
    for (i, c) in configs.into_iter().enumerate() {
        w.workers.push(Worker {
            conn: Connection::new(connection_id(), c, 0x9e37_79b9 ^ i as u64),
            pending: None,
            newest: Generation(0),
            callers: BTreeSet::new(),
            lease_at: None,
            ghost: SenderGhost::default(),
            served: None,
            refused: Vec::new(),
        });
    }
    for _ in 0..400 {
        let Some(op) = w.byte() else { break };
        let i = usize::from(op / 16) % w.workers.len();
        step(&mut w, i, op % 16);
        w.check_reauth();
    }
    w.stats
}

fn step(w: &mut World<'_>, i: usize, op: u8) {
    match op {
        0 | 1 => {
            w.next_request += 1;
            let id = w.next_request;
            w.workers[i].callers.insert(id);
            let report = op == 1 && w.byte().unwrap_or(0) % 2 == 1;
            match w.workers[i].served.clone().filter(|_| report) {
                Some(token) => {
                    w.workers[i].refused.push((token.clone(), false));
                    let request = RequestId(id);
                    feed(w, i, Input::Rejected { request, token });
                }
                None => feed(w, i, Input::AccessRequested(RequestId(id))),
            }
        }
        2 => answer_store(w, i, false),
        3 => feed(w, i, Input::Maintain),
        4 => feed(w, i, Input::StoreFailed),
        5 | 6 => {
            let reply = provider_reply(w, i);
            // A token the provider issues again after a report may be served.
            for (token, reissued) in &mut w.workers[i].refused {
                let body = String::from_utf8_lossy(&reply.body);
                *reissued |= body.contains(token.expose());
            }
            feed(w, i, Input::Replied(reply));
        }
        7 => {
            let input = if w.byte().unwrap_or(0) % 2 == 0 {
                Input::NotSent
            } else {
                Input::OutcomeUnknown
            };
            feed(w, i, input);
        }
        8 => {
            if let Some(t) = w.workers[i].conn.poll_timeout() {
                w.now = w.now.max(t);
            }
            feed(w, i, Input::Timeout);
        }
        9 => {
            let k = usize::from(w.byte().unwrap_or(0)) % STEPS.len();
            w.now = w.now.saturating_add(STEPS[k]);
        }
        10 => feed(w, i, Input::StoreChanged),
        11 => foreign_writer(w),
        12 => feed(w, i, Input::Disconnect),
        13 => {
            let n = w.mint();
            let keep_refresh = w.byte().unwrap_or(0) % 4 != 0;
            let grant = TokenGrant {
                access: AccessToken::new(format!("atSECRET-{n}")),
                refresh: keep_refresh.then(|| RefreshToken::new(format!("rtSECRET-{n}"))),
                expires_in: Some(hours(1)),
                refresh_expires_in: Some(days(100)),
                hard_expires_in: None,
                ignored: Vec::new(),
            };
            w.issued.insert(format!("atSECRET-{n}"));
            w.issued.insert(format!("rtSECRET-{n}"));
            feed(
                w,
                i,
                Input::Authorized {
                    grant,
                    realm_id: Some("4620816365".into()),
                },
            );
        }
        14 => driver_bug(w, i),
        _ => answer_store(w, i, true),
    }
}

/// Another process writes the record directly (a rotation it did, a re-auth it
/// declared, a disconnect), or takes the lease, bypassing this world's workers.
fn foreign_writer(w: &mut World<'_>) {
    let what = w.byte().unwrap_or(0) % 5;
    if what == 4 {
        // Through the store's lease protocol, as any process must.
        let secs = u64::from(w.byte().unwrap_or(0));
        let n = w.mint();
        let owner = WorkerId("worker-elsewhere".into());
        let _ = w.acquire_lease(&owner, LeaseRequestId(n), Duration::from_secs(secs));
        return;
    }
    let Some(current) = w.store.clone() else {
        return;
    };
    let n = w.mint();
    let now = w.now;
    let mut next = ConnectionRecord {
        generation: current.generation.next(),
        updated_at: now,
        ..current.clone()
    };
    match what {
        0 => {
            next.access = Some(AccessGrant {
                token: AccessToken::new(format!("atSECRET-x{n}")),
                expires_at: now.saturating_add(hours(1)),
            });
            next.refresh = RefreshToken::new(format!("rtSECRET-x{n}"));
            next.refresh_issued_at = now;
            // Tokens another process stores without a refresh of its own (a
            // connect, an import) carry no refresh time; keeping the old one would
            // date new tokens from an exchange that did not produce them, which no
            // writer of this crate does (found by the fuzzer:
            // `s4-stale-refresh-time-268b615b`).
            next.last_refreshed_at = None;
            next.status = Status::Active;
            next.in_doubt_since = None;
            next.in_doubt_holder = None;
            w.issued.insert(format!("atSECRET-x{n}"));
            w.issued.insert(format!("rtSECRET-x{n}"));
        }
        1 => {
            // It was told invalid_grant for the stored token.
            w.rejected.insert(next.refresh.expose().to_string());
            next.status = Status::ReauthRequired {
                reason: ReauthReason::InvalidGrant,
                since: now,
            }
        }
        2 => next.status = Status::Disconnected { at: now },
        _ => {}
    }
    w.landed(
        Some(current.generation),
        Some(current.generation),
        next.generation,
    );
    w.history.push(next.clone());
    w.store = Some(next);
}

fn provider_reply(w: &mut World<'_>, i: usize) -> HttpResponse {
    let kind = w.byte().unwrap_or(0);
    let n = w.mint();
    let base_refresh = w.workers[i]
        .conn
        .in_flight()
        .map(|r| r.refresh.expose().to_string());
    let json = |status: u16, body: String| HttpResponse {
        status,
        headers: vec![("intuit_tid".into(), format!("1-fuzz-{n}"))],
        body: body.into_bytes(),
    };
    match kind % 8 {
        0 => json(
            200,
            format!(
                r#"{{"access_token":"atSECRET-{n}","refresh_token":"rtSECRET-{n}","token_type":"bearer","expires_in":3600,"x_refresh_token_expires_in":8726400}}"#
            ),
        ),
        1 => json(
            200,
            format!(
                r#"{{"access_token":"atSECRET-{n}","token_type":"Bearer","expires_in":"1800"}}"#
            ),
        ),
        2 => {
            let echo =
                base_refresh.map_or_else(String::new, |r| format!(r#""refresh_token":"{r}","#));
            json(
                200,
                format!(r#"{{"access_token":"atSECRET-{n}",{echo}"token_type":"bearer"}}"#),
            )
        }
        3 => json(
            400,
            r#"{"error_description":"Incorrect or invalid refresh token","error":"invalid_grant"}"#
                .into(),
        ),
        4 => HttpResponse {
            status: 503,
            headers: vec![("content-type".into(), "text/html".into())],
            body: b"<html><body><h1>503 Service Unavailable</h1></body></html>".to_vec(),
        },
        5 => {
            let secs = w.byte().unwrap_or(0);
            HttpResponse {
                status: 429,
                headers: vec![("Retry-After".into(), (u32::from(secs) * 7).to_string())],
                body: Vec::new(),
            }
        }
        6 => json(401, r#"{"error":"invalid_client"}"#.into()),
        _ => {
            let status = STATUSES[usize::from(w.byte().unwrap_or(0)) % STATUSES.len()];
            let len = usize::from(w.byte().unwrap_or(0));
            let start = w.pos.min(w.bytes.len());
            let end = (start + len).min(w.bytes.len());
            let body = w.bytes[start..end].to_vec();
            w.pos = end;
            HttpResponse {
                status,
                headers: Vec::new(),
                body,
            }
        }
    }
}

/// The store's answer to worker `i`'s outstanding store command, if any. `stale`:
/// answer a `Load` with an older record of the same identity (a lagging replica),
/// and carry out a lease request or a compare-and-swap but lose its answer
/// (`StoreFailed`).
fn answer_store(w: &mut World<'_>, i: usize, stale: bool) {
    let Some(pending) = w.workers[i].pending.clone() else {
        return;
    };
    let lost = stale && !matches!(pending, Pending::Load);
    let input = match pending {
        Pending::Load => {
            let pick = if stale { w.byte().unwrap_or(0) } else { 0 };
            let current = w.store.clone();
            let old = current.as_ref().and_then(|c| {
                let same: Vec<&ConnectionRecord> = w
                    .history
                    .iter()
                    .filter(|r| r.identity == c.identity)
                    .collect();
                same.get(usize::from(pick) % same.len().max(1))
                    .copied()
                    .cloned()
            });
            let record = if stale { old.or(current) } else { current };
            Input::Loaded(record.map(Box::new))
        }
        Pending::Lease {
            owner,
            ttl,
            request,
        } => w.acquire_lease(&owner, request, ttl),
        Pending::Cas(expected, record, release) => {
            let stored = w.store.as_ref().map(|r| r.generation);
            let lands = w.mutant == Some(StoreMutant::WriteUnconditionally) || stored == expected;
            if lands {
                // S1 where it can fail: whatever made the store accept it, the
                // commit's base (the machine's `expected`) is the generation stored.
                w.landed(expected, stored, record.generation);
                for token in [
                    Some(record.refresh.expose()),
                    record.access.as_ref().map(|a| a.token.expose()),
                ]
                .into_iter()
                .flatten()
                {
                    let known = w.issued.contains(token)
                        || w.history.iter().any(|h| {
                            h.refresh.expose() == token
                                || h.access.as_ref().is_some_and(|a| a.token.expose() == token)
                        });
                    assert!(known, "a commit stores a token no provider reply issued");
                }
                w.stats.commits += 1;
                let generation = record.generation;
                w.history.push((*record).clone());
                w.store = Some(*record);
                // The release goes with the swap, atomically.
                if let Some(r) = release {
                    self::release(&mut w.lease, &r);
                }
                Input::Committed { generation }
            } else {
                w.stats.conflicts += 1;
                Input::Conflict {
                    current: w.store.clone().map(Box::new),
                }
            }
        }
        Pending::Send { .. } => return,
    };
    if lost {
        w.stats.lost_answers += 1;
        feed(w, i, Input::StoreFailed);
    } else {
        feed(w, i, input);
    }
}

/// Feeds worker `i` an input it is NOT waiting for: it must refuse it and change
/// nothing at all.
fn driver_bug(w: &mut World<'_>, i: usize) {
    let pick = usize::from(w.byte().unwrap_or(0));
    let record = w.store.clone().map(Box::new);
    let lease = Lease {
        owner: w.workers[i].conn.config().worker.clone(),
        acquired_at: w.now,
        expires_at: w.now.saturating_add(Duration::from_secs(60)),
        generation: None,
        request: LeaseRequestId(1),
    };
    let candidates: Vec<Input> = match w.workers[i].pending {
        // Idle, waiting, or retrying a commit later: no answer is expected.
        None => vec![
            Input::Loaded(record),
            Input::Committed {
                generation: Generation(99),
            },
            Input::Replied(HttpResponse::default()),
            Input::OutcomeUnknown,
            Input::LeaseHeld { holder: lease },
            Input::StoreFailed,
        ],
        Some(Pending::Load) => vec![
            Input::Committed {
                generation: Generation(99),
            },
            Input::Conflict { current: record },
            Input::NotSent,
            Input::LeaseGranted {
                lease,
                record: None,
                took_over: None,
            },
        ],
        Some(Pending::Lease { .. }) => vec![
            Input::Loaded(record),
            Input::Committed {
                generation: Generation(99),
            },
            Input::Replied(HttpResponse::default()),
        ],
        Some(Pending::Cas(..)) => vec![
            Input::Loaded(record),
            Input::OutcomeUnknown,
            Input::LeaseHeld { holder: lease },
        ],
        Some(Pending::Send { .. }) => vec![
            Input::Loaded(record),
            Input::Conflict { current: None },
            Input::StoreFailed,
            Input::LeaseGranted {
                lease,
                record: None,
                took_over: None,
            },
        ],
    };
    let input = candidates[pick % candidates.len()].clone();
    let before = w.workers[i].conn.clone();
    let result = w.workers[i].conn.handle_input(w.now, input);
    w.stats.inputs += 1;
    let err = result.expect_err("an input nobody asked for was accepted");
    w.stats.refused += 1;
    assert_no_secret("an input error", &format!("{err} {err:?}"));
    assert!(
        w.workers[i].conn == before,
        "a refused input changed the machine"
    );
    assert_eq!(w.workers[i].conn.poll_output(), None);
}

/// Feeds one input to worker `i`, then drains and checks its outputs.
fn feed(w: &mut World<'_>, i: usize, input: Input) {
    let now = w.now;
    let profile = &w.profile;
    let worker = &mut w.workers[i];
    // Record the generations the worker is shown (S5's "newest seen").
    match &input {
        Input::Loaded(Some(r)) | Input::Conflict { current: Some(r) } => {
            worker.newest = worker.newest.max(r.generation)
        }
        Input::LeaseGranted {
            record: Some(r), ..
        } => worker.newest = worker.newest.max(r.generation),
        Input::Committed { generation } => worker.newest = worker.newest.max(*generation),
        _ => {}
    }
    // S9 for provider replies: what the reply parses to, and the refresh base.
    let base = worker.conn.in_flight().cloned();
    let sent_at = match worker.pending {
        Some(Pending::Send { sent_at, .. }) => Some(sent_at),
        _ => None,
    };
    let reply = match (&input, &base) {
        (Input::Replied(r), Some(_)) => Some(parse_token_reply(profile, r)),
        _ => None,
    };
    // S4's truth: a reply read as invalid_grant shows the presented token rejected.
    if let (
        Some(Err(ReplyError::OAuth {
            kind: OAuthErrorCode::InvalidGrant,
            ..
        })),
        Some(b),
    ) = (&reply, &base)
    {
        w.rejected.insert(b.refresh.expose().to_string());
    }
    if let Some(Ok(grant)) = &reply {
        w.issued.insert(grant.access.expose().to_string());
        if let Some(r) = &grant.refresh {
            w.issued.insert(r.expose().to_string());
        }
    }
    if matches!(reply, Some(Err(_))) {
        w.stats.rejected_replies += 1;
    }
    let worker = &mut w.workers[i];
    // Whether this input answers the outstanding command.
    let answers = matches!(
        (&input, &worker.pending),
        (
            Input::Replied(_) | Input::NotSent | Input::OutcomeUnknown,
            Some(Pending::Send { .. }),
        ) | (Input::Loaded(_) | Input::StoreFailed, Some(Pending::Load))
            | (
                Input::LeaseGranted { .. } | Input::LeaseHeld { .. } | Input::StoreFailed,
                Some(Pending::Lease { .. }),
            )
            | (
                Input::Committed { .. } | Input::Conflict { .. } | Input::StoreFailed,
                Some(Pending::Cas(..)),
            )
    );
    // S4's ghost: the answer to a refresh request, seen or not (a reply the
    // machine cannot read as a definite outcome, a lost one); the lease it holds.
    let refresh_answer =
        answers && matches!(worker.pending, Some(Pending::Send { refresh: true, .. }));
    let seen = match &input {
        Input::NotSent => true,
        Input::Replied(_) => !matches!(
            reply,
            Some(Err(
                ReplyError::MalformedSuccess { .. } | ReplyError::ServerError { status: 504, .. }
            ))
        ),
        _ => false,
    };
    let committed = answers && matches!(input, Input::Committed { .. });
    if let (
        true,
        Input::LeaseGranted {
            lease,
            record,
            took_over,
        },
    ) = (answers, &input)
    {
        worker.lease_at = Some(lease.acquired_at);
        let me = &worker.conn.config().worker;
        let late = worker.conn.config().settings.in_doubt_safety;
        // Another worker's lease, even when the store reports the chain it heads
        // under our own earlier row (found by the fuzzer:
        // `s4-stale-refresh-time-268b615b`).
        let others = w.replaced_owner.as_ref().is_some_and(|o| o != me);
        let forced = took_over
            .as_ref()
            .filter(|l| l.owner != *me || others)
            .and_then(|l| Unsettled::taken_over(l, record.as_deref(), late));
        invariants::keep_unsettled(&mut w.taken_over, forced);
    }
    let worker = &mut w.workers[i];
    let before = worker.conn.clone();
    w.stats.inputs += 1;
    let result = worker.conn.handle_input(now, input);
    if answers {
        assert!(
            result.is_ok(),
            "the answer to an outstanding command was refused"
        );
        worker.pending = None;
    }
    if refresh_answer {
        let unseen = worker.ghost.answered(seen);
        invariants::keep_unsettled(&mut w.unsettled, unseen);
    }
    if committed {
        worker.ghost.settle();
    }
    if let Err(err) = result {
        w.stats.refused += 1;
        invariants::unchanged_by_bad_input(before.record(), worker.conn.record()).unwrap();
        assert!(worker.conn == before, "a refused input changed the machine");
        assert_no_secret("an input error", &format!("{err} {err:?}"));
        assert_eq!(worker.conn.poll_output(), None);
        return;
    }
    let mut first_cas = true;
    while let Some(out) = worker.conn.poll_output() {
        assert_no_secret("an output", &format!("{out:?}"));
        match out {
            Output::Load => {
                assert!(worker.pending.is_none(), "two commands outstanding");
                worker.pending = Some(Pending::Load);
            }
            Output::AcquireLease {
                owner,
                ttl,
                request,
            } => {
                assert!(worker.pending.is_none(), "two commands outstanding");
                assert_eq!(owner, worker.conn.config().worker);
                worker.pending = Some(Pending::Lease {
                    owner,
                    ttl,
                    request,
                });
            }
            Output::CompareAndSwap {
                expected,
                record,
                release,
            } => {
                assert!(worker.pending.is_none(), "two commands outstanding");
                assert_eq!(
                    expected,
                    worker.conn.record().map(|r| r.generation),
                    "CAS not derived from the newest record the worker holds"
                );
                assert_eq!(
                    record.generation,
                    expected.map_or(Generation(0), Generation::next)
                );
                assert_eq!(record.id, *worker.conn.id());
                if let (Some(base), Some(parsed)) = (&base, &reply) {
                    match parsed {
                        Err(_) => assert_keeps_tokens(base, &record),
                        Ok(grant) if first_cas => {
                            let sent_at = sent_at.expect("a reply without a send");
                            invariants::keeps_what_was_not_replaced(
                                base, grant, &record, profile, sent_at,
                            )
                            .unwrap();
                        }
                        Ok(_) => {}
                    }
                }
                first_cas = false;
                worker.pending = Some(Pending::Cas(expected, record, release));
            }
            Output::Send(request) => {
                assert!(worker.pending.is_none(), "two commands outstanding");
                check_send(&worker.conn, &request);
                if let Some(base) = worker.conn.in_flight() {
                    let body = request.body.expose();
                    assert!(
                        body.contains(&format!("refresh_token={}", base.refresh.expose())),
                        "a refresh presenting another token than its base"
                    );
                }
                w.stats.sends += 1;
                let refresh = worker.conn.in_flight().cloned();
                worker.pending = Some(Pending::Send {
                    sent_at: now,
                    refresh: refresh.is_some(),
                });
                if let Some(base) = refresh {
                    let lease_at = worker.lease_at.expect("a refresh sent without a lease");
                    let stored = w.store.as_ref().map(|r| r.generation);
                    let earlier = worker.ghost.sent(base.refresh, lease_at, stored);
                    invariants::keep_unsettled(&mut w.unsettled, earlier);
                }
            }
            Output::ReleaseLease(r) => release(&mut w.lease, &r),
            Output::Deliver { request, result } => {
                assert!(
                    worker.callers.remove(&request.0),
                    "answered a caller twice, or one that never asked"
                );
                match result {
                    Ok(token) => {
                        w.stats.served += 1;
                        check_serve(&before, &worker.conn, &token, now, worker.newest);
                        let refused = worker.refused.iter().filter(|(_, again)| !again);
                        invariants::refused_not_served(&token, refused.map(|(t, _)| t), false)
                            .expect("R1");
                        worker.served = Some(token);
                    }
                    Err(e) => {
                        if matches!(e, AccessError::Config(ConfigError::IdentityMismatch { .. })) {
                            w.stats.identity_refusals += 1;
                        }
                        assert_no_secret("an access error", &e.to_string());
                    }
                }
            }
            Output::Event(event) => match event {
                Event::ReauthRequired { reason } => {
                    w.stats.reauths += 1;
                    if reason == ReauthReason::LostRotation {
                        w.stats.lost_rotations += 1;
                    }
                }
                Event::Refreshed { rotated: true, .. } => w.stats.rotations += 1,
                _ => {}
            },
        }
    }
    if !w.workers[i].conn.is_busy() {
        w.workers[i].ghost.settle();
    }
    if let (Some(r), Some(stored)) = (w.workers[i].conn.record(), &w.store) {
        assert!(
            r.generation <= stored.generation,
            "a worker believes a generation the store never had"
        );
    }
    if let Some(r) = w.workers[i].conn.record() {
        assert!(
            w.history.contains(r),
            "a worker believes a record the store never held"
        );
    }
}

/// S5 on a served token: find the record it came from (the worker's record before or
/// after the input, or fresh tokens it could not store yet) and check it.
fn check_serve(
    before: &Connection,
    after: &Connection,
    token: &AccessToken,
    now: Timestamp,
    newest: Generation,
) {
    let margin = after.config().settings.access_margin;
    let source = [after.record(), after.uncommitted(), before.record()]
        .into_iter()
        .flatten()
        .find_map(|r| {
            r.access
                .as_ref()
                .filter(|a| a.token == *token)
                .map(|a| (r.generation, a.expires_at))
        });
    let (served, expires_at) = source.expect("served a token of no record the worker holds");
    invariants::fresh_serve(served, expires_at, now, margin, newest).unwrap();
}
