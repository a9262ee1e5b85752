#![no_main]
//! Credential extraction (X-API-Key, Authorization, query) and key-format parsing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::credentials(data));
