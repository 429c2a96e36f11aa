//! The real core, driven by the model, keeps every property of INVARIANTS.md for every
//! provider behaviour class, with 2 and 3 workers and every runtime fault kind
//! (5xx, 429, connect errors, lost and truncated replies, pauses, crashes, user
//! revocation, store failures; one per behaviour), plus a misconfigured worker (S7).

mod common;

use common::{assert_all_hold, config};
use tokenfence_sim::check::Search;
use tokenfence_sim::model::{FaultKind, ModelConfig, ModelProvider};
use tokenfence_sim::provider::BehaviourClass::{self, *};

fn two_workers(class: BehaviourClass) {
    let report = assert_all_hold(config(class, 2, 1), Search::Bfs);
    assert!(report.unique_states > 5_000, "{}", report.unique_states);
}

fn three_workers(class: BehaviourClass) {
    let report = assert_all_hold(config(class, 3, 1), Search::Dfs);
    assert!(report.unique_states > 5_000, "{}", report.unique_states);
}

#[test]
fn non_rotating_two_workers() {
    two_workers(NonRotating);
}

#[test]
fn strict_rotation_two_workers() {
    two_workers(StrictRotation);
}

#[test]
fn grace_idempotent_two_workers() {
    two_workers(GraceIdempotent);
}

#[test]
fn grace_fork_two_workers() {
    two_workers(GraceFork);
}

#[test]
fn periodic_intuit_two_workers() {
    two_workers(Periodic);
}

#[test]
fn reuse_detection_two_workers() {
    two_workers(ReuseDetection);
}

#[test]
fn non_rotating_three_workers() {
    three_workers(NonRotating);
}

#[test]
fn strict_rotation_three_workers() {
    three_workers(StrictRotation);
}

#[test]
fn grace_idempotent_three_workers() {
    three_workers(GraceIdempotent);
}

#[test]
fn grace_fork_three_workers() {
    three_workers(GraceFork);
}

#[test]
fn periodic_intuit_three_workers() {
    three_workers(Periodic);
}

#[test]
fn reuse_detection_three_workers() {
    three_workers(ReuseDetection);
}

#[test]
fn misconfigured_worker_never_sends_with_the_wrong_credentials() {
    for class in BehaviourClass::ALL {
        let cfg = ModelConfig {
            faults: [
                FaultKind::WrongClient,
                FaultKind::LostReply,
                FaultKind::Pause,
            ]
            .into_iter()
            .collect(),
            max_ticks: 1,
            ..ModelConfig::new(class, 1)
        };
        assert_all_hold(cfg, Search::Bfs);
    }
}

/// Deeper bounds (issue 9): two faults per behaviour. The known core bugs needed
/// two faults; 2 workers, DFS with symmetry (sound: every worker has the same
/// configuration).
fn two_faults(class: BehaviourClass, max_ticks: u8) {
    let cfg = ModelConfig {
        max_faults: 2,
        ..config(class, 2, max_ticks)
    };
    let report = assert_all_hold(cfg, Search::Dfs);
    assert!(report.unique_states > 50_000, "{}", report.unique_states);
}

#[test]
fn non_rotating_two_faults() {
    two_faults(NonRotating, 1);
}

#[test]
fn strict_rotation_two_faults() {
    two_faults(StrictRotation, 1);
}

#[test]
fn grace_idempotent_two_faults() {
    two_faults(GraceIdempotent, 1);
}

#[test]
fn grace_fork_two_faults() {
    two_faults(GraceFork, 1);
}

#[test]
fn periodic_intuit_two_faults() {
    two_faults(Periodic, 1);
}

/// Where lost lease answers, takeovers and declared lost rotations meet (finds
/// 18, 20, 21): two faults and two time jumps.
#[test]
fn reuse_detection_two_faults_two_jumps() {
    two_faults(ReuseDetection, 2);
}

/// The API's 401 (issue 12): each worker's caller reports the token it was
/// served once (`Input::Rejected`), with lost replies, crashes and store
/// failures. R1 (a refused token is not served again) and R2 (no refresh the
/// stored record did not need: late reports and second reports send nothing)
/// hold with S1-S9 and L1. R2 is checked in every other run too.
fn rejects(class: BehaviourClass) {
    let cfg = ModelConfig {
        rejects: 1,
        faults: [FaultKind::LostReply, FaultKind::Crash, FaultKind::StoreFail]
            .into_iter()
            .collect(),
        ..config(class, 2, 1)
    };
    let report = assert_all_hold(cfg, Search::Bfs);
    assert!(report.unique_states > 50_000, "{}", report.unique_states);
}

#[test]
fn strict_rotation_rejects() {
    rejects(StrictRotation);
}

#[test]
fn grace_idempotent_rejects() {
    rejects(GraceIdempotent);
}

#[test]
fn grace_fork_rejects() {
    rejects(GraceFork);
}

#[test]
fn periodic_intuit_rejects() {
    rejects(Periodic);
}

#[test]
fn reuse_detection_rejects() {
    rejects(ReuseDetection);
}

#[test]
fn a_provider_profile_file_is_model_checked() {
    // The example profile for users (not a built-in class): rotation with a grace
    // window *and* reuse detection outside it, its lifetimes scaled to seconds.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../profiles/auth0.toml");
    let profile = tokenfence_core::ProviderProfile::named_or_file(path).expect("valid");
    let provider = ModelProvider::Profile(Box::new(profile));
    let spec = provider.spec();
    assert!(spec.profile.rotation.reuse_detection && !spec.profile.rotation.grace.is_zero());
    let report = assert_all_hold(config(provider, 2, 1), Search::Bfs);
    assert_eq!(report.provider, "profile auth0");
    assert!(report.unique_states > 5_000, "{}", report.unique_states);
}

/// A state budget (`check --max-states`, for `--deep`) stops the search: what did
/// not fail by then is undecided, never "holds".
#[test]
fn a_state_budget_leaves_the_verdicts_undecided() {
    use tokenfence_sim::check::{run_check, CheckOptions, Search, Verdict};
    let opts = CheckOptions {
        search: Search::Dfs,
        symmetry: true,
        max_states: Some(2_000),
        ..CheckOptions::default()
    };
    let report = run_check(config(StrictRotation, 2, 1), &opts).expect("valid");
    assert!(!report.exhaustive);
    assert!(
        report.states >= 2_000 && report.states < 45_000,
        "{}",
        report.states
    );
    let s1 = report
        .properties
        .iter()
        .find(|p| p.property == "S1 no stale overwrite")
        .expect("S1 is checked");
    assert_eq!(s1.verdict, Verdict::Undecided);
}

/// Random walks (`check --search random`, for the deep profile) are a real search:
/// they find a baseline's counterexample, with its trace; and over the real core
/// they prove nothing (what did not fail is undecided).
#[test]
fn random_walks_find_a_baselines_failure_and_prove_nothing_else() {
    use std::collections::BTreeSet;
    use tokenfence_sim::check::{run_check, CheckOptions, Search, Verdict};
    use tokenfence_sim::model::Strategy;
    let opts = CheckOptions {
        search: Search::Random(7),
        max_states: Some(200_000),
        stop_at_first_failure: true,
        ..CheckOptions::default()
    };
    let b1 = ModelConfig {
        strategy: Strategy::NaiveB1,
        faults: BTreeSet::new(),
        max_ticks: 0,
        ..ModelConfig::new(StrictRotation, 2)
    };
    let report = run_check(b1, &opts).expect("valid");
    let failed: Vec<_> = report.failures().map(|p| p.property).collect();
    assert!(
        failed.contains(&"S1 no stale overwrite")
            || failed.contains(&"S3 no self-inflicted replay"),
        "{}",
        report.render()
    );
    assert!(report.failures().all(|p| p.trace.is_some()));
    let opts = CheckOptions {
        stop_at_first_failure: false,
        max_states: Some(5_000),
        ..opts
    };
    let report = run_check(config(StrictRotation, 2, 1), &opts).expect("valid");
    assert!(!report.exhaustive);
    assert!(report.failures().next().is_none(), "{}", report.render());
    assert!(report
        .properties
        .iter()
        .filter(|p| p.kind == "always")
        .all(|p| p.verdict == Verdict::Undecided));
}
