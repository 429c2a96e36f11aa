//! Margins, lease and retry settings, with defaults chosen for Intuit.

use crate::time::{days, minutes};
use core::time::Duration;

/// Tunable timings of the lifecycle. The defaults suit Intuit (1 h access tokens,
/// 100-day idle window, 5-year cap) and most providers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Settings {
    /// An access token is served only while it stays valid this much longer (S5);
    /// never more than half of the token's lifetime, whatever is set here.
    pub access_margin: Duration,
    /// No caller starts a refresh sooner than this after the last successful one;
    /// callers are answered with a transient error instead. Only tokens that live a
    /// couple of seconds (or replies slower than half a lifetime) meet it.
    pub min_refresh_interval: Duration,
    /// How long a refresh lease lasts.
    pub lease_ttl: Duration,
    /// How often a worker waiting for another's lease re-reads the store.
    pub lease_poll: Duration,
    /// A refresh must be sent at least this long before the lease expires; it is
    /// also the time left for the reply to arrive before the lease can be taken over.
    pub send_safety: Duration,
    /// Subtracted from a grace window before presenting a token that may have been
    /// rotated: covers clock skew between processes.
    pub in_doubt_safety: Duration,
    /// Refresh an idle connection this long before its idle deadline (L2).
    pub keepalive_lead: Duration,
    /// Emit `ReconnectSoon` this long before the hard deadline (L4).
    pub reconnect_notice: Duration,
    /// First retry delay after a transient failure.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Delay after the provider rejected the client or the request.
    pub config_backoff: Duration,
    /// Refresh attempts made for waiting callers before they get the error.
    pub max_attempts: u32,
    /// Callers wait for a retry only if it is due within this delay.
    pub max_inline_delay: Duration,
    /// A cached "re-auth required" or "disconnected" verdict is re-read from the
    /// store when older than this: another worker may have revived the record
    /// (a late commit, a new authorization). Never causes a provider call.
    pub dead_recheck: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            access_margin: minutes(5),
            min_refresh_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(60),
            lease_poll: Duration::from_millis(500),
            send_safety: Duration::from_secs(30),
            in_doubt_safety: minutes(2),
            keepalive_lead: days(30),
            reconnect_notice: days(60),
            backoff_base: Duration::from_secs(1),
            backoff_max: minutes(15),
            config_backoff: minutes(15),
            max_attempts: 3,
            max_inline_delay: Duration::from_secs(10),
            dead_recheck: Duration::from_secs(1),
        }
    }
}

impl Settings {
    /// Delay before retry number `failures` (1-based): exponential from
    /// `backoff_base`, capped at `backoff_max`, with "equal jitter" drawn from
    /// `roll` (half fixed, half random), so retries of many workers spread out.
    pub fn backoff(&self, failures: u32, roll: u64) -> Duration {
        let exp = failures.saturating_sub(1).min(32);
        let base = u64::try_from(self.backoff_base.as_millis()).unwrap_or(u64::MAX);
        let cap = u64::try_from(self.backoff_max.as_millis()).unwrap_or(u64::MAX);
        let full = base.saturating_mul(1u64 << exp).min(cap);
        let half = full / 2;
        Duration::from_millis(half + roll % (full - half + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let s = Settings::default();
        assert!(s.backoff(1, 0) >= Duration::from_millis(500));
        assert!(s.backoff(1, u64::MAX) <= Duration::from_secs(1));
        assert!(s.backoff(5, 0) >= Duration::from_secs(8));
        assert!(s.backoff(1000, u64::MAX) <= s.backoff_max);
        assert_ne!(s.backoff(4, 1), s.backoff(4, 2));
    }
}
