//! The simulated world of one strategy on one seed: processes and workers running
//! the real machines, the store, one provider model per connection, the network,
//! the virtual clock and the event queue ordered by (time, sequence).

use super::ledger::Ledger;
use super::options::{log_uniform, unit, Derived, Fault, SimOptions, STREAM_RUN};
use super::workload::{Arrival, Trigger, Usage, Workload};
use crate::provider::{GrantId, Provider, ProviderSpec};
use crate::store::MemoryStore;
use crate::strategy::Strategy;
use core::time::Duration;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;
use tokenfence_core::invariants::{SenderGhost, Unsettled};
use tokenfence_core::{
    days, hours, minutes, parse_token_reply, refresh_request, Config, Connection, ConnectionId,
    ConnectionRecord, Generation, HttpRequest, HttpResponse, Input, RequestId, Settings, Timestamp,
    TokenGrant, WorkerId,
};

/// The instant every run starts at (2026-01-01T00:00:00Z).
pub const START: Timestamp = Timestamp::from_secs(1_767_225_600);

/// How often each process scans the store for connections due for keep-alive or
/// with an abandoned lease.
pub const SCAN_EVERY: Duration = Duration::from_secs(600);

/// After the fault phase: settle this long, then ask every connection once.
pub const HEAL_SETTLE: Duration = Duration::from_secs(1_200);

/// The heal phase lasts this long.
pub const HEAL_LENGTH: Duration = Duration::from_secs(86_400);

/// A store command in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum StoreCmd {
    Load,
    Lease(Duration, tokenfence_core::LeaseRequestId),
    Cas {
        expected: Option<Generation>,
        record: Box<ConnectionRecord>,
        release: Option<tokenfence_core::LeaseRelease>,
    },
}

/// What happens at an instant.
#[derive(Debug)]
pub(super) enum Ev {
    /// The next workload arrival of a connection.
    Arrival(usize),
    /// A caller asks worker `w` for a token of connection `c`.
    Access {
        w: usize,
        c: usize,
        trigger: Trigger,
    },
    /// The store carries out a command of slot `(w, c)`.
    Store {
        w: usize,
        c: usize,
        op: u64,
        cmd: StoreCmd,
    },
    /// A reply reaches worker `w`; `refresh` is the refresh token it carries and
    /// whether the provider minted it.
    Reply {
        w: usize,
        c: usize,
        op: u64,
        inc: u32,
        reply: Box<HttpResponse>,
        refresh: Option<(String, bool)>,
    },
    /// A request reaches the provider.
    Arrive {
        w: usize,
        c: usize,
        op: u64,
        inc: u32,
        request: Box<HttpRequest>,
        deadline: Timestamp,
    },
    /// An input for slot `(w, c)` arrives (a reply, a store answer after a pause).
    Feed {
        w: usize,
        c: usize,
        op: Option<u64>,
        inc: u32,
        input: Box<Input>,
    },
    /// The request deadline of an exchange passes.
    Deadline {
        w: usize,
        c: usize,
        op: u64,
        inc: u32,
    },
    /// A machine's timer.
    Timer { w: usize, c: usize, inc: u32 },
    /// A process's keep-alive scanner.
    Scan(usize),
    /// A process crashes.
    Crash(usize),
    /// A crashed process starts again.
    Restart(usize),
    /// A worker pauses.
    Pause(usize),
    /// The store becomes unavailable.
    Outage,
    /// The user disconnects the app at the provider.
    Revoke(usize),
    /// The user authorizes the connection (new or again).
    Authorize(usize),
    /// The deadline by which `ReconnectSoon` must have been emitted.
    WarnCheck { c: usize, grant: GrantId },
    /// Faults stop; every connection is asked for a token a little later.
    Heal,
}

/// Events ordered by (time, sequence). A binary heap holds the keys of the events
/// due before `horizon`; later ones wait in hourly buckets and enter the heap when
/// the clock reaches their hour (a fleet keeps hundreds of thousands of timers
/// pending, mostly days away; sifting them all on every pop was a tenth of a run).
/// The events themselves wait in a slab, so only 24-byte keys move.
#[derive(Default)]
pub(super) struct EventQueue {
    heap: BinaryHeap<Reverse<Key>>,
    later: BTreeMap<u64, Vec<Key>>,
    horizon: Timestamp,
    slab: Vec<Option<Ev>>,
    free: Vec<u32>,
    seq: u64,
}

/// (time, sequence, slab index).
type Key = (Timestamp, u64, u32);

const BUCKET_MS: u64 = 3_600_000;

impl EventQueue {
    fn push(&mut self, at: Timestamp, ev: Ev) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(ev);
                i
            }
            None => {
                self.slab.push(Some(ev));
                u32::try_from(self.slab.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let key = (at, self.seq, slot);
        if at < self.horizon {
            self.heap.push(Reverse(key));
        } else {
            let bucket = at.as_millis() / BUCKET_MS;
            self.later.entry(bucket).or_default().push(key);
        }
    }

    fn pop(&mut self) -> Option<(Timestamp, Ev)> {
        while self.heap.is_empty() {
            let (bucket, keys) = self.later.pop_first()?;
            self.horizon = Timestamp::from_millis((bucket + 1).saturating_mul(BUCKET_MS));
            self.heap.extend(keys.into_iter().map(Reverse));
        }
        let Reverse((at, _, slot)) = self.heap.pop()?;
        self.free.push(slot);
        let ev = self.slab.get_mut(slot as usize)?.take()?;
        Some((at, ev))
    }
}

/// A caller waiting for a token.
#[derive(Clone, Copy, Debug)]
pub(super) struct Caller {
    pub id: RequestId,
    pub asked_at: Timestamp,
    pub trigger: Trigger,
}

/// What a slot has outstanding.
#[derive(Clone, Debug)]
pub(super) enum OpKind {
    Store,
    Exchange {
        sent_at: Timestamp,
        /// The provider processed it and the reply will never come.
        lost: bool,
        /// A refresh (not a revocation).
        refresh: bool,
        /// It knowingly presents a token that may have been rotated.
        in_doubt: bool,
        /// The refresh token the provider minted for it, while the reply is on
        /// its way (lost if the worker gives up first).
        minted: Option<String>,
        /// The request reached the provider (or was dropped there).
        arrived: bool,
        /// The reply is on its way cut short: the worker will not learn the outcome.
        truncated: bool,
    },
}

/// Ghost bookkeeping of one slot (the machine never sees it).
#[derive(Clone, Debug, Default)]
pub(super) struct SlotGhost {
    /// Newest generation handed to this machine (S5).
    pub newest: Option<Generation>,
    /// A successful reply not yet committed: base record, grant, sent at (S6).
    pub check: Option<(Box<ConnectionRecord>, TokenGrant, Timestamp)>,
    /// The last lease grant replaced another owner's unreleased lease at the same
    /// generation: the next request knowingly presents a token that may be rotated.
    pub took_over: bool,
    /// When the lease was last granted (true time).
    pub lease_at: Timestamp,
    /// B3: the re-read after `invalid_grant` is answered with this record.
    pub reread_with: Option<Box<ConnectionRecord>>,
    /// B3: the next re-auth is written as a plain status update.
    pub naive_reauth: bool,
    /// The `acquired_at` of the lease the store last granted this machine.
    pub lease_acquired: Timestamp,
    /// The refresh this machine sent, until what it learnt is settled (S4).
    pub sender: SenderGhost,
}

/// One worker's machine for one connection, and what the driver keeps beside it.
pub(super) struct Slot {
    pub conn: Connection,
    pub op: Option<(u64, OpKind)>,
    pub timer: Option<Timestamp>,
    /// When the one queued wake-up for `timer` fires (true time).
    pub armed: Option<Timestamp>,
    pub callers: Vec<Caller>,
    pub next_request: u64,
    pub ghost: SlotGhost,
}

impl Slot {
    /// A request out or a reply not yet committed.
    pub fn busy(&self) -> bool {
        matches!(self.op, Some((_, OpKind::Exchange { .. }))) || self.conn.uncommitted().is_some()
    }
}

/// A worker: one task of a process, one machine per connection it touched.
pub(super) struct Worker {
    pub process: usize,
    pub slots: Vec<Option<Box<Slot>>>,
    pub paused_until: Timestamp,
}

/// A process: workers sharing a clock (with skew) and a fate (crashes).
pub(super) struct Process {
    pub skew_ms: i64,
    pub incarnation: u32,
    pub down: bool,
    pub workers: Vec<usize>,
    /// When this incarnation last scanned the store (its clock).
    pub last_scan: Option<Timestamp>,
    /// The machine configuration of each worker of the current incarnation.
    /// Per worker of the process, one configuration per provider of the fleet.
    pub configs: Vec<Vec<Arc<Config>>>,
}

/// Per-connection ghost state and bookkeeping.
pub(super) struct Conn {
    pub id: ConnectionId,
    /// Which provider of the fleet (an index into [`World::specs`]).
    pub kind: usize,
    pub provider: Provider,
    /// The newest grant (authorization) of the connection.
    pub grant: Option<GrantId>,
    pub workload: Workload,
    /// Index key in the due-for-work index.
    pub due: Option<Timestamp>,
    /// Index key in the notice index.
    pub notice: Option<Timestamp>,
    /// Workers whose machine for this connection may have a request out or a reply
    /// not yet committed (a superset, pruned by the checks): S2 and S8 look at these
    /// slots, not at every worker's.
    pub busy: Vec<u16>,
    /// Last takeover of an unreleased lease (true time): S8 relaxes after it.
    pub last_takeover: Option<Timestamp>,
    /// Since when the stored record says the grant is dead (true time).
    pub dead_since: Option<Timestamp>,
    /// Requests of crashed incarnations still on their way to the provider (sent at).
    pub orphans: Vec<Timestamp>,
    /// The next workload arrival, drawn but not yet happened.
    pub pending_arrival: Option<(Timestamp, Arrival)>,
    /// Grants whose family revocation (S3) was counted.
    pub replay_counted: Vec<GrantId>,
    /// Refresh requests really sent whose outcome never reached the store (reply
    /// unseen, or the sender crashed), presenting the stored token (S4's ghost).
    pub unsettled: Vec<Unsettled>,
    /// Leases taken over from another worker with nothing committed since their
    /// grant, as the requests they may stand for (S4 only).
    pub taken_over: Vec<Unsettled>,
    /// S2 is failing now (a loss episode is counted once).
    pub losing: bool,
    /// S4 is failing now.
    pub false_flag: bool,
    /// The connection was ever lost by our fault.
    pub ever_lost: bool,
    /// First `ReconnectSoon` per deadline: (deadline, true time emitted).
    pub warned: Vec<(Timestamp, Timestamp)>,
    /// Degraded when the heal phase began.
    pub degraded_at_heal: bool,
    /// `Recovered` emitted during the heal phase.
    pub recovered_in_heal: bool,
    /// The idle deadline the connection had at the start (idle connections).
    pub initial_idle_deadline: Option<Timestamp>,
}

/// The world.
pub(super) struct World {
    pub opts: Arc<SimOptions>,
    pub derived: Arc<Derived>,
    /// The providers of the fleet ([`Conn::kind`] indexes them).
    pub specs: Vec<Arc<ProviderSpec>>,
    pub settings: Settings,
    pub strategy: Strategy,
    pub now: Timestamp,
    pub end: Timestamp,
    pub finish: Timestamp,
    pub healing: bool,
    queue: EventQueue,
    pub op_seq: u64,
    pub rng: ChaCha8Rng,
    pub store: MemoryStore,
    pub due: BTreeSet<(Timestamp, usize)>,
    /// Live connections by the instant their `ReconnectSoon` notice falls due.
    pub notices: BTreeSet<(Timestamp, usize)>,
    pub conns: Vec<Conn>,
    pub procs: Vec<Process>,
    pub workers: Vec<Worker>,
    pub outage_until: Timestamp,
    pub max_skew_ms: i64,
    pub ledger: Ledger,
    /// The connection whose every step is written to `trace_lines`.
    pub traced: Option<usize>,
    pub trace_lines: Vec<String>,
}

/// Share of the starting fleet that is authorized anew during a year.
const NEW_CONNECTIONS_PER_YEAR: f64 = 0.1;
/// Chance that a user reconnects a connection flagged for re-auth.
const RECONNECT_CHANCE: f64 = 0.5;

impl World {
    /// The provider connection `c` talks to.
    pub fn spec(&self, c: usize) -> Arc<ProviderSpec> {
        self.specs[self.conns[c].kind].clone()
    }

    /// Builds the world of `strategy` for `opts` and seeds the first events.
    pub fn new(
        opts: Arc<SimOptions>,
        derived: Arc<Derived>,
        strategy: Strategy,
        traced: Option<usize>,
    ) -> Self {
        let specs = opts
            .fleet
            .iter()
            .map(|f| Arc::new(f.spec(opts.hard_lifetime)))
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        rng.set_stream(STREAM_RUN);
        let end = START.saturating_add(days(opts.days));
        let finish = end.saturating_add(HEAL_SETTLE).saturating_add(HEAL_LENGTH);
        let max_skew_ms = derived.rate(Fault::ClockSkew) as i64;
        let mut procs: Vec<Process> = (0..opts.processes)
            .map(|_| Process {
                skew_ms: 0,
                incarnation: 0,
                down: false,
                workers: Vec::new(),
                last_scan: None,
                configs: Vec::new(),
            })
            .collect();
        for p in &mut procs {
            if max_skew_ms > 0 {
                p.skew_ms = (rng.next_u64() % (2 * max_skew_ms as u64 + 1)) as i64 - max_skew_ms;
            }
        }
        let workers = (0..opts.workers)
            .map(|w| {
                let process = w % opts.processes;
                procs[process].workers.push(w);
                Worker {
                    process,
                    slots: Vec::new(),
                    paused_until: Timestamp::EPOCH,
                }
            })
            .collect();
        let mut world = World {
            settings: Settings::default(),
            opts,
            derived,
            specs,
            strategy,
            now: START,
            end,
            finish,
            healing: false,
            queue: EventQueue::default(),
            op_seq: 0,
            rng,
            store: MemoryStore::new(),
            due: BTreeSet::new(),
            notices: BTreeSet::new(),
            conns: Vec::new(),
            procs,
            workers,
            outage_until: Timestamp::EPOCH,
            max_skew_ms,
            ledger: Ledger::new(strategy),
            traced,
            trace_lines: Vec::new(),
        };
        for p in 0..world.procs.len() {
            world.configure(p);
            let offset = Duration::from_millis(world.rng.next_u64() % 600_000);
            world.push(START.saturating_add(offset), Ev::Scan(p));
        }
        let initial = world.opts.connections;
        for c in 0..initial {
            world.add_connection();
            world.bootstrap(c);
        }
        let extra =
            (initial as f64 * NEW_CONNECTIONS_PER_YEAR * world.opts.days as f64 / 365.0) as usize;
        for _ in 0..extra {
            let c = world.add_connection();
            let at = world.random_time(START, end);
            world.push(at, Ev::Authorize(c));
        }
        world.schedule_faults();
        world.push(end, Ev::Heal);
        world
    }

    /// The machine configurations of process `p`'s current incarnation: new worker
    /// ids for every incarnation (a restarted process is a new lease owner).
    fn configure(&mut self, p: usize) {
        let inc = self.procs[p].incarnation;
        let configs = self.procs[p]
            .workers
            .iter()
            .map(|w| {
                self.specs
                    .iter()
                    .map(|spec| {
                        Arc::new(Config {
                            profile: spec.profile.clone(),
                            client: spec.clients[0].credentials(),
                            worker: WorkerId(format!("p{}w{}#{}", p + 1, w + 1, inc)),
                            settings: self.settings.clone(),
                        })
                    })
                    .collect()
            })
            .collect();
        self.procs[p].configs = configs;
    }

    fn add_connection(&mut self) -> usize {
        let c = self.conns.len();
        let herd = self.derived.rate(Fault::Herd);
        let kind = c % self.specs.len();
        self.conns.push(Conn {
            id: ConnectionId(format!("realm-{:06}", c + 1)),
            kind,
            provider: Provider::new(self.specs[kind].clone()),
            grant: None,
            workload: Workload::new(self.opts.seed, c, herd, START),
            due: None,
            notice: None,
            busy: Vec::new(),
            last_takeover: None,
            dead_since: None,
            orphans: Vec::new(),
            pending_arrival: None,
            replay_counted: Vec::new(),
            unsettled: Vec::new(),
            taken_over: Vec::new(),
            losing: false,
            false_flag: false,
            ever_lost: false,
            warned: Vec::new(),
            degraded_at_heal: false,
            recovered_in_heal: false,
            initial_idle_deadline: None,
        });
        c
    }

    /// A connection that was authorized before the run: its age and last refresh
    /// come from its workload stream, its record is in the store at the start.
    fn bootstrap(&mut self, c: usize) {
        let spec = self.spec(c);
        let profile = &spec.profile;
        let (age, last) = self.conns[c]
            .workload
            .history(profile.hard_lifetime, profile.idle_window);
        let authorized_at = START.saturating_sub(age);
        let refreshed_at = START.saturating_sub(last);
        let client = spec.clients[0].clone();
        let identity = self.procs[0].configs[0][self.conns[c].kind].identity();
        let conn = &mut self.conns[c];
        let (grant, reply) = conn.provider.authorize(&client.client_id, authorized_at);
        conn.grant = Some(grant);
        let Ok(tokens) = parse_token_reply(profile, &reply) else {
            return;
        };
        let Some(mut record) = ConnectionRecord::from_authorization(
            conn.id.clone(),
            identity,
            Some(format!("{}", 9_130_000_000u64 + c as u64)),
            tokens,
            profile,
            authorized_at,
        ) else {
            return;
        };
        // Its history: refreshed often enough to stay alive, last at `refreshed_at`.
        let step = profile.idle_window.map_or(days(365), |d| d.mul_f64(0.8));
        let mut at = authorized_at;
        while at < refreshed_at {
            at = at.saturating_add(step).min(refreshed_at);
            let request = refresh_request(
                profile,
                &client.credentials(),
                &record.refresh,
                at.saturating_add(minutes(1)),
            );
            let (reply, _) = conn.provider.handle(&request, at);
            if let Ok(tokens) = parse_token_reply(profile, &reply) {
                record = record.with_grant(&tokens, profile, at);
            }
        }
        if conn.workload.usage == Usage::Idle {
            conn.initial_idle_deadline = record.idle_deadline;
        }
        let id = conn.id.clone();
        let _ = self.store.compare_and_swap(&id, None, record);
        self.reindex(c);
        self.after_authorization(c, grant);
        self.schedule_arrival(c);
    }

    /// Schedules the L4 check of a new grant whose hard deadline falls in the run.
    pub(super) fn after_authorization(&mut self, c: usize, grant: GrantId) {
        let deadline = self.conns[c]
            .provider
            .grant(grant)
            .and_then(|g| g.hard_deadline);
        let Some(deadline) = deadline else { return };
        let notice = self.settings.reconnect_notice;
        let warn_by = deadline.saturating_sub(notice);
        if warn_by > self.now && warn_by < self.end {
            let at = warn_by.saturating_add(self.warn_slack());
            self.push(at, Ev::WarnCheck { c, grant });
        }
    }

    /// How late `ReconnectSoon` may be: clocks may disagree, and a process without
    /// a machine for the connection learns of the notice at its next store scan.
    pub(super) fn warn_slack(&self) -> Duration {
        Duration::from_millis(2 * self.max_skew_ms as u64 + 2_000) + SCAN_EVERY
    }

    pub(super) fn schedule_arrival(&mut self, c: usize) {
        let now = self.now;
        let end = self.end;
        if let Some((at, _)) = self.peek_arrival(c, now, end) {
            self.push(at, Ev::Arrival(c));
        }
    }

    fn peek_arrival(
        &mut self,
        c: usize,
        now: Timestamp,
        end: Timestamp,
    ) -> Option<(Timestamp, Arrival)> {
        let next = self.conns[c].workload.next(now, end);
        self.conns[c].pending_arrival = next;
        next
    }

    /// Schedules the faults that strike at random instants.
    fn schedule_faults(&mut self) {
        let days_f = self.opts.days as f64;
        let crash = self.derived.rate(Fault::Crash);
        for p in 0..self.procs.len() {
            for at in self.poisson(crash * days_f) {
                self.push(at, Ev::Crash(p));
            }
        }
        let pause = self.derived.rate(Fault::Pause);
        for w in 0..self.workers.len() {
            for at in self.poisson(pause * days_f) {
                self.push(at, Ev::Pause(w));
            }
        }
        let outage = self.derived.rate(Fault::StoreOutage);
        for at in self.poisson(outage * days_f) {
            self.push(at, Ev::Outage);
        }
        let revoke = self.derived.rate(Fault::Revoke);
        for c in 0..self.conns.len() {
            if unit(&mut self.rng) < revoke * days_f / 365.0 {
                let at = self.random_time(START, self.end);
                self.push(at, Ev::Revoke(c));
            }
        }
    }

    /// Instants of a Poisson process with `expected` events over the fault phase.
    fn poisson(&mut self, expected: f64) -> Vec<Timestamp> {
        if expected <= 0.0 {
            return Vec::new();
        }
        let span = self.end.saturating_since(START).as_secs_f64();
        let mut out = Vec::new();
        let mut t = 0.0;
        loop {
            t += -(1.0 - unit(&mut self.rng)).ln() / expected * span;
            if t >= span {
                return out;
            }
            out.push(START.saturating_add(Duration::from_secs_f64(t)));
        }
    }

    pub(super) fn random_time(&mut self, from: Timestamp, to: Timestamp) -> Timestamp {
        let span = to.saturating_since(from).as_millis() as u64;
        from.saturating_add(Duration::from_millis(self.rng.next_u64() % span.max(1)))
    }

    /// A draw in `[0, 1)` from the run's stream.
    pub(super) fn roll(&mut self) -> f64 {
        unit(&mut self.rng)
    }

    /// Whether `fault` strikes now (never during the heal phase).
    pub(super) fn strikes(&mut self, fault: Fault) -> bool {
        let p = self.derived.rate(fault);
        p > 0.0 && !self.healing && unit(&mut self.rng) < p
    }

    /// A duration drawn log-uniformly between `low` and `high`.
    pub(super) fn span(&mut self, low: Duration, high: Duration) -> Duration {
        let s = log_uniform(&mut self.rng, (low.as_secs_f64(), high.as_secs_f64()));
        Duration::from_millis((s * 1_000.0) as u64)
    }

    pub(super) fn push(&mut self, at: Timestamp, ev: Ev) {
        self.queue.push(at.max(self.now), ev);
    }

    /// Process `p`'s clock now.
    pub(super) fn local_now(&self, p: usize) -> Timestamp {
        skewed(self.now, self.procs[p].skew_ms)
    }

    /// The true instant at which process `p`'s clock shows `local`.
    pub(super) fn true_time(&self, p: usize, local: Timestamp) -> Timestamp {
        skewed(local, -self.procs[p].skew_ms)
    }

    /// Runs until the end of the heal phase.
    pub fn run(&mut self, mut progress: impl FnMut(Timestamp)) {
        let mut last_day = 0;
        while let Some((at, ev)) = self.queue.pop() {
            if at > self.finish {
                break;
            }
            self.now = at;
            self.ledger.events += 1;
            self.ledger.hash_event(at, &ev);
            let day = at.as_millis() / 86_400_000;
            if day != last_day {
                last_day = day;
                progress(at);
            }
            self.dispatch(ev);
        }
        self.now = self.finish;
        self.conclude();
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Arrival(c) => self.arrival(c),
            Ev::Access { w, c, trigger } => self.access(w, c, trigger),
            Ev::Store { w, c, op, cmd } => self.store_command(w, c, op, cmd),
            Ev::Arrive {
                w,
                c,
                op,
                inc,
                request,
                deadline,
            } => self.arrive(w, c, op, inc, *request, deadline),
            Ev::Feed {
                w,
                c,
                op,
                inc,
                input,
            } => self.deliver(w, c, op, inc, *input),
            Ev::Deadline { w, c, op, inc } => self.deadline(w, c, op, inc),
            Ev::Reply {
                w,
                c,
                op,
                inc,
                reply,
                refresh,
            } => self.reply(w, c, op, inc, *reply, refresh),
            Ev::Timer { w, c, inc } => self.timer(w, c, inc),
            Ev::Scan(p) => self.scan(p),
            Ev::Crash(p) => self.crash(p),
            Ev::Restart(p) => self.restart(p),
            Ev::Pause(w) => {
                let d = self.span(Duration::from_secs(45), minutes(10));
                let until = self.now.saturating_add(d);
                let worker = &mut self.workers[w];
                worker.paused_until = worker.paused_until.max(until);
                self.ledger.pauses += 1;
            }
            Ev::Outage => {
                let d = self.span(Duration::from_secs(5), minutes(30));
                self.outage_until = self.outage_until.max(self.now.saturating_add(d));
                self.ledger.outages += 1;
            }
            Ev::Revoke(c) => {
                if let Some(g) = self.conns[c].grant {
                    self.conns[c].provider.revoke_by_user(g);
                    self.ledger.user_revocations += 1;
                    self.note(c, || "the user disconnects the app at the provider".into());
                    self.check_connection(c);
                }
            }
            Ev::Authorize(c) => self.authorize(c),
            Ev::WarnCheck { c, grant } => self.warn_check(c, grant),
            Ev::Heal => self.heal(),
        }
    }

    fn arrival(&mut self, c: usize) {
        let Some((_, arrival)) = self.conns[c].pending_arrival.take() else {
            return;
        };
        match arrival {
            Arrival::Access { trigger, count } => {
                let mut first = self.pick_worker(c);
                for _ in 0..count {
                    self.access(first, c, trigger);
                    first = (first + 1 + (self.rng.next_u64() as usize % 3)) % self.workers.len();
                }
            }
            Arrival::Disconnect => {
                let w = self.pick_worker(c);
                self.user_input(w, c, Input::Disconnect);
            }
        }
        self.schedule_arrival(c);
    }

    /// A worker for a new piece of work on `c`: any worker of a live process.
    pub(super) fn pick_worker(&mut self, _c: usize) -> usize {
        let n = self.workers.len();
        let start = self.rng.next_u64() as usize % n;
        (0..n)
            .map(|i| (start + i) % n)
            .find(|w| !self.procs[self.workers[*w].process].down)
            .unwrap_or(start)
    }

    fn scan(&mut self, p: usize) {
        if self.now <= self.finish {
            self.push(self.now.saturating_add(SCAN_EVERY), Ev::Scan(p));
        }
        if self.procs[p].down {
            return;
        }
        let local = self.local_now(p);
        let mut due: Vec<usize> = self
            .due
            .range(..=(local, usize::MAX))
            .take(1_000)
            .map(|(_, c)| *c)
            .collect();
        // Connections whose ReconnectSoon notice fell due since the last scan (all
        // of them on an incarnation's first scan): no machine of this process may
        // hold them, and the notice must not wait for the next caller (L4).
        let since = self.procs[p].last_scan.map_or(Timestamp::EPOCH, |t| {
            t.saturating_add(Duration::from_millis(1))
        });
        self.procs[p].last_scan = Some(local);
        due.extend(
            self.notices
                .range((since, 0)..=(local, usize::MAX))
                .map(|(_, c)| *c),
        );
        due.sort_unstable();
        due.dedup();
        let workers = self.procs[p].workers.clone();
        for c in due {
            let w = workers[self.rng.next_u64() as usize % workers.len()];
            self.ledger.maintains += 1;
            self.user_input(w, c, Input::Maintain);
        }
    }

    /// The user (re)authorizes connection `c`: the provider issues a new grant and a
    /// worker stores it.
    fn authorize(&mut self, c: usize) {
        if self.healing {
            return;
        }
        let spec = self.spec(c);
        let client = spec.clients[0].client_id.clone();
        let now = self.now;
        let first = self.conns[c].grant.is_none();
        if !first {
            let live = self
                .store
                .row(&self.conns[c].id)
                .and_then(|r| r.record.as_ref())
                .is_some_and(|r| r.is_live());
            if live {
                return;
            }
        }
        let (grant, reply) = self.conns[c].provider.authorize(&client, now);
        self.conns[c].grant = Some(grant);
        let Ok(tokens) = parse_token_reply(&spec.profile, &reply) else {
            return;
        };
        self.ledger.authorizations += 1;
        self.note(c, || {
            format!("the user authorizes the app (grant {})", grant.0)
        });
        let w = self.pick_worker(c);
        let realm = Some(format!("{}", 9_130_000_000u64 + c as u64));
        self.user_input(
            w,
            c,
            Input::Authorized {
                grant: tokens,
                realm_id: realm,
            },
        );
        self.after_authorization(c, grant);
        if first {
            self.schedule_arrival(c);
        }
    }

    /// A user reconnects a connection flagged for re-auth, some days later.
    pub(super) fn maybe_reconnect(&mut self, c: usize) {
        if self.healing || self.roll() >= RECONNECT_CHANCE {
            return;
        }
        let d = self.span(hours(2), days(20));
        let at = self.now.saturating_add(d);
        if at < self.end {
            self.push(at, Ev::Authorize(c));
        }
    }

    fn crash(&mut self, p: usize) {
        if self.procs[p].down || self.healing {
            return;
        }
        self.ledger.crashes += 1;
        self.procs[p].down = true;
        let workers = self.procs[p].workers.clone();
        for w in workers {
            let slots = std::mem::take(&mut self.workers[w].slots);
            for (c, slot) in slots.into_iter().enumerate() {
                if let Some(slot) = slot {
                    self.lose_slot(c, *slot);
                }
            }
        }
        let d = self.span(Duration::from_secs(5), minutes(10));
        self.push(self.now.saturating_add(d), Ev::Restart(p));
    }

    fn restart(&mut self, p: usize) {
        if !self.procs[p].down {
            return;
        }
        self.procs[p].down = false;
        self.procs[p].incarnation += 1;
        self.procs[p].last_scan = None;
        self.configure(p);
    }

    /// Crashes process `p` right now (between a reply and its commit).
    pub(super) fn crash_now(&mut self, p: usize) {
        self.crash(p);
    }

    fn heal(&mut self) {
        self.healing = true;
        self.outage_until = self.now;
        for p in 0..self.procs.len() {
            self.procs[p].skew_ms = 0;
            if self.procs[p].down {
                self.restart(p);
            }
        }
        for w in &mut self.workers {
            w.paused_until = w.paused_until.min(self.now);
        }
        let ask_from = self.now.saturating_add(HEAL_SETTLE);
        for c in 0..self.conns.len() {
            let stored = self
                .store
                .row(&self.conns[c].id)
                .and_then(|r| r.record.as_ref());
            self.conns[c].degraded_at_heal = stored
                .is_some_and(|r| matches!(r.status, tokenfence_core::Status::Degraded { .. }));
            if self.conns[c].grant.is_some() {
                let at = self.random_time(ask_from, ask_from.saturating_add(hours(1)));
                let w = self.pick_worker(c);
                self.push(
                    at,
                    Ev::Access {
                        w,
                        c,
                        trigger: Trigger::Heal,
                    },
                );
            }
        }
    }
}

/// `t` moved by `ms` milliseconds (either way).
pub(super) fn skewed(t: Timestamp, ms: i64) -> Timestamp {
    if ms >= 0 {
        t.saturating_add(Duration::from_millis(ms as u64))
    } else {
        t.saturating_sub(Duration::from_millis(ms.unsigned_abs()))
    }
}
