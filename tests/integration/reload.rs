//! Key-file reloading with real files, for the API-key file and the service-token key
//! files (a JWKS and a PEM): every way a file gets replaced in practice (atomic
//! rename, a same-size rename within one timestamp tick, an in-place rewrite that
//! keeps the modification time, a fixed-time store behind a symlink swap, a
//! Kubernetes ConfigMap `..data` swap), files that cannot be read for a while
//! (dangling symlink, directory, permissions), half-written files, FIFOs, devices,
//! oversized files; the key rules of a reload; and the stack from the environment
//! over TCP. Every real change must be applied within a few intervals with a
//! `key_file_reloaded` event, no other state may ever be in force, and nothing may
//! block later changes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use jsonwebtoken::EncodingKey;
use portcullis::api_key::{ApiKeys, GeneratedKey, KeyStore, generate_key};
use portcullis::jwt::{Algorithm, KeyFile, TokenVerifier, VerifyingKey};
use portcullis::reload::ReloadHandle;
use portcullis::{ConfigError, Principal};
use serde_json::json;
use tower::util::BoxCloneService;

use crate::common::{self, Handler, Peer};
use crate::log_capture;

const EC_KEY: &[u8] = include_bytes!("../data/jwt/ec.key.pem");
const EC_PUB: &[u8] = include_bytes!("../data/jwt/ec.pub.pem");
const EC2_KEY: &[u8] = include_bytes!("../data/jwt/ec2.key.pem");
const EC2_PUB: &[u8] = include_bytes!("../data/jwt/ec2.pub.pem");
const RSA_KEY: &[u8] = include_bytes!("../data/jwt/rsa.key.pem");
const RSA_PUB: &[u8] = include_bytes!("../data/jwt/rsa.pub.pem");
/// The public point of `ec.key.pem` (as in `jwks.json`).
const EC_X: &str = "B0e9FDbtUjx3kq7s-dbkKs3TpaQcWC3QEtSk1xwUmks";
const EC_Y: &str = "E1QlFLSW4ZBFbZ3S_rRWrUK_-dBZuh7pAUtYDXraKwc";
/// The modulus of `rsa.key.pem` (as in `jwks.json`).
const RSA_N: &str = "4DQN2k0ofbEBDnYrQaof5Z0kkv7fWrPo1ipeLjSuCBC1yB-WAwHpIhB9iWtj-oaYHM2rtD1W_PcMDw_Ujq35YrSrPbwSu-PG1HeCzf_dMhOEkICZrKcexLwiD7bniWmy0_WmIUgOn8I0SH2h2wvAgHTD3UL74T4iTw4ptIVoWnAK1qEUy16SkiLRLjok0aKSetLv7qWu0-OVjr99rVs5aYKYS4DY4leHoh0Hhu6HqQMQBjAP0E7s1jV2Se2FFvCvQwSJQjZ3ZFCdjau1i8wW3pKR65im17_iIxIbqx1MY53h-xv2ai8XzPHDHmOk9d35FobP2h6EI9q-Dg9u8Av8aQ";

const ISS: &str = "https://ci.example";
const AUD: &str = "jobs-api";

const RELOADED: &str = "key_file_reloaded";
const FAILED: &str = "key_file_reload_failed";

/// The poll interval of these tests.
const INTERVAL: Duration = Duration::from_millis(50);
/// A sanity bound on "applied within two intervals" on a loaded machine: a change
/// that is never applied fails here instead of hanging.
const LIMIT: Duration = Duration::from_secs(4);

// ---------------------------------------------------------------------------
// Files

struct TempDir(PathBuf);

impl TempDir {
    /// Also installs the capture of audit events before anything is reloaded.
    fn new(tag: &str) -> Self {
        log_capture::capture();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!(
            "portcullis-reload-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// A string only this test's paths contain, to pick its audit events.
    fn marker(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a temporary file in the same directory, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, path).unwrap();
}

/// Rewrites `path` in place (same inode), as an editor or `cp` without `--remove-destination` does.
fn write_in_place(path: &Path, bytes: &[u8]) -> std::fs::File {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
    f
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[cfg(unix)]
fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// Points the symlink `link` at `target` atomically: a new link renamed over it.
#[cfg(unix)]
fn swap_symlink(target: impl AsRef<Path>, link: &Path) {
    let mut name = link.file_name().unwrap().to_owned();
    name.push("_tmp");
    let tmp = link.with_file_name(name);
    symlink(target, &tmp);
    std::fs::rename(&tmp, link).unwrap();
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
}

/// Whether this process reads files whatever their permissions (root).
#[cfg(unix)]
fn reads_unreadable_files(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let probe = dir.join("probe");
    std::fs::write(&probe, "x").unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o000)).unwrap();
    let readable = std::fs::read(&probe).is_ok();
    std::fs::remove_file(&probe).unwrap();
    readable
}

// ---------------------------------------------------------------------------
// Audit events

fn events(dir: &TempDir, event: &str) -> Vec<serde_json::Value> {
    log_capture::capture()
        .events_with(&dir.marker())
        .into_iter()
        .filter(|e| e["fields"]["event"] == event)
        .collect()
}

/// Waits until `n` events `event` of this test were emitted (an event follows the
/// swap it reports), then returns them.
fn wait_for_events(dir: &TempDir, event: &str, n: usize) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let e = events(dir, event);
        if e.len() >= n || start.elapsed() > LIMIT {
            return e;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn failures(dir: &TempDir) -> Vec<String> {
    events(dir, FAILED)
        .iter()
        .map(|e| e["fields"]["error"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits until a new failure event (beyond `seen`) contains `needle`.
fn wait_for_failure(dir: &TempDir, seen: usize, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let f = failures(dir);
        if let Some(e) = f.iter().skip(seen).find(|e| e.contains(needle)) {
            return e.clone();
        }
        assert!(
            start.elapsed() < LIMIT,
            "no `{FAILED}` event containing {needle:?}; got {f:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` with every `tracing` event of this thread dropped: sampling which keys
/// are in force verifies credentials, and those audit events would flood the capture.
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    f()
}

// ---------------------------------------------------------------------------
// The key sources under test

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A TOML API-key file.
    ApiKeys,
    /// A JWK Set.
    Jwks,
    /// A PEM public key (P-256 PEMs all have the same size).
    Pem,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(kid: &str, key: &EncodingKey, alg: jsonwebtoken::Algorithm) -> String {
    let header = json!({"alg": format!("{alg:?}"), "kid": kid}).to_string();
    let n = now();
    let claims = json!({"iss": ISS, "sub": "reload-client", "aud": AUD, "iat": n, "exp": n + 900})
        .to_string();
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

fn es256(kid: &str, pem: &[u8]) -> String {
    token(
        kid,
        &EncodingKey::from_ec_pem(pem).unwrap(),
        jsonwebtoken::Algorithm::ES256,
    )
}

fn jwks_with(kid: &str) -> String {
    format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"{kid}","alg":"ES256","x":"{EC_X}","y":"{EC_Y}"}}]}}"#
    )
}

enum Loaded {
    Keys(ApiKeys),
    Tokens(TokenVerifier),
}

/// One key source and numbered versions of its file: version `i` accepts credential
/// `i` only, and every version of a kind has the same length.
struct Subject {
    kind: Kind,
    keys: Vec<GeneratedKey>,
    tokens: Vec<String>,
    loaded: Option<Loaded>,
}

impl Subject {
    fn new(kind: Kind) -> Self {
        let (keys, tokens) = match kind {
            Kind::ApiKeys => (
                (0..5).map(|_| generate_key("pc_test").unwrap()).collect(),
                Vec::new(),
            ),
            Kind::Jwks => (
                Vec::new(),
                (0..5).map(|i| es256(&format!("v{i}"), EC_KEY)).collect(),
            ),
            Kind::Pem => (
                Vec::new(),
                vec![es256("pem", EC_KEY), es256("pem", EC2_KEY)],
            ),
        };
        Self {
            kind,
            keys,
            tokens,
            loaded: None,
        }
    }

    /// How many different versions there are; version `i` is `i % distinct`.
    fn distinct(&self) -> usize {
        match self.kind {
            Kind::Pem => 2,
            _ => 5,
        }
    }

    fn content(&self, i: usize) -> Vec<u8> {
        let i = i % self.distinct();
        match self.kind {
            Kind::ApiKeys => format!(
                "[[keys]]\nid = \"v{i}\"\ndigest = \"{}\"\n",
                self.keys[i].digest()
            )
            .into_bytes(),
            Kind::Jwks => jwks_with(&format!("v{i}")).into_bytes(),
            Kind::Pem => [EC_PUB, EC2_PUB][i].to_vec(),
        }
    }

    /// Version `i` grown to `len` bytes with what its format ignores (a TOML comment,
    /// JSON whitespace); `None` for PEM, or when `len` is too short.
    fn padded(&self, i: usize, len: usize) -> Option<Vec<u8>> {
        let mut c = self.content(i);
        match self.kind {
            Kind::ApiKeys if len >= c.len() + 2 => {
                c.push(b'#');
                c.resize(len - 1, b'x');
                c.push(b'\n');
            }
            Kind::Jwks if len >= c.len() => c.resize(len, b' '),
            _ => return None,
        }
        Some(c)
    }

    fn load(&self, path: &Path) -> Result<Loaded, ConfigError> {
        let verifier = |file: KeyFile| {
            TokenVerifier::builder()
                .key_file(file)
                .issuer(ISS)
                .audience(AUD)
                .build()
        };
        Ok(match self.kind {
            Kind::ApiKeys => Loaded::Keys(ApiKeys::from_file(path)?),
            Kind::Jwks => Loaded::Tokens(verifier(KeyFile::jwks(path))?),
            Kind::Pem => Loaded::Tokens(verifier(KeyFile::pem(path, Algorithm::ES256).kid("pem"))?),
        })
    }

    fn watch(&self) -> ReloadHandle {
        match self.loaded.as_ref().unwrap() {
            Loaded::Keys(k) => k.watch_key_file(INTERVAL).unwrap(),
            Loaded::Tokens(v) => v.watch_key_files(INTERVAL).unwrap(),
        }
    }

    fn reload(&self) -> Result<(), ConfigError> {
        match self.loaded.as_ref().unwrap() {
            Loaded::Keys(k) => k.reload(),
            Loaded::Tokens(v) => v.reload(),
        }
    }

    fn accepts(&self, i: usize) -> bool {
        let i = i % self.distinct();
        match self.loaded.as_ref().unwrap() {
            Loaded::Keys(k) => k.verify(self.keys[i].expose_secret()).is_ok(),
            Loaded::Tokens(v) => v.verify(&self.tokens[i]).is_ok(),
        }
    }

    /// The version whose credential is accepted now. The versions are tried one
    /// after the other, so a swap between two tries can make all fail: only a result
    /// that three rounds agree on is "none".
    fn in_force(&self) -> Option<usize> {
        quietly(|| (0..3).find_map(|_| (0..self.distinct()).find(|&i| self.accepts(i))))
    }
}

/// Records every version in force, sampled every 2 ms, from start to [`Run::finish`].
struct Sampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Option<usize>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(subject: Arc<Subject>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, seen) = (stop.clone(), seen.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = subject.in_force();
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&now) {
                        seen.push(now);
                    }
                    drop(seen);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Option<usize>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A watched key source over the file at `path`.
struct Run {
    subject: Arc<Subject>,
    sampler: Sampler,
    handle: ReloadHandle,
}

impl Run {
    /// Loads `path` (which holds `subject`'s version 0) and watches it every
    /// [`INTERVAL`].
    fn start(mut subject: Subject, path: &Path) -> Self {
        subject.loaded = Some(subject.load(path).unwrap());
        let subject = Arc::new(subject);
        assert_eq!(subject.in_force(), Some(0));
        let handle = subject.watch();
        Self {
            sampler: Sampler::start(subject.clone()),
            subject,
            handle,
        }
    }

    fn content(&self, i: usize) -> Vec<u8> {
        self.subject.content(i)
    }

    /// Waits until version `i` is in force.
    fn expect(&self, i: usize) {
        let want = Some(i % self.subject.distinct());
        let start = Instant::now();
        while self.subject.in_force() != want {
            assert!(
                start.elapsed() < LIMIT,
                "{:?}: version {i} not in force after {LIMIT:?} (in force: {:?})",
                self.subject.kind,
                self.subject.in_force()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets `n` polls happen.
    fn polls(&self, n: u32) {
        std::thread::sleep(INTERVAL * n);
    }

    /// Stops sampling and checks that exactly `versions`, in this order, were ever in
    /// force, with one `key_file_reloaded` event per change.
    fn finish(self, dir: &TempDir, versions: &[usize]) {
        let mut seen = self.sampler.finish();
        // The last change may have come after the sampler's last look.
        let last = self.subject.in_force();
        if seen.last() != Some(&last) {
            seen.push(last);
        }
        let d = self.subject.distinct();
        let want: Vec<Option<usize>> = versions.iter().map(|v| Some(v % d)).collect();
        assert_eq!(
            seen, want,
            "{:?}: the versions in force, in order",
            self.subject.kind
        );
        let reloads = wait_for_events(dir, RELOADED, versions.len() - 1);
        assert_eq!(
            reloads.len(),
            versions.len() - 1,
            "{:?}: one reload event per change",
            self.subject.kind
        );
        for e in reloads {
            let source = e["fields"]["source"].as_str().unwrap();
            let expected = match self.subject.kind {
                Kind::ApiKeys => "api_keys",
                _ => "service_tokens",
            };
            assert_eq!(source, expected);
            assert_eq!(e["level"], "INFO");
        }
        drop(self.handle);
    }
}

/// A directory for one test, a subject, and the path of its file holding version 0.
fn setup(kind: Kind, tag: &str) -> (TempDir, Subject, PathBuf) {
    let dir = TempDir::new(&format!("{tag}-{kind:?}"));
    let subject = Subject::new(kind);
    let path = dir.0.join(match kind {
        Kind::ApiKeys => "keys.toml",
        Kind::Jwks => "jwks.json",
        Kind::Pem => "signer.pub.pem",
    });
    write_atomically(&path, &subject.content(0));
    (dir, subject, path)
}

/// The content of `run`'s version `i`, checked to have the length of version 0 (so
/// a change cannot be told by the size).
fn same_size(run: &Run, i: usize) -> Vec<u8> {
    let c = run.content(i);
    assert_eq!(c.len(), run.content(0).len());
    c
}

// ---------------------------------------------------------------------------
// Layouts, each run for every kind of key file

fn atomic_rename(kind: Kind) {
    let (dir, subject, path) = setup(kind, "atomic");
    let run = Run::start(subject, &path);
    write_atomically(&path, &run.content(1));
    run.expect(1);
    write_atomically(&path, &run.content(2));
    run.expect(2);
    // The same content again, with a new inode and time: nothing to apply.
    write_atomically(&path, &run.content(2));
    run.polls(4);
    assert!(failures(&dir).is_empty());
    // An explicit reload applies at once.
    write_atomically(&path, &run.content(3));
    run.subject.reload().unwrap();
    assert_eq!(run.subject.in_force(), Some(3 % run.subject.distinct()));
    run.polls(3);
    run.finish(&dir, &[0, 1, 2, 3]);
}

fn same_size_rename_within_one_tick(kind: Kind) {
    let (dir, subject, path) = setup(kind, "tick");
    let run = Run::start(subject, &path);
    for i in 1..=2 {
        // A file of the same size renamed in within one timestamp tick: the same
        // size and modification time as the file it replaces.
        let before = mtime(&path);
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, same_size(&run, i)).unwrap();
        set_mtime(&tmp, before);
        std::fs::rename(&tmp, &path).unwrap();
        run.expect(i);
    }
    run.finish(&dir, &[0, 1, 2]);
}

fn preserved_mtime_in_place(kind: Kind) {
    let (dir, subject, path) = setup(kind, "cp-p");
    let run = Run::start(subject, &path);
    for i in 1..=2 {
        // `cp -p` / `rsync -t` over the file: new bytes, same size, same time.
        let before = mtime(&path);
        let f = write_in_place(&path, &same_size(&run, i));
        f.set_modified(before).unwrap();
        drop(f);
        assert_eq!(mtime(&path), before);
        run.expect(i);
    }
    run.finish(&dir, &[0, 1, 2]);
}

#[cfg(unix)]
fn fixed_mtime_symlink_swap(kind: Kind) {
    // A store whose files all carry one fixed time (as Nix's does), the path a
    // symlink into it that is swapped atomically.
    let (dir, subject, _) = setup(kind, "store");
    let fixed = UNIX_EPOCH + Duration::from_secs(1);
    let store = dir.0.join("store");
    let mut targets = Vec::new();
    for i in 0..3 {
        let d = store.join(format!("{i:032}-keys"));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("keys");
        std::fs::write(&f, subject.content(i)).unwrap();
        set_mtime(&f, fixed);
        targets.push(f);
    }
    let path = dir.0.join("current-keys");
    symlink(&targets[0], &path);
    let run = Run::start(subject, &path);
    for (i, target) in targets.iter().enumerate().skip(1) {
        swap_symlink(target, &path);
        run.expect(i);
    }
    run.finish(&dir, &[0, 1, 2]);
}

#[cfg(unix)]
fn configmap_data_swap(kind: Kind) {
    // What the kubelet does: dir/..<timestamp>/<file>, dir/..data -> ..<timestamp>,
    // dir/<file> -> ..data/<file>; an update writes a new timestamped directory and
    // renames a new `..data` symlink over the old one.
    let (dir, subject, _) = setup(kind, "configmap");
    let name = "keys";
    let version_dir = |i: usize| format!("..2026_01_0{}_00_00_00.00000000{i}", i + 1);
    let write_version = |i: usize, content: Vec<u8>| {
        let d = dir.0.join(version_dir(i));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join(name), content).unwrap();
    };
    write_version(0, subject.content(0));
    symlink(version_dir(0), dir.0.join("..data"));
    let path = dir.0.join(name);
    symlink(Path::new("..data").join(name), &path);
    let run = Run::start(subject, &path);
    for i in 1..=2 {
        write_version(i, run.content(i));
        swap_symlink(version_dir(i), &dir.0.join("..data"));
        std::fs::remove_dir_all(dir.0.join(version_dir(i - 1))).unwrap();
        run.expect(i);
    }
    run.finish(&dir, &[0, 1, 2]);
}

#[cfg(unix)]
fn unreadable_then_readable(kind: Kind) {
    let (dir, subject, path) = setup(kind, "unreadable");
    let run = Run::start(subject, &path);

    // A dangling symlink (a half-done deployment): refused, then the real file.
    std::fs::remove_file(&path).unwrap();
    symlink(dir.0.join("not-there-yet"), &path);
    let e = wait_for_failure(&dir, 0, "cannot read");
    assert!(e.contains(&*path.to_string_lossy()), "{e}");
    write_atomically(&path, &run.content(1));
    run.expect(1);

    // A directory in the file's place for a while, then a file with the directory's
    // size and modification time (a failed read must not count as "seen").
    let seen = failures(&dir).len();
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    wait_for_failure(&dir, seen, "not a regular file");
    run.polls(2);
    let next = run
        .subject
        .padded(2, meta.len() as usize)
        .unwrap_or_else(|| run.content(2));
    let tmp = dir.0.join("next");
    std::fs::write(&tmp, &next).unwrap();
    set_mtime(&tmp, meta.modified().unwrap());
    std::fs::remove_dir(&path).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    run.expect(2);

    // Permissions (written 0600 by another user, then fixed). A privileged process
    // reads any file, so this part needs an unprivileged one.
    if !reads_unreadable_files(&dir.0) {
        use std::os::unix::fs::PermissionsExt as _;
        let seen = failures(&dir).len();
        let tmp = dir.0.join("locked");
        std::fs::write(&tmp, run.content(3)).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        wait_for_failure(&dir, seen, "cannot read");
        run.polls(2);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        run.expect(3);
        run.finish(&dir, &[0, 1, 2, 3]);
    } else {
        run.finish(&dir, &[0, 1, 2]);
    }
}

fn directory_in_place_of_the_file(kind: Kind) {
    let (dir, subject, path) = setup(kind, "directory");
    let run = Run::start(subject, &path);
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let e = wait_for_failure(&dir, 0, "not a regular file");
    assert!(e.contains(&*path.to_string_lossy()), "{e}");
    run.polls(3);
    assert_eq!(
        failures(&dir).len(),
        1,
        "a lasting failure is reported once"
    );
    assert_eq!(run.subject.in_force(), Some(0), "the keys in force stay");
    std::fs::remove_dir(&path).unwrap();
    write_atomically(&path, &run.content(1));
    run.expect(1);
    // At start-up, a directory is a configuration error.
    let e = Subject::new(kind).load(&dir.0).err().expect("refused");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    run.finish(&dir, &[0, 1]);
}

/// A write cut short that does not parse, completed before the next poll: never
/// applied and never even reported.
fn torn_write_completed_within_a_poll(kind: Kind) {
    let (dir, subject, path) = setup(kind, "torn");
    let run = Run::start(subject, &path);
    for i in 1..=3 {
        let full = same_size(&run, i);
        let start = Instant::now();
        let f = write_in_place(&path, &full[..full.len() / 2]);
        drop(f);
        let f = write_in_place(&path, &full);
        drop(f);
        if start.elapsed() < INTERVAL / 2 {
            run.expect(i);
            assert!(failures(&dir).is_empty(), "{:?}", failures(&dir));
        } else {
            // The machine stalled between the two writes; the torn file may have
            // been seen twice. The final state is still the full file.
            run.expect(i);
        }
    }
    run.finish(&dir, &[0, 1, 2, 3]);
}

#[cfg(unix)]
fn fifo_and_device(kind: Kind) {
    let (dir, subject, path) = setup(kind, "fifo");
    let run = Run::start(subject, &path);
    // A FIFO without a writer: a blocking open would wait forever.
    let fifo = dir.0.join("fifo");
    mkfifo(&fifo);
    std::fs::rename(&fifo, &path).unwrap();
    let e = wait_for_failure(&dir, 0, "not a regular file");
    assert!(e.contains(&*path.to_string_lossy()), "{e}");
    // Later real changes still apply.
    write_atomically(&path, &run.content(1));
    run.expect(1);
    // A device that never ends.
    let seen = failures(&dir).len();
    swap_symlink("/dev/zero", &path);
    wait_for_failure(&dir, seen, "not a regular file");
    write_atomically(&path, &run.content(2));
    run.expect(2);
    run.finish(&dir, &[0, 1, 2]);

    // At start-up: a configuration error, at once.
    let fifo = dir.0.join("start-fifo");
    mkfifo(&fifo);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = Subject::new(kind).load(&fifo).err().map(|e| e.to_string());
        let _ = tx.send(r);
    });
    let e = rx
        .recv_timeout(LIMIT)
        .expect("loading a FIFO does not block")
        .expect("refused");
    assert!(e.contains("not a regular file"), "{e}");
}

fn oversized(kind: Kind) {
    let (dir, subject, path) = setup(kind, "oversize");
    let run = Run::start(subject, &path);
    let big_len = 2 << 20;
    // A valid file of version 1 beyond the 1 MiB limit: refused, never applied.
    let big = run
        .subject
        .padded(1, big_len)
        .unwrap_or_else(|| vec![b'-'; big_len]);
    write_atomically(&path, &big);
    let e = wait_for_failure(&dir, 0, "larger than the limit of 1048576 bytes");
    assert!(e.contains(&*path.to_string_lossy()), "{e}");
    run.polls(2);
    assert_eq!(run.subject.in_force(), Some(0));
    write_atomically(&path, &run.content(1));
    run.expect(1);
    run.finish(&dir, &[0, 1]);

    // At start-up: a configuration error; a higher limit accepts the file.
    let start = dir.0.join("big");
    std::fs::write(&start, &big).unwrap();
    let e = Subject::new(kind).load(&start).err().expect("refused");
    assert!(e.to_string().contains("larger than the limit"), "{e}");
    match kind {
        Kind::ApiKeys => {
            assert!(KeyStore::from_file(&start).is_err());
            let keys = ApiKeys::from_file_with_max_len(&start, 4 << 20).unwrap();
            assert_eq!(keys.snapshot().len(), 1);
        }
        Kind::Jwks => {
            let v = TokenVerifier::builder()
                .key_file(KeyFile::jwks(&start).max_len(4 << 20))
                .issuer(ISS)
                .audience(AUD)
                .build()
                .unwrap();
            assert_eq!(v.key_count(), 1);
        }
        Kind::Pem => {}
    }
}

macro_rules! for_every_kind {
    ($($(#[$attr:meta])* $layout:ident),* $(,)?) => {
        mod api_key_file {
            $( $(#[$attr])* #[test] fn $layout() { super::$layout(super::Kind::ApiKeys) } )*
        }
        mod jwks_file {
            $( $(#[$attr])* #[test] fn $layout() { super::$layout(super::Kind::Jwks) } )*
        }
        mod pem_file {
            $( $(#[$attr])* #[test] fn $layout() { super::$layout(super::Kind::Pem) } )*
        }
    };
}

for_every_kind!(
    atomic_rename,
    same_size_rename_within_one_tick,
    preserved_mtime_in_place,
    #[cfg(unix)]
    fixed_mtime_symlink_swap,
    #[cfg(unix)]
    configmap_data_swap,
    #[cfg(unix)]
    unreadable_then_readable,
    directory_in_place_of_the_file,
    torn_write_completed_within_a_poll,
    #[cfg(unix)]
    fifo_and_device,
    oversized,
);

// ---------------------------------------------------------------------------
// Half-written API-key files that parse

fn entry(id: &str, key: &GeneratedKey) -> String {
    format!("[[keys]]\nid = \"{id}\"\ndigest = \"{}\"\n", key.digest())
}

#[test]
fn a_half_written_key_file_that_parses_is_not_applied_if_completed_within_a_poll() {
    let revoked = generate_key("pc_test").unwrap();
    let old = generate_key("pc_test").unwrap();
    let new = generate_key("pc_test").unwrap();
    // The full file revokes a key; cut before `revoked = true`, it is a valid file
    // in which that key is valid.
    let full = entry("half-revoked", &revoked) + "revoked = true\n\n" + &entry("half-new", &new);
    let cut = entry("half-revoked", &revoked);
    assert!(full.starts_with(&cut));
    assert!(KeyStore::from_toml(&cut).is_ok());

    // A slow machine can stall between the two writes for a whole interval; then the
    // scenario did not happen as intended and is run again.
    for attempt in 0.. {
        assert!(
            attempt < 5,
            "the two writes never ran within half an interval"
        );
        let dir = TempDir::new("half-written");
        let path = dir.0.join("keys.toml");
        write_atomically(
            &path,
            (entry("half-revoked", &revoked) + "revoked = true\n\n" + &entry("half-old", &old))
                .as_bytes(),
        );
        let keys = ApiKeys::from_file(&path).unwrap();
        let reloading = keys.watch_key_file(INTERVAL).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = std::thread::spawn({
            let (keys, stop) = (keys.clone(), stop.clone());
            let secret = revoked.expose_secret().to_owned();
            move || {
                let mut accepted = false;
                while !stop.load(Ordering::Relaxed) {
                    accepted |= keys.verify(&secret).is_ok();
                    std::thread::sleep(Duration::from_millis(1));
                }
                accepted
            }
        });
        let start = Instant::now();
        drop(write_in_place(&path, cut.as_bytes()));
        drop(write_in_place(&path, full.as_bytes()));
        let stalled = start.elapsed() >= INTERVAL / 2;
        let applied = Instant::now();
        while keys.verify(new.expose_secret()).is_err() {
            assert!(applied.elapsed() < LIMIT, "the full file is applied");
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        let revoked_was_accepted = sampler.join().unwrap();
        drop(reloading);
        if stalled {
            continue;
        }
        assert!(!revoked_was_accepted, "the cut file was never in force");
        let reloads = wait_for_events(&dir, RELOADED, 1);
        assert_eq!(reloads.len(), 1, "only the full file was applied");
        assert_eq!(reloads[0]["fields"]["keys"], 2);
        assert!(keys.verify(old.expose_secret()).is_err());
        assert!(keys.verify(revoked.expose_secret()).is_err());
        break;
    }
}

#[test]
fn a_half_written_file_that_stays_is_applied_once_it_is_stable() {
    let dir = TempDir::new("half-stays");
    let path = dir.0.join("keys.toml");
    let a = generate_key("pc_test").unwrap();
    let b = generate_key("pc_test").unwrap();
    write_atomically(&path, entry("stays-a", &a).as_bytes());
    let keys = ApiKeys::from_file(&path).unwrap();
    let _reloading = keys.watch_key_file(INTERVAL).unwrap();
    // The writer died after the first entry: the file parses and never changes
    // again, so it is taken as written, but only after two reads agreed.
    let written = Instant::now();
    drop(write_in_place(&path, entry("stays-b", &b).as_bytes()));
    while keys.verify(b.expose_secret()).is_err() {
        assert!(written.elapsed() < LIMIT);
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = written.elapsed();
    assert!(
        took >= INTERVAL,
        "applied {took:?} after the write, before a second poll could confirm it"
    );
    assert_eq!(wait_for_events(&dir, RELOADED, 1).len(), 1);
}

// ---------------------------------------------------------------------------
// Revocation, rotation and broken files over TCP (the API-key file)

fn whoami() -> Handler {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let id = req
            .extensions()
            .get::<Principal>()
            .map_or("-".to_owned(), |p| p.id().to_owned());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(id))))
    }))
}

async fn status(addr: SocketAddr, header: &str) -> u16 {
    common::get(addr, &[header.as_bytes()]).await.status
}

async fn status_becomes(addr: SocketAddr, header: &str, want: u16) {
    let start = Instant::now();
    loop {
        let s = status(addr, header).await;
        if s == want {
            return;
        }
        assert!(start.elapsed() < LIMIT, "{s}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn key_file_reload_revokes_rotates_and_survives_a_broken_file() {
    use portcullis::authenticate::AuthenticateLayer;
    let dir = TempDir::new("tcp-api-keys");
    let path = dir.0.join("keys.toml");
    let old = generate_key("pc_test").unwrap();
    let new = generate_key("pc_test").unwrap();
    let line = |id: &str, k: &GeneratedKey, revoked: bool| {
        format!("{}revoked = {revoked}\n\n", entry(id, k))
    };
    write_atomically(&path, line("tcp-old", &old, false).as_bytes());
    let keys = ApiKeys::from_file(&path).unwrap();
    let reloading = keys.watch_key_file(INTERVAL).unwrap();
    let layer = AuthenticateLayer::api_keys(keys.clone());
    let addr = common::serve_with("127.0.0.1:0", layer, Peer::Attached, whoami()).await;
    let old_h = format!("X-API-Key: {}", old.expose_secret());
    let new_h = format!("X-API-Key: {}", new.expose_secret());
    assert_eq!(status(addr, &old_h).await, 200);
    assert_eq!(status(addr, &new_h).await, 401);

    // Rotation: old and new valid together.
    write_atomically(
        &path,
        (line("tcp-old", &old, false) + &line("tcp-new", &new, false)).as_bytes(),
    );
    status_becomes(addr, &new_h, 200).await;
    assert_eq!(status(addr, &old_h).await, 200);

    // Revocation in the file: 401 within a few intervals, no restart.
    write_atomically(
        &path,
        (line("tcp-old", &old, true) + &line("tcp-new", &new, false)).as_bytes(),
    );
    status_becomes(addr, &old_h, 401).await;
    assert_eq!(status(addr, &new_h).await, 200);

    // A broken file (a raw key pasted in) keeps the store and is reported once, by
    // position, never by value.
    let leaked = generate_key("pc_test").unwrap();
    write_atomically(
        &path,
        format!(
            "{}[[keys]]\nid = \"tcp-broken\"\nkey = \"{}\"\n",
            line("tcp-new", &new, false),
            leaked.expose_secret()
        )
        .as_bytes(),
    );
    // (The server is idle meanwhile: blocking this thread is harmless.)
    let error = wait_for_failure(&dir, 0, "line 8, column 1");
    assert!(error.contains(&*path.to_string_lossy()), "{error}");
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(failures(&dir).len(), 1, "reported once, not on every poll");
    assert_eq!(events(&dir, FAILED)[0]["level"], "ERROR");
    assert_eq!(events(&dir, FAILED)[0]["fields"]["source"], "api_keys");
    assert_eq!(status(addr, &new_h).await, 200);
    assert_eq!(status(addr, &old_h).await, 401);

    // An explicit reload reports the same error and keeps the store.
    assert!(keys.reload().is_err());
    assert_eq!(keys.snapshot().len(), 2);
    assert_eq!(failures(&dir).len(), 2);

    let reloaded = wait_for_events(&dir, RELOADED, 2);
    assert_eq!(reloaded.len(), 2);
    assert_eq!(reloaded[1]["fields"]["keys"], 2);
    assert_eq!(reloaded[1]["fields"]["path"], *path.to_string_lossy());
    let all = log_capture::capture().text();
    for k in [&old, &new, &leaked] {
        assert!(!all.contains(k.expose_secret()));
    }

    // Dropping the handle stops reloading: a new file is no longer picked up.
    drop(reloading);
    write_atomically(&path, line("tcp-after", &old, false).as_bytes());
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(status(addr, &old_h).await, 401);
    assert_eq!(events(&dir, RELOADED).len(), 2);
}

// ---------------------------------------------------------------------------
// Key rules of a service-token key file reload

fn verifier(path: &Path, symmetric: bool) -> TokenVerifier {
    let b = TokenVerifier::builder()
        .key_file(KeyFile::jwks(path))
        .issuer(ISS)
        .audience(AUD);
    let b = if symmetric {
        b.allow_symmetric_keys_from_files()
    } else {
        b
    };
    b.build().unwrap()
}

fn rsa_jwks(kid: &str) -> String {
    format!(r#"{{"keys":[{{"kty":"RSA","kid":"{kid}","alg":"RS256","n":"{RSA_N}","e":"AQAB"}}]}}"#)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < LIMIT, "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_kid_never_switches_from_rs256_to_an_hmac_key() {
    let dir = TempDir::new("kid-switch");
    let path = dir.0.join("jwks.json");
    write_atomically(&path, rsa_jwks("rsa-1").as_bytes());
    // Opted in to HMAC keys from files, so only the kid rule stands in the way.
    let v = verifier(&path, true);
    let _reloading = v.watch_key_files(INTERVAL).unwrap();
    let rs = token(
        "rsa-1",
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
        jsonwebtoken::Algorithm::RS256,
    );
    // HS256 keyed with the former RSA public key: what the swap would let in.
    let forged = token(
        "rsa-1",
        &EncodingKey::from_secret(RSA_PUB),
        jsonwebtoken::Algorithm::HS256,
    );
    let oct = |kid: &str| {
        format!(
            r#"{{"keys":[{{"kty":"oct","kid":"{kid}","alg":"HS256","k":"{}"}}]}}"#,
            b64(RSA_PUB)
        )
    };
    assert!(quietly(|| v.verify(&rs)).is_ok());

    write_atomically(&path, oct("rsa-1").as_bytes());
    wait_for_failure(&dir, 0, "kid `rsa-1` was RS256 and would become HS256");
    std::thread::sleep(INTERVAL * 3);
    assert!(quietly(|| v.verify(&forged)).is_err());
    assert!(quietly(|| v.verify(&rs)).is_ok(), "the keys in force stay");
    assert!(v.reload().is_err(), "an explicit reload is refused too");

    // Dropping the kid first and bringing it back as HMAC later is refused as well.
    write_atomically(&path, jwks_with("ec-1").as_bytes());
    wait_until("ec-1 replaces rsa-1", || {
        quietly(|| v.verify(&rs)).is_err() && quietly(|| v.verify(&es256("ec-1", EC_KEY))).is_ok()
    });
    let seen = failures(&dir).len();
    write_atomically(&path, oct("rsa-1").as_bytes());
    wait_for_failure(&dir, seen, "kid `rsa-1` was RS256");
    assert!(quietly(|| v.verify(&forged)).is_err());

    // A new kid may be HMAC (opted in).
    write_atomically(&path, oct("hs-new").as_bytes());
    let hs = token(
        "hs-new",
        &EncodingKey::from_secret(RSA_PUB),
        jsonwebtoken::Algorithm::HS256,
    );
    wait_until("the new HMAC kid is in force", || {
        quietly(|| v.verify(&hs)).is_ok()
    });

    // In code, the same rule.
    assert!(
        v.replace_keys([VerifyingKey::hs256(&[7u8; 32]).unwrap().kid("rsa-1")])
            .is_err()
    );
}

#[test]
fn hmac_keys_in_key_files_need_an_opt_in() {
    let dir = TempDir::new("oct-opt-in");
    let path = dir.0.join("jwks.json");
    let oct = format!(
        r#"{{"keys":[{{"kty":"oct","kid":"hs","alg":"HS256","k":"{}"}}]}}"#,
        b64(&[9u8; 32])
    );
    std::fs::write(&path, &oct).unwrap();
    let e = TokenVerifier::builder()
        .key_file(KeyFile::jwks(&path))
        .issuer(ISS)
        .audience(AUD)
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("allow_symmetric_keys_from_files"), "{e}");
    assert!(!e.contains(&b64(&[9u8; 32])), "{e}");
    assert_eq!(verifier(&path, true).key_count(), 1);

    // On reload too.
    write_atomically(&path, jwks_with("ec-1").as_bytes());
    let v = verifier(&path, false);
    let _reloading = v.watch_key_files(INTERVAL).unwrap();
    write_atomically(&path, oct.as_bytes());
    wait_for_failure(&dir, 0, "allow_symmetric_keys_from_files");
    assert!(quietly(|| v.verify(&es256("ec-1", EC_KEY))).is_ok());
}

#[test]
fn a_jwk_with_any_private_member_is_refused() {
    let dir = TempDir::new("private-jwk");
    let path = dir.0.join("jwks.json");
    let rsa = |extra: &str| {
        format!(r#"{{"kty":"RSA","kid":"rsa-1","alg":"RS256","n":"{RSA_N}","e":"AQAB"{extra}}}"#)
    };
    for member in ["d", "p", "q", "dp", "dq", "qi"] {
        let jwk = rsa(&format!(r#","{member}":"AQAB""#));
        let e = VerifyingKey::from_jwk(&jwk).unwrap_err().to_string();
        assert!(e.contains(&format!("(`{member}`)")), "{member}: {e}");
    }
    let e = VerifyingKey::from_jwk(&rsa(r#","oth":[{"r":"AQAB","d":"AQAB","t":"AQAB"}]"#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("private key material"), "{e}");
    let ec_with_k = format!(
        r#"{{"kty":"EC","crv":"P-256","x":"{EC_X}","y":"{EC_Y}","k":"{}"}}"#,
        b64(&[1u8; 32])
    );
    assert!(VerifyingKey::from_jwk(&ec_with_k).is_err());
    assert!(VerifyingKey::from_jwk(&rsa("")).is_ok());

    // At start-up and on reload.
    std::fs::write(&path, format!(r#"{{"keys":[{}]}}"#, rsa(r#","p":"AQAB""#))).unwrap();
    let e = TokenVerifier::builder()
        .key_file(KeyFile::jwks(&path))
        .issuer(ISS)
        .audience(AUD)
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("(`p`)"), "{e}");
    write_atomically(&path, rsa_jwks("rsa-1").as_bytes());
    let v = verifier(&path, false);
    let _reloading = v.watch_key_files(INTERVAL).unwrap();
    write_atomically(
        &path,
        format!(r#"{{"keys":[{}]}}"#, rsa(r#","p":"AQAB""#)).as_bytes(),
    );
    wait_for_failure(&dir, 0, "(`p`)");
    let rs = token(
        "rsa-1",
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
        jsonwebtoken::Algorithm::RS256,
    );
    assert!(quietly(|| v.verify(&rs)).is_ok());
}

#[test]
fn a_jwks_reload_empties_the_cache_and_a_broken_file_keeps_the_keys() {
    let dir = TempDir::new("jwks-cache");
    let path = dir.0.join("jwks.json");
    write_atomically(&path, include_bytes!("../data/jwt/jwks.json"));
    let v = verifier(&path, false);
    let _reloading = v.watch_key_files(INTERVAL).unwrap();
    let ec1 = es256("ec-1", EC_KEY);
    let ec2 = es256("ec-2", EC2_KEY);
    assert!(quietly(|| v.verify(&ec1)).is_ok());
    assert_eq!(v.cached_tokens(), 1);
    let generation = v.key_generation();
    write_atomically(&path, include_bytes!("../data/jwt/jwks-rotated.json"));
    wait_until("the rotated set is in force", || {
        v.key_generation() > generation
    });
    assert_eq!(v.cached_tokens(), 0, "the cache is emptied with the keys");
    assert!(quietly(|| v.verify(&ec1)).is_err());
    assert!(quietly(|| v.verify(&ec2)).is_ok());
    write_atomically(&path, b"{\"keys\": [ {broken");
    wait_for_failure(&dir, 0, "not valid JSON");
    assert_eq!(v.key_count(), 1);
    assert!(quietly(|| v.verify(&ec2)).is_ok());
}

#[test]
fn watching_needs_a_key_file_and_an_interval() {
    let v = TokenVerifier::builder()
        .key(VerifyingKey::hs256(&[7u8; 32]).unwrap())
        .issuer(ISS)
        .audience(AUD)
        .build()
        .unwrap();
    assert!(v.watch_key_files(INTERVAL).is_err());
    assert!(v.reload().is_ok(), "nothing to reload");
    let dir = TempDir::new("watch-args");
    let path = dir.0.join("jwks.json");
    std::fs::write(&path, jwks_with("ec-1")).unwrap();
    assert!(
        verifier(&path, false)
            .watch_key_files(Duration::ZERO)
            .is_err()
    );
    assert!(
        TokenVerifier::builder()
            .key_file(KeyFile::jwks(&path).max_len(0))
            .issuer(ISS)
            .audience(AUD)
            .build()
            .is_err()
    );
}

// ---------------------------------------------------------------------------
// The stack keeps reloading while its services live

#[cfg(feature = "stack")]
#[tokio::test]
async fn the_stack_from_the_environment_reloads_both_files_while_its_services_live() {
    use portcullis::stack::StackBuilder;
    let dir = TempDir::new("stack-env");
    let keys_path = dir.0.join("keys.toml");
    let jwks_path = dir.0.join("jwks.json");
    let a = generate_key("pc_test").unwrap();
    let b = generate_key("pc_test").unwrap();
    write_atomically(&keys_path, entry("stack-a", &a).as_bytes());
    write_atomically(&jwks_path, jwks_with("stack-v0").as_bytes());
    let env: HashMap<&str, String> = HashMap::from([
        (
            "PORTCULLIS_KEY_FILE",
            keys_path.to_string_lossy().into_owned(),
        ),
        ("PORTCULLIS_KEY_FILE_RELOAD_SECS", "1".to_owned()),
        (
            "PORTCULLIS_JWKS_FILE",
            jwks_path.to_string_lossy().into_owned(),
        ),
        ("PORTCULLIS_JWKS_RELOAD_SECS", "1".to_owned()),
        ("PORTCULLIS_TOKEN_ISSUERS", ISS.to_owned()),
        ("PORTCULLIS_TOKEN_AUDIENCE", AUD.to_owned()),
        ("PORTCULLIS_RATE_LIMIT", "1000/s".to_owned()),
        ("PORTCULLIS_AUTH_THROTTLE", "1000/s".to_owned()),
    ]);
    let stack = StackBuilder::from_env_with(|n| env.get(n).cloned())
        .unwrap()
        .build()
        .unwrap();
    // Only the services outlive this line, as behind a router.
    let addr = common::serve_with("127.0.0.1:0", stack, Peer::Attached, whoami()).await;
    let key = |k: &GeneratedKey| format!("X-API-Key: {}", k.expose_secret());
    let bearer = |kid: &str| format!("Authorization: Bearer {}", es256(kid, EC_KEY));
    assert_eq!(status(addr, &key(&a)).await, 200);
    assert_eq!(status(addr, &bearer("stack-v0")).await, 200);

    write_atomically(
        &keys_path,
        (entry("stack-a", &a) + "revoked = true\n" + &entry("stack-b", &b)).as_bytes(),
    );
    write_atomically(&jwks_path, jwks_with("stack-v1").as_bytes());
    // The environment's interval is 1 s: applied within about two.
    let limit = Instant::now();
    while status(addr, &key(&a)).await != 401 || status(addr, &bearer("stack-v0")).await != 401 {
        assert!(
            limit.elapsed() < Duration::from_secs(6),
            "both files reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(addr, &key(&b)).await, 200);
    assert_eq!(status(addr, &bearer("stack-v1")).await, 200);
    let sources: Vec<_> = events(&dir, RELOADED)
        .iter()
        .map(|e| e["fields"]["source"].as_str().unwrap().to_owned())
        .collect();
    assert!(sources.contains(&"api_keys".to_owned()), "{sources:?}");
    assert!(
        sources.contains(&"service_tokens".to_owned()),
        "{sources:?}"
    );
}

#[cfg(feature = "stack")]
#[tokio::test]
async fn a_stack_built_with_its_own_api_keys_keeps_their_reload_handle() {
    use portcullis::stack::StackLayer;
    let dir = TempDir::new("stack-own");
    let path = dir.0.join("keys.toml");
    let a = generate_key("pc_test").unwrap();
    let b = generate_key("pc_test").unwrap();
    write_atomically(&path, entry("own-a", &a).as_bytes());
    let keys = ApiKeys::from_file(&path).unwrap();
    let stack = StackLayer::builder()
        .keep_reloading(keys.watch_key_file(INTERVAL).unwrap())
        .api_keys(keys)
        .quotas("1000/s")
        .build()
        .unwrap();
    let addr = common::serve_with("127.0.0.1:0", stack, Peer::Attached, whoami()).await;
    write_atomically(&path, entry("own-b", &b).as_bytes());
    status_becomes(addr, &format!("X-API-Key: {}", b.expose_secret()), 200).await;
    assert_eq!(
        status(addr, &format!("X-API-Key: {}", a.expose_secret())).await,
        401
    );
}
