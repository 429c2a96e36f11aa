//! The deterministic simulator as a regression suite: tokenfence holds every
//! invariant on hundreds of seeds across all providers and fault mixes, each naive
//! baseline is caught on some seed, and runs are reproducible from their seed.

use tokenfence_core::days;
use tokenfence_sim::simulate::{
    replay_target, run_seed, Fault, FaultChoice, Fleet, FleetProvider, LeaseClock, SeedReport,
    SimOptions, StrategyReport,
};
use tokenfence_sim::strategy::Strategy;

/// A small world: enough concurrency for races, small enough for hundreds of seeds.
fn small(seed: u64, fleet: Fleet, strategies: &[Strategy]) -> SimOptions {
    SimOptions {
        seed,
        connections: 40,
        workers: 8,
        processes: 4,
        days: 60,
        fleet: vec![fleet.into()],
        faults: FaultChoice::Swarm,
        // Every fourth seed: a cap short enough for deadlines to fall in the run.
        hard_lifetime: (seed % 4 == 0).then(|| days(120)),
        strategies: strategies.to_vec(),
        lease_clock: LeaseClock::Store,
    }
}

fn run(opts: &SimOptions) -> SeedReport {
    run_seed(opts, None, &mut |_, _| {}).report
}

fn column(report: &SeedReport, strategy: Strategy) -> &StrategyReport {
    report
        .strategies
        .iter()
        .find(|s| s.strategy == strategy.name())
        .expect("the strategy ran")
}

#[test]
fn tokenfence_holds_every_invariant_on_300_seeds_across_providers_and_fault_mixes() {
    let mut broken = Vec::new();
    let (mut refreshes, mut conflicts, mut provider_ended, mut warned) = (0, 0, 0, 0);
    let (mut lost_replies, mut crashes, mut probes, mut idle_kept) = (0, 0, 0, 0);
    let mut faults_seen = std::collections::BTreeSet::new();
    for seed in 1..=300u64 {
        let fleet = Fleet::ALL[(seed % Fleet::ALL.len() as u64) as usize];
        let opts = small(seed, fleet, &[Strategy::Tokenfence]);
        let report = run(&opts);
        faults_seen.extend(report.derived.faults.keys().copied());
        let t = column(&report, Strategy::Tokenfence);
        if t.total_violations() > 0 {
            broken.push(format!(
                "seed {seed} ({}): {:?} e.g. {:?}",
                fleet.name(),
                t.violations,
                t.examples.first()
            ));
        }
        refreshes += t.rotations + t.provider_refresh_calls;
        conflicts += t.cas_conflicts;
        provider_ended += t.invalid_grant_provider;
        warned += t.hard_warnings;
        lost_replies += t.faults_struck["lost replies"];
        crashes += t.faults_struck["crashes"];
        probes += t.in_doubt_probes;
        idle_kept += t.idle_kept_alive;
    }
    assert!(
        broken.is_empty(),
        "tokenfence broke invariants:\n{}",
        broken.join("\n")
    );
    // Vacuity: the runs did exercise what the invariants are about.
    assert_eq!(
        faults_seen.len(),
        Fault::ALL.len(),
        "every fault kind was enabled by some seed"
    );
    assert!(refreshes > 10_000, "refreshes happened ({refreshes})");
    assert!(conflicts > 0, "CAS conflicts happened and were resolved");
    assert!(
        provider_ended > 0,
        "the provider ended grants (revocations, expiry)"
    );
    assert!(
        warned > 0,
        "ReconnectSoon was emitted before hard deadlines"
    );
    assert!(
        lost_replies > 0 && crashes > 0,
        "replies were lost and processes crashed"
    );
    assert!(
        probes > 0,
        "workers in doubt presented possibly rotated tokens"
    );
    assert!(
        idle_kept > 0,
        "idle connections were kept alive through their idle window"
    );
}

/// A baseline's harm: connections lost, stale overwrites, or connections falsely
/// flagged for re-authorization (lost to the app until a human reconnects).
fn harm(s: &StrategyReport) -> u64 {
    s.lost_by_our_fault + s.stale_overwrites + s.reauth_false
}

/// Runs `strategy` and tokenfence on seeds from 1 until the baseline does harm;
/// tokenfence must hold on that same seed.
fn caught(strategy: Strategy, fleet: Fleet, faults: &[Fault], connections: usize) -> u64 {
    caught_on(strategy, fleet, faults, connections, LeaseClock::Store)
}

/// As [`caught`], with leases decided on `clock`.
fn caught_on(
    strategy: Strategy,
    fleet: Fleet,
    faults: &[Fault],
    connections: usize,
    clock: LeaseClock,
) -> u64 {
    for seed in 1..=12u64 {
        let opts = SimOptions {
            connections,
            workers: 8,
            processes: 4,
            days: 60,
            faults: FaultChoice::Only(faults.to_vec()),
            lease_clock: clock,
            ..small(seed, fleet, &[Strategy::Tokenfence, strategy])
        };
        let report = run(&opts);
        let baseline = column(&report, strategy);
        if harm(baseline) > 0 && baseline.total_violations() > 0 {
            let t = column(&report, Strategy::Tokenfence);
            assert_eq!(
                t.total_violations(),
                0,
                "tokenfence on the seed that caught {}: {:?}",
                strategy.name(),
                t.examples
            );
            assert_eq!(harm(t), 0);
            return seed;
        }
    }
    panic!("{} did no harm on 12 seeds", strategy.name());
}

#[test]
fn b1_unconditional_writes_overwrite_stale_tokens_and_lose_connections() {
    caught(
        Strategy::NaiveB1,
        Fleet::Intuit,
        &[Fault::Herd, Fault::LatencySpike],
        40,
    );
    // Under strict rotation a stale overwrite puts back a dead token: lost.
    let lost = (1..=12u64).any(|seed| {
        let opts = SimOptions {
            connections: 60,
            workers: 8,
            processes: 4,
            days: 60,
            faults: FaultChoice::Only(vec![Fault::Herd, Fault::LatencySpike]),
            ..small(seed, Fleet::Github, &[Strategy::NaiveB1])
        };
        column(&run(&opts), Strategy::NaiveB1).lost_by_our_fault > 0
    });
    assert!(
        lost,
        "B1 lost no connection under strict rotation on 12 seeds"
    );
}

#[test]
fn b2_a_lease_that_expires_under_a_paused_worker_lets_it_overwrite() {
    // On the store's clock, a lease expires under a worker paused or held up by
    // store outages while it commits.
    caught(
        Strategy::NaiveB2,
        Fleet::Intuit,
        &[Fault::Herd, Fault::Pause, Fault::StoreOutage],
        60,
    );
}

#[test]
fn b3_trusting_invalid_grant_flags_live_connections_for_reauth() {
    // B3's race (a takeover presenting the old token while the holder commits)
    // needs the holder's lease to end while it is busy: with leases on the
    // processes' skewed clocks it is common; on the store's clock it needs a pause
    // ending within milliseconds of the takeover's invalid_grant, and 12 seeds do
    // not find one (the model checker finds it: sim/tests/baselines.rs).
    caught_on(
        Strategy::NaiveB3,
        Fleet::Github,
        &[Fault::Herd, Fault::ClockSkew, Fault::Pause],
        80,
        LeaseClock::Process,
    );
}

#[test]
fn b4_a_reply_without_refresh_token_wipes_the_stored_one() {
    let seed = caught(Strategy::NaiveB4, Fleet::Google, &[], 20);
    let opts = SimOptions {
        faults: FaultChoice::Only(vec![]),
        ..small(seed, Fleet::Google, &[Strategy::NaiveB4])
    };
    let b4 = run(&opts);
    let b4 = column(&b4, Strategy::NaiveB4);
    assert!(b4.violations.contains_key("S6"), "{:?}", b4.violations);
    assert!(b4.lost_by_our_fault > 0);
}

#[test]
fn the_same_seed_gives_the_same_report_and_trace_hash_and_another_seed_differs() {
    let opts = SimOptions {
        faults: FaultChoice::Only(Fault::ALL.to_vec()),
        ..small(7, Fleet::Intuit, &Strategy::ALL)
    };
    let a = run(&opts);
    let b = run(&opts);
    assert_eq!(a, b);
    let hashes: Vec<&str> = a.strategies.iter().map(|s| s.trace_hash.as_str()).collect();
    assert!(hashes.iter().all(|h| h.len() == 16));
    let other = run(&SimOptions { seed: 8, ..opts });
    assert_ne!(
        a.derived, other.derived,
        "another seed derives other faults"
    );
    for (x, y) in a.strategies.iter().zip(&other.strategies) {
        assert_ne!(x.trace_hash, y.trace_hash, "{}", x.strategy);
    }
}

#[test]
fn a_replay_traces_the_failing_connection_without_changing_the_run() {
    let opts = SimOptions {
        faults: FaultChoice::Only(vec![Fault::Herd]),
        ..small(3, Fleet::Intuit, &[Strategy::Tokenfence, Strategy::NaiveB1])
    };
    let first = run(&opts);
    let target = replay_target(&first).expect("B1 broke an invariant to trace");
    assert_eq!(target.strategy, Strategy::NaiveB1, "tokenfence held");
    let traced = run_seed(&opts, Some(target), &mut |_, _| {});
    assert_eq!(traced.report, first, "tracing does not change the run");
    assert!(traced.trace.len() > 10);
    assert!(traced.trace.iter().any(|l| l.contains("sends a refresh")));
}

/// Seeds of a wider sweep (90 days, a 120-day hard cap on every seed) that broke a
/// property before the fixes named here; each must hold now.
#[test]
fn finds_of_the_wider_sweep_stay_fixed() {
    let finds = [
        // L4: a store outage covered the notice instant; the scanners' one report
        // of the due notice failed to load and was dropped (a `Maintain` whose
        // store read failed is now retried after the back-off).
        (100_630, Fleet::Google),
        // L3: a keep-alive refresh failed (502) and left the connection degraded
        // with a valid access token; nothing refreshed it again, so it never
        // recovered (a degraded record is now due for work at its retry time).
        (100_612, Fleet::Github),
        (101_383, Fleet::Github),
        // S8 (the harness): with 77 s of clock skew, more than the 30 s send
        // safety margin, a holder displaced by a takeover still sent under its own
        // lease; the check now allows for that for a lease after a takeover.
        (201_874, Fleet::Google),
    ];
    for (seed, fleet) in finds {
        let opts = SimOptions {
            days: 90,
            hard_lifetime: Some(days(120)),
            ..small(seed, fleet, &[Strategy::Tokenfence])
        };
        let report = run(&opts);
        let t = column(&report, Strategy::Tokenfence);
        assert_eq!(t.total_violations(), 0, "seed {seed}: {:?}", t.violations);
    }
}

#[test]
fn a_mixed_fleet_shows_the_baselines_failing_in_one_run_and_tokenfence_holding() {
    // One run, four providers (periodic with grace, grace, never rotating, strict):
    // each baseline's harm comes from the provider it bites.
    // The first seed on which all three do harm (as `caught` searches for one).
    for seed in 1..=12 {
        let opts = SimOptions {
            connections: 80,
            fleet: ["intuit", "xero", "google", "github"]
                .into_iter()
                .map(|name| Fleet::from_name(name).unwrap().into())
                .collect(),
            faults: FaultChoice::Only(vec![
                Fault::Herd,
                Fault::LatencySpike,
                Fault::Pause,
                Fault::StoreOutage,
            ]),
            hard_lifetime: None,
            ..small(
                seed,
                Fleet::Intuit,
                &[
                    Strategy::Tokenfence,
                    Strategy::NaiveB1,
                    Strategy::NaiveB2,
                    Strategy::NaiveB4,
                ],
            )
        };
        let report = run(&opts);
        let providers: Vec<&str> = report
            .options
            .providers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(providers, ["intuit", "xero", "google", "github"]);
        let t = column(&report, Strategy::Tokenfence);
        assert_eq!(t.total_violations(), 0, "seed {seed}: {:?}", t.examples);
        assert_eq!(harm(t), 0);
        let harmed = [Strategy::NaiveB1, Strategy::NaiveB2, Strategy::NaiveB4]
            .iter()
            .all(|b| harm(column(&report, *b)) > 0 && column(&report, *b).total_violations() > 0);
        if harmed {
            // B4's loss is the non-rotating provider's (connection c talks to
            // provider c mod 4).
            let b4 = column(&report, Strategy::NaiveB4);
            assert!(
                b4.examples.iter().all(|e| e.connection % 4 == 2),
                "{:?}",
                b4.examples
            );
            return;
        }
    }
    panic!("no seed of 12 showed B1, B2 and B4 all doing harm in one mixed run");
}

#[test]
fn a_provider_profile_file_is_simulated_with_its_real_lifetimes() {
    // The example profile shipped for users (not built in): rotation with a
    // 10-minute reuse interval and reuse detection, 15-day idle window, 30-day cap.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../profiles/auth0.toml");
    let fleet = FleetProvider::parse_list(path).expect("the example profile is valid");
    let spec = fleet[0].spec(None);
    assert_eq!(spec.profile.name, "auth0");
    assert_eq!(spec.profile.hard_lifetime, Some(days(30)));
    for seed in 1..=6 {
        let opts = SimOptions {
            fleet: fleet.clone(),
            faults: FaultChoice::Swarm,
            hard_lifetime: None,
            ..small(seed, Fleet::Intuit, &[Strategy::Tokenfence])
        };
        let report = run(&opts);
        let t = column(&report, Strategy::Tokenfence);
        assert_eq!(t.total_violations(), 0, "seed {seed}: {:?}", t.examples);
        // Its 30-day cap falls inside the 60 days: connections reach it.
        assert!(t.provider_refresh_calls > 0);
    }
}
