#![no_main]
//! RateLimit / RateLimit-Policy structured-field parsing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::ratelimit_fields(data));
