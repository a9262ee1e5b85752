#![no_main]
//! The redactor over any bytes: prefiltered and plain scans agree, idempotent, str/bytes agreement, no hang.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::redactor(data));
