//! Margins, lease and retry settings, with defaults chosen for Intuit.

use crate::profile::ProviderProfile;
use crate::time::{days, minutes};
use alloc::string::String;
use core::time::Duration;

/// Settings that cannot work with a provider, found before anything is sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// `send_safety` leaves no time to send under a lease.
    #[error("send_safety ({send_safety:?}) must be shorter than lease_ttl ({lease_ttl:?}): no refresh could ever be sent under a lease")]
    SendSafetyNotInsideLease {
        /// The setting.
        send_safety: Duration,
        /// The setting.
        lease_ttl: Duration,
    },
    /// Waiting workers would never re-read the store before the lease ends.
    #[error("lease_poll ({lease_poll:?}) must be more than zero and shorter than lease_ttl ({lease_ttl:?})")]
    LeasePoll {
        /// The setting.
        lease_poll: Duration,
        /// The setting.
        lease_ttl: Duration,
    },
    /// A refresh in doubt could never be presented again inside the provider's
    /// grace window: every lost reply would end in re-authorization.
    #[error("in_doubt_safety ({in_doubt_safety:?}) must be shorter than {provider}'s grace window ({grace:?})")]
    InDoubtSafetyNotInsideGrace {
        /// The profile.
        provider: String,
        /// The setting.
        in_doubt_safety: Duration,
        /// The profile's grace window.
        grace: Duration,
    },
    /// Callers would be throttled for most of every token's life.
    #[error("min_refresh_interval ({floor:?}) must be shorter than half of {provider}'s access-token lifetime ({lifetime:?})")]
    RefreshFloorTooLong {
        /// The profile.
        provider: String,
        /// The setting.
        floor: Duration,
        /// The profile's default access lifetime.
        lifetime: Duration,
    },
    /// The retry schedule is empty or inverted.
    #[error("backoff_base ({base:?}) must be more than zero and at most backoff_max ({max:?}), and max_attempts at least 1")]
    Backoff {
        /// The setting.
        base: Duration,
        /// The setting.
        max: Duration,
    },
}

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
    /// Checks these settings against `profile`: what cannot work is an error
    /// naming the conflict. (The access margin needs no check: it never exceeds
    /// half of a token's lifetime, whatever is set.)
    pub fn check(&self, profile: &ProviderProfile) -> Result<(), SettingsError> {
        if self.send_safety >= self.lease_ttl {
            return Err(SettingsError::SendSafetyNotInsideLease {
                send_safety: self.send_safety,
                lease_ttl: self.lease_ttl,
            });
        }
        if self.lease_poll.is_zero() || self.lease_poll >= self.lease_ttl {
            return Err(SettingsError::LeasePoll {
                lease_poll: self.lease_poll,
                lease_ttl: self.lease_ttl,
            });
        }
        let grace = profile.rotation.grace;
        if !grace.is_zero() && self.in_doubt_safety >= grace {
            return Err(SettingsError::InDoubtSafetyNotInsideGrace {
                provider: profile.name.clone(),
                in_doubt_safety: self.in_doubt_safety,
                grace,
            });
        }
        let lifetime = profile.default_access_ttl;
        if self.min_refresh_interval >= lifetime / 2 {
            return Err(SettingsError::RefreshFloorTooLong {
                provider: profile.name.clone(),
                floor: self.min_refresh_interval,
                lifetime,
            });
        }
        if self.backoff_base.is_zero()
            || self.backoff_base > self.backoff_max
            || self.max_attempts == 0
        {
            return Err(SettingsError::Backoff {
                base: self.backoff_base,
                max: self.backoff_max,
            });
        }
        Ok(())
    }

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

    #[test]
    fn the_defaults_suit_every_built_in_profile_and_conflicts_are_named() {
        let profiles = [
            ProviderProfile::intuit(),
            ProviderProfile::xero(),
            ProviderProfile::atlassian(),
            ProviderProfile::google(),
            ProviderProfile::github_app(),
            ProviderProfile::strict_reuse_detecting("s", "https://s.example/t"),
        ];
        for p in &profiles {
            assert_eq!(Settings::default().check(p), Ok(()), "{}", p.name);
        }
        let intuit = &profiles[0];
        let bad = |s: Settings| s.check(intuit).unwrap_err();
        let d = Settings::default();
        assert!(matches!(
            bad(Settings {
                send_safety: d.lease_ttl,
                ..d.clone()
            }),
            SettingsError::SendSafetyNotInsideLease { .. }
        ));
        assert!(matches!(
            bad(Settings {
                lease_poll: Duration::ZERO,
                ..d.clone()
            }),
            SettingsError::LeasePoll { .. }
        ));
        assert!(matches!(
            bad(Settings {
                in_doubt_safety: days(1),
                ..d.clone()
            }),
            SettingsError::InDoubtSafetyNotInsideGrace { .. }
        ));
        assert!(matches!(
            bad(Settings {
                min_refresh_interval: minutes(30),
                ..d.clone()
            }),
            SettingsError::RefreshFloorTooLong { .. }
        ));
        assert!(matches!(
            bad(Settings {
                max_attempts: 0,
                ..d.clone()
            }),
            SettingsError::Backoff { .. }
        ));
        let err = bad(Settings {
            in_doubt_safety: days(1),
            ..d
        });
        assert!(alloc::format!("{err}").contains("intuit"), "{err}");
    }
}
