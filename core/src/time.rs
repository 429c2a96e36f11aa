//! Wall-clock instants as plain values. The core never reads a clock: every input is
//! stamped with a [`Timestamp`] by the driver.

use core::time::Duration;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as told by the driver.
///
/// Deadlines are stored with the connection record and shared between processes, so
/// they are wall-clock values, not monotonic ones. Arithmetic saturates: an absurd
/// lifetime from a provider can never wrap around into the past.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `ms` milliseconds after the Unix epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// A timestamp `secs` seconds after the Unix epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1000))
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at the far future.
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }

    /// `self - d`, saturating at the epoch.
    #[must_use]
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration_millis(d)))
    }

    /// How long after `earlier` this instant is; zero if it is not after it.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl core::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Shorthand for durations in whole days.
pub const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

/// Shorthand for durations in whole hours.
pub const fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3_600)
}

/// Shorthand for durations in whole minutes.
pub const fn minutes(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}
