//! The oracles bite: each strengthened check of the property test and the fuzz
//! harness is shown to fail on a state it must reject, so a check that passes
//! everywhere is not one that cannot fail.

mod support;

use std::time::Duration;
use support::*;
use tokenfence_core::invariants::{self, ProviderTruth, Unsettled, Violation};
use tokenfence_core::*;

/// Which refresh tokens a hand-set provider still accepts.
#[derive(Clone, Copy)]
enum Accepted {
    None,
    All,
    Only(&'static str),
}

/// A provider's facts about one grant, set by hand: each test states those it needs.
#[derive(Clone, Copy)]
struct Truth {
    accepted: Accepted,
    ended: bool,
    replayed: bool,
    successor_lost: bool,
}

impl ProviderTruth for Truth {
    fn accepts(&self, t: &RefreshToken) -> bool {
        match self.accepted {
            Accepted::None => false,
            Accepted::All => true,
            Accepted::Only(token) => token == t.expose(),
        }
    }
    fn ended_by_provider(&self) -> bool {
        self.ended
    }
    fn replayed_outside_grace(&self) -> bool {
        self.replayed
    }
    fn successor_lost(&self, _: &RefreshToken) -> bool {
        self.successor_lost
    }
}

/// A provider that accepts no token and knows nothing else.
const NOTHING: Truth = Truth {
    accepted: Accepted::None,
    ended: false,
    replayed: false,
    successor_lost: false,
};

/// A provider that still accepts every token and ended nothing: only the ghost can
/// justify a re-auth flag.
const ACCEPTS_ALL: Truth = Truth {
    accepted: Accepted::All,
    ..NOTHING
};

/// A provider whose only fact is that the stored token's successor went to
/// nobody (a lost reply, a crashed receiver) and that it no longer accepts it.
const SUCCESSOR_LOST: Truth = Truth {
    successor_lost: true,
    ..NOTHING
};

/// S2's allowance for a fault's loss is INVARIANTS.md's: a provider with no grace
/// window. Under a grace window (Intuit) an active record without a doubt whose
/// successor is gone is a dropped doubt, excused only while the record carries the
/// doubt or the harness's ghost holds the request that presented the token.
#[test]
fn s2_excuses_a_fault_under_a_grace_window_only_while_the_loss_is_known() {
    let s2 = |profile: &ProviderProfile, stored: &ConnectionRecord, ghost: &[Unsettled]| {
        invariants::no_self_inflicted_loss(stored, profile, false, [], ghost, &SUCCESSOR_LOST)
    };
    let intuit = ProviderProfile::intuit();
    let active = record(&config(intuit.clone(), "w0"), "RT-1", T0);
    assert_eq!(s2(&intuit, &active, &[]), Err(Violation::SelfInflictedLoss));
    let doubted = ConnectionRecord {
        in_doubt_since: Some(T0),
        ..active.clone()
    };
    assert_eq!(s2(&intuit, &doubted, &[]), Ok(()));
    let sent = Unsettled {
        token: active.refresh.clone(),
        lease_at: T0,
        generation: Some(Generation(1)),
    };
    assert_eq!(s2(&intuit, &active, std::slice::from_ref(&sent)), Ok(()));
    // Once something was committed after the request, whoever committed it knew
    // of the doubt (its sender, or a worker that took its lease over): the record
    // must carry it.
    let committed_since = ConnectionRecord {
        generation: Generation(2),
        ..active.clone()
    };
    assert_eq!(
        s2(&intuit, &committed_since, &[sent]),
        Err(Violation::SelfInflictedLoss),
        "a doubt dropped by a later commit"
    );
    let other = Unsettled {
        token: RefreshToken::new("RT-0"),
        lease_at: T0,
        generation: Some(Generation(1)),
    };
    assert_eq!(
        s2(&intuit, &active, &[other]),
        Err(Violation::SelfInflictedLoss),
        "a request presenting another token excuses nothing"
    );
    let strict = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    let active = record(&config(strict.clone(), "w0"), "RT-1", T0);
    assert_eq!(
        s2(&strict, &active, &[]),
        Ok(()),
        "no grace: INVARIANTS.md's exception"
    );
}

/// A record the core declared lost at `since`, carrying a doubt since `doubt`.
fn declared_lost(
    profile: &ProviderProfile,
    doubt: Timestamp,
    since: Timestamp,
) -> ConnectionRecord {
    let config = config(profile.clone(), "w0");
    ConnectionRecord {
        in_doubt_since: Some(doubt),
        status: Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            since,
        },
        ..record(&config, "RT-1", T0)
    }
}

#[test]
fn s4_rejects_a_lost_rotation_that_only_the_record_claims() {
    let profile = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    let stored = declared_lost(&profile, T0, T0.saturating_add(Duration::from_secs(61)));
    let unsound = Err(Violation::UnsoundReauth {
        reason: ReauthReason::LostRotation,
    });
    // The record's own in_doubt_since is written by the core under test: alone, it
    // justifies nothing.
    assert_eq!(
        invariants::sound_reauth(&stored, &profile, &ACCEPTS_ALL, []),
        unsound
    );
    // A request really sent presenting another token justifies nothing either.
    let other = Unsettled {
        token: RefreshToken::new("RT-0"),
        lease_at: T0,
        generation: Some(Generation(1)),
    };
    assert_eq!(
        invariants::sound_reauth(&stored, &profile, &ACCEPTS_ALL, [&other]),
        unsound
    );
    // A request really sent presenting the stored token, outcome never seen: sound.
    let sent = Unsettled {
        token: RefreshToken::new("RT-1"),
        lease_at: T0,
        generation: Some(Generation(1)),
    };
    assert_eq!(
        invariants::sound_reauth(&stored, &profile, &ACCEPTS_ALL, [&other, &sent]),
        Ok(())
    );
}

#[test]
fn s4_rejects_a_lost_rotation_declared_inside_the_grace_window() {
    // Intuit: 24 h grace, no reuse detection. A rotation in doubt can be recovered
    // by presenting the token again inside the window: declaring it lost there is
    // unsound even with a real unsettled request; after the window it is sound.
    let profile = ProviderProfile::intuit();
    let safety = Settings::default().in_doubt_safety;
    let sent = Unsettled {
        token: RefreshToken::new("RT-1"),
        lease_at: T0,
        generation: Some(Generation(1)),
    };
    let early = declared_lost(&profile, T0, T0.saturating_add(hours(1)));
    assert!(
        invariants::sound_reauth_within(&early, &profile, safety, &ACCEPTS_ALL, [&sent]).is_err()
    );
    let late = declared_lost(&profile, T0, T0.saturating_add(hours(25)));
    assert_eq!(
        invariants::sound_reauth_within(&late, &profile, safety, &ACCEPTS_ALL, [&sent]),
        Ok(())
    );
    // The doubt the record claims (since T0) changes nothing without the request.
    assert!(invariants::sound_reauth_within(&late, &profile, safety, &ACCEPTS_ALL, []).is_err());
}

#[test]
fn the_worlds_ghost_justifies_the_lost_rotation_a_crash_leaves() {
    // The scenario of lease_holder_died_under_reuse_detection: w0 sends, crashes;
    // w1 takes over and declares the rotation lost without replaying. The World's
    // ghost holds w0's request (kept at connection level by the crash), and S4
    // from it agrees; without it, S4 rejects the same record.
    let profile = ProviderProfile::strict_reuse_detecting("strict", "https://auth.example/token");
    let mut world = World::new(profile.clone(), 2, |c| record(c, "RT-1", T0));
    world.request(0);
    assert!(
        world.workers[0].ghost.unsettled().is_some(),
        "sent, not settled"
    );
    world.crash(0);
    assert_eq!(
        world.ghosts.len(),
        1,
        "the crash keeps it at connection level"
    );
    world.advance(Duration::from_secs(61));
    world.request(1);
    let stored = world.stored();
    assert!(matches!(
        stored.status,
        Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            ..
        }
    ));
    let safety = Settings::default().in_doubt_safety;
    invariants::sound_reauth_within(stored, &profile, safety, &ACCEPTS_ALL, world.unsettled())
        .expect("S4 from the ghost");
    assert!(invariants::sound_reauth_within(stored, &profile, safety, &ACCEPTS_ALL, []).is_err());
}

#[test]
fn a_request_answered_for_certain_settles_its_ghost() {
    let mut world = World::intuit(1);
    let r = world.request(0);
    assert!(world.workers[0].ghost.unsettled().is_some());
    world.reply(0, granted("AT-2", Some("RT-2")));
    assert_eq!(world.token(0, r), "AT-2");
    assert_eq!(world.unsettled().count(), 0, "committed: settled");
    // A reply lost after processing never settles.
    world.advance(hours(1));
    world.request(0);
    world.lose(0, Input::OutcomeUnknown);
    let kept: Vec<_> = world.ghosts.iter().map(|u| u.token.expose()).collect();
    assert_eq!(kept, ["RT-2"]);
}

/// w0 sends, pauses past its lease; w1 takes over (recording the doubt first),
/// refreshes and commits: two generations past w0's base. Then w0's reply comes,
/// and its commit lands only if the store lets it.
fn stale_commit(mutation: Option<Mutation>) -> World {
    let profile = ProviderProfile {
        rotation: ProviderProfile::grace_policy(Duration::ZERO, false),
        ..ProviderProfile::intuit()
    };
    let mut world = World::new(profile, 2, |c| record(c, "RT-1", T0));
    world.store.mutation = mutation;
    world.request(0);
    let w0_base = world.workers[0].conn.in_flight().map(|r| r.generation);
    world.advance(Duration::from_secs(61));
    world.request(1);
    assert_eq!(
        world.workers[1].sent.len(),
        1,
        "w1 took over the expired lease"
    );
    world.reply(1, granted("AT-3", Some("RT-3")));
    let stored = world.stored().generation;
    assert_eq!((w0_base, stored), (Some(Generation(1)), Generation(3)));
    world.reply(0, granted("AT-2", Some("RT-2")));
    world
}

#[test]
fn s1_holds_with_a_faithful_store() {
    let world = stale_commit(None);
    assert!(world.store.violations.is_empty());
    assert!(world.store.conflicts >= 1, "the stale commit conflicted");
    assert_eq!(
        world.stored().refresh.expose(),
        "RT-3",
        "w1's commit stands"
    );
}

#[test]
fn s1_bites_when_a_stale_commit_lands() {
    // B1: the store writes every compare-and-swap. The S1 check at the commit
    // (independent of the store's own equality test) names the stale base, and the
    // generation the stale write stores went down.
    let world = stale_commit(Some(Mutation::WriteUnconditionally));
    let v = &world.store.violations;
    assert!(
        v.iter()
            .any(|v| matches!(v, Violation::StaleOverwrite { base, stored } if base < stored)),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|v| matches!(v, Violation::GenerationDecreased { .. })),
        "{v:?}"
    );
}

#[test]
fn s1_bites_when_the_driver_rewrites_the_commit_base() {
    // The store's equality test passes (the driver told it the stored generation),
    // the generation goes up: only the check against the machine's own base fails.
    let world = stale_commit(Some(Mutation::RewriteExpected));
    let v = &world.store.violations;
    assert!(!v.is_empty());
    assert!(
        v.iter()
            .all(|v| matches!(v, Violation::StaleOverwrite { base, stored } if base < stored)),
        "{v:?}"
    );
}

/// S2 with no fault involved: a stored token the provider no longer accepts is a
/// loss unless one excuse holds, and each excuse is enough alone.
#[test]
fn s2_takes_each_excuse_alone_and_nothing_less() {
    let intuit = ProviderProfile::intuit();
    let active = record(&config(intuit.clone(), "w0"), "RT-1", T0);
    let nobody: &[Unsettled] = &[];
    let s2 = |stored: &ConnectionRecord, resolving: bool, pending: &[RefreshToken], t: &Truth| {
        invariants::no_self_inflicted_loss(stored, &intuit, resolving, pending, nobody, t)
    };
    let rejects_all = NOTHING;
    assert_eq!(
        s2(&active, false, &[], &rejects_all),
        Err(Violation::SelfInflictedLoss)
    );
    let revoked = Truth {
        ended: true,
        ..NOTHING
    };
    assert_eq!(
        s2(&active, false, &[], &revoked),
        Ok(()),
        "the provider ended it"
    );
    let lost = ConnectionRecord {
        status: Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            since: T0,
        },
        ..active.clone()
    };
    assert_eq!(s2(&lost, false, &[], &rejects_all), Ok(()), "declared lost");
    let disconnected = ConnectionRecord {
        status: Status::Disconnected { at: T0 },
        ..active.clone()
    };
    assert_eq!(s2(&disconnected, false, &[], &rejects_all), Ok(()));
    let other_reason = ConnectionRecord {
        status: Status::ReauthRequired {
            reason: ReauthReason::InvalidGrant,
            since: T0,
        },
        ..active.clone()
    };
    assert_eq!(
        s2(&other_reason, false, &[], &rejects_all),
        Err(Violation::SelfInflictedLoss),
        "only a declared lost rotation says so"
    );
    assert_eq!(s2(&active, true, &[], &rejects_all), Ok(()), "resolving");
    let holds_rt2 = Truth {
        accepted: Accepted::Only("RT-2"),
        ..NOTHING
    };
    assert_eq!(
        s2(&active, false, &[RefreshToken::new("RT-2")], &holds_rt2),
        Ok(()),
        "fresh tokens not committed yet"
    );
    assert_eq!(
        s2(&active, false, &[RefreshToken::new("RT-3")], &holds_rt2),
        Err(Violation::SelfInflictedLoss),
        "held tokens the provider refuses excuse nothing"
    );
    let stored_ok = Truth {
        accepted: Accepted::Only("RT-1"),
        ..NOTHING
    };
    assert_eq!(s2(&active, false, &[], &stored_ok), Ok(()));
}

/// S3 fails exactly when the provider saw a replay outside the grace window.
#[test]
fn s3_bites_on_a_replay_outside_grace() {
    let replayed = Truth {
        replayed: true,
        ..NOTHING
    };
    assert_eq!(
        invariants::no_self_inflicted_replay(&replayed),
        Err(Violation::SelfInflictedReplay)
    );
    assert_eq!(invariants::no_self_inflicted_replay(&NOTHING), Ok(()));
}

/// S4's takeover ghost at its boundaries: a lease granted at the stored
/// generation counts; otherwise only an active record whose tokens predate the
/// lease (refreshed strictly before its grant, or of unknown age received
/// strictly before its end plus `late`).
#[test]
fn a_taken_over_lease_counts_only_over_older_tokens() {
    let cfg = config(ProviderProfile::intuit(), "w0");
    let late = Duration::from_secs(30);
    let at = T0.saturating_add(Duration::from_secs(600));
    let lease = Lease {
        owner: WorkerId("w1".into()),
        acquired_at: at,
        expires_at: at.saturating_add(Duration::from_secs(60)),
        generation: Some(Generation(7)),
        request: LeaseRequestId(1),
    };
    let counts = |r: &ConnectionRecord| Unsettled::taken_over(&lease, Some(r), late).is_some();
    let refreshed = |t: Timestamp| ConnectionRecord {
        last_refreshed_at: Some(t),
        ..record(&cfg, "RT-1", T0)
    };
    assert!(counts(&ConnectionRecord {
        generation: Generation(7),
        ..refreshed(at.saturating_add(Duration::from_secs(1)))
    }));
    assert!(counts(&refreshed(
        at.saturating_sub(Duration::from_secs(1))
    )));
    assert!(!counts(&refreshed(at)), "refreshed at the grant: not older");
    assert!(!counts(&refreshed(
        at.saturating_add(Duration::from_secs(1))
    )));
    let reauth = ConnectionRecord {
        status: Status::ReauthRequired {
            reason: ReauthReason::InvalidGrant,
            since: T0,
        },
        ..refreshed(at.saturating_sub(Duration::from_secs(1)))
    };
    assert!(!counts(&reauth), "only an active record's tokens");
    let end = lease.expires_at.saturating_add(late);
    let unknown_age = |issued: Timestamp| record(&cfg, "RT-1", issued);
    assert!(counts(&unknown_age(
        end.saturating_sub(Duration::from_millis(1))
    )));
    assert!(
        !counts(&unknown_age(end)),
        "received once the lease was over"
    );
    assert!(Unsettled::taken_over(&lease, None, late).is_none());
}

/// S5 at its boundaries: before expiry minus the margin, and never older than a
/// generation the worker has seen.
#[test]
fn s5_bites_at_the_margin_and_on_an_older_generation() {
    let margin = Duration::from_secs(60);
    let expires = T0.saturating_add(Duration::from_secs(3600));
    let serve = |served: u64, now: Timestamp, newest: u64| {
        invariants::fresh_serve(Generation(served), expires, now, margin, Generation(newest))
            .is_ok()
    };
    assert!(serve(2, T0, 2));
    assert!(serve(3, T0, 2));
    let edge = expires.saturating_sub(margin);
    assert!(serve(2, edge.saturating_sub(Duration::from_millis(1)), 2));
    assert!(!serve(2, edge, 2), "inside the margin");
    assert!(!serve(1, T0, 2), "a newer generation was seen");
}

/// S6: a reply without `refresh_token` keeps the stored one, and an access token
/// whose lifetime the reply did not state lives at most the profile's default.
#[test]
fn s6_bites_on_a_dropped_refresh_token_and_an_unbounded_access_token() {
    let profile = ProviderProfile::intuit();
    let before = record(&config(profile.clone(), "w0"), "RT-1", T0);
    let sent = T0;
    let grant = |refresh: Option<&str>, expires_in: Option<Duration>| TokenGrant {
        access: AccessToken::new("AT-2"),
        refresh: refresh.map(RefreshToken::new),
        expires_in,
        refresh_expires_in: None,
        hard_expires_in: None,
        ignored: Vec::new(),
    };
    let after = |refresh: &str, expires_at: Option<Timestamp>| ConnectionRecord {
        refresh: RefreshToken::new(refresh),
        access: expires_at.map(|e| AccessGrant {
            token: AccessToken::new("AT-2"),
            expires_at: e,
        }),
        ..before.clone()
    };
    let s6 = |g: &TokenGrant, a: &ConnectionRecord| {
        invariants::keeps_what_was_not_replaced(&before, g, a, &profile, sent)
    };
    let bound = sent.saturating_add(profile.default_access_ttl);
    assert_eq!(s6(&grant(None, None), &after("RT-1", Some(bound))), Ok(()));
    assert_eq!(
        s6(&grant(None, None), &after("", Some(bound))),
        Err(Violation::DroppedRefreshToken)
    );
    assert_eq!(
        s6(&grant(Some("RT-2"), None), &after("RT-2", Some(bound))),
        Ok(())
    );
    let beyond = bound.saturating_add(Duration::from_secs(1));
    assert_eq!(
        s6(&grant(None, None), &after("RT-1", Some(beyond))),
        Err(Violation::UnboundedAccessLifetime)
    );
    let stated = Some(Duration::from_secs(7200));
    assert_eq!(
        s6(&grant(None, stated), &after("RT-1", Some(beyond))),
        Ok(())
    );
    assert_eq!(
        s6(&grant(None, stated), &after("RT-1", None)),
        Err(Violation::UnboundedAccessLifetime)
    );
}

/// S7, S8 and S9 each fail on the state they must reject.
#[test]
fn s7_s8_s9_bite() {
    let prod = config(ProviderProfile::intuit(), "w0");
    let stored = record(&prod, "RT-1", T0);
    assert_eq!(invariants::right_credentials(&prod, &stored), Ok(()));
    let sandbox = Config {
        client: client(Environment::Sandbox),
        ..(*prod).clone()
    };
    assert_eq!(
        invariants::right_credentials(&sandbox, &stored),
        Err(Violation::WrongCredentials)
    );
    assert_eq!(invariants::single_flight(1, true), Ok(()));
    assert_eq!(
        invariants::single_flight(2, true),
        Err(Violation::DuplicateRefresh { outstanding: 2 })
    );
    assert_eq!(
        invariants::single_flight(2, false),
        Ok(()),
        "a lease broken"
    );
    assert_eq!(
        invariants::unchanged_by_bad_input(Some(&stored), Some(&stored)),
        Ok(())
    );
    let changed = ConnectionRecord {
        generation: Generation(2),
        ..stored.clone()
    };
    assert_eq!(
        invariants::unchanged_by_bad_input(Some(&stored), Some(&changed)),
        Err(Violation::BadInputChangedRecord)
    );
}

/// R1 and R2 each fail on the state they must reject, and each reason R2 knows
/// for a refresh is enough alone.
#[test]
fn r1_and_r2_bite() {
    let at1 = AccessToken::new("AT-1");
    let refused = [AccessToken::new("AT-0"), at1.clone()];
    assert_eq!(
        invariants::refused_not_served(&at1, &refused, false),
        Err(Violation::RefusedServed)
    );
    assert_eq!(invariants::refused_not_served(&at1, &refused, true), Ok(()));
    assert_eq!(
        invariants::refused_not_served(&AccessToken::new("AT-2"), &refused, false),
        Ok(())
    );

    let cfg = config(ProviderProfile::intuit(), "w0");
    let margin = Duration::from_secs(300);
    let lead = Duration::from_secs(86_400);
    let fresh = ConnectionRecord {
        access: Some(AccessGrant {
            token: at1.clone(),
            expires_at: T0.saturating_add(Duration::from_secs(3600)),
        }),
        idle_deadline: Some(T0.saturating_add(Duration::from_secs(30 * 86_400))),
        ..record(&cfg, "RT-1", T0)
    };
    let nothing_refused = |_: &AccessToken| false;
    let r2 = |r: &ConnectionRecord, now: Timestamp, doubt: bool| {
        invariants::refresh_needed(r, now, margin, lead, doubt, nothing_refused)
    };
    assert_eq!(r2(&fresh, T0, false), Err(Violation::UnprovokedRefresh));
    let expiry = T0.saturating_add(Duration::from_secs(3600));
    assert_eq!(r2(&fresh, expiry.saturating_sub(margin), false), Ok(()));
    assert_eq!(
        invariants::refresh_needed(&fresh, T0, margin, lead, false, |t| *t == at1),
        Ok(()),
        "its access token was refused"
    );
    let keepalive = fresh.idle_deadline.expect("set").saturating_sub(lead);
    assert_eq!(r2(&fresh, keepalive, false), Ok(()));
    assert_eq!(r2(&fresh, T0, true), Ok(()), "the ghost knows a doubt");
    let doubted = ConnectionRecord {
        in_doubt_since: Some(T0),
        ..fresh.clone()
    };
    assert_eq!(r2(&doubted, T0, false), Ok(()));
    let degraded = ConnectionRecord {
        status: Status::Degraded {
            failures: 1,
            retry_at: T0,
            last: FailureKind::RateLimited,
        },
        ..fresh.clone()
    };
    assert_eq!(r2(&degraded, T0, false), Ok(()));
    let no_access = ConnectionRecord {
        access: None,
        ..fresh.clone()
    };
    assert_eq!(r2(&no_access, T0, false), Ok(()));
}
