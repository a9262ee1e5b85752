//! `portcullis`: mint API keys, write key-file entries for existing keys, and check a
//! key file.
//!
//! ```text
//! portcullis keygen --id <id> [--scopes a,b] [--prefix pc_live] [--tier <tier>]
//!                   [--not-before <time>] [--expires <time>] [--key-out <path>]
//! portcullis hash   --id <id> [--scopes a,b] [--tier <tier>]
//!                   [--not-before <time>] [--expires <time>]      < key
//! portcullis check  <key file>
//! ```
//!
//! - `keygen` writes only the key-file entry (id, SHA-256 digest, scopes, tier,
//!   validity window) to standard output, so `portcullis keygen --id billing >> keys.toml`
//!   appends it safely. The key goes to standard error, or with `--key-out <path>` into
//!   a new file created with mode 0600 (an existing file, or a symbolic link, is never
//!   written through). The key is stored nowhere else.
//! - `hash` reads one key from standard input (one trailing newline is dropped) and
//!   writes its entry, to move existing keys into a key file. It refuses a key the key
//!   file could never match: anything not in the `<prefix>_<random><checksum>` format,
//!   or with a wrong checksum. It never prints the key.
//! - `check` loads a key file exactly as the server does ([`KeyStore::from_file`]) and
//!   prints the number of keys, then one line per key: id, the first 8 hex digits of its
//!   digest, scopes, tier, validity window, revocation and its state now (`valid`,
//!   `expired`, `not-yet-valid`, `revoked`). An invalid file prints the loader's error
//!   (a position, never a value from the file).
//!
//! Every entry written is read back with [`KeyStore::from_toml`] and must describe
//! exactly the key that was asked for, and the key must verify against it, before the
//! key is shown. Times are RFC 3339 date-times with an offset (`2027-01-31T00:00:00Z`,
//! `2027-01-31T09:00:00+01:00`), read by the key file's own date parser: plain dates and
//! local times are refused, as the key file refuses them.
//!
//! No message repeats the value of an argument or the key: a value may be a key pasted
//! in the wrong place. Option names are repeated only when they look like option names.
//!
//! # Exit status
//!
//! - 0: success.
//! - 1: the operation failed: an invalid or unreadable key file (`check`), a refused
//!   key on standard input (`hash`), an I/O error.
//! - 2: usage error: an unknown command or option, a missing or invalid value.

#![forbid(unsafe_code)]

#[path = "../civil.rs"]
mod civil;

use std::ffi::OsString;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use civil::civil_from_days;
use lexopt::{Arg, Parser};
use portcullis::Scopes;
use portcullis::api_key::{
    DEFAULT_PREFIX, KeyDigest, KeyFormatError, KeyRecord, KeyStore, check_key, check_prefix,
    generate_key,
};
use portcullis::rejection::DenialReason;
use toml_datetime::Datetime;

/// The longest input `hash` reads as a key: the longest key a key store digests (a
/// generated key is at most 61 characters, so nothing a key file can match is cut).
const MAX_KEY_LEN: usize = 256;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

const TOP_HELP: &str = "\
portcullis: API keys for a portcullis key file

Usage:
  portcullis keygen --id <id> [options] >> keys.toml   mint a key, print its entry
  portcullis hash --id <id> [options] < key            print the entry of an existing key
  portcullis check <key file>                          validate a key file, summarise it
  portcullis <command> --help                          the options of a command

A key file holds SHA-256 digests only. keygen prints the key once, to standard error
(or into a new file with --key-out); it is stored nowhere else.

Exit status: 0 success; 1 the operation failed (invalid key file, refused key,
I/O error); 2 usage error (unknown command or option, missing or invalid value).
";

const KEYGEN_HELP: &str = "\
portcullis keygen: mint a new API key

Usage: portcullis keygen --id <id> [options] >> keys.toml

Standard output receives only the key-file entry, holding the key's SHA-256 digest,
never the key, so appending it to the key file is safe. The key goes to standard
error, or into a new file with --key-out. It is stored nowhere else: hand it to its
owner now.

Options:
  --id <id>            the key's public name: 1 to 64 of A-Z a-z 0-9 . _ : - (required)
  --scopes <a,b>       scopes the key grants, comma- or space-separated (repeatable)
  --tier <tier>        rate-limit tier, the same characters as --id
  --prefix <prefix>    key prefix (default pc_live): 1 to 32 of a-z 0-9 _, starting
                       with a letter and not ending with _
  --not-before <time>  the key is refused before this time
  --expires <time>     the key is refused from this time on (must be in the future)
  --key-out <path>     write the key into this new file (mode 0600) instead of
                       standard error; an existing file is never overwritten
  -h, --help           this help

A time is an RFC 3339 date-time with an offset, such as 2027-01-31T00:00:00Z or
2027-01-31T09:00:00+01:00, the only form the key file accepts.

Exit status: 0 success; 1 I/O error; 2 usage error.
";

const HASH_HELP: &str = "\
portcullis hash: the key-file entry of an existing key

Usage: portcullis hash --id <id> [options] < key

Reads one key from standard input (one trailing newline is dropped) and writes its
key-file entry to standard output. The key is never printed. Only keys in the
<prefix>_<random><checksum> format, with a correct checksum, can be in a key file;
other keys are refused.

Options:
  --id <id>            the key's public name: 1 to 64 of A-Z a-z 0-9 . _ : - (required)
  --scopes <a,b>       scopes the key grants, comma- or space-separated (repeatable)
  --tier <tier>        rate-limit tier, the same characters as --id
  --not-before <time>  the key is refused before this time
  --expires <time>     the key is refused from this time on (must be in the future)
  -h, --help           this help

A time is an RFC 3339 date-time with an offset, such as 2027-01-31T00:00:00Z or
2027-01-31T09:00:00+01:00, the only form the key file accepts.

Exit status: 0 success; 1 the key was refused or could not be read; 2 usage error.
";

const CHECK_HELP: &str = "\
portcullis check: validate a key file

Usage: portcullis check <key file>

Loads the file exactly as the server does and prints the number of keys, then one
line per key: id, the first 8 hex digits of its digest, scopes, tier, not_before,
expires_at, revoked, and its state now (valid, expired, not-yet-valid, revoked).
An invalid file prints the loader's error, which names a position, never a value.

Options:
  -h, --help           this help

Exit status: 0 the file is valid; 1 it is invalid or unreadable; 2 usage error.
";

/// Why the command stopped.
#[derive(Debug)]
enum Failure {
    /// A bad command line (exit 2): the message and the command whose help to suggest.
    Usage(Option<&'static str>, String),
    /// The operation failed (exit 1).
    Failed(Option<&'static str>, String),
}

fn usage(cmd: Option<&'static str>, msg: impl Into<String>) -> Failure {
    Failure::Usage(cmd, msg.into())
}

fn failed(cmd: &'static str, msg: impl Into<String>) -> Failure {
    Failure::Failed(Some(cmd), msg.into())
}

/// What the command line asks for.
enum Command {
    Help(&'static str),
    Keygen(EntryArgs),
    Hash(EntryArgs),
    Check(PathBuf),
}

/// The options of `keygen` and `hash`, each value checked as it is read.
#[derive(Default)]
struct EntryArgs {
    id: Option<String>,
    scopes: Vec<String>,
    tier: Option<String>,
    prefix: Option<String>,
    not_before: Option<Datetime>,
    expires: Option<Datetime>,
    key_out: Option<PathBuf>,
}

/// One command-line token, owned, with the help flags recognised.
enum Token {
    Help,
    Long(String),
    Short(char),
    Value(OsString),
}

/// `flag` (e.g. `--tier`, `-x`) if it looks like an option name, else `None`: what
/// follows `--` may be a key pasted in the wrong place.
fn option_name(flag: &str) -> Option<&str> {
    let name = flag.trim_start_matches('-');
    let plain = !name.is_empty()
        && flag.len() <= 26
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    plain.then_some(flag)
}

/// A lexopt error in words that never include a value.
fn lexopt_failure(cmd: Option<&'static str>, e: lexopt::Error) -> Failure {
    match e {
        lexopt::Error::MissingValue { option } => {
            let name = option
                .as_deref()
                .and_then(option_name)
                .unwrap_or("an option");
            usage(cmd, format!("{name} needs a value"))
        }
        lexopt::Error::UnexpectedValue { option, .. } => {
            let name = option_name(&option).unwrap_or("an option");
            usage(cmd, format!("{name} takes no value"))
        }
        lexopt::Error::UnexpectedOption(option) => unknown_option(cmd, &option),
        lexopt::Error::NonUnicodeValue(_) => usage(cmd, "an argument is not valid UTF-8"),
        _ => usage(cmd, "invalid arguments"),
    }
}

fn next(p: &mut Parser, cmd: Option<&'static str>) -> Result<Option<Token>, Failure> {
    Ok(match p.next().map_err(|e| lexopt_failure(cmd, e))? {
        None => None,
        Some(Arg::Short('h') | Arg::Long("help")) => {
            if p.optional_value().is_some() {
                return Err(usage(cmd, "--help takes no value"));
            }
            Some(Token::Help)
        }
        Some(Arg::Long(name)) => Some(Token::Long(name.to_owned())),
        Some(Arg::Short(c)) => Some(Token::Short(c)),
        Some(Arg::Value(v)) => Some(Token::Value(v)),
    })
}

fn unknown_option(cmd: Option<&'static str>, flag: &str) -> Failure {
    match option_name(flag) {
        Some(name) => usage(cmd, format!("unknown option {name}")),
        None => usage(cmd, "unknown option"),
    }
}

/// The text of an option token, for [`unknown_option`].
fn flag_text(token: &Token) -> String {
    match token {
        Token::Long(name) => format!("--{name}"),
        Token::Short(c) if c.is_ascii_alphanumeric() => format!("-{c}"),
        _ => String::new(),
    }
}

fn parse_command(mut p: Parser) -> Result<Command, Failure> {
    match next(&mut p, None)? {
        None => Err(usage(None, "no command given")),
        Some(Token::Help) => Ok(Command::Help(TOP_HELP)),
        Some(Token::Value(v)) => match v.to_str() {
            Some("keygen") => parse_entry_args(p, "keygen"),
            Some("hash") => parse_entry_args(p, "hash"),
            Some("check") => parse_check_args(p),
            Some("help") => Ok(Command::Help(TOP_HELP)),
            _ => Err(usage(
                None,
                "unknown command; the commands are keygen, hash and check",
            )),
        },
        Some(other) => Err(unknown_option(None, &flag_text(&other))),
    }
}

/// The value of `flag` as UTF-8 text.
fn text_value(p: &mut Parser, cmd: &'static str, flag: &str) -> Result<String, Failure> {
    p.value()
        .map_err(|e| lexopt_failure(Some(cmd), e))?
        .into_string()
        .map_err(|_| usage(Some(cmd), format!("the value of {flag} is not valid UTF-8")))
}

/// Stores a single-valued option; a second occurrence is a usage error.
fn once<T>(slot: &mut Option<T>, value: T, cmd: &'static str, flag: &str) -> Result<(), Failure> {
    if slot.replace(value).is_some() {
        return Err(usage(Some(cmd), format!("{flag} given twice")));
    }
    Ok(())
}

/// An RFC 3339 date-time with an offset, read by the key file's own date parser (the
/// key file reads a date-time value with `toml_datetime` and refuses any without a
/// date, a time or an offset).
fn parse_time(cmd: &'static str, flag: &str, value: &str) -> Result<Datetime, Failure> {
    match value.parse::<Datetime>() {
        Ok(dt) if dt.date.is_some() && dt.time.is_some() && dt.offset.is_some() => Ok(dt),
        _ => Err(usage(
            Some(cmd),
            format!(
                "{flag} takes an RFC 3339 date-time with an offset, such as \
                 2027-01-31T00:00:00Z or 2027-01-31T09:00:00+01:00 (the key file accepts \
                 no plain dates or local times)"
            ),
        )),
    }
}

/// The options of `keygen` (with `--prefix` and `--key-out`) or `hash`.
fn parse_entry_args(mut p: Parser, cmd: &'static str) -> Result<Command, Failure> {
    let keygen = cmd == "keygen";
    let mut a = EntryArgs::default();
    while let Some(token) = next(&mut p, Some(cmd))? {
        let name = match &token {
            Token::Long(name) => name.as_str(),
            Token::Help => return Ok(Command::Help(if keygen { KEYGEN_HELP } else { HASH_HELP })),
            Token::Value(_) => {
                return Err(usage(
                    Some(cmd),
                    format!("{cmd} takes no arguments, only options"),
                ));
            }
            Token::Short(_) => return Err(unknown_option(Some(cmd), &flag_text(&token))),
        };
        match name {
            "id" => {
                let v = text_value(&mut p, cmd, "--id")?;
                once(&mut a.id, v, cmd, "--id")?;
            }
            "scopes" => {
                let v = text_value(&mut p, cmd, "--scopes")?;
                a.scopes.extend(
                    v.split([',', ' '])
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
            "tier" => {
                let v = text_value(&mut p, cmd, "--tier")?;
                once(&mut a.tier, v, cmd, "--tier")?;
            }
            "not-before" => {
                let v = text_value(&mut p, cmd, "--not-before")?;
                let t = parse_time(cmd, "--not-before", &v)?;
                once(&mut a.not_before, t, cmd, "--not-before")?;
            }
            "expires" => {
                let v = text_value(&mut p, cmd, "--expires")?;
                let t = parse_time(cmd, "--expires", &v)?;
                once(&mut a.expires, t, cmd, "--expires")?;
            }
            "prefix" if keygen => {
                let v = text_value(&mut p, cmd, "--prefix")?;
                check_prefix(&v).map_err(|e| usage(Some(cmd), format!("--prefix: {e}")))?;
                once(&mut a.prefix, v, cmd, "--prefix")?;
            }
            "key-out" if keygen => {
                let v = p.value().map_err(|e| lexopt_failure(Some(cmd), e))?;
                once(&mut a.key_out, PathBuf::from(v), cmd, "--key-out")?;
            }
            _ => return Err(unknown_option(Some(cmd), &flag_text(&token))),
        }
    }
    Ok(if keygen {
        Command::Keygen(a)
    } else {
        Command::Hash(a)
    })
}

/// `check <key file>`: exactly one path.
fn parse_check_args(mut p: Parser) -> Result<Command, Failure> {
    let cmd = Some("check");
    let mut path = None;
    while let Some(token) = next(&mut p, cmd)? {
        match token {
            Token::Help => return Ok(Command::Help(CHECK_HELP)),
            Token::Value(v) if path.is_none() => path = Some(PathBuf::from(v)),
            Token::Value(_) => return Err(usage(cmd, "check takes one key file")),
            other => return Err(unknown_option(cmd, &flag_text(&other))),
        }
    }
    path.map(Command::Check)
        .ok_or_else(|| usage(cmd, "the key file is missing"))
}

/// A validated entry: every field checked by the rules the key file applies.
struct Spec {
    id: String,
    scopes: Scopes,
    tier: Option<String>,
    not_before: Option<(Datetime, SystemTime)>,
    expires: Option<(Datetime, SystemTime)>,
}

impl Spec {
    fn new(cmd: &'static str, a: &EntryArgs) -> Result<Self, Failure> {
        let id =
            a.id.clone()
                .ok_or_else(|| usage(Some(cmd), "--id is required"))?;
        let scopes = Scopes::from_iter_checked(&a.scopes)
            .map_err(|e| usage(Some(cmd), format!("--scopes: {e}")))?;
        // The id and tier rules are `KeyRecord`'s; the digest here is a placeholder.
        let probe = KeyRecord::new(&id, KeyDigest::of(""))
            .map_err(|e| usage(Some(cmd), format!("--id: {e}")))?;
        if let Some(tier) = &a.tier {
            probe
                .with_tier(tier)
                .map_err(|e| usage(Some(cmd), format!("--tier: {e}")))?;
        }
        let instant = |dt: Option<Datetime>| {
            dt.map(|dt| {
                loader_time(&dt).map(|t| (dt, t)).ok_or_else(|| {
                    usage(
                        Some(cmd),
                        "a time is outside the range the key file can hold",
                    )
                })
            })
            .transpose()
        };
        let not_before = instant(a.not_before)?;
        let expires = instant(a.expires)?;
        let (nb, exp) = (not_before.map(|t| t.1), expires.map(|t| t.1));
        if let (Some(nb), Some(exp)) = (nb, exp)
            && exp <= nb
        {
            return Err(usage(
                Some(cmd),
                "--expires must be later than --not-before",
            ));
        }
        if let Some(exp) = exp
            && exp <= SystemTime::now()
        {
            return Err(usage(
                Some(cmd),
                "--expires is in the past: the key would never be valid",
            ));
        }
        Ok(Self {
            id,
            scopes,
            tier: a.tier.clone(),
            not_before,
            expires,
        })
    }

    /// The key-file entry for `digest`. Every value passed the key file's own checks,
    /// so none can hold a quote, a backslash or a line break; times are written in the
    /// parser's canonical form, not as given.
    fn entry(&self, digest: &KeyDigest) -> String {
        let quoted = |s: &str| format!("\"{s}\"");
        let mut entry = format!(
            "[[keys]]\nid = {}\ndigest = \"{digest}\"\n",
            quoted(&self.id)
        );
        let scopes: Vec<String> = self.scopes.iter().map(quoted).collect();
        entry.push_str(&format!("scopes = [{}]\n", scopes.join(", ")));
        if let Some(tier) = &self.tier {
            entry.push_str(&format!("tier = {}\n", quoted(tier)));
        }
        if let Some((dt, _)) = &self.not_before {
            entry.push_str(&format!("not_before = {dt}\n"));
        }
        if let Some((dt, _)) = &self.expires {
            entry.push_str(&format!("expires_at = {dt}\n"));
        }
        entry
    }

    /// Reads `entry` back as the server will, and checks that it holds exactly this
    /// spec and that `key` verifies against it. Nothing is shown unless this passes.
    fn read_back(&self, cmd: &'static str, entry: &str, key: &str) -> Result<(), Failure> {
        let broken = || {
            failed(
                cmd,
                "the entry does not read back as written; nothing was output",
            )
        };
        let store = KeyStore::from_toml(entry).map_err(|_| broken())?;
        let mut records = store.records();
        let (Some(r), None) = (records.next(), records.next()) else {
            return Err(broken());
        };
        let same = r.id() == self.id
            && r.scopes() == &self.scopes
            && r.tier() == self.tier.as_deref()
            && r.valid_from() == self.not_before.map(|t| t.1)
            && r.valid_until() == self.expires.map(|t| t.1)
            && !r.is_revoked();
        let verified = match store.verify(key, SystemTime::now()) {
            Ok(_) => true,
            Err(e) => e.reason() == DenialReason::NotYetValidKey,
        };
        if same && verified {
            Ok(())
        } else {
            Err(broken())
        }
    }
}

/// The instant the key file's loader reads for `dt`, by loading a one-key file whose
/// only variable part is `dt` in its canonical form (digits, `-`, `:`, `.`, `T`, `Z`,
/// `+`: nothing that could change the document's structure).
fn loader_time(dt: &Datetime) -> Option<SystemTime> {
    let probe = format!(
        "[[keys]]\nid = \"probe\"\ndigest = \"{}\"\nexpires_at = {dt}\n",
        KeyDigest::of("")
    );
    let store = KeyStore::from_toml(&probe).ok()?;
    store.records().next()?.valid_until()
}

/// Writes `text` to standard output; a closed pipe or full disk is an error, not a
/// panic.
fn write_stdout(cmd: &'static str, text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| failed(cmd, format!("cannot write standard output: {e}")))
}

fn keygen(a: &EntryArgs) -> Result<(), Failure> {
    let cmd = "keygen";
    let spec = Spec::new(cmd, a)?;
    let key = generate_key(a.prefix.as_deref().unwrap_or(DEFAULT_PREFIX))
        .map_err(|e| failed(cmd, e.to_string()))?;
    let entry = spec.entry(&key.digest());
    spec.read_back(cmd, &entry, key.expose_secret())?;
    // The key first: if it cannot be delivered, no entry is written for it.
    match &a.key_out {
        Some(path) => write_key_file(path, key.expose_secret())?,
        None => {
            let mut err = io::stderr().lock();
            writeln!(err, "{}", key.expose_secret())
                .and_then(|()| err.flush())
                .map_err(|e| failed(cmd, format!("cannot write standard error: {e}")))?;
        }
    }
    write_stdout(cmd, &entry)?;
    if a.key_out.is_some() {
        eprintln!(
            "portcullis keygen: the key is in the --key-out file (mode 0600); hand it to its owner, then delete the file"
        );
    }
    Ok(())
}

/// Creates `path` (which must not exist, not even as a symbolic link) with mode 0600
/// and writes the key into it.
#[cfg(unix)]
fn write_key_file(path: &Path, key: &str) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let cmd = "keygen";
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                failed(cmd, "the --key-out file exists; refusing to overwrite it")
            } else {
                failed(cmd, format!("cannot create the --key-out file: {e}"))
            }
        })?;
    let written = file
        .write_all(key.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(failed(cmd, format!("cannot write the --key-out file: {e}")));
    }
    Ok(())
}

/// Without Unix permissions there is no way to create the file readable by its owner
/// only, so `--key-out` is refused.
#[cfg(not(unix))]
fn write_key_file(_path: &Path, _key: &str) -> Result<(), Failure> {
    Err(failed(
        "keygen",
        "--key-out needs Unix file permissions; write the key from standard error instead",
    ))
}

/// Reads one key from standard input, dropping one trailing `\n` or `\r\n`, and keeps
/// it only if a key file could match it.
fn read_key() -> Result<String, Failure> {
    let cmd = "hash";
    let stdin = io::stdin();
    if stdin.is_terminal() {
        eprintln!(
            "portcullis hash: reading one key from standard input (a typed key stays on screen; prefer a pipe)"
        );
    }
    let mut buf = Vec::with_capacity(MAX_KEY_LEN + 2);
    stdin
        .lock()
        .take((MAX_KEY_LEN + 3) as u64)
        .read_to_end(&mut buf)
        .map_err(|e| failed(cmd, format!("cannot read standard input: {e}")))?;
    if buf.len() > MAX_KEY_LEN + 2 {
        return Err(failed(
            cmd,
            format!("the input is longer than any key ({MAX_KEY_LEN} characters)"),
        ));
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    if buf.is_empty() {
        return Err(failed(cmd, "no key on standard input"));
    }
    let key = String::from_utf8(buf).map_err(|_| failed(cmd, "the input is not UTF-8"))?;
    match check_key(&key) {
        Ok(()) => Ok(key),
        Err(KeyFormatError::Checksum) => Err(failed(
            cmd,
            "the key's checksum does not match: a typo or a truncated key",
        )),
        Err(_) => Err(failed(
            cmd,
            "not one key in the <prefix>_<random><checksum> format: a key file can hold no other keys",
        )),
    }
}

fn hash(a: &EntryArgs) -> Result<(), Failure> {
    let cmd = "hash";
    let spec = Spec::new(cmd, a)?;
    let key = read_key()?;
    let entry = spec.entry(&KeyDigest::of(&key));
    spec.read_back(cmd, &entry, &key)?;
    write_stdout(cmd, &entry)
}

fn check(path: &Path) -> Result<(), Failure> {
    let cmd = "check";
    let store = KeyStore::from_file(path).map_err(|e| failed(cmd, e.to_string()))?;
    let now = SystemTime::now();
    let n = store.len();
    let mut out = format!("{n} key{}\n", if n == 1 { "" } else { "s" });
    let time = |t: Option<SystemTime>| t.map_or_else(|| "-".to_owned(), rfc3339);
    for r in store.records() {
        let state = if r.is_revoked() {
            "revoked"
        } else if r.valid_from().is_some_and(|t| now < t) {
            "not-yet-valid"
        } else if r.valid_until().is_some_and(|t| now >= t) {
            "expired"
        } else {
            "valid"
        };
        let scopes: Vec<&str> = r.scopes().iter().collect();
        let digest = r.digest().to_string();
        out.push_str(&format!(
            "id={} digest={}... scopes={} tier={} not_before={} expires_at={} revoked={} state={state}\n",
            r.id(),
            &digest[..digest.len().min("sha256:".len() + 8)],
            if scopes.is_empty() { "-".to_owned() } else { scopes.join(",") },
            r.tier().unwrap_or("-"),
            time(r.valid_from()),
            time(r.valid_until()),
            r.is_revoked(),
        ));
    }
    write_stdout(cmd, &out)
}

/// `t` as an RFC 3339 date-time in UTC, with a fraction only when it has one.
fn rfc3339(t: SystemTime) -> String {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (secs, 0),
                n => (secs - 1, 1_000_000_000 - n),
            }
        }
    };
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let mut text = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        s / 3600,
        s % 3600 / 60,
        s % 60
    );
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

fn run() -> Result<(), Failure> {
    match parse_command(Parser::from_env())? {
        Command::Help(text) => write_stdout("help", text),
        Command::Keygen(a) => keygen(&a),
        Command::Hash(a) => hash(&a),
        Command::Check(path) => check(&path),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(cmd, msg)) => {
            let (name, help) = match cmd {
                Some(c) => (format!("portcullis {c}"), format!("portcullis {c} --help")),
                None => ("portcullis".to_owned(), "portcullis --help".to_owned()),
            };
            eprintln!("{name}: {msg} (see '{help}')");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Failed(cmd, msg)) => {
            match cmd {
                Some(c) => eprintln!("portcullis {c}: {msg}"),
                None => eprintln!("portcullis: {msg}"),
            }
            ExitCode::from(EXIT_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn at(secs: i64, nanos: u32) -> SystemTime {
        let t = if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        };
        t + Duration::from_nanos(nanos.into())
    }

    #[test]
    fn known_times() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400, 0)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(-1, 500_000_000)), "1969-12-31T23:59:59.5Z");
        assert_eq!(rfc3339(at(253_402_300_799, 0)), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn option_names_are_repeated_only_when_they_look_like_one() {
        assert_eq!(option_name("--not-before"), Some("--not-before"));
        assert_eq!(option_name("-x"), Some("-x"));
        for hidden in [
            "--pc_live_EXAMPLExDOxNOTxUSE00000bJVDo",
            "--Secret",
            "--a b",
            "--",
            "",
            "--abcdefghijklmnopqrstuvwxyz",
        ] {
            assert_eq!(option_name(hidden), None, "{hidden}");
        }
    }

    proptest! {
        /// Every time the key file can hold is shown as a time the key file reads back
        /// as the same instant.
        #[test]
        fn shown_times_read_back_as_the_same_instant(
            secs in -62_135_596_800i64..=253_402_300_799,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000],
        ) {
            let t = at(secs, nanos);
            let text = rfc3339(t);
            let dt: Datetime = text.parse().unwrap();
            prop_assert_eq!(loader_time(&dt), Some(t), "{}", text);
        }
    }
}
