//! Quotas and the GCRA arithmetic every backend shares.

use std::fmt;
use std::str::FromStr;
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
/// year, more than 10⁹ requests per window, or a burst that takes more than a year to
/// come back (`burst × window ÷ count`) are configuration errors: every one of them
/// is a typo, not a policy. Within these bounds a key gets exactly its burst at once
/// and never more than `count` per window after it.
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
    /// The sustained rate stays `count` per window. A burst must come back within
    /// 366 days (`burst × window ÷ count`), as a window must.
    ///
    /// ```
    /// use portcullis::rate_limit::Quota;
    /// assert!(Quota::per_day(10)?.with_burst(3_000).is_ok()); // back in 300 days
    /// assert!(Quota::per_day(10)?.with_burst(4_000).is_err()); // 400 days
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    pub fn with_burst(mut self, burst: u32) -> Result<Self, ConfigError> {
        if burst == 0 || burst > MAX_COUNT {
            return Err(ConfigError::new("quota burst must be 1 to 1000000000"));
        }
        // Both sides are below 2^55 (10^9 × 3.2 × 10^7): no overflow.
        if u64::from(burst) * u64::from(self.window_secs) > MAX_WINDOW_SECS * u64::from(self.count)
        {
            return Err(ConfigError::new(
                "quota burst must come back within 366 days (burst × window ÷ count)",
            ));
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
        // Nanoseconds: a 366-day window is 3.2e16 ns, well inside u64. The interval
        // is rounded up, so the sustained rate is at most `count` per window.
        let window = u64::from(self.window_secs) * 1_000_000_000;
        let t = window.div_ceil(u64::from(self.count));
        // `t × (burst − 1)` is at most the burst's time to come back plus
        // `burst − 1` ns of rounding: under 366 days + 1 s by the constructors, so
        // far from u64's end that no timestamp saturates into "always allowed".
        Gcra {
            t,
            tau: t * (u64::from(self.burst) - 1),
        }
    }
}

/// The longest quota list accepted, in bytes.
#[cfg(feature = "stack")]
const MAX_QUOTA_LIST_LEN: usize = 256;
/// The most quotas in one list (the rate limiter's policy limit).
#[cfg(feature = "stack")]
const MAX_QUOTAS: usize = 4;

/// One quota: `<count>/<window>`, where the window is an optional whole
/// number followed by a unit: `s`, `sec`, `second(s)`; `m`, `min`, `minute(s)`;
/// `h`, `hour(s)`; `d`, `day(s)`. Spaces around the parts are ignored.
///
/// `100/s` is 100 requests per second; `10/5m` is 10 per 5 minutes; `5000/h` 5000
/// per hour. A zero count or window, a window that is not whole seconds, or anything
/// else is an error (the message never repeats the input).
///
/// ```
/// use std::time::Duration;
/// use portcullis::rate_limit::Quota;
/// let q: Quota = "10/5m".parse()?;
/// assert_eq!((q.count(), q.window()), (10, Duration::from_secs(300)));
/// assert!("0/s".parse::<Quota>().is_err());
/// assert!("10 per second".parse::<Quota>().is_err());
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
impl FromStr for Quota {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Quota, ConfigError> {
        let (count, window) = s
            .split_once('/')
            .ok_or_else(|| ConfigError::new("quota must look like 100/s or 10/5m"))?;
        let count = parse_number(count.trim())
            .ok_or_else(|| ConfigError::new("quota count must be a whole number"))?;
        if count == 0 {
            return Err(ConfigError::new(
                "quota count must be at least 1 (a zero quota)",
            ));
        }
        let window = window.trim();
        let digits = window.bytes().take_while(u8::is_ascii_digit).count();
        let (n, unit) = window.split_at(digits);
        let n = if n.is_empty() {
            1
        } else {
            parse_number(n)
                .ok_or_else(|| ConfigError::new("quota window must be a whole number"))?
        };
        if n == 0 {
            return Err(ConfigError::new("quota window must be at least 1"));
        }
        let unit_secs: u64 = match unit.trim() {
            "s" | "sec" | "second" | "seconds" => 1,
            "m" | "min" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            _ => {
                return Err(ConfigError::new(
                    "quota window unit must be s, m, h or d (e.g. 100/s, 10/5m)",
                ));
            }
        };
        let count = u32::try_from(count)
            .map_err(|_| ConfigError::new("quota count must be at most 1000000000 per window"))?;
        let secs = n
            .checked_mul(unit_secs)
            .ok_or_else(|| ConfigError::new("quota window must be at most 366 days"))?;
        Quota::new(count, Duration::from_secs(secs))
    }
}

/// Parses a comma-separated list of 1 to 4 quotas (see [`Quota`]'s `FromStr`), all
/// enforced together: `100/s, 5000/h` allows bursts of 100 per second but at most
/// 5000 an hour. Two quotas with the same window are an error. Errors name the
/// position of the bad entry.
///
#[cfg(feature = "stack")]
pub(crate) fn parse_list(list: &str) -> Result<Vec<Quota>, ConfigError> {
    if list.len() > MAX_QUOTA_LIST_LEN {
        return Err(ConfigError::new(format!(
            "quota list must be at most {MAX_QUOTA_LIST_LEN} bytes"
        )));
    }
    let mut quotas: Vec<Quota> = Vec::new();
    for (i, entry) in list.split(',').enumerate() {
        let n = i + 1;
        if n > MAX_QUOTAS {
            return Err(ConfigError::new(format!(
                "at most {MAX_QUOTAS} quotas in a list"
            )));
        }
        if entry.trim().is_empty() {
            return Err(ConfigError::new(format!("quota {n} is empty")));
        }
        let q: Quota = entry
            .parse()
            .map_err(|e| ConfigError::new(format!("quota {n}: {e}")))?;
        if quotas.iter().any(|p| p.window() == q.window()) {
            return Err(ConfigError::new(format!(
                "quota {n}: another quota has the same window"
            )));
        }
        quotas.push(q);
    }
    Ok(quotas)
}

/// A decimal number of at most 10 digits, nothing else (no sign, no separators).
pub(crate) fn parse_number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Seconds for a response field: whole seconds, rounded up (0 stays 0).
pub(crate) fn secs_ceil(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
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
/// of time, at least 1), `tau` the tolerance (`t × (burst − 1)`); both under 367
/// days (see [`Quota::gcra`]).
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
    #[inline]
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

    #[cfg(feature = "auth-throttle")]
    /// Whether the next request at `now` would be refused (no state change).
    pub(crate) fn would_deny(&self, tat: u64, now: u64) -> Option<u64> {
        match self.test(tat, now) {
            Cell::Deny { wait } => Some(wait),
            Cell::Allow { .. } => None,
        }
    }

    /// `(t, tau)` in whole microseconds, for a store counting in them (Redis): the
    /// interval rounded up, so the sustained rate stays at most the quota's, and the
    /// tolerance the same number of intervals, so the burst stays exact.
    #[cfg(feature = "redis")]
    pub(crate) fn micros(&self) -> (u64, u64) {
        let t = self.t.div_ceil(1000);
        (t, t * (self.tau / self.t))
    }

    /// Requests still allowed at once at `now`, given the stored `tat`.
    pub(crate) fn remaining(&self, tat: u64, now: u64) -> u64 {
        let ahead = tat.saturating_sub(now);
        // Each whole `t` of slack under `tau + t` is one more request.
        self.tau.saturating_add(self.t).saturating_sub(ahead) / self.t
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
        let yearly = Quota::new(1, Duration::from_secs(MAX_WINDOW_SECS)).unwrap();
        assert!(yearly.with_burst(2).is_err(), "two years to come back");
        assert!(Quota::per_minute(1).unwrap().with_burst(MAX_COUNT).is_err());
    }

    proptest::proptest! {
        /// Every quota the constructors accept, at any stored state and time: the
        /// GCRA arithmetic never overflows.
        #[test]
        fn gcra_arithmetic_never_overflows(
            count in 1u32..=MAX_COUNT,
            window in 1u64..=MAX_WINDOW_SECS,
            burst in 1u32..=MAX_COUNT,
            tat in proptest::prelude::any::<u64>(),
            now in proptest::prelude::any::<u64>(),
        ) {
            let Ok(q) = Quota::new(count, Duration::from_secs(window))
                .unwrap()
                .with_burst(burst)
            else {
                return Ok(());
            };
            let g = q.gcra();
            let _ = (g.test(tat, now), g.would_deny(tat, now), g.remaining(tat, now));
        }

        /// Every quota the constructors accept holds its promise at any time of the
        /// clock: a fresh key gets exactly `burst` requests at once, and the interval
        /// lets at most `count` through per window after it. The bursts refused are
        /// exactly those that take more than 366 days to come back.
        #[test]
        fn accepted_quotas_hold_their_burst_and_rate(
            count in proptest::prop_oneof![1u32..=10, 1u32..=MAX_COUNT],
            window in proptest::prop_oneof![1u64..=10, 1u64..=MAX_WINDOW_SECS],
            burst in proptest::prop_oneof![1u32..=1000, 1u32..=MAX_COUNT],
            now in 0u64..=(1 << 62),
        ) {
            let refused = u128::from(burst) * u128::from(window)
                > u128::from(MAX_WINDOW_SECS) * u128::from(count);
            let q = Quota::new(count, Duration::from_secs(window)).unwrap().with_burst(burst);
            proptest::prop_assert_eq!(q.is_err(), refused);
            let Ok(q) = q else { return Ok(()) };
            let g = q.gcra();
            proptest::prop_assert!(
                u128::from(g.t) * u128::from(count) >= u128::from(window) * 1_000_000_000,
                "more than {} per {}s: t = {} ns", count, window, g.t
            );
            proptest::prop_assert_eq!(g.remaining(0, now), u64::from(burst));
            // After `k` requests at `now`, the stored time is `now + k × t`.
            let after = |k: u32| now + g.t * u64::from(k);
            let last = matches!(g.test(after(burst - 1), now), Cell::Allow { .. });
            let one_more = matches!(g.test(after(burst), now), Cell::Allow { .. });
            proptest::prop_assert!(last && !one_more, "burst {} not exact", burst);
        }

        /// The same by sending, for bursts small enough to send one by one.
        #[test]
        fn a_fresh_key_gets_exactly_its_burst_by_sending(
            count in 1u32..=10,
            window in 1u64..=MAX_WINDOW_SECS,
            burst in 1u32..=3000,
        ) {
            let Ok(q) = Quota::new(count, Duration::from_secs(window)).unwrap().with_burst(burst)
            else {
                return Ok(());
            };
            let g = q.gcra();
            let now = 1_000_000_000;
            let (mut tat, mut allowed) = (0, 0u32);
            while let Cell::Allow { tat: next } = g.test(tat, now) {
                tat = next;
                allowed += 1;
                proptest::prop_assert!(allowed <= burst, "more than the burst of {}", burst);
            }
            proptest::prop_assert_eq!(allowed, burst);
        }
    }

    /// A rate the interval cannot hold exactly (10^9 / 6 × 10^8 ns) is held below,
    /// not above: a key sending every nanosecond gets at most the count.
    #[test]
    fn an_inexact_interval_rounds_towards_fewer_requests() {
        let g = Quota::per_second(600_000_000)
            .unwrap()
            .with_burst(1)
            .unwrap()
            .gcra();
        let start = 1_000_000_000;
        let (mut tat, mut allowed) = (0, 0u64);
        for now in start..start + 1_000_000 {
            if let Cell::Allow { tat: next } = g.test(tat, now) {
                tat = next;
                allowed += 1;
            }
        }
        assert!(allowed <= 600_000, "{allowed} in 1 ms at 600000000/s");
    }

    #[cfg(feature = "redis")]
    proptest::proptest! {
        /// In microseconds (the Redis store's unit) the rate is still at most `count`
        /// per window and the burst is exact.
        #[test]
        fn micros_keep_the_rate_and_the_burst(
            count in 1u32..=MAX_COUNT,
            window in 1u64..=MAX_WINDOW_SECS,
            burst in 1u32..=MAX_COUNT,
        ) {
            let Ok(q) = Quota::new(count, Duration::from_secs(window)).unwrap().with_burst(burst)
            else {
                return Ok(());
            };
            let (t, tau) = q.gcra().micros();
            proptest::prop_assert!(
                u128::from(t) * u128::from(count) >= u128::from(window) * 1_000_000,
                "more than {} per {}s: t = {} µs", count, window, t
            );
            // A fresh key at one instant: allowed while `k × t ≤ tau`.
            proptest::prop_assert_eq!(tau / t + 1, u64::from(burst));
        }
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

#[cfg(all(test, feature = "stack"))]
mod parser_tests {
    use std::time::Duration;

    use super::{Quota, parse_list as parse_quotas};
    use proptest::prelude::*;

    fn parse_quota(s: &str) -> Result<Quota, crate::ConfigError> {
        s.parse()
    }

    const UNITS: &[(&str, u64)] = &[
        ("s", 1),
        ("sec", 1),
        ("second", 1),
        ("seconds", 1),
        ("m", 60),
        ("min", 60),
        ("minute", 60),
        ("h", 3600),
        ("hour", 3600),
        ("hours", 3600),
        ("d", 86_400),
        ("day", 86_400),
        ("days", 86_400),
    ];

    proptest! {
        /// Any well-formed quota parses to exactly its count and window.
        #[test]
        fn well_formed_quotas_parse_exactly(
            count in 1u32..=1_000_000_000,
            n in proptest::option::of(1u64..=60),
            unit in 0..UNITS.len(),
            sp in "[ ]{0,2}",
        ) {
            let (name, secs) = UNITS[unit];
            let window = n.map_or(String::new(), |n| n.to_string());
            let s = format!("{sp}{count}{sp}/{sp}{window}{name}{sp}");
            let q = parse_quota(&s).unwrap();
            prop_assert_eq!(q.count(), count);
            prop_assert_eq!(q.window(), Duration::from_secs(n.unwrap_or(1) * secs));
            prop_assert_eq!(q.burst(), count);
        }

        /// Arbitrary input never panics, and an error never repeats the input.
        #[test]
        fn arbitrary_input_never_panics_or_echoes(s in "\\PC{0,40}") {
            if let Err(e) = parse_quotas(&s) {
                let msg = e.to_string();
                prop_assert!(s.len() < 4 || !msg.contains(s.as_str()));
            }
        }

        /// A zero count is always refused.
        #[test]
        fn zero_is_refused(unit in 0..UNITS.len(), zeros in 1usize..4) {
            let s = format!("{}/{}", "0".repeat(zeros), UNITS[unit].0);
            prop_assert!(parse_quota(&s).is_err());
        }

        /// A list parses to its entries in order; the same window twice is refused.
        #[test]
        fn lists_keep_order_and_refuse_duplicate_windows(
            a in 1u32..10_000, b in 1u32..10_000,
        ) {
            let qs = parse_quotas(&format!("{a}/s, {b}/h")).unwrap();
            prop_assert_eq!(qs.len(), 2);
            prop_assert_eq!((qs[0].count(), qs[1].count()), (a, b));
            let dup = format!("{a}/s,{b}/1s");
            prop_assert!(parse_quotas(&dup).is_err());
        }
    }

    #[test]
    fn edges() {
        assert!(parse_quota("1000000000/s").is_ok());
        assert!(parse_quota("1000000001/s").is_err());
        assert!(parse_quota("99999999999/s").is_err());
        assert!(parse_quota("1/366d").is_ok());
        assert!(parse_quota("1/367d").is_err());
        assert!(
            parse_quota("1/9999999999d").is_err(),
            "overflow is an error"
        );
        assert!(parse_quota("+1/s").is_err());
        assert!(parse_quota("1/-1s").is_err());
        assert!(parse_quota("1/S").is_err(), "units are lower case");
        assert!(parse_quota("1//s").is_err());
        assert!(parse_quota("1/s/s").is_err());
        assert!(parse_quotas("1/s,2/m,3/h,4/d").is_ok());
        assert!(
            parse_quotas("1/s,2/m,3/h,4/d,5/2d").is_err(),
            "at most four"
        );
        assert!(parse_quotas(&"1".repeat(300)).is_err());
    }
}
