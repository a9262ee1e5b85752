//! The in-process worker's HTTP client: it calls the real worker endpoints on the
//! service's own address, through the whole guarding stack, with a service token
//! that `BearerTokenLayer` mints (scope `jobs:work`) and re-mints before expiry.

use std::net::SocketAddr;

use axum::http::{Method, Request, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis::jwt::{BearerTokenError, BearerTokenLayer, TokenIssuer};
use serde::Deserialize;
use tokio::net::TcpStream;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

use crate::queue::{JobId, JobState};

type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<Bytes>, BearerTokenError>;

/// Why a worker call did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The job no longer exists (404).
    Gone,
    /// The job's state does not allow the change (409): e.g. cancelled meanwhile.
    Changed,
    /// The service refused or failed the call (401, 403, 429, 5xx ...).
    Refused(u16),
    /// No answer (connection or token error).
    Unreachable,
}

/// The part of a job view the worker reads back.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Outcome {
    /// The job's state after the call.
    pub state: JobState,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Calls the worker endpoints of the service at `addr` with a bearer token.
#[derive(Clone)]
pub struct WorkerClient {
    addr: SocketAddr,
    svc: Svc,
}

impl std::fmt::Debug for WorkerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// One HTTP/1.1 request on a fresh loopback connection.
async fn send(
    req: Request<Full<Bytes>>,
    addr: SocketAddr,
) -> Result<Response<Bytes>, BearerTokenError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let res = sender.send_request(req).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

impl WorkerClient {
    /// A client of the service at `addr`, authenticating with tokens from `issuer`.
    pub fn new(addr: SocketAddr, issuer: TokenIssuer) -> Self {
        let svc = ServiceBuilder::new()
            .layer(BearerTokenLayer::new(issuer))
            .service_fn(move |req| send(req, addr));
        Self {
            addr,
            svc: BoxCloneSyncService::new(svc),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: String,
        body: Option<String>,
    ) -> Result<Outcome, CallError> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|_| CallError::Unreachable)?;
        let res = self
            .svc
            .clone()
            .oneshot(req)
            .await
            .map_err(|_| CallError::Unreachable)?;
        match res.status() {
            StatusCode::OK => {
                serde_json::from_slice(res.body()).map_err(|_| CallError::Unreachable)
            }
            StatusCode::NOT_FOUND => Err(CallError::Gone),
            StatusCode::CONFLICT => Err(CallError::Changed),
            s => Err(CallError::Refused(s.as_u16())),
        }
    }

    /// `PATCH /v1/jobs/{id}/status` to `running`: claims the job.
    pub async fn start(&self, id: JobId) -> Result<Outcome, CallError> {
        let body = r#"{"state":"running"}"#.to_owned();
        self.call(Method::PATCH, format!("/v1/jobs/{id}/status"), Some(body))
            .await
    }

    /// `PATCH /v1/jobs/{id}/progress?attempt=N`, for the run that claimed the job
    /// after `attempt` failed attempts.
    pub async fn progress(
        &self,
        id: JobId,
        progress: u8,
        attempt: u32,
    ) -> Result<Outcome, CallError> {
        let body = format!(r#"{{"progress":{progress}}}"#);
        let path = format!("/v1/jobs/{id}/progress?attempt={attempt}");
        self.call(Method::PATCH, path, Some(body)).await
    }

    /// `POST /v1/jobs/{id}/complete?attempt=N`.
    pub async fn complete(&self, id: JobId, attempt: u32) -> Result<Outcome, CallError> {
        let path = format!("/v1/jobs/{id}/complete?attempt={attempt}");
        self.call(Method::POST, path, None).await
    }

    /// `POST /v1/jobs/{id}/fail?attempt=N`.
    pub async fn fail(&self, id: JobId, attempt: u32) -> Result<Outcome, CallError> {
        let path = format!("/v1/jobs/{id}/fail?attempt={attempt}");
        self.call(Method::POST, path, None).await
    }
}
