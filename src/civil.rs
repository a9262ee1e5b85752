//! Calendar dates of day counts, shared by the JSON log format and the `portcullis`
//! command (which includes this file as a module of its own).

/// The proleptic Gregorian date (year, month, day) of a day count since 1970-01-01
/// (Howard Hinnant's algorithm; negative counts are dates before 1970).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // `m` is 1 to 12 and `d` 1 to 31.
    (y, m as u32, d as u32)
}
