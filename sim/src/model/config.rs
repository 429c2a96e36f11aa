//! What one model-checking run explores: workers, provider class, faults, bounds and
//! the strategy under test.

use crate::provider::{BehaviourClass, ProviderSpec};
pub use crate::strategy::Strategy;
use std::collections::BTreeSet;
use tokenfence_core::ProviderProfile;

/// The provider a model run checks against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ModelProvider {
    /// One of the behaviour classes of INVARIANTS.md.
    Class(BehaviourClass),
    /// A provider described by a profile (a profile file), its lifetimes scaled
    /// as [`ProviderSpec::scaled_profile`] says.
    Profile(Box<ProviderProfile>),
}

impl ModelProvider {
    /// The provider model, lifetimes in seconds.
    pub fn spec(&self) -> ProviderSpec {
        match self {
            ModelProvider::Class(class) => ProviderSpec::scaled(*class),
            ModelProvider::Profile(profile) => ProviderSpec::scaled_profile(profile),
        }
    }

    /// The class's name, or the profile's.
    pub fn name(&self) -> String {
        match self {
            ModelProvider::Class(class) => class.name().into(),
            ModelProvider::Profile(profile) => format!("profile {}", profile.name),
        }
    }
}

impl From<BehaviourClass> for ModelProvider {
    fn from(class: BehaviourClass) -> Self {
        ModelProvider::Class(class)
    }
}

/// A fault the model may inject. Each injection spends one unit of the fault budget
/// (except [`WrongClient`](FaultKind::WrongClient), a standing misconfiguration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// The provider answers 503 without processing the request.
    ServerError,
    /// The provider answers 429 with `Retry-After: 1`.
    RateLimited,
    /// The request never leaves the worker (connect error): `NotSent`.
    ConnectError,
    /// The provider processes the request (it may rotate) and the reply is lost.
    LostReply,
    /// The provider processes the request and the reply arrives truncated (S9).
    Garbled,
    /// A worker's store command is carried out but the worker pauses before it
    /// handles the answer (a GC or scheduling pause); time may pass meanwhile.
    Pause,
    /// A busy worker crashes and restarts with an empty machine under a new
    /// incarnation id; a request it had sent may still reach the provider.
    Crash,
    /// The user disconnects the app at the provider.
    Revoke,
    /// A store command fails (before or after it took effect).
    StoreFail,
    /// The last worker is configured with the sandbox app's credentials (S7).
    WrongClient,
}

impl FaultKind {
    /// Every fault kind, in a stable order.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::ServerError,
        FaultKind::RateLimited,
        FaultKind::ConnectError,
        FaultKind::LostReply,
        FaultKind::Garbled,
        FaultKind::Pause,
        FaultKind::Crash,
        FaultKind::Revoke,
        FaultKind::StoreFail,
        FaultKind::WrongClient,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ServerError => "5xx",
            FaultKind::RateLimited => "429",
            FaultKind::ConnectError => "connect",
            FaultKind::LostReply => "lost-reply",
            FaultKind::Garbled => "garbled",
            FaultKind::Pause => "pause",
            FaultKind::Crash => "crash",
            FaultKind::Revoke => "revoke",
            FaultKind::StoreFail => "store",
            FaultKind::WrongClient => "wrong-client",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Parses a comma-separated list, or `all`, `runtime` (all but `wrong-client`,
    /// which adds a misconfigured worker), or `none`.
    pub fn parse_list(list: &str) -> Result<BTreeSet<FaultKind>, String> {
        match list.trim() {
            "all" => Ok(Self::ALL.into_iter().collect()),
            "runtime" => Ok(Self::ALL
                .into_iter()
                .filter(|f| *f != FaultKind::WrongClient)
                .collect()),
            "none" | "" => Ok(BTreeSet::new()),
            list => list
                .split(',')
                .map(|name| {
                    Self::from_name(name.trim()).ok_or_else(|| {
                        let known: Vec<_> = Self::ALL.iter().map(|f| f.name()).collect();
                        format!(
                            "unknown fault `{name}`; known: {}, all, none",
                            known.join(", ")
                        )
                    })
                })
                .collect(),
        }
    }
}

/// One model configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelConfig {
    /// Number of workers sharing the connection.
    pub workers: usize,
    /// How the provider behaves.
    pub provider: ModelProvider,
    /// Faults the model may inject.
    pub faults: BTreeSet<FaultKind>,
    /// At most this many fault injections per behaviour.
    pub max_faults: u8,
    /// At most this many time jumps per behaviour, besides the jumps taken while
    /// callers wait and nothing else can happen (those are bounded by the horizon).
    pub max_ticks: u8,
    /// Access requests each worker's callers make.
    pub requests: u8,
    /// Reports of the API's 401 for the token a worker served last
    /// (`Input::Rejected`) each worker's callers may make.
    pub rejects: u8,
    /// Strategy under test.
    pub strategy: Strategy,
}

impl ModelConfig {
    /// The default configuration of a class: every fault kind, one fault, two time
    /// jumps, one request per worker.
    pub fn new(provider: impl Into<ModelProvider>, workers: usize) -> Self {
        ModelConfig {
            workers,
            provider: provider.into(),
            faults: FaultKind::ALL.into_iter().collect(),
            max_faults: 1,
            max_ticks: 2,
            requests: 1,
            rejects: 0,
            strategy: Strategy::Tokenfence,
        }
    }

    /// Whether `fault` may be injected.
    pub fn allows(&self, fault: FaultKind) -> bool {
        self.faults.contains(&fault)
    }

    /// A one-line description.
    pub fn describe(&self) -> String {
        let faults: Vec<_> = self.faults.iter().map(|f| f.name()).collect();
        format!(
            "{} workers, provider {}, strategy {}, faults [{}] (at most {}), {} time jumps, {} request(s){} per worker",
            self.workers,
            self.provider.name(),
            self.strategy.name(),
            if faults.is_empty() { "none".into() } else { faults.join(",") },
            self.max_faults,
            self.max_ticks,
            self.requests,
            if self.rejects > 0 {
                format!(" and {} 401 report(s)", self.rejects)
            } else {
                String::new()
            }
        )
    }
}
