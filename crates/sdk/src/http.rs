//! The one HTTP client the SDK's parts share (registry, coordinator, services, JWKS), and
//! the error type they all return.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest response body the SDK reads.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

pub(crate) type Http = Client<HttpConnector, Full<Bytes>>;

pub(crate) fn client() -> Http {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector())
}

/// HTTP/2 with prior knowledge (h2c), for gRPC: one multiplexed connection per
/// instance.
pub(crate) fn h2_client() -> Http {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .http2_only(true)
        .build(connector())
}

fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector
}

/// `d` plus up to half of it again, at random: clients told to wait the same time do not
/// all come back in the same instant.
pub(crate) fn jittered(d: Duration) -> Duration {
    let half = u64::try_from(d.as_millis() / 2).unwrap_or(u64::MAX);
    d + Duration::from_millis(fastrand::u64(..=half))
}

/// What went wrong with a call made through the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request could not be sent or its answer not read (`connect: connection refused`).
    #[error("{target}: {message}")]
    Transport {
        target: String,
        message: String,
        /// The connection was never made, so the request had no effect.
        connect: bool,
    },
    #[error("{target} answered {status}: {body}")]
    Status {
        target: String,
        status: StatusCode,
        body: String,
    },
    #[error("no healthy instance of service {0}")]
    NoInstance(String),
    #[error("circuit breaker open for service {0}")]
    BreakerOpen(String),
    #[error("{0} timed out after {1}")]
    Timeout(String, tessera_core::GoDuration),
    #[error("bad answer from {0}: {1}")]
    Decode(String, String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Who answered (a service name or a URL), for error messages.
    pub(crate) target: String,
}

impl Response {
    /// The body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::Decode(self.target.clone(), e.to_string()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// How long a 429 or 503 asks the caller to wait (`Retry-After` in seconds, at most
    /// a minute).
    pub fn retry_after(&self) -> Option<Duration> {
        let secs: u64 = self
            .headers
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(Duration::from_secs(secs.min(60)))
    }

    /// `Err(Error::Status)` unless the status is 2xx.
    pub fn error_for_status(self) -> Result<Response, Error> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(Error::Status {
                target: self.target,
                status: self.status,
                body: String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(512)
                    .collect(),
            })
        }
    }
}

/// Sends `req` and reads the whole answer (up to [`MAX_BODY`]).
pub(crate) async fn send(
    http: &Http,
    target: &str,
    req: http::Request<Full<Bytes>>,
) -> Result<Response, Error> {
    let resp = http.request(req).await.map_err(|e| Error::Transport {
        target: target.to_owned(),
        message: tessera_core::error_chain(&e),
        connect: e.is_connect(),
    })?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| Error::Transport {
            target: target.to_owned(),
            message: format!("reading the answer: {e}"),
            connect: false,
        })?
        .to_bytes();
    Ok(Response {
        status: parts.status,
        headers: parts.headers,
        body,
        target: target.to_owned(),
    })
}
