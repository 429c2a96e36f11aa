//! Details of the machine the stories in `scenarios.rs` do not pin down, each found
//! as a surviving mutant of `core/src/machine.rs` (`cargo mutants`, README): what
//! an error names, what the driver is told about waiting callers and retry gates,
//! what an early timer does, and the fields a commit writes.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokenfence_core::*;

fn reuse_detecting() -> ProviderProfile {
    ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token")
}

#[test]
fn an_unexpected_input_names_the_input_and_the_phase() {
    let mut world = World::intuit(1);
    let err = world.workers[0]
        .conn
        .handle_input(
            world.now,
            Input::Committed {
                generation: Generation(9),
            },
        )
        .expect_err("nothing was committed");
    assert_eq!(
        err.to_string(),
        "input Committed is not expected while the machine is idle"
    );
    world.request(0);
    let err = world.workers[0]
        .conn
        .handle_input(world.now, Input::Loaded(None))
        .expect_err("the machine waits for the provider's answer");
    assert_eq!(
        err.to_string(),
        "input Loaded is not expected while the machine is waiting for the provider"
    );
}

#[test]
fn waiting_counts_the_callers_without_a_token() {
    let mut world = World::intuit(1);
    assert_eq!(world.workers[0].conn.waiting(), 0);
    world.store.fail_next = 10;
    world.request(0);
    world.request(0);
    assert_eq!(world.workers[0].conn.waiting(), 2);
}

#[test]
fn the_retry_gate_is_the_recorded_retry_time_until_it_passes() {
    let mut world = World::intuit(1);
    world.request(0);
    world.reply(0, json_reply(503, ""));
    let retry_at = world.workers[0]
        .events
        .iter()
        .find_map(|e| match e {
            Event::Degraded { retry_at, .. } => Some(*retry_at),
            _ => None,
        })
        .expect("a 503 degrades the connection");
    assert!(retry_at > world.now);
    let conn = &world.workers[0].conn;
    assert_eq!(conn.retry_gate_at(world.now), Some(retry_at));
    assert_eq!(conn.retry_gate_at(retry_at), None, "not after it");
    assert_eq!(
        conn.retry_gate_at(Timestamp::from_millis(retry_at.as_millis() - 1)),
        Some(retry_at)
    );
}

#[test]
fn a_timer_fed_before_its_instant_changes_nothing() {
    let mut world = World::intuit(2);
    world.request(0);
    world.request(1); // the lease is w0's: w1 waits
    let until = world.workers[1]
        .conn
        .poll_timeout()
        .expect("w1 polls again");
    assert!(until > world.now);
    let early = Timestamp::from_millis(until.as_millis() - 1);
    let before = world.workers[1].conn.clone();
    world.workers[1]
        .conn
        .handle_input(early, Input::Timeout)
        .expect("a timeout is always accepted");
    assert_eq!(
        world.workers[1].conn.poll_output(),
        None,
        "nothing done early"
    );
    assert_eq!(world.workers[1].conn, before);
}

#[test]
fn a_request_the_provider_refuses_is_a_configuration_error_at_once() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    world.reply(
        0,
        json_reply(400, r#"{"error":"invalid_scope","error_description":"no"}"#),
    );
    assert_eq!(
        world.result(0, r),
        Some(&Err(AccessError::Config(ConfigError::RequestRejected {
            retry_at: T0.saturating_add(Settings::default().config_backoff)
        })))
    );
    // Not retried on a timer either: a fix is needed, not time.
    let r = world.request(0);
    assert_eq!(
        world.result(0, r),
        Some(&Err(AccessError::Config(ConfigError::RequestRejected {
            retry_at: T0.saturating_add(Settings::default().config_backoff)
        })))
    );
    assert_eq!(world.workers[0].sent.len(), 1);
}

#[test]
fn a_failure_and_a_reauth_are_stamped_when_they_happened() {
    let mut world = World::intuit(1);
    world.advance(Duration::from_secs(5));
    world.request(0);
    world.reply(0, json_reply(503, ""));
    assert_eq!(world.stored().updated_at, world.now);
    let mut world = World::intuit(1);
    world.advance(Duration::from_secs(3_600));
    let r = world.request(0);
    world.reply(0, invalid_grant());
    assert!(matches!(
        world.result(0, r),
        Some(Err(AccessError::ReauthRequired(_)))
    ));
    assert_eq!(world.stored().updated_at, world.now);
}

#[test]
fn a_lost_reply_under_reuse_detection_is_declared_lost_with_its_doubt() {
    let mut world = World::new(reuse_detecting(), 1, |c| record(c, "RT-1", T0));
    world.advance(Duration::from_secs(1));
    let sent_at = world.now;
    let r = world.request(0);
    world.lose(0, Input::OutcomeUnknown);
    assert_eq!(
        world.result(0, r),
        Some(&Err(AccessError::ReauthRequired(
            ReauthReason::LostRotation
        )))
    );
    assert_eq!(world.stored().in_doubt_since, Some(sent_at));
}

#[test]
fn a_doubt_from_a_taken_over_lease_names_that_lease() {
    // Intuit: w0 sends and crashes; w1 takes its lease over after it expired and
    // records the doubt, naming the lease it came from, before presenting.
    let mut world = World::intuit(2);
    world.request(0);
    let w0 = world.store.lease().cloned().expect("w0's lease");
    world.crash(0);
    world.advance(Duration::from_secs(61));
    world.request(1);
    let stored = world.stored();
    assert_eq!(stored.in_doubt_since, Some(w0.acquired_at));
    assert_eq!(stored.in_doubt_holder, Some((w0.owner, w0.request)));
}

#[test]
fn a_lost_rotation_declared_over_our_lost_grant_is_undone_by_us() {
    // Find 20: w0's lease grant is lost and w0 pauses; w1 takes the grant over
    // after it expired and, under reuse detection, declares the rotation lost.
    // w0 knows it never sent under that grant and undoes the declaration.
    let mut world = World::new(reuse_detecting(), 2, |c| record(c, "RT-1", T0));
    world.store.lose_next = 1;
    world.request(0);
    world.advance(Duration::from_secs(61));
    let r1 = world.request(1);
    assert_eq!(
        world.result(1, r1),
        Some(&Err(AccessError::ReauthRequired(
            ReauthReason::LostRotation
        )))
    );
    assert!(world.stored().in_doubt_holder.is_some());
    world.wake(0);
    let revived_at = world.now;
    let recovered = world.workers[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::Recovered { .. }));
    assert!(recovered, "{:?}", world.workers[0].events);
    // The revived record is stored; the refresh w0's caller waits for is out.
    assert_eq!(world.workers[0].sent.len(), 1);
    let stored = world.stored();
    assert_eq!(stored.status, Status::Active);
    assert_eq!(stored.updated_at, revived_at);
    assert_eq!(stored.in_doubt_since, None);
    assert_eq!(stored.in_doubt_holder, None);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.stored().refresh.expose(), "RT-2", "alive again");
}

#[test]
fn a_disconnect_of_another_clients_connection_sends_nothing() {
    // S7 for revocations: a worker configured with another client must not send
    // the stored refresh token to the provider's revocation endpoint.
    let profile = ProviderProfile::intuit();
    let mut world = World::new(profile.clone(), 1, |c| {
        let mut r = record(c, "RT-1", T0);
        r.identity.client_id = "another-client".into();
        r
    });
    world
        .input(0, Input::Disconnect)
        .expect("a disconnect is always accepted");
    assert!(world.workers[0].sent.is_empty(), "nothing sent");
    assert!(matches!(world.stored().status, Status::Disconnected { .. }));
}

/// What a worker does first after taking over `prev`, an abandoned lease granted
/// at generation 0 and expired at T0 + 60 s, with `stored` (generation 1) in the
/// store, under a reuse-detecting provider: `true` if it treats the stored token
/// as possibly presented under that lease (it then declares the rotation lost
/// without sending), `false` if it presents the token.
fn doubts_after_takeover(stored: &ConnectionRecord) -> bool {
    let config = config(reuse_detecting(), "w2");
    let mut conn = Connection::new(conn_id(), Arc::clone(&config), 7);
    let now = T0.saturating_add(Duration::from_secs(86_400));
    conn.handle_input(now, Input::AccessRequested(RequestId(1)))
        .unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
    conn.handle_input(now, Input::Loaded(Some(Box::new(stored.clone()))))
        .unwrap();
    let Some(Output::AcquireLease {
        owner,
        ttl,
        request,
    }) = conn.poll_output()
    else {
        panic!("a lease is asked for")
    };
    let prev = Lease {
        owner: WorkerId("w1".into()),
        acquired_at: T0,
        expires_at: T0.saturating_add(Duration::from_secs(60)),
        generation: Some(Generation(0)),
        request: LeaseRequestId(1),
    };
    let lease = Lease {
        owner,
        acquired_at: now,
        expires_at: now.saturating_add(ttl),
        generation: Some(stored.generation),
        request,
    };
    conn.handle_input(
        now,
        Input::LeaseGranted {
            lease,
            record: Some(Box::new(stored.clone())),
            took_over: Some(prev),
        },
    )
    .unwrap();
    match conn.poll_output() {
        Some(Output::Send(_)) => false,
        Some(Output::CompareAndSwap { record, .. }) => {
            assert_eq!(record.in_doubt_since, Some(T0), "the doubt is the lease's");
            true
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_takeover_doubts_only_tokens_that_may_have_been_presented_under_the_lease() {
    let c = config(reuse_detecting(), "w2");
    let safety = Settings::default().in_doubt_safety;
    let expired = T0.saturating_add(Duration::from_secs(60));
    let at = |t: Timestamp| ConnectionRecord {
        generation: Generation(1),
        ..record(&c, "RT-stored", t)
    };
    // Never refreshed here (imported, connected, another process's write): the
    // token dates from its receipt. Received while the lease ran, or within
    // `in_doubt_safety` after its expiry: in doubt; from then on: not (found by
    // the fuzzer: a healthy connection declared lost).
    assert!(doubts_after_takeover(&at(T0)));
    let just_before = Timestamp::from_millis(expired.saturating_add(safety).as_millis() - 1);
    assert!(doubts_after_takeover(&at(just_before)));
    assert!(!doubts_after_takeover(&at(expired.saturating_add(safety))));
    assert!(!doubts_after_takeover(&at(expired.saturating_add(days(1)))));
    // Refreshed here: the refresh's time decides, against the lease's grant.
    let refreshed = |t: Timestamp| ConnectionRecord {
        last_refreshed_at: Some(t),
        ..at(expired.saturating_add(days(1)))
    };
    let before_grant = Timestamp::from_millis(T0.as_millis() - 1);
    assert!(doubts_after_takeover(&refreshed(before_grant)));
    assert!(!doubts_after_takeover(&refreshed(T0)));
    // A record no longer active is not doubted for its age.
    let degraded = ConnectionRecord {
        status: Status::Degraded {
            failures: 1,
            retry_at: T0,
            last: FailureKind::ServerError(503),
        },
        ..at(T0)
    };
    assert!(!doubts_after_takeover(&degraded));
}
