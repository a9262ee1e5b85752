#![no_main]
//! Signature-Input, Signature and Content-Digest parsing, and the signature base.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::signature_fields(data));
