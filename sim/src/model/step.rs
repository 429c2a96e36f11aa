//! One step of the model: the driver around the real machine, the store, the
//! provider, the network and the faults. Transition properties (S1, S5, S6, S7, S9,
//! L5, the S3 race check) are evaluated here with the predicates of
//! `tokenfence_core::invariants`, and recorded in the state.

use super::state::{Breach, Flight, GrantCheck, Orphan, Seen, State, StoreCommand};
use super::{connection_id, owner_name, Action, FaultKind, TokenfenceModel};
use crate::provider::{self, GrantEnd, Outcome, RejectCause};
use crate::store::LeaseOutcome;
use crate::strategy::Written;
use tokenfence_core::invariants::{self, Unsettled};
use tokenfence_core::{
    parse_token_reply, AccessError, ConfigError, Connection, ConnectionRecord, Generation, Input,
    Lease, Output, RequestId, Status, Timestamp, WorkerId,
};

/// Explanations of a step, collected only when a trace is rendered.
pub struct Log(Option<Vec<String>>);

impl Log {
    /// Collects nothing.
    pub fn off() -> Self {
        Log(None)
    }

    /// Collects explanations.
    pub fn on() -> Self {
        Log(Some(Vec::new()))
    }

    /// Adds an explanation (built only when collecting).
    pub fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(lines) = &mut self.0 {
            lines.push(line());
        }
    }

    /// The explanations.
    pub fn lines(&self) -> &[String] {
        self.0.as_deref().unwrap_or_default()
    }
}

fn self_id() -> WorkerId {
    WorkerId("self".into())
}

fn describe_input(input: &Input) -> String {
    let rec = |r: &Option<Box<ConnectionRecord>>| {
        r.as_deref()
            .map(super::describe_record)
            .unwrap_or_else(|| "none".into())
    };
    match input {
        Input::AccessRequested(RequestId(n)) => format!("AccessRequested(#{n})"),
        Input::Loaded(r) => format!("Loaded({})", rec(r)),
        Input::LeaseGranted {
            record, took_over, ..
        } => format!(
            "LeaseGranted({}{})",
            rec(record),
            took_over
                .as_ref()
                .map(|l| format!(", took over {}'s lease from {}", l.owner.0, l.acquired_at))
                .unwrap_or_default()
        ),
        Input::LeaseHeld { holder } => {
            format!(
                "LeaseHeld(by {} until {})",
                holder.owner.0, holder.expires_at
            )
        }
        Input::Replied(r) => format!(
            "Replied(HTTP {} {})",
            r.status,
            String::from_utf8_lossy(&r.body)
        ),
        Input::Committed { generation } => format!("Committed({generation})"),
        Input::Conflict { current } => format!("Conflict(stored {})", rec(current)),
        other => format!("{other:?}"),
    }
}

impl TokenfenceModel {
    pub(super) fn apply(&self, s: &State, action: &Action, log: &mut Log) -> Option<State> {
        let mut s = s.clone();
        match *action {
            Action::Request(w) => {
                let worker = &mut s.workers[w];
                worker.requests_left -= 1;
                let id = u64::from(self.cfg.requests - worker.requests_left);
                self.feed(&mut s, w, Input::AccessRequested(RequestId(id)), log);
            }
            Action::Reject(w) => {
                let worker = &mut s.workers[w];
                worker.rejects_left -= 1;
                let token = worker.ghost.served.clone()?;
                worker.ghost.refused.push(token.clone());
                if !s.refused.contains(&token) {
                    s.refused.push(token.clone());
                }
                let id = 100 + u64::from(self.cfg.rejects - s.workers[w].rejects_left);
                log.note(|| {
                    format!(
                        "a caller of w{} reports a 401 for {}",
                        w + 1,
                        token.expose()
                    )
                });
                let input = Input::Rejected {
                    request: RequestId(id),
                    token,
                };
                self.feed(&mut s, w, input, log);
            }
            Action::Store(w) => {
                let input = self.carry_out(&mut s, w, log)?;
                self.feed(&mut s, w, input, log);
            }
            Action::StoreFails { w, applied } => {
                s.faults_left -= 1;
                if matches!(
                    s.workers[w].pending,
                    Some(StoreCommand::AcquireLease { .. })
                ) {
                    s.workers[w].ghost.lease_failed = true;
                }
                if applied {
                    let _ = self.carry_out(&mut s, w, log)?;
                } else {
                    s.workers[w].pending = None;
                }
                log.note(|| {
                    format!(
                        "the store fails (the command {} effect)",
                        if applied { "took" } else { "had no" }
                    )
                });
                self.feed(&mut s, w, Input::StoreFailed, log);
            }
            Action::Pause(w) => {
                s.faults_left -= 1;
                let input = self.carry_out(&mut s, w, log)?;
                log.note(|| {
                    format!(
                        "w{} pauses before handling {}",
                        w + 1,
                        describe_input(&input)
                    )
                });
                s.workers[w].paused = Some(input);
            }
            Action::Resume(w) => {
                let input = s.workers[w].paused.take()?;
                self.feed(&mut s, w, input, log);
            }
            Action::Reply(w) => self.exchange(&mut s, w, Delivery::Normal, log)?,
            Action::LoseReply(w) => {
                s.faults_left -= 1;
                self.exchange(&mut s, w, Delivery::Lost, log)?
            }
            Action::Garble(w) => {
                s.faults_left -= 1;
                self.exchange(&mut s, w, Delivery::Garbled, log)?
            }
            Action::ServerError(w) | Action::RateLimited(w) => {
                s.faults_left -= 1;
                s.workers[w].net.take()?;
                // A definite answer: the provider did not process the request.
                let _ = s.workers[w].ghost.sender.answered(true);
                let reply = match action {
                    Action::ServerError(_) => provider::server_error(503),
                    _ => provider::rate_limited(1),
                };
                self.feed(&mut s, w, Input::Replied(reply), log);
            }
            Action::ConnectError(w) => {
                s.faults_left -= 1;
                s.workers[w].net.take()?;
                let _ = s.workers[w].ghost.sender.answered(true);
                self.feed(&mut s, w, Input::NotSent, log);
            }
            Action::GiveUp(w) => {
                s.workers[w].net.take()?;
                let unseen = s.workers[w].ghost.sender.answered(false);
                s.keep_unsettled(unseen);
                self.feed(&mut s, w, Input::OutcomeUnknown, log);
            }
            Action::Timer(w) => self.feed(&mut s, w, Input::Timeout, log),
            Action::Crash(w) => {
                s.faults_left -= 1;
                self.crash(&mut s, w, log);
            }
            Action::OrphanArrives(i) => {
                let orphan = s.orphans.remove(i);
                let (reply, outcome) = s.provider.handle(&orphan.request, s.now);
                if let Outcome::Refreshed {
                    refresh,
                    minted: true,
                    ..
                } = &outcome
                {
                    s.provider.mark_lost(refresh);
                }
                log.note(|| {
                    format!(
                        "the provider processes a crashed worker's request: HTTP {} {}, nobody receives it",
                        reply.status,
                        String::from_utf8_lossy(&reply.body)
                    )
                });
            }
            Action::Revoke => {
                s.faults_left -= 1;
                s.provider.revoke_by_user(self.grant);
                log.note(|| "the user disconnects the app at the provider".into());
            }
            Action::Tick(target) => {
                let targets = self.tick_targets(&s);
                let free = self.free_tick(&s) && targets.first() == Some(&target);
                if !free {
                    s.ticks_left = s.ticks_left.checked_sub(1)?;
                }
                s.now = target;
                s.orphans.retain(|o| o.request.send_deadline >= target);
            }
        }
        for worker in &mut s.workers {
            // Written only when it changes: a write copies a worker other states share.
            if !worker.conn.is_busy() && worker.ghost.sender.unsettled().is_some() {
                worker.ghost.sender.settle();
            }
        }
        Some(s)
    }

    /// Feeds `input` to worker `w` and drains every output.
    pub(super) fn feed(&self, s: &mut State, w: usize, input: Input, log: &mut Log) {
        let now = s.now;
        let seen_gen = input.shown_generation();
        let ghost = &mut s.workers[w].ghost;
        if let Some(g) = seen_gen {
            ghost.newest = Some(ghost.newest.map_or(g, |n| n.max(g)));
        }
        log.note(|| format!("w{} ← {}", w + 1, describe_input(&input)));
        if let Err(e) = s.workers[w].conn.handle_input(now, input) {
            s.breach(Breach::Contract, || {
                format!("w{} refused an input: {e}", w + 1)
            });
            return;
        }
        self.drain(s, w, log);
    }

    fn drain(&self, s: &mut State, w: usize, log: &mut Log) {
        let now = s.now;
        let profile = &self.spec.profile;
        while let Some(output) = s.workers[w].conn.poll_output() {
            match output {
                Output::Load => self.set_pending(s, w, StoreCommand::Load),
                Output::AcquireLease { ttl, request, .. } => {
                    self.set_pending(s, w, StoreCommand::AcquireLease { ttl, request })
                }
                Output::CompareAndSwap {
                    expected,
                    mut record,
                    release,
                } => {
                    let ghost = &mut s.workers[w].ghost;
                    let of_grant = ghost.grant.as_ref().filter(|g| {
                        record.access.as_ref().map(|a| &a.token) == Some(&g.grant.access)
                    });
                    if let Some(g) = of_grant {
                        self.cfg.strategy.rewrite_commit(&mut record, &g.grant);
                        if let Err(v) = invariants::keeps_what_was_not_replaced(
                            &g.base, &g.grant, &record, profile, g.sent_at,
                        ) {
                            s.breaches
                                .entry(Breach::S6)
                                .or_insert_with(|| format!("w{} commits a reply: {v}", w + 1));
                        }
                    }
                    let ghost = &mut s.workers[w].ghost;
                    if let Some((refresh, access)) = ghost.bad_input.take() {
                        if record.refresh != refresh || record.access != access {
                            s.breaches.entry(Breach::S9).or_insert_with(|| {
                                format!("w{} commits tokens changed by a garbled reply", w + 1)
                            });
                        }
                    }
                    log.note(|| {
                        format!(
                            "w{} → CompareAndSwap(expect {}, {})",
                            w + 1,
                            expected.map_or("none".into(), |g| g.to_string()),
                            super::describe_record(&record)
                        )
                    });
                    let release = release.map(|r| (r.request, r.restore));
                    let cas = StoreCommand::Cas {
                        expected,
                        record,
                        release,
                    };
                    self.set_pending(s, w, cas);
                }
                Output::ReleaseLease(release) => {
                    self.release(s, w, release.request, release.restore, log)
                }
                Output::Send(request) => {
                    let worker = &s.workers[w];
                    let base = worker.conn.in_flight().cloned();
                    if let Some(b) = &base {
                        if let Err(v) = invariants::right_credentials(worker.conn.config(), b) {
                            s.breach(Breach::S7, || format!("w{} sends: {v}", w + 1));
                        }
                        if let Status::Degraded { retry_at, .. } = b.status {
                            if now < retry_at {
                                s.breach(Breach::L5, || {
                                    format!("w{} refreshes at {now} before the recorded retry time {retry_at}", w + 1)
                                });
                            }
                        }
                    }
                    self.needed(s, w, base.as_ref());
                    let dead = s.stored().is_some_and(|r| !r.is_live());
                    if dead && self.cfg.strategy.uses_leases() && !s.seen.has(Seen::LEASE_BROKEN) {
                        s.breach(Breach::L5, || {
                            format!(
                                "w{} calls the provider for a connection stored as dead",
                                w + 1
                            )
                        });
                    }
                    let stored = s.stored().map(|r| r.generation);
                    let ghost = &mut s.workers[w].ghost;
                    let earlier = base
                        .as_ref()
                        .and_then(|b| ghost.sender.sent(b.refresh.clone(), ghost.lease_at, stored));
                    ghost.in_doubt = ghost.took_over
                        || base.as_ref().is_some_and(|b| b.in_doubt_since.is_some());
                    ghost.took_over = false;
                    ghost.grant = None;
                    log.note(|| {
                        format!(
                            "w{} sends a refresh with {} (deadline {})",
                            w + 1,
                            base.as_ref()
                                .map(|b| super::show_refresh(&b.refresh))
                                .unwrap_or_default(),
                            request.send_deadline
                        )
                    });
                    if s.workers[w].net.is_some() || s.workers[w].pending.is_some() {
                        s.breach(Breach::Contract, || {
                            format!(
                                "w{} issued a request while another command was outstanding",
                                w + 1
                            )
                        });
                    }
                    s.keep_unsettled(earlier);
                    s.workers[w].net = Some(Flight {
                        request,
                        sent_at: now,
                        lost: false,
                    });
                }
                Output::Deliver { request, result } => {
                    self.delivered(s, w, request, result, log);
                }
                Output::Event(e) => log.note(|| format!("w{} emits {e:?}", w + 1)),
            }
        }
    }

    /// R2 at worker `w`'s send from `base`: the stored record needed a refresh,
    /// judged with the model's own margin and the tokens callers reported. Not
    /// judged: a send from a record older than the stored one (a paused worker:
    /// S3's business), or after a lease request of this worker failed (its
    /// machine refreshes to resolve a grant it may hold: find 18).
    fn needed(&self, s: &mut State, w: usize, base: Option<&ConnectionRecord>) {
        let lease_failed = s.workers[w].ghost.lease_failed;
        let Some(stored) = s.stored().cloned() else {
            return;
        };
        if lease_failed || base.is_none_or(|b| b.generation != stored.generation) {
            return;
        }
        let settings = super::model_settings();
        let margin = settings.access_margin.min(self.spec.access_ttl / 2);
        let refused = &s.refused;
        let doubt = s.may_have_rotated().any(|u| u.token == stored.refresh);
        if let Err(v) = invariants::refresh_needed(
            &stored,
            s.now,
            margin,
            settings.keepalive_lead,
            doubt,
            |t| refused.contains(t),
        ) {
            let now = s.now;
            s.breach(Breach::R2, || format!("w{} sends at {now}: {v}", w + 1));
        }
    }

    fn set_pending(&self, s: &mut State, w: usize, cmd: StoreCommand) {
        let worker = &mut s.workers[w];
        if worker.pending.is_some() || worker.net.is_some() {
            s.breach(Breach::Contract, || {
                format!(
                    "w{} issued a store command while another was outstanding",
                    w + 1
                )
            });
        }
        s.workers[w].pending = Some(cmd);
    }

    fn delivered(
        &self,
        s: &mut State,
        w: usize,
        request: RequestId,
        result: Result<tokenfence_core::AccessToken, AccessError>,
        log: &mut Log,
    ) {
        let now = s.now;
        match &result {
            Ok(token) => {
                let worker = &s.workers[w];
                let conn = &worker.conn;
                let served = conn.access_source(token);
                let newest = worker.ghost.newest.unwrap_or_default();
                let margin = conn.config().settings.access_margin;
                match served {
                    Some((generation, expires_at)) => {
                        if let Err(v) =
                            invariants::fresh_serve(generation, expires_at, now, margin, newest)
                        {
                            s.breach(Breach::S5, || format!("w{}: {v}", w + 1));
                        }
                    }
                    None => s.breach(Breach::S5, || {
                        format!("w{} served an access token it does not hold", w + 1)
                    }),
                }
                if let Err(v) =
                    invariants::refused_not_served(token, &s.workers[w].ghost.refused, false)
                {
                    s.breach(Breach::R1, || format!("w{}: {v}", w + 1));
                }
                s.workers[w].ghost.served = Some(token.clone());
                if s.workers[w].ghost.conflict {
                    s.workers[w].ghost.conflict = false;
                    s.seen.set(Seen::CONFLICT_RESOLVED);
                }
                log.note(|| format!("w{} serves #{} {}", w + 1, request.0, token.expose()));
            }
            Err(e) => {
                if matches!(e, AccessError::Config(ConfigError::IdentityMismatch { .. })) {
                    s.seen.set(Seen::MISMATCH_REFUSED);
                }
                log.note(|| format!("w{} answers #{}: {e}", w + 1, request.0));
            }
        }
    }

    /// Carries out worker `w`'s pending store command and returns the answer.
    fn carry_out(&self, s: &mut State, w: usize, log: &mut Log) -> Option<Input> {
        let cmd = s.workers[w].pending.take()?;
        let id = connection_id();
        let me = owner_name(w, s.workers[w].incarnation);
        let now = s.now;
        let input = match cmd {
            StoreCommand::Load => match s.workers[w].ghost.reread_with.take() {
                Some(base) => {
                    // B3 answers the re-read with the record the refresh was sent from
                    // and will write the re-auth as a plain status update.
                    log.note(|| "B3: the re-read is answered with the pre-refresh record".into());
                    s.workers[w].ghost.naive_reauth = true;
                    Input::Loaded(Some(base))
                }
                None => Input::Loaded(s.store.load(id).map(Box::new)),
            },
            StoreCommand::AcquireLease { ttl, request } => {
                let strategy = self.cfg.strategy;
                match strategy.acquire_lease(&mut s.store, id, &me, request, ttl, now) {
                    LeaseOutcome::Granted {
                        lease,
                        record,
                        took_over,
                    } => {
                        let other = took_over.as_ref().filter(|l| l.owner != me);
                        if other.is_some() {
                            s.seen.set(Seen::LEASE_BROKEN);
                        }
                        let stored = record.as_ref().map(|r| r.generation);
                        // Another worker's grant, nothing committed since: whoever
                        // takes it over cannot know whether a request was sent under
                        // it (a pause, a lost answer, a crash); S4's ghost counts it
                        // as possibly presented. Our own earlier grant never counts.
                        let late = s.workers[w].conn.config().settings.in_doubt_safety;
                        let forced =
                            other.and_then(|l| Unsettled::taken_over(l, record.as_deref(), late));
                        s.keep_taken_over(forced);
                        s.workers[w].ghost.lease_at = now;
                        s.workers[w].ghost.took_over =
                            other.is_some_and(|l| l.generation == stored);
                        let took_over = took_over.map(|l| {
                            if l.owner == me {
                                Lease {
                                    owner: self_id(),
                                    ..l
                                }
                            } else {
                                l
                            }
                        });
                        Input::LeaseGranted {
                            lease: Lease {
                                owner: self_id(),
                                ..lease
                            },
                            record,
                            took_over,
                        }
                    }
                    LeaseOutcome::Held { holder } => Input::LeaseHeld { holder },
                }
            }
            StoreCommand::Cas {
                expected,
                record,
                release,
            } => {
                // Every machine of the model runs under the name `self`, so the
                // holder a record names would be ambiguous between workers: the
                // model keeps none, and the undoing of a lost rotation by the
                // holder of a lost lease grant is left to the property test, the
                // fuzz harness and the simulator (sim/VERIFICATION.md).
                let record = ConnectionRecord {
                    in_doubt_holder: None,
                    ..*record
                };
                let input = self.write(s, w, expected, record, log);
                // The release goes with the swap, atomically, if it landed.
                if let (Input::Committed { .. }, Some((request, restore))) = (&input, release) {
                    self.release(s, w, request, restore, log);
                }
                input
            }
        };
        Some(input)
    }

    /// Releases worker `w`'s lease as the strategy does.
    fn release(
        &self,
        s: &mut State,
        w: usize,
        request: tokenfence_core::LeaseRequestId,
        restore: bool,
        log: &mut Log,
    ) {
        let owner = owner_name(w, s.workers[w].incarnation);
        let strategy = self.cfg.strategy;
        if strategy.release_lease(&mut s.store, connection_id(), &owner, request, restore) {
            log.note(|| {
                let how = if restore {
                    " (restoring the row it displaced)"
                } else {
                    ""
                };
                format!("w{} releases the lease{how}", w + 1)
            });
        }
    }

    /// A write as the strategy under test does it; checks S1 when it lands.
    fn write(
        &self,
        s: &mut State,
        w: usize,
        expected: Option<Generation>,
        record: ConnectionRecord,
        log: &mut Log,
    ) -> Input {
        let id = connection_id();
        let before = s.stored().map(|r| r.generation);
        let naive_reauth = std::mem::take(&mut s.workers[w].ghost.naive_reauth)
            && matches!(record.status, Status::ReauthRequired { .. });
        let ghost = &s.workers[w].ghost;
        let refresh_commit = ghost
            .grant
            .as_ref()
            .is_some_and(|g| record.access.as_ref().map(|a| &a.token) == Some(&g.grant.access));
        if naive_reauth {
            log.note(|| {
                format!(
                    "B3: w{} writes the re-auth status over whatever is stored",
                    w + 1
                )
            });
        }
        let (generation, base) =
            match self
                .cfg
                .strategy
                .write(&mut s.store, id, expected, record, naive_reauth)
            {
                Written::Landed { generation, base } => (generation, base),
                Written::Conflict(current) => {
                    s.workers[w].ghost.conflict = true;
                    return Input::Conflict { current };
                }
            };
        if let Err(v) = invariants::commit_on_current(base, before) {
            s.breach(Breach::S1, || format!("w{}: {v}", w + 1));
        }
        if let Some(b) = before {
            if let Err(v) = invariants::generation_monotonic(b, generation) {
                s.breach(Breach::S1, || format!("w{}: {v}", w + 1));
            }
        }
        let ghost = &mut s.workers[w].ghost;
        ghost.sender.settle();
        if refresh_commit {
            // The piece of work begun to resolve a failed lease request ends
            // with its own refresh.
            ghost.lease_failed = false;
            ghost.grant = None;
            s.seen.set(Seen::REFRESH_COMMITTED);
            if std::mem::take(&mut s.workers[w].ghost.recovering) {
                s.seen.set(Seen::LOST_RECOVERED);
            }
        }
        if std::mem::take(&mut s.workers[w].ghost.conflict) {
            s.seen.set(Seen::CONFLICT_RESOLVED);
        }
        let dead_by_user = s
            .provider
            .grant(self.grant)
            .is_some_and(|g| g.ended == Some(GrantEnd::UserRevoked));
        if dead_by_user
            && s.stored()
                .is_some_and(|r| matches!(r.status, Status::ReauthRequired { .. }))
        {
            s.seen.set(Seen::REVOKE_REAUTH);
        }
        Input::Committed { generation }
    }

    /// The provider handles worker `w`'s request; the reply is delivered as `how`.
    fn exchange(&self, s: &mut State, w: usize, how: Delivery, log: &mut Log) -> Option<()> {
        let now = s.now;
        let flight = s.workers[w].net.clone()?;
        let (reply, outcome) = s.provider.handle(&flight.request, now);
        log.note(|| format!("the provider: {outcome:?}"));
        match &outcome {
            Outcome::Refreshed {
                refresh, minted, ..
            } => match how {
                Delivery::Normal => s.provider.mark_received(refresh),
                Delivery::Lost | Delivery::Garbled if *minted => s.provider.mark_lost(refresh),
                _ => {}
            },
            Outcome::Rejected {
                cause: RejectCause::RotatedAway,
                ..
            } if !s.workers[w].ghost.in_doubt => {
                s.breach(Breach::S3, || {
                    format!(
                        "w{} presented a rotated-away refresh token outside its grace window without any reason to doubt it",
                        w + 1
                    )
                });
            }
            Outcome::Rejected {
                cause: RejectCause::WrongClient,
                ..
            }
            | Outcome::ClientRejected => {
                s.breach(Breach::S7, || {
                    format!(
                        "w{}'s request reached the provider with another client's credentials",
                        w + 1
                    )
                });
            }
            _ => {}
        }
        match how {
            Delivery::Lost => {
                log.note(|| "the reply is lost".into());
                if let Some(f) = &mut s.workers[w].net {
                    f.lost = true;
                }
                return Some(());
            }
            Delivery::Normal | Delivery::Garbled => {}
        }
        s.workers[w].net = None;
        let base = s.workers[w].conn.in_flight().cloned();
        let ghost = &mut s.workers[w].ghost;
        ghost.in_doubt = false;
        let unseen = ghost.sender.answered(how == Delivery::Normal);
        s.keep_unsettled(unseen);
        let ghost = &mut s.workers[w].ghost;
        let reply = if how == Delivery::Garbled {
            ghost.bad_input = base.as_ref().map(|b| (b.refresh.clone(), b.access.clone()));
            provider::truncated(reply)
        } else {
            if let (Ok(grant), Some(base)) =
                (parse_token_reply(&self.spec.profile, &reply), base.clone())
            {
                ghost.grant = Some(GrantCheck {
                    base: Box::new(base),
                    grant,
                    sent_at: flight.sent_at,
                });
                ghost.recovering = matches!(
                    outcome,
                    Outcome::Refreshed {
                        recovered_lost: true,
                        ..
                    }
                );
            } else if self.cfg.strategy.trusts_invalid_grant()
                && matches!(outcome, Outcome::Rejected { .. })
            {
                ghost.reread_with = base.map(Box::new);
            }
            reply
        };
        let before = s.workers[w].conn.record().cloned();
        self.feed(s, w, Input::Replied(reply), log);
        if how == Delivery::Garbled {
            if let Err(v) =
                invariants::unchanged_by_bad_input(before.as_ref(), s.workers[w].conn.record())
            {
                s.breach(Breach::S9, || format!("w{}: {v}", w + 1));
            }
        }
        Some(())
    }

    fn crash(&self, s: &mut State, w: usize, log: &mut Log) {
        let stored = s.stored().map(|r| r.refresh.clone());
        let crashed = s.workers[w].ghost.sender.crashed();
        s.keep_unsettled(crashed);
        let worker = &mut s.workers[w];
        if let Some(f) = worker.net.take() {
            if !f.lost && s.now <= f.request.send_deadline {
                s.orphans.push(Orphan { request: f.request });
            }
        }
        let unstored = worker
            .conn
            .uncommitted()
            .map(|r| r.refresh.clone())
            .filter(|t| stored.as_ref() != Some(t));
        worker.conn = Connection::new(
            connection_id().clone(),
            self.configs[w].clone(),
            super::ENTROPY,
        );
        worker.incarnation += 1;
        worker.pending = None;
        worker.paused = None;
        worker.ghost = Default::default();
        if let Some(t) = unstored {
            let held_elsewhere = s
                .workers
                .iter()
                .any(|o| o.conn.uncommitted().is_some_and(|r| r.refresh == t));
            if !held_elsewhere {
                s.provider.mark_lost(t.expose());
            }
        }
        log.note(|| format!("w{} crashes and restarts empty", w + 1));
    }

    /// Whether worker `w`'s timer is due and firing it would change anything.
    pub(super) fn timer_due(&self, s: &State, w: usize) -> bool {
        let worker = &s.workers[w];
        if worker.pending.is_some() || worker.net.is_some() || worker.paused.is_some() {
            return false;
        }
        if worker.conn.poll_timeout().is_none_or(|t| t > s.now) {
            return false;
        }
        let mut probe = worker.conn.clone();
        let _ = probe.handle_input(s.now, Input::Timeout);
        probe != worker.conn
    }

    /// Whether nothing but time can make progress while callers wait: then time
    /// jumps for free (bounded by the horizon), so every request can resolve.
    pub(super) fn free_tick(&self, s: &State) -> bool {
        let waiting = s.workers.iter().any(|w| w.conn.waiting() > 0);
        waiting
            && s.workers.iter().enumerate().all(|(i, w)| {
                w.pending.is_none()
                    && w.paused.is_none()
                    && w.net.is_none()
                    && !self.timer_due(s, i)
            })
            && s.orphans.is_empty()
    }

    /// The instants after now at which something can change, in order.
    pub(super) fn tick_targets(&self, s: &State) -> Vec<Timestamp> {
        let now = s.now;
        let settings = &self.configs[0].settings;
        let margin = settings.access_margin;
        let mut at = Vec::new();
        let record_instants = |r: &ConnectionRecord, at: &mut Vec<Timestamp>| {
            if let Some(a) = &r.access {
                at.push(a.expires_at.saturating_sub(margin));
            }
            if let Status::Degraded { retry_at, .. } = r.status {
                at.push(retry_at);
            }
            if let Some(since) = r.in_doubt_since {
                let grace = self.spec.profile.rotation.grace;
                at.push(since.saturating_add(grace.saturating_sub(settings.in_doubt_safety)));
            }
        };
        for w in &s.workers {
            at.extend(w.conn.poll_timeout());
            if let Some(f) = &w.net {
                at.push(f.request.send_deadline.saturating_add(MS));
            }
            if let Some(r) = w.conn.record() {
                record_instants(r, &mut at);
            }
        }
        for o in &s.orphans {
            at.push(o.request.send_deadline.saturating_add(MS));
        }
        if let Some(row) = s.store.row(connection_id()) {
            if let Some(l) = row.lease() {
                at.push(l.expires_at);
            }
            if let Some(r) = &row.record {
                record_instants(r, &mut at);
            }
        }
        s.provider.deadlines(self.grant, now, &mut at);
        at.retain(|t| *t > now);
        at.sort();
        at.dedup();
        at
    }
}

const MS: core::time::Duration = core::time::Duration::from_millis(1);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Normal,
    Lost,
    Garbled,
}

impl FaultKind {
    /// Whether the fault spends the budget when injected.
    pub fn is_runtime(self) -> bool {
        self != FaultKind::WrongClient
    }
}
