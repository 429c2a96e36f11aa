//! S9 "Bad input changes nothing" over the hostile-reply corpus in
//! `core/tests/replies/` (format: `core/tests/replies/README.md`), plus replies too
//! big to check in, generated here.
//!
//! For every reply: `parse_token_reply` returns the typed error the file's
//! `# expect:` line names, never panics; fed as `Input::Replied` to a machine in the
//! middle of a refresh, every compare-and-swap it then makes keeps the stored tokens,
//! identity and deadlines; and no secret shows in any error or output.

mod fuzz_harness;

use fuzz_harness::{
    assert_no_secret, check_parsed, check_reply, describe_parsed, parse_case, profile_named,
    profiles, reply_in_flight, InFlight, CLIENT_SECRET, STORED_REFRESH, T0,
};
use std::path::PathBuf;
use tokenfence_core::*;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/replies");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("core/tests/replies exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "reply"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("readable reply file"))
        })
        .collect();
    files.sort();
    files
}

/// Replies that are too big to check in, as (name, expected kind, profile, reply).
fn generated() -> Vec<(&'static str, String, HttpResponse)> {
    let long_token = "A".repeat(MAX_TOKEN_BYTES + 1);
    let padded = |status: u16, size: usize| {
        let mut body =
            br#"{"access_token":"AT-big","token_type":"bearer","expires_in":3600,"pad":""#.to_vec();
        body.resize(size - 2, b'x');
        body.extend_from_slice(b"\"}");
        HttpResponse {
            status,
            headers: vec![],
            body,
        }
    };
    let json = |status: u16, body: String| HttpResponse {
        status,
        headers: vec![],
        body: body.into_bytes(),
    };
    vec![
        (
            "access-token-over-16-kib",
            "MalformedSuccess BadToken(access_token)".into(),
            json(
                200,
                format!(r#"{{"access_token":"{long_token}","token_type":"bearer"}}"#),
            ),
        ),
        (
            "refresh-token-over-16-kib",
            "MalformedSuccess BadToken(refresh_token)".into(),
            json(
                200,
                format!(r#"{{"access_token":"AT-1","refresh_token":"{long_token}"}}"#),
            ),
        ),
        (
            "body-over-64-kib-200",
            format!("MalformedSuccess TooLarge({})", MAX_REPLY_BYTES + 1),
            padded(200, MAX_REPLY_BYTES + 1),
        ),
        (
            "body-over-64-kib-400",
            format!("Unreadable TooLarge({})", MAX_REPLY_BYTES + 1),
            padded(400, MAX_REPLY_BYTES + 1),
        ),
        (
            "body-of-1-mib-html-200",
            format!("MalformedSuccess TooLarge({})", 1 << 20),
            HttpResponse {
                status: 200,
                headers: vec![],
                body: {
                    let mut page = b"<html><body>".repeat((1 << 20) / 12);
                    page.resize(1 << 20, b' ');
                    page
                },
            },
        ),
        (
            "nesting-60000-deep-within-the-cap",
            "MalformedSuccess NotJson".into(),
            json(200, "[".repeat(30_000) + &"]".repeat(30_000)),
        ),
        (
            "nesting-in-error-body-400",
            "Unreadable NotJson".into(),
            json(
                400,
                format!(
                    r#"{{"error":"invalid_grant","x":{}1{}}}"#,
                    r#"{"a":"#.repeat(5_000),
                    "}".repeat(5_000)
                ),
            ),
        ),
    ]
}

/// Runs every case, collecting failures so one run names all of them.
fn each_case(mut check: impl FnMut(&str, &str, &ProviderProfile, &HttpResponse)) {
    let mut failures = Vec::new();
    let mut cases: Vec<(String, String, &ProviderProfile, HttpResponse)> = corpus()
        .into_iter()
        .map(|(name, bytes)| {
            let case = parse_case(&bytes);
            let expect = case
                .meta("expect")
                .unwrap_or_else(|| panic!("{name}: no `# expect:` line"))
                .to_string();
            (
                name,
                expect,
                profile_named(case.meta("profile")),
                case.response,
            )
        })
        .collect();
    cases.extend(
        generated()
            .into_iter()
            .map(|(n, e, r)| (n.to_string(), e, &profiles()[0], r)),
    );
    for (name, expect, profile, reply) in &cases {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(name, expect, profile, reply)
        }));
        if let Err(panic) = run {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}: {msg}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_corpus_is_large_and_every_file_names_its_expected_error() {
    let files = corpus();
    assert!(files.len() >= 45, "only {} corpus files", files.len());
    for (name, bytes) in &files {
        let case = parse_case(bytes);
        let expect = case.meta("expect");
        assert!(
            expect.is_some_and(|e| !e.is_empty()),
            "{name}: no `# expect:`"
        );
    }
    // Every kind of typed error is represented.
    let kinds: Vec<String> = files
        .iter()
        .filter_map(|(_, b)| parse_case(b).meta("expect").map(str::to_string))
        .collect();
    for kind in [
        "OAuth InvalidGrant",
        "OAuth InvalidClient",
        "RateLimited",
        "ServerError",
        "Unreadable NotJson",
        "Unreadable Empty",
        "Unreadable Missing(error)",
        "Unreadable WrongType(error)",
        "MalformedSuccess NotJson",
        "MalformedSuccess NotAnObject",
        "MalformedSuccess BadToken(access_token)",
        "MalformedSuccess BadToken(refresh_token)",
        "Unauthorized",
        "ServerError at",
        "ServerError 60s",
        "RateLimited at",
        "Grant ignoring expires_in",
        "Grant ignoring token_type",
        "Grant ignoring x_refresh_token_expires_in",
        "Grant ignoring x_refresh_token_hard_expires_in",
        "Grant ignoring refresh_token_expires_in",
    ] {
        assert!(
            kinds.iter().any(|k| k.starts_with(kind)),
            "no corpus file expects {kind}"
        );
    }
}

#[test]
fn every_hostile_reply_is_the_expected_typed_error() {
    each_case(|name, expect, profile, reply| {
        let parsed = check_parsed(profile, reply);
        assert_eq!(describe_parsed(&parsed), expect, "{name}");
    });
}

#[test]
fn every_hostile_reply_passes_the_fuzz_reply_checks() {
    for (_, bytes) in corpus() {
        check_reply(&bytes);
    }
}

/// A reply the corpus expects to be a grant: judged from the body as the harness
/// reads it itself (serde_json, last duplicate wins), not from the core's parse.
fn grant_checks(name: &str, expect: &str, profile: &ProviderProfile, reply: &HttpResponse) {
    let flight = reply_in_flight(profile, reply.clone());
    let InFlight {
        before,
        after,
        outputs,
        ..
    } = &flight;
    let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("a JSON body");
    let access = body["access_token"].as_str().expect("an access token");
    let refresh = body["refresh_token"]
        .as_str()
        .filter(|r| !r.is_empty())
        .unwrap_or(STORED_REFRESH);
    // The tokens decide: both are stored, the connection is healthy.
    assert_eq!(after.refresh.expose(), refresh, "{name}: refresh token");
    let stored_access = after.access.as_ref().expect("an access token stored");
    assert_eq!(stored_access.token.expose(), access, "{name}: access token");
    assert_eq!(after.status, Status::Active, "{name}");
    assert_eq!(after.identity, before.identity, "{name}");
    let rotated = refresh != STORED_REFRESH;
    assert!(
        outputs.iter().any(|o| *o
            == Output::Event(Event::Refreshed {
                generation: after.generation,
                rotated
            })),
        "{name}: no Refreshed {{ rotated: {rotated} }} event"
    );
    // What was ignored is said once, and each ignored member falls back to what
    // an absent one means.
    let ignored: Vec<&str> = expect
        .strip_prefix("Grant ignoring ")
        .map(|list| list.split(',').collect())
        .unwrap_or_default();
    let said: Vec<&Vec<&str>> = outputs
        .iter()
        .filter_map(|o| match o {
            Output::Event(Event::IgnoredReplyFields { fields }) => Some(fields),
            _ => None,
        })
        .collect();
    if ignored.is_empty() {
        assert!(said.is_empty(), "{name}: {said:?}");
    } else {
        assert_eq!(said, [&ignored], "{name}");
    }
    let sent_at = T0;
    if ignored.contains(&"expires_in") {
        let fallback = sent_at.saturating_add(profile.default_access_ttl);
        assert_eq!(stored_access.expires_at, fallback, "{name}: access expiry");
    }
    let idle_sent = ["x_refresh_token_expires_in", "refresh_token_expires_in"]
        .iter()
        .any(|f| !body[*f].is_null() && !ignored.contains(f));
    if !idle_sent {
        let fallback = profile.idle_window.map(|d| sent_at.saturating_add(d));
        assert_eq!(after.idle_deadline, fallback, "{name}: idle deadline");
    }
    if ignored.contains(&"x_refresh_token_hard_expires_in") {
        assert_eq!(
            after.hard_deadline, before.hard_deadline,
            "{name}: hard deadline"
        );
    }
    for out in outputs {
        assert_no_secret(name, &format!("{out:?}"));
    }
}

fn in_flight_checks(name: &str, flight: &InFlight) {
    let InFlight {
        before,
        after,
        outputs,
        parsed,
    } = flight;
    assert!(parsed.is_err(), "{name}: parsed as a grant");
    // The tokens, identity and deadlines are exactly as they were...
    assert_eq!(after.refresh, before.refresh);
    assert_eq!(after.access, before.access);
    assert_eq!(after.identity, before.identity);
    assert_eq!(after.idle_deadline, before.idle_deadline);
    assert_eq!(after.hard_deadline, before.hard_deadline);
    // ...but the failure was recorded: something was committed, and it is not Active.
    let commits = outputs
        .iter()
        .filter(|o| matches!(o, Output::CompareAndSwap { .. }))
        .count();
    assert!(commits >= 1, "{name}: the failure was not recorded");
    assert!(after.generation > before.generation);
    assert_ne!(after.status, Status::Active, "{name}");
    // Nobody was served the expired token, nor anything else.
    assert!(
        !outputs
            .iter()
            .any(|o| matches!(o, Output::Deliver { result: Ok(_), .. })),
        "{name}: served a token after a rejected reply"
    );
    // invalid_grant is believed only after re-reading the store (S4, not B3).
    if let Err(ReplyError::OAuth {
        kind: OAuthErrorCode::InvalidGrant,
        ..
    }) = parsed
    {
        assert_eq!(outputs.first(), Some(&Output::Load), "{name}: no re-read");
        assert!(matches!(
            after.status,
            Status::ReauthRequired {
                reason: ReauthReason::InvalidGrant,
                ..
            }
        ));
    }
    for out in outputs {
        let mut shown = format!("{out:?}");
        if let Output::Deliver { result: Err(e), .. } = out {
            shown.push_str(&e.to_string());
        }
        for secret in [STORED_REFRESH, CLIENT_SECRET] {
            assert!(!shown.contains(secret), "{name}: {shown}");
        }
        assert_no_secret(name, &shown);
    }
    if let Err(e) = parsed {
        assert_no_secret(name, &format!("{e} {e:?}"));
    }
}

#[test]
fn a_hostile_reply_mid_refresh_changes_no_stored_token() {
    each_case(|name, expect, profile, reply| {
        if expect.starts_with("Grant") {
            return grant_checks(name, expect, profile, reply);
        }
        let flight = reply_in_flight(profile, reply.clone());
        in_flight_checks(name, &flight);
    });
}

#[test]
fn a_hostile_reply_mid_refresh_changes_no_stored_token_under_every_profile() {
    each_case(|name, expect, _, reply| {
        // An alias known to one profile is an unknown code elsewhere: still an error.
        for profile in profiles() {
            let name = format!("{name} under {}", profile.name);
            if expect.starts_with("Grant") {
                grant_checks(&name, expect, profile, reply);
            } else {
                in_flight_checks(&name, &reply_in_flight(profile, reply.clone()));
            }
        }
    });
}

#[test]
fn digit_string_lifetimes_are_accepted_by_design() {
    let reply = HttpResponse {
        status: 200,
        headers: vec![],
        body: br#"{"access_token":"AT-1","refresh_token":"RT-2","token_type":"Bearer","expires_in":"3600","x_refresh_token_expires_in":"8726400"}"#.to_vec(),
    };
    let grant = parse_token_reply(&ProviderProfile::intuit(), &reply).expect("accepted");
    assert_eq!(grant.expires_in, Some(std::time::Duration::from_secs(3600)));
    assert_eq!(
        grant.refresh_expires_in,
        Some(std::time::Duration::from_secs(8_726_400))
    );
    // And the machine stores it, rotated.
    let flight = reply_in_flight(&ProviderProfile::intuit(), reply);
    assert_eq!(flight.after.refresh.expose(), "RT-2");
    assert!(flight
        .outputs
        .iter()
        .any(|o| matches!(o, Output::Event(Event::Refreshed { rotated: true, .. }))));
}

#[test]
fn limits_are_inclusive_a_token_of_exactly_16_kib_is_accepted() {
    let token = "A".repeat(MAX_TOKEN_BYTES);
    let mut body = format!(r#"{{"access_token":"{token}","expires_in":3600,"pad":""#).into_bytes();
    body.resize(MAX_REPLY_BYTES - 2, b' ');
    body.extend_from_slice(b"\"}");
    let reply = HttpResponse {
        status: 200,
        headers: vec![],
        body,
    };
    let grant = parse_token_reply(&ProviderProfile::intuit(), &reply).expect("at the limits");
    assert_eq!(grant.access.len(), MAX_TOKEN_BYTES);
}

#[test]
fn a_duplicate_key_whose_last_value_is_valid_is_read_like_any_value() {
    let reply = HttpResponse {
        status: 200,
        headers: vec![],
        body: br#"{"access_token":"","access_token":"AT-2","expires_in":-1,"expires_in":60}"#
            .to_vec(),
    };
    let grant = parse_token_reply(&ProviderProfile::intuit(), &reply).expect("last wins");
    assert_eq!(grant.access.expose(), "AT-2");
    assert_eq!(grant.expires_in, Some(std::time::Duration::from_secs(60)));
}

#[test]
fn the_reply_file_format_decodes_as_documented() {
    let case = parse_case(
        b"# expect: X y\n# body: escaped\n429\nRetry-After: 7\r\nx-odd\n\n\\x00{\\x41}\n",
    );
    assert_eq!(case.meta("expect"), Some("X y"));
    assert_eq!(case.response.status, 429);
    assert_eq!(case.response.header("retry-after"), Some("7"));
    assert_eq!(case.response.header("x-odd"), Some(""));
    assert_eq!(case.response.body, b"\x00{A}\n");
    let bare = parse_case(b"302");
    assert_eq!((bare.response.status, bare.response.body.len()), (302, 0));
    assert_eq!(parse_case(b"no digits\n\nbody").response.status, 200);
}

#[test]
fn a_token_one_byte_over_16_kib_is_refused() {
    let reply = |n: usize| HttpResponse {
        status: 200,
        headers: vec![],
        body: format!(
            r#"{{"access_token":"{}","expires_in":3600}}"#,
            "A".repeat(n)
        )
        .into_bytes(),
    };
    let intuit = ProviderProfile::intuit();
    assert!(parse_token_reply(&intuit, &reply(16 * 1024)).is_ok());
    assert!(parse_token_reply(&intuit, &reply(16 * 1024 + 1)).is_err());
}

/// Intuit's transaction id is read from its header, cleaned for logs; the body,
/// which may carry tokens, never shows in `Debug`.
#[test]
fn the_transaction_id_is_read_sanitized_and_the_body_never_shown() {
    let reply = HttpResponse {
        status: 400,
        headers: vec![("Intuit_TID".into(), "1-abc\n\u{7}def".into())],
        body: br#"{"error":"invalid_grant","refresh_token":"RT-secret"}"#.to_vec(),
    };
    assert_eq!(
        reply.transaction_id(&ProviderProfile::intuit()).as_deref(),
        Some("1-abcdef")
    );
    let other = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    assert_eq!(reply.transaction_id(&other), None);
    let shown = format!("{reply:?}");
    assert!(shown.contains("status: 400"), "{shown}");
    assert!(shown.contains("redacted 53 bytes"), "{shown}");
    assert!(!shown.contains("RT-secret"), "{shown}");
}

/// A lifetime given as a string is read only if it is all digits (Rust's own
/// integer parser would take `"+60"`); otherwise the optional member is unusable,
/// treated as absent, and named.
#[test]
fn a_signed_string_lifetime_is_not_read() {
    let reply = |expires_in: &str| HttpResponse {
        status: 200,
        headers: vec![],
        body: format!(r#"{{"access_token":"AT-2","expires_in":{expires_in}}}"#).into_bytes(),
    };
    let intuit = ProviderProfile::intuit();
    let grant = parse_token_reply(&intuit, &reply(r#""60""#)).expect("digits");
    assert_eq!(grant.expires_in, Some(std::time::Duration::from_secs(60)));
    for unusable in [r#""+60""#, r#""""#] {
        let grant = parse_token_reply(&intuit, &reply(unusable)).expect("usable otherwise");
        assert_eq!(grant.expires_in, None, "{unusable}");
        assert_eq!(grant.ignored, vec!["expires_in"], "{unusable}");
    }
}

/// An OAuth error keeps its description, cleaned for logs.
#[test]
fn an_oauth_error_keeps_its_description() {
    let reply = HttpResponse {
        status: 400,
        headers: vec![],
        body: br#"{"error":"invalid_grant","error_description":"Token\u0007 expired"}"#.to_vec(),
    };
    match parse_token_reply(&ProviderProfile::intuit(), &reply) {
        Err(ReplyError::OAuth {
            code, description, ..
        }) => {
            assert_eq!(code, "invalid_grant");
            assert_eq!(description.as_deref(), Some("Token expired"));
        }
        other => panic!("{other:?}"),
    }
}

/// Some servers echo what they were sent in `error_description`: the caller that
/// sent a secret removes it from the error, whole or cut off by the truncation.
#[test]
fn an_echoed_secret_is_redacted_from_the_error() {
    let code = "AB11-authcode-Xy12ab";
    let echo = |text: &str| HttpResponse {
        status: 400,
        headers: vec![("content-type".into(), "application/json".into())],
        body: format!(r#"{{"error":"invalid_grant","error_description":"{text}"}}"#).into_bytes(),
    };
    let profile = ProviderProfile::intuit();
    let whole = parse_token_reply(
        &profile,
        &echo(&format!("Invalid authorization code: {code}")),
    )
    .unwrap_err();
    assert!(
        whole.to_string().contains(code),
        "the provider's text is kept as sent"
    );
    let shown = whole.redacted(&[code, CLIENT_SECRET]).to_string();
    assert!(!shown.contains(code), "{shown}");
    assert!(
        shown.contains("Invalid authorization code: <redacted>"),
        "{shown}"
    );
    // A token cut off by the description's truncation (200 characters) leaves no
    // start of it behind.
    let token = format!("RT-{}", "q".repeat(300));
    let cut = parse_token_reply(&profile, &echo(&format!("Invalid refresh token: {token}")))
        .unwrap_err()
        .redacted(&[&token])
        .to_string();
    assert!(cut.ends_with("Invalid refresh token: <redacted>"), "{cut}");
    assert!(!cut.contains("RT-q"), "{cut}");
    // A secret inside another is no reason to show the rest of the longer one.
    let outer = format!("pre-{code}-post");
    let nested = parse_token_reply(&profile, &echo(&format!("bad value {outer}")))
        .unwrap_err()
        .redacted(&[code, &outer])
        .to_string();
    assert!(nested.ends_with("bad value <redacted>"), "{nested}");
    // Other errors, and texts without the secret, are unchanged.
    let plain = parse_token_reply(&profile, &echo("Token expired")).unwrap_err();
    assert_eq!(plain.clone().redacted(&[code]), plain);
}

/// RFC 6749's `server_error`, from the token endpoint (with an error status, or
/// with 200 as GitHub answers errors), is the provider's trouble: retried with
/// back-off, not a configuration error that blocks the client.
#[test]
fn server_error_is_transient() {
    for status in [400, 200] {
        let reply = HttpResponse {
            status,
            headers: vec![],
            body: br#"{"error":"server_error"}"#.to_vec(),
        };
        let err = parse_token_reply(&ProviderProfile::github_app(), &reply).unwrap_err();
        assert_eq!(
            err.failure_kind(),
            FailureKind::ServerError(status),
            "{err}"
        );
        assert!(!err.failure_kind().is_configuration(), "{err}");
    }
}
