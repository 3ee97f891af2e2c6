//! Every Tessera HTTP API (registry, coordinator, events, shop) answers errors in one
//! shape, `{"error": "...", "code": "..."}` with `Content-Type: application/json`, also
//! for the answers its handlers never see: an unknown route (404), a wrong method (405,
//! with `Allow`), a body over the limit (413) or of the wrong type (415). axum makes those
//! as empty or plain-text bodies; [`json_errors`] turns them into the shape.
//!
//! A handler that must answer in another form on purpose (Consul's plain-text errors,
//! which Consul's clients show to their users) marks its response with [`KeepBody`].
//!
//! ```
//! use axum::{Router, routing::get};
//! let app: Router = tessera_web::json_errors(Router::new().route("/v1/x", get(|| async { "x" })));
//! ```

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

/// Response extension: this error body is meant as it is.
#[derive(Debug, Clone, Copy)]
pub struct KeepBody;

/// `{"error": message, "code": code}` with `status`. A 503 or 507 (the store did not
/// keep the write) says when to try again: a second, which the SDK's clients spread with
/// jitter.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": message.into(), "code": code});
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if matches!(
        status,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::INSUFFICIENT_STORAGE
    ) {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Unknown routes get a JSON 404, wrong methods a JSON 405 (axum keeps the `Allow`
/// header), and every other error answer without a JSON body gets one that says what
/// its text said. Call it on the finished router: fallbacks apply to the routes
/// registered before.
pub fn json_errors<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(as_json))
}

async fn not_found(uri: Uri, headers: HeaderMap) -> Response {
    // A gRPC client reads statuses, not bodies: an unknown service is UNIMPLEMENTED.
    if headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| tessera_core::grpc::is_grpc(v.as_bytes()))
    {
        return grpc_status(
            tessera_core::grpc::Code::Unimplemented,
            &format!("unknown service or method {}", uri.path()),
        );
    }
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {}", uri.path()),
    )
}

/// A trailers-only gRPC answer: HTTP 200 with the status in the headers, and no body
/// (of whichever body type the server or client at hand uses).
pub fn grpc_status<B: Default>(
    code: tessera_core::grpc::Code,
    message: &str,
) -> axum::http::Response<B> {
    let mut resp = axum::http::Response::new(B::default());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&tessera_core::grpc::encode_message(message)) {
        h.insert("grpc-message", v);
    }
    resp
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {} (see Allow)", uri.path()),
    )
}

/// The machine-readable code for an error status.
pub fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::CONFLICT => "conflict",
        StatusCode::LENGTH_REQUIRED => "length_required",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    }
}

/// Rewrites an error answer whose body is not JSON (axum's rejections: plain text or
/// empty) into the shape, keeping its status and headers.
async fn as_json(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error())
        || is_json
        || resp.extensions().get::<KeepBody>().is_some()
    {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // axum's rejection texts are short; a larger body is not one of them.
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let fresh = error(status, code_for(status), message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, fresh.into_body()).into_response()
}

/// Requests an HTTP API served, per route pattern and method: the server side of the one
/// metrics scheme (`tessera_http_server_requests_total`,
/// `tessera_http_server_request_duration_seconds`; see `tessera_metrics`).
#[derive(Debug)]
pub struct HttpMetrics(tessera_metrics::Family<tessera_metrics::Red>);

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics(tessera_metrics::Family::new(&["method", "route"]))
    }
}

impl HttpMetrics {
    pub fn render(&self, out: &mut tessera_metrics::Text) {
        self.0.render(
            out,
            "tessera_http_server",
            "HTTP requests served, by method and route",
        );
    }

    fn of(&self, method: &str, route: &str) -> std::sync::Arc<tessera_metrics::Red> {
        self.0.get(&[method, route])
    }
}

/// A `/metrics` answer: the exposition with Prometheus's text content type.
pub fn metrics_response(out: tessera_metrics::Text) -> Response {
    let mut resp = Response::new(Body::from(out.finish()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(tessera_metrics::CONTENT_TYPE),
    );
    resp
}

/// `router` with every request counted and timed in `metrics`, under its route's pattern
/// (never the raw path, which would grow without bound; `unmatched` when no route took
/// it) and its method (`other` for methods outside HTTP's own). A gRPC call counts under
/// its method's path (`/package.Service/Method`) unless it was UNIMPLEMENTED (so made-up
/// methods add no series), in the status class its gRPC status maps to: a call that
/// failed INTERNAL is a 5xx though it came back in an HTTP 200.
pub fn with_metrics(router: Router, metrics: std::sync::Arc<HttpMetrics>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(metrics, measured))
}

async fn measured(
    axum::extract::State(metrics): axum::extract::State<std::sync::Arc<HttpMetrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| tessera_core::grpc::is_grpc(v.as_bytes()));
    if grpc {
        let path = req.uri().path().to_owned();
        let resp = next.run(req).await;
        // A status in the head (trailers-only) is an error's; OK comes in the trailers.
        let code = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| tessera_core::grpc::Code::parse(v.as_bytes()))
            .unwrap_or(tessera_core::grpc::Code::Ok);
        let route = match code {
            tessera_core::grpc::Code::Unimplemented => "unmatched",
            _ => path.as_str(),
        };
        let status = match resp.status() {
            StatusCode::OK => code.http_status(),
            other => other.as_u16(),
        };
        metrics.of(method, route).record(status, started.elapsed());
        return resp;
    }
    let red = {
        let route = req
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or("unmatched", |p| p.as_str());
        metrics.of(method, route)
    };
    let resp = next.run(req).await;
    red.record(resp.status().as_u16(), started.elapsed());
    resp
}

/// `router` with every request served as a server span of `tracer`'s (see [`traced`]).
pub fn with_traces(router: Router, tracer: Option<tessera_trace::Tracer>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(tracer, traced))
}

/// `router` with a request served as a server span of `tracer`'s only when it comes in a
/// trace (it has a `traceparent`; the sampler then follows the caller's decision). For
/// APIs that clients also call on their own in loops, such as the registry's blocking
/// queries and heartbeats: they join their callers' traces and start none.
pub fn with_caller_traces(router: Router, tracer: Option<tessera_trace::Tracer>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(
        tracer,
        traced_in_caller_trace,
    ))
}

async fn traced_in_caller_trace(
    state: axum::extract::State<Option<tessera_trace::Tracer>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !req.headers().contains_key("traceparent") {
        return next.run(req).await;
    }
    traced(state, req, next).await
}

/// Middleware: each request as a server span when `tracer` is set (spans are exported),
/// named by its route's pattern, and the current span of the handler's task, so the calls
/// it makes continue the trace (`tessera_trace::scope`). Without a tracer it only passes
/// the request on.
pub async fn traced(
    axum::extract::State(tracer): axum::extract::State<Option<tessera_trace::Tracer>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(tracer) = tracer else {
        return next.run(req).await;
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    tessera_trace::scope::serve(Some(&tracer), req, route, |r| next.run(r)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Option<String>, serde_json::Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap_or_default();
        let resp = app.clone().oneshot(req).await.unwrap_or_default();
        let status = resp.status();
        let allow = resp
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = read_body(resp).await;
        if status.is_client_error() {
            assert_eq!(
                ct.as_ref().and_then(|v| v.to_str().ok()),
                Some("application/json")
            );
        }
        (
            status,
            allow,
            serde_json::from_slice(&bytes).unwrap_or_default(),
        )
    }

    async fn read_body(resp: Response) -> axum::body::Bytes {
        resp.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    }

    fn app() -> Router {
        json_errors(
            Router::new()
                .route(
                    "/items",
                    get(|| async { "list" })
                        .post(|b: axum::body::Bytes| async move { b.len().to_string() }),
                )
                .route(
                    "/consul",
                    get(|| async {
                        let mut r = (StatusCode::BAD_REQUEST, "Consul's words").into_response();
                        r.extensions_mut().insert(KeepBody);
                        r
                    }),
                )
                .route(
                    "/json",
                    post(|_: axum::Json<serde_json::Value>| async { "ok" }),
                )
                .layer(axum::extract::DefaultBodyLimit::max(1024)),
        )
    }

    #[tokio::test]
    async fn axum_errors_come_out_as_json() {
        let app = app();
        let (s, _, v) = call(&app, "GET", "/nope", vec![]).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        assert_eq!(v["error"], "no such endpoint: /nope");
        let (s, allow, v) = call(&app, "DELETE", "/items", vec![]).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(v["code"], "method_not_allowed");
        assert_eq!(allow.as_deref(), Some("GET,HEAD,POST"));
        let (s, _, v) = call(&app, "POST", "/items", vec![b'x'; 5000]).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
        );
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        let (s, _, v) = call(&app, "POST", "/json", b"{not json".to_vec()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["code"], "bad_request");
        let (s, _, _) = call(&app, "GET", "/items", vec![]).await;
        assert_eq!(s, StatusCode::OK);
    }

    #[tokio::test]
    async fn grpc_calls_count_per_method_by_their_status() {
        let metrics = std::sync::Arc::new(HttpMetrics::default());
        let app = with_metrics(
            json_errors(Router::new().route(
                "/pkg.Svc/{*rest}",
                post(|uri: Uri| async move {
                    match uri.path() {
                        "/pkg.Svc/Ok" => Response::new(Body::empty()),
                        "/pkg.Svc/Broken" => {
                            grpc_status(tessera_core::grpc::Code::Internal, "broken")
                        }
                        _ => grpc_status(tessera_core::grpc::Code::Unimplemented, ""),
                    }
                }),
            )),
            metrics.clone(),
        );
        for path in [
            "/pkg.Svc/Ok",
            "/pkg.Svc/Broken",
            "/pkg.Svc/Made-up",
            "/other.Svc/X",
        ] {
            let req = axum::http::Request::post(path)
                .header(header::CONTENT_TYPE, "application/grpc")
                .body(Body::empty())
                .unwrap_or_default();
            let resp = app.clone().oneshot(req).await.unwrap_or_default();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
        }
        let mut out = tessera_metrics::Text::new();
        metrics.render(&mut out);
        let text = out.finish();
        let count = |route: &str, class: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("tessera_http_server_requests_total{")
                        && l.contains(&format!("route=\"{route}\""))
                        && l.contains(&format!("status=\"{class}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(count("/pkg.Svc/Ok", "2xx").as_deref(), Some("1"), "{text}");
        assert_eq!(
            count("/pkg.Svc/Broken", "5xx").as_deref(),
            Some("1"),
            "{text}"
        );
        // Made-up methods and services land in one series, not one each.
        assert_eq!(count("unmatched", "5xx").as_deref(), Some("2"), "{text}");
        assert!(!text.contains("Made-up"), "{text}");
    }

    #[tokio::test]
    async fn marked_bodies_are_kept() {
        let req = axum::http::Request::builder()
            .uri("/consul")
            .body(Body::empty())
            .unwrap_or_default();
        let resp = app().oneshot(req).await.unwrap_or_default();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let bytes = read_body(resp).await;
        assert_eq!(&bytes[..], b"Consul's words");
    }
}
