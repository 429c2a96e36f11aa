//! Scenario tests named after the stories in INVARIANTS.md and USERS.md, each
//! driving real `Connection`s through the in-memory harness.

mod support;

use std::time::Duration;
use support::*;
use tokenfence_core::*;

fn events(world: &World, w: usize) -> &[Event] {
    &world.workers[w].events
}

#[test]
fn rotation_persisted() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r), "AT-2");
    let stored = world.stored();
    assert_eq!(
        stored.refresh.expose(),
        "RT-2",
        "the rotated token is what is stored"
    );
    assert_eq!(stored.generation, Generation(2));
    assert_eq!(
        stored.idle_deadline,
        Some(T0.saturating_add(Duration::from_secs(8_726_400))),
        "x_refresh_token_expires_in sets the rolling idle deadline"
    );
    assert!(events(&world, 0).contains(&Event::Refreshed {
        generation: Generation(2),
        rotated: true
    }));
    assert!(world.store.lease.is_none(), "lease released after commit");
}

#[test]
fn response_without_refresh_token_keeps_the_stored_one() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(
        0,
        json_reply(200, r#"{"access_token":"AT-2","token_type":"bearer"}"#),
    );
    assert_eq!(world.token(0, r), "AT-2");
    let stored = world.stored();
    assert_eq!(
        stored.refresh.expose(),
        "RT-1",
        "RFC 6749 §6: keep the old one"
    );
    let expires = stored.access.as_ref().map(|a| a.expires_at);
    assert_eq!(
        expires,
        Some(T0.saturating_add(hours(1))),
        "profile default, never forever"
    );
}

#[test]
fn valid_token_is_served_from_cache_without_the_store() {
    let mut world = World::intuit(1);
    let first = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-2")));
    let commits = world.store.commits;
    world.advance(minutes(30));
    let second = world.request(0);
    assert_eq!(world.token(0, first), world.token(0, second));
    assert_eq!(world.store.commits, commits);
    assert_eq!(world.workers[0].sent.len(), 1);
    // Within the margin (5 min before expiry) it refreshes instead.
    world.advance(minutes(26));
    let third = world.request(0);
    assert!(world.result(0, third).is_none());
    assert_eq!(world.workers[0].sent.len(), 2);
}

#[test]
fn invalid_grant_after_another_worker_already_committed() {
    // Non-grace strict rotation makes the race visible: w0 refreshes and commits,
    // w1 (which read the old record) presents the old token after its lease expired.
    let profile = ProviderProfile {
        rotation: ProviderProfile::grace_policy(Duration::ZERO, false),
        ..ProviderProfile::intuit()
    };
    let mut world = World::new(profile, 2, |c| record(c, "RT-1", T0));
    let r0 = world.request(0);
    // w1 is paused with w0's lease seen as expired: simulate by granting w1 its own
    // attempt after w0's lease times out.
    world.advance(Duration::from_secs(61));
    let r1 = world.request(1);
    assert_eq!(
        world.workers[1].sent.len(),
        1,
        "w1 took over the expired lease"
    );
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r0), "AT-2");
    // The provider rotated RT-1 away at once: w1 gets invalid_grant.
    world.reply(1, invalid_grant());
    assert_eq!(
        world.token(1, r1),
        "AT-2",
        "w1 re-reads the store and uses the winner's token"
    );
    assert_eq!(world.stored().status, Status::Active, "no false re-auth");
    assert!(!events(&world, 1)
        .iter()
        .any(|e| matches!(e, Event::ReauthRequired { .. })));
}

#[test]
fn lease_holder_died_within_grace_recovers_the_rotation() {
    let mut world = World::intuit(2);
    let _lost = world.request(0);
    assert_eq!(world.workers[0].sent.len(), 1);
    // w0 crashes after sending: the provider rotated RT-1 -> RT-2 but nobody saw it.
    world.crash(0);
    world.advance(Duration::from_secs(5));
    let r1 = world.request(1);
    assert!(
        world.workers[1].sent.is_empty(),
        "lease still held: w1 waits, does not send"
    );
    assert!(world.workers[1].conn.poll_timeout().is_some());
    world.advance(Duration::from_secs(60));
    world.tick(1);
    assert_eq!(
        world.workers[1].sent.len(),
        1,
        "lease expired: w1 takes over"
    );
    // Intuit's grace: presenting RT-1 again returns the same successor.
    world.reply(1, granted("AT-3", Some("RT-2")));
    assert_eq!(world.token(1, r1), "AT-3");
    assert_eq!(world.stored().refresh.expose(), "RT-2");
}

#[test]
fn lease_holder_died_under_reuse_detection_declares_lost_rotation_without_replaying() {
    let profile = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    let mut world = World::new(profile, 2, |c| record(c, "RT-1", T0));
    world.request(0);
    world.crash(0);
    world.advance(Duration::from_secs(61));
    let r1 = world.request(1);
    assert!(
        world.workers[1].sent.is_empty(),
        "never replay a possibly rotated token"
    );
    assert_eq!(
        world.result(1, r1),
        Some(&Err(AccessError::ReauthRequired(
            ReauthReason::LostRotation
        )))
    );
    assert!(matches!(
        world.stored().status,
        Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            ..
        }
    ));
}

#[test]
fn paused_worker_lease_expiry_commit_is_not_blocked_by_a_dead_mark() {
    // The S4 trap: w0 refreshes (strict rotation), pauses past its lease; w1 presents
    // the old token, gets invalid_grant, re-reads, sees no newer generation and marks
    // the record dead. w0 then commits: its tokens descend from the stored token, so
    // the commit must land over the dead mark and the connection recover.
    let profile = ProviderProfile {
        rotation: ProviderProfile::grace_policy(Duration::ZERO, false),
        ..ProviderProfile::intuit()
    };
    let mut world = World::new(profile, 2, |c| record(c, "RT-1", T0));
    let r0 = world.request(0);
    world.advance(Duration::from_secs(61));
    let r1 = world.request(1);
    // The provider processes w0's request first (RT-1 -> RT-2) but w0 pauses.
    world.reply(1, invalid_grant());
    assert!(matches!(
        world.stored().status,
        Status::ReauthRequired { .. }
    ));
    assert!(matches!(
        world.result(1, r1),
        Some(Err(AccessError::ReauthRequired(_)))
    ));
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r0), "AT-2");
    let stored = world.stored();
    assert_eq!(stored.refresh.expose(), "RT-2");
    assert_eq!(stored.status, Status::Active);
    assert!(events(&world, 0)
        .iter()
        .any(|e| matches!(e, Event::Recovered { .. })));
    assert!(
        world.store.conflicts >= 1,
        "the first commit conflicted and was rebased"
    );
}

/// Caller `r` was told `kind`, to come back no sooner than `secs` after T0; a
/// request halfway there does not call the provider again (no storm).
fn held_back(world: &mut World, r: RequestId, kind: FailureKind, secs: u64) -> Timestamp {
    let Some(Err(AccessError::Transient {
        kind: told,
        retry_at,
    })) = world.result(0, r).cloned()
    else {
        panic!("expected a transient error, got {:?}", world.result(0, r));
    };
    assert_eq!(told, kind);
    assert!(retry_at >= T0.saturating_add(Duration::from_secs(secs)));
    world.advance(Duration::from_secs(secs / 2));
    let again = world.request(0);
    assert!(matches!(
        world.result(0, again),
        Some(Err(AccessError::Transient { .. }))
    ));
    assert_eq!(world.workers[0].sent.len(), 1);
    retry_at
}

#[test]
fn rate_limited_429_honours_retry_after() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    let mut reply = json_reply(429, "");
    reply.headers.push(("Retry-After".into(), "120".into()));
    world.reply(0, reply);
    let retry_at = held_back(&mut world, r, FailureKind::RateLimited, 120);
    // After it, the next request refreshes and recovers.
    world.now = retry_at;
    let later = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-1")));
    assert_eq!(world.token(0, later), "AT-2");
    assert!(events(&world, 0)
        .iter()
        .any(|e| matches!(e, Event::Recovered { .. })));
    assert_eq!(world.stored().status, Status::Active);
}

#[test]
fn html_502_page_is_transient_and_retried_inline() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(
        0,
        HttpResponse {
            status: 502,
            headers: vec![("content-type".into(), "text/html".into())],
            body: b"<html><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
        },
    );
    assert!(
        world.result(0, r).is_none(),
        "caller keeps waiting for a quick retry"
    );
    assert!(matches!(
        world.stored().status,
        Status::Degraded {
            failures: 1,
            last: FailureKind::ServerError(502),
            ..
        }
    ));
    assert!(events(&world, 0)
        .iter()
        .any(|e| matches!(e, Event::Degraded { .. })));
    world.wake(0);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r), "AT-2");
    assert!(events(&world, 0)
        .iter()
        .any(|e| matches!(e, Event::Recovered { .. })));
}

#[test]
fn transient_failures_end_in_a_transient_error_after_bounded_attempts() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    let mut sends = 0;
    while world.result(0, r).is_none() {
        sends += 1;
        assert!(sends <= 3, "bounded attempts");
        world.reply(0, json_reply(503, "Service Unavailable"));
        if world.result(0, r).is_none() {
            world.wake(0);
        }
    }
    assert!(matches!(
        world.result(0, r),
        Some(Err(AccessError::Transient { .. }))
    ));
    assert!(world.stored().is_live(), "a 5xx never flags re-auth");
}

#[test]
fn sandbox_production_mismatch_refused_before_sending() {
    let sandbox = std::sync::Arc::new(Config {
        client: client(Environment::Sandbox),
        ..(*config(ProviderProfile::intuit(), "w0")).clone()
    });
    let production = config(ProviderProfile::intuit(), "w-prod");
    // The record was authorized with production credentials.
    let mut world = World::with_configs(vec![sandbox], |_| record(&production, "RT-1", T0));
    let r = world.request(0);
    assert!(world.workers[0].sent.is_empty(), "nothing sent");
    let Some(Err(AccessError::Config(ConfigError::IdentityMismatch { field, .. }))) =
        world.result(0, r)
    else {
        panic!(
            "expected an identity mismatch, got {:?}",
            world.result(0, r)
        );
    };
    assert_eq!(*field, IdentityField::Environment);
    let message = world
        .result(0, r)
        .cloned()
        .map(|r| r.err().map(|e| e.to_string()));
    let message = message.flatten().unwrap_or_default();
    assert!(
        message.contains("production") && message.contains("sandbox"),
        "{message}"
    );
    assert!(!message.contains(CLIENT_SECRET));
    assert_eq!(
        world.stored().status,
        Status::Active,
        "the record is untouched"
    );
}

#[test]
fn idle_keep_alive_refreshes_before_the_idle_deadline() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-1")));
    world.token(0, r);
    let deadline = world.stored().idle_deadline.expect("idle deadline");
    // Nobody asks for a token for months; the timer wakes the machine.
    let woke = world.wake(0);
    assert!(woke < deadline, "keep-alive before the idle deadline");
    assert!(deadline.saturating_since(woke) >= days(29));
    assert_eq!(world.workers[0].sent.len(), 2, "keep-alive sent a refresh");
    world.reply(0, granted("AT-3", Some("RT-1")));
    assert!(
        world.stored().idle_deadline.expect("deadline") > deadline,
        "rolled forward"
    );
    let next = world.workers[0]
        .conn
        .poll_timeout()
        .expect("next keep-alive");
    assert!(next > world.now.saturating_add(days(30)));
}

#[test]
fn hard_expiry_warning_before_the_cap() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    let mut reply = granted("AT-2", Some("RT-2"));
    // Intuit reports 50 days left until the 5-year cap.
    reply.body = br#"{"access_token":"AT-2","refresh_token":"RT-2","expires_in":3600,
        "x_refresh_token_expires_in":8726400,"x_refresh_token_hard_expires_in":4320000}"#
        .to_vec();
    world.reply(0, reply);
    world.token(0, r);
    let deadline = T0.saturating_add(days(50));
    assert_eq!(world.stored().hard_deadline, Some(deadline));
    // 60-day notice: already inside it, so the warning comes with the next step.
    world.request(0);
    let warnings: Vec<_> = events(&world, 0)
        .iter()
        .filter(|e| matches!(e, Event::ReconnectSoon { .. }))
        .collect();
    assert_eq!(
        warnings,
        vec![&Event::ReconnectSoon { deadline }],
        "exactly once"
    );
}

#[test]
fn dead_connection_is_not_retried_on_every_request() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, invalid_grant());
    assert_eq!(
        world.result(0, r),
        Some(&Err(AccessError::ReauthRequired(
            ReauthReason::InvalidGrant
        )))
    );
    for _ in 0..100 {
        world.advance(Duration::from_millis(100));
        let again = world.request(0);
        assert!(matches!(
            world.result(0, again),
            Some(Err(AccessError::ReauthRequired(_)))
        ));
    }
    assert_eq!(world.workers[0].sent.len(), 1, "one provider call, not 101");
    let reauth = events(&world, 0)
        .iter()
        .filter(|e| matches!(e, Event::ReauthRequired { .. }))
        .count();
    assert_eq!(reauth, 1);
    // A new authorization revives it.
    let grant = parse_token_reply(&ProviderProfile::intuit(), &granted("AT-9", Some("RT-9")))
        .expect("grant");
    world
        .input(
            0,
            Input::Authorized {
                grant,
                realm_id: Some("4620816365".into()),
            },
        )
        .expect("accepted");
    let r = world.request(0);
    assert_eq!(world.token(0, r), "AT-9");
}

#[test]
fn lost_reply_within_grace_is_recovered() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.lose(0, Input::OutcomeUnknown);
    assert!(
        world.stored().in_doubt_since.is_some(),
        "the doubt is stored for others"
    );
    world.wake(0);
    assert_eq!(
        world.workers[0].sent.len(),
        2,
        "presents the same token again"
    );
    assert_eq!(world.workers[0].sent[0].body, world.workers[0].sent[1].body);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r), "AT-2");
    assert_eq!(world.stored().in_doubt_since, None);
}

#[test]
fn lost_reply_under_reuse_detection_is_explicit_lost_rotation() {
    let profile = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    let mut world = World::new(profile, 1, |c| record(c, "RT-1", T0));
    let r = world.request(0);
    world.lose(0, Input::OutcomeUnknown);
    assert_eq!(
        world.result(0, r),
        Some(&Err(AccessError::ReauthRequired(
            ReauthReason::LostRotation
        )))
    );
    assert_eq!(world.workers[0].sent.len(), 1, "no replay");
}

#[test]
fn store_outage_during_commit_keeps_the_rotated_tokens() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.store.fail_next = 1;
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(
        world.token(0, r),
        "AT-2",
        "callers are served from the uncommitted tokens"
    );
    assert_eq!(world.stored().refresh.expose(), "RT-1", "not stored yet");
    world.wake(0);
    assert_eq!(world.stored().refresh.expose(), "RT-2", "stored on retry");
}

#[test]
fn user_disconnected_revokes_then_marks() {
    let mut world = World::intuit(1);
    world.input(0, Input::Disconnect).expect("accepted");
    let revoke = world.workers[0]
        .outstanding
        .clone()
        .expect("revocation sent");
    assert_eq!(
        revoke.url,
        "https://developer.api.intuit.com/v2/oauth2/tokens/revoke"
    );
    world.reply(0, json_reply(200, ""));
    assert!(matches!(world.stored().status, Status::Disconnected { .. }));
    assert!(events(&world, 0).contains(&Event::Disconnected { revoked: true }));
    let r = world.request(0);
    assert_eq!(world.result(0, r), Some(&Err(AccessError::Disconnected)));
}

#[test]
fn user_revoked_at_the_provider_gives_reauth_once_across_workers() {
    let mut world = World::intuit(2);
    let r0 = world.request(0);
    world.reply(0, invalid_grant());
    let r1 = world.request(1);
    assert!(
        world.workers[1].sent.is_empty(),
        "w1 reads the dead record, sends nothing"
    );
    assert_eq!(world.result(0, r0), world.result(1, r1));
}

#[test]
fn concurrent_requests_in_one_worker_make_one_call() {
    let mut world = World::intuit(1);
    let ids: Vec<_> = (0..50).map(|_| world.request(0)).collect();
    world.reply(0, granted("AT-2", Some("RT-2")));
    for id in ids {
        assert_eq!(world.token(0, id), "AT-2");
    }
    assert_eq!(world.workers[0].sent.len(), 1);
}

#[test]
fn second_worker_waits_for_the_lease_then_uses_the_committed_token() {
    let mut world = World::intuit(2);
    let r0 = world.request(0);
    let r1 = world.request(1);
    assert!(world.workers[1].sent.is_empty());
    world.reply(0, granted("AT-2", Some("RT-2")));
    world.input(1, Input::StoreChanged).expect("hint accepted");
    assert_eq!(world.token(0, r0), "AT-2");
    assert_eq!(world.token(1, r1), "AT-2");
    assert_eq!(
        world.workers[0].sent.len() + world.workers[1].sent.len(),
        1,
        "S8"
    );
}

#[test]
fn invalid_client_is_a_configuration_error_not_reauth() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, json_reply(401, r#"{"error":"invalid_client"}"#));
    assert_eq!(
        world.result(0, r),
        Some(&Err(AccessError::Config(ConfigError::ClientRejected {
            retry_at: T0.saturating_add(Settings::default().config_backoff)
        })))
    );
    assert!(world.stored().is_live());
    let again = world.request(0);
    assert!(matches!(
        world.result(0, again),
        Some(Err(AccessError::Config(_)))
    ));
    assert_eq!(
        world.workers[0].sent.len(),
        1,
        "no storm on a bad client secret"
    );
}

#[test]
fn unexpected_driver_input_is_refused_and_changes_nothing() {
    let mut world = World::intuit(1);
    let before = world.workers[0].conn.clone();
    let err = world.input(
        0,
        Input::Committed {
            generation: Generation(9),
        },
    );
    assert!(matches!(err, Err(InputError::Unexpected { .. })));
    assert_eq!(world.workers[0].conn, before);
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let mut world = World::intuit(1);
    world.request(0);
    let dump = format!(
        "{:?} {:?} {:?}",
        world.workers[0].conn, world.workers[0].sent, world.store.record
    );
    for secret in ["RT-1", "AT-expired", CLIENT_SECRET] {
        assert!(!dump.contains(secret), "{secret} leaked");
    }
}

#[test]
fn paused_worker_commit_revives_a_connection_declared_lost() {
    // Reuse detection: w1's lease expires while its refresh is in flight, w0 takes
    // over and declares LostRotation without replaying. When w1's reply finally
    // arrives, its tokens descend from the stored token and must win.
    let profile = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    let mut world = World::new(profile, 2, |c| record(c, "RT-1", T0));
    let r1 = world.request(1);
    world.advance(Duration::from_secs(61));
    let r0 = world.request(0);
    assert_eq!(
        world.result(0, r0),
        Some(&Err(AccessError::ReauthRequired(
            ReauthReason::LostRotation
        )))
    );
    world.reply(1, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(1, r1), "AT-2");
    assert_eq!(world.stored().status, Status::Active);
    world.advance(Duration::from_secs(1));
    let again = world.request(0);
    assert_eq!(
        world.token(0, again),
        "AT-2",
        "w0 re-reads instead of trusting its dead mark"
    );
}

#[test]
fn maintain_from_a_scheduler_refreshes_once_and_recovers_an_abandoned_lease() {
    let mut world = World::intuit(2);
    world.request(0);
    world.crash(0); // its refresh of RT-1 may be in flight; the lease is abandoned
    world.advance(Duration::from_secs(61));
    world.input(1, Input::Maintain).expect("accepted");
    assert_eq!(
        world.workers[1].sent.len(),
        1,
        "w1 refreshes without any caller"
    );
    assert!(
        world.stored().in_doubt_since.is_some(),
        "the doubt was stored first"
    );
    world.reply(1, granted("AT-2", Some("RT-2")));
    assert_eq!(world.stored().refresh.expose(), "RT-2");
    assert_eq!(world.stored().in_doubt_since, None);
    assert!(!world.workers[1].conn.is_busy(), "one refresh, then idle");
    assert_eq!(world.workers[1].sent.len(), 1);
}

#[test]
fn keep_alive_lead_longer_than_the_idle_window_is_no_storm() {
    // Google-like: 60-second idle window, default 30-day keep-alive lead.
    let profile = ProviderProfile {
        idle_window: Some(Duration::from_secs(60)),
        ..ProviderProfile::google()
    };
    let mut world = World::new(profile, 1, |c| record(c, "RT-1", T0));
    let r = world.request(0);
    world.reply(0, granted("AT-2", None));
    world.token(0, r);
    let due = world.workers[0]
        .conn
        .poll_timeout()
        .expect("keep-alive timer");
    assert_eq!(
        due,
        T0.saturating_add(Duration::from_secs(30)),
        "halfway through the window"
    );
    world.wake(0);
    world.reply(0, granted("AT-3", None));
    assert_eq!(world.workers[0].sent.len(), 2, "one keep-alive refresh");
    let next = world.workers[0]
        .conn
        .poll_timeout()
        .expect("next keep-alive");
    assert!(next >= world.now.saturating_add(Duration::from_secs(30)));
}

#[test]
fn store_down_before_the_first_read_backs_off_and_answers() {
    let mut world = World::intuit(1);
    world.store.fail_next = 100;
    let r = world.request(0);
    let mut loads = 0;
    while world.result(0, r).is_none() {
        loads += 1;
        assert!(loads <= 3, "bounded attempts, not a spin");
        world.wake(0);
    }
    assert!(matches!(
        world.result(0, r),
        Some(Err(AccessError::Transient {
            kind: FailureKind::StoreUnavailable,
            ..
        }))
    ));
}

#[test]
fn temporarily_unavailable_is_transient_not_configuration() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, json_reply(400, r#"{"error":"temporarily_unavailable"}"#));
    assert!(world.result(0, r).is_none(), "retried inline like a 5xx");
    assert!(matches!(
        world.stored().status,
        Status::Degraded {
            last: FailureKind::ServerError(400),
            ..
        }
    ));
}

#[test]
fn reconnect_soon_is_not_repeated_on_every_refresh() {
    let mut world = World::intuit(1);
    let hard = |secs: u64| {
        let mut reply = granted("AT", Some("RT-1"));
        reply.body = format!(
            r#"{{"access_token":"AT","refresh_token":"RT-1","expires_in":3600,"x_refresh_token_hard_expires_in":{secs}}}"#
        )
        .into_bytes();
        reply
    };
    // 50 days left, reported again an hour later as 50 days minus 3,599 s
    // (the provider's clock and ours disagree by a second).
    world.request(0);
    world.reply(0, hard(50 * 86_400));
    world.advance(hours(1));
    world.request(0);
    world.reply(0, hard(50 * 86_400 - 3_599));
    let warnings = events(&world, 0)
        .iter()
        .filter(|e| matches!(e, Event::ReconnectSoon { .. }))
        .count();
    assert_eq!(warnings, 1, "{:?}", events(&world, 0));
}

#[test]
fn a_degraded_connection_retries_at_its_retry_time_without_a_caller() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-1")));
    world.token(0, r);
    // A scheduler's keep-alive meets a provider outage; the access token is still
    // good, so no caller will need a refresh for an hour.
    world.input(0, Input::Maintain).expect("accepted");
    world.reply(0, json_reply(503, "Service Unavailable"));
    let Status::Degraded { retry_at, .. } = world.stored().status else {
        panic!("degraded: {:?}", world.stored().status);
    };
    assert_eq!(world.workers[0].sent.len(), 2);
    // Nobody asks; the machine's timer retries at the recorded retry time, not
    // before, and the connection recovers.
    let woke = world.wake(0);
    assert!(woke >= retry_at, "no retry before the recorded time (L5)");
    assert!(
        woke.saturating_since(retry_at) < Duration::from_secs(60),
        "retried at the recorded time, not at the next keep-alive"
    );
    assert_eq!(world.workers[0].sent.len(), 3, "retried without a caller");
    world.reply(0, granted("AT-3", Some("RT-1")));
    assert_eq!(world.stored().status, Status::Active);
    assert!(world.workers[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::Recovered { .. })));
}

#[test]
fn a_connection_degraded_by_a_rejected_client_waits_for_a_caller() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-1")));
    world.token(0, r);
    world.input(0, Input::Maintain).expect("accepted");
    world.reply(0, json_reply(401, r#"{"error":"invalid_client"}"#));
    assert!(matches!(
        world.stored().status,
        Status::Degraded {
            last: FailureKind::ClientRejected,
            ..
        }
    ));
    // A wrong client is a configuration to fix, not a trouble that passes: no
    // timer presents it again (only the far keep-alive remains).
    let next = world.workers[0].conn.poll_timeout().expect("keep-alive");
    assert!(next > world.now.saturating_add(days(30)));
    assert_eq!(world.stored().pending_work_at(), None);
}

#[test]
fn restarted_worker_sees_its_own_unreleased_lease_as_a_takeover() {
    // Find 1: a worker restarted under the same id (new entropy, so a new lease
    // request id) re-acquires its previous incarnation's unreleased lease. That
    // incarnation's refresh may be in flight: under reuse detection the rotation
    // is declared lost, the token never replayed.
    let profile = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    let mut world = World::new(profile, 1, |c| record(c, "RT-1", T0));
    world.request(0);
    let before = world.store.lease.clone().expect("w0's lease row");
    world.crash(0);
    let r = world.request(0);
    assert!(world.workers[0].sent.is_empty(), "never replay RT-1");
    assert_ne!(
        world.workers[0].requests.first(),
        Some(&before.lease.request),
        "a new incarnation names its lease requests anew"
    );
    assert_eq!(
        world.result(0, r),
        Some(&Err(AccessError::ReauthRequired(
            ReauthReason::LostRotation
        )))
    );
}

#[test]
fn a_lease_request_whose_answer_was_lost_is_recognised_on_retry() {
    // The store granted the lease but the answer was lost. The retry names the
    // same request: the store grants it again and reports what that grant
    // displaced (nothing), not the requester's own row: no doubt, no detour.
    let mut world = World::intuit(1);
    world.store.lose_next = 1;
    let r = world.request(0);
    assert!(world.store.lease.is_some(), "granted, unbeknown to w0");
    assert!(world.workers[0].sent.is_empty());
    world.wake(0);
    assert_eq!(world.store.lease_retries, 1, "recognised as a retry");
    assert_eq!(world.workers[0].sent.len(), 1);
    assert_eq!(
        world.stored().in_doubt_since,
        None,
        "its own grant is no doubt"
    );
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r), "AT-2");
    assert!(world.store.lease.is_none());
}

#[test]
fn a_retry_after_a_lost_grant_inherits_the_row_it_displaced() {
    // w0 sends and crashes; w1's grant displaces w0's row but its answer is lost.
    // The retry must still learn of w0's row: under reuse detection, presenting
    // RT-1 would revoke the family.
    let profile = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    let mut world = World::new(profile, 2, |c| record(c, "RT-1", T0));
    world.request(0);
    world.crash(0);
    world.advance(Duration::from_secs(61));
    world.store.lose_next = 1;
    let r = world.request(1);
    assert_eq!(
        world
            .store
            .lease
            .as_ref()
            .and_then(|s| s.displaced.as_ref())
            .map(|d| d.owner.0.as_str()),
        Some("w0")
    );
    world.wake(1);
    assert_eq!(world.store.lease_retries, 1);
    assert!(world.workers[1].sent.is_empty(), "never replay RT-1");
    assert_eq!(
        world.result(1, r),
        Some(&Err(AccessError::ReauthRequired(
            ReauthReason::LostRotation
        )))
    );
}

#[test]
fn giving_up_a_lost_grant_restores_the_row_it_displaced() {
    // w0 sends and crashes; w1's grant displaces w0's row, its answer is lost,
    // and the store stays down until w1 gives up: its release restores w0's row,
    // so the next worker still sees the refresh that may be in flight.
    let mut world = World::intuit(3);
    world.request(0);
    world.crash(0);
    world.advance(Duration::from_secs(61));
    world.store.lose_next = 1;
    let r = world.request(1);
    assert!(world.workers[1].conn.is_busy(), "w1 waits to retry");
    world.store.fail_next = 100;
    for _ in 0..10 {
        if world.result(1, r).is_some() {
            break;
        }
        world.wake(1);
    }
    assert!(matches!(
        world.result(1, r),
        Some(Err(AccessError::Transient { .. }))
    ));
    assert_eq!(world.store.restores, 1);
    assert_eq!(
        world
            .store
            .lease()
            .map(|l| (l.owner.0.as_str(), l.acquired_at)),
        Some(("w0", T0)),
        "w0's row is back"
    );
    world.store.fail_next = 0;
    world.request(2);
    assert!(
        world.stored().in_doubt_since.is_some(),
        "w2 took over w0's row: the doubt is recorded before presenting"
    );
}

#[test]
fn a_commit_whose_answer_was_lost_is_recognised_on_retry() {
    // The rotated tokens are committed but the store's answer is lost. The retry
    // of the same compare-and-swap finds exactly its own record stored: it is
    // committed, `Refreshed` is emitted once, and no second refresh is sent.
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.store.lose_next = 1;
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r), "AT-2", "the caller is served meanwhile");
    assert_eq!(world.stored().refresh.expose(), "RT-2", "the commit landed");
    let generation = world.stored().generation;
    let refreshed = |w: &World| {
        w.workers[0]
            .events
            .iter()
            .filter(|e| matches!(e, Event::Refreshed { .. }))
            .count()
    };
    assert_eq!(refreshed(&world), 0, "not yet known to have landed");
    world.wake(0);
    assert_eq!(refreshed(&world), 1, "emitted once, on the retry");
    assert_eq!(world.stored().generation, generation, "no second write");
    assert_eq!(world.workers[0].sent.len(), 1, "no second refresh");
    assert!(!world.workers[0].conn.is_busy());
    assert!(world.store.lease().is_none(), "lease released");
}

#[test]
fn server_error_503_honours_retry_after_as_an_http_date() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    let at = std::time::UNIX_EPOCH + Duration::from_millis(T0.as_millis() + 600_000);
    let mut reply = json_reply(503, "");
    reply
        .headers
        .push(("Retry-After".into(), httpdate::fmt_http_date(at)));
    world.reply(0, reply);
    held_back(&mut world, r, FailureKind::ServerError(503), 600);
}

#[test]
fn a_retry_after_date_in_the_past_means_the_usual_backoff() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    let mut reply = json_reply(503, "");
    reply
        .headers
        .push(("Retry-After".into(), "Thu, 01 Jan 2015 00:00:00 GMT".into()));
    world.reply(0, reply);
    // No wait is added: the caller may be answered after an inline retry, or
    // told to come back within the ordinary backoff (well under a minute).
    if let Some(Err(AccessError::Transient { retry_at, .. })) = world.result(0, r).cloned() {
        assert!(retry_at < T0.saturating_add(Duration::from_secs(60)));
    }
    let stored = world.stored();
    let Status::Degraded { retry_at, .. } = stored.status else {
        panic!("expected Degraded, got {:?}", stored.status);
    };
    assert!(retry_at < T0.saturating_add(Duration::from_secs(60)));
}

#[test]
fn a_bare_401_is_a_configuration_error_not_retried_on_a_short_timer() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(
        0,
        HttpResponse {
            status: 401,
            headers: vec![("www-authenticate".into(), "Basic realm=\"oauth\"".into())],
            body: Vec::new(),
        },
    );
    assert!(
        matches!(
            world.result(0, r),
            Some(Err(AccessError::Config(ConfigError::ClientRejected { .. })))
        ),
        "{:?}",
        world.result(0, r)
    );
    let Status::Degraded { retry_at, last, .. } = world.stored().status else {
        panic!("expected Degraded");
    };
    assert_eq!(last, FailureKind::ClientRejected);
    let backoff = Settings::default().config_backoff;
    assert!(retry_at >= T0.saturating_add(backoff));
    world.advance(Duration::from_secs(120));
    let again = world.request(0);
    assert!(world.result(0, again).is_some_and(|r| r.is_err()));
    assert_eq!(
        world.workers[0].sent.len(),
        1,
        "not retried on a short timer"
    );
}

/// An Intuit-style grant whose access token lives `secs` seconds.
fn granted_for(access: &str, refresh: &str, secs: u64) -> HttpResponse {
    json_reply(
        200,
        &format!(
            r#"{{"access_token":"{access}","refresh_token":"{refresh}","token_type":"bearer","expires_in":{secs},"x_refresh_token_expires_in":8726400}}"#
        ),
    )
}

/// Callers every second for ten minutes against a provider granting `lifetime`
/// second tokens, default settings, replies after `latency`: every caller is
/// answered at once, and the number of refreshes is what the lifetime allows.
fn short_lived(lifetime: u64, latency: Duration) -> (usize, usize, usize) {
    let mut world = World::intuit(1);
    let (mut refreshes, mut served, mut throttled) = (0, 0, 0);
    for second in 0..600u64 {
        let r = world.request(0);
        if world.result(0, r).is_none() {
            world.advance(latency);
            refreshes += 1;
            let n = refreshes;
            world.reply(
                0,
                granted_for(&format!("AT-{n}"), &format!("RT-{n}"), lifetime),
            );
        }
        match world.result(0, r) {
            Some(Ok(_)) => served += 1,
            Some(Err(AccessError::Transient {
                kind: FailureKind::RefreshThrottled,
                ..
            })) => throttled += 1,
            other => panic!("second {second}: caller answered with {other:?}"),
        }
        world.now = world
            .now
            .max(T0.saturating_add(Duration::from_secs(second + 1)));
    }
    (refreshes, served, throttled)
}

#[test]
fn the_margin_adapts_to_short_lifetimes_and_callers_are_served() {
    // 1 h tokens: the 5-minute margin, one refresh (the stored token is expired).
    assert_eq!(short_lived(3600, Duration::ZERO), (1, 600, 0));
    // 60 s tokens: a margin of 30 s, so a refresh every 30 s (the margin used to
    // equal the lifetime and made a refresh storm that served nobody).
    assert_eq!(short_lived(60, Duration::ZERO), (20, 600, 0));
    // 5 s tokens: every 2-3 s.
    let (refreshes, served, _) = short_lived(5, Duration::ZERO);
    assert_eq!(served, 600);
    assert!((200..=300).contains(&refreshes), "{refreshes}");
}

#[test]
fn a_token_inside_its_margin_on_arrival_is_not_refreshed_again_at_once() {
    // 2 s tokens whose reply takes 1.5 s: each new token is inside its 1 s margin
    // when it arrives. Callers are answered (throttled, with a time to come back),
    // and refreshes stay at most one per `min_refresh_interval` plus latency.
    let (refreshes, served, throttled) = short_lived(2, Duration::from_millis(1500));
    assert_eq!(served + throttled, 600);
    assert!(throttled > 0);
    // At most one refresh per floor (1 s) plus reply time (1.5 s).
    assert!(refreshes <= 600 * 2 / 5 + 1, "{refreshes}");
    // Without the floor the machine refreshed again at once, and again: every
    // token arrived inside its margin, the caller was never answered.
}

fn with_secret(profile: &ProviderProfile, worker: &str, secret: &str) -> std::sync::Arc<Config> {
    let mut config = (*config(profile.clone(), worker)).clone();
    config.client.client_secret = ClientSecret::new(secret);
    std::sync::Arc::new(config)
}

#[test]
fn a_configuration_block_belongs_to_the_credentials_that_caused_it() {
    let intuit = ProviderProfile::intuit();
    // w0 has a wrong secret; w1 (a new process with the corrected secret) and w2
    // (another process still with the wrong one) come later.
    let mut world = World::with_configs(
        vec![
            with_secret(&intuit, "w0", "wrong-secret"),
            with_secret(&intuit, "w1", "fixed-secret"),
            with_secret(&intuit, "w2", "wrong-secret"),
        ],
        |c| record(c, "RT-1", T0),
    );
    let r = world.request(0);
    world.reply(0, json_reply(401, r#"{"error":"invalid_client"}"#));
    let retry_at = T0.saturating_add(Settings::default().config_backoff);
    assert_eq!(
        world.result(0, r),
        Some(&Err(AccessError::Config(ConfigError::ClientRejected {
            retry_at
        })))
    );
    let stored = world.stored();
    let wrong = world.workers[0].conn.config().client.fingerprint();
    assert_eq!(stored.blocked_client, Some(wrong));
    assert_ne!(
        wrong,
        world.workers[1].conn.config().client.fingerprint(),
        "another secret, another fingerprint"
    );
    // The fingerprint does not show the secret.
    let shown = format!("{stored:?} {}", wrong);
    assert!(!shown.contains("wrong-secret"), "{shown}");
    world.advance(Duration::from_secs(60));
    // Same credentials elsewhere: held back, told when, nothing sent.
    let held = world.request(2);
    assert_eq!(
        world.result(2, held),
        Some(&Err(AccessError::Config(ConfigError::ClientRejected {
            retry_at
        })))
    );
    assert!(world.workers[2].sent.is_empty());
    // The corrected credentials: sent at once, and the connection recovers.
    let fixed = world.request(1);
    assert_eq!(
        world.workers[1].sent.len(),
        1,
        "other credentials try at once"
    );
    world.reply(1, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(1, fixed), "AT-2");
    assert_eq!(world.stored().status, Status::Active);
    assert_eq!(world.stored().blocked_client, None);
}

#[test]
fn an_operator_can_retry_now_despite_a_block_and_is_told_the_outcome() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, json_reply(401, r#"{"error":"invalid_client"}"#));
    assert!(matches!(
        world.result(0, r),
        Some(Err(AccessError::Config(ConfigError::ClientRejected { .. })))
    ));
    world.advance(Duration::from_secs(60));
    // An ordinary request is held back, and so is a refresh asked for without
    // clearing the block: both told until when, nothing sent...
    let held = world.request(0);
    assert!(world.result(0, held).is_some());
    let asked = RequestId(899);
    world
        .input(
            0,
            Input::RefreshNow {
                request: asked,
                clear_block: false,
            },
        )
        .expect("accepted");
    assert!(matches!(
        world.result(0, asked),
        Some(Err(AccessError::Config(ConfigError::ClientRejected { .. })))
    ));
    assert_eq!(world.workers[0].sent.len(), 1);
    // ...an operator's retry is sent, and answered with what happened: refused
    // again (and the block renewed)...
    let op = RequestId(900);
    world
        .input(
            0,
            Input::RefreshNow {
                request: op,
                clear_block: true,
            },
        )
        .expect("accepted");
    assert_eq!(world.workers[0].sent.len(), 2);
    world.reply(0, json_reply(401, r#"{"error":"invalid_client"}"#));
    assert!(matches!(
        world.result(0, op),
        Some(Err(AccessError::Config(ConfigError::ClientRejected { .. })))
    ));
    assert_eq!(world.workers[0].sent.len(), 2, "one retry, not a loop");
    // ...or, once the provider accepts, the new token.
    let op = RequestId(901);
    world
        .input(
            0,
            Input::RefreshNow {
                request: op,
                clear_block: true,
            },
        )
        .expect("accepted");
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, op), "AT-2");
    assert_eq!(world.stored().status, Status::Active);
}

#[test]
fn refresh_now_answers_with_the_token_of_a_refresh_made_after_it_asked() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r), "AT-2");
    world.advance(Duration::from_secs(600));
    // The cached token is good for 50 more minutes; a plain request gets it...
    let plain = world.request(0);
    assert_eq!(world.token(0, plain), "AT-2");
    // ...a refresh-now does not: it waits for the refresh it asked for.
    let op = RequestId(900);
    world
        .input(
            0,
            Input::RefreshNow {
                request: op,
                clear_block: false,
            },
        )
        .expect("accepted");
    assert!(world.result(0, op).is_none(), "answered before refreshing");
    assert_eq!(world.workers[0].sent.len(), 2);
    // A plain caller meanwhile is served the still-good token at once.
    let meanwhile = world.request(0);
    assert_eq!(world.token(0, meanwhile), "AT-2");
    world.reply(0, granted("AT-3", Some("RT-3")));
    assert_eq!(world.token(0, op), "AT-3");
    assert_eq!(world.stored().refresh.expose(), "RT-3");
    // And the outcome of a refused refresh is said at once, not after a timeout.
    world.advance(Duration::from_secs(5));
    let op = RequestId(901);
    world
        .input(
            0,
            Input::RefreshNow {
                request: op,
                clear_block: false,
            },
        )
        .expect("accepted");
    world.reply(0, json_reply(401, r#"{"error":"invalid_client"}"#));
    assert!(matches!(
        world.result(0, op),
        Some(Err(AccessError::Config(ConfigError::ClientRejected { .. })))
    ));
}

#[test]
fn callers_waiting_on_a_dead_lease_holder_are_answered_within_the_inline_delay() {
    let mut world = World::intuit(2);
    // w1 takes the lease and sends its refresh, then dies without a word: its
    // lease runs for a minute.
    let _ = world.request(1);
    assert_eq!(world.workers[1].sent.len(), 1);
    let s = Settings::default();
    let r = world.request(0);
    assert!(world.result(0, r).is_none(), "waits for the holder first");
    while world.result(0, r).is_none() {
        world.wake(0);
        assert!(world.now <= T0.saturating_add(s.lease_ttl), "no answer");
    }
    let waited = world.now.saturating_since(T0);
    assert!(
        waited >= s.max_inline_delay && waited <= s.max_inline_delay + s.lease_poll,
        "answered after {waited:?}"
    );
    let Some(Err(AccessError::Transient { kind, retry_at })) = world.result(0, r).cloned() else {
        panic!("{:?}", world.result(0, r));
    };
    assert_eq!(kind, FailureKind::RefreshInProgress);
    assert!(retry_at <= world.now.saturating_add(s.lease_poll));
    assert!(
        world.workers[0].sent.is_empty(),
        "never sent under another's lease"
    );
    // Once the lease expires, a caller takes it over and the connection recovers
    // (the holder's request may have rotated the token: presented again inside
    // Intuit's grace window).
    world.now = T0.saturating_add(s.lease_ttl + Duration::from_secs(1));
    let later = world.request(0);
    if world.workers[0].sent.is_empty() {
        world.wake(0); // the poll timer, overdue
    }
    assert_eq!(world.workers[0].sent.len(), 1);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, later), "AT-2");
}

/// The API's 401 (`Input::Rejected`): the refused token is never served again,
/// one refresh serves every caller that reports it, and a late report about an
/// older token sends nothing.
#[test]
fn a_rejected_token_is_refreshed_once_and_never_served_again() {
    let mut world = World::intuit(1);
    let first = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, first), "AT-2");
    world.advance(minutes(1));
    // Three callers report the same 401: one request goes out.
    let reports: Vec<_> = (0..3).map(|_| world.reject(0, "AT-2")).collect();
    assert_eq!(
        world.workers[0].sent.len(),
        2,
        "one refresh for three reports"
    );
    assert!(world.workers[0].events.contains(&Event::AccessRejected));
    // Meanwhile a caller is not given the refused token.
    let waiting = world.request(0);
    assert!(world.result(0, waiting).is_none());
    world.reply(0, granted("AT-3", Some("RT-3")));
    for r in reports.into_iter().chain([waiting]) {
        assert_eq!(world.token(0, r), "AT-3");
    }
    // A late 401 for the old token: the current one, nothing sent.
    let late = world.reject(0, "AT-2");
    assert_eq!(world.token(0, late), "AT-3");
    assert_eq!(world.workers[0].sent.len(), 2);
    // An unknown token changes nothing either.
    let unknown = world.reject(0, "AT-never-issued");
    assert_eq!(world.token(0, unknown), "AT-3");
    assert_eq!(world.workers[0].sent.len(), 2);
    // The new token refused in turn: one more refresh.
    world.advance(minutes(1));
    let again = world.reject(0, "AT-3");
    assert_eq!(world.workers[0].sent.len(), 3);
    world.reply(0, granted("AT-4", Some("RT-4")));
    assert_eq!(world.token(0, again), "AT-4");
}

/// Two processes see the same 401: the first refreshes under the lease; the
/// second finds the new token in the store and sends nothing.
#[test]
fn a_token_rejected_in_two_processes_is_refreshed_once() {
    let mut world = World::intuit(2);
    let a = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-2")));
    let b = world.request(1);
    assert_eq!(world.token(0, a), "AT-2");
    assert_eq!(world.token(1, b), "AT-2", "read from the store");
    world.advance(minutes(1));
    let r0 = world.reject(0, "AT-2");
    world.reply(0, granted("AT-3", Some("RT-3")));
    assert_eq!(world.token(0, r0), "AT-3");
    let r1 = world.reject(1, "AT-2");
    assert_eq!(world.token(1, r1), "AT-3");
    assert!(
        world.workers[1].sent.is_empty(),
        "the second process sent nothing"
    );
}

/// A 401 moments after a refresh committed: the refresh floor holds (callers
/// are told when to come back), and the refused token is still not served.
#[test]
fn a_rejection_right_after_a_refresh_waits_for_the_floor() {
    let mut world = World::intuit(1);
    let first = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, first), "AT-2");
    let report = world.reject(0, "AT-2");
    match world.result(0, report) {
        Some(Err(AccessError::Transient {
            kind: FailureKind::RefreshThrottled,
            retry_at,
        })) => assert!(*retry_at > world.now),
        other => panic!("{other:?}"),
    }
    assert_eq!(world.workers[0].sent.len(), 1);
    world.advance(Duration::from_secs(2));
    let next = world.request(0);
    assert_eq!(
        world.workers[0].sent.len(),
        2,
        "after the floor: one refresh"
    );
    world.reply(0, granted("AT-3", Some("RT-3")));
    assert_eq!(world.token(0, next), "AT-3");
}
