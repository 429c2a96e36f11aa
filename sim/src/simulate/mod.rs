//! The deterministic simulator: a year of connections, races and faults, with
//! tokenfence and the naive baselines side by side on the same seed.
//!
//! One `u64` seed drives everything through ChaCha8 streams (options, network and
//! faults, each connection's traffic); the clock is virtual; events are ordered by
//! (time, sequence); nothing reads a wall clock or iterates a hash map. The same
//! seed gives the same report and the same trace hash.
//!
//! A run has two phases. In the *fault phase* (`--days`), callers on W workers in P
//! processes ask for tokens of M connections (scheduled syncs, webhooks, "sync now"
//! clicks, 401 retries); some connections sit idle for months; users authorize new
//! connections, reconnect flagged ones and disconnect some; and the faults the seed
//! enabled strike. Every worker runs one real `tokenfence_core::Connection` per
//! connection it touches; each process scans the store for connections due for
//! keep-alive or with an abandoned lease and feeds them `Input::Maintain`. The
//! invariants are checked after every step with the predicates of
//! `tokenfence_core::invariants`. In the *heal phase* faults stop and every
//! connection is asked for a token: every request must resolve (L1), idle
//! connections must have survived (L2), degraded ones recover (L3), hard deadlines
//! were announced (L4), and dead connections are not stormed (L5).

mod checks;
mod drive;
pub mod ledger;
pub mod options;
pub mod report;
pub mod workload;
mod world;

pub use ledger::Violation;
pub use options::{Derived, Fault, FaultChoice, Fleet, FleetProvider, LeaseClock, SimOptions};
pub use report::{SeedReport, StrategyReport};

use crate::strategy::Strategy;
use std::collections::BTreeMap;
use std::sync::Arc;
use workload::Usage;

/// One seed's results, and the trace of the connection asked for.
#[derive(Clone, Debug)]
pub struct SeedRun {
    /// The report.
    pub report: SeedReport,
    /// Trace lines of the traced connection (empty when none was asked for).
    pub trace: Vec<String>,
}

/// What to trace: a strategy's run and one connection (index) of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceTarget {
    /// The strategy whose run is traced.
    pub strategy: Strategy,
    /// The connection index (`realm-{index+1:06}`).
    pub connection: usize,
}

/// Runs every strategy of `opts` on its seed. `progress` is told the strategy and
/// the virtual day reached, now and then.
pub fn run_seed(
    opts: &SimOptions,
    trace: Option<TraceTarget>,
    progress: &mut dyn FnMut(Strategy, u64),
) -> SeedRun {
    let opts = Arc::new(opts.clone());
    let derived = Arc::new(Derived::new(&opts));
    let mut strategies = Vec::new();
    let mut lines = Vec::new();
    let mut fleet = BTreeMap::new();
    for &strategy in &opts.strategies {
        let traced = trace
            .filter(|t| t.strategy == strategy)
            .map(|t| t.connection);
        let mut world = world::World::new(opts.clone(), derived.clone(), strategy, traced);
        if fleet.is_empty() {
            fleet = world.fleet();
        }
        let start = world::START;
        world.run(|at| progress(strategy, at.saturating_since(start).as_secs() / 86_400));
        strategies.push(StrategyReport::from_ledger(&world.ledger));
        if traced.is_some() {
            lines = std::mem::take(&mut world.trace_lines);
        }
    }
    SeedRun {
        report: SeedReport {
            seed: opts.seed,
            options: SeedReport::options(&opts),
            derived: (*derived).clone(),
            fleet,
            strategies,
        },
        trace: lines,
    }
}

/// The connection worth tracing in a report: tokenfence's first violation, else a
/// baseline's (in the order they ran).
pub fn replay_target(report: &SeedReport) -> Option<TraceTarget> {
    let mut columns: Vec<&StrategyReport> = report.strategies.iter().collect();
    columns.sort_by_key(|s| s.strategy != "tokenfence");
    columns.into_iter().find_map(|s| {
        let e = s.examples.first()?;
        Some(TraceTarget {
            strategy: Strategy::from_name(s.strategy)?,
            connection: e.connection,
        })
    })
}

impl world::World {
    /// Connections by usage at the start, and those churn will add.
    fn fleet(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (c, conn) in self.conns.iter().enumerate() {
            let key = if c >= self.opts.connections {
                "authorized during the run"
            } else {
                match conn.workload.usage {
                    Usage::Active => "active",
                    Usage::Occasional => "occasional",
                    Usage::Idle => "idle",
                }
            };
            *out.entry(key).or_default() += 1;
        }
        out
    }
}
