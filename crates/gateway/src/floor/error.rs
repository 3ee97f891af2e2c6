//! Every way a request can fail inside the gateway, and the one place they become HTTP
//! answers: 502 for connect/IO failures, 503 when there is no endpoint or protection
//! refuses (with `Retry-After`), 504 for deadlines; bodies are `{"error", "code"}`.

use std::time::Duration;

use http::StatusCode;
use tessera_core::grpc::Code;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("no healthy endpoint for upstream {0}")]
    NoEndpoint(String),
    #[error("circuit breaker for upstream {upstream} is open")]
    BreakerOpen {
        upstream: String,
        retry_after: Duration,
    },
    #[error("upstream {upstream} has {max} requests in flight")]
    BulkheadFull { upstream: String, max: usize },
    /// `endpoint` (an address) goes to the log only: clients never learn where
    /// upstreams live. `detail` says what failed, without addresses.
    #[error("cannot connect to upstream {upstream}: {detail}")]
    Connect {
        upstream: String,
        endpoint: String,
        detail: String,
    },
    #[error("upstream {upstream} failed: {detail}")]
    Io {
        upstream: String,
        endpoint: String,
        detail: String,
    },
    #[error("upstream {upstream} did not answer within {}", tessera_core::GoDuration(*.timeout))]
    Timeout { upstream: String, timeout: Duration },
    #[error("request body too large or unreadable: {0}")]
    Body(String),
    #[error("bad path: {0}")]
    BadPath(&'static str),
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("the gateway has {0} requests in flight; try again")]
    Overloaded(usize),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("rate limit of {limit} requests exceeded; retry in {}", tessera_core::GoDuration(*.retry_after))]
    RateLimited { limit: u32, retry_after: Duration },
    #[error(
        "this connection's certificate does not cover host {0:?}; open a new connection for it"
    )]
    Misdirected(String),
    #[error("request body larger than the gateway's limit of {0} bytes")]
    TooLarge(u64),
    #[error("the request body did not arrive in time")]
    BodyTimeout,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute { .. } => StatusCode::NOT_FOUND,
            GatewayError::NoEndpoint(_)
            | GatewayError::Overloaded(_)
            | GatewayError::BreakerOpen { .. }
            | GatewayError::BulkheadFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Connect { .. } | GatewayError::Io { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Body(_) | GatewayError::BadPath(_) | GatewayError::Malformed(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute { .. } => "no_route",
            GatewayError::NoEndpoint(_) => "no_endpoint",
            GatewayError::BreakerOpen { .. } => "breaker_open",
            GatewayError::BulkheadFull { .. } => "bulkhead_full",
            GatewayError::Connect { .. } => "upstream_connect",
            GatewayError::Io { .. } => "upstream_io",
            GatewayError::Timeout { .. } => "deadline_exceeded",
            GatewayError::Body(_) => "bad_request_body",
            GatewayError::BadPath(_) => "bad_path",
            GatewayError::Malformed(_) => "malformed_request",
            GatewayError::Overloaded(_) => "overloaded",
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::Misdirected(_) => "misdirected_request",
            GatewayError::TooLarge(_) => "body_too_large",
            GatewayError::BodyTimeout => "body_timeout",
        }
    }

    /// Whether the client's connection must end after the answer: what is left of a
    /// request body that failed cannot be trusted to frame the next request.
    pub fn ends_connection(&self) -> bool {
        matches!(
            self,
            GatewayError::Body(_)
                | GatewayError::TooLarge(_)
                | GatewayError::BodyTimeout
                | GatewayError::Malformed(_)
        )
    }

    /// The gRPC status a gRPC caller gets instead of `status()`: gRPC clients read only
    /// `grpc-status`, and take any HTTP error as UNKNOWN or UNAVAILABLE.
    pub fn grpc_status(&self) -> Code {
        match self {
            GatewayError::NoRoute { .. } => Code::Unimplemented,
            GatewayError::NoEndpoint(_)
            | GatewayError::Overloaded(_)
            | GatewayError::BreakerOpen { .. }
            | GatewayError::BulkheadFull { .. }
            | GatewayError::Connect { .. }
            | GatewayError::Io { .. }
            | GatewayError::Misdirected(_) => Code::Unavailable,
            GatewayError::Timeout { .. } | GatewayError::BodyTimeout => Code::DeadlineExceeded,
            GatewayError::RateLimited { .. } | GatewayError::TooLarge(_) => Code::ResourceExhausted,
            GatewayError::Unauthorized(_) => Code::Unauthenticated,
            GatewayError::Forbidden(_) => Code::PermissionDenied,
            GatewayError::Body(_) | GatewayError::BadPath(_) | GatewayError::Malformed(_) => {
                Code::InvalidArgument
            }
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::BreakerOpen { retry_after, .. } => Some(*retry_after),
            GatewayError::BulkheadFull { .. }
            | GatewayError::NoEndpoint(_)
            | GatewayError::Overloaded(_) => Some(Duration::from_secs(1)),
            GatewayError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}
