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

/// Drives `conn` from an access request at `now` to a lease granted over `stored`
/// (read first, then read again with the grant), displacing `took_over`.
fn lease_over(
    conn: &mut Connection,
    now: Timestamp,
    stored: &ConnectionRecord,
    took_over: Option<Lease>,
) {
    let first = Input::AccessRequested(RequestId(1));
    lease_after(conn, first, now, stored, took_over);
}

/// Drives `conn` from `first` at `now` through the read of `stored` to its lease
/// request: the owner, lifetime and name it asks for.
fn ask_lease(
    conn: &mut Connection,
    first: Input,
    now: Timestamp,
    stored: &ConnectionRecord,
) -> (WorkerId, Duration, LeaseRequestId) {
    conn.handle_input(now, first).unwrap();
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
    (owner, ttl, request)
}

/// `conn` asks for a lease over `stored` and the store's answer is lost: the
/// request (owner, lifetime, name) and when the machine retries.
fn lease_answer_lost(
    conn: &mut Connection,
    stored: &ConnectionRecord,
) -> ((WorkerId, Duration, LeaseRequestId), Timestamp) {
    let first = Input::AccessRequested(RequestId(1));
    let asked = ask_lease(conn, first, NOW, stored);
    conn.handle_input(NOW, Input::StoreFailed).unwrap();
    let retry = conn.poll_timeout().expect("a retry after the back-off");
    (asked, retry)
}

/// As [`lease_over`], from `first` (a caller's request, or a `RefreshNow`).
fn lease_after(
    conn: &mut Connection,
    first: Input,
    now: Timestamp,
    stored: &ConnectionRecord,
    took_over: Option<Lease>,
) {
    let (owner, ttl, request) = ask_lease(conn, first, now, stored);
    let lease = Lease {
        owner,
        acquired_at: now,
        expires_at: now.saturating_add(ttl),
        generation: Some(stored.generation),
        request,
    };
    let granted = Input::LeaseGranted {
        lease,
        record: Some(Box::new(stored.clone())),
        took_over,
    };
    conn.handle_input(now, granted).unwrap();
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
    let prev = Lease {
        owner: WorkerId("w1".into()),
        acquired_at: T0,
        expires_at: T0.saturating_add(Duration::from_secs(60)),
        generation: Some(Generation(0)),
        request: LeaseRequestId(1),
    };
    lease_over(&mut conn, now, stored, Some(prev));
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

/// What a commit that met `stored` instead of its base does next: rebased onto
/// `stored`, the compare-and-swap it makes (expected generation, record); `None`
/// if it gave up for `stored` (the lease is released and it decides again).
type AfterConflict = Option<(Option<Generation>, ConnectionRecord)>;

/// One machine of `profile` takes the lease over `base` (never taken over) at `NOW`,
/// sends a refresh, gets `reply` (`None`: none it could read), proposes its commit,
/// and meets `stored` in the store instead of `base`. Returns the first proposal and
/// what the machine does next. The rebase rules were found by the model checker;
/// these pin them in the core's own tests (each was a surviving mutant).
fn conflict(
    profile: ProviderProfile,
    base: &ConnectionRecord,
    reply: Option<HttpResponse>,
    stored: &ConnectionRecord,
) -> (ConnectionRecord, AfterConflict) {
    let mut conn = Connection::new(conn_id(), config(profile, "w1"), 7);
    lease_over(&mut conn, NOW, base, None);
    assert!(matches!(conn.poll_output(), Some(Output::Send(_))));
    let answer = reply.map_or(Input::OutcomeUnknown, Input::Replied);
    conn.handle_input(NOW, answer).unwrap();
    let proposal = std::iter::from_fn(|| conn.poll_output())
        .find_map(|o| match o {
            Output::CompareAndSwap { record, .. } => Some(*record),
            _ => None,
        })
        .expect("the outcome is committed");
    let current = Some(Box::new(stored.clone()));
    conn.handle_input(NOW, Input::Conflict { current }).unwrap();
    let next = match conn.poll_output() {
        Some(Output::CompareAndSwap {
            expected, record, ..
        }) => Some((expected, *record)),
        Some(Output::ReleaseLease(_)) => None,
        other => panic!("unexpected {other:?}"),
    };
    (proposal, next)
}

const NOW: Timestamp = Timestamp::from_secs(1_800_086_400);

fn rebased(next: AfterConflict) -> (Option<Generation>, ConnectionRecord) {
    next.expect("the commit must be rebased")
}

fn gave_up(next: AfterConflict) -> bool {
    next.is_none()
}

/// The base every conflict starts from: generation 1, `RT-1`, stored a day ago.
fn base(profile: &ProviderProfile) -> ConnectionRecord {
    record(&config(profile.clone(), "w1"), "RT-1", T0)
}

fn forking() -> ProviderProfile {
    let mut profile = ProviderProfile::xero();
    profile.rotation.grace_replay = GraceReplay::Fork;
    profile
}

fn doubt(
    since: Timestamp,
    holder: &str,
) -> (Option<Timestamp>, Option<(WorkerId, LeaseRequestId)>) {
    (
        Some(since),
        Some((WorkerId(holder.into()), LeaseRequestId(5))),
    )
}

#[test]
fn fresh_tokens_from_the_token_still_stored_are_rebased_whatever_marks_it() {
    let intuit = ProviderProfile::intuit();
    let base = base(&intuit);
    let fresh = || Some(granted("AT-2", Some("RT-2")));
    // The S4 trap: someone marked the record dead meanwhile, on our token.
    let marked = ConnectionRecord {
        generation: Generation(2),
        status: Status::ReauthRequired {
            reason: ReauthReason::InvalidGrant,
            since: NOW,
        },
        ..base.clone()
    };
    let (_, next) = conflict(intuit.clone(), &base, fresh(), &marked);
    let (expected, record) = rebased(next);
    assert_eq!(expected, Some(Generation(2)));
    assert_eq!(record.refresh.expose(), "RT-2");
    assert_eq!(record.status, Status::Active);
    // A rotation replaces a doubt recorded meanwhile on the token it rotated.
    let (since, holder) = doubt(NOW, "w9");
    let doubted = ConnectionRecord {
        in_doubt_since: since,
        in_doubt_holder: holder.clone(),
        ..marked.clone()
    };
    let (_, next) = conflict(intuit.clone(), &base, fresh(), &doubted);
    let (_, record) = rebased(next);
    assert_eq!(
        (record.in_doubt_since, record.in_doubt_holder),
        (None, None)
    );
    // A reply that did not rotate keeps it: another worker may have rotated it.
    let (_, next) = conflict(
        intuit.clone(),
        &base,
        Some(granted("AT-2", Some("RT-1"))),
        &doubted,
    );
    let (_, record) = rebased(next);
    assert_eq!(
        (record.in_doubt_since, record.in_doubt_holder),
        (since, holder)
    );
    // Not the same grant, or disconnected by the user, or another token: given up.
    let disconnected = ConnectionRecord {
        status: Status::Disconnected { at: NOW },
        ..marked.clone()
    };
    assert!(gave_up(
        conflict(intuit.clone(), &base, fresh(), &disconnected).1
    ));
    let mut other_grant = marked.clone();
    other_grant.identity.client_id = "another-app".into();
    assert!(gave_up(
        conflict(intuit.clone(), &base, fresh(), &other_grant).1
    ));
    let replaced = ConnectionRecord {
        refresh: RefreshToken::new("RT-9"),
        last_refreshed_at: Some(T0),
        ..marked
    };
    assert!(gave_up(conflict(intuit, &base, fresh(), &replaced).1));
}

#[test]
fn under_a_forking_provider_our_later_exchange_wins_over_an_earlier_one() {
    let fork = forking();
    let base = base(&fork);
    let fresh = || Some(granted("AT-2", Some("RT-2")));
    let (since, holder) = doubt(T0, "w9");
    let stored_at = |t: Timestamp| ConnectionRecord {
        generation: Generation(2),
        refresh: RefreshToken::new("RT-9"),
        last_refreshed_at: Some(t),
        in_doubt_since: since,
        in_doubt_holder: holder.clone(),
        ..base.clone()
    };
    let earlier = Timestamp::from_millis(NOW.as_millis() - 1);
    let (_, next) = conflict(fork.clone(), &base, fresh(), &stored_at(earlier));
    let (expected, record) = rebased(next);
    assert_eq!(expected, Some(Generation(2)));
    assert_eq!(record.refresh.expose(), "RT-2");
    // A replay recorded meanwhile may have demoted ours too: its doubt stays.
    assert_eq!(
        (record.in_doubt_since, record.in_doubt_holder),
        (since, holder.clone())
    );
    // The stored tokens come from an exchange no earlier than ours: they stand.
    assert!(gave_up(
        conflict(fork.clone(), &base, fresh(), &stored_at(NOW)).1
    ));
    let later = NOW.saturating_add(Duration::from_millis(1));
    assert!(gave_up(conflict(fork, &base, fresh(), &stored_at(later)).1));
    // No fork, no demotion: the stored tokens stand.
    let idempotent = ProviderProfile::xero();
    let base = self::base(&idempotent);
    assert!(gave_up(
        conflict(idempotent, &base, fresh(), &stored_at(earlier)).1
    ));
}

#[test]
fn an_unseen_request_leaves_its_doubt_on_the_record_it_may_have_rotated() {
    let intuit = ProviderProfile::intuit();
    let base = base(&intuit);
    let with_doubt = |since: Timestamp| {
        let (since, holder) = doubt(since, "w9");
        ConnectionRecord {
            generation: Generation(2),
            access: Some(AccessGrant {
                token: AccessToken::new("AT-other"),
                expires_at: NOW,
            }),
            in_doubt_since: since,
            in_doubt_holder: holder,
            ..base.clone()
        }
    };
    // Ours (sent at NOW) is the earlier doubt: it wins, without a holder.
    let stored = with_doubt(NOW.saturating_add(Duration::from_secs(1)));
    let (proposal, next) = conflict(intuit.clone(), &base, None, &stored);
    assert!(matches!(proposal.status, Status::Degraded { .. }));
    assert_eq!(proposal.in_doubt_since, Some(NOW));
    let (expected, record) = rebased(next);
    assert_eq!(expected, Some(Generation(2)));
    assert_eq!(record.in_doubt_since, Some(NOW));
    assert_eq!(record.in_doubt_holder, None);
    assert_eq!(record.status, proposal.status, "the failure is ours");
    assert_eq!(record.updated_at, NOW);
    assert_eq!(
        record.access, stored.access,
        "the rest is the stored record's"
    );
    // An earlier or equal stored doubt stays, with its holder.
    for since in [Timestamp::from_millis(NOW.as_millis() - 1), NOW] {
        let stored = with_doubt(since);
        let (_, next) = conflict(intuit.clone(), &base, None, &stored);
        let (_, record) = rebased(next);
        assert_eq!(
            (record.in_doubt_since, record.in_doubt_holder),
            (stored.in_doubt_since, stored.in_doubt_holder.clone())
        );
    }
    // A provider that never rotates, a record no longer live, another grant, or
    // another token (no fork): nothing of ours to leave there.
    let google = ProviderProfile::google();
    let google_base = self::base(&google);
    let google_stored = ConnectionRecord {
        generation: Generation(2),
        ..google_base.clone()
    };
    assert!(gave_up(
        conflict(google, &google_base, None, &google_stored).1
    ));
    let dead = ConnectionRecord {
        status: Status::ReauthRequired {
            reason: ReauthReason::InvalidGrant,
            since: NOW,
        },
        ..stored.clone()
    };
    assert!(gave_up(conflict(intuit.clone(), &base, None, &dead).1));
    let mut other_grant = stored.clone();
    other_grant.identity.environment = Environment::Sandbox;
    assert!(gave_up(
        conflict(intuit.clone(), &base, None, &other_grant).1
    ));
    let replaced = ConnectionRecord {
        refresh: RefreshToken::new("RT-9"),
        last_refreshed_at: Some(T0),
        ..stored.clone()
    };
    assert!(gave_up(conflict(intuit, &base, None, &replaced).1));
    // Under a forking provider our request may have demoted a token from an
    // earlier exchange.
    let fork = forking();
    let fork_base = self::base(&fork);
    let demoted = ConnectionRecord {
        identity: fork_base.identity.clone(),
        ..replaced
    };
    assert!(!gave_up(conflict(fork, &fork_base, None, &demoted).1));
}

#[test]
fn a_lost_rotation_declared_over_a_request_known_unsent_is_void() {
    let intuit = ProviderProfile::intuit();
    let base = base(&intuit);
    let refused = || Some(json_reply(503, ""));
    // Another worker took over our lease (granted at NOW) and declared the
    // rotation lost: the one commit since our base, on our token.
    let declared = |since: Timestamp, generation: u64, refresh: &str| ConnectionRecord {
        generation: Generation(generation),
        refresh: RefreshToken::new(refresh),
        in_doubt_since: Some(since),
        status: Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            since: NOW,
        },
        ..base.clone()
    };
    let (proposal, next) = conflict(intuit.clone(), &base, refused(), &declared(NOW, 2, "RT-1"));
    let (expected, record) = rebased(next);
    assert_eq!(expected, Some(Generation(2)));
    assert_eq!(
        record.status, proposal.status,
        "our definite failure stands"
    );
    assert!(matches!(record.status, Status::Degraded { .. }));
    // Any other doubt, commit count, token or verdict: the declaration stands.
    let earlier = Timestamp::from_millis(NOW.as_millis() - 1);
    for stored in [
        declared(earlier, 2, "RT-1"),
        declared(NOW, 3, "RT-1"),
        declared(NOW, 2, "RT-9"),
        ConnectionRecord {
            status: Status::ReauthRequired {
                reason: ReauthReason::InvalidGrant,
                since: NOW,
            },
            ..declared(NOW, 2, "RT-1")
        },
    ] {
        assert!(gave_up(
            conflict(intuit.clone(), &base, refused(), &stored).1
        ));
    }
}

/// The next lease request `conn` makes once its timer has fired at `at` and the
/// record `stored` was read again: its name.
fn next_lease_request(
    conn: &mut Connection,
    at: Timestamp,
    stored: &ConnectionRecord,
) -> LeaseRequestId {
    conn.handle_input(at, Input::Timeout).unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
    conn.handle_input(at, Input::Loaded(Some(Box::new(stored.clone()))))
        .unwrap();
    match conn.poll_output() {
        Some(Output::AcquireLease { request, .. }) => request,
        other => panic!("a lease is asked for, not {other:?}"),
    }
}

/// A lease request whose answer was lost keeps its name (the store may have
/// granted it: a retry under that name recognises the grant); once the store
/// answers that another worker holds the lease, whatever the lost request did is
/// moot: the next request is a new one, and giving up releases nothing of it.
#[test]
fn a_lease_refused_after_a_lost_answer_forgets_that_request() {
    let (stored, mut conn) = intuit_machine();
    let ((_, _, lost), retry) = lease_answer_lost(&mut conn, &stored);
    assert_eq!(next_lease_request(&mut conn, retry, &stored), lost);
    let holder = Lease {
        owner: WorkerId("w2".into()),
        acquired_at: retry,
        expires_at: retry.saturating_add(Duration::from_secs(30)),
        generation: Some(stored.generation),
        request: LeaseRequestId(77),
    };
    conn.handle_input(
        retry,
        Input::LeaseHeld {
            holder: holder.clone(),
        },
    )
    .unwrap();
    let wake = conn.poll_timeout().expect("a poll of the holder's lease");
    assert_ne!(next_lease_request(&mut conn, wake, &stored), lost);
    // Held again, long after the caller came: it is answered, and once the wait
    // ends nothing is left to do. Nothing of the refused request is released.
    let late = NOW.saturating_add(Duration::from_secs(11));
    conn.handle_input(late, Input::LeaseHeld { holder })
        .unwrap();
    let until = conn.poll_timeout().expect("the wait's end");
    conn.handle_input(until, Input::Timeout).unwrap();
    let outputs = drain(&mut conn);
    assert!(
        matches!(outputs.first(), Some(Output::Deliver { request, result: Err(_) }) if *request == RequestId(1)),
        "{outputs:?}"
    );
    assert!(
        !outputs
            .iter()
            .any(|o| matches!(o, Output::ReleaseLease(r) if r.request == lost)),
        "{outputs:?}"
    );
}

/// A 401 is counted once per token this machine serves: a second report of the
/// same token, or a report of a token it never served, is no new news.
#[test]
fn a_refusal_is_news_once_and_only_for_a_token_served_here() {
    let rejections = |world: &World| {
        world.workers[0]
            .events
            .iter()
            .filter(|e| **e == Event::AccessRejected)
            .count()
    };
    let mut world = World::intuit(1);
    let first = world.request(0);
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, first), "AT-2");
    world.advance(minutes(1));
    world.reject(0, "AT-never-served");
    assert_eq!(rejections(&world), 0, "not ours: nothing refused");
    world.reject(0, "AT-2");
    world.reject(0, "AT-2");
    assert_eq!(rejections(&world), 1, "the same refusal, reported twice");
}

/// The timers of an idle machine: none for a connection it may not refresh
/// (another client's) or one that is no longer live; the reconnect notice is due
/// at the hard deadline minus the notice, and once given it is not due again.
#[test]
fn an_idle_machine_wakes_only_for_what_it_can_do() {
    let intuit = ProviderProfile::intuit();
    let config = config(intuit.clone(), "w1");
    let notice = config.settings.reconnect_notice;
    let deadline = NOW.saturating_add(notice).saturating_add(days(10));
    let live = ConnectionRecord {
        access: Some(AccessGrant {
            token: AccessToken::new("AT-1"),
            expires_at: NOW.saturating_add(minutes(50)),
        }),
        last_refreshed_at: Some(NOW),
        idle_deadline: Some(NOW.saturating_add(days(90))),
        hard_deadline: Some(deadline),
        ..base(&intuit)
    };
    let idle = |config: Arc<Config>, record: &ConnectionRecord| {
        let mut conn = Connection::new(conn_id(), config, 7);
        conn.handle_input(NOW, Input::AccessRequested(RequestId(1)))
            .unwrap();
        assert_eq!(conn.poll_output(), Some(Output::Load));
        conn.handle_input(NOW, Input::Loaded(Some(Box::new(record.clone()))))
            .unwrap();
        while conn.poll_output().is_some() {}
        conn
    };
    let conn = idle(Arc::clone(&config), &live);
    let warn_at = deadline.saturating_sub(notice);
    let timer = conn
        .poll_timeout()
        .expect("an idle live connection has timers");
    assert!(
        timer <= warn_at,
        "the notice is not late: {timer} > {warn_at}"
    );
    // Given once at its instant, the notice is not due again.
    let mut conn = conn;
    conn.handle_input(warn_at, Input::Timeout).unwrap();
    let outputs = drain(&mut conn);
    assert!(
        outputs.contains(&Output::Event(Event::ReconnectSoon { deadline })),
        "{outputs:?}"
    );
    if let Some(next) = conn.poll_timeout() {
        assert!(next > warn_at, "woken again for a notice already given");
    }
    // Another client's connection, or a dead one: nothing to wake for.
    let mut sandbox = (*config).clone();
    sandbox.client.environment = Environment::Sandbox;
    assert_eq!(idle(Arc::new(sandbox), &live).poll_timeout(), None);
    let dead = ConnectionRecord {
        status: Status::ReauthRequired {
            reason: ReauthReason::InvalidGrant,
            since: NOW,
        },
        ..live
    };
    assert_eq!(idle(config, &dead).poll_timeout(), None);
}

/// A machine of `profile` asked for a token at `at`, that read `stored`: the
/// outputs it made since the read.
fn after_read(
    profile: ProviderProfile,
    at: Timestamp,
    stored: Option<&ConnectionRecord>,
) -> (Connection, Vec<Output>) {
    let mut conn = Connection::new(conn_id(), config(profile, "w1"), 7);
    conn.handle_input(at, Input::AccessRequested(RequestId(1)))
        .unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
    let record = stored.map(|r| Box::new(r.clone()));
    conn.handle_input(at, Input::Loaded(record)).unwrap();
    let outputs = drain(&mut conn);
    (conn, outputs)
}

/// The floor between refreshes ends at the last refresh plus
/// `min_refresh_interval`: a caller then gets a refresh, a caller just before is
/// told to retry then.
#[test]
fn the_refresh_floor_ends_at_its_instant() {
    let intuit = ProviderProfile::intuit();
    let floor = Settings::default().min_refresh_interval;
    let stored = ConnectionRecord {
        last_refreshed_at: Some(NOW),
        ..base(&intuit)
    };
    let until = NOW.saturating_add(floor);
    let (_, outputs) = after_read(intuit.clone(), until, Some(&stored));
    assert!(
        matches!(outputs.as_slice(), [Output::AcquireLease { .. }]),
        "{outputs:?}"
    );
    let before = Timestamp::from_millis(until.as_millis() - 1);
    let (_, outputs) = after_read(intuit, before, Some(&stored));
    let throttled = Err(AccessError::Transient {
        kind: FailureKind::RefreshThrottled,
        retry_at: until,
    });
    assert_eq!(
        outputs,
        [Output::Deliver {
            request: RequestId(1),
            result: throttled
        }]
    );
}

/// A wait for another worker's lease ends at its instant, not before: an early
/// timer reads nothing.
#[test]
fn a_wait_for_a_held_lease_ends_at_its_instant() {
    let intuit = ProviderProfile::intuit();
    let stored = base(&intuit);
    let (mut conn, outputs) = after_read(intuit, NOW, Some(&stored));
    assert!(matches!(outputs.as_slice(), [Output::AcquireLease { .. }]));
    let holder = Lease {
        owner: WorkerId("w2".into()),
        acquired_at: NOW,
        expires_at: NOW.saturating_add(Duration::from_secs(30)),
        generation: Some(stored.generation),
        request: LeaseRequestId(77),
    };
    conn.handle_input(NOW, Input::LeaseHeld { holder }).unwrap();
    let until = conn.poll_timeout().expect("the wait's end");
    let early = Timestamp::from_millis(until.as_millis() - 1);
    conn.handle_input(early, Input::Timeout).unwrap();
    assert_eq!(conn.poll_output(), None, "nothing before the wait ends");
    assert_eq!(conn.poll_timeout(), Some(until));
    conn.handle_input(until, Input::Timeout).unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
}

/// The retry gate is the later of this machine's own back-off after a store
/// failure and the record's retry time, and the back-off gates nothing once it
/// has passed.
#[test]
fn the_retry_gate_is_the_later_of_the_back_off_and_the_record() {
    let intuit = ProviderProfile::intuit();
    let degraded = |retry_at: Timestamp| ConnectionRecord {
        status: Status::Degraded {
            failures: 1,
            retry_at,
            last: FailureKind::ServerError(503),
        },
        ..base(&intuit)
    };
    // The first read fails: back off; the second read finds the record.
    let read_after_failure = |stored: &ConnectionRecord| {
        let mut conn = Connection::new(conn_id(), config(intuit.clone(), "w1"), 7);
        conn.handle_input(NOW, Input::AccessRequested(RequestId(1)))
            .unwrap();
        assert_eq!(conn.poll_output(), Some(Output::Load));
        conn.handle_input(NOW, Input::StoreFailed).unwrap();
        let back_off = conn.retry_gate_at(NOW).expect("a back-off");
        assert!(back_off > NOW);
        assert_eq!(conn.retry_gate_at(back_off), None, "passed: no gate");
        conn.handle_input(back_off, Input::Timeout).unwrap();
        assert_eq!(conn.poll_output(), Some(Output::Load));
        let record = Some(Box::new(stored.clone()));
        conn.handle_input(back_off, Input::Loaded(record)).unwrap();
        (conn, back_off)
    };
    let later = NOW.saturating_add(hours(1));
    let (conn, _) = read_after_failure(&degraded(later));
    assert_eq!(conn.retry_gate_at(NOW), Some(later), "the record's, later");
    let sooner = NOW.saturating_add(Duration::from_millis(1));
    let (conn, back_off) = read_after_failure(&degraded(sooner));
    assert_eq!(
        conn.retry_gate_at(NOW),
        Some(back_off),
        "the back-off, later"
    );
}

/// A scheduler's keep-alive whose first read fails is kept: the machine reads
/// again after the back-off (a reconnect notice due meanwhile is not lost).
#[test]
fn a_keepalive_whose_read_failed_reads_again_after_the_back_off() {
    let mut conn = Connection::new(conn_id(), config(ProviderProfile::intuit(), "w1"), 7);
    conn.handle_input(NOW, Input::Maintain).unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
    conn.handle_input(NOW, Input::StoreFailed).unwrap();
    let retry = conn.poll_timeout().expect("read again after the back-off");
    assert!(retry > NOW);
    conn.handle_input(retry, Input::Timeout).unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
}

/// A commit the store failed is retried at the back-off's end, not before: an
/// early timer sends nothing.
#[test]
fn a_failed_commit_is_retried_at_its_instant() {
    let (stored, mut conn) = intuit_machine();
    lease_over(&mut conn, NOW, &stored, None);
    assert!(matches!(conn.poll_output(), Some(Output::Send(_))));
    conn.handle_input(NOW, Input::Replied(granted("AT-2", Some("RT-2"))))
        .unwrap();
    let cas = |o: Option<Output>| matches!(o, Some(Output::CompareAndSwap { .. }));
    assert!(cas(conn.poll_output()));
    conn.handle_input(NOW, Input::StoreFailed).unwrap();
    while conn.poll_output().is_some() {}
    let until = conn.poll_timeout().expect("the commit's retry");
    let early = Timestamp::from_millis(until.as_millis() - 1);
    conn.handle_input(early, Input::Timeout).unwrap();
    assert_eq!(conn.poll_output(), None, "nothing before the retry");
    conn.handle_input(until, Input::Timeout).unwrap();
    assert!(cas(conn.poll_output()), "the same commit, again");
}

/// Under a grace window, a takeover's doubt is stored before the token is
/// presented: the record names the lease taken over and is stamped when written.
#[test]
fn a_takeover_doubt_is_stored_naming_the_lease_and_stamped_now() {
    let intuit = ProviderProfile::intuit();
    let stored = ConnectionRecord {
        updated_at: T0,
        ..base(&intuit)
    };
    let prev = Lease {
        owner: WorkerId("w2".into()),
        acquired_at: NOW.saturating_sub(minutes(2)),
        expires_at: NOW.saturating_sub(minutes(1)),
        generation: Some(stored.generation),
        request: LeaseRequestId(9),
    };
    let mut conn = Connection::new(conn_id(), config(intuit, "w1"), 7);
    lease_over(&mut conn, NOW, &stored, Some(prev.clone()));
    let Some(Output::CompareAndSwap {
        record, release, ..
    }) = conn.poll_output()
    else {
        panic!("the doubt is stored first")
    };
    assert_eq!(record.in_doubt_since, Some(prev.acquired_at));
    assert_eq!(record.in_doubt_holder, Some((prev.owner, prev.request)));
    assert_eq!(record.updated_at, NOW);
    assert_eq!(record.status, Status::Active);
    assert_eq!(release, None, "the lease is kept to present the token");
}

/// A disconnect whose commit meets another worker's write is rebased onto it:
/// the newer record is what is marked disconnected, stamped now.
#[test]
fn a_disconnect_meeting_another_write_marks_the_newer_record() {
    let (stored, mut conn) = intuit_machine();
    conn.handle_input(NOW, Input::Disconnect).unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
    conn.handle_input(NOW, Input::Loaded(Some(Box::new(stored.clone()))))
        .unwrap();
    assert!(
        matches!(conn.poll_output(), Some(Output::Send(_))),
        "revoke"
    );
    conn.handle_input(NOW, Input::Replied(json_reply(200, "")))
        .unwrap();
    let Some(Output::CompareAndSwap { record, .. }) = conn.poll_output() else {
        panic!("the disconnect is committed")
    };
    assert_eq!(record.status, Status::Disconnected { at: NOW });
    assert_eq!(record.updated_at, NOW);
    let newer = ConnectionRecord {
        generation: Generation(2),
        refresh: RefreshToken::new("RT-2"),
        updated_at: T0,
        ..stored
    };
    let current = Some(Box::new(newer));
    conn.handle_input(NOW, Input::Conflict { current }).unwrap();
    let Some(Output::CompareAndSwap {
        expected, record, ..
    }) = conn.poll_output()
    else {
        panic!("rebased onto the newer record")
    };
    assert_eq!(expected, Some(Generation(2)));
    assert_eq!(record.refresh.expose(), "RT-2");
    assert_eq!(record.status, Status::Disconnected { at: NOW });
    assert_eq!(record.updated_at, NOW);
}

/// A worker that sends while the record is already in doubt keeps the earlier
/// doubt when its own reply is lost too: the grace window counts from the
/// earlier request.
#[test]
fn a_lost_reply_keeps_an_earlier_doubt() {
    let intuit = ProviderProfile::intuit();
    let since = NOW.saturating_sub(hours(1));
    let stored = ConnectionRecord {
        in_doubt_since: Some(since),
        ..base(&intuit)
    };
    let mut conn = Connection::new(conn_id(), config(intuit, "w1"), 7);
    lease_over(&mut conn, NOW, &stored, None);
    assert!(matches!(conn.poll_output(), Some(Output::Send(_))));
    conn.handle_input(NOW, Input::OutcomeUnknown).unwrap();
    let Some(Output::CompareAndSwap { record, .. }) = conn.poll_output() else {
        panic!("the failure is committed")
    };
    assert_eq!(record.in_doubt_since, Some(since));
}

/// After invalid_grant the store is re-read: any commit since the token was
/// presented (a newer generation, even with the same token) means another
/// worker's word stands; the machine decides again instead of declaring re-auth.
#[test]
fn invalid_grant_after_another_commit_decides_again() {
    let (stored, mut conn) = intuit_machine();
    lease_over(&mut conn, NOW, &stored, None);
    assert!(matches!(conn.poll_output(), Some(Output::Send(_))));
    conn.handle_input(NOW, Input::Replied(invalid_grant()))
        .unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load), "re-read first");
    let recommitted = ConnectionRecord {
        generation: Generation(2),
        ..stored
    };
    conn.handle_input(NOW, Input::Loaded(Some(Box::new(recommitted))))
        .unwrap();
    let outputs = drain(&mut conn);
    assert!(
        !outputs
            .iter()
            .any(|o| matches!(o, Output::CompareAndSwap { .. })),
        "no re-auth declared over another worker's commit: {outputs:?}"
    );
}

/// A `RefreshNow` caller is answered with the fresh token its refresh brought,
/// even while the store fails to commit it (the token is the provider's newest).
#[test]
fn a_refresh_now_caller_gets_the_fresh_token_while_its_commit_is_retried() {
    let (stored, mut conn) = intuit_machine();
    let request = RequestId(5);
    let now_please = Input::RefreshNow {
        request,
        clear_block: false,
    };
    lease_after(&mut conn, now_please, NOW, &stored, None);
    assert!(matches!(conn.poll_output(), Some(Output::Send(_))));
    conn.handle_input(NOW, Input::Replied(granted("AT-2", Some("RT-2"))))
        .unwrap();
    assert!(matches!(
        conn.poll_output(),
        Some(Output::CompareAndSwap { .. })
    ));
    conn.handle_input(NOW, Input::StoreFailed).unwrap();
    let outputs = drain(&mut conn);
    assert!(
        outputs.iter().any(|o| matches!(
            o,
            Output::Deliver { request: r, result: Ok(t) } if *r == request && t.expose() == "AT-2"
        )),
        "{outputs:?}"
    );
}

/// The revival of a rotation declared lost over our lost lease grant (find 20),
/// as the machine commits it: active again, the doubt gone, stamped now.
#[test]
fn a_revival_is_committed_active_without_the_doubt_and_stamped_now() {
    let (stored, mut conn) = intuit_machine();
    let ((owner, _, request), retry) = lease_answer_lost(&mut conn, &stored);
    conn.handle_input(retry, Input::Timeout).unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
    // Meanwhile another worker took the grant over and declared the loss.
    let declared = ConnectionRecord {
        generation: Generation(2),
        status: Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            since: NOW,
        },
        in_doubt_since: Some(NOW),
        in_doubt_holder: Some((owner, request)),
        updated_at: NOW,
        ..stored
    };
    let current = Some(Box::new(declared));
    conn.handle_input(retry, Input::Loaded(current)).unwrap();
    let Some(Output::CompareAndSwap {
        expected, record, ..
    }) = conn.poll_output()
    else {
        panic!("the declaration is undone")
    };
    assert_eq!(expected, Some(Generation(2)));
    assert_eq!(record.status, Status::Active);
    assert_eq!(
        (record.in_doubt_since, record.in_doubt_holder),
        (None, None)
    );
    assert_eq!(record.updated_at, retry);
}

/// An operator's retry clears a configuration block, not this machine's back-off
/// after a store failure: the store is down either way.
#[test]
fn an_operators_retry_does_not_skip_the_stores_back_off() {
    let mut conn = Connection::new(conn_id(), config(ProviderProfile::intuit(), "w1"), 7);
    conn.handle_input(NOW, Input::AccessRequested(RequestId(1)))
        .unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
    conn.handle_input(NOW, Input::StoreFailed).unwrap();
    let back_off = conn.retry_gate_at(NOW).expect("a back-off");
    let retry = Input::RefreshNow {
        request: RequestId(2),
        clear_block: true,
    };
    conn.handle_input(NOW, retry).unwrap();
    assert_eq!(conn.retry_gate_at(NOW), Some(back_off));
    assert_eq!(
        conn.poll_output(),
        None,
        "nothing read before the back-off ends"
    );
}

/// A machine of worker `w1` for an Intuit connection, and the record stored
/// ([`base`]).
fn intuit_machine() -> (ConnectionRecord, Connection) {
    let intuit = ProviderProfile::intuit();
    let conn = Connection::new(conn_id(), config(intuit.clone(), "w1"), 7);
    (base(&intuit), conn)
}

/// Every output `conn` has made since last asked.
fn drain(conn: &mut Connection) -> Vec<Output> {
    std::iter::from_fn(|| conn.poll_output()).collect()
}

/// GitHub: each refresh token lives six months from its issue, and a refresh
/// issues a new one: an authorization has no deadline six months on, and a
/// refresh moves the token's own deadline.
#[test]
fn a_github_grant_has_no_hard_deadline_and_its_window_moves_with_each_refresh() {
    let profile = ProviderProfile::github_app();
    let reply = |refresh: &str| {
        parse_token_reply(
            &profile,
            &HttpResponse {
                status: 200,
                headers: vec![],
                body: format!(
                    r#"{{"access_token":"ghu_1","expires_in":28800,"refresh_token":"{refresh}","refresh_token_expires_in":15811200,"token_type":"bearer"}}"#
                )
                .into_bytes(),
            },
        )
        .unwrap()
    };
    let t0 = Timestamp::from_secs(1_800_000_000);
    let identity = GrantIdentity {
        provider: profile.name.clone(),
        environment: Environment::Production,
        client_id: "gh-app".into(),
    };
    let record = ConnectionRecord::from_authorization(
        ConnectionId("gh-1".into()),
        identity,
        None,
        reply("ghr_1"),
        &profile,
        t0,
    )
    .unwrap();
    assert_eq!(record.hard_deadline, None);
    let six_months = Duration::from_secs(15_811_200);
    assert_eq!(record.idle_deadline, Some(t0.saturating_add(six_months)));
    let later = t0.saturating_add(tokenfence_core::days(100));
    let refreshed = record.with_grant(&reply("ghr_2"), &profile, later);
    assert_eq!(refreshed.hard_deadline, None);
    assert_eq!(
        refreshed.idle_deadline,
        Some(later.saturating_add(six_months))
    );
}
