#![no_main]
//! Service tokens: the pre-parse, the claims parser and the whole verification path
//! with fixed keys (see `portcullis::fuzzing::jwt_verify` for the modes).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::jwt_verify(data));
