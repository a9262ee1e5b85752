#![no_main]
//! Forwarded / X-Forwarded-For parsing and the client-address walk.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::forwarded_headers(data));
