//! Quotas and the GCRA arithmetic every backend shares.

use std::fmt;
use std::time::Duration;

use crate::ConfigError;

/// The longest window a quota may have: one year.
const MAX_WINDOW_SECS: u64 = 366 * 24 * 3600;
/// The most requests a quota may allow per window.
const MAX_COUNT: u32 = 1_000_000_000;

/// How many requests a key may make per window, and how many at once.
///
/// `Quota::per_second(100)` means **100 requests per second**: a key may spend all
/// 100 at once (the burst) and then gets one more every 10 ms. The limiter is a GCRA
/// (generic cell rate algorithm): it stores one timestamp per key, refills smoothly
/// rather than at window boundaries, and so has no "double burst" at a window edge.
///
/// A zero count, a window that is not a whole number of seconds, a window over a
/// year, or more than 10⁹ requests per window are configuration errors: every one of
/// them is a typo, not a policy.
///
/// ```
/// use portcullis::rate_limit::Quota;
/// use std::time::Duration;
///
/// let q = Quota::per_second(100)?;          // 100 requests per second, burst 100
/// assert_eq!(q.count(), 100);
/// assert_eq!(q.window(), Duration::from_secs(1));
/// let hourly = Quota::per_hour(5_000)?.with_burst(50)?; // 5000/h, at most 50 at once
/// assert_eq!(hourly.burst(), 50);
/// assert!(Quota::per_second(0).is_err());
/// assert!(Quota::new(10, Duration::from_millis(1500)).is_err());
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    count: u32,
    window_secs: u32,
    burst: u32,
}

impl Quota {
    /// `count` requests per `window`, with a burst of `count`. The window must be a
    /// whole number of seconds (the `RateLimit-Policy` field states it in seconds).
    pub fn new(count: u32, window: Duration) -> Result<Self, ConfigError> {
        if count == 0 {
            return Err(ConfigError::new("quota count must be at least 1"));
        }
        if count > MAX_COUNT {
            return Err(ConfigError::new(
                "quota count must be at most 1000000000 per window",
            ));
        }
        if window.subsec_nanos() != 0 || window.as_secs() == 0 {
            return Err(ConfigError::new(
                "quota window must be a whole number of seconds, at least 1",
            ));
        }
        if window.as_secs() > MAX_WINDOW_SECS {
            return Err(ConfigError::new("quota window must be at most 366 days"));
        }
        Ok(Self {
            count,
            window_secs: window.as_secs() as u32,
            burst: count,
        })
    }

    /// `n` requests per second.
    pub fn per_second(n: u32) -> Result<Self, ConfigError> {
        Self::new(n, Duration::from_secs(1))
    }

    /// `n` requests per minute.
    pub fn per_minute(n: u32) -> Result<Self, ConfigError> {
        Self::new(n, Duration::from_secs(60))
    }

    /// `n` requests per hour.
    pub fn per_hour(n: u32) -> Result<Self, ConfigError> {
        Self::new(n, Duration::from_secs(3600))
    }

    /// `n` requests per day (86 400 s).
    pub fn per_day(n: u32) -> Result<Self, ConfigError> {
        Self::new(n, Duration::from_secs(86_400))
    }

    /// Sets how many requests a fresh key may make at once (default: the count).
    /// The sustained rate stays `count` per window.
    pub fn with_burst(mut self, burst: u32) -> Result<Self, ConfigError> {
        if burst == 0 || burst > MAX_COUNT {
            return Err(ConfigError::new("quota burst must be 1 to 1000000000"));
        }
        self.burst = burst;
        Ok(self)
    }

    /// Requests per window.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The window.
    pub fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.window_secs))
    }

    /// Requests allowed at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    pub(crate) fn gcra(&self) -> Gcra {
        // Nanoseconds: a 366-day window is 3.2e16 ns, well inside u64.
        let window = u64::from(self.window_secs) * 1_000_000_000;
        let t = (window / u64::from(self.count)).max(1);
        Gcra {
            t,
            tau: t.saturating_mul(u64::from(self.burst) - 1),
        }
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Quota({} per {}s, burst {})",
            self.count, self.window_secs, self.burst
        )
    }
}

/// GCRA parameters in nanoseconds: `t` the emission interval (one request's worth
/// of time), `tau` the tolerance (`t × (burst − 1)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gcra {
    pub(crate) t: u64,
    pub(crate) tau: u64,
}

/// The outcome of one GCRA test for one policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cell {
    /// Allowed; `tat` is the new theoretical arrival time to store.
    Allow { tat: u64 },
    /// Refused; `wait` nanoseconds until one request would be allowed.
    Deny { wait: u64 },
}

impl Gcra {
    /// Tests one request at `now` against the stored `tat` (0 = never seen).
    /// Pure: the caller stores the new `tat` only if every policy allowed.
    pub(crate) fn test(&self, tat: u64, now: u64) -> Cell {
        let tat = tat.max(now);
        let ahead = tat - now;
        if ahead > self.tau {
            Cell::Deny {
                wait: ahead - self.tau,
            }
        } else {
            Cell::Allow {
                tat: tat.saturating_add(self.t),
            }
        }
    }

    /// Whether the next request at `now` would be refused (no state change).
    pub(crate) fn would_deny(&self, tat: u64, now: u64) -> Option<u64> {
        match self.test(tat, now) {
            Cell::Deny { wait } => Some(wait),
            Cell::Allow { .. } => None,
        }
    }

    /// Requests still allowed at once at `now`, given the stored `tat`.
    pub(crate) fn remaining(&self, tat: u64, now: u64) -> u64 {
        let ahead = tat.saturating_sub(now);
        // Each whole `t` of slack under `tau + t` is one more request.
        (self.tau + self.t).saturating_sub(ahead) / self.t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_read_as_rates() {
        let q = Quota::per_second(100).unwrap();
        assert_eq!(q.gcra().t, 10_000_000);
        assert_eq!(q.gcra().tau, 99 * 10_000_000);
        assert_eq!(Quota::per_minute(60).unwrap().gcra().t, 1_000_000_000);
        assert_eq!(
            Quota::per_hour(1).unwrap().window(),
            Duration::from_secs(3600)
        );
        assert!(Quota::per_second(0).is_err());
        assert!(Quota::per_second(MAX_COUNT + 1).is_err());
        assert!(Quota::new(1, Duration::ZERO).is_err());
        assert!(Quota::new(1, Duration::from_secs(MAX_WINDOW_SECS + 1)).is_err());
        assert!(Quota::per_second(1).unwrap().with_burst(0).is_err());
    }

    #[test]
    fn burst_then_steady_rate() {
        let g = Quota::per_second(10).unwrap().gcra(); // t = 100 ms, burst 10
        let mut tat = 0;
        let now = 5_000_000_000;
        for i in 0..10 {
            assert_eq!(g.remaining(tat, now), 10 - i);
            match g.test(tat, now) {
                Cell::Allow { tat: n } => tat = n,
                Cell::Deny { .. } => panic!("request {i} of the burst refused"),
            }
        }
        assert_eq!(g.remaining(tat, now), 0);
        assert_eq!(g.test(tat, now), Cell::Deny { wait: 100_000_000 });
        assert_eq!(tat - now, 1_000_000_000, "full again in 1 s");
        // 100 ms later exactly one more.
        let later = now + 100_000_000;
        assert!(matches!(g.test(tat, later), Cell::Allow { .. }));
    }

    proptest::proptest! {
        /// Decisions, waits and remaining capacity equal governor's GCRA for any
        /// quota and any arrival pattern.
        #[test]
        fn decisions_match_governor(
            count in 1u32..100,
            window in 1u64..100,
            burst in 1u32..30,
            steps in proptest::collection::vec(0u64..3_000_000_000, 1..150),
        ) {
            use governor::clock::{Clock, FakeRelativeClock};
            use governor::middleware::StateInformationMiddleware;
            use std::num::NonZeroU32;

            let q = Quota::new(count, Duration::from_secs(window)).unwrap().with_burst(burst).unwrap();
            let g = q.gcra();
            let gq = governor::Quota::with_period(Duration::from_nanos(g.t))
                .unwrap()
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let clock = FakeRelativeClock::default();
            let reference = governor::RateLimiter::direct_with_clock(gq, clock.clone())
                .with_middleware::<StateInformationMiddleware>();
            let (mut tat, mut now) = (0u64, 0u64);
            for d in steps {
                now += d;
                clock.advance(Duration::from_nanos(d));
                match (g.test(tat, now), reference.check()) {
                    (Cell::Allow { tat: next }, Ok(snapshot)) => {
                        tat = next;
                        proptest::prop_assert_eq!(
                            g.remaining(tat, now),
                            u64::from(snapshot.remaining_burst_capacity())
                        );
                    }
                    (Cell::Deny { wait }, Err(not_until)) => {
                        proptest::prop_assert_eq!(
                            Duration::from_nanos(wait),
                            not_until.wait_time_from(clock.now())
                        );
                    }
                    (ours, theirs) => proptest::prop_assert!(
                        false,
                        "ours {:?}, governor {:?} at {}",
                        ours,
                        theirs.is_ok(),
                        now
                    ),
                }
            }
        }
    }
}
