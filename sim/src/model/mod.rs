//! A stateright model of several workers sharing one connection, each running the
//! real `tokenfence_core::Connection`, with the in-memory store, the provider model,
//! a discrete virtual clock, a network and fault injection.
//!
//! ## What one step is
//!
//! The driver contract (core crate docs) is followed literally: an input is fed,
//! then every output is drained at once. Outputs that need no answer (`Deliver`,
//! `Event`, `ReleaseLease`) take effect in the same step; the one store command or
//! request the machine waits for becomes *pending*, and carrying it out is a separate
//! action, so the checker interleaves every store command and every provider
//! exchange of every worker. A store command and the feeding of its answer are one
//! step, except under the `pause` fault, which splits them so time can pass between.
//!
//! ## Time
//!
//! The clock only jumps to instants at which something can change (a timer, a lease
//! expiry, a request deadline, an access token reaching its margin, a grace window
//! closing, an idle or hard deadline, the next periodic rotation): to any of them,
//! skipping the earlier ones (whose timers then fire late, as under a pause). Jumps
//! are budgeted (`max_ticks`), except the jump to the nearest instant when callers
//! are waiting and nothing but time can make progress: those are free, so every
//! request can resolve, and a horizon (`now <= T0 + 400 s`) keeps the state space
//! finite. Any worker may be slow: a jump can happen while any worker has a pending
//! step, which is how a lease expires under a paused holder.

mod config;
pub mod props;
mod state;
mod step;
pub mod trace;

pub use config::{FaultKind, ModelConfig, ModelProvider, Strategy};
pub use state::{
    describe_record, owner_name, owner_slot, representative, show_refresh, Breach, Flight,
    GrantCheck, Orphan, Seen, Shared, State, StoreCommand, Worker, WorkerGhost,
};

use crate::provider::{GrantId, Provider, ProviderSpec};
use crate::store::MemoryStore;
use core::time::Duration;
use stateright::{Model, Property};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use tokenfence_core::{
    parse_token_reply, Config, Connection, ConnectionId, ConnectionRecord, Input, RequestId,
    Settings, Timestamp, WorkerId,
};

/// The model's connection id.
pub fn connection_id() -> &'static ConnectionId {
    static ID: OnceLock<ConnectionId> = OnceLock::new();
    ID.get_or_init(|| ConnectionId("c1".into()))
}

/// The instant every behaviour starts at.
pub const T0: Timestamp = Timestamp::from_secs(1_000);

/// How far the clock may go: states past it are outside the model.
pub const HORIZON: Duration = Duration::from_secs(400);

/// Entropy every machine is created with (the same for all, so workers are
/// interchangeable under symmetry).
pub const ENTROPY: u64 = 7;

/// The machine settings used in the model: seconds instead of minutes and days, with
/// the relations of the defaults kept (send safety < lease < grace; margins well
/// inside the access lifetime).
pub fn model_settings() -> Settings {
    let s = Duration::from_secs;
    Settings {
        access_margin: s(5),
        min_refresh_interval: s(1),
        lease_ttl: s(10),
        lease_poll: s(2),
        send_safety: s(4),
        in_doubt_safety: s(2),
        keepalive_lead: s(20),
        reconnect_notice: s(60),
        backoff_base: s(1),
        backoff_max: s(4),
        config_backoff: s(30),
        max_attempts: 2,
        max_inline_delay: s(5),
        dead_recheck: s(1),
    }
}

/// An action of the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A caller asks worker `w` for an access token.
    Request(usize),
    /// Worker `w` carries out its pending store command and handles the answer.
    Store(usize),
    /// Worker `w`'s store command fails; `applied`: it took effect before failing.
    StoreFails {
        /// The worker.
        w: usize,
        /// Whether the command took effect.
        applied: bool,
    },
    /// Worker `w`'s store command is carried out, then the worker pauses.
    Pause(usize),
    /// Worker `w` handles the answer it paused on.
    Resume(usize),
    /// The provider processes worker `w`'s request and the reply arrives.
    Reply(usize),
    /// The provider answers 503 without processing.
    ServerError(usize),
    /// The provider answers 429.
    RateLimited(usize),
    /// The request never left worker `w`.
    ConnectError(usize),
    /// The provider processes the request and the reply is lost.
    LoseReply(usize),
    /// The provider processes the request and the reply arrives truncated.
    Garble(usize),
    /// Worker `w` stops waiting for its reply (lost, or past the deadline).
    GiveUp(usize),
    /// Worker `w`'s timer fires.
    Timer(usize),
    /// Worker `w` crashes and restarts empty.
    Crash(usize),
    /// The provider processes the `i`th orphaned request; nobody gets the reply.
    OrphanArrives(usize),
    /// The user disconnects the app at the provider.
    Revoke,
    /// A caller of worker `w` reports that the API answered 401 for the token
    /// the worker served last.
    Reject(usize),
    /// Time jumps to this instant, one at which something can change.
    Tick(Timestamp),
}

/// The model: configuration plus everything derived from it.
pub struct TokenfenceModel {
    /// What is explored.
    pub cfg: ModelConfig,
    spec: Arc<ProviderSpec>,
    configs: Vec<Arc<Config>>,
    grant: GrantId,
    init: State,
    latched: Mutex<BTreeSet<&'static str>>,
}

impl TokenfenceModel {
    /// Builds the model and its initial state: the connection was authorized 20 s
    /// before `T0`, so its access token expires exactly at `T0` and the first
    /// request must refresh.
    pub fn new(cfg: ModelConfig) -> Result<Self, String> {
        if cfg.workers == 0 || cfg.workers > 8 {
            return Err(format!("--workers must be 1..=8, not {}", cfg.workers));
        }
        let spec = Arc::new(cfg.provider.spec());
        let settings = model_settings();
        let config_for = |client: usize| {
            Arc::new(Config {
                profile: spec.profile.clone(),
                client: spec.clients[client].credentials(),
                worker: WorkerId("self".into()),
                settings: settings.clone(),
            })
        };
        let mut configs = vec![config_for(0); cfg.workers];
        if cfg.allows(FaultKind::WrongClient) {
            configs.push(config_for(1));
        }
        let mut provider = Provider::new(spec.clone());
        let authorized_at = T0.saturating_sub(spec.access_ttl);
        let (grant, reply) = provider.authorize(&spec.clients[0].client_id, authorized_at);
        let tokens = parse_token_reply(&spec.profile, &reply)
            .map_err(|e| format!("the provider model's authorization reply is unusable: {e}"))?;
        let record = ConnectionRecord::from_authorization(
            connection_id().clone(),
            configs[0].identity(),
            Some("4620816365".into()),
            tokens,
            &spec.profile,
            authorized_at,
        )
        .ok_or("the provider model's authorization carried no refresh token")?;
        let mut store = MemoryStore::new();
        let _ = store.compare_and_swap(connection_id(), None, record);
        let workers = configs
            .iter()
            .map(|c| {
                Shared::new(Worker {
                    conn: Connection::new(connection_id().clone(), c.clone(), ENTROPY),
                    incarnation: 0,
                    pending: None,
                    net: None,
                    paused: None,
                    requests_left: cfg.requests,
                    rejects_left: cfg.rejects,
                    ghost: WorkerGhost::default(),
                })
            })
            .collect();
        let init = State {
            now: T0,
            workers,
            store,
            provider,
            orphans: Vec::new(),
            faults_left: cfg.max_faults,
            ticks_left: cfg.max_ticks,
            seen: Seen::default(),
            refused: Vec::new(),
            breaches: BTreeMap::new(),
            unsettled: Vec::new(),
            taken_over: Vec::new(),
        };
        let mut model = TokenfenceModel {
            cfg,
            spec,
            configs,
            grant,
            init,
            latched: Mutex::new(BTreeSet::new()),
        };
        // Every worker starts with one caller waiting (arriving later is the same as
        // the worker being slow to load, which the interleavings already cover);
        // further requests are actions.
        let mut first = model.init.clone();
        for w in 0..first.workers.len() {
            if first.workers[w].requests_left > 0 {
                first.workers[w].requests_left -= 1;
                model.feed(
                    &mut first,
                    w,
                    Input::AccessRequested(RequestId(1)),
                    &mut step::Log::off(),
                );
            }
        }
        model.init = first;
        Ok(model)
    }

    /// The provider's spec.
    pub fn spec(&self) -> &ProviderSpec {
        &self.spec
    }

    /// The grant the model's connection belongs to.
    pub fn grant(&self) -> GrantId {
        self.grant
    }

    /// The initial state.
    pub fn initial(&self) -> &State {
        &self.init
    }

    /// Whether worker slot `w` is the misconfigured one.
    pub fn misconfigured(&self, w: usize) -> bool {
        w >= self.cfg.workers
    }

    /// `holds`, except that only the first violation of property `name` is reported
    /// (see `props::first!`).
    pub fn latch(&self, name: &'static str, holds: bool) -> bool {
        if holds {
            return true;
        }
        match self.latched.lock() {
            Ok(mut seen) => !seen.insert(name),
            Err(_) => false,
        }
    }

    fn fault_ok(&self, s: &State, kind: FaultKind) -> bool {
        s.faults_left > 0 && self.cfg.allows(kind)
    }

    /// The provider of a state (for properties and traces).
    pub fn provider<'a>(&self, s: &'a State) -> &'a Provider {
        &s.provider
    }
}

impl Model for TokenfenceModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![self.init.clone()]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (w, worker) in s.workers.iter().enumerate() {
            if worker.paused.is_some() {
                actions.push(Action::Resume(w));
            } else if worker.requests_left > 0 {
                actions.push(Action::Request(w));
            }
            if worker.paused.is_none() && worker.rejects_left > 0 && worker.ghost.served.is_some() {
                actions.push(Action::Reject(w));
            }
            if let Some(cmd) = &worker.pending {
                actions.push(Action::Store(w));
                if self.fault_ok(s, FaultKind::StoreFail) {
                    actions.push(Action::StoreFails { w, applied: false });
                    if !matches!(cmd, StoreCommand::Load) {
                        actions.push(Action::StoreFails { w, applied: true });
                    }
                }
                if self.fault_ok(s, FaultKind::Pause) {
                    actions.push(Action::Pause(w));
                }
            }
            if let Some(f) = &worker.net {
                let live = !f.lost && s.now <= f.request.send_deadline;
                if live {
                    actions.push(Action::Reply(w));
                    for (kind, action) in [
                        (FaultKind::ServerError, Action::ServerError(w)),
                        (FaultKind::RateLimited, Action::RateLimited(w)),
                        (FaultKind::ConnectError, Action::ConnectError(w)),
                        (FaultKind::LostReply, Action::LoseReply(w)),
                        (FaultKind::Garbled, Action::Garble(w)),
                    ] {
                        if self.fault_ok(s, kind) {
                            actions.push(action);
                        }
                    }
                } else {
                    actions.push(Action::GiveUp(w));
                }
            }
            if self.timer_due(s, w) {
                actions.push(Action::Timer(w));
            }
            if self.fault_ok(s, FaultKind::Crash) && worker.is_busy() {
                actions.push(Action::Crash(w));
            }
        }
        for (i, o) in s.orphans.iter().enumerate() {
            if s.now <= o.request.send_deadline {
                actions.push(Action::OrphanArrives(i));
            }
        }
        if self.fault_ok(s, FaultKind::Revoke)
            && s.provider
                .grant(self.grant)
                .is_some_and(|g| g.ended.is_none())
        {
            actions.push(Action::Revoke);
        }
        let targets = self.tick_targets(s);
        let free = self.free_tick(s);
        for (i, t) in targets.iter().enumerate() {
            if (i == 0 && free) || s.ticks_left > 0 {
                actions.push(Action::Tick(*t));
            }
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        self.apply(s, &action, &mut step::Log::off())
    }

    fn properties(&self) -> Vec<Property<Self>> {
        props::properties(self)
    }

    fn within_boundary(&self, s: &State) -> bool {
        s.now <= T0.saturating_add(HORIZON)
    }

    fn format_action(&self, action: &Action) -> String {
        trace::action_label(action)
    }

    fn format_step(&self, last: &State, action: Action) -> Option<String> {
        let mut log = step::Log::on();
        let next = self.apply(last, &action, &mut log)?;
        Some(format!(
            "{}\n\n{}",
            log.lines().join("\n"),
            trace::summary(self, &next)
        ))
    }
}
