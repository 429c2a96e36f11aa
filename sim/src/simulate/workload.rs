//! How a fleet of connections is used: scheduled syncs, webhooks, "sync now" clicks,
//! connections that sit idle for months, and churn. Each connection draws from its
//! own RNG stream, so the traffic of a seed is the same whatever the strategy does.

use super::options::{log_uniform, unit, STREAM_WORKLOAD};
use core::time::Duration;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use serde::Serialize;
use tokenfence_core::{days, hours, Timestamp};

/// How a connection is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Usage {
    /// Synced every few hours to days, with webhooks.
    Active,
    /// Synced every few days to weeks.
    Occasional,
    /// Nobody asks for a token for the whole run: only keep-alive can save it.
    Idle,
}

/// Why a caller asks for a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// A scheduled sync.
    Sync,
    /// A webhook from the provider (several may arrive at once on several workers).
    Webhook,
    /// A user clicked "sync now".
    Click,
    /// An API call answered 401 and the caller asks again.
    Retry401,
    /// The heal phase asks every connection once.
    Heal,
}

/// What happens next to a connection, from its workload stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// `count` callers ask at once (on different workers when `count > 1`).
    Access {
        /// Why.
        trigger: Trigger,
        /// How many callers.
        count: u32,
    },
    /// The user disconnects the connection through the app.
    Disconnect,
}

/// One connection's traffic generator.
#[derive(Clone, Debug)]
pub struct Workload {
    rng: ChaCha8Rng,
    /// How the connection is used.
    pub usage: Usage,
    sync_every: Duration,
    webhooks_per_day: f64,
    herd_per_day: f64,
    clicks_per_day: f64,
    disconnect_at: Option<Timestamp>,
}

/// Share of connections the app disconnects in a year.
const DISCONNECTS_PER_YEAR: f64 = 0.02;

impl Workload {
    /// The generator of connection `index` under `seed`; `herd_per_day` is the rate
    /// of request bursts (the `herd` fault).
    pub fn new(seed: u64, index: usize, herd_per_day: f64, start: Timestamp) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(STREAM_WORKLOAD + index as u64);
        let roll = unit(&mut rng);
        let usage = if roll < 0.45 {
            Usage::Active
        } else if roll < 0.8 {
            Usage::Occasional
        } else {
            Usage::Idle
        };
        let (sync, webhooks) = match usage {
            Usage::Active => (log_uniform(&mut rng, (12.0, 72.0)), unit(&mut rng) * 0.6),
            Usage::Occasional => (log_uniform(&mut rng, (72.0, 720.0)), 0.0),
            Usage::Idle => (0.0, 0.0),
        };
        let disconnect_at = (usage != Usage::Idle && unit(&mut rng) < DISCONNECTS_PER_YEAR)
            .then(|| start.saturating_add(secs_f64(unit(&mut rng) * 365.0 * 86_400.0)));
        Workload {
            rng,
            usage,
            sync_every: secs_f64(sync * 3_600.0),
            webhooks_per_day: webhooks,
            herd_per_day: if usage == Usage::Idle {
                0.0
            } else {
                herd_per_day
            },
            clicks_per_day: if usage == Usage::Idle { 0.0 } else { 0.01 },
            disconnect_at,
        }
    }

    /// The next arrival after `now`, if any before `end`.
    pub fn next(&mut self, now: Timestamp, end: Timestamp) -> Option<(Timestamp, Arrival)> {
        let mut best: Option<(Timestamp, Arrival)> = None;
        let mut consider = |at: Timestamp, arrival| {
            if at < end && best.is_none_or(|(b, _)| at < b) {
                best = Some((at, arrival));
            }
        };
        if !self.sync_every.is_zero() {
            // Scheduled syncs: the interval with ±20 % jitter.
            let jitter = 0.8 + 0.4 * unit(&mut self.rng);
            let at = now.saturating_add(self.sync_every.mul_f64(jitter));
            consider(at, access(Trigger::Sync, 1));
        }
        for (rate, trigger) in [
            (self.webhooks_per_day, Trigger::Webhook),
            (self.herd_per_day, Trigger::Webhook),
            (self.clicks_per_day, Trigger::Click),
        ] {
            if rate > 0.0 {
                let gap = -(1.0 - unit(&mut self.rng)).ln() / rate * 86_400.0;
                let count = if trigger == Trigger::Webhook && rate == self.herd_per_day {
                    2 + (unit(&mut self.rng) * 4.0) as u32
                } else {
                    1
                };
                consider(now.saturating_add(secs_f64(gap)), access(trigger, count));
            }
        }
        if let Some(at) = self.disconnect_at.filter(|t| *t > now) {
            if best.is_none_or(|(b, _)| at <= b) && at < end {
                self.disconnect_at = None;
                return Some((at, Arrival::Disconnect));
            }
        }
        best
    }

    /// A draw in `[0, 1)` from this connection's stream.
    pub fn roll(&mut self) -> f64 {
        unit(&mut self.rng)
    }

    /// When the connection was authorized and last refreshed before the run, as
    /// ages before `start`: its age is below `lifetime`, its last refresh inside
    /// 90 % of the idle window (some are close to their idle deadline).
    pub fn history(
        &mut self,
        lifetime: Option<Duration>,
        idle: Option<Duration>,
    ) -> (Duration, Duration) {
        let age_span = lifetime.unwrap_or(days(730)).as_secs_f64();
        let age = secs_f64(unit(&mut self.rng) * age_span * 0.999).max(hours(2));
        let idle_span = idle.unwrap_or(days(30)).as_secs_f64() * 0.9;
        let last = secs_f64(unit(&mut self.rng) * idle_span).min(age.saturating_sub(hours(1)));
        (age, last)
    }
}

fn access(trigger: Trigger, count: u32) -> Arrival {
    Arrival::Access { trigger, count }
}

fn secs_f64(s: f64) -> Duration {
    Duration::from_millis((s.max(0.0) * 1_000.0) as u64)
}
