//! `tokenfence-load`: how much load one process holds (see `tokenfence_tests::load`).
//!
//! ```text
//! tokenfence-load [--connections 100000] [--seconds 60] [--callers 64]
//!                 [--access-ttl-secs 60] [--store sqlite:PATH|postgres:URL] [--json]
//! tokenfence-load --keepalive-concurrency 16 [--connections 100000] [--store ...]
//!
//! On PostgreSQL it works in a new schema `tokenfence_load_<pid>` (left behind
//! for inspection: drop it when done).
//! ```

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;
use tokenfence_tests::load::{run, LoadOptions, LoadStore};

#[derive(Parser)]
#[command(
    name = "tokenfence-load",
    about = "Load one process with N connections over loopback"
)]
struct Args {
    /// Connections stored before the run.
    #[arg(long, default_value_t = 100_000)]
    connections: usize,
    /// Seconds callers run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// Access-token lifetime of the mock provider, seconds.
    #[arg(long, default_value_t = 60)]
    access_ttl_secs: u64,
    /// sqlite:PATH (default: a new file in a temporary directory) or postgres:URL.
    #[arg(long)]
    store: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Use the mock provider serving at this base URL (`tokenfence-sim
    /// mock-provider --profile strict`), shared with other processes.
    #[arg(long)]
    mock_url: Option<String>,
    /// Do not store the connections (another process did).
    #[arg(long)]
    no_seed: bool,
    /// PostgreSQL schema (default: tokenfence_load_<pid>); give several
    /// processes the same one.
    #[arg(long)]
    schema: Option<String>,
    /// Instead: keep-alive of --connections idle connections all due at once,
    /// passes of at most this many refreshes in flight until none is due.
    #[arg(long)]
    keepalive_concurrency: Option<usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let store = match args.store.as_deref().map(|s| s.split_once(':')) {
        None => LoadStore::Sqlite(dir.path().join("load.db")),
        Some(Some(("sqlite", path))) => LoadStore::Sqlite(path.into()),
        Some(Some(("postgres", url))) => LoadStore::Postgres {
            url: url.into(),
            schema: args
                .schema
                .clone()
                .unwrap_or_else(|| format!("tokenfence_load_{}", std::process::id())),
        },
        Some(_) => {
            eprintln!("error: --store is sqlite:PATH or postgres:URL");
            return ExitCode::from(2);
        }
    };
    if let Some(concurrency) = args.keepalive_concurrency {
        let report = tokenfence_tests::load::keepalive(args.connections, concurrency, &store).await;
        return finish(report, true, |r| {
            r.still_due == 0 && r.provider_calls == r.connections as u64
        });
    }
    let opts = LoadOptions {
        connections: args.connections,
        duration: Duration::from_secs(args.seconds),
        callers: args.callers,
        access_ttl: Duration::from_secs(args.access_ttl_secs),
        store,
        mock_url: args.mock_url,
        seed: !args.no_seed,
    };
    finish(run(&opts).await, args.json, |r| {
        r.errors == 0 && r.provider_calls == r.rotations
    })
}

/// Prints `report` (JSON, or Rust's pretty form) and exits 0 when `held`.
fn finish<R: serde::Serialize + std::fmt::Debug>(
    report: Result<R, String>,
    json: bool,
    held: impl Fn(&R) -> bool,
) -> ExitCode {
    match report {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!("{report:#?}");
            }
            if held(&report) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
