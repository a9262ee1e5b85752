#![no_main]
//! Query-string redaction: names and order kept, sensitive values replaced, fixed point.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::query_redaction(data));
