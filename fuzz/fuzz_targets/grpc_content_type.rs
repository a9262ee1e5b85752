#![no_main]
//! The gRPC content-type test that decides which refusals take the gRPC form.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portcullis::fuzzing::grpc_content_type(data));
