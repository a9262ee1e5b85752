#![no_main]
//! The stack's quota-list parser and environment configuration.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::stack_config(data));
