//! The Consul HTTP API over the registry. Handlers parse the request, call one registry
//! method and render Consul's JSON; errors become responses in exactly one place
//! (`ApiError`), with plain-text bodies as Consul sends them, so existing clients show the
//! message to their users. Unknown routes and wrong methods are not Consul's: the server
//! answers those in Tessera's JSON shape (`tessera_web`).

mod acl;
mod agent;
mod catalog;
mod kv;
mod prometheus;
mod render;
mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Serialize;
use tessera_core::parse_duration;

use crate::acl::Authz;
use crate::error::Error;
use crate::registry::{Backend, Backing, LogStore, Registry, backend};
use crate::store::StoreError;

/// Default and longest blocking-query wait (Consul's values).
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Largest JSON body for registrations and ACL writes.
const MAX_JSON_BODY: usize = 1024 * 1024;

pub type AppState = Arc<Registry>;

/// Builds the router for every endpoint.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v1/agent/self", get(agent::agent_self))
        .route("/v1/agent/services", get(agent::services))
        .route("/v1/agent/metrics", get(agent::metrics))
        .route("/v1/agent/service/{id}", get(agent::service))
        .route("/v1/agent/checks", get(agent::checks))
        .route("/v1/agent/service/register", put(agent::register))
        .route("/v1/agent/service/deregister/{id}", put(agent::deregister))
        .route(
            "/v1/agent/service/maintenance/{id}",
            put(agent::maintenance),
        )
        .route("/v1/agent/check/register", put(agent::check_register))
        .route(
            "/v1/agent/check/deregister/{id}",
            put(agent::check_deregister),
        )
        .route("/v1/agent/check/pass/{id}", put(agent::check_pass))
        .route("/v1/agent/check/warn/{id}", put(agent::check_warn))
        .route("/v1/agent/check/fail/{id}", put(agent::check_fail))
        .route("/v1/agent/check/update/{id}", put(agent::check_update))
        .route("/v1/catalog/services", get(catalog::services))
        .route("/v1/catalog/service/{name}", get(catalog::service))
        .route("/v1/catalog/nodes", get(catalog::nodes))
        .route("/v1/catalog/node/{node}", get(catalog::node))
        .route("/v1/catalog/datacenters", get(catalog::datacenters))
        .route("/v1/catalog/register", put(catalog::register))
        .route("/v1/catalog/deregister", put(catalog::deregister))
        .route("/v1/health/service/{name}", get(catalog::health_service))
        .route("/v1/health/checks/{name}", get(catalog::health_checks))
        .route("/v1/health/node/{node}", get(catalog::health_node))
        .route("/v1/health/state/{state}", get(catalog::health_state))
        .route(
            "/v1/kv/",
            get(kv::get_root).put(kv::put_root).delete(kv::delete_root),
        )
        .route(
            "/v1/kv/{*key}",
            get(kv::get).put(kv::put).delete(kv::delete),
        )
        .route("/v1/tessera/prometheus-sd", get(prometheus::targets))
        .route("/readyz", get(readyz))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/status/leader", get(status_leader))
        .route("/v1/status/peers", get(status_peers))
        .route("/v1/acl/bootstrap", put(acl::bootstrap))
        .route("/v1/acl/policy", put(acl::policy_create))
        .route(
            "/v1/acl/policy/{id}",
            get(acl::policy_read)
                .put(acl::policy_update)
                .delete(acl::policy_delete),
        )
        .route("/v1/acl/policies", get(acl::policy_list))
        .route("/v1/acl/token", put(acl::token_create))
        .route("/v1/acl/token/self", get(acl::token_self))
        .route(
            "/v1/acl/token/{id}",
            get(acl::token_read)
                .put(acl::token_update)
                .delete(acl::token_delete),
        )
        .route("/v1/acl/tokens", get(acl::token_list))
        .route("/v1/txn", put(kv::txn))
        .route("/v1/session/create", put(session::create))
        .route("/v1/session/destroy/{id}", put(session::destroy))
        .route("/v1/session/renew/{id}", put(session::renew))
        .route("/v1/session/info/{id}", get(session::info))
        .route("/v1/session/node/{node}", get(session::node))
        .route("/v1/session/list", get(session::list))
        .with_state(registry)
}

/// `GET /readyz`: 200 while this server should be sent requests; 503 with the reason
/// while it drains before stopping, or when its store refuses writes. Kubernetes'
/// readiness probe and `tessera health --url http://server/readyz` read it.
async fn readyz(axum::extract::State(reg): axum::extract::State<AppState>) -> Response {
    match reg.not_ready() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// On etcd: the server that runs the singleton jobs (the oldest live member), by its
/// HTTP address. On one server: that server.
async fn status_leader(axum::extract::State(reg): axum::extract::State<AppState>) -> Response {
    let peers = backend!(reg, b => Backend::peers(b, &reg));
    json(
        StatusCode::OK,
        &peers.into_iter().next().unwrap_or_default(),
    )
}

/// On etcd: every live server's HTTP address, oldest first.
async fn status_peers(axum::extract::State(reg): axum::extract::State<AppState>) -> Response {
    json(StatusCode::OK, &backend!(reg, b => Backend::peers(b, &reg)))
}

/// On etcd: `?consistent` waits until this server's view has every write made before the
/// request (503 when etcd cannot say); `X-Consul-KnownLeader` and `X-Consul-LastContact`
/// tell how recently etcd answered this server. `?stale` and default reads are served from
/// the view as it is, also while etcd is unreachable.
pub async fn cluster_meta(
    axum::extract::State(reg): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(etcd) = reg.etcd().cloned() else {
        return next.run(req).await;
    };
    let consistent = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "consistent" || p.starts_with("consistent="))
    });
    if consistent && let Err(e) = etcd.barrier().await {
        return ApiError(e).into_response();
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if h.contains_key("x-consul-index") {
        let (since, known) = etcd.last_contact();
        h.insert(
            "x-consul-knownleader",
            HeaderValue::from_static(if known { "true" } else { "false" }),
        );
        h.insert(
            "x-consul-lastcontact",
            HeaderValue::from(since.as_millis().min(u64::MAX as u128) as u64),
        );
    }
    resp
}

/// The one mapping from registry errors to HTTP.
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::PermissionDenied(_) | Error::AclNotFound => StatusCode::FORBIDDEN,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // Consul has no storage failures a client parses, so these are Tessera's JSON.
            Error::Storage(e) => return storage_error(e),
            Error::Unavailable(why) => {
                return tessera_web::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    why.clone(),
                );
            }
        };
        let mut resp = (status, self.0.to_string()).into_response();
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // Consul's own text, which its clients show as is.
        resp.extensions_mut().insert(tessera_web::KeepBody);
        resp
    }
}

/// 507 when more room would fix it, 503 for any other disk failure; the body names the
/// cause (`ENOSPC`, `EIO`...). The writer has logged it once per failure already.
fn storage_error(e: &StoreError) -> Response {
    let (status, code) = match e {
        StoreError::NotKept(d) if d.is_full() => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
        StoreError::NotKept(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
        StoreError::Broken(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_broken"),
        StoreError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "storage_closed"),
        StoreError::Io { .. } => {
            tracing::error!(error = %e, "storage I/O failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "storage_io")
        }
    };
    let mut resp = json(
        status,
        &serde_json::json!({"error": e.to_string(), "code": code}),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::INSUFFICIENT_STORAGE {
        resp.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            HeaderValue::from_static("1"),
        );
    }
    resp
}

pub type ApiResult = Result<Response, ApiError>;

/// Query parameters in order, repeated keys kept (`?tag=a&tag=b`), bare flags as "".
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn parse(raw: Option<&str>) -> Result<QueryParams, Error> {
        let Some(raw) = raw else {
            return Ok(QueryParams(Vec::new()));
        };
        let mut out = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((decode(k)?, decode(v)?));
        }
        Ok(QueryParams(out))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean flag: present with no value, or `true`/`1`.
    pub fn flag(&self, key: &str) -> Result<bool, Error> {
        match self.get(key) {
            None => Ok(false),
            Some("") | Some("true") | Some("1") => Ok(true),
            Some("false") | Some("0") => Ok(false),
            Some(other) => Err(Error::bad(format!(
                "Invalid value for ?{key}: {other:?} (expected true or false)"
            ))),
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Error::bad(format!(
                    "Invalid value for ?{key}: {v:?} (expected an unsigned integer)"
                ))
            }),
        }
    }
}

fn decode(s: &str) -> Result<String, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        Error::bad(format!("Invalid percent-encoding in query: {s:?}"))
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| Error::bad(format!("Query is not UTF-8: {s:?}")))
}

/// What every handler needs from the request: its query and its resolved permissions.
pub struct Ctx {
    pub q: QueryParams,
    pub authz: Authz,
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, reg: &AppState) -> Result<Self, ApiError> {
        let q = QueryParams::parse(parts.uri.query())?;
        if let Some(dc) = q.get("dc")
            && !dc.is_empty()
            && dc != reg.config.datacenter
        {
            return Err(ApiError(Error::bad(format!(
                "No path to datacenter {dc:?}"
            ))));
        }
        let token = token_from(&parts.headers, &q);
        let authz = reg.authorize(token.as_deref())?;
        Ok(Ctx { q, authz })
    }
}

fn token_from(headers: &HeaderMap, q: &QueryParams) -> Option<String> {
    if let Some(t) = headers.get("x-consul-token").and_then(|v| v.to_str().ok()) {
        return Some(t.trim().to_owned());
    }
    if let Some(auth) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
    {
        return Some(t.trim().to_owned());
    }
    q.get("token").map(str::to_owned)
}

/// The request's `?filter=` expression, parsed once per request.
pub fn filter(q: &QueryParams) -> Result<Option<crate::filter::Filter>, Error> {
    match q.get("filter") {
        None | Some("") => Ok(None),
        Some(src) => crate::filter::Filter::parse(src)
            .map(Some)
            .map_err(|e| Error::bad(e.to_string())),
    }
}

/// Whether `item` (as its JSON) passes the filter; always true without one.
pub fn keep<T: Serialize>(f: &Option<crate::filter::Filter>, item: &T) -> bool {
    match f {
        None => true,
        Some(f) => serde_json::to_value(item).is_ok_and(|v| f.matches(&v)),
    }
}

/// The blocking-query parameters of a read.
pub struct Blocking {
    pub index: u64,
    pub wait: Duration,
}

impl Blocking {
    pub fn from(q: &QueryParams) -> Result<Blocking, Error> {
        let index = q.u64("index")?.unwrap_or(0);
        let wait = match q.get("wait") {
            None | Some("") => DEFAULT_WAIT,
            Some(w) => parse_duration(w)
                .map_err(|e| Error::bad(format!("Invalid wait time: {e}")))?
                .min(MAX_WAIT),
        };
        // Up to 1/16 extra, so many watchers with the same wait do not all return at once.
        let jitter = Duration::from_nanos(fastrand::u64(..=(wait.as_nanos() / 16) as u64));
        Ok(Blocking {
            index,
            wait: wait + jitter,
        })
    }
}

/// A JSON response with Consul's query-meta headers.
pub fn with_index(index: u64, status: StatusCode, body: impl Serialize) -> Response {
    let mut resp = json(status, &body);
    add_meta(resp.headers_mut(), index);
    resp
}

/// Pre-serialized JSON with Consul's query-meta headers.
pub fn json_bytes(index: u64, status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    add_meta(resp.headers_mut(), index);
    resp
}

pub fn add_meta(h: &mut HeaderMap, index: u64) {
    h.insert("x-consul-index", HeaderValue::from(index.max(1)));
    h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
}

pub fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut resp = Response::new(Body::from(bytes));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => ApiError(Error::bad(format!("cannot encode response: {e}"))).into_response(),
    }
}

/// Reads a request body up to `limit` bytes; beyond it, 413 naming the limit.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, Error> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.is::<http_body_util::LengthLimitError>() {
                return Error::TooLarge(format!("Request body too large (limit {limit} bytes)"));
            }
            src = s.source();
        }
        Error::bad(format!("Cannot read request body: {e}"))
    })
}

pub async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, Error> {
    let bytes = read_body(body, MAX_JSON_BODY).await?;
    crate::defs::parse_json(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = QueryParams::parse(Some("tag=a&tag=b%2Fc&passing&wait=10s&x=a+b")).unwrap();
        assert_eq!(q.all("tag").collect::<Vec<_>>(), vec!["a", "b/c"]);
        assert!(q.flag("passing").unwrap());
        assert_eq!(q.get("x"), Some("a b"));
        assert!(QueryParams::parse(Some("k=%zz")).is_err());
        assert!(QueryParams::parse(Some("k=%2")).is_err());
        assert!(QueryParams::parse(Some("k=%")).is_err());
    }
}
