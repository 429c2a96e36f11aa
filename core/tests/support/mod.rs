//! A discrete-event harness for driving real `Connection`s by hand: an in-memory
//! store with compare-and-swap and leases, several workers, and replies scripted by
//! the test (or by the small provider model in `provider.rs`).
#![allow(dead_code)]

pub mod provider;

use std::sync::Arc;
use std::time::Duration;
use tokenfence_core::lease::{self, LeaseSlot};
use tokenfence_core::*;

pub const T0: Timestamp = Timestamp::from_secs(1_800_000_000);
pub const CLIENT_SECRET: &str = "client-secret-do-not-log";

pub fn client(environment: Environment) -> ClientCredentials {
    ClientCredentials {
        client_id: match environment {
            Environment::Production => "prod-client".into(),
            Environment::Sandbox => "sandbox-client".into(),
        },
        client_secret: ClientSecret::new(CLIENT_SECRET),
        environment,
    }
}

pub fn config(profile: ProviderProfile, worker: &str) -> Arc<Config> {
    Arc::new(Config {
        profile,
        client: client(Environment::Production),
        worker: WorkerId(worker.into()),
        settings: Settings::default(),
    })
}

pub fn conn_id() -> ConnectionId {
    ConnectionId("realm-4620816365".into())
}

/// A stored record as an authorization would leave it, access token expired.
pub fn record(config: &Config, refresh: &str, now: Timestamp) -> ConnectionRecord {
    ConnectionRecord {
        generation: Generation(1),
        realm_id: Some("4620816365".into()),
        access: Some(AccessGrant {
            token: AccessToken::new("AT-expired"),
            expires_at: now,
        }),
        idle_deadline: config.profile.idle_window.map(|d| now.saturating_add(d)),
        hard_deadline: config.profile.hard_lifetime.map(|d| now.saturating_add(d)),
        ..ConnectionRecord::new(
            conn_id(),
            config.identity(),
            RefreshToken::new(refresh),
            now,
        )
    }
}

pub fn json_reply(status: u16, body: &str) -> HttpResponse {
    HttpResponse {
        status,
        headers: vec![("intuit_tid".into(), "1-abc".into())],
        body: body.as_bytes().to_vec(),
    }
}

/// An Intuit-style success body.
pub fn granted(access: &str, refresh: Option<&str>) -> HttpResponse {
    let refresh = refresh
        .map(|r| format!(r#""refresh_token":"{r}","x_refresh_token_expires_in":8726400,"#))
        .unwrap_or_default();
    json_reply(
        200,
        &format!(
            r#"{{"access_token":"{access}",{refresh}"token_type":"bearer","expires_in":3600}}"#
        ),
    )
}

pub fn invalid_grant() -> HttpResponse {
    json_reply(
        400,
        r#"{"error_description":"Incorrect or invalid refresh token","error":"invalid_grant"}"#,
    )
}

/// A deliberately broken store, to show that the S1 checks bite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// B1: every compare-and-swap lands, whatever generation is stored.
    WriteUnconditionally,
    /// A driver that "helps" by rewriting `expected` to the generation stored now,
    /// so the store's own equality check passes.
    RewriteExpected,
}

/// The store: one record, one lease row (with the row it displaced), optional
/// injected outages. The lease protocol is `tokenfence_core::lease`, as in every
/// store.
#[derive(Default)]
pub struct Store {
    pub record: Option<ConnectionRecord>,
    pub lease: Option<LeaseSlot>,
    /// Fail this many of the next store commands (not carried out).
    pub fail_next: u32,
    /// Carry out this many of the next lease requests or compare-and-swaps, then
    /// answer `StoreFailed` (the answer was lost: a lease granted, a commit landed,
    /// unbeknown). A lost `Load` answer would be no more than a failure.
    pub lose_next: u32,
    /// Lease grants whose answer was lost (owner, request), for the chain below.
    pub phantoms: Vec<(WorkerId, LeaseRequestId)>,
    /// A grant whose answer was lost displaced another such grant: two workers
    /// would have to vouch that neither sent; the record names one holder, so a
    /// lost rotation declared over such a chain is not undone (a documented
    /// limit, excused by the end check).
    pub phantom_chain: bool,
    pub commits: u32,
    pub conflicts: u32,
    /// Lease requests recognised as a retry of their own earlier grant.
    pub lease_retries: u32,
    /// Releases that put the displaced row back.
    pub restores: u32,
    /// A broken store (tests that the checks bite); `None` in every real test.
    pub mutation: Option<Mutation>,
    /// S1 violations seen at commits that landed (the `World` panics on the first
    /// unless the store is a mutant).
    pub violations: Vec<invariants::Violation>,
    /// The generation stored by the last commit that landed (S1: never decreases).
    pub last_generation: Option<Generation>,
}

impl Store {
    /// The lease, if one was granted and not released.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref().map(|l| &l.lease)
    }

    /// Carries out a store command; `None` for commands without an answer.
    pub fn apply(&mut self, now: Timestamp, output: &Output) -> Option<Input> {
        let is_store_cmd = matches!(
            output,
            Output::Load | Output::AcquireLease { .. } | Output::CompareAndSwap { .. }
        );
        if is_store_cmd && self.fail_next > 0 {
            self.fail_next -= 1;
            return Some(Input::StoreFailed);
        }
        let answer = match output {
            Output::Load => Some(Input::Loaded(self.record.clone().map(Box::new))),
            Output::AcquireLease {
                owner,
                ttl,
                request,
            } => Some(self.acquire_lease(owner, *request, *ttl, now)),
            Output::ReleaseLease(release) => {
                self.release_lease(release);
                None
            }
            Output::CompareAndSwap {
                expected,
                record,
                release,
            } => {
                let answer = self.compare_and_swap(*expected, record);
                // The release goes with the swap, atomically, only if it commits.
                if let (Input::Committed { .. }, Some(release)) = (&answer, release) {
                    self.release_lease(release);
                }
                Some(answer)
            }
            _ => None,
        };
        let losable = matches!(
            output,
            Output::AcquireLease { .. } | Output::CompareAndSwap { .. }
        );
        if losable && self.lose_next > 0 {
            self.lose_next -= 1;
            if let (Some(Input::LeaseGranted { .. }), Output::AcquireLease { owner, request, .. }) =
                (&answer, output)
            {
                let displaced = self
                    .lease
                    .as_ref()
                    .and_then(|s| s.displaced.as_ref())
                    .map(|d| (d.owner.clone(), d.request));
                self.phantom_chain |= displaced.is_some_and(|d| self.phantoms.contains(&d));
                self.phantoms.push((owner.clone(), *request));
            }
            return Some(Input::StoreFailed);
        }
        if let Output::AcquireLease { owner, request, .. } = output {
            // Granted with its answer delivered: no longer a phantom.
            self.phantoms.retain(|(o, r)| !(o == owner && r == request));
        }
        answer
    }

    /// `tokenfence_core::lease::acquire`, for this store's one row.
    fn acquire_lease(
        &mut self,
        owner: &WorkerId,
        request: LeaseRequestId,
        ttl: std::time::Duration,
        now: Timestamp,
    ) -> Input {
        let retry = self.lease.as_ref().is_some_and(|s| s.is(owner, request));
        let generation = self.record.as_ref().map(|r| r.generation);
        match lease::acquire(self.lease.as_ref(), owner, request, generation, now, ttl) {
            lease::Acquired::Held(holder) => Input::LeaseHeld { holder },
            lease::Acquired::Granted { slot, took_over } => {
                self.lease_retries += u32::from(retry);
                let lease = slot.lease.clone();
                self.lease = Some(slot);
                Input::LeaseGranted {
                    lease,
                    record: self.record.clone().map(Box::new),
                    took_over,
                }
            }
        }
    }

    /// `tokenfence_core::lease::release`: only by owner and request; with
    /// `restore`, the displaced row takes its place.
    fn release_lease(&mut self, release: &LeaseRelease) {
        let LeaseRelease {
            owner,
            request,
            restore,
        } = release;
        let displaced = self.lease.as_ref().is_some_and(|s| s.displaced.is_some());
        if let Some(left) = lease::release(self.lease.as_ref(), owner, *request, *restore) {
            self.restores += u32::from(*restore && displaced);
            self.lease = left;
        }
    }

    /// Compare-and-swap on generation. S1 is judged apart from the store's own
    /// equality check: at every commit that lands, the generation it was derived
    /// from (the machine's `expected`) must be the one stored at that moment, and
    /// the stored generation must not go down.
    fn compare_and_swap(
        &mut self,
        expected: Option<Generation>,
        record: &ConnectionRecord,
    ) -> Input {
        let stored = self.record.as_ref().map(|r| r.generation);
        let told = match self.mutation {
            Some(Mutation::RewriteExpected) => stored,
            _ => expected,
        };
        let lands = self.mutation == Some(Mutation::WriteUnconditionally) || stored == told;
        if !lands {
            self.conflicts += 1;
            return Input::Conflict {
                current: self.record.clone().map(Box::new),
            };
        }
        if let Err(v) = invariants::commit_on_current(expected, stored) {
            self.violations.push(v);
        }
        // As every store does: the generation follows from the one it was told.
        let generation = told.map_or(Generation(0), Generation::next);
        if let Some(last) = self.last_generation.or(stored) {
            if let Err(v) = invariants::generation_monotonic(last, generation) {
                self.violations.push(v);
            }
        }
        self.last_generation = Some(generation);
        self.commits += 1;
        self.record = Some(ConnectionRecord {
            generation,
            ..record.clone()
        });
        Input::Committed { generation }
    }
}

/// Whether a provider reply left its receiver knowing the outcome (S4's ghost): a
/// reply the machine reads as "in doubt" (a 2xx it cannot use, a 504) is unseen.
pub fn reply_seen(profile: &ProviderProfile, reply: &HttpResponse) -> bool {
    !matches!(
        parse_token_reply(profile, reply),
        Err(ReplyError::MalformedSuccess { .. } | ReplyError::ServerError { status: 504, .. })
    )
}

/// One worker: a machine plus what it delivered, emitted and sent.
pub struct Worker {
    pub conn: Connection,
    pub delivered: Vec<(RequestId, Result<AccessToken, AccessError>)>,
    pub events: Vec<Event>,
    pub sent: Vec<HttpRequest>,
    /// A request sent and not yet answered.
    pub outstanding: Option<HttpRequest>,
    /// Newest generation the store has shown this worker.
    pub newest: Generation,
    /// When the store granted this worker the lease it holds (as it was told).
    pub lease_at: Option<Timestamp>,
    /// S4's ghost: this worker's refresh request not yet settled.
    pub ghost: invariants::SenderGhost,
    /// The lease requests this incarnation made (a restarted worker keeps its id,
    /// not its requests).
    pub requests: Vec<LeaseRequestId>,
    /// Access tokens this incarnation's callers reported refused by the API.
    pub rejected: Vec<AccessToken>,
    /// A lease request of this worker failed since its last refresh committed
    /// (R2: for all the machine knows the store granted it, and it refreshes to
    /// resolve that until a refresh of its own commits; find 18).
    pub lost_grant: bool,
    /// A scheduler or an operator asked for a refresh (`Maintain`, `RefreshNow`)
    /// since this worker's last refresh committed: R2 does not apply to its sends.
    pub asked: bool,
}

impl Worker {
    fn new(conn: Connection) -> Worker {
        Worker {
            conn,
            delivered: vec![],
            events: vec![],
            sent: vec![],
            outstanding: None,
            newest: Generation(0),
            lease_at: None,
            ghost: invariants::SenderGhost::default(),
            requests: vec![],
            rejected: vec![],
            lost_grant: false,
            asked: false,
        }
    }

    /// S5 for a token just delivered: find its expiry and generation in the machine.
    fn check_serve(&self, now: Timestamp, token: &AccessToken, lifetime: Option<Duration>) {
        let (generation, expires_at) = self
            .conn
            .access_source(token)
            .expect("a served token comes from the machine's record");
        // The margin, never more than half the lifetime the harness granted.
        let margin = self.conn.config().settings.access_margin;
        let margin = lifetime.map_or(margin, |l| margin.min(l / 2));
        invariants::fresh_serve(generation, expires_at, now, margin, self.newest).expect("S5");
    }
}

pub struct World {
    pub now: Timestamp,
    pub store: Store,
    pub workers: Vec<Worker>,
    /// S4's ghost at connection level: refresh requests really sent whose outcome
    /// will never reach the store (an unseen reply, a crashed sender).
    pub ghosts: Vec<invariants::Unsettled>,
    /// Leases of another worker taken over with nothing committed since their
    /// grant, as the requests they may stand for: whoever takes one over cannot
    /// know whether a request was sent under it (S4 only; the rule of the model
    /// checker and the simulator). A grant to an earlier incarnation of the same
    /// worker id counts as another worker's (a restarted worker cannot know what
    /// its previous incarnation sent: find 1); this incarnation's own never does.
    pub taken_over: Vec<invariants::Unsettled>,
    /// The `expires_in` of every access token replied, as the harness read it.
    pub lifetimes: std::collections::HashMap<String, Duration>,
    /// Every access token any caller reported refused by the API (R2).
    pub refused: Vec<AccessToken>,
    /// Workers' requests may outlive their leases (a paused worker): S8 and R2
    /// then no longer judge their sends.
    pub leases_broken: bool,
    next_request: u64,
    /// The entropy of the last machine made: every incarnation gets a new one.
    entropy: u64,
}

impl World {
    pub fn new(
        profile: ProviderProfile,
        workers: usize,
        stored: impl FnOnce(&Config) -> ConnectionRecord,
    ) -> World {
        let configs: Vec<_> = (0..workers)
            .map(|i| config(profile.clone(), &format!("w{i}")))
            .collect();
        Self::with_configs(configs, stored)
    }

    pub fn with_configs(
        configs: Vec<Arc<Config>>,
        stored: impl FnOnce(&Config) -> ConnectionRecord,
    ) -> World {
        let record = stored(&configs[0]);
        let mut world = World {
            now: T0,
            store: Store {
                last_generation: Some(record.generation),
                record: Some(record),
                ..Store::default()
            },
            workers: vec![],
            ghosts: vec![],
            taken_over: vec![],
            lifetimes: Default::default(),
            refused: vec![],
            leases_broken: false,
            next_request: 0,
            entropy: 0,
        };
        for c in configs {
            let conn = world.machine(c);
            world.workers.push(Worker::new(conn));
        }
        world
    }

    /// A new machine (a worker, or a restarted one) with its own entropy, as the
    /// run-loop contract asks: a restarted worker keeps its id, never its entropy.
    fn machine(&mut self, config: Arc<Config>) -> Connection {
        self.entropy += 1;
        Connection::new(conn_id(), config, self.entropy)
    }

    /// Intuit, one worker, a stored record with an expired access token.
    pub fn intuit(workers: usize) -> World {
        World::new(ProviderProfile::intuit(), workers, |c| {
            record(c, "RT-1", T0)
        })
    }

    pub fn advance(&mut self, by: std::time::Duration) {
        self.now = self.now.saturating_add(by);
    }

    /// Every refresh request sent whose outcome has not reached the store.
    pub fn unsettled(&self) -> impl Iterator<Item = &invariants::Unsettled> {
        self.ghosts
            .iter()
            .chain(self.workers.iter().filter_map(|w| w.ghost.unsettled()))
    }

    /// What may justify a lost rotation (S4): every unsettled request, and every
    /// lease of another worker taken over with nothing committed since its grant.
    pub fn may_have_rotated(&self) -> impl Iterator<Item = &invariants::Unsettled> {
        self.unsettled().chain(&self.taken_over)
    }

    fn keep(&mut self, u: Option<invariants::Unsettled>) {
        invariants::keep_unsettled(&mut self.ghosts, u);
    }

    /// Feeds `input` to worker `w` and runs the store until the machine waits.
    pub fn input(&mut self, w: usize, input: Input) -> Result<(), InputError> {
        let now = self.now;
        if matches!(input, Input::Maintain | Input::RefreshNow { .. }) {
            self.workers[w].asked = true;
        }
        self.workers[w].conn.handle_input(now, input)?;
        self.pump(w);
        Ok(())
    }

    fn pump(&mut self, w: usize) {
        let now = self.now;
        while let Some(out) = self.workers[w].conn.poll_output() {
            let lifetimes = &self.lifetimes;
            let worker = &mut self.workers[w];
            match out {
                Output::Deliver { request, result } => {
                    if let Ok(token) = &result {
                        worker.check_serve(now, token, lifetimes.get(token.expose()).copied());
                        // The harness's provider never issues a token twice.
                        invariants::refused_not_served(token, &worker.rejected, false).expect("R1");
                    }
                    worker.delivered.push((request, result));
                }
                Output::Event(e) => worker.events.push(e),
                Output::Send(req) => {
                    self.check_needed(w);
                    let worker = &mut self.workers[w];
                    invariants::right_credentials(
                        worker.conn.config(),
                        worker.conn.record().expect("record"),
                    )
                    .expect("S7");
                    assert!(worker.outstanding.is_none(), "one request at a time");
                    if let Some(base) = worker.conn.in_flight() {
                        // A refresh presenting `base.refresh` under the lease the
                        // store granted this worker, with the generation stored.
                        let lease_at = worker.lease_at.expect("a refresh without a lease");
                        let stored = self.store.record.as_ref().map(|r| r.generation);
                        let earlier = worker.ghost.sent(base.refresh.clone(), lease_at, stored);
                        self.keep(earlier);
                    }
                    let worker = &mut self.workers[w];
                    worker.sent.push(req.clone());
                    worker.outstanding = Some(req);
                }
                other => {
                    if let Output::AcquireLease { request, .. } = &other {
                        self.workers[w].requests.push(*request);
                    }
                    let before = self.store.record.as_ref().and_then(|r| r.access.clone());
                    let answer = self.store.apply(now, &other);
                    if matches!(other, Output::AcquireLease { .. })
                        && matches!(answer, Some(Input::StoreFailed))
                    {
                        self.workers[w].lost_grant = true;
                    }
                    if let Some(answer) = answer {
                        if self.store.mutation.is_none() {
                            if let Some(v) = self.store.violations.first() {
                                panic!("{v}");
                            }
                        }
                        let shown = answer.shown_generation().unwrap_or_default();
                        let worker = &mut self.workers[w];
                        worker.newest = worker.newest.max(shown);
                        let committed = matches!(answer, Input::Committed { .. });
                        let mut forced = None;
                        if let Input::LeaseGranted {
                            lease,
                            record,
                            took_over,
                        } = &answer
                        {
                            worker.lease_at = Some(lease.acquired_at);
                            let me = &worker.conn.config().worker;
                            // Our own incarnation's grant never counts; an earlier
                            // incarnation's under the same pinned id does.
                            forced = took_over
                                .as_ref()
                                .filter(|l| {
                                    !(l.owner == *me && worker.requests.contains(&l.request))
                                })
                                .and_then(|l| {
                                    let late = worker.conn.config().settings.in_doubt_safety;
                                    invariants::Unsettled::taken_over(l, record.as_deref(), late)
                                });
                        }
                        worker
                            .conn
                            .handle_input(now, answer)
                            .expect("store answers are expected");
                        if committed {
                            worker.ghost.settle();
                        }
                        let refreshed = matches!(
                            &other,
                            Output::CompareAndSwap { record, .. } if record.access != before
                        );
                        if committed && refreshed {
                            // The piece of work begun to resolve a failed lease
                            // request, or a scheduler's request, ends with its
                            // own refresh.
                            worker.lost_grant = false;
                            worker.asked = false;
                        }
                        if let Some(u) = forced.filter(|u| !self.taken_over.contains(u)) {
                            self.taken_over.push(u);
                        }
                    }
                }
            }
        }
        let worker = &mut self.workers[w];
        if !worker.conn.is_busy() {
            worker.ghost.settle();
        }
    }

    /// R2 at worker `w`'s send: the stored record needed a refresh, judged with
    /// the harness's own margin (from the lifetime it granted), the tokens callers
    /// reported and its ghost's doubts. Not judged: a paused worker's send (from
    /// a record older than the stored one), sends a scheduler or operator asked
    /// for, and the refresh that resolves a lease request whose answer was lost.
    fn check_needed(&self, w: usize) {
        let worker = &self.workers[w];
        let stored = self.store.record.as_ref().expect("stored record");
        let paused = worker
            .conn
            .in_flight()
            .is_some_and(|b| b.generation != stored.generation);
        if !(paused || self.leases_broken || worker.lost_grant || worker.asked) {
            let s = &worker.conn.config().settings;
            let margin = stored.access.as_ref().map_or(s.access_margin, |a| {
                self.lifetimes
                    .get(a.token.expose())
                    .map_or(s.access_margin, |l| s.access_margin.min(*l / 2))
            });
            let doubt = self.may_have_rotated().any(|u| u.token == stored.refresh);
            let refused = &self.refused;
            invariants::refresh_needed(stored, self.now, margin, s.keepalive_lead, doubt, |t| {
                refused.contains(t)
            })
            .expect("R2");
        }
    }

    /// A caller on worker `w` asks for a token.
    pub fn request(&mut self, w: usize) -> RequestId {
        self.next_request += 1;
        let id = RequestId(self.next_request);
        self.input(w, Input::AccessRequested(id))
            .expect("always accepted");
        id
    }

    /// A caller on worker `w` reports that the API refused `token` (a 401).
    pub fn reject(&mut self, w: usize, token: &str) -> RequestId {
        self.next_request += 1;
        let request = RequestId(self.next_request);
        let token = AccessToken::new(token);
        if !self.refused.contains(&token) {
            self.refused.push(token.clone());
        }
        self.workers[w].rejected.push(token.clone());
        self.input(w, Input::Rejected { request, token })
            .expect("always accepted");
        request
    }

    /// The provider answers worker `w`'s outstanding request. A reply the machine
    /// cannot read as a definite outcome (a 2xx it cannot use, a 504) counts as
    /// unseen for S4's ghost.
    pub fn reply(&mut self, w: usize, reply: HttpResponse) {
        if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&reply.body) {
            if let (Some(access), Some(secs)) =
                (body["access_token"].as_str(), body["expires_in"].as_u64())
            {
                self.lifetimes
                    .insert(access.to_string(), Duration::from_secs(secs));
            }
        }
        let seen = reply_seen(&self.workers[w].conn.config().profile, &reply);
        self.answer(w, Input::Replied(reply), seen);
    }

    /// Worker `w`'s outstanding request ends without a reply: `NotSent` (seen: it
    /// certainly was not processed) or `OutcomeUnknown` (unseen).
    pub fn lose(&mut self, w: usize, how: Input) {
        let seen = matches!(how, Input::NotSent);
        self.answer(w, how, seen);
    }

    fn answer(&mut self, w: usize, input: Input, seen: bool) {
        let worker = &mut self.workers[w];
        worker.outstanding.take().expect("a request is outstanding");
        if worker.conn.in_flight().is_some() {
            let unseen = worker.ghost.answered(seen);
            self.keep(unseen);
        }
        self.input(w, input).expect("expected");
    }

    /// Fires worker `w`'s timer if it is due.
    pub fn tick(&mut self, w: usize) {
        if let Some(t) = self.workers[w].conn.poll_timeout() {
            if t <= self.now {
                self.input(w, Input::Timeout).expect("timeout accepted");
            }
        }
    }

    /// Advances time to worker `w`'s next timer and fires it.
    pub fn wake(&mut self, w: usize) -> Timestamp {
        let t = self.workers[w].conn.poll_timeout().expect("a timer is set");
        self.now = self.now.max(t);
        self.input(w, Input::Timeout).expect("timeout accepted");
        t
    }

    pub fn stored(&self) -> &ConnectionRecord {
        self.store.record.as_ref().expect("stored record")
    }

    pub fn result(&self, w: usize, id: RequestId) -> Option<&Result<AccessToken, AccessError>> {
        self.workers[w]
            .delivered
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, res)| res)
    }

    pub fn token(&self, w: usize, id: RequestId) -> String {
        match self.result(w, id) {
            Some(Ok(t)) => t.expose().to_string(),
            other => panic!("expected a token for {id:?}, got {other:?}"),
        }
    }

    /// Worker `w` crashes and restarts under the same worker id (its unreleased
    /// lease stays in the store), with new entropy.
    pub fn crash(&mut self, w: usize) {
        let crashed = self.workers[w].ghost.crashed();
        self.keep(crashed);
        let config = Arc::new(self.workers[w].conn.config().clone());
        let conn = self.machine(config);
        self.workers[w] = Worker::new(conn);
    }
}
