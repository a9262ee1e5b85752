//! The `portcullis` command, run as a process: what goes to standard output (the
//! key-file entry only), where the key goes, what is refused and with which exit
//! status, and that no message repeats a value or a key.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis::api_key::{GeneratedKey, KeyStore, check_key, generate_key};
use portcullis::rejection::DenialReason;
use proptest::prelude::*;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn run_with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command may refuse before reading all of it; a broken pipe here is fine.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

/// The lines of `s` that are keys in the generated format.
fn keys_in(s: &str) -> Vec<String> {
    s.split_whitespace()
        .filter(|w| check_key(w).is_ok())
        .map(str::to_owned)
        .collect()
}

/// A usage error: exit 2, nothing on standard output, one line on standard error.
fn assert_usage_error(out: &Output, what: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(code(out), 2, "{what}: {err}");
    assert!(out.stdout.is_empty(), "{what}: {}", text(&out.stdout));
    assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
    assert!(keys_in(&err).is_empty(), "{what}: no key minted: {err}");
    err
}

/// A fresh directory under the system temporary directory.
fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "portcullis-cli-{tag}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn keygen_writes_only_the_entry_to_stdout_and_the_key_to_stderr() {
    let out = run(&[
        "keygen",
        "--id",
        "billing",
        "--scopes",
        "jobs:read,jobs:write",
        "--prefix",
        "pc_test",
        "--tier",
        "gold",
        "--not-before",
        "2020-01-01T00:00:00Z",
        "--expires",
        "2999-01-01T00:00:00+01:00",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(code(&out), 0, "{stderr}");

    let keys = keys_in(&stderr);
    assert_eq!(keys.len(), 1, "the key on standard error: {stderr}");
    let key = &keys[0];
    assert!(key.starts_with("pc_test_"));
    assert!(!stdout.contains(key.as_str()), "no key on standard output");
    assert!(keys_in(&stdout).is_empty());

    // Standard output is a whole key file, and the key verifies against it.
    let store = KeyStore::from_toml(&stdout).unwrap();
    assert_eq!(store.len(), 1);
    let p = store.verify(key, SystemTime::now()).unwrap();
    assert_eq!(p.id(), "billing");
    assert_eq!(p.tier(), Some("gold"));
    assert_eq!(p.scopes().to_string(), "jobs:read jobs:write");
    let r = store.records().next().unwrap();
    assert_eq!(
        r.valid_from(),
        Some(UNIX_EPOCH + Duration::from_secs(1_577_836_800))
    );
    assert_eq!(
        r.valid_until(),
        Some(UNIX_EPOCH + Duration::from_secs(32_472_144_000 - 3600))
    );

    // Two entries appended one after the other make a valid file.
    let second = run(&["keygen", "--id", "billing"]);
    assert_eq!(code(&second), 0);
    let both = format!("{stdout}\n{}", text(&second.stdout));
    let store = KeyStore::from_toml(&both).unwrap();
    assert_eq!(store.len(), 2);
    let key2 = &keys_in(&text(&second.stderr))[0];
    assert!(store.verify(key2, SystemTime::now()).is_ok());
}

#[cfg(unix)]
#[test]
fn key_out_creates_a_private_file_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;

    let dir = temp_dir("key-out");
    let path = dir.join("billing.key");
    let p = path.to_str().unwrap();
    let out = run(&["keygen", "--id", "billing", "--key-out", p]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(code(&out), 0, "{stderr}");

    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let written = std::fs::read_to_string(&path).unwrap();
    let key = written.strip_suffix('\n').unwrap();
    assert!(check_key(key).is_ok());
    assert!(!stderr.contains(key), "the key is only in the file");
    assert!(keys_in(&stderr).is_empty());
    assert!(
        !stderr.contains(p) && stderr.contains("--key-out file"),
        "a note names the option, never its value: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
    assert!(!stdout.contains(key));
    let store = KeyStore::from_toml(&stdout).unwrap();
    assert_eq!(
        store.verify(key, SystemTime::now()).unwrap().id(),
        "billing"
    );

    // A second run refuses the existing file and leaves it as it was.
    let again = run(&["keygen", "--id", "billing", "--key-out", p]);
    assert_eq!(code(&again), 1);
    assert!(again.stdout.is_empty(), "no entry for an undelivered key");
    assert!(keys_in(&text(&again.stderr)).is_empty());
    assert!(!text(&again.stderr).contains(p), "{}", text(&again.stderr));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), written);

    // A symbolic link is not written through, even to a file that does not exist.
    let target = dir.join("target");
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = run(&[
        "keygen",
        "--id",
        "billing",
        "--key-out",
        link.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 1);
    assert!(out.stdout.is_empty());
    assert!(!target.exists());

    // A directory that does not exist: an I/O failure.
    let out = run(&[
        "keygen",
        "--id",
        "billing",
        "--key-out",
        dir.join("missing/k").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 1);
    assert!(out.stdout.is_empty());
    assert!(
        !text(&out.stderr).contains("missing/k"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dates_the_key_file_refuses_are_refused_without_repeating_them() {
    for bad in [
        "tomorrow",
        "2027-13-01",
        "1e9",
        "1700000000",
        "2027-01-01",
        "2027-01-01T00:00:00",
        "2027-02-30T00:00:00Z",
        "2027-01-01T24:00:00Z",
        "2027-01-01T00:00:00+25:00",
        "2027-01-01T00:00:00Z\nrevoked = true",
        "2027-01-01T00:00:00Z # x",
        "\"2027-01-01T00:00:00Z\"",
        "",
        "pc_live_EXAMPLExDOxNOTxUSE00000bJVDo",
    ] {
        for flag in ["--expires", "--not-before"] {
            let out = run(&["keygen", "--id", "a", flag, bad]);
            let err = assert_usage_error(&out, bad);
            assert!(err.contains("RFC 3339"), "{bad}: {err}");
            assert!(err.contains(flag), "{bad}: {err}");
            if !bad.is_empty() {
                assert!(!err.contains(bad), "{bad}: {err}");
            }
            let out = run_with_stdin(&["hash", "--id", "a", flag, bad], b"");
            assert_usage_error(&out, bad);
        }
    }
    for (args, needle) in [
        (
            [
                "--not-before",
                "2998-01-01T00:00:00Z",
                "--expires",
                "2997-01-01T00:00:00Z",
            ],
            "later than",
        ),
        (
            [
                "--not-before",
                "2998-01-01T00:00:00Z",
                "--expires",
                "2998-01-01T00:00:00Z",
            ],
            "later than",
        ),
        (
            ["--expires", "2001-01-01T00:00:00Z", "--tier", "gold"],
            "in the past",
        ),
    ] {
        let mut all = vec!["keygen", "--id", "a"];
        all.extend(args);
        let err = assert_usage_error(&run(&all), needle);
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn every_form_the_key_file_accepts_is_accepted_and_read_the_same() {
    for (given, secs, nanos) in [
        ("2999-01-01T00:00:00Z", 32_472_144_000u64, 0u32),
        ("2999-01-01 00:00:00Z", 32_472_144_000, 0),
        ("2999-01-01t00:00:00z", 32_472_144_000, 0),
        ("2999-01-01T01:30:00+01:30", 32_472_144_000, 0),
        ("2998-12-31T23:00:00-01:00", 32_472_144_000, 0),
        ("2999-01-01T00:00:00.25Z", 32_472_144_000, 250_000_000),
        ("2999-01-01T00:00Z", 32_472_144_000, 0),
    ] {
        let out = run(&["keygen", "--id", "a", "--expires", given]);
        assert_eq!(code(&out), 0, "{given}: {}", text(&out.stderr));
        let store = KeyStore::from_toml(&text(&out.stdout)).unwrap();
        let want = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos.into());
        assert_eq!(
            store.records().next().unwrap().valid_until(),
            Some(want),
            "{given}"
        );
    }
    // A key not valid yet is still minted, and verifies once its window opens.
    let out = run(&[
        "keygen",
        "--id",
        "a",
        "--not-before",
        "2998-01-01T00:00:00Z",
    ]);
    assert_eq!(code(&out), 0);
    let store = KeyStore::from_toml(&text(&out.stdout)).unwrap();
    let key = &keys_in(&text(&out.stderr))[0];
    let e = store.verify(key, SystemTime::now()).unwrap_err();
    assert_eq!(e.reason(), DenialReason::NotYetValidKey);
    let later = UNIX_EPOCH + Duration::from_secs(32_472_144_000);
    assert!(store.verify(key, later).is_ok());
}

#[test]
fn bad_options_and_values_are_usage_errors() {
    let secret = "pc_live_EXAMPLExDOxNOTxUSE00000bJVDo";
    for (args, needle) in [
        (vec!["keygen", "--id", "a", "--bogus"], Some("--bogus")),
        (vec!["keygen", "--id", "a", "--bogus=x"], Some("--bogus")),
        (vec!["keygen", "--id", "a", "-x"], Some("-x")),
        (vec!["keygen", "--id", "a", "--key", secret], None),
        (vec!["keygen", "--id", "a", &format!("--{secret}")], None),
        (vec!["keygen", "--id", "a", &format!("--{secret}=v")], None),
        (vec!["keygen", "--id", "a", secret], None),
        (vec!["keygen", "--id"], Some("--id needs a value")),
        (
            vec!["keygen", "--id", "a", "--expires"],
            Some("--expires needs a value"),
        ),
        (
            vec!["keygen", "--id", "a", "--key-out"],
            Some("--key-out needs a value"),
        ),
        (vec!["keygen", "--help=x"], Some("--help takes no value")),
        (vec!["keygen"], Some("--id is required")),
        (
            vec!["keygen", "--id", "a", "--id", "b"],
            Some("given twice"),
        ),
        (
            vec!["keygen", "--id", secret, "--id", "b"],
            Some("given twice"),
        ),
        (vec!["keygen", "--id", "a b"], Some("--id")),
        (vec!["keygen", "--id", &format!("{secret}\"")], Some("--id")),
        (
            vec!["keygen", "--id", "a", "--tier", "a\"\nrevoked = true"],
            Some("--tier"),
        ),
        (
            vec!["keygen", "--id", "a", "--scopes", "ok,\"x"],
            Some("--scopes"),
        ),
        (
            vec!["keygen", "--id", "a", "--prefix", "PC"],
            Some("--prefix"),
        ),
        (
            vec!["keygen", "--id", "a", "--prefix", "pc_"],
            Some("--prefix"),
        ),
        (
            vec!["keygen", "--id", "a", "--prefix", secret],
            Some("--prefix"),
        ),
        (
            vec!["hash", "--id", "a", "--prefix", "pc"],
            Some("--prefix"),
        ),
        (
            vec!["hash", "--id", "a", "--key-out", "k"],
            Some("--key-out"),
        ),
        (vec!["frobnicate"], Some("unknown command")),
        (vec![secret], Some("unknown command")),
        (vec![], Some("no command")),
        (vec!["--bogus"], Some("--bogus")),
        (vec!["check"], Some("missing")),
        (vec!["check", "a", "b"], Some("one key file")),
        (vec!["check", "--bogus", "a"], Some("--bogus")),
    ] {
        let out = run_with_stdin(&args, b"");
        let err = assert_usage_error(&out, &format!("{args:?}"));
        if let Some(needle) = needle {
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert!(!err.contains(secret), "{args:?}: {err}");
        assert!(!err.contains("EXAMPLE"), "{args:?}: {err}");
        assert!(err.contains("--help"), "a hint: {err}");
    }
}

#[test]
fn help_goes_to_stdout_and_exits_0() {
    for args in [
        vec!["--help"],
        vec!["-h"],
        vec!["help"],
        vec!["keygen", "--help"],
        vec!["keygen", "-h"],
        vec!["keygen", "--id", "a", "--help"],
        vec!["hash", "--help"],
        vec!["check", "--help"],
        vec!["check", "-h"],
    ] {
        let out = run(&args);
        assert_eq!(code(&out), 0, "{args:?}");
        let help = text(&out.stdout);
        assert!(help.contains("Usage"), "{args:?}: {help}");
        assert!(help.contains("Exit status"), "{args:?}: {help}");
        assert!(out.stderr.is_empty(), "{args:?}");
        assert!(keys_in(&help).is_empty(), "help mints nothing");
    }
    let top = text(&run(&["--help"]).stdout);
    for word in ["keygen", "hash", "check", "0 success", "1 ", "2 usage"] {
        assert!(top.contains(word), "{word}: {top}");
    }
}

fn entry(id: &str, key: &GeneratedKey, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\ndigest = \"{}\"\nscopes = [\"jobs:read\", \"jobs:write\"]\n{extra}\n",
        key.digest()
    )
}

#[test]
fn check_summarises_a_valid_file_without_digests() {
    let keys: Vec<_> = (0..4).map(|_| generate_key("pc_test").unwrap()).collect();
    let file = [
        entry(
            "billing",
            &keys[0],
            "tier = \"gold\"\nexpires_at = 2999-01-01T00:00:00Z",
        ),
        entry("old", &keys[1], "expires_at = 2001-01-01T00:00:00.5+01:00"),
        entry("future", &keys[2], "not_before = 2998-01-01T00:00:00Z"),
        entry("gone", &keys[3], "revoked = true"),
    ]
    .concat();
    let dir = temp_dir("check");
    let path = dir.join("keys.toml");
    std::fs::write(&path, &file).unwrap();
    let out = run(&["check", path.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "4 keys");
    assert_eq!(
        lines[1],
        format!(
            "id=billing digest={}... scopes=jobs:read,jobs:write tier=gold not_before=- \
             expires_at=2999-01-01T00:00:00Z revoked=false state=valid",
            &keys[0].digest().to_string()[..15]
        )
    );
    for (line, want) in [
        (
            lines[2],
            "expires_at=2000-12-31T23:00:00.5Z revoked=false state=expired",
        ),
        (
            lines[3],
            "not_before=2998-01-01T00:00:00Z expires_at=- revoked=false state=not-yet-valid",
        ),
        (
            lines[4],
            "tier=- not_before=- expires_at=- revoked=true state=revoked",
        ),
    ] {
        assert!(line.ends_with(want), "{line}");
    }
    // No digest appears beyond its first 8 hex digits, and no key at all.
    for k in &keys {
        let hex = k.digest().to_string()["sha256:".len()..].to_owned();
        assert!(stdout.contains(&hex[..8]));
        assert!(!stdout.contains(&hex[..9]), "{stdout}");
        assert!(!stdout.contains(k.expose_secret()));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_fails_on_an_invalid_file_with_the_loaders_error() {
    let key = generate_key("pc_test").unwrap();
    let dir = temp_dir("check-bad");
    let cases = [
        (
            format!("[[keys]]\nid = \"a\"\nkey = \"{}\"\n", key.expose_secret()),
            "line 3, column 1: a key file holds digests only",
        ),
        (
            format!("{}{}", entry("a", &key, ""), entry("b", &key, "")),
            "same digest",
        ),
        (entry("a", &key, "not_before = 2027-01-01"), "line 5"),
        ("keys = []\n".to_owned(), "empty"),
    ];
    for (i, (file, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("keys{i}.toml"));
        std::fs::write(&path, file).unwrap();
        let out = run(&["check", path.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(code(&out), 1, "{file}: {err}");
        assert!(out.stdout.is_empty());
        assert!(err.contains(needle), "{file}: {err}");
        assert!(!err.contains(key.expose_secret()));
        assert!(!err.contains(&key.digest().to_string()["sha256:".len()..][..9]));
    }
    let out = run(&["check", dir.join("missing.toml").to_str().unwrap()]);
    assert_eq!(code(&out), 1);
    assert!(text(&out.stderr).contains("cannot read"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hash_writes_the_entry_of_a_key_from_stdin_and_never_the_key() {
    let key = generate_key("pc_live").unwrap();
    let k = key.expose_secret();
    for input in [k.to_owned(), format!("{k}\n"), format!("{k}\r\n")] {
        let out = run_with_stdin(
            &[
                "hash",
                "--id",
                "legacy",
                "--scopes",
                "jobs:read",
                "--tier",
                "gold",
            ],
            input.as_bytes(),
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(code(&out), 0, "{stderr}");
        assert!(!stdout.contains(k) && !stderr.contains(k));
        assert!(stderr.is_empty(), "{stderr}");
        let store = KeyStore::from_toml(&stdout).unwrap();
        let p = store.verify(k, SystemTime::now()).unwrap();
        assert_eq!((p.id(), p.tier()), ("legacy", Some("gold")));
        assert!(p.scopes().contains("jobs:read"));
    }

    let mut typo = k.to_owned();
    let last = typo.pop().unwrap();
    typo.push(if last == 'a' { 'b' } else { 'a' });
    let long = format!("pc_{}", "A".repeat(300));
    for (input, needle) in [
        (String::new(), "no key"),
        ("\n".to_owned(), "no key"),
        ("short".to_owned(), "format"),
        ("S".repeat(40), "format"),
        (format!("{k}\n\n"), "format"),
        (format!("{k}\n{k}\n"), "format"),
        (format!(" {k}"), "format"),
        (format!("{k}\r"), "format"),
        (typo.clone(), "checksum"),
        (long.clone(), "longer"),
    ] {
        let out = run_with_stdin(&["hash", "--id", "a"], input.as_bytes());
        let err = text(&out.stderr);
        assert_eq!(code(&out), 1, "{input:?}: {err}");
        assert!(out.stdout.is_empty(), "{input:?}");
        assert!(err.contains(needle), "{input:?}: {err}");
        assert!(!err.contains(k) && !err.contains(&typo) && !err.contains("SSSS"));
    }
    let out = run_with_stdin(&["hash", "--id", "a"], &[0xff; 40]);
    assert_eq!(code(&out), 1);
    assert!(out.stdout.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any key in the generated format, with any prefix: `hash` writes an entry that
    /// verifies it, without printing it.
    #[test]
    fn hash_entries_verify_their_key(
        prefix in "[a-z]([a-z0-9_]{0,30}[a-z0-9])?",
        newline in prop_oneof![Just(""), Just("\n"), Just("\r\n")],
    ) {
        let key = generate_key(&prefix).unwrap();
        let k = key.expose_secret();
        let out = run_with_stdin(&["hash", "--id", "p"], format!("{k}{newline}").as_bytes());
        prop_assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        prop_assert!(!stdout.contains(k));
        let store = KeyStore::from_toml(&stdout).unwrap();
        let p = store.verify(k, SystemTime::now()).unwrap();
        prop_assert_eq!(p.id(), "p");
    }

    /// A refused value is never repeated, whichever option it was given to.
    #[test]
    fn refused_values_are_never_repeated(
        flag in prop_oneof![
            Just("--id"), Just("--tier"), Just("--prefix"), Just("--expires"),
            Just("--not-before"), Just("--scopes"), Just("--nope"), Just(""),
        ],
        before in "[^\u{0}]{0,12}",
        after in "[^\u{0}]{0,12}",
    ) {
        // A space and a quote make the value invalid for every option.
        let value = format!("{before} \"sEcReT7{after}");
        let args: Vec<&str> = if flag.is_empty() {
            vec!["keygen", "--id", "a", &value]
        } else {
            vec!["keygen", "--id", "a", flag, &value]
        };
        let out = run(&args);
        prop_assert_eq!(code(&out), 2);
        prop_assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        prop_assert!(!err.contains("sEcReT7"), "{}", err);
    }
}
