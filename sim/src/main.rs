//! `tokenfence-sim`: the model checker's command line.
//!
//! ```text
//! tokenfence-sim check [--workers N] [--provider CLASS|all|PROFILE] [--faults LIST|runtime|all|none]
//!                      [--strategy tokenfence|naive-b1|naive-b2|naive-b3|naive-b4]
//!                      [--search bfs|dfs] [--symmetry] [--json] [--explore ADDR]
//! tokenfence-sim simulate [--provider FLEET|PROFILE[,...]] [--seed N] ...
//! tokenfence-sim mock-provider [--profile CLASS|PROFILE]... [--addr 127.0.0.1:PORT]
//! ```
//!
//! PROFILE is a built-in profile (intuit, xero, atlassian, google, github) or a
//! profile file (.toml or .json). Exit status: 0 when every property holds (and
//! every guard is reached), 1 when one fails, 2 for bad arguments.

#[path = "simulate/cli.rs"]
mod simulate_cli;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::process::ExitCode;
use tokenfence_core::ProviderProfile;
use tokenfence_sim::check::{explore, run_check, CheckOptions, Search};
use tokenfence_sim::mock::MockProvider;
use tokenfence_sim::model::{FaultKind, ModelConfig, ModelProvider, Strategy};
use tokenfence_sim::provider::{BehaviourClass, ProviderSpec};

// The checker allocates a state per transition and the simulator a record per store
// read: mimalloc makes both about a quarter faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3): how long freed memory is kept
/// before it is returned to the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory instead of returning it to the OS after 10 ms: the simulator
/// frees tens of megabytes of machines in every process crash and allocates them
/// again on restart, and paid page faults to get them back (a 10,000-connection
/// year: 29.4 s → 26.4 s CPU, peak memory 347 → 374 MB).
fn keep_freed_memory() {
    // SAFETY: sets one integer option of the allocator; any value is valid for
    // this option (-1: never purge) and the call may happen at any time.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
}

#[derive(Parser)]
#[command(
    name = "tokenfence-sim",
    version,
    about = "Model checking and deterministic simulation of tokenfence's refresh-token core"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Model-check the real core: several workers, a store with CAS and leases, a
    /// provider model, faults; verdicts for S1-S9, R1, R2, L1, L5 and the vacuity guards.
    Check(CheckArgs),
    /// Serve the provider model over HTTP on loopback, for adapter tests and your
    /// own integration tests: token, revoke and consent endpoints, plus /control.
    MockProvider(MockArgs),
    /// Simulate a fleet of connections for a year under faults, deterministically
    /// from a seed, with tokenfence and the naive baselines side by side.
    Simulate(simulate_cli::SimulateArgs),
}

#[derive(Args)]
struct MockArgs {
    /// Provider: a built-in profile (intuit, xero, atlassian, google, github) or a
    /// profile file (.toml or .json), with real lifetimes; or a class with
    /// lifetimes scaled to seconds: non-rotating, strict, grace-idempotent,
    /// grace-fork, periodic, reuse-detection. Repeat it to serve several providers
    /// at once, each under `/NAME`.
    #[arg(long, default_values_t = ["intuit".to_string()])]
    profile: Vec<String>,
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
}

#[derive(Clone, Copy, ValueEnum)]
enum SearchArg {
    /// Breadth-first, shortest counterexamples.
    Bfs,
    /// Depth-first (use with --symmetry for larger runs).
    Dfs,
    /// Random walks from the initial states (with --seed; needs --max-states).
    Random,
}

#[derive(Args)]
struct CheckArgs {
    /// Workers sharing the connection (1-8).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Provider behaviour class, or `all`: non-rotating, strict, grace-idempotent,
    /// grace-fork, periodic, reuse-detection; or a built-in profile or profile file
    /// (.toml or .json), its lifetimes scaled to the model's seconds.
    #[arg(long, default_value = "all")]
    provider: String,
    /// Faults, comma-separated, or `runtime` (all but wrong-client) / `all` / `none`:
    /// 5xx, 429, connect, lost-reply, garbled, pause, crash, revoke, store,
    /// wrong-client (adds a worker configured with the sandbox app's credentials).
    #[arg(long, default_value = "runtime")]
    faults: String,
    /// At most this many faults per behaviour.
    #[arg(long, default_value_t = 1)]
    max_faults: u8,
    /// At most this many budgeted time jumps per behaviour (each to any instant at
    /// which something changes: a lease or grace window ending, a timer, a deadline).
    #[arg(long, default_value_t = 1)]
    max_ticks: u8,
    /// Access requests per worker.
    #[arg(long, default_value_t = 1)]
    requests: u8,
    /// Reports of the API's 401 (for the token the worker served last) per worker.
    #[arg(long, default_value_t = 0)]
    rejects: u8,
    /// Strategy under test: tokenfence, naive-b1, naive-b2, naive-b3, naive-b4.
    #[arg(long, default_value = "tokenfence")]
    strategy: String,
    /// Search order.
    #[arg(long, value_enum, default_value = "bfs")]
    search: SearchArg,
    /// Symmetry reduction over workers (DFS only).
    #[arg(long)]
    symmetry: bool,
    /// Checker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Stop at the first counterexample (default for naive strategies).
    #[arg(long)]
    first_failure: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Serve stateright's web explorer on this loopback address (e.g. 127.0.0.1:3000)
    /// instead of checking.
    #[arg(long)]
    explore: Option<String>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// The deep profile: 4 workers, 2 faults and 3 time jumps per behaviour, DFS
    /// with symmetry unless --search random (overrides those options). Far beyond
    /// an exhaustive run on a small machine: give it a --max-states budget.
    #[arg(long)]
    deep: bool,
    /// Stop after this many states: properties not failed by then are reported
    /// undecided (the search was not exhaustive).
    #[arg(long)]
    max_states: Option<usize>,
    /// The seed of `--search random` (the same seed, the same walks).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(args),
        Command::MockProvider(args) => mock_provider(args),
        Command::Simulate(args) => simulate_cli::simulate(args),
    }
}

/// The provider a mock serves: a class (lifetimes in seconds), or a built-in or
/// file profile with its real lifetimes.
fn mock_spec(name: &str) -> Result<ProviderSpec, String> {
    match BehaviourClass::from_name(name) {
        Some(class) => Ok(ProviderSpec::scaled(class)),
        None => ProviderProfile::named_or_file(name)
            .map(ProviderSpec::of_profile)
            .map_err(|e| e.to_string()),
    }
}

fn mock_provider(args: MockArgs) -> ExitCode {
    let specs = match args
        .profile
        .iter()
        .map(|name| mock_spec(name))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(specs) => specs,
        Err(e) => return bad_args(&e),
    };
    let mut names: Vec<&str> = specs.iter().map(|s| s.profile.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.len() < specs.len() {
        return bad_args(
            "two --profile values name the same provider; each is served under its name",
        );
    }
    if !args.addr.ip().is_loopback() {
        return bad_args("--addr must be a loopback address");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return bad_args(&format!("cannot start the runtime: {e}")),
    };
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        let base = format!("http://{}", listener.local_addr()?);
        // The mock is an I/O adapter: its clock starts at the wall time now.
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| tokenfence_core::Timestamp::from_millis(d.as_millis() as u64))
            .unwrap_or_default();
        // One provider is served at the root; several (a mixed fleet) each under
        // its profile's name.
        let single = specs.len() == 1;
        let mut router = axum::Router::new();
        for spec in specs {
            let prefix = if single {
                String::new()
            } else {
                format!("/{}", spec.profile.name)
            };
            let at = format!("{base}{prefix}");
            let mock = MockProvider::new(spec, &at, epoch);
            println!("mock provider {} on {at}", mock.spec().profile.name);
            println!("  token:   {at}{}", tokenfence_sim::mock::TOKEN_PATH);
            println!("  revoke:  {at}{}", tokenfence_sim::mock::REVOKE_PATH);
            println!("  consent: {at}{}", tokenfence_sim::mock::AUTHORIZE_PATH);
            for c in &mock.spec().clients {
                println!(
                    "  client {} / {} ({})",
                    c.client_id, c.client_secret, c.environment
                );
            }
            println!(
                "  control: POST {at}/control {{\"op\":\"authorize\",\"client_id\":\"prod-app\"}}"
            );
            router = if single {
                mock.router()
            } else {
                router.nest(&prefix, mock.router())
            };
        }
        tokio::select! {
            r = axum::serve(listener, router) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bad_args(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn check(mut args: CheckArgs) -> ExitCode {
    if args.deep {
        args.workers = 4;
        args.max_faults = 2;
        args.max_ticks = 3;
        if !matches!(args.search, SearchArg::Random) {
            args.search = SearchArg::Dfs;
            args.symmetry = true;
        }
    }
    let providers: Vec<ModelProvider> = match args.provider.as_str() {
        "all" => BehaviourClass::ALL
            .into_iter()
            .map(ModelProvider::from)
            .collect(),
        name => match BehaviourClass::from_name(name) {
            Some(c) => vec![c.into()],
            None => match ProviderProfile::named_or_file(name) {
                Ok(profile) => vec![ModelProvider::Profile(Box::new(profile))],
                Err(e) => {
                    let known: Vec<_> = BehaviourClass::ALL.iter().map(|c| c.name()).collect();
                    return bad_args(&format!("{e}; or a class: {}, all", known.join(", ")));
                }
            },
        },
    };
    let faults = match FaultKind::parse_list(&args.faults) {
        Ok(f) => f,
        Err(e) => return bad_args(&e),
    };
    let Some(strategy) = Strategy::from_name(&args.strategy) else {
        return bad_args(&format!(
            "unknown strategy `{}`; known: tokenfence, naive-b1, naive-b2, naive-b3, naive-b4",
            args.strategy
        ));
    };
    if !(1..=8).contains(&args.workers) {
        return bad_args("--workers must be between 1 and 8");
    }
    if matches!(args.search, SearchArg::Random) && args.max_states.is_none() {
        return bad_args("--search random needs --max-states (random walks never end)");
    }
    if args.symmetry && !matches!(args.search, SearchArg::Dfs) {
        return bad_args("--symmetry needs --search dfs (stateright applies symmetry only in DFS)");
    }
    let config = |provider| ModelConfig {
        workers: args.workers,
        provider,
        faults: faults.clone(),
        max_faults: args.max_faults,
        max_ticks: args.max_ticks,
        requests: args.requests,
        rejects: args.rejects,
        strategy,
    };
    if let Some(addr) = &args.explore {
        let [provider] = &providers[..] else {
            return bad_args("--explore needs one --provider class or profile");
        };
        eprintln!("serving the explorer on http://{addr}/ (Ctrl-C to stop)");
        return match explore(config(provider.clone()), addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => bad_args(&e),
        };
    }
    let opts = CheckOptions {
        search: match args.search {
            SearchArg::Bfs => Search::Bfs,
            SearchArg::Dfs => Search::Dfs,
            SearchArg::Random => Search::Random(args.seed),
        },
        symmetry: args.symmetry,
        threads: args.threads,
        stop_at_first_failure: args.first_failure || strategy != Strategy::Tokenfence,
        progress: !args.quiet && !args.json,
        max_states: args.max_states,
    };
    let mut reports = Vec::new();
    for provider in providers {
        let cfg = config(provider);
        if opts.progress {
            eprintln!("checking: {}", cfg.describe());
        }
        let report = match run_check(cfg, &opts) {
            Ok(r) => r,
            Err(e) => return bad_args(&e),
        };
        if !args.json {
            println!("{}\n", report.render());
        }
        reports.push(report);
    }
    if args.json {
        match serde_json::to_string_pretty(&reports) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let ok = reports.iter().all(|r| r.all_hold());
    // A budgeted search (--max-states) that stopped before covering the space
    // proves nothing beyond "no failure found so far".
    let undecided = !ok
        && reports
            .iter()
            .all(|r| !r.exhaustive && r.failures().next().is_none());
    if !args.json {
        println!(
            "{}",
            if ok {
                "verdict: every property holds and every guard is reached"
            } else if undecided {
                "verdict: no property failed within the state budget (not exhaustive: undecided above)"
            } else {
                "verdict: a property FAILS or a guard is not reached (see above)"
            }
        );
    }
    if ok || undecided {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
