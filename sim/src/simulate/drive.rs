//! The driver around the real machines: feeding inputs, draining outputs, carrying
//! out store commands as the strategy does, and the exchanges with the provider
//! over a faulty network. Every output is checked as it is carried out.

use super::options::{Fault, LeaseClock};
use super::workload::Trigger;
use super::world::{Caller, Ev, OpKind, Slot, SlotGhost, StoreCmd, World};
use crate::provider::{self, Outcome, RejectCause};
use crate::store::LeaseOutcome;
use crate::strategy::Written;
use core::time::Duration;
use rand_core::RngCore;
use tokenfence_core::invariants::{self, Unsettled};
use tokenfence_core::{
    parse_token_reply, AccessError, AccessToken, Connection, Event, HttpRequest, HttpResponse,
    Input, OAuthErrorCode, Output, ReauthReason, ReplyError, RequestId, Status,
};

impl World {
    fn inc(&self, w: usize) -> u32 {
        self.procs[self.workers[w].process].incarnation
    }

    fn alive(&self, w: usize, inc: u32) -> bool {
        let p = &self.procs[self.workers[w].process];
        !p.down && p.incarnation == inc
    }

    fn paused(&self, w: usize) -> bool {
        self.workers[w].paused_until > self.now
    }

    /// The slot of worker `w` for connection `c`, created on first touch.
    fn ensure_slot(&mut self, w: usize, c: usize) {
        let p = self.workers[w].process;
        let slots = &mut self.workers[w].slots;
        if slots.len() <= c {
            slots.resize_with(c + 1, || None);
        }
        if slots[c].is_some() {
            return;
        }
        let index = self.procs[p]
            .workers
            .iter()
            .position(|x| *x == w)
            .unwrap_or(0);
        let config = self.procs[p].configs[index][self.conns[c].kind].clone();
        let entropy = self.rng.next_u64();
        self.workers[w].slots[c] = Some(Box::new(Slot {
            conn: Connection::new(self.conns[c].id.clone(), config, entropy),
            op: None,
            timer: None,
            armed: None,
            callers: Vec::new(),
            next_request: 0,
            ghost: SlotGhost::default(),
        }));
    }

    fn slot(&mut self, w: usize, c: usize) -> Option<&mut Slot> {
        self.workers[w].slots.get_mut(c)?.as_deref_mut()
    }

    /// A caller on worker `w` asks for a token of `c`.
    pub(super) fn access(&mut self, w: usize, c: usize, trigger: Trigger) {
        if self.procs[self.workers[w].process].down {
            self.ledger.requests += 1;
            self.ledger.aborted_by_crash += 1;
            return;
        }
        if self.paused(w) {
            let at = self.workers[w].paused_until;
            self.push(at, Ev::Access { w, c, trigger });
            return;
        }
        self.ensure_slot(w, c);
        let now = self.now;
        let Some(slot) = self.slot(w, c) else { return };
        slot.next_request += 1;
        let id = RequestId(slot.next_request);
        slot.callers.push(Caller {
            id,
            asked_at: now,
            trigger,
        });
        self.ledger.requests += 1;
        self.note(c, || {
            format!("w{} ← AccessRequested(#{}, {trigger:?})", w + 1, id.0)
        });
        self.feed(w, c, Input::AccessRequested(id));
    }

    /// An input from a user or a scheduler (no command outstanding is answered).
    pub(super) fn user_input(&mut self, w: usize, c: usize, input: Input) {
        if self.procs[self.workers[w].process].down {
            return;
        }
        let inc = self.inc(w);
        if self.paused(w) {
            let at = self.workers[w].paused_until;
            let input = Box::new(input);
            self.push(
                at,
                Ev::Feed {
                    w,
                    c,
                    op: None,
                    inc,
                    input,
                },
            );
            return;
        }
        self.ensure_slot(w, c);
        self.note(c, || format!("w{} ← {}", w + 1, describe_input(&input)));
        self.feed(w, c, input);
    }

    /// A delayed input (store answer or reply after a pause, or a user input).
    pub(super) fn deliver(&mut self, w: usize, c: usize, op: Option<u64>, inc: u32, input: Input) {
        if !self.alive(w, inc) {
            return;
        }
        if self.paused(w) {
            let at = self.workers[w].paused_until;
            let input = Box::new(input);
            self.push(
                at,
                Ev::Feed {
                    w,
                    c,
                    op,
                    inc,
                    input,
                },
            );
            return;
        }
        self.ensure_slot(w, c);
        if let Some(op) = op {
            let Some(slot) = self.slot(w, c) else { return };
            if slot.op.as_ref().map(|(id, _)| *id) != Some(op) {
                return;
            }
            // S4's ghost: did the worker learn for certain what became of its request?
            let unseen = match slot.op.take() {
                Some((_, OpKind::Exchange { truncated, .. })) => {
                    let seen = match &input {
                        Input::NotSent => true,
                        Input::Replied(_) => !truncated,
                        _ => false,
                    };
                    slot.ghost.sender.answered(seen)
                }
                _ => None,
            };
            self.keep_unsettled(c, unseen);
        }
        self.note(c, || format!("w{} ← {}", w + 1, describe_input(&input)));
        self.feed(w, c, input);
    }

    /// Feeds one input and drains every output, then checks the connection.
    fn feed(&mut self, w: usize, c: usize, input: Input) {
        let p = self.workers[w].process;
        let local = self.local_now(p);
        let seen = input.shown_generation();
        let Some(slot) = self.slot(w, c) else { return };
        if let Some(g) = seen {
            slot.ghost.newest = Some(slot.ghost.newest.map_or(g, |n| n.max(g)));
        }
        if let Err(e) = slot.conn.handle_input(local, input) {
            let now = self.now;
            self.ledger.violation("contract", c, now, || {
                format!("w{} refused an input: {e}", w + 1)
            });
            return;
        }
        self.drain(w, c);
        if let Some(slot) = self.slot(w, c).filter(|s| !s.conn.is_busy()) {
            slot.ghost.sender.settle();
        }
        self.note_busy(w, c);
        self.check_connection(c);
        self.schedule_timer(w, c);
    }

    /// Adds worker `w` to connection `c`'s busy list if its slot is busy.
    fn note_busy(&mut self, w: usize, c: usize) {
        let busy = self.slot(w, c).is_some_and(|s| s.busy());
        let list = &mut self.conns[c].busy;
        let w = w as u16;
        if busy && !list.contains(&w) {
            list.push(w);
        }
    }

    /// Keeps one wake-up queued per slot: the earliest instant the machine's timer
    /// may be due. A later timer reuses it (the wake-up looks again); only an earlier
    /// one queues another. Superseded wake-ups are dropped when they fire.
    fn schedule_timer(&mut self, w: usize, c: usize) {
        let p = self.workers[w].process;
        let inc = self.inc(w);
        let local = self.local_now(p);
        let now = self.now;
        let Some(slot) = self.slot(w, c) else { return };
        if slot.op.is_some() {
            return;
        }
        slot.timer = slot.conn.poll_timeout();
        let Some(at) = slot.timer else { return };
        // A timeout already due that changed nothing: look again a second later.
        let at = if at <= local {
            local.saturating_add(Duration::from_secs(1))
        } else {
            at
        };
        let at = self.true_time(p, at).max(now);
        let Some(slot) = self.slot(w, c) else { return };
        if slot.armed.is_some_and(|a| a <= at) {
            return;
        }
        slot.armed = Some(at);
        self.push(at, Ev::Timer { w, c, inc });
    }

    pub(super) fn timer(&mut self, w: usize, c: usize, inc: u32) {
        if !self.alive(w, inc) {
            return;
        }
        let now = self.now;
        let paused = self.paused(w).then_some(self.workers[w].paused_until);
        let p = self.workers[w].process;
        let local = self.local_now(p);
        let Some(slot) = self.slot(w, c) else { return };
        if slot.armed != Some(now) {
            return;
        }
        slot.armed = None;
        if let Some(at) = paused {
            slot.armed = Some(at);
            self.push(at, Ev::Timer { w, c, inc });
            return;
        }
        if slot.op.is_some() {
            return;
        }
        if slot.timer.is_none_or(|t| t > local) {
            self.schedule_timer(w, c);
            return;
        }
        slot.timer = None;
        self.feed(w, c, Input::Timeout);
    }

    fn drain(&mut self, w: usize, c: usize) {
        loop {
            let Some(slot) = self.slot(w, c) else { return };
            let Some(output) = slot.conn.poll_output() else {
                return;
            };
            match output {
                Output::Load => self.issue(w, c, StoreCmd::Load),
                Output::AcquireLease { ttl, request, .. } => {
                    self.issue(w, c, StoreCmd::Lease(ttl, request))
                }
                Output::CompareAndSwap {
                    expected,
                    mut record,
                    release,
                } => {
                    let strategy = self.strategy;
                    let spec = self.spec(c);
                    let profile = &spec.profile;
                    let Some(slot) = self.slot(w, c) else { return };
                    let check = slot.ghost.check.take_if(|(_, grant, _)| {
                        record.access.as_ref().map(|a| &a.token) == Some(&grant.access)
                    });
                    let mut broken = None;
                    if let Some((base, grant, sent_at)) = check {
                        strategy.rewrite_commit(&mut record, &grant);
                        broken = invariants::keeps_what_was_not_replaced(
                            &base, &grant, &record, profile, sent_at,
                        )
                        .err();
                    }
                    if let Some(v) = broken {
                        let now = self.now;
                        self.ledger
                            .violation("S6", c, now, || format!("w{} commits a reply: {v}", w + 1));
                    }
                    let cas = StoreCmd::Cas {
                        expected,
                        record,
                        release,
                    };
                    self.issue(w, c, cas);
                }
                Output::ReleaseLease(release) => {
                    self.release(w, c, &release);
                    self.reindex(c);
                }
                Output::Send(request) => self.send(w, c, request),
                Output::Deliver { request, result } => self.delivered(w, c, request, result),
                Output::Event(e) => self.event(w, c, e),
            }
        }
    }

    fn issue(&mut self, w: usize, c: usize, cmd: StoreCmd) {
        self.op_seq += 1;
        let op = self.op_seq;
        let inc = self.inc(w);
        let latency = Duration::from_micros(500 + self.rng.next_u64() % 3_500);
        let now = self.now;
        if self.slot(w, c).is_some_and(|s| s.op.is_some()) {
            self.ledger.violation("contract", c, now, || {
                format!(
                    "w{} issued a store command while another was outstanding",
                    w + 1
                )
            });
        }
        let Some(slot) = self.slot(w, c) else { return };
        slot.op = Some((op, OpKind::Store));
        let _ = inc;
        let at = self.now.saturating_add(latency);
        self.push(at, Ev::Store { w, c, op, cmd });
    }

    /// The store carries out a command of slot `(w, c)` and answers it.
    pub(super) fn store_command(&mut self, w: usize, c: usize, op: u64, cmd: StoreCmd) {
        let inc = self.inc(w);
        let current = self
            .slot(w, c)
            .is_some_and(|s| s.op.as_ref().map(|(id, _)| *id) == Some(op));
        if !current || self.procs[self.workers[w].process].down {
            return;
        }
        let outage = self.now < self.outage_until;
        let rate = self.derived.rate(Fault::StoreOutage) * 0.002;
        let flaky = !self.healing && rate > 0.0 && self.roll() < rate;
        let applied = flaky && !matches!(cmd, StoreCmd::Load) && self.roll() < 0.5;
        if outage || (flaky && !applied) {
            self.ledger.store_failures += 1;
            self.note(c, || "the store fails (no effect)".into());
            return self.answer(w, c, op, inc, Input::StoreFailed);
        }
        let input = self.execute(w, c, cmd);
        if applied {
            self.ledger.store_failures += 1;
            self.note(c, || "the store fails after taking effect".into());
            return self.answer(w, c, op, inc, Input::StoreFailed);
        }
        self.answer(w, c, op, inc, input);
    }

    fn answer(&mut self, w: usize, c: usize, op: u64, inc: u32, input: Input) {
        self.deliver(w, c, Some(op), inc, input);
    }

    fn execute(&mut self, w: usize, c: usize, cmd: StoreCmd) -> Input {
        let id = self.conns[c].id.clone();
        let now = self.now;
        let strategy = self.strategy;
        self.ledger.store_commands[match cmd {
            StoreCmd::Load => 0,
            StoreCmd::Lease(..) => 1,
            StoreCmd::Cas { .. } => 2,
        }] += 1;
        let input = match cmd {
            StoreCmd::Load => {
                let naive = self.slot(w, c).and_then(|s| s.ghost.reread_with.take());
                match naive {
                    Some(base) => {
                        // B3 answers the re-read with the record the refresh was sent from.
                        if let Some(s) = self.slot(w, c) {
                            s.ghost.naive_reauth = true;
                        }
                        Input::Loaded(Some(base))
                    }
                    None => Input::Loaded(self.store.load(&id).map(Box::new)),
                }
            }
            StoreCmd::Lease(ttl, request) => {
                let Some(slot) = self.slot(w, c) else {
                    return Input::StoreFailed;
                };
                let me = slot.conn.config().worker.clone();
                let late = slot.conn.config().settings.in_doubt_safety;
                // Leases on the store's own clock (PostgreSQL's `now()`; SQLite
                // and memory stores live on one host), or, to show what skew does,
                // on the requester's.
                let clock = match self.opts.lease_clock {
                    LeaseClock::Store => now,
                    LeaseClock::Process => self.local_now(self.workers[w].process),
                };
                match strategy.acquire_lease(&mut self.store, &id, &me, request, ttl, clock) {
                    LeaseOutcome::Granted {
                        lease,
                        record,
                        took_over,
                    } => {
                        let other = took_over.as_ref().filter(|l| l.owner != me);
                        if other.is_some() {
                            self.conns[c].last_takeover = Some(now);
                        }
                        let stored = record.as_ref().map(|r| r.generation);
                        let doubt = other.is_some_and(|l| l.generation == stored);
                        // S4's ghost: whoever takes over another worker's grant with
                        // nothing committed since cannot know whether a request was
                        // sent under it. Our own earlier grant never counts.
                        let forced =
                            other.and_then(|l| Unsettled::taken_over(l, record.as_deref(), late));
                        invariants::keep_unsettled(&mut self.conns[c].taken_over, forced);
                        if let Some(s) = self.slot(w, c) {
                            s.ghost.took_over = doubt;
                            s.ghost.lease_at = now;
                            s.ghost.lease_acquired = lease.acquired_at;
                        }
                        Input::LeaseGranted {
                            lease,
                            record,
                            took_over,
                        }
                    }
                    LeaseOutcome::Held { holder } => Input::LeaseHeld { holder },
                }
            }
            StoreCmd::Cas {
                expected,
                record,
                release,
            } => {
                let input = self.write(w, c, expected, *record);
                // The release goes with the swap, atomically, if it landed.
                if let (Input::Committed { .. }, Some(release)) = (&input, release) {
                    self.release(w, c, &release);
                }
                input
            }
        };
        self.reindex(c);
        input
    }

    /// Releases a lease as the strategy does.
    fn release(&mut self, w: usize, c: usize, release: &tokenfence_core::LeaseRelease) {
        let id = self.conns[c].id.clone();
        let released = self.strategy.release_lease(
            &mut self.store,
            &id,
            &release.owner,
            release.request,
            release.restore,
        );
        if released {
            self.note(c, || format!("w{} releases the lease", w + 1));
        }
    }

    /// A write as the strategy does it; S1 is checked when it lands.
    fn write(
        &mut self,
        w: usize,
        c: usize,
        expected: Option<tokenfence_core::Generation>,
        record: tokenfence_core::ConnectionRecord,
    ) -> Input {
        let id = self.conns[c].id.clone();
        let now = self.now;
        let before = self.store.row(&id).and_then(|r| r.record.as_ref());
        let was_live = before.is_some_and(|r| r.is_live());
        let before = before.map(|r| r.generation);
        let naive = self
            .slot(w, c)
            .is_some_and(|s| std::mem::take(&mut s.ghost.naive_reauth));
        let strategy = self.strategy;
        let (generation, base) = match strategy.write(&mut self.store, &id, expected, record, naive)
        {
            Written::Landed { generation, base } => (generation, base),
            Written::Conflict(current) => {
                self.ledger.conflicts += 1;
                return Input::Conflict { current };
            }
        };
        if let Some(slot) = self.slot(w, c) {
            slot.ghost.sender.settle();
        }
        if let Err(v) = invariants::commit_on_current(base, before) {
            self.ledger.stale_overwrites += 1;
            self.ledger
                .violation("S1", c, now, || format!("w{}: {v}", w + 1));
        }
        if let Some(b) = before {
            if let Err(v) = invariants::generation_monotonic(b, generation) {
                self.ledger
                    .violation("S1", c, now, || format!("w{}: {v}", w + 1));
            }
        }
        let Some(stored) = self.store.row(&id).and_then(|r| r.record.as_ref()) else {
            return Input::Committed { generation };
        };
        let live = stored.is_live();
        let status = stored.status;
        if self.traced == Some(c) {
            let d = describe_record(stored);
            self.note(c, || format!("store ← {d}"));
        }
        if live {
            self.conns[c].dead_since = None;
        } else if self.conns[c].dead_since.is_none() {
            self.conns[c].dead_since = Some(now);
        }
        if was_live {
            if let Status::ReauthRequired { reason, .. } = status {
                let truth_ok = self.sound_reauth(c).is_none();
                let grace = self.spec(c).profile.rotation.grace;
                if reason == ReauthReason::LostRotation && grace >= tokenfence_core::hours(1) {
                    self.ledger.violation("S2", c, now, || {
                        format!(
                            "w{} declared a rotation lost although the provider forgives replays for {} h: the doubt was not resolved in time",
                            w + 1,
                            grace.as_secs() / 3_600
                        )
                    });
                }
                match (reason == ReauthReason::LostRotation, truth_ok) {
                    (true, true) => self.ledger.lost_rotation_justified += 1,
                    (true, false) => self.ledger.lost_rotation_false += 1,
                    (false, true) => self.ledger.reauth_correct += 1,
                    (false, false) => {}
                }
            }
        }
        Input::Committed { generation }
    }

    /// Keeps the due-for-work index of connection `c` in step with the store: when
    /// its keep-alive is due, or when its lease row expires unreleased.
    pub(super) fn reindex(&mut self, c: usize) {
        let lead = self.settings.keepalive_lead;
        let row = self.store.row(&self.conns[c].id);
        let keepalive = row
            .and_then(|r| r.record.as_ref())
            .and_then(|r| r.work_due_at(lead));
        let lease = row.and_then(|r| r.lease()).map(|l| l.expires_at);
        let key = match (keepalive, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let notice = row
            .and_then(|r| r.record.as_ref())
            .filter(|r| r.is_live())
            .and_then(|r| r.hard_deadline)
            .map(|d| d.saturating_sub(self.settings.reconnect_notice));
        let conn = &mut self.conns[c];
        if conn.notice != notice {
            if let Some(old) = conn.notice.take() {
                self.notices.remove(&(old, c));
            }
            if let Some(k) = notice {
                self.notices.insert((k, c));
            }
            conn.notice = notice;
        }
        if conn.due == key {
            return;
        }
        if let Some(old) = conn.due.take() {
            self.due.remove(&(old, c));
        }
        if let Some(k) = key {
            self.due.insert((k, c));
        }
        conn.due = key;
    }

    /// A request leaves worker `w`.
    fn send(&mut self, w: usize, c: usize, request: HttpRequest) {
        let p = self.workers[w].process;
        let local = self.local_now(p);
        let now = self.now;
        let deadline = self.true_time(p, request.send_deadline);
        self.op_seq += 1;
        let op = self.op_seq;
        let inc = self.inc(w);
        let strategy = self.strategy;
        // The generation stored as the request leaves (the harness's store).
        let stored = self
            .store
            .row(&self.conns[c].id)
            .and_then(|r| r.record.as_ref())
            .map(|r| r.generation);
        let Some(slot) = self.slot(w, c) else { return };
        let base = slot.conn.in_flight().cloned();
        let refresh = base.is_some();
        let in_doubt = std::mem::take(&mut slot.ghost.took_over)
            || base.as_ref().is_some_and(|b| b.in_doubt_since.is_some());
        let lease_at = slot.ghost.lease_at;
        let earlier = match &base {
            Some(b) => {
                let acquired = slot.ghost.lease_acquired;
                slot.ghost.sender.sent(b.refresh.clone(), acquired, stored)
            }
            None => None,
        };
        let wrong = base
            .as_ref()
            .and_then(|b| invariants::right_credentials(slot.conn.config(), b).err());
        if slot.op.is_some() {
            self.ledger.violation("contract", c, now, || {
                format!("w{} sent a request while a command was outstanding", w + 1)
            });
        }
        let Some(slot) = self.slot(w, c) else { return };
        slot.op = Some((
            op,
            OpKind::Exchange {
                sent_at: now,
                lost: false,
                refresh,
                in_doubt,
                minted: None,
                arrived: false,
                truncated: false,
            },
        ));
        self.keep_unsettled(c, earlier);
        if let Some(v) = wrong {
            self.ledger
                .violation("S7", c, now, || format!("w{} sends: {v}", w + 1));
        }
        self.note_busy(w, c);
        if let Some(b) = &base {
            self.ledger.sends += 1;
            if let Status::Degraded { retry_at, .. } = b.status {
                if local < retry_at {
                    self.ledger.violation("L5", c, now, || {
                        format!("w{} refreshes before the recorded retry time", w + 1)
                    });
                }
            }
            if self.conns[c].dead_since.is_some() {
                self.ledger.calls_to_dead += 1;
                if strategy.uses_leases() && self.conns[c].dead_since.is_some_and(|t| t < lease_at)
                {
                    self.ledger.violation("L5", c, now, || {
                        format!(
                            "w{} calls the provider for a connection stored as dead",
                            w + 1
                        )
                    });
                }
            }
            self.single_flight(c);
        }
        self.note(c, || {
            format!(
                "w{} sends {} {}",
                w + 1,
                if refresh {
                    "a refresh with"
                } else {
                    "a revocation of"
                },
                base.as_ref()
                    .map(|b| b.refresh.expose().to_string())
                    .unwrap_or_default()
            )
        });
        if self.strikes(Fault::ConnectError) {
            let at = now.saturating_add(Duration::from_millis(1 + self.rng.next_u64() % 30));
            let input = Box::new(Input::NotSent);
            self.push(
                at,
                Ev::Feed {
                    w,
                    c,
                    op: Some(op),
                    inc,
                    input,
                },
            );
            return;
        }
        let d1 = Duration::from_millis(20 + self.rng.next_u64() % 100);
        let request = Box::new(request);
        self.push(
            now.saturating_add(d1),
            Ev::Arrive {
                w,
                c,
                op,
                inc,
                request,
                deadline,
            },
        );
        self.push(deadline, Ev::Deadline { w, c, op, inc });
    }

    /// S8: at most one refresh in flight per connection while leases are honoured.
    fn single_flight(&mut self, c: usize) {
        let mut outstanding = 0;
        let mut oldest = self.now;
        for w in &self.conns[c].busy {
            let Some(slot) = self.workers[usize::from(*w)]
                .slots
                .get(c)
                .and_then(|s| s.as_deref())
            else {
                continue;
            };
            if let Some((
                _,
                OpKind::Exchange {
                    sent_at,
                    lost: false,
                    refresh: true,
                    ..
                },
            )) = &slot.op
            {
                outstanding += 1;
                oldest = oldest.min(*sent_at);
            }
        }
        let conn = &self.conns[c];
        for t in &conn.orphans {
            outstanding += 1;
            oldest = oldest.min(*t);
        }
        if outstanding > 1 {
            self.ledger.duplicate_calls += 1;
        }
        // On the store's clock, a holder stops sending `send_safety` before a
        // lease counted from when it asked, on its own clock: no allowance for
        // skew. On the processes' clocks, a holder displaced by a takeover may
        // still send for up to a lease when clocks disagree by more than that
        // margin (found by a sweep with 77 s of skew).
        let skew = Duration::from_millis(2 * self.max_skew_ms.unsigned_abs());
        let window = match self.opts.lease_clock {
            LeaseClock::Process if skew > self.settings.send_safety => {
                self.settings.lease_ttl + skew
            }
            _ => Duration::ZERO,
        };
        let honoured = self.strategy.uses_leases()
            && conn
                .last_takeover
                .is_none_or(|t| t.saturating_add(window) < oldest);
        if let Err(v) = invariants::single_flight(outstanding, honoured) {
            let now = self.now;
            self.ledger.violation("S8", c, now, || v.to_string());
        }
    }

    /// A request reaches the provider (or arrives too late to be processed).
    pub(super) fn arrive(
        &mut self,
        w: usize,
        c: usize,
        op: u64,
        inc: u32,
        request: HttpRequest,
        deadline: tokenfence_core::Timestamp,
    ) {
        let now = self.now;
        let orphan = !self.alive(w, inc);
        let sent_at = self.exchange_sent_at(w, c, op);
        if orphan {
            let orphans = &mut self.conns[c].orphans;
            if let Some(i) = orphans
                .iter()
                .position(|t| Some(*t) == sent_at || sent_at.is_none())
            {
                orphans.remove(i);
            }
        }
        if let Some(Some(slot)) = self.workers[w].slots.get_mut(c) {
            if let Some((id, OpKind::Exchange { arrived, .. })) = &mut slot.op {
                if *id == op {
                    *arrived = true;
                }
            }
        }
        if now > deadline {
            self.note(c, || {
                "the request arrives after its deadline and is dropped".into()
            });
            return;
        }
        let reply = if self.strikes(Fault::ServerError) {
            Some(provider::server_error(503))
        } else if self.strikes(Fault::RateLimited) {
            Some(provider::rate_limited(1 + self.rng.next_u64() % 120))
        } else if self.strikes(Fault::HtmlBody) {
            Some(HttpResponse {
                status: 502,
                headers: vec![("content-type".into(), "text/html".into())],
                body: b"<html><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
            })
        } else {
            None
        };
        let (reply, refresh, minted) = match reply {
            Some(r) => (r, None, false),
            None => {
                let (reply, outcome) = self.conns[c].provider.handle(&request, now);
                self.outcome(w, c, op, &outcome);
                match outcome {
                    Outcome::Refreshed {
                        refresh, minted, ..
                    } => (reply, Some(refresh), minted),
                    _ => (reply, None, false),
                }
            }
        };
        if orphan {
            if let (Some(t), true) = (&refresh, minted) {
                self.conns[c].provider.mark_lost(t);
            }
            self.note(c, || {
                "the provider processes a crashed worker's request; nobody receives the reply"
                    .into()
            });
            self.check_connection(c);
            return;
        }
        if self.strikes(Fault::LostReply) {
            self.ledger.lost_replies += 1;
            if let (Some(t), true) = (&refresh, minted) {
                self.conns[c].provider.mark_lost(t);
            }
            if let Some(Some(slot)) = self.workers[w].slots.get_mut(c) {
                if let Some((id, OpKind::Exchange { lost, .. })) = &mut slot.op {
                    if *id == op {
                        *lost = true;
                    }
                }
            }
            self.note(c, || "the reply is lost".into());
            self.check_connection(c);
            return;
        }
        let (reply, refresh) = if self.strikes(Fault::Truncated) {
            if let (Some(t), true) = (&refresh, minted) {
                self.conns[c].provider.mark_lost(t);
            }
            if let Some(Some(slot)) = self.workers[w].slots.get_mut(c) {
                if let Some((id, OpKind::Exchange { truncated, .. })) = &mut slot.op {
                    if *id == op {
                        *truncated = true;
                    }
                }
            }
            (provider::truncated(reply), None)
        } else {
            (reply, refresh.map(|r| (r, minted)))
        };
        if let Some((t, true)) = &refresh {
            if let Some(Some(slot)) = self.workers[w].slots.get_mut(c) {
                if let Some((id, OpKind::Exchange { minted, .. })) = &mut slot.op {
                    if *id == op {
                        *minted = Some(t.clone());
                    }
                }
            }
        }
        let mut d2 = Duration::from_millis(30 + self.rng.next_u64() % 300);
        if self.strikes(Fault::LatencySpike) {
            d2 += self.span(Duration::from_secs(2), Duration::from_secs(120));
        }
        self.push(
            now.saturating_add(d2),
            Ev::Reply {
                w,
                c,
                op,
                inc,
                reply: Box::new(reply),
                refresh,
            },
        );
        self.check_connection(c);
    }

    fn exchange_sent_at(&self, w: usize, c: usize, op: u64) -> Option<tokenfence_core::Timestamp> {
        let slot = self.workers[w].slots.get(c)?.as_deref()?;
        match &slot.op {
            Some((id, OpKind::Exchange { sent_at, .. })) if *id == op => Some(*sent_at),
            _ => None,
        }
    }

    /// Accounts for what the provider did (ghost information).
    fn outcome(&mut self, w: usize, c: usize, op: u64, outcome: &Outcome) {
        let now = self.now;
        match outcome {
            Outcome::Refreshed { minted, .. } => {
                self.ledger.refresh_calls += 1;
                if *minted {
                    self.ledger.rotations += 1;
                }
            }
            Outcome::Rejected { cause, grant } => {
                self.ledger.refresh_calls += 1;
                let name = match cause {
                    RejectCause::Unknown => "unknown-token (self)",
                    RejectCause::WrongClient => "wrong-client (config)",
                    RejectCause::UserRevoked => "user-revoked (provider)",
                    RejectCause::FamilyRevoked => "family-revoked (self)",
                    RejectCause::IdleExpired => "idle-expired (provider)",
                    RejectCause::HardExpired => "hard-expired (provider)",
                    RejectCause::RotatedAway => "rotated-away (self)",
                };
                *self.ledger.invalid_grant.entry(name).or_default() += 1;
                let (in_doubt, sent_at) = match self.workers[w]
                    .slots
                    .get(c)
                    .and_then(|s| s.as_deref())
                    .and_then(|s| s.op.as_ref())
                {
                    Some((
                        id,
                        OpKind::Exchange {
                            in_doubt, sent_at, ..
                        },
                    )) if *id == op => (*in_doubt, *sent_at),
                    _ => (true, now),
                };
                if *cause == RejectCause::RotatedAway {
                    let honoured = self.strategy.uses_leases()
                        && self.conns[c].last_takeover.is_none_or(|t| t < sent_at);
                    if in_doubt {
                        self.ledger.in_doubt_probes += 1;
                    } else if honoured || !self.strategy.uses_leases() {
                        self.ledger.violation("S3", c, now, || {
                            format!(
                                "w{} presented a rotated-away refresh token outside its grace window without any reason to doubt it",
                                w + 1
                            )
                        });
                    }
                }
                if *cause == RejectCause::IdleExpired {
                    let live = self
                        .store
                        .row(&self.conns[c].id)
                        .and_then(|r| r.record.as_ref())
                        .is_some_and(|r| r.is_live());
                    let stored_grant = self.stored_grant(c);
                    if live && !self.conns[c].losing && stored_grant == *grant {
                        self.ledger.violation("L2", c, now, || {
                            "the refresh token expired after its idle window: keep-alive did not save it".into()
                        });
                    }
                }
            }
            _ => {}
        }
        self.note(c, || format!("the provider: {outcome:?}"));
    }

    /// A reply arrives at worker `w` (if it still waits for it).
    pub(super) fn reply(
        &mut self,
        w: usize,
        c: usize,
        op: u64,
        inc: u32,
        reply: HttpResponse,
        refresh: Option<(String, bool)>,
    ) {
        let waiting = self.alive(w, inc)
            && self.workers[w]
                .slots
                .get(c)
                .and_then(|s| s.as_deref())
                .is_some_and(|s| s.op.as_ref().map(|(id, _)| *id) == Some(op));
        if !waiting {
            if let Some((t, true)) = &refresh {
                self.conns[c].provider.mark_lost(t);
            }
            self.note(c, || {
                format!(
                    "w{}'s reply arrives after it gave up; nobody receives it",
                    w + 1
                )
            });
            self.check_connection(c);
            return;
        }
        if self.paused(w) {
            let at = self.workers[w].paused_until;
            let reply = Box::new(reply);
            self.push(
                at,
                Ev::Reply {
                    w,
                    c,
                    op,
                    inc,
                    reply,
                    refresh,
                },
            );
            return;
        }
        if let Some((t, _)) = &refresh {
            self.conns[c].provider.mark_received(t);
        }
        let strategy = self.strategy;
        let spec = self.spec(c);
        let profile = &spec.profile;
        let parsed = parse_token_reply(profile, &reply);
        let sent_local = self.sent_local(w, c);
        let Some(slot) = self.slot(w, c) else { return };
        let base = slot.conn.in_flight().cloned();
        match (parsed, base) {
            (Ok(grant), Some(base)) => {
                slot.ghost.check = Some((Box::new(base), grant, sent_local));
            }
            (
                Err(ReplyError::OAuth {
                    kind: OAuthErrorCode::InvalidGrant,
                    ..
                }),
                Some(base),
            ) if strategy.trusts_invalid_grant() => {
                slot.ghost.reread_with = Some(Box::new(base));
            }
            _ => {}
        }
        let refreshed = refresh.is_some() && reply.status == 200;
        self.deliver(w, c, Some(op), inc, Input::Replied(reply));
        if refreshed && self.crash_between_reply_and_commit() {
            let p = self.workers[w].process;
            self.note(c, || {
                format!("w{}'s process crashes before committing", w + 1)
            });
            self.crash_now(p);
        }
    }

    fn crash_between_reply_and_commit(&mut self) -> bool {
        let rate = self.derived.rate(Fault::Crash);
        !self.healing && rate > 0.0 && self.roll() < rate * 0.02
    }

    /// When the exchange of slot `(w, c)` was sent, on the worker's clock.
    fn sent_local(&self, w: usize, c: usize) -> tokenfence_core::Timestamp {
        let p = self.workers[w].process;
        let sent = self.workers[w]
            .slots
            .get(c)
            .and_then(|s| s.as_deref())
            .and_then(|s| match &s.op {
                Some((_, OpKind::Exchange { sent_at, .. })) => Some(*sent_at),
                _ => None,
            })
            .unwrap_or(self.now);
        super::world::skewed(sent, self.procs[p].skew_ms)
    }

    /// The request deadline of an exchange passes: no reply, outcome unknown.
    pub(super) fn deadline(&mut self, w: usize, c: usize, op: u64, inc: u32) {
        if !self.alive(w, inc) {
            return;
        }
        if self.paused(w) {
            let at = self.workers[w].paused_until;
            self.push(at, Ev::Deadline { w, c, op, inc });
            return;
        }
        let pending = match self.workers[w].slots.get(c).and_then(|s| s.as_deref()) {
            Some(s) => match &s.op {
                Some((id, OpKind::Exchange { minted, .. })) if *id == op => Some(minted.clone()),
                _ => None,
            },
            None => None,
        };
        if let Some(minted) = pending {
            // A reply still on its way will find nobody waiting for it.
            if let Some(t) = minted {
                self.conns[c].provider.mark_lost(&t);
            }
            self.deliver(w, c, Some(op), inc, Input::OutcomeUnknown);
        }
    }

    /// A machine answered a caller.
    fn delivered(
        &mut self,
        w: usize,
        c: usize,
        request: RequestId,
        result: Result<AccessToken, AccessError>,
    ) {
        let now = self.now;
        let p = self.workers[w].process;
        let local = self.local_now(p);
        // The margin, never more than half the lifetime the provider grants.
        let margin = self.settings.access_margin.min(self.spec(c).access_ttl / 2);
        let Some(slot) = self.slot(w, c) else { return };
        let Some(i) = slot.callers.iter().position(|k| k.id == request) else {
            self.ledger.violation("contract", c, now, || {
                format!("w{} answered a caller that was not waiting", w + 1)
            });
            return;
        };
        let caller = slot.callers.swap_remove(i);
        let mut stale = None;
        if let Ok(token) = &result {
            let conn = &slot.conn;
            let served = conn.access_source(token);
            let newest = slot.ghost.newest.unwrap_or_default();
            stale = Some(match served {
                Some((g, exp)) => invariants::fresh_serve(g, exp, local, margin, newest)
                    .err()
                    .map(|v| v.to_string()),
                None => Some("served an access token it does not hold".into()),
            });
        }
        if let Some(Some(v)) = stale {
            self.ledger
                .violation("S5", c, now, || format!("w{}: {v}", w + 1));
        }
        self.ledger
            .latency
            .record(now.saturating_since(caller.asked_at).as_millis() as u64);
        match &result {
            Ok(_) => self.ledger.served += 1,
            Err(AccessError::Transient { .. }) => self.ledger.answered_transient += 1,
            Err(AccessError::Config(_)) => self.ledger.answered_config += 1,
            Err(_) => self.ledger.answered_dead += 1,
        }
        self.note(c, || match &result {
            Ok(t) => format!("w{} serves #{} {}", w + 1, request.0, t.expose()),
            Err(e) => format!("w{} answers #{}: {e}", w + 1, request.0),
        });
        if caller.trigger == Trigger::Heal {
            self.heal_result(c, result.is_ok());
        } else if result.is_ok() && caller.trigger != Trigger::Retry401 && self.roll() < 0.02 {
            let at = now.saturating_add(Duration::from_millis(50 + self.rng.next_u64() % 450));
            self.push(
                at,
                Ev::Access {
                    w,
                    c,
                    trigger: Trigger::Retry401,
                },
            );
        }
    }

    fn event(&mut self, w: usize, c: usize, e: Event) {
        let now = self.now;
        self.note(c, || format!("w{} emits {e:?}", w + 1));
        match e {
            Event::Refreshed { .. } => self.ledger.refreshed += 1,
            Event::Degraded { .. } => self.ledger.degraded += 1,
            Event::Recovered { .. } => {
                self.ledger.recovered += 1;
                if self.healing {
                    self.conns[c].recovered_in_heal = true;
                }
            }
            Event::ReauthRequired { .. } => self.maybe_reconnect(c),
            Event::ReconnectSoon { deadline } => {
                let warned = &mut self.conns[c].warned;
                if !warned.iter().any(|(d, _)| *d == deadline) {
                    warned.push((deadline, now));
                }
            }
            _ => {}
        }
    }

    /// The process of worker `w` lost slot `(w, c)` in a crash.
    pub(super) fn lose_slot(&mut self, c: usize, mut slot: Slot) {
        self.ledger.aborted_by_crash += slot.callers.len() as u64;
        let crashed = slot.ghost.sender.crashed();
        self.keep_unsettled(c, crashed);
        if let Some((
            _,
            OpKind::Exchange {
                sent_at,
                lost,
                minted,
                arrived,
                ..
            },
        )) = &slot.op
        {
            match minted {
                // Processed, the reply is on its way to nobody.
                Some(t) => self.conns[c].provider.mark_lost(t),
                None if !lost && !arrived => self.conns[c].orphans.push(*sent_at),
                None => {}
            }
        }
        // A reply the machine had not committed: its refresh token is lost unless
        // the store or another machine has it.
        let unstored = slot.conn.uncommitted().map(|r| &r.refresh).filter(|t| {
            let stored = self.store.row(&self.conns[c].id);
            stored.and_then(|r| r.record.as_ref()).map(|r| &r.refresh) != Some(*t)
        });
        if let Some(t) = unstored {
            let held_elsewhere = self.workers.iter().any(|wk| {
                wk.slots
                    .get(c)
                    .and_then(|s| s.as_deref())
                    .and_then(|s| s.conn.uncommitted())
                    .is_some_and(|r| r.refresh == *t)
            });
            if !held_elsewhere {
                self.conns[c].provider.mark_lost(t.expose());
            }
        }
        self.note(c, || "a slot is lost in a crash".into());
    }
}

/// A short description of a record: generation, status, refresh token (the sim's
/// tokens are fake, so showing them is fine).
pub(super) fn describe_record(r: &tokenfence_core::ConnectionRecord) -> String {
    let status = match r.status {
        Status::Active => "Active".to_string(),
        Status::Degraded { failures, .. } => format!("Degraded({failures})"),
        Status::ReauthRequired { reason, .. } => format!("ReauthRequired({reason:?})"),
        Status::Disconnected { .. } => "Disconnected".to_string(),
    };
    let doubt = if r.in_doubt_since.is_some() {
        " in-doubt"
    } else {
        ""
    };
    let refresh = if r.refresh.is_empty() {
        "<empty>"
    } else {
        r.refresh.expose()
    };
    format!("{} {status} {refresh}{doubt}", r.generation)
}

fn describe_input(input: &Input) -> String {
    let rec = |r: &Option<Box<tokenfence_core::ConnectionRecord>>| {
        r.as_deref()
            .map(describe_record)
            .unwrap_or_else(|| "none".into())
    };
    match input {
        Input::Loaded(r) => format!("Loaded({})", rec(r)),
        Input::LeaseGranted {
            record, took_over, ..
        } => format!(
            "LeaseGranted({}{})",
            rec(record),
            if took_over.is_some() {
                ", took over an unreleased lease"
            } else {
                ""
            }
        ),
        Input::LeaseHeld { holder } => format!("LeaseHeld(by {})", holder.owner.0),
        Input::Replied(r) => format!("Replied(HTTP {})", r.status),
        Input::Conflict { current } => format!("Conflict(stored {})", rec(current)),
        Input::Authorized { .. } => "Authorized".into(),
        Input::Committed { generation } => format!("Committed({generation})"),
        other => format!("{other:?}"),
    }
}
