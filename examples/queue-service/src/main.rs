//! `cargo run -p queue-service --release`: the demo job queue on 127.0.0.1:8080
//! (settings and what it prints: the crate's documentation and README).

#![forbid(unsafe_code)]

use portcullis::redact::RedactingJson;
use queue_service::guard::BoxError;
use queue_service::worker::WorkerConfig;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .event_format(RedactingJson::new())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shutdown = queue_service::shutdown_signal()?;
    let env = queue_service::read_env(|k| std::env::var_os(k))?;
    let (listener, app, state, issuer, banner) =
        queue_service::start(&args, |k| env.get(k).cloned()).await?;
    tracing::info!(event = "listening", addr = %listener.local_addr()?);
    print!("{banner}");
    queue_service::serve(
        listener,
        app,
        &state,
        Some((WorkerConfig::default(), issuer)),
        shutdown,
    )
    .await?;
    Ok(())
}
