//! The small provider model used by the property tests: rotation per policy, a
//! grace window for the previous token, reuse detection, user revocation, and the
//! ghost state the invariant predicates ask about.

use std::collections::BTreeSet;
use tokenfence_core::invariants::ProviderTruth;
use tokenfence_core::*;

pub struct MiniProvider {
    pub policy: RotationPolicy,
    next: u32,
    current: String,
    current_issued: Timestamp,
    previous: Option<(String, Timestamp)>,
    issued: BTreeSet<String>,
    /// Tokens whose successor was issued in a reply nobody received.
    lost: BTreeSet<String>,
    pub revoked_by_user: bool,
    pub family_revoked: bool,
    pub replayed: bool,
    pub calls: u32,
    now: Timestamp,
}

impl MiniProvider {
    pub fn new(policy: RotationPolicy, initial: &str, now: Timestamp) -> Self {
        MiniProvider {
            policy,
            next: 1,
            current: initial.into(),
            current_issued: now,
            previous: None,
            issued: BTreeSet::from([initial.to_string()]),
            lost: BTreeSet::new(),
            revoked_by_user: false,
            family_revoked: false,
            replayed: false,
            calls: 0,
            now,
        }
    }

    pub fn set_now(&mut self, now: Timestamp) {
        self.now = now;
    }

    fn in_grace(&self, token: &str) -> bool {
        self.previous.as_ref().is_some_and(|(t, retired)| {
            t == token && self.now < retired.saturating_add(self.policy.grace)
        })
    }

    /// Answers a refresh request as the provider would.
    pub fn answer(&mut self, request: &HttpRequest) -> HttpResponse {
        self.calls += 1;
        let presented = form_urlencoded::parse(request.body.expose().as_bytes())
            .find(|(k, _)| k == "refresh_token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        if self.revoked_by_user || self.family_revoked {
            return super::invalid_grant();
        }
        if presented == self.current {
            let rotate = match self.policy.rotation {
                Rotation::Never => false,
                Rotation::EveryRefresh => true,
                Rotation::Periodic { period } => {
                    self.now >= self.current_issued.saturating_add(period)
                }
            };
            if rotate {
                self.next += 1;
                let fresh = format!("RT-{}", self.next);
                let old = std::mem::replace(&mut self.current, fresh.clone());
                self.previous = Some((old, self.now));
                self.current_issued = self.now;
                self.issued.insert(fresh);
            }
        } else if self.in_grace(&presented) {
            // Idempotent replay inside the grace window: the same successor.
        } else {
            if self.issued.contains(&presented) && self.policy.reuse_detection {
                self.replayed = true;
                self.family_revoked = true;
            }
            return super::invalid_grant();
        }
        self.next += 1;
        let access = format!("AT-{}", self.next);
        super::granted(&access, Some(&self.current.clone()))
    }

    /// The reply to a request carrying `presented` was processed and lost.
    pub fn lost_reply(&mut self, request: &HttpRequest) {
        let presented = form_urlencoded::parse(request.body.expose().as_bytes())
            .find(|(k, _)| k == "refresh_token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        self.lost_successor(&presented);
    }

    /// The successor of `presented` died with the worker that received it.
    pub fn lost_successor(&mut self, presented: &str) {
        if presented != self.current {
            self.lost.insert(presented.to_string());
        }
    }

    pub fn lost_any(&self) -> bool {
        !self.lost.is_empty()
    }
}

impl ProviderTruth for MiniProvider {
    fn accepts(&self, token: &RefreshToken) -> bool {
        !self.revoked_by_user
            && !self.family_revoked
            && (token.expose() == self.current || self.in_grace(token.expose()))
    }

    fn ended_by_provider(&self) -> bool {
        self.revoked_by_user
    }

    fn replayed_outside_grace(&self) -> bool {
        self.replayed
    }

    fn successor_lost(&self, token: &RefreshToken) -> bool {
        self.lost.contains(token.expose())
    }
}
