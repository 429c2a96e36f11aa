//! What one simulation runs: the options a user gives, and everything derived from
//! the seed (swarm testing: each seed enables a random subset of faults with random
//! intensities). Every derived option is printed with the report.

use crate::provider::ProviderSpec;
use crate::strategy::Strategy;
use core::time::Duration;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use tokenfence_core::{days, ProviderProfile};

/// The provider every connection of the fleet talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fleet {
    /// Intuit QuickBooks Online: periodic rotation (24 h) with 24 h grace, 100-day
    /// idle window, 5-year cap.
    Intuit,
    /// Xero: rotation on every refresh, 30-minute grace, 60-day idle window.
    Xero,
    /// Atlassian: rotation with 10-minute grace and reuse detection, 90-day idle
    /// window, 365-day cap.
    Atlassian,
    /// Google: never rotates, omits `refresh_token`, 182-day idle window.
    Google,
    /// GitHub App user tokens: strict rotation without grace; each refresh token
    /// lives 182 days from its issue (a window each refresh renews).
    Github,
    /// Strict rotation with reuse detection (Auth0 without leeway, RFC 9700).
    Reuse,
    /// Xero's rotation and windows with access tokens that live 60 s: shorter than
    /// the default 5-minute margin, which must adapt.
    ShortLived,
}

impl Fleet {
    /// Every fleet, in a stable order.
    pub const ALL: [Fleet; 7] = [
        Fleet::Intuit,
        Fleet::Xero,
        Fleet::Atlassian,
        Fleet::Google,
        Fleet::Github,
        Fleet::Reuse,
        Fleet::ShortLived,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Fleet::Intuit => "intuit",
            Fleet::Xero => "xero",
            Fleet::Atlassian => "atlassian",
            Fleet::Google => "google",
            Fleet::Github => "github",
            Fleet::Reuse => "reuse-detection",
            Fleet::ShortLived => "short-lived",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The provider, with real lifetimes; `hard_lifetime` overrides the cap.
    pub fn spec(self, hard_lifetime: Option<Duration>) -> ProviderSpec {
        let base = match self {
            Fleet::Intuit => return with_cap(ProviderSpec::intuit(), hard_lifetime),
            Fleet::Xero => ProviderProfile::xero(),
            Fleet::ShortLived => ProviderProfile {
                name: "short-lived".into(),
                default_access_ttl: Duration::from_secs(60),
                ..ProviderProfile::xero()
            },
            Fleet::Atlassian => ProviderProfile::atlassian(),
            Fleet::Google => ProviderProfile::google(),
            Fleet::Github => ProviderProfile::github_app(),
            Fleet::Reuse => ProviderProfile {
                idle_window: Some(days(30)),
                ..ProviderProfile::strict_reuse_detecting(
                    "auth0",
                    "https://tenant.auth0.example/oauth/token",
                )
            },
        };
        with_cap(ProviderSpec::of_profile(base), hard_lifetime)
    }
}

/// One provider of a fleet: a named one, or a provider profile (a built-in profile
/// or a profile file) simulated with its real lifetimes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetProvider {
    /// A named fleet.
    Known(Fleet),
    /// A profile.
    Profile(Box<ProviderProfile>),
}

impl FleetProvider {
    /// Parses a comma-separated list of fleet names and profiles (built-in names
    /// or profile files).
    pub fn parse_list(list: &str) -> Result<Vec<FleetProvider>, String> {
        let parsed = list
            .split(',')
            .map(|item| {
                let item = item.trim();
                match Fleet::from_name(item) {
                    Some(fleet) => Ok(FleetProvider::Known(fleet)),
                    None => ProviderProfile::named_or_file(item)
                        .map(|p| FleetProvider::Profile(Box::new(p)))
                        .map_err(|e| {
                            let known: Vec<_> = Fleet::ALL.iter().map(|f| f.name()).collect();
                            format!("{e}; or a fleet: {}", known.join(", "))
                        }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut names: Vec<String> = parsed.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() < parsed.len() {
            return Err("--provider names one provider twice".into());
        }
        Ok(parsed)
    }

    /// The fleet's name, or the profile's.
    pub fn name(&self) -> String {
        match self {
            FleetProvider::Known(fleet) => fleet.name().into(),
            FleetProvider::Profile(profile) => profile.name.clone(),
        }
    }

    /// The provider, with real lifetimes; `hard_lifetime` overrides the cap.
    pub fn spec(&self, hard_lifetime: Option<Duration>) -> ProviderSpec {
        match self {
            FleetProvider::Known(fleet) => fleet.spec(hard_lifetime),
            FleetProvider::Profile(profile) => {
                with_cap(ProviderSpec::of_profile((**profile).clone()), hard_lifetime)
            }
        }
    }
}

impl From<Fleet> for FleetProvider {
    fn from(fleet: Fleet) -> Self {
        FleetProvider::Known(fleet)
    }
}

fn with_cap(mut spec: ProviderSpec, hard_lifetime: Option<Duration>) -> ProviderSpec {
    if hard_lifetime.is_some() {
        spec.profile.hard_lifetime = hard_lifetime;
    }
    spec
}

/// A fault the simulator injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The token endpoint answers 5xx without processing (per exchange).
    ServerError,
    /// 429 with `Retry-After` (per exchange).
    RateLimited,
    /// A proxy answers with an HTML error page (per exchange).
    HtmlBody,
    /// The reply is slow, sometimes past the request deadline (per exchange).
    LatencySpike,
    /// The provider processes the request and the reply is lost (per exchange).
    LostReply,
    /// The provider processes the request and the reply arrives truncated.
    Truncated,
    /// The request is never sent (connect error, per exchange).
    ConnectError,
    /// A process crashes (per process and day; half of the crashes strike between
    /// a reply and its commit) and restarts under new worker ids.
    Crash,
    /// A worker pauses for longer than a lease (per worker and day).
    Pause,
    /// The store is unavailable for a while (per day), and single commands fail
    /// (per command, half of them after taking effect).
    StoreOutage,
    /// Bursts of concurrent requests for one connection on several workers (CAS
    /// conflicts and lease contention; per connection and day).
    Herd,
    /// Process clocks disagree by up to this many milliseconds.
    ClockSkew,
    /// Users disconnect the app at the provider (per connection and year).
    Revoke,
}

impl Fault {
    /// Every fault, in a stable order.
    pub const ALL: [Fault; 13] = [
        Fault::ServerError,
        Fault::RateLimited,
        Fault::HtmlBody,
        Fault::LatencySpike,
        Fault::LostReply,
        Fault::Truncated,
        Fault::ConnectError,
        Fault::Crash,
        Fault::Pause,
        Fault::StoreOutage,
        Fault::Herd,
        Fault::ClockSkew,
        Fault::Revoke,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::ServerError => "5xx",
            Fault::RateLimited => "429",
            Fault::HtmlBody => "html",
            Fault::LatencySpike => "latency",
            Fault::LostReply => "lost-reply",
            Fault::Truncated => "truncated",
            Fault::ConnectError => "connect",
            Fault::Crash => "crash",
            Fault::Pause => "pause",
            Fault::StoreOutage => "store",
            Fault::Herd => "herd",
            Fault::ClockSkew => "skew",
            Fault::Revoke => "revoke",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The intensity range `(low, high)` a seed draws from (log-uniform), and its
    /// unit.
    fn range(self) -> (f64, f64) {
        match self {
            Fault::ServerError | Fault::HtmlBody | Fault::ConnectError => (0.002, 0.05),
            Fault::RateLimited | Fault::LatencySpike => (0.002, 0.03),
            Fault::LostReply | Fault::Truncated => (0.001, 0.02),
            Fault::Crash => (0.005, 0.1),
            Fault::Pause => (0.01, 0.3),
            Fault::StoreOutage => (0.02, 0.5),
            Fault::Herd => (0.02, 0.3),
            Fault::ClockSkew => (1_000.0, 90_000.0),
            Fault::Revoke => (0.005, 0.05),
        }
    }

    /// The unit of the intensity, for printing.
    pub fn unit(self) -> &'static str {
        match self {
            Fault::Crash => "per process-day",
            Fault::Pause => "per worker-day",
            Fault::StoreOutage => "outages per day",
            Fault::Herd => "per connection-day",
            Fault::ClockSkew => "ms at most",
            Fault::Revoke => "per connection-year",
            _ => "per exchange",
        }
    }
}

/// Which faults a run injects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultChoice {
    /// Each seed enables a random subset with random intensities.
    Swarm,
    /// These faults, with intensities drawn from the seed.
    Only(Vec<Fault>),
}

impl FaultChoice {
    /// Parses `swarm`, `all`, `none` or a comma-separated list of fault names.
    pub fn parse(list: &str) -> Result<Self, String> {
        match list.trim() {
            "swarm" => Ok(FaultChoice::Swarm),
            "all" => Ok(FaultChoice::Only(Fault::ALL.to_vec())),
            "none" | "" => Ok(FaultChoice::Only(Vec::new())),
            list => list
                .split(',')
                .map(|n| {
                    Fault::from_name(n.trim()).ok_or_else(|| {
                        let known: Vec<_> = Fault::ALL.iter().map(|f| f.name()).collect();
                        format!(
                            "unknown fault `{n}`; known: {}, swarm, all, none",
                            known.join(", ")
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(FaultChoice::Only),
        }
    }
}

/// What a user chooses.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Connections at the start (churn adds more).
    pub connections: usize,
    /// Workers, spread over `processes`.
    pub workers: usize,
    /// Processes.
    pub processes: usize,
    /// Days of faults and traffic before the heal phase.
    pub days: u64,
    /// The providers of the fleet: connection `c` talks to `fleet[c % len]`.
    pub fleet: Vec<FleetProvider>,
    /// Faults.
    pub faults: FaultChoice,
    /// Overrides the provider's hard lifetime (exercises `ReconnectSoon`).
    pub hard_lifetime: Option<Duration>,
    /// Strategies run on the same seed, side by side.
    pub strategies: Vec<Strategy>,
    /// Whose clock decides lease expiry.
    pub lease_clock: LeaseClock,
}

/// Whose clock a store decides lease expiry on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeaseClock {
    /// The store's own (PostgreSQL's `now()`; SQLite and the in-memory store live
    /// on one host): skew between processes cannot break a lease.
    #[default]
    Store,
    /// The requesting process's (a store shared across hosts that trusts its
    /// callers' clocks): with skew beyond the send safety margin, a displaced
    /// holder may still send. Kept to show what skew does to naive strategies.
    Process,
}

impl Default for SimOptions {
    /// The project's main demonstration: 1,000 connections spread over Intuit,
    /// Xero, Google and GitHub, 16 workers in 4 processes, one year, seed 1, swarm
    /// faults, every strategy.
    fn default() -> Self {
        SimOptions {
            seed: 1,
            connections: 1_000,
            workers: 16,
            processes: 4,
            days: 365,
            fleet: [Fleet::Intuit, Fleet::Xero, Fleet::Google, Fleet::Github]
                .map(FleetProvider::from)
                .to_vec(),
            faults: FaultChoice::Swarm,
            hard_lifetime: None,
            strategies: Strategy::ALL.to_vec(),
            lease_clock: LeaseClock::Store,
        }
    }
}

impl SimOptions {
    /// Checks the options; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 || self.connections > 1_000_000 {
            return Err("--connections must be between 1 and 1000000".into());
        }
        if self.processes == 0 || self.workers < self.processes || self.workers > 4096 {
            return Err("--workers must be at least --processes (>= 1) and at most 4096".into());
        }
        if self.days == 0 || self.days > 3_650 {
            return Err("--days must be between 1 and 3650".into());
        }
        if self.hard_lifetime.is_some_and(|d| d < days(90)) {
            return Err("--hard-lifetime must be at least 90 days".into());
        }
        if self.fleet.is_empty() || self.fleet.len() > self.connections {
            return Err("--provider must name between one provider and one per connection".into());
        }
        if self.strategies.is_empty() {
            return Err("--strategies must name at least one strategy".into());
        }
        Ok(())
    }
}

/// Everything one seed derives: the faults and their intensities.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Derived {
    /// The seed.
    pub seed: u64,
    /// Enabled faults with their intensity (see [`Fault::unit`]).
    pub faults: BTreeMap<Fault, f64>,
}

impl Derived {
    /// Derives the faults of `seed` (the same seed always gives the same faults).
    pub fn new(opts: &SimOptions) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        rng.set_stream(STREAM_OPTIONS);
        let chosen: Vec<Fault> = match &opts.faults {
            FaultChoice::Swarm => Fault::ALL
                .into_iter()
                .filter(|_| unit(&mut rng) < 0.5)
                .collect(),
            FaultChoice::Only(list) => list.clone(),
        };
        let faults = Fault::ALL
            .into_iter()
            .map(|f| (f, log_uniform(&mut rng, f.range())))
            .filter(|(f, _)| chosen.contains(f))
            .map(|(f, x)| (f, (x * 10_000.0).round() / 10_000.0))
            .collect();
        Derived {
            seed: opts.seed,
            faults,
        }
    }

    /// The intensity of `fault`, zero when it is off.
    pub fn rate(&self, fault: Fault) -> f64 {
        self.faults.get(&fault).copied().unwrap_or(0.0)
    }

    /// One line per derived option.
    pub fn describe(&self) -> Vec<String> {
        if self.faults.is_empty() {
            return vec!["faults: none".into()];
        }
        self.faults
            .iter()
            .map(|(f, x)| format!("fault {:<10} {x} {}", f.name(), f.unit()))
            .collect()
    }
}

/// RNG stream of the derived options.
pub(crate) const STREAM_OPTIONS: u64 = 0;
/// RNG stream of the network and fault draws of a run.
pub(crate) const STREAM_RUN: u64 = 1;
/// RNG streams of connection `c`'s workload: `STREAM_WORKLOAD + c`.
pub(crate) const STREAM_WORKLOAD: u64 = 1 << 32;

/// A uniform draw in `[0, 1)`.
pub(crate) fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A log-uniform draw in `[low, high)`.
pub(crate) fn log_uniform(rng: &mut ChaCha8Rng, (low, high): (f64, f64)) -> f64 {
    (low.ln() + unit(rng) * (high.ln() - low.ln())).exp()
}
