//! `portcullis keygen`: mints an API key, prints it once, and prints the key-file
//! entry holding only its digest.
//!
//! ```text
//! portcullis keygen --id billing --scopes jobs:read,jobs:write [--prefix pc_test]
//!                   [--tier gold] [--not-before 2026-01-01T00:00:00Z]
//!                   [--expires 2027-01-01T00:00:00Z]
//! ```
//!
//! The key goes to standard output on the first line (`key: ...`), the TOML entry
//! after it; hand the key to its owner and append the entry to the key file. The key
//! is not stored anywhere.

use std::process::ExitCode;

use portcullis::Scopes;
use portcullis::api_key::{DEFAULT_PREFIX, KeyStore, generate_key};

const USAGE: &str = "usage: portcullis keygen --id <id> [--scopes a,b] [--prefix pc_live] [--tier <tier>] [--not-before <RFC 3339>] [--expires <RFC 3339>]";

#[derive(Default)]
struct Args {
    id: Option<String>,
    scopes: Vec<String>,
    prefix: Option<String>,
    tier: Option<String>,
    not_before: Option<String>,
    expires: Option<String>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    match it.next().as_deref() {
        Some("keygen") => {}
        Some("-h" | "--help") | None => return Err(USAGE.into()),
        Some(other) => return Err(format!("unknown command {other:?}\n{USAGE}")),
    }
    let mut args = Args::default();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let slot = match flag.as_str() {
            "--id" => &mut args.id,
            "--prefix" => &mut args.prefix,
            "--tier" => &mut args.tier,
            "--not-before" => &mut args.not_before,
            "--expires" => &mut args.expires,
            "--scopes" => {
                args.scopes.extend(
                    value
                        .split([',', ' '])
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
                continue;
            }
            _ => return Err(format!("unknown option {flag:?}\n{USAGE}")),
        };
        if slot.replace(value).is_some() {
            return Err(format!("{flag} given twice"));
        }
    }
    Ok(args)
}

fn toml_string(s: &str) -> String {
    // Ids, tiers and scopes are checked to be plain printable ASCII without quotes
    // or backslashes before they get here.
    format!("\"{s}\"")
}

fn run(args: Args) -> Result<String, String> {
    let id = args
        .id
        .ok_or_else(|| format!("--id is required\n{USAGE}"))?;
    let key = generate_key(args.prefix.as_deref().unwrap_or(DEFAULT_PREFIX))
        .map_err(|e| e.to_string())?;
    let scopes = Scopes::from_iter_checked(&args.scopes).map_err(|e| e.to_string())?;

    for t in [&args.not_before, &args.expires].into_iter().flatten() {
        let plain = t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'+' | b'.'));
        if !plain {
            return Err("dates must be RFC 3339, e.g. 2027-01-31T00:00:00Z".into());
        }
    }
    let mut entry = String::from("[[keys]]\n");
    entry.push_str(&format!("id = {}\n", toml_string(&id)));
    entry.push_str(&format!("digest = \"{}\"\n", key.digest()));
    let list: Vec<String> = scopes.iter().map(toml_string).collect();
    entry.push_str(&format!("scopes = [{}]\n", list.join(", ")));
    if let Some(t) = &args.tier {
        entry.push_str(&format!("tier = {}\n", toml_string(t)));
    }
    if let Some(t) = &args.not_before {
        entry.push_str(&format!("not_before = {t}\n"));
    }
    if let Some(t) = &args.expires {
        entry.push_str(&format!("expires_at = {t}\n"));
    }
    // Validate the entry exactly as the server will read it (id, tier, dates).
    KeyStore::from_toml(&entry).map_err(|e| format!("invalid entry: {e}"))?;

    Ok(format!(
        "key: {}\n\n# Give the key above to its owner now: it is not stored and cannot be shown again.\n# Append this entry to the key file:\n{entry}",
        key.expose_secret()
    ))
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1)).and_then(run) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
