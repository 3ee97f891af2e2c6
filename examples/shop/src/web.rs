//! What every shop service shares at its HTTP edge: one error type mapped to JSON
//! `{"error", "code"}`, JSON bodies parsed into 400s that name the problem, bearer-token
//! identities, and request metrics in Prometheus text.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tessera::{AuthError, Claims, JwksVerifier};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        // Each request is one transaction: either way, nothing of it was kept.
        let refused = tessera_sql::Refused::of(&e);
        if refused.full {
            tracing::warn!(error = %e, "database refused a write: the disk is full");
        } else {
            tracing::error!(error = %e, "database");
        }
        ApiError::new(refused.status(), refused.code(), refused.to_string())
    }
}

impl From<tessera::Error> for ApiError {
    fn from(e: tessera::Error) -> ApiError {
        let status = match &e {
            tessera::Error::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            tessera::Error::NoInstance(_) | tessera::Error::BreakerOpen(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, "dependency", e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::NoKeys(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                e.to_string(),
            ),
            _ => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = tessera_web::error(self.status, self.code, self.message);
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"shop\""),
            );
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body; a 400 says what is wrong with it.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// The caller a verified token names.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub admin: bool,
    /// The `Authorization` value, to pass on to other services on the caller's behalf.
    pub authorization: String,
}

impl Caller {
    fn from_claims(c: &Claims, authorization: &str) -> ApiResult<Caller> {
        let user = c.sub().ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "token has no sub")
        })?;
        Ok(Caller {
            user: user.to_owned(),
            admin: c.has_role("admin"),
            authorization: authorization.to_owned(),
        })
    }

    pub fn require_admin(&self) -> ApiResult<()> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs role admin"))
        }
    }
}

/// Verifies the request's bearer token (401 when missing or invalid).
pub async fn caller(verifier: &JwksVerifier, headers: &HeaderMap) -> ApiResult<Caller> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let claims = verifier.verify_header(auth).await?;
    Caller::from_claims(&claims, auth.unwrap_or_default())
}

/// Requests by (method, route, status), with latency buckets per (method, route).
#[derive(Default)]
pub struct Metrics {
    counts: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
}

const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    fn record(&self, method: &str, route: &str, status: u16, secs: f64) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        drop(c);
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = l.entry((method.to_owned(), route.to_owned())).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Prometheus text exposition.
    pub fn render(&self, service: &str) -> String {
        let mut out = String::new();
        out.push_str("# TYPE shop_requests_total counter\n");
        for ((m, r, s), n) in self.counts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&format!(
                "shop_requests_total{{service=\"{service}\",method=\"{m}\",route=\"{r}\",status=\"{s}\"}} {n}\n"
            ));
        }
        out.push_str("# TYPE shop_request_seconds histogram\n");
        for ((m, r), h) in self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let labels = format!("service=\"{service}\",method=\"{m}\",route=\"{r}\"");
            for (i, b) in BUCKETS.iter().enumerate() {
                out.push_str(&format!(
                    "shop_request_seconds_bucket{{{labels},le=\"{b}\"}} {}\n",
                    h.buckets[i]
                ));
            }
            out.push_str(&format!(
                "shop_request_seconds_bucket{{{labels},le=\"+Inf\"}} {}\n",
                h.count
            ));
            out.push_str(&format!("shop_request_seconds_sum{{{labels}}} {}\n", h.sum));
            out.push_str(&format!(
                "shop_request_seconds_count{{{labels}}} {}\n",
                h.count
            ));
        }
        out
    }
}

/// Middleware: times each request and counts it under its route pattern (never the raw
/// path, which would grow without bound).
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let resp = next.run(req).await;
    metrics.record(
        &method,
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}
