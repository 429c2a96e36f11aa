//! The oracles bite: each strengthened check of the property test and the fuzz
//! harness is shown to fail on a state it must reject, so a check that passes
//! everywhere is not one that cannot fail.

mod support;

use std::time::Duration;
use support::*;
use tokenfence_core::invariants::{self, ProviderTruth, Unsettled, Violation};
use tokenfence_core::*;

/// A provider that still accepts every token and ended nothing: only the ghost can
/// justify a re-auth flag.
struct AcceptsAll;

impl ProviderTruth for AcceptsAll {
    fn accepts(&self, _: &RefreshToken) -> bool {
        true
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

/// A provider whose only fact is that the stored token's successor went to
/// nobody (a lost reply, a crashed receiver) and that it no longer accepts it.
struct SuccessorLost;

impl ProviderTruth for SuccessorLost {
    fn accepts(&self, _: &RefreshToken) -> bool {
        false
    }
    fn ended_by_provider(&self) -> bool {
        false
    }
    fn replayed_outside_grace(&self) -> bool {
        false
    }
    fn successor_lost(&self, _: &RefreshToken) -> bool {
        true
    }
}

/// S2's allowance for a fault's loss is INVARIANTS.md's: a provider with no grace
/// window. Under a grace window (Intuit) an active record without a doubt whose
/// successor is gone is a dropped doubt, excused only while the record carries the
/// doubt or the harness's ghost holds the request that presented the token.
#[test]
fn s2_excuses_a_fault_under_a_grace_window_only_while_the_loss_is_known() {
    let s2 = |profile: &ProviderProfile, stored: &ConnectionRecord, ghost: &[Unsettled]| {
        invariants::no_self_inflicted_loss(stored, profile, false, [], ghost, &SuccessorLost)
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
        invariants::sound_reauth(&stored, &profile, &AcceptsAll, []),
        unsound
    );
    // A request really sent presenting another token justifies nothing either.
    let other = Unsettled {
        token: RefreshToken::new("RT-0"),
        lease_at: T0,
        generation: Some(Generation(1)),
    };
    assert_eq!(
        invariants::sound_reauth(&stored, &profile, &AcceptsAll, [&other]),
        unsound
    );
    // A request really sent presenting the stored token, outcome never seen: sound.
    let sent = Unsettled {
        token: RefreshToken::new("RT-1"),
        lease_at: T0,
        generation: Some(Generation(1)),
    };
    assert_eq!(
        invariants::sound_reauth(&stored, &profile, &AcceptsAll, [&other, &sent]),
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
        invariants::sound_reauth_within(&early, &profile, safety, &AcceptsAll, [&sent]).is_err()
    );
    let late = declared_lost(&profile, T0, T0.saturating_add(hours(25)));
    assert_eq!(
        invariants::sound_reauth_within(&late, &profile, safety, &AcceptsAll, [&sent]),
        Ok(())
    );
    // The doubt the record claims (since T0) changes nothing without the request.
    assert!(invariants::sound_reauth_within(&late, &profile, safety, &AcceptsAll, []).is_err());
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
    invariants::sound_reauth_within(stored, &profile, safety, &AcceptsAll, world.unsettled())
        .expect("S4 from the ghost");
    assert!(invariants::sound_reauth_within(stored, &profile, safety, &AcceptsAll, []).is_err());
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
