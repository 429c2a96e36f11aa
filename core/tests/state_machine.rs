//! proptest-state-machine: random interleavings of callers, provider answers,
//! faults, crashes, store outages and time against real `Connection`s, checked
//! after every step with the invariant predicates, and at the end against a
//! reference model that predicts whether the connection must still be alive.

mod support;

use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use std::time::Duration;
use support::provider::MiniProvider;
use support::*;
use tokenfence_core::*;

#[derive(Clone, Copy, Debug)]
enum Class {
    Intuit,
    Grace30Min,
    StrictReuseDetecting,
    StrictNoGrace,
    NonRotating,
}

impl Class {
    fn profile(self) -> ProviderProfile {
        let url = "https://auth.example/token";
        match self {
            Class::Intuit => ProviderProfile::intuit(),
            Class::Grace30Min => ProviderProfile::xero(),
            Class::StrictReuseDetecting => ProviderProfile::strict_reuse_detecting("strict", url),
            Class::StrictNoGrace => ProviderProfile::github_app(),
            Class::NonRotating => ProviderProfile::google(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    ServerError,
    RateLimited,
    HtmlPage,
    LostAfterProcessing,
    NotSent,
    GarbageSuccessAfterProcessing,
}

#[derive(Clone, Debug)]
enum Step {
    Request(usize),
    Answer(usize),
    Fail(usize, Fault),
    Advance(Duration),
    Tick(usize),
    Crash(usize),
    StoreOutage,
    /// The store carries out the next command but its answer is lost (a lease
    /// granted, a commit landed, unbeknown to the worker).
    StoreLosesAnswer,
    UserRevokes,
    /// A caller of worker `w` reports that the API refused a token this worker
    /// handed out: the latest (`false`) or the first (`true`: a late 401).
    Reject(usize, bool),
}

/// The reference model: what must be true of the connection at the end.
#[derive(Clone, Debug)]
struct Reference {
    class: Class,
    workers: usize,
    user_revoked: bool,
}

impl ReferenceStateMachine for Reference {
    type State = Reference;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Reference> {
        let class = prop_oneof![
            Just(Class::Intuit),
            Just(Class::Grace30Min),
            Just(Class::StrictReuseDetecting),
            Just(Class::StrictNoGrace),
            Just(Class::NonRotating),
        ];
        (class, 1usize..=3)
            .prop_map(|(class, workers)| Reference {
                class,
                workers,
                user_revoked: false,
            })
            .boxed()
    }

    fn transitions(state: &Reference) -> BoxedStrategy<Step> {
        let w = 0..state.workers;
        let fault = prop_oneof![
            Just(Fault::ServerError),
            Just(Fault::RateLimited),
            Just(Fault::HtmlPage),
            Just(Fault::LostAfterProcessing),
            Just(Fault::NotSent),
            Just(Fault::GarbageSuccessAfterProcessing),
        ];
        let advance = prop_oneof![
            Just(Duration::from_secs(1)),
            Just(Duration::from_secs(20)),
            Just(Duration::from_secs(61)),
            Just(hours(1)),
            Just(hours(25)),
        ];
        prop_oneof![
            6 => w.clone().prop_map(Step::Request),
            8 => w.clone().prop_map(Step::Answer),
            3 => (w.clone(), fault).prop_map(|(w, f)| Step::Fail(w, f)),
            4 => advance.prop_map(Step::Advance),
            4 => w.clone().prop_map(Step::Tick),
            1 => w.clone().prop_map(Step::Crash),
            1 => Just(Step::StoreOutage),
            1 => Just(Step::StoreLosesAnswer),
            1 => Just(Step::UserRevokes),
            2 => (w, any::<bool>()).prop_map(|(w, late)| Step::Reject(w, late)),
        ]
        .boxed()
    }

    fn preconditions(state: &Reference, step: &Step) -> bool {
        match step {
            Step::Request(w)
            | Step::Answer(w)
            | Step::Fail(w, _)
            | Step::Tick(w)
            | Step::Crash(w)
            | Step::Reject(w, _) => *w < state.workers,
            _ => true,
        }
    }

    fn apply(mut state: Reference, step: &Step) -> Reference {
        if let Step::UserRevokes = step {
            state.user_revoked = true;
        }
        state
    }
}

struct Sut {
    world: World,
    provider: MiniProvider,
    profile: ProviderProfile,
    requests: Vec<(usize, RequestId)>,
    /// The generation stored before the last step (S1: it never goes down).
    last_generation: Generation,
    /// A worker crashed in the middle of a refresh. Under reuse detection (or with
    /// no grace window) nobody can know whether it sent the token, so LostRotation
    /// is the honest outcome, when S4's ghost allows it.
    crashed_mid_refresh: bool,
}

impl Sut {
    fn any_outstanding(&self) -> bool {
        self.world.workers.iter().any(|w| w.outstanding.is_some())
    }

    fn answer(&mut self, w: usize) {
        if let Some(req) = self.world.workers[w].outstanding.clone() {
            self.provider.set_now(self.world.now);
            let reply = self.provider.answer(&req);
            self.world.reply(w, reply);
        }
    }

    fn fail(&mut self, w: usize, fault: Fault) {
        let Some(req) = self.world.workers[w].outstanding.clone() else {
            return;
        };
        self.provider.set_now(self.world.now);
        match fault {
            Fault::ServerError => self.world.reply(w, json_reply(503, "")),
            Fault::RateLimited => {
                let mut r = json_reply(429, "");
                r.headers.push(("retry-after".into(), "2".into()));
                self.world.reply(w, r)
            }
            Fault::HtmlPage => self
                .world
                .reply(w, json_reply(502, "<html>Bad Gateway</html>")),
            Fault::NotSent => self.world.lose(w, Input::NotSent),
            Fault::LostAfterProcessing => {
                let _ = self.provider.answer(&req);
                self.provider.lost_reply(&req);
                self.world.lose(w, Input::OutcomeUnknown);
            }
            Fault::GarbageSuccessAfterProcessing => {
                let _ = self.provider.answer(&req);
                self.provider.lost_reply(&req);
                self.world.reply(w, json_reply(200, "<html>login</html>"));
            }
        }
    }

    /// Heal: no more faults; answer everything and fire timers until every caller
    /// has been answered (L1).
    fn heal(&mut self) {
        self.world.store.fail_next = 0;
        self.world.store.lose_next = 0;
        for _ in 0..500 {
            for _ in 0..100 {
                if !self.any_outstanding() {
                    break;
                }
                for w in 0..self.world.workers.len() {
                    self.answer(w);
                }
            }
            let busy = self.world.workers.iter().any(|w| w.conn.is_busy());
            if self.all_resolved() && !self.any_outstanding() && !busy {
                return;
            }
            let next = (0..self.world.workers.len())
                .filter_map(|w| self.world.workers[w].conn.poll_timeout().map(|t| (t, w)))
                .min();
            match next {
                Some((t, w)) => {
                    self.world.now = self.world.now.max(t);
                    self.world.tick(w);
                }
                None if self.any_outstanding() => {}
                None => break,
            }
        }
        let phases: Vec<_> = self
            .world
            .workers
            .iter()
            .map(|w| {
                (
                    w.conn.is_busy(),
                    w.conn.poll_timeout(),
                    w.outstanding.is_some(),
                )
            })
            .collect();
        panic!("L1: heal did not settle at {}: {phases:?}", self.world.now);
    }

    /// S1-S4 and S8 on the world as it is now. S4 is judged from the harness's
    /// ghost (refresh requests really sent whose outcome has not reached the
    /// store), never from the doubt the core recorded.
    fn check(&self) {
        let stored = self.world.stored();
        invariants::generation_monotonic(self.last_generation, stored.generation).expect("S1");
        if let Some(v) = self.world.store.violations.first() {
            panic!("{v}");
        }
        let workers = &self.world.workers;
        let resolving = workers
            .iter()
            .any(|w| w.outstanding.is_some() || w.conn.uncommitted().is_some());
        let pending = workers
            .iter()
            .filter_map(|w| w.conn.uncommitted().map(|r| &r.refresh));
        if let Err(v) = invariants::no_self_inflicted_loss(
            stored,
            &self.profile,
            resolving,
            pending,
            self.world.may_have_rotated(),
            &self.provider,
        ) {
            panic!("{v}: stored {stored:?}");
        }
        invariants::no_self_inflicted_replay(&self.provider).expect("S3");
        let safety = workers[0].conn.config().settings.in_doubt_safety;
        if let Err(v) = invariants::sound_reauth_within(
            stored,
            &self.profile,
            safety,
            &self.provider,
            self.world.may_have_rotated(),
        ) {
            let unsettled: Vec<_> = self.world.may_have_rotated().collect();
            panic!("{v}: stored {stored:?}, unsettled {unsettled:?}");
        }
        let in_flight = workers.iter().filter(|w| w.outstanding.is_some()).count();
        invariants::single_flight(in_flight, !self.world.leases_broken).expect("S8");
    }

    fn all_resolved(&self) -> bool {
        self.requests
            .iter()
            .all(|(w, id)| self.world.result(*w, *id).is_some())
    }
}

struct CoreAgainstReference;

impl StateMachineTest for CoreAgainstReference {
    type SystemUnderTest = Sut;
    type Reference = Reference;

    fn init_test(reference: &Reference) -> Sut {
        let profile = reference.class.profile();
        let world = World::new(profile.clone(), reference.workers, |c| {
            record(c, "RT-1", T0)
        });
        Sut {
            provider: MiniProvider::new(profile.rotation, "RT-1", T0),
            world,
            profile,
            requests: vec![],
            last_generation: Generation(1),
            crashed_mid_refresh: false,
        }
    }

    fn apply(mut sut: Sut, _reference: &Reference, step: Step) -> Sut {
        sut.last_generation = sut.world.stored().generation;
        match step {
            Step::Request(w) => {
                let id = sut.world.request(w);
                sut.requests.push((w, id));
            }
            Step::Answer(w) => sut.answer(w),
            Step::Fail(w, fault) => sut.fail(w, fault),
            Step::Advance(d) => {
                sut.world.advance(d);
                // A worker whose request outlives its lease is a paused worker: from
                // then on S8 no longer applies (S1-S4 still must).
                let now = sut.world.now;
                let expired = sut.world.workers.iter().any(|w| {
                    let safety = w.conn.config().settings.send_safety;
                    w.outstanding
                        .as_ref()
                        .is_some_and(|r| r.send_deadline.saturating_add(safety) <= now)
                });
                sut.world.leases_broken |= expired;
            }
            Step::Tick(w) => sut.world.tick(w),
            Step::Crash(w) => {
                sut.crashed_mid_refresh |= sut.world.workers[w].conn.is_busy();
                if let Some(req) = sut.world.workers[w].outstanding.clone() {
                    sut.provider.set_now(sut.world.now);
                    let _ = sut.provider.answer(&req);
                    sut.provider.lost_reply(&req);
                }
                if sut.world.workers[w].conn.uncommitted().is_some() {
                    let stored = sut.world.stored().refresh.expose().to_string();
                    sut.provider.lost_successor(&stored);
                }
                sut.requests.retain(|(rw, _)| *rw != w);
                sut.world.crash(w);
            }
            Step::StoreOutage => sut.world.store.fail_next = 1,
            Step::StoreLosesAnswer => sut.world.store.lose_next = 1,
            Step::UserRevokes => sut.provider.revoked_by_user = true,
            Step::Reject(w, late) => {
                let mut served = sut.world.workers[w]
                    .delivered
                    .iter()
                    .filter_map(|(_, r)| r.as_ref().ok());
                let token = if late {
                    served.next()
                } else {
                    served.next_back()
                };
                if let Some(token) = token.map(|t| t.expose().to_string()) {
                    let id = sut.world.reject(w, &token);
                    sut.requests.push((w, id));
                }
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, _reference: &Reference) {
        sut.check();
    }

    fn teardown(mut sut: Sut, reference: Reference) {
        sut.last_generation = sut.world.stored().generation;
        sut.heal();
        // Past every retry gate and cached verdict, one more caller. Timers due
        // meanwhile fire, as a driver's would (a worker resolving a lease request
        // whose answer was lost does so on its timer, without a caller).
        let settings = sut.world.workers[0].conn.config().settings.clone();
        let until = sut
            .world
            .now
            .saturating_add(settings.backoff_max + settings.dead_recheck);
        for _ in 0..100 {
            let next = (0..sut.world.workers.len())
                .filter_map(|w| sut.world.workers[w].conn.poll_timeout().map(|t| (t, w)))
                .filter(|(t, _)| *t <= until)
                .min();
            let Some((t, w)) = next else { break };
            sut.world.now = sut.world.now.max(t);
            sut.world.tick(w);
            sut.heal();
        }
        sut.world.now = sut.world.now.max(until);
        let id = sut.world.request(0);
        sut.requests.push((0, id));
        sut.heal();
        let result = sut.world.result(0, id).cloned();
        // S1-S4 and S8 once more on the healed world: in particular a final
        // LostRotation must be justified by the ghost (S4).
        sut.check();
        // The reference model: unless the user revoked or a fault lost a rotation,
        // the connection is alive and serves a token after healing; otherwise the
        // answer is a token or an explicit re-auth, never a transient shrug. A
        // successor the provider issued and nobody received excuses a LostRotation
        // (S4 above says whether the grace window had closed). A crash alone
        // excuses it only where the core is designed to declare a rotation lost it
        // cannot see (reuse detection, or no grace window); under a grace window
        // (Intuit, Xero) the doubt a crash leaves must be recovered inside it.
        let rotation = &sut.profile.rotation;
        let declares_lost = rotation.reuse_detection || rotation.grace.is_zero();
        // Two lease grants whose answers were both lost, the second displacing the
        // first: a worker that takes the chain over declares the rotation lost, and
        // only both holders together could undo it (README, "Left out so far").
        let forced = sut.crashed_mid_refresh || sut.world.store.phantom_chain;
        let lost = sut.provider.lost_any() || (declares_lost && forced);
        match result {
            Some(Ok(_)) => {}
            Some(Err(AccessError::ReauthRequired(reason))) if reference.user_revoked || lost => {
                if !reference.user_revoked {
                    assert_eq!(
                        reason,
                        ReauthReason::LostRotation,
                        "a lost rotation says so"
                    );
                }
            }
            other => panic!(
                "after healing (user revoked: {}, rotation lost: {lost}) got {other:?}",
                reference.user_revoked
            ),
        }
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        // TOKENFENCE_CASES=100000 for a long run.
        cases: std::env::var("TOKENFENCE_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
        max_shrink_iters: 20_000,
        .. ProptestConfig::default()
    })]
    #[test]
    fn core_against_reference_model(sequential 1..60 => CoreAgainstReference);
}

/// The property test's S1 check bites: the same steps with a store that writes
/// every compare-and-swap make `check` fail (a stale commit landed, the stored
/// generation went down); with the faithful store they pass.
#[test]
fn s1_check_of_the_property_test_bites() {
    let run = |mutation: Option<Mutation>| {
        let reference = Reference {
            class: Class::StrictNoGrace,
            workers: 2,
            user_revoked: false,
        };
        let mut sut = CoreAgainstReference::init_test(&reference);
        sut.world.store.mutation = mutation;
        let steps = [
            Step::Request(0),
            Step::Advance(Duration::from_secs(61)),
            Step::Request(1),
            Step::Answer(0),
            Step::Answer(1),
        ];
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            for step in steps {
                sut = CoreAgainstReference::apply(sut, &reference, step);
                sut.check();
            }
        }))
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    };
    assert_eq!(run(None), Ok(()));
    let err = run(Some(Mutation::WriteUnconditionally)).expect_err("S1 must fail");
    assert!(err.contains("S1"), "{err}");
    let err = run(Some(Mutation::RewriteExpected)).expect_err("S1 must fail");
    assert!(err.contains("S1 stale overwrite"), "{err}");
}

/// The end check no longer excuses a LostRotation by a crash under a grace window:
/// a worker sends, the provider answers 503 (nothing rotated), the commit of the
/// failure fails, the worker crashes, a day passes, and the connection is found
/// declared lost (as a core that gave up would leave it). S4 from the ghost allows
/// the flag (a request was sent and never settled, the grace window has closed),
/// but nothing was lost: under Intuit the end check fails; where the core is
/// designed to declare lost rotations (no grace window) the crash still excuses it.
#[test]
fn end_check_does_not_excuse_a_lost_rotation_by_a_crash_under_grace() {
    let run = |class: Class| {
        let reference = Reference {
            class,
            workers: 1,
            user_revoked: false,
        };
        let mut sut = CoreAgainstReference::init_test(&reference);
        let steps = [
            Step::Request(0),
            Step::StoreOutage,
            Step::Fail(0, Fault::ServerError),
            Step::Crash(0),
            Step::Advance(hours(25)),
        ];
        for step in steps {
            sut = CoreAgainstReference::apply(sut, &reference, step);
            sut.check();
        }
        assert!(sut.crashed_mid_refresh && !sut.provider.lost_any());
        let now = sut.world.now;
        let stored = sut.world.store.record.as_mut().expect("stored");
        stored.status = Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            since: now,
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            CoreAgainstReference::teardown(sut, reference)
        }))
        .map_err(|e| e.downcast_ref::<String>().cloned().unwrap_or_default())
    };
    let err = run(Class::Intuit).expect_err("not excused under a grace window");
    assert!(err.contains("after healing"), "{err}");
    assert_eq!(run(Class::StrictNoGrace), Ok(()));
}

/// The property test's S4 check bites: a record declared lost with a doubt the
/// core wrote but no request really sent fails it; once a request presenting the
/// stored token was lost after processing (and the grace window closed), the same
/// declaration passes.
#[test]
fn s4_check_of_the_property_test_bites() {
    let reference = Reference {
        class: Class::Intuit,
        workers: 1,
        user_revoked: false,
    };
    let declare_lost = |sut: &mut Sut| {
        let now = sut.world.now;
        let stored = sut.world.store.record.as_mut().expect("stored");
        stored.in_doubt_since = Some(T0);
        stored.status = Status::ReauthRequired {
            reason: ReauthReason::LostRotation,
            since: now,
        };
    };
    let mut sut = CoreAgainstReference::init_test(&reference);
    sut = CoreAgainstReference::apply(sut, &reference, Step::Advance(hours(25)));
    declare_lost(&mut sut);
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sut.check()))
        .map_err(|e| e.downcast_ref::<String>().cloned().unwrap_or_default())
        .expect_err("S4 must fail");
    assert!(err.starts_with("S4 unsound re-auth"), "{err}");

    let mut sut = CoreAgainstReference::init_test(&reference);
    for step in [
        Step::Request(0),
        Step::Fail(0, Fault::LostAfterProcessing),
        Step::Advance(hours(25)),
    ] {
        sut = CoreAgainstReference::apply(sut, &reference, step);
    }
    declare_lost(&mut sut);
    sut.check();
}

/// Found by the property test (30,000 cases): under reuse detection a worker's
/// lease request is refused with its answer lost, its retry under the same name
/// is granted with its answer lost too, and another worker takes that grant over
/// and declares the rotation lost. The first worker must recognise the grant (it
/// read a newer record before the retry) and undo the declaration: nothing was
/// sent under it. Before the fix it kept only the first read, and the connection
/// stayed dead.
#[test]
fn a_retried_lease_request_granted_after_a_lost_refusal_is_recognised() {
    use Step::*;
    let reference = Reference {
        class: Class::StrictReuseDetecting,
        workers: 3,
        user_revoked: false,
    };
    let mut sut = CoreAgainstReference::init_test(&reference);
    for step in [
        Request(1),
        Tick(0),
        Request(0),
        StoreLosesAnswer,
        Request(2),
        Answer(1),
        Advance(hours(1)),
        StoreLosesAnswer,
        Tick(2),
        Advance(Duration::from_secs(61)),
    ] {
        sut = CoreAgainstReference::apply(sut, &reference, step);
        sut.check();
    }
    CoreAgainstReference::teardown(sut, reference);
}

/// Found with the fix above (30,000 cases): a retry's newer read must not let a
/// worker undo a declaration whose doubt began at its first request's grant,
/// before the retry was made: another worker took that grant over, presented the
/// token and crashed; the rotation is really lost and must say so.
#[test]
fn a_retry_read_does_not_undo_a_declaration_over_an_earlier_grant() {
    use Step::*;
    let reference = Reference {
        class: Class::StrictNoGrace,
        workers: 2,
        user_revoked: false,
    };
    let mut sut = CoreAgainstReference::init_test(&reference);
    for step in [
        StoreOutage,
        StoreLosesAnswer,
        Request(0),
        Crash(0),
        Request(0),
        Advance(Duration::from_secs(61)),
        Request(1),
        Crash(1),
        Request(0),
        StoreLosesAnswer,
        Answer(0),
        Tick(0),
        Request(0),
        Request(1),
    ] {
        sut = CoreAgainstReference::apply(sut, &reference, step);
        sut.check();
    }
    CoreAgainstReference::teardown(sut, reference);
}
