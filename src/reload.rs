//! Reloading key files: one watcher for the API-key file and the service-token key
//! files (PEM, JWK, JWKS).
//!
//! [`ApiKeys::watch_key_file`](crate::api_key::ApiKeys::watch_key_file) and
//! `TokenVerifier::watch_key_files` (feature `jwt`) start a background thread that
//! polls their files and return a [`ReloadHandle`]. **Reloading lasts as long as the
//! handle**: dropping the last clone of it stops the thread (the drop waits for a poll
//! in progress, which is bounded). The thread also ends by itself once the key source
//! it reloads has been dropped. `StackBuilder::from_env` and
//! `StackBuilder::keep_reloading` (feature `stack`) hand the handles to the
//! `StackLayer`, so a stack reloads for as long as it, a clone of it, or a service
//! built from it lives.
//!
//! # What a reload guarantees
//!
//! - **Every change is seen.** Each poll reads the file and compares the SHA-256 of
//!   its content with the content in force. File metadata (device, inode, size,
//!   modification and change times) is never taken as proof that nothing changed, so
//!   a rewrite that keeps the size and the modification time (`cp -p`, `rsync -t`, a
//!   rename within one timestamp tick, a store whose files all carry one fixed time
//!   behind a symlink swap, a Kubernetes `..data` swap) is found.
//! - **Only settled content is applied.** A new content is applied once two
//!   consecutive polls read the same bytes with the same metadata, or three read the
//!   same bytes whatever their metadata, so a change is in force about two intervals
//!   after the file stops changing, and at most three after it is written even when
//!   the same content is renamed into place (or rewritten) again before every poll,
//!   as a periodic sync job does. A file written in place that is caught half-way is
//!   not applied if the writer finishes within one interval; a half-written file
//!   that stays unchanged for a whole interval is taken as written. Writers should
//!   therefore **write a temporary file in the same directory, flush it to disk, and
//!   rename it over the old one**: readers then see the old or the new file, never a
//!   mixture. A file whose content differs on four polls in a row (so nothing of it
//!   is applied) is reported with `key_file_reload_failed`, once.
//! - **A bad file never replaces good keys.** A file that cannot be read, is not a
//!   regular file, is larger than the limit, does not parse, or fails a key rule keeps
//!   the keys in force and emits `key_file_reload_failed`. A refused content is
//!   reported once and not retried until the file changes; a file that cannot be read
//!   is retried on every poll and reported again only when the error changes.
//! - **Reading never blocks and is bounded.** Only regular files are read (checked on
//!   the path and again on the opened file, after following symlinks); FIFOs and
//!   devices are opened without waiting and refused; at most the size limit (1 MiB
//!   unless configured) is read. The first load at start-up goes through the same
//!   reader, so a FIFO or an oversized file there is a configuration error.
//! - **Swaps are atomic and ordered.** Files are read and parsed without holding any
//!   lock; the result is swapped in at once, and never over the result of a later
//!   read. Requests in flight finish with the keys they started with.
//!
//! Reloads are audit events on [`audit::TARGET`](crate::audit::TARGET), the same for
//! both sources: `key_file_reloaded` (`INFO`; fields `source`, `path`, `keys`) and
//! `key_file_reload_failed` (`ERROR`; fields `source`, `path`, `error`). `source` is
//! `api_keys` or `service_tokens`; `error` names the file and the position of a
//! problem, never a value from the file but a key id, escaped as in every log
//! field.
//!
//! An explicit `reload()` (on `ApiKeys` and `TokenVerifier`) reads the files once and
//! applies what it reads without waiting for it to settle: call it when the files are
//! known to be complete.

use std::fmt;
use std::io::Read as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

use crate::ConfigError;

/// The default limit on the size of a key file: 1 MiB.
pub(crate) const DEFAULT_MAX_FILE_LEN: usize = 1 << 20;

/// Keeps a key file reloading; reloading stops when the last clone is dropped.
///
/// Returned by [`ApiKeys::watch_key_file`](crate::api_key::ApiKeys::watch_key_file)
/// and `TokenVerifier::watch_key_files`. Hold it for as long as the keys should follow
/// their files (in a `StackLayer`, hand it to `StackBuilder::keep_reloading`). Clones
/// share one background thread. Dropping the last clone signals the thread and waits
/// for a poll in progress to finish. See the [module docs](self) for what a reload
/// guarantees.
#[must_use = "reloading stops when the handle is dropped"]
#[derive(Clone)]
pub struct ReloadHandle {
    worker: Arc<Worker>,
}

struct Worker {
    source: &'static str,
    interval: Duration,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel wakes the thread, which then exits.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

impl fmt::Debug for ReloadHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadHandle")
            .field("source", &self.worker.source)
            .field("interval", &self.worker.interval)
            .finish()
    }
}

/// A key source whose files can be reloaded: the API-key store or the token
/// verifier's key set.
pub(crate) trait Source: Send + Sync + 'static {
    /// The `source` field of the audit events.
    const NAME: &'static str;
    /// What [`parse`](Self::parse) makes of the files.
    type Parsed;
    /// The watched files, `None` when the source has none.
    fn files(&self) -> Option<&FileSet>;
    /// Parses and validates the content of every file, in file order. No lock is held.
    fn parse(&self, contents: &[&[u8]]) -> Result<Self::Parsed, ConfigError>;
    /// Swaps the parsed keys in, or refuses them (a rule that depends on the keys in
    /// force). Called with the file set's lock held, so swaps are ordered. Returns the
    /// number of keys now in force. A source whose other keys can change calls
    /// [`FileSet::rejudge`] when they do, so that a content refused because of them
    /// is judged again instead of waiting for the file to change.
    fn swap(&self, parsed: Self::Parsed) -> Result<usize, ConfigError>;
}

/// What one read of a file gave.
pub(crate) struct Content {
    bytes: Vec<u8>,
    digest: [u8; 32],
    stamp: Stamp,
}

impl Content {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The opened file's metadata: two reads of one settled file agree on all of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
    #[cfg(unix)]
    ctime: (i64, i64),
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        Self {
            #[cfg(unix)]
            dev: meta.dev(),
            #[cfg(unix)]
            ino: meta.ino(),
            #[cfg(unix)]
            ctime: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// Reads a key file: a regular file (after following symlinks) of at most `max_len`
/// bytes, opened without blocking. Errors name the path and the problem.
pub(crate) fn read_file(path: &Path, max_len: usize) -> Result<Content, ConfigError> {
    let fail =
        |what: &dyn fmt::Display| ConfigError::new(format!("key file {}: {what}", path.display()));
    let not_regular = || fail(&"not a regular file (a directory, FIFO, socket or device)");
    let too_large = || fail(&format_args!("larger than the limit of {max_len} bytes"));
    // The path's type first, so a FIFO or a device is not even opened where the
    // platform has no non-blocking open; then the opened file's own, which is what
    // is read.
    let meta = std::fs::metadata(path).map_err(|e| fail(&format_args!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Opening a FIFO or a device returns at once instead of waiting for a writer.
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options
        .open(path)
        .map_err(|e| fail(&format_args!("cannot read: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(&format_args!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    if meta.len() > max_len as u64 {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // One byte past the limit tells a file that grew after the check from one that
    // ends at the limit.
    file.take(max_len as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(&format_args!("cannot read: {e}")))?;
    if bytes.len() > max_len {
        return Err(too_large());
    }
    Ok(Content {
        digest: Sha256::digest(&bytes).into(),
        stamp: Stamp::of(&meta),
        bytes,
    })
}

/// The files of one source and what the watcher knows about them.
pub(crate) struct FileSet {
    files: Vec<(PathBuf, usize)>,
    /// Numbers every read of the set, so a swap never replaces a later read's keys.
    reads: AtomicU64,
    state: Mutex<SetState>,
}

struct SetState {
    files: Vec<FileState>,
    /// The file digests of the contents last refused: not parsed (nor reported)
    /// again until a file changes.
    refused: Option<Vec<[u8; 32]>>,
    /// The number of the read whose contents are in force.
    applied_read: u64,
}

#[derive(Default)]
struct FileState {
    /// The digest of the content in force.
    applied: Option<[u8; 32]>,
    /// A new content seen by the last poll, the metadata of the last read, and how
    /// many polls in a row read it: applied when the next poll reads it again with
    /// the same metadata, or at the [`SETTLED_READS`]th read whatever its metadata.
    candidate: Option<([u8; 32], Stamp, u32)>,
    /// The read error last reported, so a lasting failure is reported once.
    unreadable: Option<String>,
    /// Consecutive polls that read a new content which had not settled; reported
    /// once on reaching [`UNSETTLED_REPORT`].
    unsettled: u32,
}

/// Polls in a row that read the same new content, each with other metadata, after
/// which it is applied: a file renamed into place (or rewritten) again before every
/// poll holds the same bytes, and must not hold its change back for ever.
const SETTLED_READS: u32 = 3;

/// Polls in a row that find a file changed but not settled before the change is
/// reported: a file rewritten in place more often than it is polled is never
/// applied, and must not stay so silently.
const UNSETTLED_REPORT: u32 = 4;

/// The contents of every file of a set, from one numbered read.
pub(crate) struct Snapshot {
    read: u64,
    contents: Vec<Content>,
}

impl Snapshot {
    /// The content of each file, in file order.
    pub(crate) fn bytes(&self) -> Vec<&[u8]> {
        self.contents.iter().map(Content::bytes).collect()
    }

    fn digests(&self) -> Vec<[u8; 32]> {
        self.contents.iter().map(|c| c.digest).collect()
    }
}

impl FileSet {
    /// A set of files, each with its size limit. `None` when there are none.
    pub(crate) fn new(files: Vec<(PathBuf, usize)>) -> Option<Self> {
        if files.is_empty() {
            return None;
        }
        Some(Self {
            state: Mutex::new(SetState {
                files: files.iter().map(|_| FileState::default()).collect(),
                refused: None,
                applied_read: 0,
            }),
            files,
            reads: AtomicU64::new(0),
        })
    }

    /// The path of file `i`.
    pub(crate) fn path(&self, i: usize) -> &Path {
        &self.files[i].0
    }

    fn lock(&self) -> MutexGuard<'_, SetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn paths(&self) -> String {
        let mut out = String::new();
        for i in 0..self.files.len() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&self.path(i).display().to_string());
        }
        out
    }

    fn read_each(&self) -> (u64, Vec<Result<Content, ConfigError>>) {
        let read = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
        let results = self
            .files
            .iter()
            .map(|(path, max_len)| read_file(path, *max_len))
            .collect();
        (read, results)
    }

    /// Reads every file now; the first error is returned.
    pub(crate) fn read_all(&self) -> Result<Snapshot, ConfigError> {
        let (read, results) = self.read_each();
        Ok(Snapshot {
            read,
            contents: results.into_iter().collect::<Result<_, _>>()?,
        })
    }

    /// Forgets the contents last refused, so the next poll judges them afresh: for
    /// a source whose keys in force changed another way (keys given in code), which
    /// may be what made [`Source::swap`] refuse them.
    #[cfg(feature = "jwt")]
    pub(crate) fn rejudge(&self) {
        self.lock().refused = None;
    }

    /// Records `snapshot` as the contents in force (the initial load).
    pub(crate) fn loaded(&self, snapshot: &Snapshot) {
        let mut state = self.lock();
        Self::record_applied(&mut state, snapshot);
    }

    fn record_applied(state: &mut SetState, snapshot: &Snapshot) {
        state.applied_read = snapshot.read;
        state.refused = None;
        for (file, content) in state.files.iter_mut().zip(&snapshot.contents) {
            file.applied = Some(content.digest);
            file.candidate = None;
            file.unreadable = None;
            file.unsettled = 0;
        }
    }

    /// One poll: reads every file and returns their contents when at least one
    /// changed and every file read the same twice in a row. Read failures are
    /// reported here.
    fn poll(&self, source: &'static str) -> Option<Snapshot> {
        let (read, results) = self.read_each();
        let mut state = self.lock();
        let (mut failed, mut settling, mut changed) = (false, false, false);
        for (i, result) in results.iter().enumerate() {
            let file = &mut state.files[i];
            match result {
                Err(e) => {
                    failed = true;
                    file.candidate = None;
                    file.unsettled = 0;
                    let message = e.to_string();
                    if file.unreadable.as_deref() != Some(&message) {
                        audit_failed(source, &self.files[i].0.display().to_string(), e);
                        file.unreadable = Some(message);
                    }
                }
                Ok(content) => {
                    file.unreadable = None;
                    if file.applied == Some(content.digest) {
                        file.candidate = None;
                        file.unsettled = 0;
                        continue;
                    }
                    let reads = match file.candidate {
                        Some((digest, stamp, _))
                            if digest == content.digest && stamp == content.stamp =>
                        {
                            SETTLED_READS
                        }
                        Some((digest, _, reads)) if digest == content.digest => reads + 1,
                        _ => 1,
                    };
                    if reads >= SETTLED_READS {
                        changed = true;
                        file.unsettled = 0;
                    } else {
                        file.candidate = Some((content.digest, content.stamp, reads));
                        settling = true;
                        file.unsettled = file.unsettled.saturating_add(1);
                        if file.unsettled == UNSETTLED_REPORT {
                            let e = ConfigError::new(format!(
                                "key file {}: its content differed on each of the last {UNSETTLED_REPORT} \
                                 reads, so none of it is applied; write a temporary file and \
                                 rename it into place once it is complete",
                                self.files[i].0.display()
                            ));
                            audit_failed(source, &self.files[i].0.display().to_string(), &e);
                        }
                    }
                }
            }
        }
        if failed || settling {
            return None;
        }
        if !changed {
            // Back to the contents in force: a refused content is judged afresh if
            // it comes back.
            state.refused = None;
            return None;
        }
        let snapshot = Snapshot {
            read,
            contents: results.into_iter().collect::<Result<_, _>>().ok()?,
        };
        if state.refused.as_ref() == Some(&snapshot.digests()) {
            return None;
        }
        Some(snapshot)
    }
}

/// Parses `snapshot` and swaps it in, unless a later read is already in force.
fn apply<S: Source>(source: &S, files: &FileSet, snapshot: Snapshot) -> Result<(), ConfigError> {
    let parsed = source.parse(&snapshot.bytes());
    let mut state = files.lock();
    if snapshot.read < state.applied_read {
        return Ok(());
    }
    match parsed.and_then(|p| source.swap(p)) {
        Ok(keys) => {
            FileSet::record_applied(&mut state, &snapshot);
            drop(state);
            crate::audit::emit!(
            info,
            KeyFileReloaded,
                source = S::NAME,
                path = %files.paths(),
                keys,
            );
            Ok(())
        }
        Err(e) => {
            state.refused = Some(snapshot.digests());
            drop(state);
            audit_failed(S::NAME, &files.paths(), &e);
            Err(e)
        }
    }
}

fn audit_failed(source: &'static str, path: &str, error: &ConfigError) {
    crate::audit::emit!(
            error,
            KeyFileReloadFailed,
        source,
        path,
        error = %error,
        "the keys in force stay"
    );
}

/// One poll of the watcher: applies the files once a change has settled.
pub(crate) fn poll<S: Source>(source: &S) {
    let Some(files) = source.files() else { return };
    if let Some(snapshot) = files.poll(S::NAME) {
        // A refusal is in the audit log; the keys in force stay.
        let _ = apply(source, files, snapshot);
    }
}

/// Reads every file of `source` now and applies them if they are valid, without
/// waiting for them to settle. A source without files is left as it is.
pub(crate) fn reload_now<S: Source>(source: &S) -> Result<(), ConfigError> {
    let Some(files) = source.files() else {
        return Ok(());
    };
    match files.read_all() {
        Ok(snapshot) => apply(source, files, snapshot),
        Err(e) => {
            audit_failed(S::NAME, &files.paths(), &e);
            Err(e)
        }
    }
}

/// Starts the watcher thread of `source`: a poll every `interval` until the handle is
/// dropped or `source` is.
pub(crate) fn watch<S: Source>(
    source: &Arc<S>,
    interval: Duration,
) -> Result<ReloadHandle, ConfigError> {
    if source.files().is_none() {
        return Err(ConfigError::new(
            "there is no key file to watch: the keys were not loaded from a file",
        ));
    }
    if interval.is_zero() {
        return Err(ConfigError::new(
            "the key file reload interval must be positive",
        ));
    }
    let weak: Weak<S> = Arc::downgrade(source);
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("portcullis-reload".to_owned())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                let Some(source) = weak.upgrade() else { break };
                // A panic in a parser must not end reloading silently.
                if std::panic::catch_unwind(AssertUnwindSafe(|| poll(&*source))).is_err() {
                    let e = ConfigError::new("the reload failed unexpectedly; retrying");
                    let paths = source.files().map(FileSet::paths).unwrap_or_default();
                    audit_failed(S::NAME, &paths, &e);
                }
            }
        })
        .map_err(|e| ConfigError::new(format!("cannot start the key reload thread: {e}")))?;
    Ok(ReloadHandle {
        worker: Arc::new(Worker {
            source: S::NAME,
            interval,
            stop: Some(stop),
            thread: Some(thread),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!(
                "portcullis-reload-unit-{tag}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A source of one text file; `parse` refuses text starting with `bad`.
    struct Text {
        files: Option<FileSet>,
        current: Mutex<String>,
    }

    impl Source for Text {
        const NAME: &'static str = "test";
        type Parsed = String;
        fn files(&self) -> Option<&FileSet> {
            self.files.as_ref()
        }
        fn parse(&self, contents: &[&[u8]]) -> Result<String, ConfigError> {
            let text = String::from_utf8(contents[0].to_vec())
                .map_err(|_| ConfigError::new("not UTF-8"))?;
            if text.starts_with("bad") {
                return Err(ConfigError::new("refused"));
            }
            Ok(text)
        }
        fn swap(&self, parsed: String) -> Result<usize, ConfigError> {
            *self.current.lock().unwrap() = parsed;
            Ok(1)
        }
    }

    fn text(path: &Path) -> Text {
        let files = FileSet::new(vec![(path.to_owned(), 64)]).unwrap();
        let snapshot = files.read_all().unwrap();
        let current = String::from_utf8(snapshot.contents[0].bytes.clone()).unwrap();
        files.loaded(&snapshot);
        Text {
            files: Some(files),
            current: Mutex::new(current),
        }
    }

    /// A file holding `content` in a temporary directory (removed when the first
    /// value is dropped), and its content loaded as a watched text.
    fn watched(tag: &str, content: &str) -> (TempDir, PathBuf, Text) {
        let dir = TempDir::new(tag);
        let path = dir.0.join("f");
        std::fs::write(&path, content).unwrap();
        let t = text(&path);
        (dir, path, t)
    }

    fn current(t: &Text) -> String {
        t.current.lock().unwrap().clone()
    }

    #[test]
    fn a_change_is_applied_on_the_second_identical_read() {
        let (_dir, path, t) = watched("settle", "one");
        poll(&t);
        assert_eq!(current(&t), "one");
        std::fs::write(&path, "two").unwrap();
        poll(&t);
        assert_eq!(current(&t), "one", "seen once: not yet applied");
        std::fs::write(&path, "three").unwrap();
        poll(&t);
        assert_eq!(current(&t), "one", "changed again: still settling");
        poll(&t);
        assert_eq!(current(&t), "three");
    }

    /// Renames `text` into place at `path` through a new temporary file.
    fn rename_in(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// The `key_file_reload_failed` events `f` emits, as JSON lines.
    fn failures(f: impl FnOnce()) -> Vec<String> {
        crate::test_support::json_lines(f)
            .lines()
            .filter(|l| l.contains("key_file_reload_failed"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_file_renamed_in_again_before_every_poll_is_applied_by_the_third() {
        let (_dir, path, t) = watched("rewrite", "one");
        let reported = failures(|| {
            for polls in 1..=3 {
                rename_in(&path, "two");
                poll(&t);
                let want = if polls < 3 { "one" } else { "two" };
                assert_eq!(current(&t), want, "after {polls} polls");
            }
        });
        assert!(reported.is_empty(), "{reported:?}");
    }

    #[test]
    fn a_file_that_differs_on_every_poll_is_reported_once() {
        let (_dir, path, t) = watched("churn", "one");
        let reported = failures(|| {
            for n in 0..(UNSETTLED_REPORT * 3) {
                std::fs::write(&path, format!("content-{n}")).unwrap();
                poll(&t);
            }
        });
        assert_eq!(current(&t), "one");
        assert_eq!(reported.len(), 1, "{reported:?}");
        assert!(
            reported[0].contains("differed on each of the last 4 reads"),
            "{}",
            reported[0]
        );
    }

    #[test]
    fn a_refused_content_is_not_retried_until_it_changes_and_an_explicit_reload_skips_the_wait() {
        let (_dir, path, t) = watched("refused", "one");
        std::fs::write(&path, "bad").unwrap();
        poll(&t);
        poll(&t);
        assert_eq!(current(&t), "one");
        assert!(t.files.as_ref().unwrap().lock().refused.is_some());
        poll(&t);
        assert_eq!(current(&t), "one");
        std::fs::write(&path, "two").unwrap();
        assert!(reload_now(&t).is_ok());
        assert_eq!(current(&t), "two", "applied at once");
        std::fs::write(&path, "bad again").unwrap();
        assert!(reload_now(&t).is_err());
        assert_eq!(current(&t), "two");
    }

    #[test]
    fn a_stale_read_never_replaces_a_later_one() {
        let (_dir, path, t) = watched("order", "one");
        let files = t.files.as_ref().unwrap();
        std::fs::write(&path, "two").unwrap();
        let older = files.read_all().unwrap();
        std::fs::write(&path, "three").unwrap();
        let newer = files.read_all().unwrap();
        apply(&t, files, newer).unwrap();
        apply(&t, files, older).unwrap();
        assert_eq!(current(&t), "three");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Whatever the writes (same size, one fixed modification time, renamed in or
        /// rewritten in place) and however the polls fall between them, only content
        /// that was written is ever in force, and the last one is once two polls
        /// have read it.
        #[test]
        fn every_settled_change_is_applied(
            steps in proptest::collection::vec((0u8..4, proptest::prelude::any::<bool>(), 0u8..3), 1..16)
        ) {
            let dir = TempDir::new("prop");
            let path = dir.0.join("f");
            let fixed = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
            let write = |text: &str, rename: bool| {
                let target = if rename { dir.0.join("tmp") } else { path.clone() };
                std::fs::write(&target, text).unwrap();
                std::fs::File::options()
                    .write(true)
                    .open(&target)
                    .unwrap()
                    .set_modified(fixed)
                    .unwrap();
                if rename {
                    std::fs::rename(&target, &path).unwrap();
                }
            };
            write("content-0", false);
            let t = text(&path);
            let mut written = vec!["content-0".to_owned()];
            for (c, rename, polls) in steps {
                let content = format!("content-{c}");
                write(&content, rename);
                written.push(content);
                for _ in 0..polls {
                    poll(&t);
                    proptest::prop_assert!(written.contains(&current(&t)));
                }
            }
            poll(&t);
            poll(&t);
            proptest::prop_assert_eq!(&current(&t), written.last().unwrap());
        }

        /// A writer that renames (or rewrites) a content into place again before
        /// every poll, as a periodic sync job does, never holds a change back: after
        /// any history, the content it keeps writing is in force by the third poll,
        /// and only content that was written is ever in force.
        #[test]
        fn a_content_written_again_before_every_poll_is_applied(
            steps in proptest::collection::vec((0u8..4, proptest::prelude::any::<bool>(), 0u8..3), 0..8),
            last in 0u8..4,
            rename in proptest::prelude::any::<bool>(),
        ) {
            let (_dir, path, t) = watched("again", "content-0");
            let mut written = vec!["content-0".to_owned()];
            let write = |text: &str, rename: bool| match rename {
                true => rename_in(&path, text),
                false => std::fs::write(&path, text).unwrap(),
            };
            for (c, rename, polls) in steps {
                let content = format!("content-{c}");
                write(&content, rename);
                written.push(content);
                for _ in 0..polls {
                    poll(&t);
                }
            }
            let content = format!("content-{last}");
            written.push(content.clone());
            for _ in 0..SETTLED_READS {
                write(&content, rename);
                poll(&t);
                proptest::prop_assert!(written.contains(&current(&t)));
            }
            proptest::prop_assert_eq!(current(&t), content);
        }
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = TempDir::new("read");
        let path = dir.0.join("f");
        std::fs::write(&path, vec![b'x'; 65]).unwrap();
        let e = read_file(&path, 64).err().unwrap().to_string();
        assert!(e.contains("larger than the limit of 64 bytes"), "{e}");
        assert!(read_file(&path, 65).is_ok());
        let e = read_file(&dir.0, 64).err().unwrap().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_file(&dir.0.join("missing"), 64)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        #[cfg(unix)]
        {
            let e = read_file(Path::new("/dev/zero"), 64)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn watching_needs_files_and_an_interval_and_stops_with_the_handle() {
        let dir = TempDir::new("watch");
        let path = dir.0.join("f");
        std::fs::write(&path, "one").unwrap();
        let none = Arc::new(Text {
            files: None,
            current: Mutex::new(String::new()),
        });
        assert!(watch(&none, Duration::from_millis(10)).is_err());
        let t = Arc::new(text(&path));
        assert!(watch(&t, Duration::ZERO).is_err());
        let handle = watch(&t, Duration::from_millis(5)).unwrap();
        let clone = handle.clone();
        drop(handle);
        std::fs::write(&path, "two").unwrap();
        let start = std::time::Instant::now();
        while current(&t) != "two" {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "a clone keeps reloading"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(format!("{clone:?}").contains("test"));
        drop(clone);
        std::fs::write(&path, "three").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            current(&t),
            "two",
            "the thread stopped with the last handle"
        );
    }
}
