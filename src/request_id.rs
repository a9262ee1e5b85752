//! Give every request a correlation id: accept a safe incoming `x-request-id` or make
//! one, put it in the request extensions and echo it on the response.
//!
//! An incoming id is kept only when there is exactly one, it is 1 to
//! [`MAX_LEN`] bytes long and every byte is in `[A-Za-z0-9._:-]`
//! ([`RequestId::parse`]). Anything else (too long, a newline, an escape
//! sequence, a second header, non-ASCII) is replaced by a fresh random UUID v4, so the
//! id can go into logs and response headers as it is. The request's header is
//! replaced by the id too, so the handler and the upstream services see the same one.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use portcullis::request_id::{RequestId, RequestIdLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(RequestIdLayer::new())
//!     .service_fn(|req: Request<()>| async move {
//!         let id = req.extensions().get::<RequestId>().unwrap().clone();
//!         Ok::<_, Infallible>(Response::new(id.as_str().to_owned()))
//!     });
//! let req = Request::builder().header("x-request-id", "abc-123").body(()).unwrap();
//! let res = svc.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-request-id"], "abc-123");
//! assert_eq!(res.body(), "abc-123");
//!
//! // Unsafe ids (here: spaces and a quote) are replaced.
//! let req = Request::builder().header("x-request-id", "a \"b\"").body(()).unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-request-id"].len(), 36); // a fresh UUID v4
//! # }
//! ```
//!
//! Cost: keeping an id is one scan of at most 64 bytes; a fresh one is 16 random
//! bytes from the operating system's CSPRNG, fetched 1 KiB at a time per thread (one
//! system call per 64 ids), and formatted 64 at a time into one shared buffer, so an
//! id allocates nothing of its own (a kept id holds its buffer of 2.3 KB).

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::header::{Entry, HeaderName, HeaderValue};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// The longest incoming id that is kept.
pub const MAX_LEN: usize = 64;

/// The default header, `x-request-id`.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's correlation id, in the request extensions.
///
/// Always 1 to [`MAX_LEN`] bytes of `[A-Za-z0-9._:-]`: safe to log and to put in a
/// header as it is. Two ids are equal when their text is.
#[derive(Clone)]
pub struct RequestId {
    value: HeaderValue,
    /// Made here by [`RequestId::generate`] (hex digits and dashes only), not sent by
    /// the client: the access log skips the redactor for it, since no secret can
    /// hide in text this crate chose.
    generated: bool,
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl Eq for RequestId {}

impl std::hash::Hash for RequestId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.value.hash(state);
    }
}

impl RequestId {
    /// Accepts `value` if it is a safe id: 1 to [`MAX_LEN`] bytes, each in
    /// `[A-Za-z0-9._:-]`.
    ///
    /// ```
    /// use portcullis::request_id::RequestId;
    /// assert!(RequestId::parse(b"7f3c-req:1").is_some());
    /// assert!(RequestId::parse(b"a\nb").is_none());
    /// assert!(RequestId::parse(&[b'a'; 65]).is_none());
    /// ```
    pub fn parse(value: &[u8]) -> Option<Self> {
        if !is_safe_request_id(value) {
            return None;
        }
        HeaderValue::from_bytes(value).ok().map(|value| Self {
            value,
            generated: false,
        })
    }

    /// A fresh random UUID v4, e.g. `0b6c1e2a-5f3d-4c8e-9a71-2d4f6b8e0c13`.
    pub fn generate() -> Self {
        Self {
            value: HeaderValue::from_maybe_shared(next_generated_id())
                .expect("hex and dashes are a valid header value"),
            generated: true,
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        // Every constructor checked the bytes against `[A-Za-z0-9._:-]` or wrote
        // only hex digits and dashes: ASCII, so valid UTF-8.
        std::str::from_utf8(self.value.as_bytes()).expect("a request id is ASCII")
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.value
    }

    /// Whether this crate generated the id (rather than keeping the client's).
    #[cfg_attr(not(feature = "access-log"), allow(dead_code))]
    pub(crate) fn is_generated(&self) -> bool {
        self.generated
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Each byte's two lowercase hex digits.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

/// Whether an incoming id is kept: 1 to [`MAX_LEN`] bytes, each in `[A-Za-z0-9._:-]`.
pub(crate) fn is_safe_request_id(value: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&value.len())
        && value
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Random bytes fetched per system call (per thread): the bytes of [`BATCH`] ids.
const POOL_LEN: usize = 1024;
/// The length of a UUID's text.
const UUID_LEN: usize = 36;
/// Ids formatted per system call (per thread).
const BATCH: usize = POOL_LEN / 16;

/// The text of a fresh UUID v4. Each thread formats [`BATCH`] ids at once, from one
/// fetch of random bytes, into one buffer, and hands out slices of it: an id costs
/// no allocation of its own, and every copy of it (the request's header and
/// extensions, the response's header) shares the buffer. A buffer is freed when
/// its last id is. Without an OS random source the id comes from [`fallback16`],
/// one at a time, and the next id tries the OS again.
fn next_generated_id() -> bytes::Bytes {
    thread_local! {
        static IDS: RefCell<(bytes::Bytes, usize)> =
            const { RefCell::new((bytes::Bytes::new(), 0)) };
    }
    IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        let (batch, next) = &mut *ids;
        if *next + UUID_LEN > batch.len() {
            let mut random = [0u8; POOL_LEN];
            if getrandom::fill(&mut random).is_err() {
                return bytes::Bytes::copy_from_slice(&uuid_v4_text(fallback16()));
            }
            let mut text = Vec::with_capacity(BATCH * UUID_LEN);
            for chunk in random.chunks_exact(16) {
                let b: [u8; 16] = chunk.try_into().expect("chunks of 16 bytes");
                text.extend_from_slice(&uuid_v4_text(b));
            }
            *batch = bytes::Bytes::from(text);
            *next = 0;
        }
        // Each id is its own slice of the batch: never handed out twice.
        let id = batch.slice(*next..*next + UUID_LEN);
        *next += UUID_LEN;
        id
    })
}

/// The 8-4-4-4-12 hex text of `b` with the version (4) and variant (RFC 9562) bits
/// set.
fn uuid_v4_text(mut b: [u8; 16]) -> [u8; UUID_LEN] {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // Where each byte's two hex digits go (dashes at 8, 13, 18, 23).
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut s = [b'-'; UUID_LEN];
    for (&at, &byte) in AT.iter().zip(&b) {
        s[at..at + 2].copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    s
}

/// Without an OS random source a request id still has to be unique, not secret:
/// a process-wide counter and the clock.
fn fallback16() -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&t.to_be_bytes());
    out[8..].copy_from_slice(&n.to_be_bytes());
    out
}

/// Layer applying [`SetRequestId`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct RequestIdLayer {
    header: HeaderName,
}

impl Default for RequestIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIdLayer {
    /// Reads and writes `x-request-id`.
    pub fn new() -> Self {
        Self {
            header: X_REQUEST_ID.clone(),
        }
    }

    /// Reads and writes `header` instead (e.g. `x-correlation-id`).
    pub fn header_name(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = SetRequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SetRequestId {
            inner,
            header: self.header.clone(),
        }
    }
}

/// Service that sets [`RequestId`]; see [`RequestIdLayer`].
#[derive(Clone, Debug)]
pub struct SetRequestId<S> {
    inner: S,
    header: HeaderName,
}

impl<S> SetRequestId<S> {
    /// Wraps `inner` with the default header.
    pub fn new(inner: S) -> Self {
        RequestIdLayer::new().layer(inner)
    }
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SetRequestId<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // One lookup for both the check and the replacement.
        let id = match req.headers_mut().entry(&self.header) {
            Entry::Occupied(mut e) => {
                let mut values = e.iter();
                let kept = match (values.next(), values.next()) {
                    (Some(v), None) => RequestId::parse(v.as_bytes()),
                    _ => None,
                };
                match kept {
                    // The request already carries exactly this one value.
                    Some(id) => id,
                    None => {
                        let id = RequestId::generate();
                        e.insert(id.header_value().clone());
                        id
                    }
                }
            }
            Entry::Vacant(e) => {
                let id = RequestId::generate();
                e.insert(id.header_value().clone());
                id
            }
        };
        req.extensions_mut().insert(id.clone());
        ResponseFuture {
            inner: self.inner.call(req),
            header: Some((self.header.clone(), id)),
        }
    }
}

pin_project! {
    /// Response future of [`SetRequestId`]: sets the header on the response (the
    /// [`RequestId`] itself is in the request extensions only).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        header: Option<(HeaderName, RequestId)>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = this.inner.poll(cx);
        if let Poll::Ready(Ok(res)) = &mut out
            && let Some((name, id)) = this.header.take()
        {
            res.headers_mut().insert(name, id.value);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_uuid_v4_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = RequestId::generate();
            let s = id.as_str();
            assert_eq!(s.len(), 36);
            assert!(is_safe_request_id(s.as_bytes()));
            assert_eq!(&s[14..15], "4", "{s}");
            assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
            assert_eq!(
                s.char_indices()
                    .filter(|&(_, c)| c == '-')
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>(),
                [8, 13, 18, 23]
            );
            assert!(seen.insert(s.to_owned()), "duplicate id {s}");
        }
    }

    #[test]
    fn uuid_text_sets_the_version_and_variant_bits() {
        assert_eq!(
            &uuid_v4_text([0; 16]),
            b"00000000-0000-4000-8000-000000000000"
        );
        assert_eq!(
            &uuid_v4_text([0xff; 16]),
            b"ffffffff-ffff-4fff-bfff-ffffffffffff"
        );
        let b: [u8; 16] = std::array::from_fn(|i| u8::try_from(i * 17).unwrap());
        assert_eq!(&uuid_v4_text(b), b"00112233-4455-4677-8899-aabbccddeeff");
    }

    #[test]
    fn generated_ids_from_many_batches_and_threads_are_distinct() {
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..3 * BATCH + 1)
                            .map(|_| RequestId::generate().as_str().to_owned())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn only_generated_ids_are_marked_generated_and_equality_is_the_text() {
        let made = RequestId::generate();
        assert!(made.is_generated());
        assert!(made.clone().is_generated());
        let kept = RequestId::parse(made.as_str().as_bytes()).unwrap();
        assert!(!kept.is_generated());
        assert_eq!(kept, made);
        assert!(!RequestId::parse(b"client-7").unwrap().is_generated());
    }

    #[test]
    fn length_bound() {
        assert!(is_safe_request_id(&[b'a'; MAX_LEN]));
        assert!(!is_safe_request_id(&[b'a'; MAX_LEN + 1]));
        assert!(!is_safe_request_id(&vec![b'a'; 10 * 1024]));
    }

    #[test]
    fn doc_is_safe_request_id_charset() {
        assert!(is_safe_request_id(b"01J9Z6Q-abc_def.1:2"));
        for bad in [
            &b""[..],
            b"a b",
            b"a\r\nb",
            b"\x1b[31m",
            "é".as_bytes(),
            b"a/b",
            b"a\"b",
        ] {
            assert!(!is_safe_request_id(bad));
        }
    }
}
