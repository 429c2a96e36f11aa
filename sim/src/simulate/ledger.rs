//! What one strategy's run counted: metrics, invariant violations (with the first
//! examples), acquire latencies and the running trace hash.

use super::world::Ev;
use crate::strategy::Strategy;
use serde::Serialize;
use std::collections::BTreeMap;
use tokenfence_core::Timestamp;

/// One broken invariant, as first seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The invariant (S1–S9, L1–L5, or the driver contract).
    pub invariant: &'static str,
    /// The connection (index; its id is `realm-{index+1:06}`).
    pub connection: usize,
    /// Virtual time since the start, in milliseconds.
    pub at_ms: u64,
    /// What happened, in words (carries no secret: the sim's tokens are fake).
    pub detail: String,
}

/// Acquire latencies in virtual milliseconds, in log-linear buckets (~1.5 %).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Latencies {
    buckets: BTreeMap<u32, u64>,
    max: u64,
    count: u64,
}

impl Latencies {
    /// Records one latency.
    pub fn record(&mut self, ms: u64) {
        *self.buckets.entry(bucket(ms)).or_default() += 1;
        self.max = self.max.max(ms);
        self.count += 1;
    }

    /// The `q` quantile (upper edge of its bucket), in milliseconds.
    pub fn quantile(&self, q: f64) -> u64 {
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return upper(*b).min(self.max);
            }
        }
        self.max
    }

    /// The largest latency.
    pub fn max(&self) -> u64 {
        self.max
    }
}

fn bucket(ms: u64) -> u32 {
    if ms < 64 {
        return ms as u32;
    }
    let exp = 63 - ms.leading_zeros();
    let mantissa = (ms >> (exp - 6)) & 63;
    64 + (exp - 6) * 64 + mantissa as u32
}

fn upper(b: u32) -> u64 {
    if b < 64 {
        return u64::from(b);
    }
    let exp = (b - 64) / 64 + 6;
    let mantissa = u64::from((b - 64) % 64);
    ((64 + mantissa + 1) << (exp - 6)) - 1
}

/// Counters of one run.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub(super) strategy: Option<Strategy>,
    pub(super) events: u64,
    hash: u64,
    pub(super) violations: BTreeMap<&'static str, u64>,
    pub(super) examples: Vec<Violation>,
    pub(super) latency: Latencies,
    pub(super) requests: u64,
    pub(super) served: u64,
    pub(super) answered_transient: u64,
    pub(super) answered_dead: u64,
    pub(super) answered_config: u64,
    pub(super) aborted_by_crash: u64,
    pub(super) sends: u64,
    pub(super) refresh_calls: u64,
    pub(super) rotations: u64,
    pub(super) invalid_grant: BTreeMap<&'static str, u64>,
    pub(super) in_doubt_probes: u64,
    pub(super) lost_by_us: u64,
    pub(super) lost_rotation_justified: u64,
    pub(super) lost_rotation_false: u64,
    pub(super) reauth_correct: u64,
    pub(super) reauth_false: u64,
    pub(super) stale_overwrites: u64,
    pub(super) conflicts: u64,
    pub(super) duplicate_calls: u64,
    pub(super) calls_to_dead: u64,
    pub(super) idle_total: u64,
    pub(super) idle_kept: u64,
    pub(super) hard_deadlines: u64,
    pub(super) hard_warned: u64,
    pub(super) refreshed: u64,
    pub(super) degraded: u64,
    pub(super) recovered: u64,
    pub(super) maintains: u64,
    pub(super) authorizations: u64,
    pub(super) user_revocations: u64,
    pub(super) crashes: u64,
    pub(super) pauses: u64,
    pub(super) outages: u64,
    pub(super) store_failures: u64,
    pub(super) lost_replies: u64,
    /// Events by kind (see `hash_event`).
    pub(super) by_kind: [u64; 18],
    /// Store commands carried out: loads, lease requests, writes.
    pub(super) store_commands: [u64; 3],
}

impl Ledger {
    /// An empty ledger for `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        Ledger {
            strategy: Some(strategy),
            hash: 0xcbf2_9ce4_8422_2325,
            ..Ledger::default()
        }
    }

    /// Records a broken invariant; the first few of each kind keep their story.
    pub fn violation(
        &mut self,
        invariant: &'static str,
        connection: usize,
        at: Timestamp,
        detail: impl FnOnce() -> String,
    ) {
        let n = self.violations.entry(invariant).or_default();
        *n += 1;
        if *n <= 3 && self.examples.len() < 24 {
            self.examples.push(Violation {
                invariant,
                connection,
                at_ms: at
                    .as_millis()
                    .saturating_sub(super::world::START.as_millis()),
                detail: detail(),
            });
        }
    }

    /// Total violations.
    pub fn total_violations(&self) -> u64 {
        self.violations.values().sum()
    }

    /// Folds `value` into the running trace hash.
    pub fn mix(&mut self, value: u64) {
        let mut z = (self.hash ^ value).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        self.hash = z ^ (z >> 31);
    }

    /// Folds one event (its instant, kind and addressees) into the trace hash.
    pub(super) fn hash_event(&mut self, at: Timestamp, ev: &Ev) {
        let (kind, a, b) = match ev {
            Ev::Arrival(c) => (1, *c, 0),
            Ev::Access { w, c, .. } => (2, *w, *c),
            Ev::Store { w, c, .. } => (3, *w, *c),
            Ev::Arrive { w, c, .. } => (4, *w, *c),
            Ev::Feed { w, c, .. } => (5, *w, *c),
            Ev::Deadline { w, c, .. } => (6, *w, *c),
            Ev::Timer { w, c, .. } => (7, *w, *c),
            Ev::Scan(p) => (8, *p, 0),
            Ev::Crash(p) => (9, *p, 0),
            Ev::Restart(p) => (10, *p, 0),
            Ev::Pause(w) => (11, *w, 0),
            Ev::Outage => (12, 0, 0),
            Ev::Revoke(c) => (13, *c, 0),
            Ev::Authorize(c) => (14, *c, 0),
            Ev::WarnCheck { c, .. } => (15, *c, 0),
            Ev::Heal => (16, 0, 0),
            Ev::Reply { w, c, .. } => (17, *w, *c),
        };
        self.by_kind[kind as usize] += 1;
        self.mix(at.as_millis());
        self.mix(kind | ((a as u64) << 8) | ((b as u64) << 32));
    }

    /// The trace hash so far, as 16 hex digits.
    pub fn trace_hash(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_are_close_and_bounded() {
        let mut l = Latencies::default();
        for ms in 1..=10_000 {
            l.record(ms);
        }
        let p50 = l.quantile(0.5);
        assert!((4_900..=5_200).contains(&p50), "{p50}");
        assert!(l.quantile(0.99) >= 9_800);
        assert_eq!(l.max(), 10_000);
        assert!(l.quantile(1.0) <= 10_000);
    }
}
