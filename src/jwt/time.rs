//! Claim times: the window of accepted NumericDates, the clock, and the checked
//! arithmetic of the time rules, shared by the verifier, its cache and the issuer.
//!
//! Every claim time must lie in `0 ..= MAX_NUMERIC_DATE` (1970-01-01T00:00:00Z to
//! 9999-12-31T23:59:59Z); the leeway is at most [`LONGEST_LEEWAY`] and a lifetime at
//! most [`LONGEST_LIFETIME`]. Sums and differences of such values are far from the
//! `i64` limits, and are computed with checked operations all the same: a result that
//! does not fit refuses the token, so no value can wrap around a check, whatever the
//! build's overflow settings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::TokenRejection;

/// Latest accepted claim time: 9999-12-31T23:59:59Z. The earliest is 0.
pub(crate) const MAX_NUMERIC_DATE: i64 = 253_402_300_799;

/// Upper bound of the verifier's leeway.
pub(crate) const LONGEST_LEEWAY: Duration = Duration::from_secs(300);

/// Upper bound of a verifier's maximum lifetime and of a minted token's lifetime.
pub(crate) const LONGEST_LIFETIME: Duration = Duration::from_secs(86_400);

/// Whether `t` is a claim time this crate accepts.
pub(crate) fn in_window(t: i64) -> bool {
    (0..=MAX_NUMERIC_DATE).contains(&t)
}

/// Now, in whole seconds since the epoch, clamped into the window: a clock before
/// 1970 reads 0 and one past the year 9999 reads [`MAX_NUMERIC_DATE`]; either way
/// every token is refused as expired or not yet valid, never accepted for longer.
pub(crate) fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_or(MAX_NUMERIC_DATE, |s| s.min(MAX_NUMERIC_DATE)),
        Err(_) => 0,
    }
}

/// A claim time as a `SystemTime`, clamped into the window (claims reaching this
/// are inside it already).
pub(crate) fn to_system_time(t: i64) -> SystemTime {
    let secs = t.clamp(0, MAX_NUMERIC_DATE).unsigned_abs();
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH)
}

/// A duration in whole seconds as an `i64`, saturating (bounded durations only
/// reach this).
pub(crate) fn secs_i64(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The time rules of a token at `now`. On success, returns the first second at which
/// the token is refused as expired: `exp + leeway`. The verifier and its cache both
/// use that value, so the cache never serves a token the verifier would refuse.
///
/// Accepts exactly when every time is inside the window and `now < exp + leeway`,
/// `iat <= now + leeway`, `iat < exp`, `exp - iat <= max_lifetime`, and
/// `nbf <= now + leeway` when `nbf` is present (RFC 7519 §4.1.4, §4.1.5). The checks
/// run in that order, so each refusal has one class: a time outside the window is
/// [`InvalidClaims`](TokenRejection::InvalidClaims), like any malformed claim value.
pub(crate) fn check_times(
    exp: i64,
    iat: i64,
    nbf: Option<i64>,
    now: i64,
    leeway: i64,
    max_lifetime: i64,
) -> Result<i64, TokenRejection> {
    use TokenRejection as R;
    if !in_window(exp) || !in_window(iat) || nbf.is_some_and(|t| !in_window(t)) {
        return Err(R::InvalidClaims);
    }
    // The first refused second; it fits, as exp and the leeway are bounded.
    let refused_from = exp.checked_add(leeway).ok_or(R::InvalidClaims)?;
    if now >= refused_from {
        return Err(R::Expired);
    }
    // A clock so far ahead that `now + leeway` does not fit has passed every `exp`.
    let latest_start = now.checked_add(leeway).ok_or(R::Expired)?;
    if iat > latest_start {
        return Err(R::IssuedInFuture);
    }
    if exp <= iat {
        return Err(R::InvalidClaims);
    }
    match exp.checked_sub(iat) {
        Some(lifetime) if lifetime <= max_lifetime => {}
        _ => return Err(R::LifetimeTooLong),
    }
    if nbf.is_some_and(|nbf| nbf > latest_start) {
        return Err(R::NotYetValid);
    }
    Ok(refused_from)
}

#[cfg(test)]
mod tests {
    //! The time rules over every `i64`: directly, and through the verifier with
    //! really signed tokens and a fixed clock, with and without the cache. Expected
    //! values are computed in `i128` from the rules as written in RFC 7519, so these
    //! tests mean the same with and without overflow checks.

    use std::sync::Arc;
    use std::time::Duration;

    use jsonwebtoken::EncodingKey;
    use proptest::prelude::*;

    use super::*;
    use crate::jwt::{TokenVerifier, VerifiedToken, VerifyingKey};

    const SECRET: [u8; 32] = *b"claim-times-test-secret-32-bytes";
    const ISS: &str = "https://ci.example";
    const AUD: &str = "jobs-api";
    /// 2023-11-14T22:13:20Z.
    const NOW: i64 = 1_700_000_000;

    fn token(iat: i64, exp: i64, nbf: Option<i64>) -> String {
        let nbf = nbf.map(|n| format!(r#","nbf":{n}"#)).unwrap_or_default();
        let claims =
            format!(r#"{{"iss":"{ISS}","sub":"svc","aud":"{AUD}","iat":{iat},"exp":{exp}{nbf}}}"#);
        let b64 = |s: &str| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
        };
        let input = format!("{}.{}", b64(r#"{"alg":"HS256"}"#), b64(&claims));
        let sig = jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &EncodingKey::from_secret(&SECRET),
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap();
        format!("{input}.{sig}")
    }

    fn verifier(
        leeway: Duration,
        max_lifetime: Duration,
        cache: usize,
    ) -> Result<TokenVerifier, crate::ConfigError> {
        TokenVerifier::builder()
            .key(VerifyingKey::hs256(&SECRET).unwrap())
            .issuer(ISS)
            .audience(AUD)
            .leeway(leeway)
            .max_lifetime(max_lifetime)
            .cache_capacity(cache)
            .build()
    }

    /// The rules in `i128`, where no sum or difference of two `i64` overflows.
    fn accepted_by_the_rules(
        exp: i64,
        iat: i64,
        nbf: Option<i64>,
        now: i64,
        leeway: i64,
        max_lifetime: i64,
    ) -> bool {
        let w = |t: i64| (0..=MAX_NUMERIC_DATE).contains(&t);
        let windowed = w(exp) && w(iat) && nbf.is_none_or(w);
        let (exp, iat, now, leeway) = (
            i128::from(exp),
            i128::from(iat),
            i128::from(now),
            i128::from(leeway),
        );
        windowed
            && now < exp + leeway
            && iat <= now + leeway
            && iat < exp
            && exp - iat <= i128::from(max_lifetime)
            && nbf.is_none_or(|n| i128::from(n) <= now + leeway)
    }

    #[test]
    fn boundaries() {
        use TokenRejection as R;
        let c = |exp, iat, nbf, now| check_times(exp, iat, nbf, now, 30, 3600);
        // `exp`: accepted in the second before `exp + leeway`, refused from it on.
        assert_eq!(c(NOW + 600, NOW, None, NOW + 629), Ok(NOW + 630));
        assert_eq!(c(NOW + 600, NOW, None, NOW + 630), Err(R::Expired));
        assert_eq!(
            check_times(NOW + 600, NOW, None, NOW + 599, 0, 3600),
            Ok(NOW + 600)
        );
        assert_eq!(
            check_times(NOW + 600, NOW, None, NOW + 600, 0, 3600),
            Err(R::Expired)
        );
        // `iat` and `nbf`: accepted up to `now + leeway`.
        assert!(c(NOW + 600, NOW + 30, None, NOW).is_ok());
        assert_eq!(c(NOW + 600, NOW + 31, None, NOW), Err(R::IssuedInFuture));
        assert!(c(NOW + 600, NOW, Some(NOW + 30), NOW).is_ok());
        assert_eq!(c(NOW + 600, NOW, Some(NOW + 31), NOW), Err(R::NotYetValid));
        // The lifetime: at most the maximum, and positive.
        assert!(c(NOW + 3600, NOW, None, NOW).is_ok());
        assert_eq!(c(NOW + 3601, NOW, None, NOW), Err(R::LifetimeTooLong));
        assert_eq!(c(NOW, NOW, None, NOW), Err(R::InvalidClaims));
        // The window's edges.
        assert!(c(600, 0, Some(0), 0).is_ok());
        assert!(
            c(
                MAX_NUMERIC_DATE,
                MAX_NUMERIC_DATE - 600,
                None,
                MAX_NUMERIC_DATE
            )
            .is_ok()
        );
        for (exp, iat, nbf) in [
            (MAX_NUMERIC_DATE + 1, MAX_NUMERIC_DATE - 600, None),
            (600, -1, None),
            (600, 0, Some(-1)),
            (600, 0, Some(MAX_NUMERIC_DATE + 1)),
        ] {
            assert_eq!(c(exp, iat, nbf, NOW), Err(R::InvalidClaims));
        }
    }

    #[test]
    fn overflowing_lifetimes_are_refused() {
        let v = verifier(Duration::from_secs(30), Duration::from_secs(3600), 64).unwrap();
        for (iat, exp) in [
            (i64::MIN, i64::MAX),
            (i64::MIN, NOW + 60),
            (i64::MIN + 1, i64::MAX - 1),
            (-1, i64::MAX),
            (NOW, i64::MAX),
            (i64::MIN, 3600),
            (-3600, 0),
        ] {
            let t = token(iat, exp, None);
            assert_eq!(
                v.verify_token_at(&t, NOW).unwrap_err(),
                TokenRejection::InvalidClaims,
                "iat {iat}, exp {exp}"
            );
        }
        // Refused by `verify` too, whatever the real clock.
        assert!(v.verify(&token(i64::MIN, i64::MAX, None)).is_err());
    }

    #[test]
    fn the_cache_refuses_at_exp_plus_leeway_exactly() {
        let v = verifier(Duration::from_secs(30), Duration::from_secs(3600), 64).unwrap();
        let t = token(NOW, NOW + 600, None);
        let first = v.verify_token_at(&t, NOW).unwrap();
        assert_eq!(v.cached_tokens(), 1);
        // Served from the cache up to the last second the verifier accepts ...
        for now in [NOW + 599, NOW + 600, NOW + 629] {
            let again = v.verify_token_at(&t, now).unwrap();
            assert!(
                Arc::ptr_eq(&first, &again),
                "served from the cache at {now}"
            );
        }
        // ... and refused from `exp + leeway` on, the entry dropped.
        assert_eq!(
            v.verify_token_at(&t, NOW + 630).unwrap_err(),
            TokenRejection::Expired
        );
        assert_eq!(v.cached_tokens(), 0);
        // A token verified in its last accepted second is not served after it.
        v.verify_token_at(&t, NOW + 629).unwrap();
        assert_eq!(
            v.verify_token_at(&t, NOW + 630).unwrap_err(),
            TokenRejection::Expired
        );
    }

    /// A claim time: absolute, or relative to the clock, to `now ± leeway` or to
    /// `exp - max_lifetime`, so every boundary is hit often.
    #[derive(Clone, Copy, Debug)]
    enum At {
        Abs(i64),
        Now(i64),
        NowPlusLeeway(i64),
        NowMinusLeeway(i64),
        ExpMinusMax(i64),
    }

    impl At {
        fn resolve(self, now: i64, leeway: i64, exp: i64, max: i64) -> i64 {
            match self {
                At::Abs(t) => t,
                At::Now(d) => now.saturating_add(d),
                At::NowPlusLeeway(d) => now.saturating_add(leeway).saturating_add(d),
                At::NowMinusLeeway(d) => now.saturating_sub(leeway).saturating_add(d),
                At::ExpMinusMax(d) => exp.saturating_sub(max).saturating_add(d),
            }
        }
    }

    fn extreme() -> impl Strategy<Value = i64> {
        prop::sample::select(vec![
            i64::MIN,
            i64::MIN + 1,
            -MAX_NUMERIC_DATE,
            -1,
            0,
            1,
            NOW,
            MAX_NUMERIC_DATE - 1,
            MAX_NUMERIC_DATE,
            MAX_NUMERIC_DATE + 1,
            i64::MAX - MAX_NUMERIC_DATE,
            i64::MAX - 1,
            i64::MAX,
        ])
    }

    fn at() -> impl Strategy<Value = At> {
        prop_oneof![
            2 => any::<i64>().prop_map(At::Abs),
            2 => extreme().prop_map(At::Abs),
            1 => (0..=MAX_NUMERIC_DATE).prop_map(At::Abs),
            3 => (-100_000i64..100_000).prop_map(At::Now),
            3 => (-2i64..=2).prop_map(At::Now),
            3 => (-2i64..=2).prop_map(At::NowPlusLeeway),
            3 => (-2i64..=2).prop_map(At::NowMinusLeeway),
            3 => (-2i64..=2).prop_map(At::ExpMinusMax),
        ]
    }

    fn now() -> impl Strategy<Value = i64> {
        prop_oneof![
            4 => 1_600_000_000i64..2_100_000_000,
            2 => 0..=MAX_NUMERIC_DATE,
            1 => extreme(),
            1 => any::<i64>(),
        ]
    }

    fn secs(typical: std::ops::RangeInclusive<u64>) -> impl Strategy<Value = u64> {
        prop_oneof![
            14 => typical,
            1 => prop::sample::select(vec![0, 1, 300, 301, 86_400, 86_401, u64::MAX]),
            1 => any::<u64>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn check_times_is_the_rules(
            exp in any::<i64>(), iat in any::<i64>(), nbf in any::<Option<i64>>(),
            now in any::<i64>(), leeway in 0i64..=300, max in 1i64..=86_400,
            pick in extreme(),
        ) {
            for (exp, iat) in [(exp, iat), (pick, iat), (exp, pick), (pick, pick)] {
                let got = check_times(exp, iat, nbf, now, leeway, max);
                prop_assert_eq!(got.is_ok(), accepted_by_the_rules(exp, iat, nbf, now, leeway, max));
                if let Ok(refused_from) = got {
                    prop_assert_eq!(i128::from(refused_from), i128::from(exp) + i128::from(leeway));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]

        #[test]
        fn the_verifier_and_its_cache_apply_the_rules(
            now in now(),
            leeway in secs(0..=300),
            max in secs(1..=86_400),
            exp in at(),
            iat in at(),
            nbf in prop::option::of(at()),
        ) {
            let (leeway_d, max_d) = (Duration::from_secs(leeway), Duration::from_secs(max));
            let (Ok(cached), Ok(uncached)) =
                (verifier(leeway_d, max_d, 64), verifier(leeway_d, max_d, 0))
            else {
                // Refused at construction, and only outside the documented bounds.
                prop_assert!(leeway > 300 || max == 0 || max > 86_400);
                return Ok(());
            };
            let (leeway, max) = (secs_i64(leeway_d), secs_i64(max_d));
            let exp = exp.resolve(now, leeway, 0, max);
            let iat = iat.resolve(now, leeway, exp, max);
            let nbf = nbf.map(|n| n.resolve(now, leeway, exp, max));
            let t = token(iat, exp, nbf);

            let got = cached.verify_token_at(&t, now);
            let class = |r: &Result<Arc<VerifiedToken>, TokenRejection>| r.as_ref().err().copied();
            prop_assert_eq!(class(&got), class(&uncached.verify_token_at(&t, now)));
            let want = accepted_by_the_rules(exp, iat, nbf, now, leeway, max);
            prop_assert_eq!(got.is_ok(), want, "iat {} nbf {:?} exp {} now {}", iat, nbf, exp, now);
            let in_window = [Some(exp), Some(iat), nbf].into_iter().flatten().all(in_window);
            if !in_window {
                prop_assert_eq!(class(&got), Some(TokenRejection::InvalidClaims));
            }
            let Ok(first) = got else { return Ok(()) };

            // Acceptance implies each rule, in `i128`.
            let (e, i, n, l) = (i128::from(exp), i128::from(iat), i128::from(now), i128::from(leeway));
            prop_assert!(i <= n + l);
            prop_assert!(nbf.is_none_or(|b| i128::from(b) <= n + l));
            prop_assert!(n < e + l);
            prop_assert!(0 < e - i && e - i <= i128::from(max));

            // The cache serves the token up to the verifier's last accepted second
            // and refuses it from `exp + leeway` on, as the verifier does.
            let refused_from = exp.checked_add(leeway).expect("exp is inside the window");
            let last = refused_from - 1;
            let again = cached.verify_token_at(&t, last).expect("accepted until exp + leeway");
            prop_assert!(Arc::ptr_eq(&first, &again));
            prop_assert!(uncached.verify_token_at(&t, last).is_ok());
            for at in [refused_from, refused_from.saturating_add(1), i64::MAX] {
                prop_assert_eq!(class(&cached.verify_token_at(&t, at)), Some(TokenRejection::Expired));
                prop_assert_eq!(class(&uncached.verify_token_at(&t, at)), Some(TokenRejection::Expired));
            }
            prop_assert_eq!(cached.cached_tokens(), 0);
        }
    }
}
