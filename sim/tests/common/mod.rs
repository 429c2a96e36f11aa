//! Shared helpers for the model-checking tests.
#![allow(dead_code)]

use std::collections::BTreeSet;

// The checker allocates and frees a state per transition: mimalloc makes the test
// runs about a third faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokenfence_sim::check::{run_check, CheckOptions, CheckReport, Search, Verdict};
use tokenfence_sim::model::{FaultKind, ModelConfig, ModelProvider, Strategy};
use tokenfence_sim::provider::BehaviourClass;

/// Every fault that spends the budget (all but the standing misconfiguration).
pub fn runtime_faults() -> BTreeSet<FaultKind> {
    FaultKind::ALL
        .into_iter()
        .filter(|f| *f != FaultKind::WrongClient)
        .collect()
}

/// A tokenfence configuration.
pub fn config(class: impl Into<ModelProvider>, workers: usize, max_ticks: u8) -> ModelConfig {
    ModelConfig {
        faults: runtime_faults(),
        max_ticks,
        ..ModelConfig::new(class, workers)
    }
}

/// Checks `cfg` exhaustively and asserts that every property holds and every
/// vacuity guard is reached; prints the report.
pub fn assert_all_hold(cfg: ModelConfig, search: Search) -> CheckReport {
    // Depth-first runs are the long ones: two checker threads let the last of
    // them use both cores once the other tests are done.
    let dfs = search == Search::Dfs;
    let opts = CheckOptions {
        search,
        symmetry: dfs,
        threads: if dfs { 2 } else { 1 },
        ..CheckOptions::default()
    };
    let report = run_check(cfg, &opts).expect("a valid configuration");
    println!("{}", report.render());
    assert!(
        report.exhaustive,
        "the search must cover the whole bounded space"
    );
    assert!(report.all_hold(), "{}", report.render());
    assert!(
        report
            .properties
            .iter()
            .any(|p| p.verdict == Verdict::Reached),
        "at least one vacuity guard must be checked"
    );
    report
}

/// Checks a baseline breadth-first and asserts that `expected` fails, with a
/// readable numbered trace; prints it.
pub fn assert_baseline_fails(
    strategy: Strategy,
    class: BehaviourClass,
    max_ticks: u8,
    expected: &str,
) -> Vec<String> {
    let cfg = ModelConfig {
        strategy,
        faults: BTreeSet::new(),
        max_ticks,
        ..ModelConfig::new(class, 2)
    };
    let report = run_check(cfg, &CheckOptions::default()).expect("a valid configuration");
    println!("{}", report.render());
    assert!(!report.all_hold());
    let failed = report
        .failures()
        .find(|p| p.property == expected)
        .unwrap_or_else(|| {
            panic!(
                "{} must break \"{expected}\"\n{}",
                strategy.name(),
                report.render()
            )
        });
    let trace = failed.trace.clone().expect("a counterexample trace");
    assert!(trace.len() >= 3, "a trace has an initial state and steps");
    assert!(trace[0].starts_with("0. initial state"), "{}", trace[0]);
    assert!(trace[1].starts_with("1. "), "{}", trace[1]);
    assert!(
        trace.iter().any(|s| s.contains("store    g")),
        "steps show the store"
    );
    assert!(
        trace.iter().any(|s| s.contains("provider current rt")),
        "steps show the provider"
    );
    trace
}
