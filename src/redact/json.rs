//! A JSON event formatter for `tracing-subscriber` that redacts every line it writes.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::Redactor;
use crate::civil::civil_from_days;

/// Formats each event as one line of JSON and passes the whole line through a
/// [`Redactor`] before the subscriber's writer sees any of it: a secret that any code
/// logs by mistake is caught, whatever the event.
///
/// The line has the layout of `tracing-subscriber`'s JSON format, with its escaping
/// (a control character, an ANSI escape included, is written as `\u00XX`):
///
/// ```text
/// {"timestamp":"2026-12-07T04:12:33.123456Z","level":"INFO","fields":{"message":"request","status":200},"target":"portcullis::access"}
/// ```
///
/// An event inside spans adds `"spans"`, from the root: each span's `"name"`, and its
/// `"fields"` as the subscriber's field formatter wrote them, as one string.
///
/// Redacting here rather than in the writer ([`RedactingMakeWriter`]) gives the same
/// lines for less work: the event is written straight to JSON, without building a
/// map of its fields first. Use one or the other, not both.
///
/// ```
/// use portcullis::redact::RedactingJson;
///
/// let subscriber = tracing_subscriber::fmt()
///     .event_format(RedactingJson::new())
///     .with_writer(std::io::stdout)
///     .finish();
/// tracing::subscriber::with_default(subscriber, || {
///     // Written as {..."fields":{"message":"retrying with token=REDACTED"}...}
///     tracing::info!("retrying with token=abc123");
/// });
/// ```
///
/// [`RedactingMakeWriter`]: super::RedactingMakeWriter
#[derive(Clone, Debug, Default)]
pub struct RedactingJson {
    redactor: Redactor,
}

impl RedactingJson {
    /// Redacts with the default [`Redactor`].
    pub fn new() -> Self {
        Self::with_redactor(Redactor::new())
    }

    /// Redacts with `redactor`.
    pub fn with_redactor(redactor: Redactor) -> Self {
        Self { redactor }
    }
}

thread_local! {
    /// The line being formatted, kept between events so that formatting one does not
    /// allocate. An event logged while another is formatted (from a `Debug` impl) gets
    /// a fresh buffer.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<S, N> FormatEvent<S, N> for RedactingJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        LINE.with(|cell| {
            let mut fresh = String::new();
            let mut held = cell.try_borrow_mut();
            let line = match &mut held {
                Ok(line) => &mut **line,
                Err(_) => &mut fresh,
            };
            line.clear();
            write_line(line, ctx, event);
            let res = writer.write_str(&self.redactor.redact(line));
            if line.capacity() > MAX_KEPT {
                // One huge event does not pin its buffer on this thread for good.
                *line = String::new();
            }
            res
        })
    }
}

/// The largest buffer kept between events.
const MAX_KEPT: usize = 64 * 1024;

fn write_line<S, N>(line: &mut String, ctx: &FmtContext<'_, S, N>, event: &Event<'_>)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let meta = event.metadata();
    line.push_str("{\"timestamp\":\"");
    push_timestamp(line, SystemTime::now());
    line.push_str("\",\"level\":\"");
    line.push_str(meta.level().as_str());
    line.push_str("\",\"fields\":{");
    event.record(&mut JsonFields { line, first: true });
    line.push_str("},\"target\":");
    push_json_string(line, meta.target());
    if let Some(scope) = ctx.event_scope() {
        line.push_str(",\"spans\":[");
        for (i, span) in scope.from_root().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str("{\"name\":");
            push_json_string(line, span.name());
            let ext = span.extensions();
            if let Some(fields) = ext.get::<FormattedFields<N>>()
                && !fields.fields.is_empty()
            {
                line.push_str(",\"fields\":");
                push_json_string(line, &fields.fields);
            }
            line.push('}');
        }
        line.push(']');
    }
    line.push_str("}\n");
}

/// Writes an event's fields as the members of a JSON object, in the order the event
/// records them.
struct JsonFields<'a> {
    line: &'a mut String,
    first: bool,
}

impl JsonFields<'_> {
    fn name(&mut self, field: &Field) {
        if !std::mem::take(&mut self.first) {
            self.line.push(',');
        }
        push_json_string(self.line, field.name());
        self.line.push(':');
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        push_json_string(self.line, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.name(field);
        self.line.push('"');
        // Writing into a `String` cannot fail; a `Debug` impl that reports an error
        // leaves what it wrote, and the string is closed all the same.
        let _ = write!(Escaped(self.line), "{value:?}");
        self.line.push('"');
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        if value < 0 {
            self.line.push('-');
        }
        push_u64(self.line, value.unsigned_abs());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        push_u64(self.line, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        self.line.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        if value.is_finite() {
            // `Debug` keeps the decimal point (`1.0`), so the value reads back as a float.
            let _ = write!(self.line, "{value:?}");
        } else {
            // JSON has no NaN or infinity.
            self.line.push_str("null");
        }
    }
}

/// A `fmt::Write` that escapes what it is given as the inside of a JSON string.
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        push_escaped(self.0, s);
        Ok(())
    }
}

/// Appends `s` as a JSON string, quotes included.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    push_escaped(out, s);
    out.push('"');
}

/// How each byte is written inside a JSON string: 0 as itself, `u` as `\u00XX`, any
/// other value `c` as `\c`. Only ASCII bytes are escaped, so the text between two
/// escapes always starts and ends on a character boundary.
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = b'u';
        b += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Appends `s` escaped as the inside of a JSON string.
pub(crate) fn push_escaped(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time while none needs an escape, the usual case.
        if let Some(word) = bytes.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
            if !needs_escape(w) {
                i += 8;
                continue;
            }
        }
        for j in i..(i + 8).min(bytes.len()) {
            let b = bytes[j];
            let e = ESCAPE[usize::from(b)];
            if e == 0 {
                continue;
            }
            out.push_str(&s[start..j]);
            out.push('\\');
            if e == b'u' {
                out.push_str("u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            } else {
                out.push(char::from(e));
            }
            start = j + 1;
        }
        i += 8;
    }
    out.push_str(&s[start..]);
}

/// Whether any of the eight bytes in `w` is below 0x20, `"` or `\\` (it may also
/// say so for a byte above one that is: the bytes are then looked at one by one).
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space
        | zero_byte(w ^ (ONES * u64::from(b'"')))
        | zero_byte(w ^ (ONES * u64::from(b'\\'))))
        != 0
}

/// Appends `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&buf[i..]).expect("ASCII digits"));
}

/// Writes `n` as `buf.len()` decimal digits, zero-padded (higher digits dropped).
fn put_digits(buf: &mut [u8], mut n: u64) {
    for b in buf.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Appends `t` in UTC as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (a time before 1970 as 1970).
fn push_timestamp(out: &mut String, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    // `secs / 86_400` is below 2^47: the conversion never saturates.
    let (y, m, d) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(i64::MAX));
    let s = secs % 86_400;
    let mut buf = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut buf[0..4], y.unsigned_abs());
    put_digits(&mut buf[5..7], m.into());
    put_digits(&mut buf[8..10], d.into());
    put_digits(&mut buf[11..13], s / 3600);
    put_digits(&mut buf[14..16], s / 60 % 60);
    put_digits(&mut buf[17..19], s % 60);
    put_digits(&mut buf[20..26], u64::from(since.subsec_micros()));
    out.push_str(std::str::from_utf8(&buf).expect("ASCII digits"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_match_a_byte_by_byte_escape() {
        // Every byte value at every position of a word, and runs across words.
        for b in 0..=0x7fu8 {
            for at in 0..20 {
                let mut s = "abcdefghijklmnopqrst".to_owned().into_bytes();
                s[at] = b;
                let s = String::from_utf8(s).unwrap();
                let mut fast = String::new();
                push_escaped(&mut fast, &s);
                let mut slow = String::new();
                for c in s.chars() {
                    match c {
                        '"' => slow.push_str("\\\""),
                        '\\' => slow.push_str("\\\\"),
                        '\n' => slow.push_str("\\n"),
                        '\r' => slow.push_str("\\r"),
                        '\t' => slow.push_str("\\t"),
                        '\u{8}' => slow.push_str("\\b"),
                        '\u{c}' => slow.push_str("\\f"),
                        c if (c as u32) < 0x20 => slow.push_str(&format!("\\u{:04x}", c as u32)),
                        c => slow.push(c),
                    }
                }
                assert_eq!(fast, slow, "{b:#x} at {at}");
            }
        }
        let mut s = String::new();
        push_escaped(&mut s, "é\u{202e}\u{1b}[31m\"x\"");
        assert_eq!(s, "é\u{202e}\\u001b[31m\\\"x\\\"");
        for n in [0u64, 7, 10, 99, 1_000_000, u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }

    #[test]
    fn dates_match_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(20_794), (2026, 12, 7));
        assert_eq!(civil_from_days(2_932_896), (9999, 12, 31));
        let mut s = String::new();
        push_timestamp(
            &mut s,
            UNIX_EPOCH + std::time::Duration::new(1_796_617_953, 123_456_789),
        );
        assert_eq!(s, "2026-12-07T04:32:33.123456Z");
    }
}
