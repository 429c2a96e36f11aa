//! `tokenfence-sim simulate`: the command line of the simulator (part of the binary).
//!
//! The simulation itself never reads a clock; this shell measures the wall time of
//! a run only to report events per second on stderr, apart from the deterministic
//! report.

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokenfence_sim::simulate::{
    replay_target, run_seed, FaultChoice, FleetProvider, LeaseClock, SeedReport, SimOptions,
    TraceTarget,
};
use tokenfence_sim::strategy::Strategy;

#[derive(Args)]
pub struct SimulateArgs {
    /// The seed every choice derives from (faults, traffic, latencies).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run this many seeds, from --seed on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Connections at the start (about 10 % more are authorized during a year).
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// Workers, spread over the processes.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Processes (each crashes, pauses and skews on its own).
    #[arg(long, default_value_t = 4)]
    processes: usize,
    /// Days of traffic and faults, before the heal phase.
    #[arg(long, default_value_t = 365)]
    days: u64,
    /// Providers of the fleet, comma-separated (connections are spread over them
    /// in turn): intuit, xero, atlassian, google, github, reuse-detection,
    /// short-lived (60-second access tokens), or a profile file (.toml or .json).
    /// The default mixes four classes: periodic rotation with grace (Intuit),
    /// rotation with grace (Xero), none (Google), strict rotation (GitHub).
    #[arg(long, default_value = "intuit,xero,google,github")]
    provider: String,
    /// Faults: all (every kind, intensities drawn from the seed), swarm (a random
    /// subset per seed, as the test suite runs), none, or a list of 5xx, 429,
    /// html, latency, lost-reply, truncated, connect, crash, pause, store, herd,
    /// skew, revoke.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Hard lifetime of refresh tokens in days (overrides the provider's; short
    /// values exercise ReconnectSoon).
    #[arg(long)]
    hard_lifetime: Option<u64>,
    /// Strategies, comma-separated, or all: tokenfence, naive-b1, naive-b2,
    /// naive-b3, naive-b4.
    #[arg(long, default_value = "all")]
    strategies: String,
    /// Rerun this one seed and print the trace of the connection that failed.
    #[arg(long)]
    replay: Option<u64>,
    /// With --replay: trace this connection (1-based, as in realm-000042) instead.
    #[arg(long)]
    connection: Option<usize>,
    /// Whose clock decides lease expiry: store (the default; PostgreSQL's now(),
    /// one host for SQLite) or process (each caller's skewed clock).
    #[arg(long, default_value = "store")]
    lease_clock: String,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress bar and no timing line on stderr.
    #[arg(long)]
    quiet: bool,
}

fn bad_args(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn options(args: &SimulateArgs) -> Result<SimOptions, String> {
    let fleet = FleetProvider::parse_list(&args.provider)?;
    let strategies = match args.strategies.trim() {
        "all" => Strategy::ALL.to_vec(),
        list => list
            .split(',')
            .map(|n| {
                Strategy::from_name(n.trim()).ok_or_else(|| {
                    format!("unknown strategy `{n}`; known: tokenfence, naive-b1, naive-b2, naive-b3, naive-b4, all")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let opts = SimOptions {
        seed: args.replay.unwrap_or(args.seed),
        connections: args.connections,
        workers: args.workers,
        processes: args.processes,
        days: args.days,
        fleet,
        faults: FaultChoice::parse(&args.faults)?,
        hard_lifetime: args.hard_lifetime.map(tokenfence_core::days),
        strategies,
        lease_clock: match args.lease_clock.as_str() {
            "store" => LeaseClock::Store,
            "process" => LeaseClock::Process,
            other => {
                return Err(format!(
                    "unknown lease clock `{other}`; known: store, process"
                ))
            }
        },
    };
    opts.validate()?;
    if args.seeds == 0 || args.seeds > 1_000_000 {
        return Err("--seeds must be between 1 and 1000000".into());
    }
    if args.connection.is_some() && args.replay.is_none() {
        return Err("--connection needs --replay SEED".into());
    }
    if args.connection == Some(0) {
        return Err("--connection counts from 1".into());
    }
    Ok(opts)
}

struct Progress {
    bar: Option<ProgressBar>,
    days: u64,
    strategies: u64,
}

impl Progress {
    fn new(args: &SimulateArgs, opts: &SimOptions, runs: u64) -> Self {
        let show = !args.quiet && std::io::stderr().is_terminal();
        let days = opts.days + 2;
        let bar = show.then(|| {
            let total = runs * opts.strategies.len() as u64 * days;
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:40} {pos}/{len} simulated days {msg} [{elapsed}]",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            days,
            strategies: opts.strategies.len() as u64,
        }
    }

    fn update(&self, run: u64, seed: u64, index: usize, strategy: Strategy, day: u64) {
        if let Some(bar) = &self.bar {
            let column = run * self.strategies + index as u64;
            bar.set_position(column * self.days + day.min(self.days));
            bar.set_message(format!("seed {seed} {}", strategy.name()));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs the subcommand; the exit status says whether tokenfence held.
pub fn simulate(args: SimulateArgs) -> ExitCode {
    let opts = match options(&args) {
        Ok(o) => o,
        Err(e) => return bad_args(&e),
    };
    if args.replay.is_some() {
        return replay(&args, opts);
    }
    let runs = args.seeds;
    let progress = Progress::new(&args, &opts, runs);
    let started = Instant::now();
    let mut reports = Vec::new();
    let mut events = 0;
    for run in 0..runs {
        let seed_opts = SimOptions {
            seed: opts.seed.wrapping_add(run),
            ..opts.clone()
        };
        let order = seed_opts.strategies.clone();
        let seed = seed_opts.seed;
        let result = run_seed(&seed_opts, None, &mut |strategy, day| {
            let index = order.iter().position(|s| *s == strategy).unwrap_or(0);
            progress.update(run, seed, index, strategy, day);
        });
        events += result
            .report
            .strategies
            .iter()
            .map(|s| s.events)
            .sum::<u64>();
        if !args.json {
            progress.finish_line(&result.report, runs == 1);
        }
        reports.push(result.report);
    }
    progress.finish();
    let wall = started.elapsed();
    if !args.json && runs > 1 {
        println!("{}", summary(&reports));
    }
    if args.json {
        let held = reports.iter().all(SeedReport::tokenfence_held);
        let doc = serde_json::json!({ "tokenfence_held": held, "seeds": reports });
        match serde_json::to_string_pretty(&doc) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if !args.quiet {
        eprintln!("{}", timing(events, wall));
    }
    if reports.iter().all(SeedReport::tokenfence_held) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

impl Progress {
    fn finish_line(&self, report: &SeedReport, full: bool) {
        let print = || {
            if full {
                println!("{}", report.header());
                println!("{}", report.table());
                println!("{}", report.verdict());
            } else {
                println!(
                    "seed {}: {}",
                    report.seed,
                    report.verdict().trim_start_matches("verdict: ")
                );
            }
        };
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

fn timing(events: u64, wall: Duration) -> String {
    let secs = wall.as_secs_f64().max(1e-9);
    format!(
        "simulated {events} events in {secs:.2} s wall time ({:.0} events/s)",
        events as f64 / secs
    )
}

/// Totals over many seeds, per strategy.
fn summary(reports: &[SeedReport]) -> String {
    let Some(first) = reports.first() else {
        return String::new();
    };
    let mut out = format!(
        "{} seeds from {}\n{:<14}{:>12}{:>10}{:>12}{:>12}{:>12}\n",
        reports.len(),
        first.seed,
        "strategy",
        "seeds broke",
        "lost",
        "stale wr.",
        "false flags",
        "violations"
    );
    for (i, s) in first.strategies.iter().enumerate() {
        let col = |f: &dyn Fn(&tokenfence_sim::simulate::StrategyReport) -> u64| -> u64 {
            reports
                .iter()
                .filter_map(|r| r.strategies.get(i))
                .map(f)
                .sum()
        };
        let broke = col(&|s| u64::from(s.total_violations() > 0));
        out.push_str(&format!(
            "{:<14}{:>12}{:>10}{:>12}{:>12}{:>12}\n",
            s.strategy,
            broke,
            col(&|s| s.lost_by_our_fault),
            col(&|s| s.stale_overwrites),
            col(&|s| s.reauth_false),
            col(&|s| s.total_violations()),
        ));
    }
    let held = reports.iter().all(SeedReport::tokenfence_held);
    out.push_str(if held {
        "verdict: tokenfence held every invariant on every seed"
    } else {
        "verdict: tokenfence BROKE an invariant (rerun the seed with --replay SEED)"
    });
    out
}

fn replay(args: &SimulateArgs, opts: SimOptions) -> ExitCode {
    let silent = &mut |_: Strategy, _: u64| {};
    let first = run_seed(&opts, None, silent);
    let target = match args.connection {
        Some(n) => Some(TraceTarget {
            strategy: opts.strategies[0],
            connection: n - 1,
        }),
        None => replay_target(&first.report),
    };
    println!("{}", first.report.header());
    println!("{}", first.report.table());
    let Some(target) = target else {
        println!(
            "no strategy broke an invariant on seed {}: nothing to trace (use --connection N)",
            opts.seed
        );
        println!("{}", first.report.verdict());
        return if first.report.tokenfence_held() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    };
    let traced_opts = SimOptions {
        strategies: vec![target.strategy],
        ..opts.clone()
    };
    let traced = run_seed(&traced_opts, Some(target), silent);
    let again = &traced.report.strategies[0];
    let before = first
        .report
        .strategies
        .iter()
        .find(|s| s.strategy == again.strategy);
    println!(
        "trace of realm-{:06} under {} (seed {}, trace hash {}{})",
        target.connection + 1,
        target.strategy.name(),
        opts.seed,
        again.trace_hash,
        if before.is_some_and(|b| b.trace_hash == again.trace_hash) {
            ", identical to the first run"
        } else {
            ", DIFFERENT from the first run"
        }
    );
    for line in &traced.trace {
        println!("  {line}");
    }
    println!("{}", first.report.verdict());
    if first.report.tokenfence_held() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
