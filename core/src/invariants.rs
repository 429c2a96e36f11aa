//! The safety properties of INVARIANTS.md as pure functions: the one home of each
//! predicate. Property tests, fuzz targets, the model checker and the simulator all
//! call these; none re-states them.
//!
//! What only the provider knows (which tokens it accepts, whether it ended the grant
//! itself) comes through [`ProviderTruth`], implemented by each harness's provider
//! model from its ghost state.

use crate::machine::Config;
use crate::profile::{InDoubtRecovery, ProviderProfile};
use crate::record::{ConnectionRecord, Generation, Lease, ReauthReason, Status};
use crate::reply::TokenGrant;
use crate::secret::{AccessToken, RefreshToken};
use crate::time::Timestamp;
use core::time::Duration;

/// What the provider model knows and the client does not (ghost state).
pub trait ProviderTruth {
    /// Whether the provider would accept `token` in a refresh now.
    fn accepts(&self, token: &RefreshToken) -> bool;
    /// Whether the provider itself ended the grant: the user disconnected the app
    /// at the provider, or the idle or hard deadline passed.
    fn ended_by_provider(&self) -> bool;
    /// Whether a client presented a rotated-away token outside its grace window
    /// (a replay that a reuse-detecting provider punishes).
    fn replayed_outside_grace(&self) -> bool;
    /// Whether the provider issued a successor of `token` in a reply that no live
    /// worker received (lost on the wire, or its receiver crashed).
    fn successor_lost(&self, token: &RefreshToken) -> bool;
}

/// A broken invariant, named after INVARIANTS.md.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Violation {
    /// S1: a commit landed on a generation other than the one it was derived from.
    #[error("S1 stale overwrite: commit derived from {base:?} landed on stored {stored:?}")]
    StaleOverwrite {
        /// Generation the write was derived from.
        base: Option<Generation>,
        /// Generation stored when it landed.
        stored: Option<Generation>,
    },
    /// S1: the stored generation went down.
    #[error("S1 generation decreased from {before} to {after}")]
    GenerationDecreased {
        /// Before.
        before: Generation,
        /// After.
        after: Generation,
    },
    /// S2: the stored refresh token is dead and nobody holds its live successor.
    #[error("S2 self-inflicted loss: the stored refresh token is rejected and no worker holds a live one")]
    SelfInflictedLoss,
    /// S3: we replayed a rotated-away token outside its grace window.
    #[error("S3 self-inflicted replay of a rotated-away refresh token")]
    SelfInflictedReplay,
    /// S4: re-auth flagged while the provider accepts the stored token, or a lost
    /// rotation declared although no request presenting it may have been processed.
    #[error(
        "S4 unsound re-auth ({reason:?}): the provider still accepts the stored refresh token, or no request presenting it may have been processed unseen"
    )]
    UnsoundReauth {
        /// The reason given.
        reason: ReauthReason,
    },
    /// S5: an access token served too close to (or past) its expiry, or older than
    /// one already seen.
    #[error("S5 stale serve: token of {served} (expires {expires_at}) served at {now} after seeing {newest}")]
    StaleServe {
        /// Generation of the served token.
        served: Generation,
        /// Its expiry.
        expires_at: Timestamp,
        /// When it was served.
        now: Timestamp,
        /// Newest generation the worker had seen.
        newest: Generation,
    },
    /// S6: a refresh token dropped although the provider did not replace it.
    #[error("S6 the stored refresh token was dropped by a reply that did not replace it")]
    DroppedRefreshToken,
    /// S6: an access token without a lifetime was kept longer than the default.
    #[error("S6 an access token without expires_in was given more than the profile default")]
    UnboundedAccessLifetime,
    /// S7: a request with credentials of another identity.
    #[error("S7 refresh sent with credentials of another identity")]
    WrongCredentials,
    /// S8: two refreshes in flight for one connection while leases were honoured.
    #[error("S8 {outstanding} refresh requests in flight while leases were honoured")]
    DuplicateRefresh {
        /// Requests in flight.
        outstanding: usize,
    },
    /// S9: bad input changed the stored record.
    #[error("S9 a rejected input changed the record")]
    BadInputChangedRecord,
    /// R1: an access token a caller reported refused by the API was served again
    /// by the same worker.
    #[error("R1 an access token reported refused by the API was served again")]
    RefusedServed,
    /// R2: a refresh request was sent although the stored record needed none.
    #[error("R2 unprovoked refresh: the stored access token was valid, not reported refused, and nothing else was due")]
    UnprovokedRefresh,
}

/// S1: a commit derived from `base` may land only where `stored` is that generation.
pub fn commit_on_current(
    base: Option<Generation>,
    stored: Option<Generation>,
) -> Result<(), Violation> {
    if base == stored {
        Ok(())
    } else {
        Err(Violation::StaleOverwrite { base, stored })
    }
}

/// S1: the stored generation never decreases.
pub fn generation_monotonic(before: Generation, after: Generation) -> Result<(), Violation> {
    if after >= before {
        Ok(())
    } else {
        Err(Violation::GenerationDecreased { before, after })
    }
}

/// S2: unless the provider ended the grant, the stored refresh token is accepted, or
/// a worker is resolving a refresh (`resolving`: a request outstanding or fresh tokens
/// not yet committed, with `pending` the refresh tokens those workers hold), or the
/// record says explicitly that the rotation was lost, or a fault took the successor
/// where INVARIANTS.md allows it: a provider with no grace window (the machine ends
/// in an explicit `LostRotation` when it next tries). Under a grace window a fault's
/// loss is excused only while it is known: the record carries the doubt (the
/// machine recovers inside the window or declares the loss), or the harness's ghost
/// (`unsettled`, never the core's word) holds a request presenting the stored token
/// with nothing committed since it was sent (a pause or crash before anyone who
/// knew of it could write the doubt). A record without a doubt whose successor is
/// gone under a grace window, committed after the request that lost it, is a
/// dropped doubt: a violation.
pub fn no_self_inflicted_loss<'a, 'u>(
    stored: &ConnectionRecord,
    profile: &ProviderProfile,
    resolving: bool,
    pending: impl IntoIterator<Item = &'a RefreshToken>,
    unsettled: impl IntoIterator<Item = &'u Unsettled>,
    truth: &impl ProviderTruth,
) -> Result<(), Violation> {
    let explicit = matches!(
        stored.status,
        Status::Disconnected { .. }
            | Status::ReauthRequired {
                reason: ReauthReason::LostRotation,
                ..
            }
    );
    let lost_to_fault = truth.successor_lost(&stored.refresh)
        && (profile.rotation.grace.is_zero()
            || stored.in_doubt_since.is_some()
            || unsettled
                .into_iter()
                .any(|u| u.token == stored.refresh && u.generation == Some(stored.generation)));
    if truth.ended_by_provider()
        || explicit
        || resolving
        || lost_to_fault
        || truth.accepts(&stored.refresh)
        || pending.into_iter().any(|t| truth.accepts(t))
    {
        Ok(())
    } else {
        Err(Violation::SelfInflictedLoss)
    }
}

/// S3: no rotated-away token presented outside its grace window.
pub fn no_self_inflicted_replay(truth: &impl ProviderTruth) -> Result<(), Violation> {
    if truth.replayed_outside_grace() {
        Err(Violation::SelfInflictedReplay)
    } else {
        Ok(())
    }
}

/// A refresh request that the harness saw leave a worker, presenting `token` under a
/// lease granted at `lease_at`, whose outcome has not reached the store: it may
/// still be processed, or the provider processed it and the reply was never seen
/// (lost, unreadable, a gateway timeout, its receiver crashed), or its sender saw
/// the outcome and has not committed it yet. Ghost state the harness owns (what was
/// really sent, what was really answered), never the record the core wrote.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unsettled {
    /// The refresh token the request presented.
    pub token: RefreshToken,
    /// When the store granted the lease it was sent under (the earliest instant the
    /// provider could have processed it).
    pub lease_at: Timestamp,
    /// The generation stored when it was sent (as the harness's store held it):
    /// while it is still the stored one, nothing was committed since, so nobody
    /// who knew of the request could have recorded its doubt yet.
    pub generation: Option<Generation>,
}

impl Unsettled {
    /// A lease of another worker (or of an earlier incarnation) taken over by a
    /// grant that read `record`: with nothing committed since that lease was
    /// granted, whoever takes it over cannot know whether a request presenting
    /// the stored token was sent under it (a pause, a lost answer, a crash), so it
    /// counts as one for S4. So does a lease granted after the stored tokens
    /// were obtained (an active record refreshed before the grant, or of unknown
    /// age received before the lease ended, or within `late` after it, the time a
    /// request sent under it may still be processed): its holder may have
    /// presented that very token, or superseded it. The harness decides whose
    /// lease it was: a worker's own earlier grant never counts.
    pub fn taken_over(
        lease: &Lease,
        record: Option<&ConnectionRecord>,
        late: Duration,
    ) -> Option<Unsettled> {
        let record = record?;
        let older_tokens = record.status == Status::Active
            && match record.last_refreshed_at {
                Some(t) => t < lease.acquired_at,
                None => record.refresh_issued_at < lease.expires_at.saturating_add(late),
            };
        (lease.generation == Some(record.generation) || older_tokens).then(|| Unsettled {
            token: record.refresh.clone(),
            lease_at: lease.acquired_at,
            generation: Some(record.generation),
        })
    }
}

/// Adds `u`, if any, to a harness's list of unsettled requests, once, keeping the
/// list in order (so that equal ghost states compare and hash alike).
pub fn keep_unsettled(list: &mut alloc::vec::Vec<Unsettled>, u: Option<Unsettled>) {
    if let Some(u) = u {
        if let Err(at) = list.binary_search(&u) {
            list.insert(at, u);
        }
    }
}

/// One worker's refresh request as its harness tracks it for S4: sent, then
/// answered (or not), then settled once the worker's next commit lands or the
/// worker has nothing left to do. A request whose reply the worker never saw, or
/// whose worker crashed before committing what it learnt, never settles: the
/// harness keeps it at connection level ([`Unsettled`]), handed back by the methods
/// below.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SenderGhost {
    sent: Option<Unsettled>,
}

impl SenderGhost {
    /// The worker sent a refresh presenting `token` under a lease granted at
    /// `lease_at`, with generation `generation` stored. An earlier request of this
    /// worker whose outcome it never committed is handed back.
    pub fn sent(
        &mut self,
        token: RefreshToken,
        lease_at: Timestamp,
        generation: Option<Generation>,
    ) -> Option<Unsettled> {
        self.sent.replace(Unsettled {
            token,
            lease_at,
            generation,
        })
    }

    /// The worker got its answer: `seen` when it learnt the outcome for certain (a
    /// complete reply the provider produced, or the request was certainly not
    /// sent). An unseen outcome is handed back: it never settles.
    pub fn answered(&mut self, seen: bool) -> Option<Unsettled> {
        if seen {
            None
        } else {
            self.sent.take()
        }
    }

    /// The worker's next commit landed, or it has nothing left to do: what it
    /// learnt is in the store or superseded.
    pub fn settle(&mut self) {
        self.sent = None;
    }

    /// The worker crashed: an outcome it had not committed is handed back.
    pub fn crashed(&mut self) -> Option<Unsettled> {
        self.sent.take()
    }

    /// The request not yet settled, if any.
    pub fn unsettled(&self) -> Option<&Unsettled> {
        self.sent.as_ref()
    }
}

/// S4: `ReauthRequired` only when the provider really no longer accepts the stored
/// token (`InvalidGrant`, `IdleExpired`, `HardExpired`), or, for `LostRotation`,
/// when a request presenting the stored token may really have been processed by the
/// provider without its outcome reaching the store (`unsettled`, the harness's
/// ghost) and the profile allows no recovery for it any more. The record's own
/// `in_doubt_since` is not consulted: the core wrote it.
pub fn sound_reauth<'a>(
    stored: &ConnectionRecord,
    profile: &ProviderProfile,
    truth: &impl ProviderTruth,
    unsettled: impl IntoIterator<Item = &'a Unsettled>,
) -> Result<(), Violation> {
    sound_reauth_within(stored, profile, Duration::ZERO, truth, unsettled)
}

/// S4 with the margin the machine keeps from a grace window before presenting a
/// token that may have been rotated (`Settings::in_doubt_safety`, for clock skew):
/// a rotation declared lost inside that margin is sound, because presenting the
/// token could have been a replay outside the window as the provider's clock sees
/// it (found by the simulator: a takeover 8 minutes into Atlassian's 10-minute
/// grace, with a 2-minute margin).
pub fn sound_reauth_within<'a>(
    stored: &ConnectionRecord,
    profile: &ProviderProfile,
    safety: Duration,
    truth: &impl ProviderTruth,
    unsettled: impl IntoIterator<Item = &'a Unsettled>,
) -> Result<(), Violation> {
    let Status::ReauthRequired { reason, since } = stored.status else {
        return Ok(());
    };
    let justified = if truth.ended_by_provider() {
        true
    } else if reason == ReauthReason::LostRotation {
        // Under a provider that forks on replays, presenting an earlier token of
        // the family mints a sibling and demotes the stored one (found by the
        // model checker once S4 stopped reading the record's doubt).
        let fork = profile.rotation.grace_replay == crate::profile::GraceReplay::Fork;
        unsettled.into_iter().any(|u| {
            (u.token == stored.refresh || fork)
                && profile
                    .rotation
                    .in_doubt_recovery(u.lease_at, since, safety)
                    != InDoubtRecovery::PresentAgain
        })
    } else {
        !truth.accepts(&stored.refresh)
    };
    if justified {
        Ok(())
    } else {
        Err(Violation::UnsoundReauth { reason })
    }
}

/// S5: a token of generation `served` expiring at `expires_at` may be handed out at
/// `now` only before its expiry minus `margin`, and only if no newer generation
/// (`newest`) has been seen by the worker.
pub fn fresh_serve(
    served: Generation,
    expires_at: Timestamp,
    now: Timestamp,
    margin: Duration,
    newest: Generation,
) -> Result<(), Violation> {
    if expires_at > now.saturating_add(margin) && served >= newest {
        Ok(())
    } else {
        Err(Violation::StaleServe {
            served,
            expires_at,
            now,
            newest,
        })
    }
}

/// S6: after applying `grant` (sent at `sent_at`) to `before`, `after` keeps the
/// refresh token unless replaced, and bounds an unstated access lifetime by the
/// profile default.
pub fn keeps_what_was_not_replaced(
    before: &ConnectionRecord,
    grant: &TokenGrant,
    after: &ConnectionRecord,
    profile: &ProviderProfile,
    sent_at: Timestamp,
) -> Result<(), Violation> {
    if grant.refresh.is_none() && after.refresh != before.refresh {
        return Err(Violation::DroppedRefreshToken);
    }
    let bound = sent_at.saturating_add(profile.default_access_ttl);
    match &after.access {
        Some(a) if grant.expires_in.is_none() && a.expires_at > bound => {
            Err(Violation::UnboundedAccessLifetime)
        }
        None => Err(Violation::UnboundedAccessLifetime),
        Some(_) => Ok(()),
    }
}

/// S7: `config` may send a refresh for `record` only if the identities match.
pub fn right_credentials(config: &Config, record: &ConnectionRecord) -> Result<(), Violation> {
    match config.identity_mismatch(&record.identity) {
        None => Ok(()),
        Some(_) => Err(Violation::WrongCredentials),
    }
}

/// S8: while leases are honoured, at most one refresh request per connection is
/// in flight.
pub fn single_flight(outstanding: usize, leases_honoured: bool) -> Result<(), Violation> {
    if outstanding <= 1 || !leases_honoured {
        Ok(())
    } else {
        Err(Violation::DuplicateRefresh { outstanding })
    }
}

/// S9: a rejected input leaves the record as it was.
pub fn unchanged_by_bad_input(
    before: Option<&ConnectionRecord>,
    after: Option<&ConnectionRecord>,
) -> Result<(), Violation> {
    if before == after {
        Ok(())
    } else {
        Err(Violation::BadInputChangedRecord)
    }
}

/// R1: a worker never hands out an access token one of its callers reported
/// refused by the API (`Input::Rejected`) after it was reported, unless a refresh
/// sent after the report issued it anew (harnesses whose providers never issue a
/// token twice pass `reissued: false`).
pub fn refused_not_served<'a>(
    served: &AccessToken,
    refused: impl IntoIterator<Item = &'a AccessToken>,
    reissued: bool,
) -> Result<(), Violation> {
    if reissued || !refused.into_iter().any(|r| r == served) {
        Ok(())
    } else {
        Err(Violation::RefusedServed)
    }
}

/// R2: a refresh request is sent at `now` only when the record `stored` then
/// needs one: its access token is missing, within `margin` of its expiry (the
/// harness's own margin for the lifetime it granted), or reported refused by
/// the API (`refused`); keep-alive is due (`lead` before the idle deadline); a
/// refresh is in doubt (recorded, or `doubt`: the harness's ghost knows a request
/// presenting the stored token whose outcome nobody saw, or a lease taken over
/// under which one may have been sent); or the connection is not plainly active
/// (a degraded connection's retry). A late 401 about an older token, or a second report of
/// one already replaced, therefore sends nothing: at most one refresh per
/// distinct refused token. Harnesses exempt sends they know another reason for
/// (a paused worker, a lease request whose answer was lost).
pub fn refresh_needed(
    stored: &ConnectionRecord,
    now: Timestamp,
    margin: Duration,
    lead: Duration,
    doubt: bool,
    refused: impl Fn(&AccessToken) -> bool,
) -> Result<(), Violation> {
    let expiring = stored
        .access
        .as_ref()
        .is_none_or(|a| now.saturating_add(margin) >= a.expires_at || refused(&a.token));
    let keepalive = stored
        .idle_deadline
        .is_some_and(|d| now >= d.saturating_sub(lead));
    let pending = doubt || stored.in_doubt_since.is_some() || stored.status != Status::Active;
    if expiring || keepalive || pending {
        Ok(())
    } else {
        Err(Violation::UnprovokedRefresh)
    }
}
