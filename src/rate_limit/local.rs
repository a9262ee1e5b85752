//! The in-memory backend: GCRA state per key in a `DashMap`, bounded and self-cleaning.
//!
//! Each tracked key costs one map entry: a 24-byte key and one 8-byte timestamp per
//! policy (32 bytes with one policy, 40 with two, 56 with three or four), plus the
//! map's load-factor slack. Nothing
//! runs in the background: cleanup is amortised over the requests that add keys.

use std::hash::{BuildHasherDefault, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;

use super::key::{LocalKey, PreHashed};
use super::quota::{Cell, Gcra};

/// At most this many policies are checked together.
pub(crate) const MAX_POLICIES: usize = 4;

/// The decision for one request over every policy. Per policy, in nanoseconds:
/// how far its theoretical arrival time is ahead of now (after the decision), and
/// the wait before a refused request could succeed (0 where the policy allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) allowed: bool,
    pub(crate) len: usize,
    pub(crate) ahead: [u64; MAX_POLICIES],
    pub(crate) waits: [u64; MAX_POLICIES],
}

impl Outcome {
    /// Time until a refused request could succeed: the longest wait of any policy.
    pub(crate) fn wait(&self) -> u64 {
        self.waits[..self.len].iter().copied().max().unwrap_or(0)
    }

    /// Requests policy `i` (with parameters `g`) still allows at once.
    pub(crate) fn remaining(&self, i: usize, g: &Gcra) -> u64 {
        g.remaining(self.ahead[i], 0)
    }

    /// Nanoseconds until policy `i`'s full quota is back.
    pub(crate) fn reset(&self, i: usize) -> u64 {
        self.ahead[i]
    }
}

/// GCRA over every policy of one key, all or nothing: a request refused by one
/// policy consumes nothing from the others. `tats` holds one slot per policy.
pub(crate) fn decide(gcras: &[Gcra], tats: &mut [u64], now: u64) -> Outcome {
    let mut next = [0u64; MAX_POLICIES];
    let mut out = Outcome {
        allowed: true,
        len: gcras.len(),
        ahead: [0; MAX_POLICIES],
        waits: [0; MAX_POLICIES],
    };
    for (i, g) in gcras.iter().enumerate() {
        match g.test(tats[i], now) {
            Cell::Allow { tat } => next[i] = tat,
            Cell::Deny { wait } => {
                out.allowed = false;
                out.waits[i] = wait;
            }
        }
    }
    if out.allowed {
        tats[..gcras.len()].copy_from_slice(&next[..gcras.len()]);
    }
    for (ahead, &tat) in out.ahead.iter_mut().zip(&tats[..gcras.len()]) {
        *ahead = tat.saturating_sub(now);
    }
    out
}

/// Keyed GCRA state with a cap on tracked keys.
///
/// At the cap, a key not yet tracked shares one overflow state with every other
/// untracked key (under the quota its own request resolves to), so a flood of new
/// keys cannot evict or reset the keys already tracked, and cannot grow memory.
#[derive(Debug)]
pub(crate) struct LocalStore {
    table: Table,
    cap: usize,
    clock: quanta::Clock,
    /// The clock's raw reading when the store was made.
    epoch: u64,
    hasher: RandomState,
    inserts_since_sweep: AtomicUsize,
    last_sweep: AtomicU64,
    sweeping: AtomicBool,
}

/// The map sized to the number of policies: one timestamp per policy and no more,
/// so a one-policy key costs a 32-byte entry (24-byte key, 8-byte time).
#[derive(Debug)]
enum Table {
    One(Slots<1>),
    Two(Slots<2>),
    Four(Slots<4>),
}

#[derive(Debug)]
struct Slots<const N: usize> {
    map: DashMap<LocalKey, [AtomicU64; N], BuildHasherDefault<PreHashed>>,
    overflow: Mutex<[u64; N]>,
    /// Keys inserted minus keys swept (briefly off by the keys being inserted or
    /// swept right now): while 0, a read-only [`peek`](Self::peek) needs no lookup,
    /// which is the common case of the failed-authentication throttle.
    tracked: AtomicUsize,
}

impl<const N: usize> Slots<N> {
    fn new() -> Self {
        Self {
            map: DashMap::default(),
            overflow: Mutex::new([0; N]),
            tracked: AtomicUsize::new(0),
        }
    }

    fn check(&self, store: &LocalStore, key: LocalKey, gcras: &[Gcra], now: u64) -> Outcome {
        if N == 1 {
            if let Some(out) = self.check_tracked_one(&key, &gcras[0], now) {
                return out;
            }
        } else if let Some(slots) = self.map.get_mut(&key) {
            // Several slots change together: the entry's exclusive lock.
            return decide_atomics(gcras, &slots, now);
        }
        self.check_untracked(store, key, gcras, now)
    }

    /// One policy and a tracked key: a shared lock and a compare-and-swap, as
    /// governor does. `None` if the key is not tracked.
    #[inline]
    fn check_tracked_one(&self, key: &LocalKey, g: &Gcra, now: u64) -> Option<Outcome> {
        let slot = self.map.get(key)?;
        let a = &slot[0];
        let mut cur = a.load(Ordering::Acquire);
        let mut out = Outcome {
            allowed: true,
            len: 1,
            ahead: [0; MAX_POLICIES],
            waits: [0; MAX_POLICIES],
        };
        loop {
            match g.test(cur, now) {
                Cell::Deny { wait } => {
                    out.allowed = false;
                    out.waits[0] = wait;
                    out.ahead[0] = cur.saturating_sub(now);
                    return Some(out);
                }
                Cell::Allow { tat } => {
                    match a.compare_exchange_weak(cur, tat, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => {
                            out.ahead[0] = tat - now;
                            return Some(out);
                        }
                        Err(actual) => cur = actual,
                    }
                }
            }
        }
    }

    /// A key not (yet) tracked: amortised cleanup, then a new entry, or the shared
    /// overflow state at the cap.
    fn check_untracked(
        &self,
        store: &LocalStore,
        key: LocalKey,
        gcras: &[Gcra],
        now: u64,
    ) -> Outcome {
        store.maybe_sweep(now);
        if self.map.len() >= store.cap {
            let mut tats = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
            return decide(gcras, &mut tats[..], now);
        }
        let mut inserted = false;
        let slots = self.map.entry(key).or_insert_with(|| {
            inserted = true;
            std::array::from_fn(|_| AtomicU64::new(0))
        });
        if inserted {
            self.tracked.fetch_add(1, Ordering::Release);
        }
        decide_atomics(gcras, &slots, now)
    }

    fn peek(&self, key: LocalKey, gcras: &[Gcra], now: u64) -> Option<u64> {
        // Racing an insert, this is the same as looking before it.
        if self.tracked.load(Ordering::Acquire) == 0 {
            return None;
        }
        let slots = self.map.get(&key)?;
        gcras
            .iter()
            .zip(slots.iter())
            .filter_map(|(g, t)| g.would_deny(t.load(Ordering::Acquire), now))
            .max()
    }

    fn sweep(&self, now: u64) {
        let mut swept = 0;
        self.map.retain(|_, tats| {
            let keep = tats.iter().any(|t| t.load(Ordering::Relaxed) > now);
            swept += usize::from(!keep);
            keep
        });
        // A key swept before its inserter counted it wraps the count for a moment,
        // which only makes `peek` look: never the other way round.
        self.tracked.fetch_sub(swept, Ordering::Release);
        let len = self.map.len();
        if self.map.capacity() > 4 * len.max(1024) {
            self.map.shrink_to_fit();
        }
        let mut o = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
        if o.iter().all(|&t| t <= now) {
            *o = [0; N];
        }
    }
}

/// `decide` over slots the caller holds exclusively (the map entry's write lock).
fn decide_atomics<const N: usize>(gcras: &[Gcra], slots: &[AtomicU64; N], now: u64) -> Outcome {
    let mut tats: [u64; N] = std::array::from_fn(|i| slots[i].load(Ordering::Acquire));
    let out = decide(gcras, &mut tats, now);
    if out.allowed {
        for (slot, t) in slots.iter().zip(tats) {
            slot.store(t, Ordering::Release);
        }
    }
    out
}

/// Sweep after this many new keys (or a quarter of the cap, whichever is larger).
const SWEEP_EVERY: usize = 4096;
/// At the cap, sweep at most this often (ns), so a saturated table costs one pass
/// over it per interval, not one per request.
const SATURATED_SWEEP_INTERVAL: u64 = 1_000_000_000;

impl LocalStore {
    /// A store for `policies` policies (1 to [`MAX_POLICIES`]) and at most `cap` keys.
    pub(crate) fn new(cap: usize, policies: usize) -> Self {
        let table = match policies {
            0 | 1 => Table::One(Slots::new()),
            2 => Table::Two(Slots::new()),
            _ => Table::Four(Slots::new()),
        };
        let clock = quanta::Clock::new();
        Self {
            table,
            cap,
            epoch: clock.raw(),
            clock,
            hasher: RandomState::new(),
            inserts_since_sweep: AtomicUsize::new(0),
            last_sweep: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
        }
    }

    pub(crate) fn hasher(&self) -> &RandomState {
        &self.hasher
    }

    /// Monotonic nanoseconds since the store was made (wall-clock jumps do not
    /// matter). Starts at 1 s so that 0 can mean "never seen". `quanta` reads the
    /// CPU's invariant TSC where it can (the clock governor uses): a few ns instead
    /// of a `clock_gettime` call.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        // Raw readings scaled once (no `Instant`/`Duration` round trip); a reading
        // at or before the epoch counts as 0.
        self.clock.delta_as_nanos(self.epoch, self.clock.raw()) + 1_000_000_000
    }

    pub(crate) fn len(&self) -> usize {
        match &self.table {
            Table::One(t) => t.map.len(),
            Table::Two(t) => t.map.len(),
            Table::Four(t) => t.map.len(),
        }
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        match &self.table {
            Table::One(t) => t.map.capacity(),
            Table::Two(t) => t.map.capacity(),
            Table::Four(t) => t.map.capacity(),
        }
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Checks and, when allowed, records one request for `key` at `now`.
    /// `gcras` has at most as many entries as the store has policies.
    #[inline]
    pub(crate) fn check(&self, key: LocalKey, gcras: &[Gcra], now: u64) -> Outcome {
        // The common case inline: one policy, a tracked key.
        if let Table::One(t) = &self.table
            && let Some(out) = t.check_tracked_one(&key, &gcras[0], now)
        {
            return out;
        }
        self.check_rest(key, gcras, now)
    }

    #[inline(never)]
    fn check_rest(&self, key: LocalKey, gcras: &[Gcra], now: u64) -> Outcome {
        match &self.table {
            Table::One(t) => t.check_untracked(self, key, gcras, now),
            Table::Two(t) => t.check(self, key, gcras, now),
            Table::Four(t) => t.check(self, key, gcras, now),
        }
    }

    /// Whether any key may be tracked (see `Slots::tracked`): while not, every
    /// [`peek`](Self::peek) answers `None`, and its key need not be computed.
    #[inline]
    pub(crate) fn tracks_any(&self) -> bool {
        let tracked = match &self.table {
            Table::One(t) => &t.tracked,
            Table::Two(t) => &t.tracked,
            Table::Four(t) => &t.tracked,
        };
        tracked.load(Ordering::Acquire) != 0
    }

    /// Reads the state without changing it: would the next request be refused, and
    /// after how long (ns) would it be allowed? Untracked keys are never refused.
    pub(crate) fn peek(&self, key: LocalKey, gcras: &[Gcra], now: u64) -> Option<u64> {
        match &self.table {
            Table::One(t) => t.peek(key, gcras, now),
            Table::Two(t) => t.peek(key, gcras, now),
            Table::Four(t) => t.peek(key, gcras, now),
        }
    }

    /// Records one event for `key` (a refused one changes nothing).
    pub(crate) fn record(&self, key: LocalKey, gcras: &[Gcra], now: u64) {
        let _ = self.check(key, gcras, now);
    }

    fn maybe_sweep(&self, now: u64) {
        let n = self.inserts_since_sweep.fetch_add(1, Ordering::Relaxed);
        let due = n >= SWEEP_EVERY.max(self.cap / 4)
            || (self.len() >= self.cap
                && now.saturating_sub(self.last_sweep.load(Ordering::Relaxed))
                    >= SATURATED_SWEEP_INTERVAL);
        if due && !self.sweeping.swap(true, Ordering::Acquire) {
            self.sweep(now);
            self.sweeping.store(false, Ordering::Release);
        }
    }

    /// Drops every key whose state has fully refilled: such a key is
    /// indistinguishable from one never seen, so forgetting it changes no decision.
    pub(crate) fn sweep(&self, now: u64) {
        match &self.table {
            Table::One(t) => t.sweep(now),
            Table::Two(t) => t.sweep(now),
            Table::Four(t) => t.sweep(now),
        }
        self.inserts_since_sweep.store(0, Ordering::Relaxed);
        self.last_sweep.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::super::key::KeySource;
    use super::super::quota::Quota;
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn key(store: &LocalStore, ip: IpAddr) -> LocalKey {
        KeySource::Ip(super::super::key::mask(ip, 32, 64)).local(store.hasher())
    }

    #[test]
    fn all_or_nothing_across_policies() {
        let g = [
            Quota::per_second(10).unwrap().gcra(),
            Quota::per_minute(2).unwrap().gcra(),
        ];
        let mut tats = [0; 2];
        let now = 10_000_000_000;
        assert!(decide(&g, &mut tats, now).allowed);
        assert!(decide(&g, &mut tats, now).allowed);
        let before = tats;
        let o = decide(&g, &mut tats, now);
        assert!(!o.allowed);
        assert_eq!(tats, before, "a refused request consumes nothing");
        assert_eq!(o.remaining(0, &g[0]), 8);
        assert_eq!(o.remaining(1, &g[1]), 0);
        assert_eq!(o.wait(), 30_000_000_000);
    }

    /// A flood of one-off keys (1 000 000 random IPv4 addresses, then 1 000 000
    /// IPv6 addresses inside one /64) keeps the table under its cap, and the keys
    /// tracked before the flood keep their state: the exhausted stay refused, the
    /// fresh keep their allowance.
    #[test]
    fn flood_of_new_keys_is_bounded_and_keeps_known_keys() {
        let cap = 10_000;
        let store = LocalStore::new(cap, 1);
        let g = [Quota::per_hour(5).unwrap().gcra()];
        let mut now = store.now();
        let exhausted: IpAddr = "198.51.100.1".parse().unwrap();
        let fresh: IpAddr = "198.51.100.2".parse().unwrap();
        for _ in 0..5 {
            assert!(store.check(key(&store, exhausted), &g, now).allowed);
        }
        assert!(store.check(key(&store, fresh), &g, now).allowed);

        // xorshift: deterministic, no dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut max_len = 0;
        for i in 0..1_000_000u32 {
            now += 1_000; // 1 µs apart: the whole flood is 1 s, far inside an hour
            let ip = IpAddr::V4(Ipv4Addr::from(next() as u32));
            let _ = store.check(key(&store, ip), &g, now);
            if i % 1024 == 0 {
                max_len = max_len.max(store.len());
            }
        }
        let net = 0x2001_0db8_0000_0001_u128 << 64;
        for _ in 0..1_000_000u32 {
            now += 1_000;
            let ip = IpAddr::V6(Ipv6Addr::from(net | u128::from(next())));
            let _ = store.check(key(&store, ip), &g, now);
        }
        max_len = max_len.max(store.len());
        assert!(max_len <= cap, "tracked {max_len} keys, cap {cap}");
        assert!(store.capacity() <= 4 * cap, "{}", store.capacity());

        // Known keys kept their limits through the flood.
        assert!(!store.check(key(&store, exhausted), &g, now).allowed);
        let o = store.check(key(&store, fresh), &g, now);
        assert!(o.allowed);
        assert_eq!(o.remaining(0, &g[0]), 3);
        // Untracked keys share the overflow state, long since spent by the flood.
        let newcomer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
        assert!(!store.check(key(&store, newcomer), &g, now).allowed);
    }

    #[test]
    fn addresses_inside_one_ipv6_prefix_share_a_key() {
        let store = LocalStore::new(100, 1);
        let g = [Quota::per_hour(2).unwrap().gcra()];
        let now = store.now();
        for (ip, allowed) in [
            ("2001:db8:0:1::1", true),
            ("2001:db8:0:1:ffff::2", true),
            ("2001:db8:0:1:1234:5678:9abc:def0", false),
            ("2001:db8:0:2::1", true),
        ] {
            let o = store.check(key(&store, ip.parse().unwrap()), &g, now);
            assert_eq!(o.allowed, allowed, "{ip}");
        }
    }

    #[test]
    fn idle_keys_are_swept_without_a_background_task() {
        let store = LocalStore::new(10_000, 1);
        let g = [Quota::per_second(10).unwrap().gcra()];
        let mut now = store.now();
        for i in 0..(SWEEP_EVERY as u32 * 3) {
            now += 1_000_000; // 1 ms apart; each key refills in 100 ms
            let ip = IpAddr::V4(Ipv4Addr::from(i));
            let _ = store.check(key(&store, ip), &g, now);
        }
        // Only keys seen in the last 100 ms (and those since the last sweep) remain.
        assert!(store.len() <= SWEEP_EVERY + 100, "{}", store.len());
    }

    #[test]
    fn peek_changes_nothing() {
        let store = LocalStore::new(10, 1);
        let g = [Quota::per_minute(2).unwrap().gcra()];
        let k = key(&store, "192.0.2.1".parse().unwrap());
        let now = store.now();
        assert_eq!(store.peek(k, &g, now), None);
        store.record(k, &g, now);
        assert_eq!(store.peek(k, &g, now), None);
        store.record(k, &g, now);
        assert_eq!(store.peek(k, &g, now), Some(30_000_000_000));
        assert_eq!(store.peek(k, &g, now), Some(30_000_000_000));
    }
}
