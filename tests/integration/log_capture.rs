//! Every `tracing` event of this test binary, formatted as JSON lines into memory.
//!
//! One global subscriber serves all tests (a thread-local default would miss events
//! from the server's tasks on other runtime threads). Tests run in parallel, so a
//! test looks only at the lines carrying a marker of its own (a unique key id, path
//! or request id) and asserts on those, and asserts that its planted secrets appear
//! nowhere in [`Capture::text`].

#![allow(dead_code)]

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

/// The fields of the access event, as its documentation lists them
/// (`portcullis::access_log`), and the formatter's `message`.
const ACCESS_FIELDS: &[&str] = &[
    "message",
    "request_id",
    "method",
    "path",
    "query",
    "status",
    "latency_us",
    "client_ip",
    "principal",
    "auth_method",
    "sub",
    "jti",
    "kid",
    "denial_reason",
    "user_agent",
    "outcome",
];

/// The captured output of every test in this binary.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The captured JSON lines that contain `marker`, parsed. Every audit event
    /// among them must name an event of the schema ([`portcullis::audit::Event`]).
    pub fn events_with(&self, marker: &str) -> Vec<serde_json::Value> {
        let events: Vec<serde_json::Value> = self
            .text()
            .lines()
            .filter(|line| line.contains(marker))
            .map(|line| serde_json::from_str(line).expect("every captured line is JSON"))
            .collect();
        for e in &events {
            if e["target"] == "portcullis::access" {
                let fields = e["fields"].as_object().expect("an event has fields");
                for name in fields.keys() {
                    assert!(
                        ACCESS_FIELDS.contains(&name.as_str()),
                        "access field {name:?} is not in the documented table: {e}"
                    );
                }
            }
            if e["target"] == portcullis::audit::TARGET {
                let name = e["fields"]["event"].as_str().unwrap_or_default();
                assert!(
                    portcullis::audit::Event::ALL
                        .iter()
                        .any(|k| k.as_str() == name),
                    "audit event {name:?} is not in the schema: {e}"
                );
            }
        }
        events
    }
}

/// The writer handed to the subscriber: appends whole formatted lines.
pub struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = CaptureWriter;
    fn make_writer(&'a self) -> Self::Writer {
        CaptureWriter(Arc::clone(&self.0))
    }
}

/// Installs the global JSON subscriber on first use and returns its capture.
pub fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::TRACE)
            .with_current_span(false)
            .with_writer(capture.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        capture
    })
}

#[test]
fn captures_events_from_other_threads() {
    let capture = capture();
    std::thread::spawn(|| tracing::info!(marker = "log-capture-self-test", "hello"))
        .join()
        .unwrap();
    let events = capture.events_with("log-capture-self-test");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["fields"]["marker"], "log-capture-self-test");
}
