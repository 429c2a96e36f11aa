//! Running the model checker on one configuration and reporting what it found.

use crate::model::{representative, trace, Action, ModelConfig, State, TokenfenceModel};
use serde::Serialize;
use stateright::report::{ReportData, ReportDiscovery, Reporter};
use stateright::{Checker, Expectation, HasDiscoveries, Model, Path, UniformChooser};
use std::collections::BTreeMap;
use std::time::Duration;

/// How the state space is searched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// Breadth first, one thread: the first counterexample found is a shortest one.
    Bfs,
    /// Depth first; with `symmetry`, states equal up to a permutation of workers are
    /// explored once (stateright applies symmetry only in DFS).
    Dfs,
    /// Random walks from the initial states, each action chosen uniformly, the
    /// walks derived from this seed: breadth over a space too deep to search,
    /// never a proof (the verdicts of what did not fail are undecided).
    Random(u64),
}

/// Checker options.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Search order.
    pub search: Search,
    /// Symmetry reduction over worker slots (DFS only).
    pub symmetry: bool,
    /// Checker threads.
    pub threads: usize,
    /// Stop as soon as one `always` or `eventually` property fails (baselines).
    pub stop_at_first_failure: bool,
    /// Print progress to stderr every few seconds.
    pub progress: bool,
    /// Stop after this many states (the search is then not exhaustive).
    pub max_states: Option<usize>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            search: Search::Bfs,
            symmetry: false,
            threads: 1,
            stop_at_first_failure: false,
            progress: false,
            max_states: None,
        }
    }
}

/// The verdict on one property.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// An `always`/`eventually` property held in every explored state/path.
    Holds,
    /// The checker found a counterexample.
    Fails,
    /// A vacuity guard was reached.
    Reached,
    /// A vacuity guard was never reached: the model does not test what we think.
    NotReached,
    /// The search stopped before this property could be decided.
    Undecided,
}

/// One property's result.
#[derive(Clone, Debug, Serialize)]
pub struct PropertyResult {
    /// Property name.
    pub property: &'static str,
    /// `always`, `eventually` or `sometimes`.
    pub kind: &'static str,
    /// The verdict.
    pub verdict: Verdict,
    /// The counterexample (or, for a guard, the example), as numbered steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<Vec<String>>,
}

/// The result of checking one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// The configuration, in words.
    pub config: String,
    /// Workers.
    pub workers: usize,
    /// Provider class.
    pub provider: String,
    /// Strategy.
    pub strategy: String,
    /// `bfs` or `dfs` (+ `symmetry`).
    pub search: String,
    /// States generated.
    pub states: usize,
    /// Distinct states.
    pub unique_states: usize,
    /// Longest path explored.
    pub max_depth: usize,
    /// Wall-clock seconds (as measured by the checker's reporter).
    pub seconds: f64,
    /// Whether the whole bounded state space was explored.
    pub exhaustive: bool,
    /// Per property.
    pub properties: Vec<PropertyResult>,
}

impl CheckReport {
    /// No `always`/`eventually` property failed and every guard was reached.
    pub fn all_hold(&self) -> bool {
        self.properties
            .iter()
            .all(|p| matches!(p.verdict, Verdict::Holds | Verdict::Reached))
    }

    /// The properties that failed.
    pub fn failures(&self) -> impl Iterator<Item = &PropertyResult> {
        self.properties
            .iter()
            .filter(|p| p.verdict == Verdict::Fails)
    }

    /// Distinct states per second.
    pub fn states_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.unique_states as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// A human-readable report.
    pub fn render(&self) -> String {
        let mut out = vec![
            format!("== {}", self.config),
            format!(
                "   {}: {} states, {} unique, depth {}, {:.2} s{}{}",
                self.search,
                self.states,
                self.unique_states,
                self.max_depth,
                self.seconds,
                if self.seconds >= 0.1 {
                    format!(" ({:.0} unique states/s)", self.states_per_second())
                } else {
                    String::new()
                },
                if self.exhaustive {
                    ""
                } else {
                    ", stopped early"
                }
            ),
        ];
        for p in &self.properties {
            let verdict = match p.verdict {
                Verdict::Holds => "holds",
                Verdict::Fails => "FAILS",
                Verdict::Reached => "reached",
                Verdict::NotReached => "NOT REACHED",
                Verdict::Undecided => "undecided (search stopped)",
            };
            out.push(format!("   {:<10} {:<58} {verdict}", p.kind, p.property));
        }
        for p in &self.properties {
            if let (Verdict::Fails, Some(trace)) = (&p.verdict, &p.trace) {
                out.push(format!("\n-- counterexample to \"{}\":", p.property));
                out.extend(trace.iter().cloned());
            }
        }
        out.join("\n")
    }
}

struct Collect {
    progress: bool,
    last_print: Duration,
    done: Option<(usize, usize, usize, Duration)>,
    discoveries: BTreeMap<&'static str, Path<State, Action>>,
}

impl Reporter<TokenfenceModel> for Collect {
    fn report_checking(&mut self, data: ReportData) {
        if data.done {
            self.done = Some((
                data.total_states,
                data.unique_states,
                data.max_depth,
                data.duration,
            ));
        } else if self.progress && data.duration >= self.last_print + Duration::from_secs(2) {
            self.last_print = data.duration;
            eprintln!(
                "   ... {} states, {} unique, depth {}, {} s",
                data.total_states,
                data.unique_states,
                data.max_depth,
                data.duration.as_secs()
            );
        }
    }

    fn report_discoveries(
        &mut self,
        _: &TokenfenceModel,
        discoveries: BTreeMap<&'static str, ReportDiscovery<TokenfenceModel>>,
    ) {
        self.discoveries = discoveries
            .into_iter()
            .map(|(name, d)| (name, d.path))
            .collect();
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(5)
    }
}

/// Checks one configuration.
pub fn run_check(cfg: ModelConfig, opts: &CheckOptions) -> Result<CheckReport, String> {
    let model = TokenfenceModel::new(cfg)?;
    let mut builder = model.checker().threads(opts.threads.max(1));
    if opts.stop_at_first_failure {
        builder = builder.finish_when(HasDiscoveries::AnyFailures);
    }
    if let Some(budget) = opts.max_states {
        builder = builder.target_state_count(budget);
    }
    let mut collect = Collect {
        progress: opts.progress,
        last_print: Duration::ZERO,
        done: None,
        discoveries: BTreeMap::new(),
    };
    Ok(match opts.search {
        Search::Bfs => {
            let checker = builder.spawn_bfs().report(&mut collect).join();
            summarize(checker.model(), &collect, opts)
        }
        Search::Dfs => {
            if opts.symmetry {
                builder = builder.symmetry_fn(representative);
            }
            let checker = builder.spawn_dfs().report(&mut collect).join();
            summarize(checker.model(), &collect, opts)
        }
        Search::Random(seed) => {
            let checker = builder
                .spawn_simulation(seed, UniformChooser)
                .report(&mut collect)
                .join();
            summarize(checker.model(), &collect, opts)
        }
    })
}

fn summarize(model: &TokenfenceModel, collect: &Collect, opts: &CheckOptions) -> CheckReport {
    let cfg = &model.cfg;
    let properties = model.properties();
    let (states, unique, depth, elapsed) = collect.done.unwrap_or_default();
    let any_failure = properties.iter().any(|p| {
        p.expectation != Expectation::Sometimes && collect.discoveries.contains_key(p.name)
    });
    let budget_spent = opts.max_states.is_some_and(|budget| states >= budget);
    let sampled = matches!(opts.search, Search::Random(_));
    let stopped_early = sampled || budget_spent || (opts.stop_at_first_failure && any_failure);
    let exhaustive = !stopped_early
        && properties
            .iter()
            .any(|p| !collect.discoveries.contains_key(p.name));
    let results = properties
        .iter()
        .map(|p| {
            let found = collect.discoveries.get(p.name);
            let kind = match p.expectation {
                Expectation::Always => "always",
                Expectation::Eventually => "eventually",
                Expectation::Sometimes => "sometimes",
            };
            let verdict = match (&p.expectation, found.is_some(), exhaustive) {
                (Expectation::Sometimes, true, _) => Verdict::Reached,
                (Expectation::Sometimes, false, true) => Verdict::NotReached,
                (_, true, _) => Verdict::Fails,
                (_, false, true) => Verdict::Holds,
                (_, false, false) => Verdict::Undecided,
            };
            let trace = match verdict {
                Verdict::Fails => found.map(|path| trace::render(model, path)),
                _ => None,
            };
            PropertyResult {
                property: p.name,
                kind,
                verdict,
                trace,
            }
        })
        .collect();
    CheckReport {
        config: cfg.describe(),
        workers: cfg.workers,
        provider: cfg.provider.name(),
        strategy: cfg.strategy.name().into(),
        search: match (opts.search, opts.symmetry) {
            (Search::Bfs, _) => "bfs".into(),
            (Search::Dfs, false) => "dfs".into(),
            (Search::Dfs, true) => "dfs+symmetry".into(),
            (Search::Random(seed), _) => format!("random walks (seed {seed})"),
        },
        states,
        unique_states: unique,
        max_depth: depth,
        seconds: elapsed.as_secs_f64(),
        exhaustive,
        properties: results,
    }
}

/// Serves stateright's explorer for `cfg` on `addr` (blocks).
pub fn explore(cfg: ModelConfig, addr: &str) -> Result<(), String> {
    let model = TokenfenceModel::new(cfg)?;
    let _ = model.checker().serve(addr);
    Ok(())
}
