#![no_main]
//! Remote key sources: fetch URLs, discovery documents, fetched JWK Sets,
//! `Cache-Control` and `Content-Type` (see `portcullis::fuzzing::jwks_documents`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::jwks_documents(data));
