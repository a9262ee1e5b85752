//! The in-memory backend: GCRA state per key in a `DashMap`, bounded and self-cleaning.
//!
//! Each tracked key costs one map entry: a 16-byte key and one 8-byte timestamp per
//! policy (24 bytes with one policy, 32 with two, 48 with three or four), plus one
//! control byte and the map's load-factor slack: with one policy at most 57 bytes a
//! key while the table grows (it doubles, and is at least 7/16 full after). Nothing
//! runs in the background: cleanup is amortised over the requests that add keys.

use std::hash::BuildHasherDefault;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;

use super::key::{LocalKey, PreHashed, SipKey};
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
/// untracked key, so a flood of new keys cannot evict or reset the keys already
/// tracked, and cannot grow memory. Both paths read it: [`check`](Self::check)
/// counts an untracked key's request against it and [`peek`](Self::peek) answers
/// from it. The overflow state has its own quota, fixed at construction; a request
/// that resolves to another quota (a principal's tier) is held to the stricter of
/// the two per policy (the longer emission interval, the smaller tolerance), so
/// whatever mix of quotas arrives, the untracked keys together never get more than
/// the overflow quota.
#[derive(Debug)]
pub(crate) struct LocalStore {
    table: Table,
    cap: usize,
    /// The overflow state's quota, one per policy (the first `policies` entries).
    overflow: [Gcra; MAX_POLICIES],
    clock: quanta::Clock,
    /// The clock's raw reading when the store was made.
    epoch: u64,
    hasher: SipKey,
    inserts_since_sweep: AtomicUsize,
    last_sweep: AtomicU64,
    sweeping: AtomicBool,
}

/// The map sized to the number of policies: one timestamp per policy and no more,
/// so a one-policy key costs a 24-byte entry (16-byte key, 8-byte time).
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
            let g = store.overflow_gcras(gcras);
            let mut tats = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
            return decide(&g[..gcras.len()], &mut tats[..], now);
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

    #[cfg(feature = "auth-throttle")]
    /// What [`check`](Self::check) would decide, without counting: the key's own
    /// state if tracked, else the overflow state at the cap, else a fresh key's
    /// (allowed).
    fn peek(&self, store: &LocalStore, key: LocalKey, gcras: &[Gcra], now: u64) -> Option<u64> {
        // Racing an insert, this is the same as looking before it. While nothing is
        // tracked the table is below its cap (which is at least 1), so an untracked
        // key would get a fresh entry.
        if self.tracked.load(Ordering::Acquire) == 0 {
            return None;
        }
        if let Some(slots) = self.map.get(&key) {
            return would_deny(gcras, slots.iter().map(|t| t.load(Ordering::Acquire)), now);
        }
        if self.map.len() < store.cap {
            return None;
        }
        // At the cap, forget refilled keys first as `check_untracked` does, so that
        // the two agree on whether this key would get an entry or share the overflow.
        store.maybe_sweep(now);
        if self.map.len() < store.cap {
            return None;
        }
        let g = store.overflow_gcras(gcras);
        let tats = *self.overflow.lock().unwrap_or_else(|p| p.into_inner());
        would_deny(&g[..gcras.len()], tats.into_iter(), now)
    }

    #[cfg(feature = "auth-throttle")]
    fn refund(&self, store: &LocalStore, key: LocalKey, gcras: &[Gcra]) {
        if let Some(slots) = self.map.get(&key) {
            for (slot, g) in slots.iter().zip(gcras) {
                let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                    Some(t.saturating_sub(g.t))
                });
            }
            return;
        }
        if self.map.len() >= store.cap {
            let g = store.overflow_gcras(gcras);
            let mut tats = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
            for (t, g) in tats.iter_mut().zip(&g[..gcras.len()]) {
                *t = t.saturating_sub(g.t);
            }
        }
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

#[cfg(feature = "auth-throttle")]
/// The longest wait of any policy that would refuse the next request, if one would.
fn would_deny(gcras: &[Gcra], tats: impl Iterator<Item = u64>, now: u64) -> Option<u64> {
    gcras
        .iter()
        .zip(tats)
        .filter_map(|(g, t)| g.would_deny(t, now))
        .max()
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
    /// A store for at most `cap` keys and one policy per entry of `overflow` (1 to
    /// [`MAX_POLICIES`]), each entry the quota the untracked keys share at the cap.
    pub(crate) fn new(cap: usize, overflow: &[Gcra]) -> Self {
        assert!(
            (1..=MAX_POLICIES).contains(&overflow.len()),
            "1 to {MAX_POLICIES} policies"
        );
        let table = match overflow.len() {
            1 => Table::One(Slots::new()),
            2 => Table::Two(Slots::new()),
            _ => Table::Four(Slots::new()),
        };
        let mut quota = [overflow[0]; MAX_POLICIES];
        quota[..overflow.len()].copy_from_slice(overflow);
        let clock = quanta::Clock::new();
        Self {
            table,
            cap,
            overflow: quota,
            epoch: clock.raw(),
            clock,
            hasher: SipKey::random(),
            inserts_since_sweep: AtomicUsize::new(0),
            last_sweep: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
        }
    }

    /// The store on `clock` instead of the monotonic clock (tests drive time).
    #[cfg(test)]
    pub(crate) fn with_clock(mut self, clock: quanta::Clock) -> Self {
        self.epoch = clock.raw();
        self.clock = clock;
        self
    }

    /// Whether `key` has its own entry (tests tell tracked keys from the overflow).
    #[cfg(test)]
    pub(crate) fn is_tracked(&self, key: LocalKey) -> bool {
        match &self.table {
            Table::One(t) => t.map.contains_key(&key),
            Table::Two(t) => t.map.contains_key(&key),
            Table::Four(t) => t.map.contains_key(&key),
        }
    }

    /// The parameters the overflow state is checked with for a request resolving
    /// to `gcras`: per policy the stricter of the request's and the overflow quota,
    /// so the untracked keys together never get more than the overflow quota, and a
    /// key whose own quota is stricter stays held to it.
    fn overflow_gcras(&self, gcras: &[Gcra]) -> [Gcra; MAX_POLICIES] {
        let mut g = self.overflow;
        for (o, r) in g.iter_mut().zip(gcras) {
            *o = Gcra {
                t: o.t.max(r.t),
                tau: o.tau.min(r.tau),
            };
        }
        g
    }

    pub(crate) fn hasher(&self) -> &SipKey {
        &self.hasher
    }

    /// Monotonic nanoseconds since the store was made (wall-clock jumps do not
    /// matter). Starts at 1 s so that 0 can mean "never seen". The clock is `quanta`'s
    /// monotonic clock, the one governor uses.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        // A reading at or before the epoch counts as 0.
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

    #[cfg(feature = "auth-throttle")]
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

    #[cfg(feature = "auth-throttle")]
    /// Reads the decisions without counting: would [`check`](Self::check) refuse the
    /// next request for `key` now, and after how long (ns) would it be allowed? A
    /// tracked key answers from its own state; an untracked key at the cap from the
    /// overflow state, exactly as `check` would count it; any other key is fresh.
    /// (It may forget fully refilled keys, which changes no decision.)
    pub(crate) fn peek(&self, key: LocalKey, gcras: &[Gcra], now: u64) -> Option<u64> {
        match &self.table {
            Table::One(t) => t.peek(self, key, gcras, now),
            Table::Two(t) => t.peek(self, key, gcras, now),
            Table::Four(t) => t.peek(self, key, gcras, now),
        }
    }

    #[cfg(feature = "auth-throttle")]
    /// Takes back one request that [`check`](Self::check) allowed for `key` under
    /// `gcras` (the same ones): a request counted up front whose outcome turned out
    /// not to count. It moves the key's state, or the overflow state at the cap, one
    /// emission interval back; a key forgotten meanwhile is fresh already.
    pub(crate) fn refund(&self, key: LocalKey, gcras: &[Gcra]) {
        match &self.table {
            Table::One(t) => t.refund(self, key, gcras),
            Table::Two(t) => t.refund(self, key, gcras),
            Table::Four(t) => t.refund(self, key, gcras),
        }
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
        let g = [Quota::per_hour(5).unwrap().gcra()];
        let store = LocalStore::new(cap, &g);
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
        let g = [Quota::per_hour(2).unwrap().gcra()];
        let store = LocalStore::new(100, &g);
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
        let g = [Quota::per_second(10).unwrap().gcra()];
        let store = LocalStore::new(10_000, &g);
        let mut now = store.now();
        for i in 0..(SWEEP_EVERY as u32 * 3) {
            now += 1_000_000; // 1 ms apart; each key refills in 100 ms
            let ip = IpAddr::V4(Ipv4Addr::from(i));
            let _ = store.check(key(&store, ip), &g, now);
        }
        // Only keys seen in the last 100 ms (and those since the last sweep) remain.
        assert!(store.len() <= SWEEP_EVERY + 100, "{}", store.len());
    }

    /// A quota from small numbers: `count` per `window` seconds, `burst` at once.
    fn small_quota((count, window, burst): (u32, u64, u32)) -> Gcra {
        Quota::new(count, std::time::Duration::from_secs(window))
            .and_then(|q| q.with_burst(burst))
            .unwrap()
            .gcra()
    }

    fn small_quotas() -> impl proptest::strategy::Strategy<Value = (u32, u64, u32)> {
        (1u32..6, 1u64..10, 1u32..6)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// At the cap, the keys not tracked share one state: across all of them, the
        /// requests allowed never exceed the overflow quota of any policy (its burst
        /// plus one per emission interval elapsed), whatever quota each request
        /// resolves to (a tier larger or smaller than the default), the cap, the
        /// number of policies, the order of keys and the time steps. `peek` agrees
        /// with `check` on every key.
        #[test]
        fn untracked_keys_never_exceed_the_overflow_quota(
            cap in 1usize..8,
            defaults in proptest::collection::vec(small_quotas(), 1..=3),
            tiers in proptest::collection::vec(proptest::collection::vec(small_quotas(), 3), 3),
            steps in proptest::collection::vec((0u8..20, 0usize..4, 0u64..2_000_000_000), 1..200),
        ) {
            let n = defaults.len();
            let overflow: Vec<Gcra> = defaults.into_iter().map(small_quota).collect();
            // Tier 0 is the default quota; tiers 1 to 3 are random, per policy.
            let mut quotas = vec![overflow.clone()];
            for t in tiers {
                quotas.push(t.into_iter().take(n).map(small_quota).collect());
            }
            let (clock, mock) = quanta::Clock::mock();
            let store = LocalStore::new(cap, &overflow).with_clock(clock);
            let start = store.now();
            let mut allowed_untracked = 0u64;
            for (host, tier, step) in steps {
                mock.increment(step);
                let now = store.now();
                let k = key(&store, IpAddr::V4(Ipv4Addr::new(192, 0, 2, host)));
                let gcras = &quotas[tier];
                let peeked = store.peek(k, gcras, now);
                let out = store.check(k, gcras, now);
                proptest::prop_assert_eq!(peeked.is_none(), out.allowed, "peek and check disagree");
                proptest::prop_assert!(store.len() <= cap);
                if out.allowed && !store.is_tracked(k) {
                    allowed_untracked += 1;
                    for g in &overflow {
                        let bound = g.tau / g.t + 1 + (now - start) / g.t;
                        proptest::prop_assert!(
                            allowed_untracked <= bound,
                            "{} requests of untracked keys allowed, the overflow quota {:?} allows {}",
                            allowed_untracked,
                            g,
                            bound
                        );
                    }
                }
            }
        }
    }

    /// The heap a one-policy table holds per tracked key, from its bucket count (one
    /// entry and one control byte per bucket), stays within 64 bytes as it grows.
    #[test]
    fn a_tracked_key_costs_at_most_64_bytes() {
        type Entry = (LocalKey, [AtomicU64; 1]);
        assert_eq!(std::mem::size_of::<Entry>(), 24);
        let g = [Quota::per_hour(1).unwrap().gcra()];
        let store = LocalStore::new(1 << 20, &g);
        let now = store.now();
        let mut worst = 0f64;
        for i in 0..200_000u32 {
            let _ = store.check(key(&store, IpAddr::V4(i.into())), &g, now);
            let n = i + 1;
            // Right after each doubling is the emptiest the table gets.
            if n >= 1024 {
                // hashbrown keeps 7 of every 8 buckets usable.
                let buckets = store.capacity() as f64 * 8.0 / 7.0;
                let per_key = buckets * (std::mem::size_of::<Entry>() + 1) as f64 / f64::from(n);
                worst = worst.max(per_key);
            }
        }
        assert!(worst <= 64.0, "{worst:.1} B per key");
    }

    #[test]
    fn peek_changes_nothing() {
        let g = [Quota::per_minute(2).unwrap().gcra()];
        let store = LocalStore::new(10, &g);
        let k = key(&store, "192.0.2.1".parse().unwrap());
        let now = store.now();
        assert_eq!(store.peek(k, &g, now), None);
        assert!(store.check(k, &g, now).allowed);
        assert_eq!(store.peek(k, &g, now), None);
        assert!(store.check(k, &g, now).allowed);
        assert_eq!(store.peek(k, &g, now), Some(30_000_000_000));
        assert_eq!(store.peek(k, &g, now), Some(30_000_000_000));
    }
}
