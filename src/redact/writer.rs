//! A `tracing-subscriber` writer that redacts every formatted event.

use std::fmt;
use std::io;

use tracing_subscriber::fmt::MakeWriter;

use super::Redactor;

/// Wraps a [`MakeWriter`] so that every event a `tracing-subscriber` formatter writes
/// passes through a [`Redactor`] before it reaches the real writer: a secret that
/// any code logs by mistake is caught, whatever the target or format (text or JSON;
/// redaction keeps JSON valid).
///
/// The formatter writes one event per writer, so the redactor sees a whole event at
/// once, even when a field holds several lines (a PEM block logged with `%`).
/// Clean events are passed through without a copy. For JSON lines,
/// [`RedactingJson`](super::RedactingJson) gives the same lines for less work.
///
/// ```
/// use portcullis::redact::RedactingMakeWriter;
///
/// let subscriber = tracing_subscriber::fmt()
///     .json()
///     .with_writer(RedactingMakeWriter::new(std::io::stdout))
///     .finish();
/// tracing::subscriber::with_default(subscriber, || {
///     // Written as "... token=REDACTED ..."
///     tracing::info!("retrying with token=abc123");
/// });
/// ```
#[derive(Clone)]
pub struct RedactingMakeWriter<M> {
    inner: M,
    redactor: Redactor,
}

impl<M> RedactingMakeWriter<M> {
    /// Redacts with the default [`Redactor`].
    pub fn new(inner: M) -> Self {
        Self::with_redactor(inner, Redactor::new())
    }

    /// Redacts with `redactor`.
    pub fn with_redactor(inner: M, redactor: Redactor) -> Self {
        Self { inner, redactor }
    }

    /// The wrapped writer factory.
    pub fn get_ref(&self) -> &M {
        &self.inner
    }
}

impl<M> fmt::Debug for RedactingMakeWriter<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedactingMakeWriter")
            .field("redactor", &self.redactor)
            .finish_non_exhaustive()
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RedactingMakeWriter<M> {
    type Writer = RedactingWriter<'a, M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter::new(self.inner.make_writer(), &self.redactor)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        RedactingWriter::new(self.inner.make_writer_for(meta), &self.redactor)
    }
}

/// The writer [`RedactingMakeWriter`] hands out for one event.
///
/// Bytes are held until a write ends a line (the formatter writes each event whole,
/// ending in a newline), then redacted and written on. Anything left over is written
/// on [`flush`](io::Write::flush) or when the writer is dropped.
pub struct RedactingWriter<'a, W: io::Write> {
    inner: W,
    redactor: &'a Redactor,
    buf: Vec<u8>,
}

impl<'a, W: io::Write> RedactingWriter<'a, W> {
    fn new(inner: W, redactor: &'a Redactor) -> Self {
        Self {
            inner,
            redactor,
            buf: Vec::new(),
        }
    }

    fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let out = self.redactor.redact_bytes(&buf);
        self.inner.write_all(&out)
    }
}

impl<W: io::Write> fmt::Debug for RedactingWriter<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedactingWriter")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl<W: io::Write> io::Write for RedactingWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && data.ends_with(b"\n") {
            // The usual case: the formatter hands over the whole event at once. The
            // same complete lines are redacted, without copying them into the buffer.
            let out = self.redactor.redact_bytes(data);
            self.inner.write_all(&out)?;
            return Ok(data.len());
        }
        self.buf.extend_from_slice(data);
        if self.buf.ends_with(b"\n") {
            self.write_out()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.inner.flush()
    }
}

impl<W: io::Write> Drop for RedactingWriter<'_, W> {
    fn drop(&mut self) {
        // Nowhere to report an error from a drop; the formatter ignores write
        // errors the same way.
        let _ = self.write_out();
    }
}
