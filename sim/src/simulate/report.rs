//! What a run reports, per strategy: as a table for people and as JSON for machines.

use super::ledger::{Ledger, Violation};
use super::options::{Derived, SimOptions};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One strategy's results on one seed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StrategyReport {
    /// The strategy.
    pub strategy: &'static str,
    /// Events processed.
    pub events: u64,
    /// Running hash of every event, as 16 hex digits.
    pub trace_hash: String,
    /// Access requests made by callers.
    pub requests: u64,
    /// Answered with a token.
    pub served: u64,
    /// Answered with a transient error (retry later).
    pub answered_transient: u64,
    /// Answered "reconnect required" or "disconnected".
    pub answered_dead: u64,
    /// Callers lost with their process in a crash.
    pub aborted_by_crash: u64,
    /// Refresh requests sent.
    pub refresh_sends: u64,
    /// Refresh requests the provider processed.
    pub provider_refresh_calls: u64,
    /// New refresh tokens minted by the provider.
    pub rotations: u64,
    /// Processed refresh calls per rotation.
    pub calls_per_rotation: f64,
    /// Sends while another refresh of the same connection was in flight.
    pub duplicate_calls: u64,
    /// `invalid_grant` answers by cause ("self": we caused it; "provider": the
    /// provider ended the grant).
    pub invalid_grant: BTreeMap<&'static str, u64>,
    /// `invalid_grant` we caused.
    pub invalid_grant_self: u64,
    /// `invalid_grant` the provider caused (user revocation, idle or hard expiry).
    pub invalid_grant_provider: u64,
    /// Rotated-away tokens presented knowingly, to learn whether a rotation was lost.
    pub in_doubt_probes: u64,
    /// Connections lost by our fault (S2).
    pub lost_by_our_fault: u64,
    /// `LostRotation` declared where the harness's ghost shows a request presenting
    /// the stored token that may have been processed unseen, and no recovery.
    pub lost_rotation_justified: u64,
    /// `LostRotation` declared without such a request (S4; must be 0).
    pub lost_rotation_false: u64,
    /// Re-auth flags raised when the provider had really ended the grant.
    pub reauth_correct: u64,
    /// Re-auth flags while the provider still accepted the stored token (S4).
    pub reauth_false: u64,
    /// Writes that landed on a newer generation than they were derived from (S1).
    pub stale_overwrites: u64,
    /// Compare-and-swap conflicts.
    pub cas_conflicts: u64,
    /// Idle connections whose idle window passed during the run.
    pub idle_connections: u64,
    /// Of those, alive at the end.
    pub idle_kept_alive: u64,
    /// Hard deadlines whose notice fell in the run.
    pub hard_deadlines: u64,
    /// Of those, warned in time with `ReconnectSoon`.
    pub hard_warnings: u64,
    /// Acquire latency, median, virtual milliseconds.
    pub latency_p50_ms: u64,
    /// Acquire latency, 99th percentile.
    pub latency_p99_ms: u64,
    /// Acquire latency, maximum.
    pub latency_max_ms: u64,
    /// Invariant violations by invariant.
    pub violations: BTreeMap<&'static str, u64>,
    /// The first violations, with their story.
    pub examples: Vec<Violation>,
    /// Events by kind: arrival, access, store, arrive, feed, deadline, timer, scan,
    /// crash, restart, pause, outage, revoke, authorize, warn-check, heal, reply.
    pub events_by_kind: Vec<u64>,
    /// Store commands carried out: loads, lease requests, writes.
    pub store_commands: [u64; 3],
    /// Keep-alive scanner inputs (`Maintain`).
    pub maintains: u64,
    /// Faults that struck: crashes, pauses, store outages, failed store commands,
    /// lost replies, user revocations.
    pub faults_struck: BTreeMap<&'static str, u64>,
}

impl StrategyReport {
    /// The report of a finished run.
    pub fn from_ledger(l: &Ledger) -> Self {
        let by = |suffix: &str| {
            l.invalid_grant
                .iter()
                .filter(|(k, _)| k.ends_with(suffix))
                .map(|(_, v)| v)
                .sum()
        };
        StrategyReport {
            strategy: l.strategy.map_or("?", |s| s.name()),
            events: l.events,
            trace_hash: l.trace_hash(),
            requests: l.requests,
            served: l.served,
            answered_transient: l.answered_transient,
            answered_dead: l.answered_dead,
            aborted_by_crash: l.aborted_by_crash,
            refresh_sends: l.sends,
            provider_refresh_calls: l.refresh_calls,
            rotations: l.rotations,
            calls_per_rotation: if l.rotations == 0 {
                0.0
            } else {
                (l.refresh_calls as f64 / l.rotations as f64 * 100.0).round() / 100.0
            },
            duplicate_calls: l.duplicate_calls,
            invalid_grant: l.invalid_grant.clone(),
            invalid_grant_self: by("(self)"),
            invalid_grant_provider: by("(provider)"),
            in_doubt_probes: l.in_doubt_probes,
            lost_by_our_fault: l.lost_by_us,
            lost_rotation_justified: l.lost_rotation_justified,
            lost_rotation_false: l.lost_rotation_false,
            reauth_correct: l.reauth_correct,
            reauth_false: l.reauth_false,
            stale_overwrites: l.stale_overwrites,
            cas_conflicts: l.conflicts,
            idle_connections: l.idle_total,
            idle_kept_alive: l.idle_kept,
            hard_deadlines: l.hard_deadlines,
            hard_warnings: l.hard_warned,
            latency_p50_ms: l.latency.quantile(0.5),
            latency_p99_ms: l.latency.quantile(0.99),
            latency_max_ms: l.latency.max(),
            violations: l.violations.clone(),
            examples: l.examples.clone(),
            events_by_kind: l.by_kind[1..].to_vec(),
            store_commands: l.store_commands,
            maintains: l.maintains,
            faults_struck: [
                ("crashes", l.crashes),
                ("pauses", l.pauses),
                ("store outages", l.outages),
                ("failed store commands", l.store_failures),
                ("lost replies", l.lost_replies),
                ("user revocations", l.user_revocations),
            ]
            .into_iter()
            .collect(),
        }
    }

    /// Total invariant violations.
    pub fn total_violations(&self) -> u64 {
        self.violations.values().sum()
    }
}

/// The options of a run, as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OptionsReport {
    /// Connections at the start.
    pub connections: usize,
    /// Workers.
    pub workers: usize,
    /// Processes.
    pub processes: usize,
    /// Days of traffic and faults.
    pub days: u64,
    /// The providers of the fleet, each with the hard lifetime of its refresh
    /// tokens in days, if any.
    pub providers: Vec<(String, Option<u64>)>,
}

/// One seed's results: options, derived options, and every strategy side by side.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// The options.
    pub options: OptionsReport,
    /// What the seed derived.
    pub derived: Derived,
    /// Connections by usage at the start, and added by churn.
    pub fleet: BTreeMap<&'static str, u64>,
    /// Per strategy.
    pub strategies: Vec<StrategyReport>,
}

impl SeedReport {
    /// Builds the options part.
    pub fn options(opts: &SimOptions) -> OptionsReport {
        OptionsReport {
            connections: opts.connections,
            workers: opts.workers,
            processes: opts.processes,
            days: opts.days,
            providers: opts
                .fleet
                .iter()
                .map(|f| {
                    let cap = f.spec(opts.hard_lifetime).profile.hard_lifetime;
                    (f.name(), cap.map(|d| d.as_secs() / 86_400))
                })
                .collect(),
        }
    }

    /// The tokenfence column, if it ran.
    pub fn tokenfence(&self) -> Option<&StrategyReport> {
        self.strategies.iter().find(|s| s.strategy == "tokenfence")
    }

    /// Whether tokenfence (if it ran) held every invariant.
    pub fn tokenfence_held(&self) -> bool {
        self.tokenfence().is_none_or(|t| t.total_violations() == 0)
    }

    /// The derived options, one per line.
    pub fn header(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(out, "seed {}", self.seed);
        let providers: Vec<String> = o
            .providers
            .iter()
            .map(|(name, cap)| {
                let cap = cap.map_or("no hard lifetime".into(), |d| {
                    format!("hard lifetime {d} days")
                });
                format!("{name} ({cap})")
            })
            .collect();
        let _ = writeln!(
            out,
            "options: {} connections of {}, {} workers in {} processes, {} days then a heal phase",
            o.connections,
            providers.join(", "),
            o.workers,
            o.processes,
            o.days,
        );
        let fleet: Vec<String> = self.fleet.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let _ = writeln!(out, "fleet: {}", fleet.join(", "));
        for line in self.derived.describe() {
            let _ = writeln!(out, "derived: {line}");
        }
        out
    }

    /// The table: one row per metric, one column per strategy.
    pub fn table(&self) -> String {
        type Row = (&'static str, fn(&StrategyReport) -> String);
        let rows: [Row; 23] = [
            ("access requests", |s| s.requests.to_string()),
            ("  served a token", |s| s.served.to_string()),
            ("  told reconnect/disconnected", |s| {
                s.answered_dead.to_string()
            }),
            ("  told retry later", |s| s.answered_transient.to_string()),
            ("provider refresh calls", |s| {
                s.provider_refresh_calls.to_string()
            }),
            ("  per rotation", |s| format!("{:.2}", s.calls_per_rotation)),
            ("  duplicates in flight", |s| s.duplicate_calls.to_string()),
            ("invalid_grant, self-inflicted", |s| {
                s.invalid_grant_self.to_string()
            }),
            ("invalid_grant, provider's own", |s| {
                s.invalid_grant_provider.to_string()
            }),
            ("connections lost by our fault", |s| {
                s.lost_by_our_fault.to_string()
            }),
            ("lost rotations flagged, justified", |s| {
                s.lost_rotation_justified.to_string()
            }),
            ("lost rotations flagged, false", |s| {
                s.lost_rotation_false.to_string()
            }),
            ("re-auth flagged correctly", |s| {
                s.reauth_correct.to_string()
            }),
            ("false re-auth flags", |s| s.reauth_false.to_string()),
            ("stale overwrites", |s| s.stale_overwrites.to_string()),
            ("CAS conflicts", |s| s.cas_conflicts.to_string()),
            ("idle connections kept alive (live ones)", |s| {
                format!("{}/{}", s.idle_kept_alive, s.idle_connections)
            }),
            ("hard-expiry warnings in time (live ones)", |s| {
                format!("{}/{}", s.hard_warnings, s.hard_deadlines)
            }),
            ("acquire p50 (virtual)", |s| ms(s.latency_p50_ms)),
            ("acquire p99 (virtual)", |s| ms(s.latency_p99_ms)),
            ("acquire max (virtual)", |s| ms(s.latency_max_ms)),
            ("invariant violations", |s| s.total_violations().to_string()),
            ("events", |s| s.events.to_string()),
        ];
        let width = 41;
        let col = 13;
        let mut out = String::new();
        let _ = write!(out, "{:width$}", "");
        for s in &self.strategies {
            let _ = write!(out, "{:>col$}", s.strategy);
        }
        out.push('\n');
        for (name, f) in rows {
            let _ = write!(out, "{name:width$}");
            for s in &self.strategies {
                let _ = write!(out, "{:>col$}", f(s));
            }
            out.push('\n');
        }
        let _ = write!(out, "{:width$}", "trace hash");
        for s in &self.strategies {
            let _ = write!(out, "{:>col$}", &s.trace_hash[..8]);
        }
        out.push('\n');
        for s in &self.strategies {
            if s.violations.is_empty() {
                continue;
            }
            let list: Vec<String> = s
                .violations
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect();
            let _ = writeln!(out, "{}: {}", s.strategy, list.join(", "));
            let providers = &self.options.providers;
            for e in s.examples.iter().take(3) {
                // Connection c talks to provider c mod n (SimOptions::fleet).
                let provider = match &providers[..] {
                    [] | [_] => String::new(),
                    many => format!(" ({})", many[e.connection % many.len()].0),
                };
                let _ = writeln!(
                    out,
                    "  e.g. {} on realm-{:06}{provider} at {}: {}",
                    e.invariant,
                    e.connection + 1,
                    ms(e.at_ms),
                    e.detail
                );
            }
        }
        out
    }

    /// The one-line verdict.
    pub fn verdict(&self) -> String {
        let baselines: Vec<String> = self
            .strategies
            .iter()
            .filter(|s| s.strategy != "tokenfence")
            .map(|s| {
                if s.total_violations() == 0 {
                    format!("{} held", s.strategy)
                } else {
                    format!(
                        "{} broke {} ({} lost, {} stale overwrites, {} false re-auth)",
                        s.strategy,
                        s.violations.keys().copied().collect::<Vec<_>>().join("/"),
                        s.lost_by_our_fault,
                        s.stale_overwrites,
                        s.reauth_false
                    )
                }
            })
            .collect();
        let tf = match self.tokenfence() {
            None => "tokenfence not run".to_string(),
            Some(t) if t.total_violations() == 0 => "tokenfence held every invariant".into(),
            Some(t) => format!("tokenfence BROKE {} invariant(s)", t.total_violations()),
        };
        if baselines.is_empty() {
            format!("verdict: {tf}")
        } else {
            format!("verdict: {tf}; {}", baselines.join("; "))
        }
    }
}

/// Virtual milliseconds for people.
fn ms(v: u64) -> String {
    if v < 1_000 {
        format!("{v} ms")
    } else if v < 120_000 {
        format!("{:.1} s", v as f64 / 1_000.0)
    } else if v < 7_200_000 {
        format!("{:.1} min", v as f64 / 60_000.0)
    } else {
        format!("{:.1} d", v as f64 / 86_400_000.0)
    }
}
