//! Counterexamples the model checker found in the core, replayed step by step
//! through the model (every step must be enabled in the state it is taken from).
//! Before the fixes recorded in sim/VERIFICATION.md these paths broke S2 and S3;
//! now every safety property holds along them and the connection survives.

use stateright::Model;
use tokenfence_core::{ReauthReason, Status, Timestamp};
use tokenfence_sim::model::props::safety;
use tokenfence_sim::model::{Action, FaultKind, ModelConfig, State, StoreCommand, TokenfenceModel};
use tokenfence_sim::provider::BehaviourClass;

fn at(ms_after_t0: u64) -> Timestamp {
    Timestamp::from_millis(tokenfence_sim::model::T0.as_millis() + ms_after_t0)
}

/// Takes `actions` from the initial state, asserting each is enabled and that every
/// safety property holds after it. Returns the states.
fn replay(model: &TokenfenceModel, actions: &[Action]) -> Vec<State> {
    let mut states = vec![model.initial().clone()];
    for (i, action) in actions.iter().enumerate() {
        let last = states.last().expect("a state");
        let mut enabled = Vec::new();
        model.actions(last, &mut enabled);
        assert!(
            enabled.contains(action),
            "step {}: {action:?} is not enabled; enabled: {enabled:?}",
            i + 1
        );
        let next = model
            .next_state(last, action.clone())
            .expect("the step changes the state");
        for (name, holds) in safety() {
            assert!(
                holds(model, &next),
                "step {}: {name} broken after {action:?}",
                i + 1
            );
        }
        states.push(next);
    }
    states
}

/// Lets the workers finish without faults or time passing: repeatedly takes the
/// first enabled worker step, checking every safety property.
fn settle(model: &TokenfenceModel, mut state: State) -> State {
    for _ in 0..40 {
        let mut enabled = Vec::new();
        model.actions(&state, &mut enabled);
        let Some(action) = enabled.into_iter().find(|a| {
            matches!(
                a,
                Action::Store(_) | Action::Reply(_) | Action::GiveUp(_) | Action::Timer(_)
            )
        }) else {
            return state;
        };
        state = model.next_state(&state, action.clone()).expect("a step");
        for (name, holds) in safety() {
            assert!(holds(model, &state), "{name} broken after {action:?}");
        }
    }
    state
}

/// Two workers under `class`, with `faults` (at most `max_faults` per behaviour)
/// and `max_ticks` time jumps.
fn two_workers(
    class: BehaviourClass,
    faults: &[FaultKind],
    max_faults: u8,
    max_ticks: u8,
) -> TokenfenceModel {
    TokenfenceModel::new(ModelConfig {
        faults: faults.iter().copied().collect(),
        max_faults,
        max_ticks,
        ..ModelConfig::new(class, 2)
    })
    .expect("model")
}

/// Two workers under a provider that forks on replays in the grace window, no
/// faults, three time jumps: where the fork finds were made.
fn grace_fork_without_faults() -> TokenfenceModel {
    two_workers(BehaviourClass::GraceFork, &[], 1, 3)
}

#[test]
fn fork_sibling_minted_by_a_replay_in_doubt_is_not_dropped() {
    let model = grace_fork_without_faults();
    use Action::*;
    let states = replay(
        &model,
        &[
            Store(0),         // w1 loads g0 (rt1, access expired)
            Store(0),         // w1 takes the lease and sends rt1
            Reply(0),         // provider: rt1 -> rt2; w1 is slow to commit
            Tick(at(10_000)), // w1's lease expires
            Store(1),         // w2 loads g0 (and asks for the lease now)
            Store(1),         // w2 takes over the lease: in doubt, records the doubt (g1)
            Store(1),         // committed; w2 presents rt1 again (inside the grace window)
            Store(0),         // w1's CAS conflicts on g1, its tokens descend from rt1: rebase
            Store(0),         // w1 commits rt2 (g2)
            Reply(1),         // the fork provider mints rt3 for w2 and demotes rt2
            Store(1),         // w2's CAS conflicts with rt2: before the fix it dropped rt3
        ],
    );
    let last = states.last().expect("a state");
    assert!(
        matches!(&last.workers[1].pending, Some(StoreCommand::Cas { record, .. }) if record.refresh.expose() == "rt3"),
        "w2 must commit the newer sibling rt3"
    );
    let states = replay(
        &model,
        &[
            Store(0),
            Store(0),
            Reply(0),
            Tick(at(10_000)),
            Store(1),
            Store(1),
            Store(1),
            Store(0),
            Store(0),
            Reply(1),
            Store(1),
            Tick(at(40_000)), // rt2's grace window closes
            Store(1),         // w2 commits rt3
        ],
    );
    let last = states.last().expect("a state");
    let stored = last.stored().expect("a record");
    assert_eq!(stored.refresh.expose(), "rt3");
    assert!(last.provider.accepts("rt3", last.now));
}

#[test]
fn a_doubt_another_worker_acted_on_is_not_voided_by_an_unsent_request() {
    let model = two_workers(
        BehaviourClass::StrictRotation,
        &[FaultKind::ConnectError, FaultKind::Garbled],
        2,
        3,
    );
    use Action::*;
    let states = replay(
        &model,
        &[
            Store(0),         // w1 loads g0
            Store(1),         // w2 loads g0
            Store(0),         // w1 takes the lease and sends rt1
            Store(1),         // w2: lease held, polls
            ConnectError(0),  // w1's request never left: it will record Degraded on g0...
            Tick(at(10_000)), // ...but is slow; its lease expires
            Timer(1),         // w2 polls again
            Store(1),         // loads g0
            Store(1),         // takes over w1's lease: in doubt since w1's grant
            Store(1),         // records the doubt (g1) and presents rt1
            Garble(1),        // the provider rotates rt1 -> rt2, the reply is truncated
            Store(1),         // w2 records Degraded, still in doubt (g2)
            Tick(at(10_890)), // w2's retry time
            Timer(1),         // w2 retries
            Store(1),         // loads g2
            Store(1),         // takes the lease, presents rt1 again
            Reply(1),         // invalid_grant: rt1 was rotated by w2's own request
            Store(1),         // re-reads: same record, in doubt: LostRotation
            Store(1),         // commits ReauthRequired(LostRotation) (g3)
            Store(0),         // w1's Degraded CAS conflicts with g3
        ],
    );
    let last = states.last().expect("a state");
    // Before the fix w1 "voided" the doubt (its own request never left), revived the
    // connection and then replayed rt1, which its peer's request had rotated.
    assert!(
        last.workers[0].pending.is_none(),
        "w1 must not rebase over the lost rotation"
    );
    let stored = last.stored().expect("a record");
    assert!(matches!(
        stored.status,
        Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            ..
        }
    ));
}

#[test]
fn taking_over_a_lease_after_another_workers_late_commit_is_still_in_doubt() {
    let model = grace_fork_without_faults();
    use Action::*;
    let states = replay(
        &model,
        &[
            Store(0),         // w1 loads g0
            Store(0),         // w1 takes the lease and sends rt1
            Reply(0),         // rt1 -> rt2; w1 is slow to commit
            Tick(at(10_000)), // w1's lease expires
            Store(1),         // w2 loads g0 (and asks for the lease now)
            Store(1),         // w2 takes it over: in doubt, records the doubt (g1)
            Store(1),         // and presents rt1 again
            Store(0),         // w1's CAS conflicts on g1; rebases rt2
            Reply(1),         // the fork provider mints rt3, demotes rt2 (grace to T+40)
            Tick(at(40_000)), // both are slow; rt2's grace window closes
            Store(0),         // w1 commits rt2 (g2), late
            Store(0),         // w1 takes over w2's lease: the stored tokens predate
                              // w2's grant, so w2's refresh may have rotated them
        ],
    );
    let last = states.last().expect("a state");
    // Before the fix w1 presented rt2 at once, as if nothing were in doubt: a
    // replay outside the grace window (family revocation under reuse detection).
    let doubt_recorded = matches!(&last.workers[0].pending, Some(StoreCommand::Cas { record, .. }) if record.in_doubt_since.is_some());
    let presenting_in_doubt = last.workers[0]
        .conn
        .in_flight()
        .is_some_and(|base| base.in_doubt_since.is_some());
    assert!(
        doubt_recorded || presenting_in_doubt,
        "w1 must treat rt2 as in doubt before presenting it"
    );
    let last = settle(&model, last.clone());
    let stored = last.stored().expect("a record");
    assert_eq!(stored.status, Status::Active);
    assert!(
        last.provider.accepts(stored.refresh.expose(), last.now),
        "the connection survives on the newest fork"
    );
}

#[test]
fn an_unseen_request_leaves_its_doubt_on_a_record_that_still_holds_its_token() {
    let model = two_workers(BehaviourClass::Periodic, &[FaultKind::Garbled], 1, 3);
    use Action::*;
    let states = replay(
        &model,
        &[
            Store(0),         // w1 loads g0 (Intuit-like: rt1, period not over yet)
            Store(0),         // w1 takes the lease and sends rt1
            Store(1),         // w2 loads g0
            Tick(at(10_000)), // w1's request was never processed; its lease expires
            GiveUp(0),        // w1: outcome unknown -> Degraded, in doubt (its own send)
            Store(1),         // w2 takes over: in doubt, records the doubt (g1)
            Store(1),         // committed; w2 presents rt1
            Store(0),         // w1's CAS conflicts with g1, which still holds rt1
        ],
    );
    let last = states.last().expect("a state");
    // Before the fix w1 dropped its doubt here ("someone else's write stands"); later,
    // after its next request rotated rt1 unseen, the record still said nothing, and
    // rt1 was presented after Intuit's grace window as if nothing had happened.
    assert!(
        matches!(&last.workers[0].pending, Some(StoreCommand::Cas { record, .. })
            if record.in_doubt_since.is_some() && record.refresh.expose() == "rt1"),
        "w1 must carry its doubt onto the stored record"
    );
    let last = settle(&model, last.clone());
    let stored = last.stored().expect("a record");
    assert!(
        stored.is_live()
            || matches!(
                stored.status,
                Status::ReauthRequired {
                    reason: ReauthReason::LostRotation,
                    ..
                }
            )
    );
}

/// Find 18: the store grants a lease but its answer is lost; the worker retries.
/// Before the fix (lease requests without names, `UnnamedLeaseRequests`), the
/// retried grant reported the worker's own row as a takeover and, under reuse
/// detection, a healthy connection became `ReauthRequired(LostRotation)` although
/// nothing had been sent: the ghost-based S4 fails. With named requests the store
/// recognises its own grant and every property holds.
#[test]
fn a_lost_answer_to_a_lease_request_does_not_declare_a_rotation_lost() {
    use std::collections::BTreeSet;
    use tokenfence_sim::check::{run_check, CheckOptions};
    use tokenfence_sim::model::Strategy;
    let cfg = |strategy| ModelConfig {
        strategy,
        faults: BTreeSet::from([FaultKind::StoreFail]),
        max_faults: 1,
        max_ticks: 0,
        ..ModelConfig::new(BehaviourClass::ReuseDetection, 1)
    };
    let before = run_check(
        cfg(Strategy::UnnamedLeaseRequests),
        &CheckOptions::default(),
    )
    .expect("a valid configuration");
    let s4 = before
        .failures()
        .find(|p| p.property == "S4 sound re-auth")
        .unwrap_or_else(|| panic!("find 18 must fail S4 before its fix\n{}", before.render()));
    let trace = s4.trace.clone().expect("a trace").join("\n");
    assert!(
        trace.contains("the store fails (the command took effect)"),
        "{trace}"
    );
    assert!(trace.contains("LostRotation"), "{trace}");
    println!("find 18 before its fix:\n{trace}");
    let after = run_check(cfg(Strategy::Tokenfence), &CheckOptions::default())
        .expect("a valid configuration");
    assert!(after.all_hold(), "{}", after.render());
}

/// Found at 2 faults and 2 jumps under a forking provider: a worker that takes
/// over a lease on a token already in doubt (the stored doubt is the earlier one)
/// presented it without writing anything. Its replay minted a sibling that
/// demoted the paused holder's uncommitted token; the taker crashed; the holder's
/// commit landed on the unchanged record and cleared the doubt; when the demoted
/// token's grace window closed the connection was lost with nothing on record
/// (S2). Now the taker commits before presenting, the holder's commit conflicts,
/// and the rebase keeps the doubt.
#[test]
fn a_forking_takeover_on_a_token_in_doubt_writes_before_presenting() {
    // The fork provider mints rt3 on w1's replay; w2's takeover replay mints rt4
    // and demotes rt3, whose grace window closes at T+58 s.
    in_doubt_takeover_writes_before_presenting(BehaviourClass::GraceFork, 28_000, 58_000);
}

/// Found at 2 faults and 2 jumps under Intuit's periodic rotation (S2 and S3; the
/// first exhaustive run of that class at that bound, 201,876,017 unique states):
/// the same shape as the fork find above. w1's refresh inside the period leaves
/// `rt1` in place, and w1 pauses before committing; w2 takes over w1's expired
/// lease on a record whose doubt is already the earlier one, presents `rt1`
/// without writing, the period is over so the provider rotates it to `rt2`, and w2
/// crashes; w1's commit landed on the unchanged record and cleared the doubt, and
/// when `rt1`'s grace window closed the connection was lost with nothing on record
/// (or, in the S3 path, a later refresh replayed `rt1`). Now the taker writes
/// before presenting under periodic rotation too; the holder's commit conflicts
/// and its rebase keeps the doubt.
#[test]
fn a_periodic_takeover_on_a_token_in_doubt_writes_before_presenting() {
    // Inside the period w1's replay leaves rt1 in place; at T+38 s the period is
    // over and w2's takeover replay rotates rt1 to rt2; rt1's grace window closes
    // at T+78 s.
    in_doubt_takeover_writes_before_presenting(BehaviourClass::Periodic, 38_000, 78_000);
}

/// Finds 25 and 28: w1's reply is truncated (doubt recorded), w1 presents `rt1`
/// again and pauses before committing; at `takeover_ms` w2 takes over w1's
/// expired lease and must write before presenting; it presents, crashes, and its
/// request reaches the provider; at `window_closes_ms` w1's commit conflicts and
/// its rebase keeps the doubt: the loss is on record.
fn in_doubt_takeover_writes_before_presenting(
    class: BehaviourClass,
    takeover_ms: u64,
    window_closes_ms: u64,
) {
    let model = two_workers(class, &[FaultKind::Garbled, FaultKind::Crash], 2, 2);
    use Action::*;
    let prefix = [
        Store(0),              // w1 loads g0 (rt1)
        Store(1),              // w2 loads g0
        Store(0),              // w1 takes the lease and sends rt1
        Store(1),              // w2: the lease is held
        Garble(0),             // the reply is truncated: w1 records the doubt
        Store(0),              // g1: rt1 in doubt since T+0
        Tick(at(932)),         // w1's retry time
        Timer(0),              //
        Store(0),              // w1 loads g1
        Store(0),              // w1 takes the lease and presents rt1 again
        Reply(0),              // answered; w1 pauses before committing
        Tick(at(takeover_ms)), // w1's lease has expired
        Timer(1),              //
        Store(1),              // w2 loads g1
        Store(1),              // w2 takes over w1's lease
    ];
    let states = replay(&model, &prefix);
    let last = states.last().expect("a state");
    assert!(
        matches!(&last.workers[1].pending, Some(StoreCommand::Cas { .. })),
        "w2 must write before presenting rt1 (before the fix it sent at once)"
    );
    let mut path = prefix.to_vec();
    path.extend([
        Store(1),                   // w2's write lands (g2); w2 presents rt1
        Crash(1),                   // and crashes
        OrphanArrives(0),           // its request mints a token nobody receives
        Tick(at(window_closes_ms)), // the grace window of w1's token closes
        Store(0),                   // w1's commit conflicts with g2: the rebase keeps the doubt
    ]);
    let states = replay(&model, &path);
    let last = settle(&model, states.last().expect("a state").clone());
    let stored = last.stored().expect("a record");
    assert!(
        stored.in_doubt_since.is_some() || !stored.is_live(),
        "the loss must be on record: {stored:?}"
    );
}

/// Found at 2 faults and 2 jumps under a forking provider (R2): w2 resolves a
/// lease request whose answer was lost (the scheduler's look-after: refresh even
/// if not due), refreshes, and its commit lands with the answer lost; w1 then
/// refreshes and commits; w2's retry conflicts with w1's newer record and, still
/// asked to look after the connection, sent a refresh the record did not need.
/// Now a scheduler's request is met by any refresh sent since it asked.
#[test]
fn a_look_after_request_is_met_by_another_workers_later_refresh() {
    let model = two_workers(BehaviourClass::GraceFork, &[FaultKind::StoreFail], 2, 2);
    use Action::*;
    let states = replay(
        &model,
        &[
            Store(0),         // w1 loads g0 (rt1)
            Store(1),         // w2 loads g0
            Store(0),         // w1 takes the lease and sends rt1; its reply is slow
            Tick(at(10_000)), // w1's lease expires
            Store(1),         // w2 takes it over: records the doubt (g1)
            Store(1),         // committed, lease released with it
            Store(1),         // w2 reads g1
            Store(1),         // w2 takes the lease and presents rt1 (grace window)
            Reply(1),         // rt1 -> rt2 for w2
            GiveUp(0),        // w1 stops waiting: records its own doubt
            Store(0),         // conflict on g1
            Store(0),         // w1 commits its doubt on g1 (g2)
            Store(1),         // w2's commit of rt2 conflicts, rebases (g3, doubt kept)
            Store(1),         // committed
            Timer(1),         // the doubt on record is work: w2 reads again
            Store(1),         //
            StoreFails {
                w: 1,
                applied: false,
            }, // w2's lease request: its answer is lost
            Tick(at(10_890)), //
            Timer(1),         // w2 resolves it: looks after the connection
            Store(1),         //
            Store(1),         // the lease, under the same name; w2 presents rt2
            Reply(1),         // rt2 -> rt3
            StoreFails {
                w: 1,
                applied: true,
            }, // w2's commit of rt3 lands (g4), its answer is lost
            Tick(at(40_890)), // at3 is inside its margin
            Timer(1),         // w2 retries its commit later
            Timer(0),         //
            Store(0),         // w1 reads g4
            Store(0),         // takes the lease, presents rt3
            Reply(0),         // rt3 -> rt4
            Store(0),         // w1 commits rt4 (g5)
            Store(1),         // w2's retry conflicts with g5
        ],
    );
    // Before the fix w2, still asked to look after the connection, took the
    // lease and presented rt4: R2 broken in `settle`.
    let last = settle(&model, states.last().expect("a state").clone());
    assert_eq!(last.stored().expect("a record").refresh.expose(), "rt4");
}
