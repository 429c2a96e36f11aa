//! The properties of INVARIANTS.md over the model, computed with the predicates of
//! `tokenfence_core::invariants` (the one home of each predicate).

use super::state::{Breach, Seen, State};
use super::{FaultKind, TokenfenceModel};
use crate::provider::GrantTruth;
use stateright::Property;
use tokenfence_core::invariants::{self, ProviderTruth};
use tokenfence_core::RefreshToken;

/// Property names, as printed in reports.
pub mod names {
    /// S1.
    pub const S1: &str = "S1 no stale overwrite";
    /// S2.
    pub const S2: &str = "S2 no self-inflicted loss";
    /// S3.
    pub const S3: &str = "S3 no self-inflicted replay";
    /// S4.
    pub const S4: &str = "S4 sound re-auth";
    /// S5.
    pub const S5: &str = "S5 no stale serve";
    /// S6.
    pub const S6: &str = "S6 keep what the provider did not replace";
    /// S7.
    pub const S7: &str = "S7 right credentials";
    /// S8.
    pub const S8: &str = "S8 one call per rotation while leases hold";
    /// S9.
    pub const S9: &str = "S9 bad input changes nothing";
    /// The driver contract.
    pub const CONTRACT: &str = "driver contract (no input refused)";
    /// L1.
    pub const L1: &str = "L1 every access request resolves";
    /// L5.
    pub const L5: &str = "L5 no storm";
    /// R1.
    pub const R1: &str = "R1 a token the API refused is not served again";
    /// R2.
    pub const R2: &str = "R2 no refresh the stored record did not need";
    /// Vacuity guard.
    pub const V_REFRESH: &str = "guard: a refresh commits";
    /// Vacuity guard.
    pub const V_CONFLICT: &str = "guard: a CAS conflict happens and is resolved";
    /// Vacuity guard.
    pub const V_LOST: &str = "guard: a lost reply is recovered through a grace window";
    /// Vacuity guard.
    pub const V_REVOKE: &str = "guard: a user revocation leads to ReauthRequired";
    /// Vacuity guard.
    pub const V_MISMATCH: &str = "guard: wrong credentials are refused before sending";
}

/// S3 as the model checks it: the provider's truth (a punished replay), plus replays
/// outside grace by workers with no reason to doubt their token.
struct ModelTruth<'a> {
    provider: GrantTruth<'a>,
    race_replay: bool,
}

impl ProviderTruth for ModelTruth<'_> {
    fn accepts(&self, token: &RefreshToken) -> bool {
        self.provider.accepts(token)
    }
    fn ended_by_provider(&self) -> bool {
        self.provider.ended_by_provider()
    }
    fn replayed_outside_grace(&self) -> bool {
        self.race_replay || self.provider.replayed_outside_grace()
    }
    fn successor_lost(&self, token: &RefreshToken) -> bool {
        self.provider.successor_lost(token)
    }
}

fn truth<'a>(m: &TokenfenceModel, s: &'a State) -> GrantTruth<'a> {
    s.provider.truth(m.grant, s.now)
}

fn clean(s: &State, b: Breach) -> bool {
    !s.breaches.contains_key(&b)
}

fn s2(m: &TokenfenceModel, s: &State) -> bool {
    let Some(stored) = s.stored() else {
        return true;
    };
    let resolving = s.workers.iter().any(|w| {
        w.net
            .as_ref()
            .is_some_and(|f| !f.lost && s.now <= f.request.send_deadline)
            || w.conn.uncommitted().is_some()
    });
    let pending = s
        .workers
        .iter()
        .filter_map(|w| w.conn.uncommitted().map(|r| &r.refresh));
    invariants::no_self_inflicted_loss(
        stored,
        &m.spec.profile,
        resolving,
        pending,
        s.may_have_rotated(),
        &truth(m, s),
    )
    .is_ok()
}

fn s3(m: &TokenfenceModel, s: &State) -> bool {
    let t = ModelTruth {
        provider: truth(m, s),
        race_replay: s.breaches.contains_key(&Breach::S3),
    };
    invariants::no_self_inflicted_replay(&t).is_ok()
}

/// S4 from the harness's ghost: what was really sent and never settled, not the
/// doubt the core recorded.
fn s4(m: &TokenfenceModel, s: &State) -> bool {
    let safety = m.configs[0].settings.in_doubt_safety;
    s.stored().is_none_or(|r| {
        invariants::sound_reauth_within(
            r,
            &m.spec.profile,
            safety,
            &truth(m, s),
            s.may_have_rotated(),
        )
        .is_ok()
    })
}

fn s8(_: &TokenfenceModel, s: &State) -> bool {
    let live = |deadline| s.now <= deadline;
    let outstanding = s
        .workers
        .iter()
        .filter(|w| {
            w.net
                .as_ref()
                .is_some_and(|f| !f.lost && live(f.request.send_deadline))
        })
        .count()
        + s.orphans
            .iter()
            .filter(|o| live(o.request.send_deadline))
            .count();
    invariants::single_flight(outstanding, !s.seen.has(Seen::LEASE_BROKEN)).is_ok()
}

fn l1(_: &TokenfenceModel, s: &State) -> bool {
    s.workers
        .iter()
        .all(|w| w.requests_left == 0 && w.conn.waiting() == 0)
}

/// Makes an `always` condition report only the first violating state it sees, so
/// that the path stateright keeps is the first one found (with one BFS thread, a
/// shortest one): stateright replaces a discovery with every later violating state.
macro_rules! first {
    ($name:expr, $check:expr) => {
        |m: &TokenfenceModel, s: &State| m.latch($name, $check(m, s))
    };
}

fn holds_s1(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::S1)
}
fn holds_s5(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::S5)
}
fn holds_s6(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::S6)
}
fn holds_s7(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::S7)
}
fn holds_s9(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::S9)
}
fn holds_contract(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::Contract)
}
fn holds_l5(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::L5)
}
fn holds_r1(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::R1)
}
fn holds_r2(_: &TokenfenceModel, s: &State) -> bool {
    clean(s, Breach::R2)
}

/// A property's condition.
pub type Condition = fn(&TokenfenceModel, &State) -> bool;

/// The safety properties (`always`) as pure conditions, for traces and replays.
pub fn safety() -> Vec<(&'static str, Condition)> {
    use names::*;
    vec![
        (S1, holds_s1),
        (S2, s2),
        (S3, s3),
        (S4, s4),
        (S5, holds_s5),
        (S6, holds_s6),
        (S7, holds_s7),
        (S8, s8),
        (S9, holds_s9),
        (CONTRACT, holds_contract),
        (L5, holds_l5),
        (R1, holds_r1),
        (R2, holds_r2),
    ]
}

/// The properties of a model, with the guards that its configuration can reach.
pub fn properties(m: &TokenfenceModel) -> Vec<Property<TokenfenceModel>> {
    use names::*;
    let mut p = vec![
        Property::always(S1, first!(S1, holds_s1)),
        Property::always(S2, first!(S2, s2)),
        Property::always(S3, first!(S3, s3)),
        Property::always(S4, first!(S4, s4)),
        Property::always(S5, first!(S5, holds_s5)),
        Property::always(S6, first!(S6, holds_s6)),
        Property::always(S7, first!(S7, holds_s7)),
        Property::always(S8, first!(S8, s8)),
        Property::always(S9, first!(S9, holds_s9)),
        Property::always(CONTRACT, first!(CONTRACT, holds_contract)),
        Property::always(L5, first!(L5, holds_l5)),
        Property::always(R1, first!(R1, holds_r1)),
        Property::always(R2, first!(R2, holds_r2)),
        Property::eventually(L1, l1),
        Property::sometimes(V_REFRESH, |_: &TokenfenceModel, s: &State| {
            s.seen.has(Seen::REFRESH_COMMITTED)
        }),
    ];
    let cfg = &m.cfg;
    if cfg.workers >= 2 && cfg.max_ticks >= 1 {
        p.push(Property::sometimes(
            V_CONFLICT,
            |_: &TokenfenceModel, s: &State| s.seen.has(Seen::CONFLICT_RESOLVED),
        ));
    }
    let grace = !m.spec.profile.rotation.grace.is_zero();
    if grace
        && (cfg.allows(FaultKind::LostReply) || cfg.allows(FaultKind::Garbled))
        && cfg.max_faults > 0
    {
        p.push(Property::sometimes(
            V_LOST,
            |_: &TokenfenceModel, s: &State| s.seen.has(Seen::LOST_RECOVERED),
        ));
    }
    if cfg.allows(FaultKind::Revoke) && cfg.max_faults > 0 {
        p.push(Property::sometimes(
            V_REVOKE,
            |_: &TokenfenceModel, s: &State| s.seen.has(Seen::REVOKE_REAUTH),
        ));
    }
    if cfg.allows(FaultKind::WrongClient) {
        p.push(Property::sometimes(
            V_MISMATCH,
            |_: &TokenfenceModel, s: &State| s.seen.has(Seen::MISMATCH_REFUSED),
        ));
    }
    p
}
