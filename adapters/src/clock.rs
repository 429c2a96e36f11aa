//! Wall-clock time for the driver. The core never reads a clock; the driver stamps
//! every input with `Clock::now`.

use std::time::{SystemTime, UNIX_EPOCH};
use tokenfence_core::Timestamp;

/// The last instant RFC 3339 can write: 9999-12-31T23:59:59Z, in seconds.
pub(crate) const LAST_RFC3339_SECS: u64 = 253_402_300_799;

/// `t` in RFC 3339 (UTC, whole seconds), or past the year 9999, which RFC 3339
/// cannot write (an instant imported or typed in milliseconds where seconds were
/// meant), its seconds since the epoch: never a panic.
pub fn rfc3339(t: Timestamp) -> String {
    let secs = t.as_millis() / 1000;
    if secs > LAST_RFC3339_SECS {
        return format!("{secs}s since the epoch");
    }
    let at = UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Where the driver gets the current wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Timestamp;

    /// Now, read cheaply, possibly a few milliseconds behind [`now`](Self::now).
    /// Used only by the cached-token check, whose margin is half a second at
    /// least (half a lifetime given in whole seconds, capped at
    /// `access_margin`). By default `now()`.
    fn now_coarse(&self) -> Timestamp {
        self.now()
    }
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp::from_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// Linux's `CLOCK_REALTIME_COARSE`: the wall clock as of the last timer tick
    /// (at most a few milliseconds old), read without the clock source: about
    /// a tenth of what `now()` costs on the hot path.
    #[cfg(target_os = "linux")]
    fn now_coarse(&self) -> Timestamp {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        let millis = u64::try_from(t.tv_sec)
            .unwrap_or(0)
            .saturating_mul(1_000)
            .saturating_add(u64::try_from(t.tv_nsec / 1_000_000).unwrap_or(0));
        Timestamp::from_millis(millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_is_the_wall_clock_within_a_tick() {
        for _ in 0..1_000 {
            let before = SystemClock.now();
            let coarse = SystemClock.now_coarse();
            let after = SystemClock.now();
            // At most one timer tick (4 ms at HZ=250, 10 ms at HZ=100) behind.
            assert!(coarse <= after, "{coarse:?} after {after:?}");
            assert!(
                before.saturating_since(coarse) <= std::time::Duration::from_millis(20),
                "{coarse:?} lags {before:?}"
            );
        }
    }

    #[test]
    fn any_instant_can_be_written() {
        assert_eq!(rfc3339(Timestamp::from_secs(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(Timestamp::from_secs(LAST_RFC3339_SECS)),
            "9999-12-31T23:59:59Z"
        );
        assert_eq!(
            rfc3339(Timestamp::from_secs(1_924_992_000_000)),
            "1924992000000s since the epoch"
        );
        assert_eq!(
            rfc3339(Timestamp::from_millis(u64::MAX)),
            format!("{}s since the epoch", u64::MAX / 1000)
        );
    }
}
