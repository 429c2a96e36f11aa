//! The invariants of INVARIANTS.md over the simulated world, computed with the
//! predicates of `tokenfence_core::invariants` (the one home of each predicate):
//! S2–S4 after every step for the touched connection, and the liveness properties
//! L1–L5 of the heal phase.

use super::workload::Usage;
use super::world::{Conn, Ev, OpKind, Slot, Worker, World, START};
use crate::provider::{GrantEnd, GrantId};
use tokenfence_core::invariants::{self, ProviderTruth, Unsettled, Violation};
use tokenfence_core::{RefreshToken, Status, Timestamp};

impl World {
    /// The grant the stored refresh token belongs to (the newest one if the token is
    /// not the provider's).
    pub(super) fn stored_grant(&self, c: usize) -> Option<GrantId> {
        let conn = &self.conns[c];
        self.store
            .row(&conn.id)
            .and_then(|r| r.record.as_ref())
            .and_then(|r| conn.provider.token(r.refresh.expose()))
            .map(|t| t.grant)
            .or(conn.grant)
    }

    /// Keeps a refresh request of connection `c` whose outcome will never reach the
    /// store (S4's ghost).
    pub(super) fn keep_unsettled(&mut self, c: usize, u: Option<Unsettled>) {
        invariants::keep_unsettled(&mut self.conns[c].unsettled, u);
    }

    /// The harness's ghost for connection `c`: refresh requests really sent whose
    /// outcome has not reached the store (kept at connection level, or still with
    /// their sender), and leases taken over with no word of what was sent.
    fn ghost(&self, c: usize) -> impl Iterator<Item = &Unsettled> {
        ghost_of(&self.workers, &self.conns[c], c)
    }

    /// S4 for connection `c` as stored now, judged from the harness's ghost: the
    /// provider's truth, and the refresh requests really sent whose outcome has not
    /// reached the store.
    pub(super) fn sound_reauth(&self, c: usize) -> Option<Violation> {
        let conn = &self.conns[c];
        let grant = self.stored_grant(c)?;
        let stored = self.store.row(&conn.id).and_then(|r| r.record.as_ref())?;
        invariants::sound_reauth_within(
            stored,
            &self.specs[conn.kind].profile,
            self.settings.in_doubt_safety,
            &conn.provider.truth(grant, self.now),
            self.ghost(c),
        )
        .err()
    }

    /// S2, S3 and S4 for connection `c`, after a step that touched it. A loss or a
    /// false re-auth flag is counted once per episode.
    pub(super) fn check_connection(&mut self, c: usize) {
        let now = self.now;
        self.prune_busy(c);
        // One look at the row for the whole check (the simulator runs it after every
        // step): the fields are borrowed apart, the store's row shared, the
        // connection's ghost pruned in place.
        let conn = &mut self.conns[c];
        let Some(stored) = self.store.row(&conn.id).and_then(|r| r.record.as_ref()) else {
            return;
        };
        let grant = match conn.provider.token(stored.refresh.expose()) {
            Some(t) => t.grant,
            None => match conn.grant {
                Some(g) => g,
                None => return,
            },
        };
        let profile = &self.specs[conn.kind].profile;
        // Requests presenting a token no longer stored can justify nothing (tokens
        // are never stored again once replaced) unless the provider forks on
        // replays (an earlier token's replay demotes the stored one): keep the
        // ghost small.
        if profile.rotation.grace_replay != tokenfence_core::GraceReplay::Fork {
            conn.unsettled.retain(|u| u.token == stored.refresh);
            conn.taken_over.retain(|u| u.token == stored.refresh);
        }
        let conn = &self.conns[c];
        let workers = &self.workers;
        let truth = conn.provider.truth(grant, now);
        let s4 = invariants::sound_reauth_within(
            stored,
            profile,
            self.settings.in_doubt_safety,
            &truth,
            ghost_of(workers, conn, c),
        )
        .err();
        let slot_of = |w: u16| {
            workers[usize::from(w)]
                .slots
                .get(c)
                .and_then(|s| s.as_deref())
        };
        let mut resolving = false;
        let mut pending: Vec<&RefreshToken> = Vec::new();
        for slot in conn.busy.iter().filter_map(|w| slot_of(*w)) {
            if matches!(slot.op, Some((_, OpKind::Exchange { lost: false, .. }))) {
                resolving = true;
            }
            if let Some(r) = slot.conn.uncommitted() {
                resolving = true;
                pending.push(&r.refresh);
            }
        }
        let s2 = invariants::no_self_inflicted_loss(
            stored,
            profile,
            resolving,
            pending,
            ghost_of(workers, conn, c),
            &truth,
        )
        .err();
        let s3 = invariants::no_self_inflicted_replay(&truth).err();
        let replayed = conn
            .provider
            .grant(grant)
            .is_some_and(|g| g.ended == Some(GrantEnd::ReuseDetected));
        let detail = if s2.is_some() && !conn.losing {
            super::drive::describe_record(stored)
        } else {
            String::new()
        };
        let conn = &mut self.conns[c];
        let new_loss = s2.is_some() && !conn.losing;
        conn.losing = s2.is_some();
        let new_flag = s4.is_some() && !conn.false_flag;
        conn.false_flag = s4.is_some();
        let new_replay = s3.is_some() && !conn.replay_counted.contains(&grant);
        if new_replay && replayed {
            conn.replay_counted.push(grant);
        }
        if new_loss {
            conn.ever_lost = true;
            self.ledger.lost_by_us += 1;
            let v = s2.map(|v| v.to_string()).unwrap_or_default();
            self.ledger
                .violation("S2", c, now, || format!("{v} (stored {detail})"));
        }
        if new_replay {
            let v = s3.map(|v| v.to_string()).unwrap_or_default();
            self.ledger.violation("S3", c, now, || {
                format!("{v}: the provider revoked the family")
            });
        }
        if new_flag {
            self.ledger.reauth_false += 1;
            let v = s4.map(|v| v.to_string()).unwrap_or_default();
            self.ledger.violation("S4", c, now, || v);
        }
    }

    /// Drops from `busy` the workers whose slot for `c` has neither a request out nor
    /// an uncommitted reply (any more).
    fn prune_busy(&mut self, c: usize) {
        let workers = &self.workers;
        self.conns[c].busy.retain(|w| {
            workers[usize::from(*w)]
                .slots
                .get(c)
                .and_then(|s| s.as_deref())
                .is_some_and(Slot::busy)
        });
    }

    /// L3: in the heal phase, a connection that nothing but faults stopped must give
    /// its caller a token.
    pub(super) fn heal_result(&mut self, c: usize, ok: bool) {
        if ok || self.conns[c].losing {
            return;
        }
        let now = self.now;
        let Some(grant) = self.stored_grant(c) else {
            return;
        };
        let conn = &self.conns[c];
        let Some(stored) = self.store.row(&conn.id).and_then(|r| r.record.as_ref()) else {
            return;
        };
        let truth = conn.provider.truth(grant, now);
        let healthy =
            stored.is_live() && !truth.ended_by_provider() && truth.accepts(&stored.refresh);
        if healthy {
            let detail = super::drive::describe_record(stored);
            self.ledger.violation("L3", c, now, || {
                format!("after the faults healed, a caller got no token (stored {detail})")
            });
        }
    }

    /// L4: `ReconnectSoon` must have been emitted the configured notice before the
    /// hard deadline of `grant`, if the connection is live on that grant.
    pub(super) fn warn_check(&mut self, c: usize, grant: GrantId) {
        if self.stored_grant(c) != Some(grant) {
            return;
        }
        let now = self.now;
        let conn = &self.conns[c];
        let live = self
            .store
            .row(&conn.id)
            .and_then(|r| r.record.as_ref())
            .is_some_and(|r| r.is_live());
        let deadline = conn.provider.grant(grant).and_then(|g| g.hard_deadline);
        let (Some(deadline), true) = (deadline, live) else {
            return;
        };
        if conn.provider.truth(grant, now).ended_by_provider() {
            return;
        }
        let close = |d: Timestamp| {
            d.saturating_since(deadline)
                .max(deadline.saturating_since(d))
                < tokenfence_core::days(1)
        };
        let resume = self.outage_until.saturating_add(self.warn_slack());
        // Counted only here, where the oracle judges: a connection no longer live on
        // this grant, or ended by the provider, is not a miss.
        if conn.warned.iter().any(|(d, _)| close(*d)) {
            self.ledger.hard_deadlines += 1;
            self.ledger.hard_warned += 1;
        } else if self.outage_until > deadline.saturating_sub(self.settings.reconnect_notice)
            && resume > now
        {
            // The store was down after the notice instant: a process that holds no
            // machine for the connection cannot read the record until it is back.
            self.push(resume, Ev::WarnCheck { c, grant });
        } else {
            self.ledger.hard_deadlines += 1;
            self.ledger.violation("L4", c, now, || {
                format!(
                    "no ReconnectSoon {} days before the hard deadline",
                    self.settings.reconnect_notice.as_secs() / 86_400
                )
            });
        }
    }

    /// The end of the run: L1 (every request resolved), L2 (idle connections
    /// survived) and L3 (degraded connections recovered).
    pub(super) fn conclude(&mut self) {
        let now = self.now;
        let mut unresolved = Vec::new();
        for worker in &self.workers {
            for (c, slot) in worker.slots.iter().enumerate() {
                if let Some(slot) = slot.as_deref() {
                    if !slot.callers.is_empty() {
                        unresolved.push((c, slot.callers.len()));
                    }
                }
            }
        }
        for (c, n) in unresolved {
            self.ledger.violation("L1", c, now, || {
                format!("{n} caller(s) never got an answer")
            });
        }
        for c in 0..self.conns.len() {
            let Some(grant) = self.stored_grant(c) else {
                continue;
            };
            let conn = &self.conns[c];
            let Some(stored) = self.store.row(&conn.id).and_then(|r| r.record.as_ref()) else {
                continue;
            };
            let truth = conn.provider.truth(grant, now);
            let g = conn.provider.grant(grant);
            let user_ended = g.is_some_and(|g| g.ended.is_some());
            let hard_ended = g.and_then(|g| g.hard_deadline).is_some_and(|d| now >= d);
            let accepted = truth.accepts(&stored.refresh);
            let live = stored.is_live();
            if conn.workload.usage == Usage::Idle
                && conn.initial_idle_deadline.is_some_and(|d| d < self.end)
                && conn.grant == Some(grant)
                && !user_ended
                && !hard_ended
                && live
                && !conn.losing
            {
                // Judged by L2 below: live, not lost by a counted S2. A connection that
                // ended otherwise is not an idle-expiry miss.
                self.ledger.idle_total += 1;
                if accepted {
                    self.ledger.idle_kept += 1;
                }
            }
            let idle_expired =
                live && !conn.losing && truth.ended_by_provider() && !user_ended && !hard_ended;
            if idle_expired {
                self.ledger.violation("L2", c, now, || {
                    "the stored refresh token expired after its idle window".into()
                });
            }
            let stuck = conn.degraded_at_heal
                && !conn.recovered_in_heal
                && !conn.losing
                && matches!(stored.status, Status::Active | Status::Degraded { .. })
                && !truth.ended_by_provider();
            if stuck {
                self.ledger.violation("L3", c, now, || {
                    "degraded when the faults healed, and no Recovered since".into()
                });
            }
        }
    }

    /// Appends a line to the trace when `c` is the traced connection.
    pub(super) fn note(&mut self, c: usize, line: impl FnOnce() -> String) {
        if self.traced == Some(c) {
            let t = self.now.saturating_since(START).as_millis() as u64;
            let (d, ms) = (t / 86_400_000, t % 86_400_000);
            self.trace_lines.push(format!(
                "d{d:03} {:02}:{:02}:{:02}.{:03}  {}",
                ms / 3_600_000,
                ms / 60_000 % 60,
                ms / 1_000 % 60,
                ms % 1_000,
                line()
            ));
        }
    }
}

/// The ghost of connection `conn` (number `c`): what [`World::ghost`] iterates,
/// from the fields it needs, so a check can hold it beside a borrow of the store.
fn ghost_of<'a>(
    workers: &'a [Worker],
    conn: &'a Conn,
    c: usize,
) -> impl Iterator<Item = &'a Unsettled> {
    let senders = workers.iter().filter_map(move |wk| {
        wk.slots
            .get(c)
            .and_then(|s| s.as_deref())
            .and_then(|s| s.ghost.sender.unsettled())
    });
    conn.unsettled.iter().chain(&conn.taken_over).chain(senders)
}
