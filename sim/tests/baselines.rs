//! The naive strategies of INVARIANTS.md (B1-B4), run through the same model as the
//! real core, must fail: each test asserts that the checker finds the counterexample
//! and prints it as a numbered trace.

mod common;

use common::assert_baseline_fails;
use tokenfence_sim::model::Strategy;
use tokenfence_sim::provider::BehaviourClass;

#[test]
fn b1_unconditional_write_back_overwrites_a_newer_generation() {
    let trace = assert_baseline_fails(
        Strategy::NaiveB1,
        BehaviourClass::StrictRotation,
        0,
        "S1 no stale overwrite",
    );
    println!("B1 counterexample:\n{}", trace.join("\n"));
}

#[test]
fn b1_without_leases_replays_a_rotated_token() {
    assert_baseline_fails(
        Strategy::NaiveB1,
        BehaviourClass::StrictRotation,
        0,
        "S3 no self-inflicted replay",
    );
}

#[test]
fn b2_lease_without_cas_loses_the_rotated_token_when_the_lease_expires() {
    let trace = assert_baseline_fails(
        Strategy::NaiveB2,
        BehaviourClass::StrictRotation,
        1,
        "S1 no stale overwrite",
    );
    assert!(
        trace.iter().any(|s| s.contains("took over")),
        "the lease must expire under its holder:\n{}",
        trace.join("\n")
    );
    assert_baseline_fails(
        Strategy::NaiveB2,
        BehaviourClass::GraceIdempotent,
        1,
        "S2 no self-inflicted loss",
    );
}

#[test]
fn b3_reauth_without_rereading_kills_a_live_connection() {
    let trace = assert_baseline_fails(
        Strategy::NaiveB3,
        BehaviourClass::StrictRotation,
        1,
        "S4 sound re-auth",
    );
    assert!(
        trace.iter().any(|s| s.contains("invalid_grant")),
        "{}",
        trace.join("\n")
    );
    println!("B3 counterexample:\n{}", trace.join("\n"));
}

#[test]
fn b4_wiping_an_omitted_refresh_token_loses_the_connection() {
    let trace = assert_baseline_fails(
        Strategy::NaiveB4,
        BehaviourClass::NonRotating,
        0,
        "S6 keep what the provider did not replace",
    );
    assert!(
        trace.iter().any(|s| s.contains("<empty>")),
        "{}",
        trace.join("\n")
    );
    assert_baseline_fails(
        Strategy::NaiveB4,
        BehaviourClass::NonRotating,
        0,
        "S2 no self-inflicted loss",
    );
}
