//! Replays every cargo-fuzz seed corpus through the function its target runs.
//!
//! Only the `seed-*` files are read: they are the ones the repository keeps
//! (`.gitignore`), so a corpus that exists only in a local fuzzing run fails here
//! as it would on a fresh clone.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"))
        {
            continue;
        }
        f(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "no seed-* files in the corpus of {target}");
}

#[cfg(feature = "client-ip")]
#[test]
fn forwarded_headers_corpus() {
    replay("forwarded_headers", portcullis::fuzzing::forwarded_headers);
}

#[cfg(feature = "jwt")]
#[test]
fn jwt_verify_corpus() {
    replay("jwt_verify", portcullis::fuzzing::jwt_verify);
}

#[cfg(feature = "jwks-remote")]
#[test]
fn jwks_documents_corpus() {
    replay("jwks_documents", portcullis::fuzzing::jwks_documents);
}

#[cfg(feature = "api-key")]
#[test]
fn credentials_corpus() {
    replay("credentials", portcullis::fuzzing::credentials);
}

#[cfg(feature = "redact")]
#[test]
fn redactor_corpus() {
    replay("redactor", portcullis::fuzzing::redactor);
}

#[cfg(feature = "redact")]
#[test]
fn query_redaction_corpus() {
    replay("query_redaction", portcullis::fuzzing::query_redaction);
}

#[cfg(feature = "stack")]
#[test]
fn stack_config_corpus() {
    replay("stack_config", portcullis::fuzzing::stack_config);
}

#[cfg(feature = "signature")]
#[test]
fn signature_fields_corpus() {
    replay("signature_fields", portcullis::fuzzing::signature_fields);
}

#[test]
fn grpc_content_type_corpus() {
    replay("grpc_content_type", portcullis::fuzzing::grpc_content_type);
}
