//! The TOML key file: parsed fully, validated, positions in every error, no values.

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use toml::de::{DeTable, DeValue};
use toml_datetime::{Datetime, Offset};

use super::KeyDigest;
use super::record::KeyRecord;
use crate::principal::check_name;
use crate::{ConfigError, IpSet, Scopes};

const FIELDS: &str =
    "id, digest, scopes, tier, not_before, expires_at, revoked, allowed_ips, credits";

/// Line and column (1-based, in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn err_at(text: &str, span: Range<usize>, msg: impl std::fmt::Display) -> ConfigError {
    let (line, column) = position(text, span.start);
    ConfigError::new(format!("line {line}, column {column}: {msg}"))
}

/// The TOML parser's message with anything quoted removed: a parse error must not
/// repeat a value from the file (which could be a key pasted by mistake).
fn sanitize(message: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in message.lines().next().unwrap_or("").chars() {
        match c {
            '"' | '\'' => {
                if !quoted {
                    out.push_str("\"…\"");
                }
                quoted = !quoted;
            }
            _ if quoted => {}
            _ => out.push(c),
        }
    }
    out.chars().take(200).collect()
}

/// The records of a key file, each with the line it starts on (for errors the store
/// finds later, such as a duplicate digest).
pub(super) fn parse_key_file(text: &str) -> Result<Vec<(KeyRecord, Option<String>)>, ConfigError> {
    let doc = DeTable::parse(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        err_at(
            text,
            span,
            format_args!("invalid TOML: {}", sanitize(e.message())),
        )
    })?;
    let mut keys = None;
    for (name, value) in doc.get_ref().iter() {
        if name.get_ref() == "keys" {
            keys = Some(value);
        } else {
            return Err(err_at(
                text,
                name.span(),
                "unknown top-level entry; the file holds only [[keys]] tables",
            ));
        }
    }
    let Some(keys) = keys else {
        return Err(ConfigError::new(
            "the key file has no [[keys]] entries: the key store would be empty",
        ));
    };
    let DeValue::Array(array) = keys.get_ref() else {
        return Err(err_at(
            text,
            keys.span(),
            "`keys` must be an array of tables ([[keys]])",
        ));
    };
    let mut records = Vec::with_capacity(array.len());
    for item in array.iter() {
        let DeValue::Table(table) = item.get_ref() else {
            return Err(err_at(
                text,
                item.span(),
                "each `keys` entry must be a table",
            ));
        };
        let record = parse_record(text, item.span(), table)?;
        let (line, _) = position(text, item.span().start);
        records.push((record, Some(format!("line {line}"))));
    }
    Ok(records)
}

fn parse_record(
    text: &str,
    span: Range<usize>,
    table: &DeTable<'_>,
) -> Result<KeyRecord, ConfigError> {
    let mut id = None;
    let mut digest = None;
    let mut scopes = Scopes::default();
    let mut tier = None;
    let mut not_before = None;
    let mut expires_at = None;
    let mut revoked = false;
    let mut allowed_ips = None;
    let mut credits = None;
    for (name, value) in table.iter() {
        let at = value.span();
        let v = value.get_ref();
        match &**name.get_ref() {
            "id" => {
                let s = string(text, at.clone(), v, "id")?;
                check_name("key id", s).map_err(|e| err_at(text, at, e))?;
                id = Some(s);
            }
            "digest" => {
                let s = string(text, at.clone(), v, "digest")?;
                digest = Some(KeyDigest::parse(s).map_err(|e| err_at(text, at, e))?);
            }
            "scopes" => {
                let DeValue::Array(items) = v else {
                    return Err(err_at(text, at, "`scopes` must be an array of strings"));
                };
                let mut tokens = Vec::with_capacity(items.len());
                for item in items.iter() {
                    tokens.push(string(text, item.span(), item.get_ref(), "each scope")?);
                }
                scopes = Scopes::from_iter_checked(tokens).map_err(|e| err_at(text, at, e))?;
            }
            "tier" => {
                let s = string(text, at.clone(), v, "tier")?;
                check_name("tier", s).map_err(|e| err_at(text, at, e))?;
                tier = Some(s);
            }
            "not_before" => not_before = Some(datetime(text, at, v, "not_before", Leap::Late)?),
            "expires_at" => expires_at = Some(datetime(text, at, v, "expires_at", Leap::Early)?),
            "revoked" => {
                let DeValue::Boolean(b) = v else {
                    return Err(err_at(text, at, "`revoked` must be true or false"));
                };
                revoked = *b;
            }
            "allowed_ips" => {
                let DeValue::Array(items) = v else {
                    return Err(err_at(
                        text,
                        at,
                        "`allowed_ips` must be an array of addresses or CIDR networks",
                    ));
                };
                let mut nets = Vec::with_capacity(items.len());
                for item in items.iter() {
                    let s = string(text, item.span(), item.get_ref(), "each allowed IP")?;
                    let set = IpSet::parse(s).map_err(|e| err_at(text, item.span(), e))?;
                    nets.extend_from_slice(set.nets());
                }
                if nets.is_empty() {
                    return Err(err_at(
                        text,
                        at,
                        "`allowed_ips` is empty: the key could not be used from anywhere (remove the entry, or revoke the key)",
                    ));
                }
                allowed_ips = Some(IpSet::from_nets(nets).map_err(|e| err_at(text, at, e))?);
            }
            "credits" => {
                let DeValue::Integer(i) = v else {
                    return Err(err_at(
                        text,
                        at,
                        "`credits` must be a whole number of requests, 0 or more",
                    ));
                };
                let digits = i.as_str().replace('_', "");
                let n = (i.radix() == 10)
                    .then(|| digits.trim_start_matches('+').parse::<u64>().ok())
                    .flatten()
                    .ok_or_else(|| {
                        err_at(
                            text,
                            at,
                            "`credits` must be a whole number of requests, 0 or more",
                        )
                    })?;
                credits = Some(n);
            }
            "key" | "secret" | "api_key" => {
                return Err(err_at(
                    text,
                    name.span(),
                    "a key file holds digests only, never keys: remove this entry and rotate the key",
                ));
            }
            _ => {
                return Err(err_at(
                    text,
                    name.span(),
                    format_args!("unknown field; expected one of {FIELDS}"),
                ));
            }
        }
    }
    let id = id.ok_or_else(|| err_at(text, span.clone(), "key entry without `id`"))?;
    let digest = digest.ok_or_else(|| err_at(text, span.clone(), "key entry without `digest`"))?;
    let mut record = KeyRecord::new(id, digest)
        .map_err(|e| err_at(text, span.clone(), e))?
        .with_scopes(scopes)
        .revoked(revoked);
    if let Some(t) = tier {
        record = record
            .with_tier(t)
            .map_err(|e| err_at(text, span.clone(), e))?;
    }
    if let Some(t) = not_before {
        record = record.not_before(t);
    }
    if let Some(t) = expires_at {
        record = record.expires_at(t);
    }
    if let Some(set) = allowed_ips {
        record = record.with_allowed_ips(set);
    }
    if let Some(n) = credits {
        record = record.with_credits(n);
    }
    if let (Some(nb), Some(exp)) = (not_before, expires_at)
        && exp <= nb
    {
        return Err(err_at(
            text,
            span,
            "`expires_at` must be after `not_before`",
        ));
    }
    Ok(record)
}

fn string<'a>(
    text: &str,
    at: Range<usize>,
    v: &'a DeValue<'_>,
    what: &str,
) -> Result<&'a str, ConfigError> {
    match v {
        DeValue::String(s) => Ok(s),
        _ => Err(err_at(text, at, format_args!("{what} must be a string"))),
    }
}

fn datetime(
    text: &str,
    at: Range<usize>,
    v: &DeValue<'_>,
    what: &str,
    leap: Leap,
) -> Result<SystemTime, ConfigError> {
    let DeValue::Datetime(dt) = v else {
        return Err(err_at(
            text,
            at,
            format_args!("`{what}` must be an RFC 3339 date-time such as 2027-01-31T00:00:00Z"),
        ));
    };
    to_system_time(dt, leap).ok_or_else(|| {
        err_at(
            text,
            at,
            format_args!(
                "`{what}` needs a date, a time and an offset (Z or +hh:mm), e.g. 2027-01-31T00:00:00Z"
            ),
        )
    })
}

/// How a leap second (`:60`) is read. It has no time of its own since the epoch, so
/// it is read on the safe side of the bound it is: a start of validity no earlier
/// than the next minute, an end of validity no later than the end of the second
/// before it. Either way, a later date-time is never read as an earlier time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leap {
    /// `:60` is the last nanosecond of `:59` (for `expires_at`).
    Early,
    /// `:60` is the start of the next minute (for `not_before`).
    Late,
}

/// An offset date-time as a `SystemTime`; `None` for local or partial date-times.
pub(crate) fn to_system_time(dt: &Datetime, leap: Leap) -> Option<SystemTime> {
    let (date, time, offset) = (dt.date?, dt.time?, dt.offset?);
    let (second, nanosecond) = match (time.second, leap) {
        (60.., Leap::Early) => (59, 999_999_999),
        (60.., Leap::Late) => (60, 0),
        (s, _) => (i64::from(s), time.nanosecond),
    };
    let days = days_from_civil(i64::from(date.year), date.month.into(), date.day.into());
    let offset_secs = match offset {
        Offset::Z => 0,
        Offset::Custom { minutes } => i64::from(minutes) * 60,
    };
    let secs = days * 86_400 + i64::from(time.hour) * 3600 + i64::from(time.minute) * 60 + second
        - offset_secs;
    let nanos = Duration::from_nanos(u64::from(nanosecond));
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64) + nanos)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(nanos)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_key::KeyStore;

    fn d(k: &str) -> String {
        KeyDigest::of(k).to_string()
    }

    #[test]
    fn full_file() {
        let text = format!(
            r#"
# two keys of one client during rotation
[[keys]]
id = "billing"
digest = "{}"
scopes = ["jobs:read", "jobs:write"]
tier = "gold"
not_before = 2020-01-01T00:00:00Z
expires_at = 2999-01-01T00:00:00+01:00

[[keys]]
id = "billing"
digest = "{}"
revoked = true
"#,
            d("one"),
            d("two")
        );
        let store = KeyStore::from_toml(&text).unwrap();
        assert_eq!(store.len(), 2);
        let r = store.records().find(|r| !r.is_revoked()).unwrap();
        assert_eq!(r.tier(), Some("gold"));
        assert!(r.scopes().contains("jobs:write"));
        assert_eq!(
            r.valid_from(),
            Some(UNIX_EPOCH + Duration::from_secs(1_577_836_800))
        );
    }

    #[test]
    fn per_key_policy() {
        let text = format!(
            "[[keys]]\nid = \"a\"\ndigest = \"{}\"\nallowed_ips = [\"10.0.0.0/8\", \"192.0.2.7, 2001:db8::/32\"]\ncredits = 1_000\n\n[[keys]]\nid = \"b\"\ndigest = \"{}\"\ncredits = 0\n",
            d("one"),
            d("two")
        );
        let store = KeyStore::from_toml(&text).unwrap();
        let mut records = store.records();
        let (a, b) = (records.next().unwrap(), records.next().unwrap());
        assert_eq!(a.credits(), Some(1000));
        let allowed = a.allowed_ips().unwrap();
        for (addr, inside) in [
            ("10.1.2.3", true),
            ("192.0.2.7", true),
            ("2001:db8::1", true),
            ("192.0.2.8", false),
        ] {
            assert_eq!(allowed.contains(addr.parse().unwrap()), inside, "{addr}");
        }
        assert_eq!((b.credits(), b.allowed_ips().is_none()), (Some(0), true));
        // The count is kept under a name derived from the digest, never the id.
        let name = &a.policy().unwrap().credits.as_ref().unwrap().name;
        assert!(name.starts_with("k:") && name.len() == 34, "{name}");
        assert!(!name.contains(&d("one")[7..]), "{name}");
    }

    #[test]
    fn per_key_policy_errors_name_positions_not_values() {
        let good = d("x");
        let secret = "pc_live_SECRETSECRETSECRETSECRET123456";
        for (extra, needle) in [
            (
                "credits = -1".to_owned(),
                "line 4, column 11: `credits` must be a whole number",
            ),
            (
                "credits = 0x10".to_owned(),
                "`credits` must be a whole number",
            ),
            (
                format!("credits = \"{secret}\""),
                "`credits` must be a whole number",
            ),
            (
                "credits = 1.5".to_owned(),
                "`credits` must be a whole number",
            ),
            ("allowed_ips = []".to_owned(), "`allowed_ips` is empty"),
            (
                format!("allowed_ips = \"{secret}\""),
                "`allowed_ips` must be an array",
            ),
            (
                format!("allowed_ips = [\"10.0.0.0/8\", \"{secret}\"]"),
                "line 4, column 30: IP list entry 1",
            ),
        ] {
            let text = format!("[[keys]]\nid = \"a\"\ndigest = \"{good}\"\n{extra}\n");
            let e = KeyStore::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}\n=> {e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
    }

    #[test]
    fn datetimes() {
        let dt: Datetime = "1970-01-02T00:00:01.5+01:00".parse().unwrap();
        assert_eq!(
            to_system_time(&dt, Leap::Early),
            Some(UNIX_EPOCH + Duration::from_millis(86_401_500 - 3_600_000))
        );
        let dt: Datetime = "1969-12-31T23:59:59Z".parse().unwrap();
        assert_eq!(
            to_system_time(&dt, Leap::Early),
            UNIX_EPOCH.checked_sub(Duration::from_secs(1))
        );
        let local: Datetime = "2027-01-01T00:00:00".parse().unwrap();
        assert_eq!(to_system_time(&local, Leap::Early), None);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn errors_name_positions_not_values() {
        let secret = "pc_live_SECRETSECRETSECRETSECRET123456";
        let good = d("x");
        for (text, needle) in [
            (
                format!("[[keys]]\nid = \"a\"\nkey = \"{secret}\"\n"),
                "line 3, column 1: a key file holds digests only",
            ),
            (
                format!("[[keys]]\nid = \"a\"\ndigest = \"{secret}\"\n"),
                "line 3, column 10: a digest",
            ),
            (
                format!("[[keys]]\nid = \"a\"\ndigest = {secret}\n"),
                "line 3, column 10: invalid TOML",
            ),
            (
                format!("[[keys]]\nid = \"a\"\ndigest = \"{good}\"\nnot_before = \"{secret}\"\n"),
                "line 4, column 14: `not_before` must be",
            ),
            (
                format!("[[keys]]\nid = \"a b\"\ndigest = \"{good}\"\n"),
                "line 2, column 6: key id",
            ),
            (
                format!(
                    "[[keys]]\nid = \"a\"\ndigest = \"{good}\"\nscopes = [\"ok\", \"{secret} x\"]\n"
                ),
                "line 4, column 10: scope 2",
            ),
            (
                "[[keys]]\nid = \"a\"\n".to_owned(),
                "line 1, column 1: key entry without `digest`",
            ),
            (
                format!("[[keys]]\nid = \"a\"\ndigest = \"{good}\"\nrevoked = \"{secret}\"\n"),
                "line 4, column 11",
            ),
            (
                format!(
                    "[[keys]]\nid = \"a\"\ndigest = \"{good}\"\n\n[[keys]]\nid = \"b\"\ndigest = \"{good}\"\n"
                ),
                "line 5: key `b` has the same digest",
            ),
            (
                format!("other = \"{secret}\"\n"),
                "line 1, column 1: unknown top-level",
            ),
            (String::new(), "no [[keys]]"),
            ("keys = []\n".to_owned(), "empty"),
            (
                format!(
                    "[[keys]]\nid = \"a\"\ndigest = \"{good}\"\nnot_before = 2030-01-01T00:00:00Z\nexpires_at = 2029-01-01T00:00:00Z\n"
                ),
                "must be after",
            ),
        ] {
            let e = KeyStore::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}\n=> {e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
    }

    #[test]
    fn sanitize_drops_quoted_text() {
        assert_eq!(sanitize("invalid \"abc\" here"), "invalid \"…\" here");
        assert_eq!(sanitize("a 'b' c\nsecond line"), "a \"…\" c");
    }
}

/// Properties of the date-times of a key file.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// `yyyy-mm-ddThh:mm:ss.nnnnnnnnnZ`, leap seconds included.
    fn text(day: (u16, u8, u8, u8, u8), second: u8, nanos: u32) -> String {
        let (y, mo, d, h, mi) = day;
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{second:02}.{nanos:09}Z")
    }

    fn read(text: &str, leap: Leap) -> SystemTime {
        to_system_time(&text.parse().unwrap(), leap).unwrap()
    }

    proptest! {
        /// Within one minute, a later date-time is never read as an earlier time,
        /// for either bound; a leap second opens a key no earlier than the next
        /// minute and ends one before it; other seconds are read exactly.
        #[test]
        fn date_times_keep_their_order_and_leap_seconds_their_safe_side(
            day in (1970u16..2200, 1u8..=12, 1u8..=28, 0u8..24, 0u8..60),
            a in (0u8..=60, 0u32..1_000_000_000),
            b in (0u8..=60, 0u32..1_000_000_000),
        ) {
            let (early, late) = if a <= b { (a, b) } else { (b, a) };
            let (t1, t2) = (text(day, early.0, early.1), text(day, late.0, late.1));
            for leap in [Leap::Early, Leap::Late] {
                prop_assert!(read(&t1, leap) <= read(&t2, leap), "{} {} {:?}", t1, t2, leap);
            }
            let next_minute = read(&text(day, 0, 0), Leap::Early) + Duration::from_secs(60);
            for (second, nanos) in [a, b] {
                let t = text(day, second, nanos);
                if second == 60 {
                    prop_assert!(read(&t, Leap::Early) < next_minute);
                    prop_assert_eq!(read(&t, Leap::Late), next_minute);
                } else {
                    let exact = read(&text(day, 0, 0), Leap::Early)
                        + Duration::from_secs(second.into())
                        + Duration::from_nanos(nanos.into());
                    prop_assert_eq!(read(&t, Leap::Early), exact);
                    prop_assert_eq!(read(&t, Leap::Late), exact);
                }
            }
        }
    }

    #[test]
    fn a_leap_second_not_before_does_not_open_the_key_early() {
        use crate::api_key::KeyStore;
        let key = "pc_live_EXAMPLExDOxNOTxUSE00000bJVDo";
        let store = KeyStore::from_toml(&format!(
            "[[keys]]\nid = \"a\"\ndigest = \"{}\"\nnot_before = 2016-12-31T23:59:60Z\n\
             expires_at = 2017-01-01T00:00:01Z\n",
            KeyDigest::of(key)
        ))
        .unwrap();
        let at = |secs: u64| store.verify(key, UNIX_EPOCH + Duration::from_secs(secs));
        // 2016-12-31T23:59:59Z, then 2017-01-01T00:00:00Z.
        assert!(at(1_483_228_799).is_err());
        assert!(at(1_483_228_800).is_ok());
    }
}

/// Errors of key files with a key pasted into them anywhere.
#[cfg(test)]
mod error_properties {
    use proptest::prelude::*;

    use crate::api_key::{KeyDigest, KeyStore};

    const PASTED: &str = "pc_live_PaStEdPaStEdPaStEdPaStEd123456";

    fn every_field() -> String {
        format!(
            "[[keys]]\nid = \"billing\"\ndigest = \"{}\"\nscopes = [\"jobs:read\", \"jobs:write\"]\n\
             tier = \"gold\"\nnot_before = 2026-01-01T00:00:00Z\nexpires_at = 2027-01-01T00:00:00Z\n\
             revoked = false\nallowed_ips = [\"10.0.0.0/8\"]\ncredits = 10000\n",
            KeyDigest::of("x")
        )
    }

    proptest! {
        /// A key pasted anywhere into a key file (bare, quoted, in an array, as a
        /// key name, cut short, replacing some of the text) never appears in the
        /// load error, in part or in full.
        #[test]
        fn a_pasted_key_never_reaches_the_error(
            at in any::<prop::sample::Index>(),
            replaced in 0usize..12,
            form in 0usize..8,
            cut in any::<bool>(),
        ) {
            let file = every_field();
            let mut i = at.index(file.len() + 1);
            while !file.is_char_boundary(i) {
                i -= 1;
            }
            let j = (i + replaced).min(file.len());
            let paste = match form {
                0 => PASTED.to_owned(),
                1 => format!("\"{PASTED}\""),
                2 => format!("'{PASTED}'"),
                3 => format!("[\"{PASTED}\"]"),
                4 => format!("{PASTED} = 1"),
                5 => format!("\n{PASTED}\n"),
                6 => format!("\"{PASTED}"),
                _ => format!("`{PASTED}`"),
            };
            let mut text = format!("{}{paste}{}", &file[..i], &file[j..]);
            if cut {
                text.truncate(i + paste.len() / 2);
            }
            if let Err(e) = KeyStore::from_toml(&text) {
                let e = e.to_string();
                prop_assert!(!e.contains("PaStEd") && !e.contains("123456"), "{:?} -> {}", text, e);
            }
        }
    }
}
