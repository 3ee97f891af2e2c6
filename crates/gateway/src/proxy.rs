//! The request path: route → bulkhead → (per try: balancer over usable endpoints →
//! breaker → upstream call with per-try timeout) → retry decision under the budget →
//! response edits. Errors become responses only in `error_response`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tessera_balance::Pick;
use tessera_core::grpc::Code;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::floor::config::HashOn;
use crate::floor::error::GatewayError;
use crate::floor::net::{HOP_BY_HOP, is_hop_by_hop, strip_port};
use crate::floor::path::{PathParams, PathRules};
use crate::policy::routes::{Rewrite, Route, Table};
use crate::policy::upstream::{Snapshot, Upstream};
use crate::protocol::h1::body::{Body, ClientFault};
use crate::protocol::h1::client::{Exchange, SendError as ClientError, Upgraded};
use crate::protocol::h1::fields::RawFields;
use crate::protocol::h1::server::Handler;
use crate::protocol::peer::Peer;
use crate::protocol::timer::LazyTimer;
use grpc_web::Web;

mod grpc_web;
mod trace;

/// Latency charged to an endpoint that failed to connect or reset, so peak-EWMA steers
/// away from it even though the failure itself was quick.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The host the request is for, from its fields (the map's or `raw`) or its URI.
fn host_of<'a, B>(req: &'a Request<B>, raw: Option<RawFields<'a>>) -> &'a str {
    let field = match raw {
        Some(raw) => raw
            .get("host")
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| h.is_ascii()),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok()),
    };
    let host = field
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    strip_port(host)
}

/// What the request path reads on every request: the route table (swapped whole on
/// reload) and the gateway-wide limits. The server layer owns one and hands it to every
/// connection as its `Handler`.
pub struct Proxy {
    pub(crate) table: ArcSwap<Table>,
    pub(crate) path_rules: PathRules,
    pub(crate) replay_cap: usize,
    pub(crate) max_body: u64,
    /// Requests being proxied now, and the most allowed (0: any).
    pub(crate) in_flight: AtomicUsize,
    pub(crate) max_in_flight: usize,
    pub(crate) access_sample: f64,
    /// Set when spans are exported (OpenTelemetry's variables name a collector).
    pub(crate) tracer: Option<tessera_trace::Tracer>,
}

impl Handler for Proxy {
    fn handle(
        &self,
        req: &mut Request<Body>,
        raw: Option<RawFields<'_>>,
        peer: &Peer,
        start: Instant,
        timer: Option<&mut LazyTimer>,
    ) -> impl Future<Output = Response<Body>> + Send {
        handle(self, req, raw, peer, start, timer)
    }

    fn ends_connection(&self, response: &Response<Body>) -> bool {
        response.extensions().get::<EndsConnection>().is_some()
    }
}

/// Marks a response to a request whose body could not be read as framed: what follows
/// on the connection cannot be trusted to start a request.
#[derive(Clone, Copy)]
struct EndsConnection;

/// Proxies one request. `raw`, when given, holds the request's header fields as the
/// client wrote them (its map is then empty), for routes that only pass them on; the
/// others get a map built from it. `start` is when it arrived (the caller's clock
/// reading, shared by everything that needs one); `timer`, when the connection has one,
/// is reused for the per-try timeouts instead of arming a timer per request.
pub async fn handle(
    gw: &Proxy,
    req: &mut Request<Body>,
    raw: Option<RawFields<'_>>,
    peer: &Peer,
    start: Instant,
    timer: Option<&mut LazyTimer>,
) -> Response<Body> {
    // A gRPC caller (HTTP/2, `application/grpc*`) reads the gateway's own failures as
    // gRPC statuses; anything else gets HTTP and JSON.
    let grpc = req.version() == Version::HTTP_2 && is_grpc(req.headers());
    // Load beyond the global limit is shed first, before it costs any work.
    let Some(_in_flight) = InFlight::enter(gw) else {
        return error_response(GatewayError::Overloaded(gw.max_in_flight), grpc);
    };
    // One table for the whole request: a reload meanwhile never mixes two configs.
    let table = gw.table.load_full();
    // Before routing, so a refused request is in its trace too.
    let mut span = gw
        .tracer
        .as_ref()
        .and_then(|t| trace::begin(t, req, raw, peer));
    // Routing, auth and the upstream all see one checked, canonical request.
    let (route, mut raw) = match find_route(gw, &table, req, raw, peer) {
        Ok(found) => found,
        Err(e) => {
            let status = e.status();
            let resp = error_response(e, grpc);
            if let Some(span) = span {
                trace::finish(gw, span, None, status, grpc.then(|| head_code(&resp)));
            }
            return resp;
        }
    };
    // A traced request's tries each send their own `traceparent`: the map can swap it.
    if span.is_some()
        && let Some(r) = raw.take()
    {
        *req.headers_mut() = r.to_map();
    }
    // A gRPC-Web call on a route that translates it goes on as gRPC, and is answered
    // (refusals included) as gRPC-Web.
    let web = match route.grpc_web {
        true => Web::of(req.headers()),
        false => None,
    };
    if let Some(w) = web
        && let Err(why) = w.to_grpc(req)
    {
        let e = GatewayError::Body(why);
        let status = e.status();
        let resp = w.answer(error_response(e, true));
        if let Some(span) = span {
            trace::finish(gw, span, Some(route), status, Some(head_code(&resp)));
        }
        return resp;
    }
    let grpc = grpc || web.is_some();
    // Taken now: forwarding takes the request apart.
    let sampled = AccessEntry::sample(gw, req);
    let parent = span.as_ref().map(|s| &s.rec);
    let (mut resp, status) = match on_route(
        gw, &table, route, req, raw, peer, start, timer, parent, grpc,
    )
    .await
    {
        Ok(resp) => {
            let status = resp.status();
            (resp, status)
        }
        // The rescue point: a failure from any layer below is answered here, once.
        Err(e) => {
            if let Some(span) = span.as_deref_mut() {
                trace::refused(span, &e);
            }
            // Counted as what it is, also when a gRPC caller is told in a 200.
            let status = e.status();
            (error_response(e, grpc), status)
        }
    };
    if let Some(w) = web {
        resp = w.answer(resp);
    }
    // Counted and logged on the route whatever the answer, refusals included.
    let elapsed = Instant::now().saturating_duration_since(start);
    route.metrics.record(status.as_u16(), elapsed);
    if let Some(entry) = sampled {
        entry.write(peer, route, status, elapsed, span.as_deref());
    }
    if let Some(span) = span {
        trace::finish(
            gw,
            span,
            Some(route),
            status,
            grpc.then(|| head_code(&resp)),
        );
    }
    resp
}

/// The gRPC status in an answer's head (a trailers-only answer's), else 0: an OK comes
/// in the trailers, after the span has ended.
fn head_code(resp: &Response<Body>) -> u16 {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| Code::parse(v.as_bytes()))
        .map_or(0, |c| c as u16)
}

/// A routed request through its route's policies, its upstream and its response edits.
#[allow(clippy::too_many_arguments)]
async fn on_route(
    gw: &Proxy,
    table: &Table,
    route: &Route,
    req: &mut Request<Body>,
    raw: Option<RawFields<'_>>,
    peer: &Peer,
    start: Instant,
    timer: Option<&mut LazyTimer>,
    trace: Option<&tessera_trace::Recording>,
    // A gRPC caller (HTTP/2 or translated gRPC-Web): deadlines and retries by status.
    grpc: bool,
) -> Result<Response<Body>, GatewayError> {
    // Identity headers come only from verified tokens: a client's copy never passes.
    let identity = &table.issuers.identity_headers;
    for h in identity {
        req.headers_mut().remove(h);
    }
    // Auth before the rate limit: a limit may be keyed on the verified subject.
    let subject = match &route.auth {
        // Boxed: with a key fetch inside, this future is 2 KB (in a release build), paid
        // for only by routes that check tokens.
        Some(rule) => Box::pin(table.issuers.check(rule, req.headers()))
            .await?
            .apply(req.headers_mut()),
        None => None,
    };
    let quota = match &route.rate_limit {
        Some(limit) => Some(limit.check(req.headers(), subject, &peer.ip, start).await?),
        None => None,
    };
    // Not boxed: the request future lives in the connection task and is not moved while
    // it runs, and boxing this one cost an allocation of its ~3 KB plus a copy of all of
    // it per request (555 instructions of 14.3k, measured). The cold paths inside it (a
    // new connection, a streamed body, HTTP/2) are boxed instead, to keep it small.
    let mut resp = match forward(
        gw, route, req, raw, peer, identity, start, timer, trace, grpc,
    )
    .await
    {
        Ok(resp) => resp,
        // The fallback stands in for a failed upstream, never for a refusal above.
        Err(e) => {
            tracing::debug!(route = %route.name, error = %e, "request failed");
            let Some(f) = &route.fallback else {
                return Err(e);
            };
            let mut r = Response::new(Body::bytes(f.body.clone()));
            *r.status_mut() = f.status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, f.content_type.clone());
            r
        }
    };
    if !route.remove_response.is_empty() || !route.add_response.is_empty() || quota.is_some() {
        crate::protocol::h1::body::materialize(&mut resp);
    }
    let h = resp.headers_mut();
    if let Some(q) = quota {
        h.insert("ratelimit-limit", HeaderValue::from(q.limit));
        h.insert("ratelimit-remaining", HeaderValue::from(q.remaining));
    }
    for name in &route.remove_response {
        h.remove(name);
    }
    for (k, v) in &route.add_response {
        h.insert(k.clone(), v.clone());
    }
    Ok(resp)
}

/// Checks the request, puts its path in canonical form and finds its route. `raw` comes
/// back still set when the route can pass the client's fields on as they were written.
fn find_route<'t, 'r>(
    gw: &Proxy,
    table: &'t Table,
    req: &mut Request<Body>,
    mut raw: Option<RawFields<'r>>,
    peer: &Peer,
) -> Result<(&'t Route, Option<RawFields<'r>>), GatewayError> {
    // Plain fast-path requests were checked as they were parsed; hyper's are here.
    if raw.is_none() {
        crate::protocol::h1::check_request(req).map_err(GatewayError::Malformed)?;
        if req.version() == Version::HTTP_2 {
            crate::protocol::h2::check_request(req).map_err(GatewayError::Malformed)?;
        }
        // Absolute-form: the target's authority is the host, whatever Host said (RFC
        // 9112 section 3.2.2), for routing and upstream alike.
        if let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned())
            && let Ok(v) = http::HeaderValue::from_str(&authority)
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    // Routing, auth and the upstream all see one canonical path. A path with `;`
    // parameters is matched as Tomcat reads it (without them) unless every route refuses
    // them; the route found then says what is forwarded.
    let rules = PathRules {
        params: table.params,
        ..gw.path_rules
    };
    let with_params = (rules.params != PathParams::Reject && req.uri().path().contains(';'))
        .then(|| req.uri().clone());
    canonicalize(req, rules)?;
    if let Some(cert) = peer.tls() {
        let host = host_of(req, raw);
        // No host at all (HTTP/1.0) can only mean the name the connection was opened for.
        if !host.is_empty() && !cert.covers(host) {
            return Err(GatewayError::Misdirected(host.to_owned()));
        }
    }
    // Routes that match on fields, and identity fields to strip, need the map.
    if let Some(r) = raw
        && (table.header_rules || !table.issuers.identity_headers.is_empty())
    {
        *req.headers_mut() = r.to_map();
        raw = None;
    }
    let host = if table.host_rules {
        host_of(req, raw)
    } else {
        ""
    };
    let route = table
        .find(req.method(), host, req.uri().path(), req.headers())
        .ok_or_else(|| GatewayError::NoRoute {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
        })?;
    if let Some(received) = with_params {
        match route.path_params {
            PathParams::Reject => {
                return Err(GatewayError::BadPath(
                    "a ';' path parameter in the path (see path_params)",
                ));
            }
            PathParams::Strip => {}
            PathParams::Keep => {
                *req.uri_mut() = received;
                let keep = PathRules {
                    params: PathParams::Keep,
                    ..rules
                };
                canonicalize(req, keep)?;
            }
        }
    }
    if let Some(r) = raw
        && !route.plain
    {
        *req.headers_mut() = r.to_map();
        raw = None;
    }
    Ok((route, raw))
}

/// One access-log line, for the sampled share of requests.
struct AccessEntry {
    method: Method,
    path: String,
}

impl AccessEntry {
    fn sample(gw: &Proxy, req: &Request<Body>) -> Option<AccessEntry> {
        (gw.access_sample > 0.0 && fastrand::f64() < gw.access_sample).then(|| AccessEntry {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
        })
    }

    /// An event on its own target, so `TESSERA_LOG` can keep or drop access lines apart
    /// from the rest (`warn,tessera_gateway::access=info`), and `--log-format json` makes
    /// each one a JSON object. A traced request's line names its trace and span.
    fn write(
        self,
        peer: &Peer,
        route: &Route,
        status: StatusCode,
        elapsed: Duration,
        span: Option<&trace::ServerSpan>,
    ) {
        let ctx = span.map(|s| s.rec.ctx);
        tracing::info!(
            target: "tessera_gateway::access",
            trace_id = ctx.map(|c| tracing::field::display(c.trace_id)),
            span_id = ctx.map(|c| tracing::field::display(c.span_id)),
            client = %peer.addr.ip(),
            method = self.method.as_str(),
            path = self.path,
            route = route.name.as_str(),
            upstream = route.upstream.as_ref().map(|u| u.name.as_str()),
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// Replaces the request's path by its canonical form under `rules`.
fn canonicalize(req: &mut Request<Body>, rules: PathRules) -> Result<(), GatewayError> {
    let Some(path) =
        crate::floor::path::canonical(req.uri().path(), rules).map_err(GatewayError::BadPath)?
    else {
        return Ok(());
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(pq).ok();
    *req.uri_mut() =
        Uri::from_parts(parts).map_err(|_| GatewayError::BadPath("not a valid URI"))?;
    Ok(())
}

/// A request counted in `Proxy::in_flight` until dropped.
struct InFlight<'a>(&'a Proxy);

impl<'a> InFlight<'a> {
    fn enter(gw: &'a Proxy) -> Option<InFlight<'a>> {
        let n = gw.in_flight.fetch_add(1, Ordering::Relaxed);
        if gw.max_in_flight > 0 && n >= gw.max_in_flight {
            gw.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight(gw))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a request's `content-type` is gRPC's (`application/grpc`, `+proto`, ...).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| tessera_core::grpc::is_grpc(v.as_bytes()))
}

/// The one place a `GatewayError` becomes a response: JSON naming the problem, with
/// the headers its kind calls for; for a gRPC caller, a trailers-only gRPC answer.
fn error_response(e: GatewayError, grpc: bool) -> Response<Body> {
    if let GatewayError::Connect { endpoint, .. } | GatewayError::Io { endpoint, .. } = &e {
        // Where it failed is for the operator.
        tracing::warn!(%endpoint, error = %e, "upstream request failed");
    }
    if grpc {
        return grpc_error_response(&e);
    }
    let body = serde_json::json!({"error": e.to_string(), "code": e.code()});
    let mut resp = Response::new(Body::bytes(body.to_string()));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let GatewayError::Unauthorized(why) = &e {
        let v = format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            why.replace('"', "'")
        );
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("Bearer")),
        );
    }
    let ends_connection = e.ends_connection();
    if ends_connection {
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(d) = e.retry_after() {
        // Whole seconds, rounded up: retrying at a rounded-down time would be refused.
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        if let GatewayError::RateLimited { limit, .. } = &e {
            h.insert("ratelimit-limit", HeaderValue::from(*limit));
            h.insert("ratelimit-remaining", HeaderValue::from(0));
            h.insert("ratelimit-reset", HeaderValue::from(secs.max(1)));
        }
    }
    if ends_connection {
        resp.extensions_mut().insert(EndsConnection);
    }
    resp
}

/// A gRPC "trailers-only" answer: HTTP 200 whose only header block carries
/// `grpc-status` and `grpc-message` (percent-encoded, as gRPC asks), and, when the
/// gateway knows when to try again, `grpc-retry-pushback-ms`.
fn grpc_error_response(e: &GatewayError) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(e.grpc_status() as u16));
    let message = tessera_core::grpc::encode_message(&e.to_string());
    if let Ok(v) = HeaderValue::from_str(&message) {
        h.insert("grpc-message", v);
    }
    if let Some(d) = e.retry_after() {
        h.insert(
            "grpc-retry-pushback-ms",
            HeaderValue::from(d.as_millis().min(u128::from(u64::MAX)) as u64),
        );
    }
    if e.ends_connection() {
        resp.extensions_mut().insert(EndsConnection);
    }
    resp
}

/// The request body as the retry loop sees it.
enum Payload {
    /// Held in memory: can be sent again.
    Replayable(Bytes),
    /// Streamed: can be sent once, or again if the copy kept of it holds all of it.
    Stream(
        Option<Body>,
        Option<Arc<std::sync::Mutex<crate::protocol::h1::body::Copy>>>,
    ),
}

impl Payload {
    /// The body for the next try: the held bytes again, or the stream (once).
    fn next(&mut self) -> Body {
        match self {
            Payload::Replayable(b) => Body::bytes(b.clone()),
            Payload::Stream(s, copy) => match s.take() {
                Some(b) => b,
                None => copy
                    .as_ref()
                    .and_then(|c| c.lock().unwrap_or_else(|p| p.into_inner()).replay())
                    .map_or_else(Body::empty, Body::bytes),
            },
        }
    }

    fn replayable(&self) -> bool {
        match self {
            Payload::Replayable(_) => true,
            Payload::Stream(Some(_), _) | Payload::Stream(None, None) => false,
            Payload::Stream(None, Some(copy)) => copy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replay()
                .is_some(),
        }
    }

    /// Where a streamed upload records a failure of the client's own.
    fn fault(&self) -> Option<Arc<std::sync::OnceLock<ClientFault>>> {
        match self {
            Payload::Stream(Some(Body::Upload(u)), _) => Some(u.fault.clone()),
            _ => None,
        }
    }
}

/// Reads the request body as far as the retry loop needs: whole when it fits in `cap`
/// (then it can be sent again). An HTTP/1.x body of unknown length (chunked) is read
/// ahead up to `cap` too, like nginx's request buffering: a small one is then checked
/// whole before anything goes upstream. HTTP/2 bodies of unknown length stream at once
/// (gRPC streams must not wait for their end). Whatever streams is counted against
/// `max`. Reading ahead must finish by `deadline` (408 otherwise).
async fn read_payload(
    body: Body,
    limits: (usize, u64),
    read_ahead: bool,
    deadline: Instant,
) -> Result<Payload, GatewayError> {
    let (cap, max) = limits;
    let mut body = match body {
        Body::Full(b) => return Ok(Payload::Replayable(b.unwrap_or_default())),
        Body::Stream(b) => b,
        other => return Ok(Payload::Stream(Some(other), None)),
    };
    if body.is_end_stream() {
        return Ok(Payload::Replayable(Bytes::new()));
    }
    let exact = body.size_hint().exact();
    if exact.is_some_and(|n| n > max) {
        return Err(GatewayError::TooLarge(max));
    }
    let mut ahead = bytes::BytesMut::new();
    if exact.is_some_and(|n| n as usize <= cap) || (exact.is_none() && read_ahead) {
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(GatewayError::BodyTimeout),
                Ok(None) => return Ok(Payload::Replayable(ahead.freeze())),
                Ok(Some(Err(e))) => return Err(GatewayError::Body(e.to_string())),
                Ok(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    ahead.extend_from_slice(&data);
                    if ahead.len() as u64 > max {
                        return Err(GatewayError::TooLarge(max));
                    }
                    if ahead.len() > cap {
                        break;
                    }
                }
                // Trailers end the body; they are dropped with it held (HTTP/1.1
                // request trailers carry nothing an upstream may rely on).
                Err(_) => return Ok(Payload::Replayable(ahead.freeze())),
            }
        }
    }
    let seen = ahead.len() as u64;
    // Streamed at once (HTTP/2): a copy is kept up to `cap`, so a body that has ended
    // by the time its first try fails can still be retried.
    let copy = (!read_ahead && cap > 0).then(|| {
        Arc::new(std::sync::Mutex::new(crate::protocol::h1::body::Copy {
            cap,
            ..Default::default()
        }))
    });
    Ok(Payload::Stream(
        Some(Body::Upload(Box::new(crate::protocol::h1::body::Upload {
            ahead: (!ahead.is_empty()).then(|| ahead.freeze()),
            rest: body,
            seen,
            max,
            fault: Default::default(),
            copy: copy.clone(),
        }))),
        copy,
    ))
}

/// Sends the request to the route's upstream, and again elsewhere while the route's
/// retry policy and the upstream's budget allow. Each try picks an endpoint, calls it and
/// records one outcome for it.
#[allow(clippy::too_many_arguments)]
async fn forward(
    gw: &Proxy,
    route: &Route,
    req: &mut Request<Body>,
    raw: Option<RawFields<'_>>,
    peer: &Peer,
    identity: &[HeaderName],
    start: Instant,
    mut timer: Option<&mut LazyTimer>,
    trace: Option<&tessera_trace::Recording>,
    grpc: bool,
) -> Result<Response<Body>, GatewayError> {
    let Some(up) = &route.upstream else {
        return Err(GatewayError::NoEndpoint(
            "(none: fallback-only route)".into(),
        ));
    };
    // Held for the whole exchange, retries included.
    let _slot = up.bulkhead.try_acquire().map_err(|e| {
        up.metrics
            .bulkhead_rejections
            .fetch_add(1, Ordering::Relaxed);
        GatewayError::BulkheadFull {
            upstream: up.name.clone(),
            max: e.max,
        }
    })?;
    up.metrics.requests.fetch_add(1, Ordering::Relaxed);
    up.budget.deposit_at(start);
    let mut client_upgrade = take_upgrade(req);
    let hash = up
        .hash
        .as_ref()
        .map(|h| hash_of(h, req.headers(), peer.addr));
    // Taken, not moved out of the request: the request stays where the connection task
    // put it, and is not copied into this future (it is a few hundred bytes).
    // A gRPC call brings its own deadline (`grpc-timeout`), which shortens the route's.
    // Read before the fields move into the outgoing request.
    let deadline = match grpc
        .then(|| req.headers().get("grpc-timeout"))
        .flatten()
        .and_then(|v| tessera_core::grpc::parse_timeout(v.as_bytes()))
    {
        Some(t) => (start + t).min(start + route.timeout),
        None => start + route.timeout,
    };
    let body = std::mem::replace(req.body_mut(), Body::empty());
    let mut out = Outgoing::build(req, route, peer, identity, client_upgrade.is_some())?;
    let req: &Request<Body> = req;
    let read_ahead = req.version() < http::Version::HTTP_2;
    let limits = (gw.replay_cap, gw.max_body);
    let mut payload = read_payload(body, limits, read_ahead, deadline).await?;
    let client_fault = payload.fault();
    let retry_allowed = is_idempotent(req.method()) || route.retry_non_idempotent;
    let mut tried: Vec<String> = Vec::new();
    let mut attempt = 0u32;
    loop {
        // Loaded per try: discovery may have changed the set since the last one.
        let snapshot = up.feed.snapshot.load();
        let is_ejected = |i: usize| snapshot.outliers[i].is_ejected();
        let pick = (up.balancer)
            .pick_try(&snapshot.set, is_ejected, &tried, up.panic_threshold, hash)
            .ok_or_else(|| GatewayError::NoEndpoint(up.name.clone()))?;
        let endpoint = &snapshot.set.endpoints[pick.idx];
        let Some(authority) = snapshot.authorities[pick.idx].clone() else {
            return Err(GatewayError::Io {
                upstream: up.name.clone(),
                endpoint: endpoint.addr.clone(),
                detail: "the endpoint's address is not a valid authority".into(),
            });
        };
        let now = if attempt == 0 { start } else { Instant::now() };
        let permit = breaker_permit(up, now)?;
        let load = endpoint.load.start_at(now.into_std());
        let conns = &snapshot.conns[pick.idx];
        let try_deadline = (now + route.per_try_timeout).min(deadline);
        // Each try is a client span of its own: the upstream's parent is the try.
        let try_span = trace.map(|t| Box::new(t.child()));
        if let Some(t) = &try_span
            && let Ok(v) = HeaderValue::try_from(t.ctx.traceparent())
        {
            out.headers.insert(tessera_trace::http::TRACEPARENT, v);
        }
        // The upstream's deadline is what is left of this try's.
        if grpc
            && let Ok(v) = HeaderValue::try_from(tessera_core::grpc::format_timeout(
                try_deadline.saturating_duration_since(now),
            ))
        {
            out.headers.insert("grpc-timeout", v);
        }
        let target = out.target(req.method(), raw, authority);
        // Pinned where it lives; the timeouts hold a reference, not a second copy.
        let call = std::pin::pin!(send(conns, &endpoint.addr, up, target, payload.next(), now));
        let outcome = match timer.as_deref_mut() {
            Some(t) => t.timeout_at(try_deadline, call).await,
            None => tokio::time::timeout_at(try_deadline, call).await.ok(),
        };
        let total = deadline.saturating_duration_since(start);
        let result = judge(
            outcome,
            up,
            route,
            &endpoint.addr,
            (now, try_deadline),
            total,
        );
        // A client's broken upload is its fault, not the endpoint's: nothing is recorded.
        if result.is_err()
            && let Some(fault) = client_fault.as_ref().and_then(|f| f.get())
        {
            return Err(match fault {
                ClientFault::TooLarge(max) => GatewayError::TooLarge(*max),
                ClientFault::Broken(why) => GatewayError::Body(why.clone()),
            });
        }
        let code = grpc.then(|| grpc_outcome(&result));
        let recorded = record(up, &snapshot, pick, permit, load, &result, code);
        let mut try_span = try_span.map(|rec| trace::TrySpan::after(*rec, &result, recorded, code));
        // A status the route retries on, though it does not count against the endpoint.
        let grpc_retry = code.is_some_and(|c| route.grpc_retry_on.contains(&c));
        let result = match result {
            Ok(exchange) if !recorded.failed && !grpc_retry => {
                if let Some(span) = try_span {
                    trace::end_try(
                        gw,
                        *span,
                        (req.method(), req.uri().path()),
                        &endpoint.addr,
                        attempt,
                    );
                }
                return pass_on(exchange, client_upgrade.take(), up, &endpoint.addr);
            }
            other => other,
        };
        // Nothing reached the upstream: safe to send anywhere, whatever the method.
        let unsent = matches!(&result, Err(f) if !f.reached);
        // gRPC says by status whether a call may be repeated, whatever its method.
        let allowed = match code {
            Some(c) => route.grpc_retry_on.contains(&c),
            None => retry_allowed,
        };
        let retryable = (allowed || unsent) && payload.replayable();
        let retry = match retryable {
            true => should_retry(up, route, attempt, deadline),
            false => Retry::No,
        };
        if let Some(mut span) = try_span.take() {
            if retry == Retry::NoBudget {
                span.note("retry budget exhausted");
            }
            trace::end_try(
                gw,
                *span,
                (req.method(), req.uri().path()),
                &endpoint.addr,
                attempt,
            );
        }
        if retry != Retry::Yes {
            return match result {
                Ok(exchange) => Ok(downstream_response(exchange.response)),
                Err(failure) => Err(failure.error),
            };
        }
        attempt += 1;
        tried.push(endpoint.addr.clone());
        pause(route, attempt, deadline).await;
    }
}

/// What a try's exchange came to: its answer, or the failure charged to the endpoint
/// (`None`: no answer by `deadline`).
fn judge(
    outcome: Option<Result<Exchange, SendError>>,
    up: &Upstream,
    route: &Route,
    addr: &str,
    (now, deadline): (Instant, Instant),
    total: Duration,
) -> Result<Exchange, Failure> {
    let connect = |detail| GatewayError::Connect {
        upstream: up.name.clone(),
        endpoint: addr.to_owned(),
        detail,
    };
    let (error, reached, penalty) = match outcome {
        Some(Ok(exchange)) => return Ok(exchange),
        // No connection, or a pooled one the upstream had just closed: the request did not
        // go out.
        Some(Err(SendError::Connect(e))) => (connect(e.0), false, FAILURE_PENALTY),
        Some(Err(SendError::Unsent(detail))) => (connect(detail), false, FAILURE_PENALTY),
        Some(Err(SendError::Io(detail))) => {
            let e = GatewayError::Io {
                upstream: up.name.clone(),
                endpoint: addr.to_owned(),
                detail,
            };
            (e, true, FAILURE_PENALTY)
        }
        None => {
            let per_try = deadline.saturating_duration_since(now);
            // Cut short by the request's deadline: that is the timeout the client met.
            let timeout = if per_try < route.per_try_timeout {
                total
            } else {
                per_try
            };
            let e = GatewayError::Timeout {
                upstream: up.name.clone(),
                timeout,
            };
            (e, true, per_try)
        }
    };
    Err(Failure {
        error,
        reached,
        penalty,
    })
}

/// A gRPC try's status as far as the gateway can see it before passing the answer on:
/// the status of a trailers-only answer, what the spec makes of an HTTP error, and
/// UNAVAILABLE or DEADLINE_EXCEEDED for no answer. OK for an answer whose status is still
/// to come (in its trailers).
fn grpc_outcome(result: &Result<Exchange, Failure>) -> Code {
    match result {
        Ok(exchange) => {
            let resp = &exchange.response;
            if resp.status() != StatusCode::OK {
                return Code::from_http_status(resp.status().as_u16());
            }
            resp.headers()
                .get("grpc-status")
                .and_then(|v| Code::parse(v.as_bytes()))
                .unwrap_or(Code::Ok)
        }
        Err(f) if matches!(f.error, GatewayError::Timeout { .. }) => Code::DeadlineExceeded,
        Err(_) => Code::Unavailable,
    }
}

/// A try that got no answer.
struct Failure {
    error: GatewayError,
    /// The upstream may have seen the request.
    reached: bool,
    /// The latency charged to the endpoint: the failure may have been quick, and
    /// peak-EWMA must still steer away from it.
    penalty: Duration,
}

/// A permit from the upstream's breaker, when it has one: an open breaker refuses the try.
fn breaker_permit(
    up: &Upstream,
    now: Instant,
) -> Result<Option<tessera_resilience::Permit>, GatewayError> {
    let Some(breaker) = &up.breaker else {
        return Ok(None);
    };
    match breaker.try_acquire_at(now) {
        Ok(permit) => Ok(Some(permit)),
        Err(e) => {
            up.metrics
                .breaker_rejections
                .fetch_add(1, Ordering::Relaxed);
            Err(GatewayError::BreakerOpen {
                upstream: up.name.clone(),
                retry_after: e.retry_after,
            })
        }
    }
}

/// What recording a try did: whether it failed, and what its failure changed (for the
/// try's span).
#[derive(Clone, Copy, Default)]
struct Recorded {
    failed: bool,
    ejected: bool,
    opened_breaker: bool,
}

/// Records what one try came to on its endpoint, once: its latency for the balancer, its
/// outlier state and its breaker. A 502, 503 or 504 answer is a failure like no answer.
fn record(
    up: &Upstream,
    snapshot: &Snapshot,
    pick: Pick,
    permit: Option<tessera_resilience::Permit>,
    load: tessera_balance::InFlight,
    result: &Result<Exchange, Failure>,
    grpc: Option<Code>,
) -> Recorded {
    let endpoint = &snapshot.set.endpoints[pick.idx];
    let failed = match result {
        Ok(exchange) => {
            let done = Instant::now();
            load.finish_at(done.into_std());
            let failed = matches!(
                exchange.response.status(),
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ) || grpc.is_some_and(Code::is_failure);
            if !failed {
                snapshot.outliers[pick.idx].success();
                if let Some(p) = permit {
                    p.success_at(done);
                }
                return Recorded::default();
            }
            permit
        }
        Err(failure) => {
            endpoint.load.observe(failure.penalty);
            drop(load);
            permit
        }
    };
    let mut recorded = Recorded {
        failed: true,
        ..Recorded::default()
    };
    if let Some(p) = failed {
        recorded.opened_breaker = p.failure();
    }
    if let Some(cfg) = &up.outlier
        && let Some(d) = snapshot.outliers[pick.idx].failure(cfg, pick.ejected, snapshot.set.len())
    {
        up.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        recorded.ejected = true;
        tracing::warn!(upstream = %up.name, endpoint = %endpoint.addr,
            seconds = d.as_secs(), "endpoint ejected after consecutive errors");
    }
    recorded
}

/// The client's answer: a switch of protocols is spliced through; anything else passes
/// with its hop-by-hop fields dropped.
fn pass_on(
    exchange: Exchange,
    client: Option<hyper::upgrade::OnUpgrade>,
    up: &Upstream,
    addr: &str,
) -> Result<Response<Body>, GatewayError> {
    let Some(upgraded) = exchange.upgraded else {
        return Ok(downstream_response(exchange.response));
    };
    match client {
        Some(client) => Ok(tunnel(up.name.clone(), client, upgraded, exchange.response)),
        // A 101 nobody asked for: the upgraded upstream connection is dropped.
        None => Err(GatewayError::Io {
            upstream: up.name.clone(),
            endpoint: addr.to_owned(),
            detail: "unexpected 101 Switching Protocols".into(),
        }),
    }
}

/// The client's side of the protocol switch (WebSocket) the request asks for, if any.
/// `Upgrade: h2c` asks the gateway itself to switch protocols mid-request, which it does
/// not do (and an upstream that did would then talk HTTP/2 past every check here): it is
/// dropped, and the request goes on as plain HTTP/1.1.
fn take_upgrade(req: &mut Request<Body>) -> Option<hyper::upgrade::OnUpgrade> {
    if !wants_upgrade(req) {
        return None;
    }
    if req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"))
    {
        let h = req.headers_mut();
        h.remove(header::UPGRADE);
        h.remove(&HTTP2_SETTINGS);
        return None;
    }
    Some(hyper::upgrade::on(req))
}

/// What every try sends but the endpoint's authority, built once: each try writes this
/// same map (HTTP/1.1 writes it by reference).
struct Outgoing<'p> {
    headers: HeaderMap,
    forwarded: Forwarded,
    /// `forwarded` as field lines.
    extra: std::borrow::Cow<'p, [u8]>,
    path_and_query: PathAndQuery,
}

impl<'p> Outgoing<'p> {
    /// Takes the request's fields. With `raw` the map is empty and this only sets the
    /// forwarding fields: the route is plain (no edits) and the request carries no field
    /// this would remove but the hop-by-hop ones `RawFields::write` drops.
    fn build(
        req: &mut Request<Body>,
        route: &Route,
        peer: &'p Peer,
        identity: &[HeaderName],
        upgrade: bool,
    ) -> Result<Outgoing<'p>, GatewayError> {
        let upgrade_to = if upgrade {
            req.headers().get(header::UPGRADE).cloned()
        } else {
            None
        };
        let fields = std::mem::take(req.headers_mut());
        let (mut headers, forwarded) = upstream_headers(fields, req.uri(), route, peer, identity);
        if let Some(proto) = upgrade_to {
            // An upgrade (WebSocket) is the one case where these hop-by-hop headers pass.
            headers.insert(header::UPGRADE, proto);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let path_and_query = match (&route.rewrite, req.uri().path_and_query()) {
            (Rewrite::None, Some(pq)) => pq.clone(),
            _ => {
                let path = route.rewrite_path(req.uri().path());
                let joined = match req.uri().query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.into_owned(),
                };
                PathAndQuery::try_from(joined)
                    .map_err(|e| GatewayError::Body(format!("bad path: {e}")))?
            }
        };
        let extra = forwarded.lines(peer);
        Ok(Outgoing {
            headers,
            forwarded,
            extra,
            path_and_query,
        })
    }

    /// One try's request head.
    fn target<'a>(
        &'a self,
        method: &'a Method,
        raw: Option<RawFields<'a>>,
        authority: http::uri::Authority,
    ) -> Target<'a> {
        Target {
            method,
            path_and_query: &self.path_and_query,
            authority,
            headers: &self.headers,
            raw,
            forwarded: &self.forwarded,
            extra: &self.extra,
        }
    }
}

/// The route's jittered, growing pause before retry `attempt`, cut short at the deadline:
/// retries of requests that failed together do not land together.
async fn pause(route: &Route, attempt: u32, deadline: Instant) {
    let wait = route.retry_backoff.delay(attempt, fastrand::f64());
    if !wait.is_zero() {
        tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
    }
}

enum SendError {
    Connect(crate::protocol::transport::ConnectError),
    /// Nothing reached the upstream.
    Unsent(String),
    /// The upstream may have seen the request.
    Io(String),
}

/// What each try sends, borrowed from the request.
struct Target<'a> {
    method: &'a Method,
    path_and_query: &'a PathAndQuery,
    authority: http::uri::Authority,
    headers: &'a HeaderMap,
    /// The client's fields, written after `headers` (then empty).
    raw: Option<RawFields<'a>>,
    forwarded: &'a Forwarded,
    /// `forwarded` as field lines.
    extra: &'a [u8],
}

/// `X-Forwarded-For` and `X-Forwarded-Proto` for the upstream, written after the header
/// map rather than inserted into it: two hash-map inserts per request saved. `None`: the
/// map already has what goes upstream (a trusted proxy's, or the route's own edit).
struct Forwarded {
    xff: Option<HeaderValue>,
    proto: Option<&'static str>,
}

impl Forwarded {
    /// As field lines for the HTTP/1.1 writer.
    fn lines<'a>(&self, peer: &'a Peer) -> std::borrow::Cow<'a, [u8]> {
        // Unchanged from the connection's own: its prebuilt lines.
        if self.xff.as_ref() == Some(&peer.ip) && self.proto == Some(peer.proto()) {
            return std::borrow::Cow::Borrowed(peer.forwarded());
        }
        let mut w = Vec::new();
        if let Some(v) = &self.xff {
            w.extend_from_slice(b"x-forwarded-for: ");
            w.extend_from_slice(v.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        if let Some(p) = self.proto {
            w.extend_from_slice(b"x-forwarded-proto: ");
            w.extend_from_slice(p.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        std::borrow::Cow::Owned(w)
    }
}

/// One exchange on a pooled connection.
async fn send(
    conns: &Arc<crate::protocol::h1::pool::Conns>,
    addr: &str,
    up: &Upstream,
    target: Target<'_>,
    body: Body,
    now: Instant,
) -> Result<Exchange, SendError> {
    let conn = conns
        .checkout(
            addr,
            up.protocol,
            &up.connector,
            up.connect_timeout,
            up.idle_timeout,
            now.into_std(),
        )
        .await
        .map_err(SendError::Connect)?;
    match conn {
        crate::protocol::h1::pool::Conn::H1(c) => crate::protocol::h1::client::send(
            c,
            crate::protocol::h1::client::RequestHead {
                method: target.method,
                target: target.path_and_query.as_str(),
                headers: target.headers,
                raw: target.raw,
                extra: target.extra,
            },
            body,
            conns,
            now.into_std(),
        )
        .await
        .map_err(|e| match e {
            ClientError::Unsent(d) => SendError::Unsent(d),
            ClientError::Io(d) | ClientError::RequestBody(d) => SendError::Io(d),
        }),
        // Boxed: its request and hyper's send future would otherwise sit in every
        // HTTP/1.1 request's future too.
        crate::protocol::h1::pool::Conn::H2(s) => Box::pin(send_h2(s, up, target, body)).await,
    }
}

/// One exchange on the shared HTTP/2 connection.
async fn send_h2(
    mut s: hyper::client::conn::http2::SendRequest<Body>,
    up: &Upstream,
    target: Target<'_>,
    body: Body,
) -> Result<Exchange, SendError> {
    // HTTP/2 needs scheme and authority for its pseudo-headers.
    let mut uri_parts = http::uri::Parts::default();
    uri_parts.scheme = Some(if up.connector.is_tls() {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    });
    uri_parts.authority = Some(target.authority);
    uri_parts.path_and_query = Some(target.path_and_query.clone());
    let uri = Uri::from_parts(uri_parts)
        .map_err(|e| SendError::Unsent(format!("bad upstream URI: {e}")))?;
    let mut req = Request::new(body);
    *req.method_mut() = target.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    let mut headers = match target.raw {
        Some(raw) => raw.to_map(),
        None => target.headers.clone(),
    };
    if let Some(v) = &target.forwarded.xff {
        headers.insert(X_FORWARDED_FOR, v.clone());
    }
    if let Some(p) = target.forwarded.proto {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(p));
    }
    *req.headers_mut() = headers;
    let resp = s.send_request(req).await.map_err(|e| {
        let detail = tessera_core::error_chain(&e);
        if e.is_canceled() {
            SendError::Unsent(detail)
        } else {
            SendError::Io(detail)
        }
    })?;
    Ok(Exchange {
        response: resp.map(Body::Stream),
        upgraded: None,
    })
}

fn should_retry(up: &Upstream, route: &Route, attempt: u32, deadline: Instant) -> Retry {
    if attempt >= route.retries || Instant::now() >= deadline {
        return Retry::No;
    }
    if !up.budget.try_withdraw() {
        up.metrics.budget_exhausted.fetch_add(1, Ordering::Relaxed);
        return Retry::NoBudget;
    }
    up.metrics.retries.fetch_add(1, Ordering::Relaxed);
    Retry::Yes
}

/// Whether a failed try is tried again; `NoBudget` when only the retry budget said no.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    Yes,
    No,
    NoBudget,
}

/// Headers for the upstream request: hop-by-hop ones removed (and any the client named in
/// `Connection`), the route's edits applied, `X-Forwarded-*` set, and the client's host
/// kept (HTTP/2 clients send it as `:authority`).
fn upstream_headers(
    mut h: HeaderMap,
    uri: &Uri,
    route: &Route,
    peer: &Peer,
    identity: &[HeaderName],
) -> (HeaderMap, Forwarded) {
    let mut fwd = Forwarded {
        xff: Some(peer.ip.clone()),
        proto: Some(peer.proto()),
    };
    // Most requests carry no forwarding or hop-by-hop header at all: one scan instead of
    // a removal (a hash and a probe) per name.
    if h.keys()
        .any(|k| k.as_str().starts_with("x-forwarded-") || k == header::FORWARDED)
    {
        if peer.trusted {
            // Earlier hops, extended with this one.
            if let Some(prev) = h.remove(X_FORWARDED_FOR) {
                fwd.xff = prev
                    .to_str()
                    .ok()
                    .zip(peer.ip.to_str().ok())
                    .and_then(|(prev, ip)| HeaderValue::from_str(&format!("{prev}, {ip}")).ok())
                    .or(fwd.xff);
            }
            // A trusted proxy in front (one that terminated TLS itself) says what the
            // client used.
            if h.contains_key(X_FORWARDED_PROTO) {
                fwd.proto = None;
            }
        } else {
            // A client that is not a trusted proxy does not get to name earlier hops.
            for name in [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST] {
                h.remove(name);
            }
            h.remove(header::FORWARDED);
        }
    }
    if h.keys().any(|k| is_hop_by_hop(k) || k == header::TE) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            // A client may not nominate what the gateway vouches for: the verified
            // identity, or the framing and addressing of the request.
            .filter(|n| !identity.contains(n) && *n != header::HOST && *n != header::CONTENT_LENGTH)
            .collect();
        // `te: trailers` is the one TE value that must pass (gRPC needs it).
        let keep_te = h
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        for name in HOP_BY_HOP.iter().chain(named.iter()) {
            h.remove(name);
        }
        if !keep_te {
            h.remove(header::TE);
        }
    }
    // Only absolute-form and HTTP/2 requests carry an authority in the URI.
    if let Some(a) = uri.authority()
        && !h.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        h.insert(header::HOST, v);
    }
    // The route's own edits win over the forwarding fields.
    for name in route
        .remove_request
        .iter()
        .chain(route.add_request.iter().map(|(k, _)| k))
    {
        if name == X_FORWARDED_FOR {
            fwd.xff = None;
        } else if name == X_FORWARDED_PROTO {
            fwd.proto = None;
        }
    }
    for name in &route.remove_request {
        h.remove(name);
    }
    for (k, v) in &route.add_request {
        h.insert(k.clone(), v.clone());
    }
    (h, fwd)
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The upstream agreed to switch protocols: answer the client with the 101 (its upgrade
/// headers intact) and splice the two upgraded connections together.
fn tunnel(
    upstream: String,
    client: hyper::upgrade::OnUpgrade,
    server: Upgraded,
    resp: Response<Body>,
) -> Response<Body> {
    tokio::spawn(async move {
        let client = match client.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(upstream = %upstream, error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut server_io = server.io;
        if !server.read_ahead.is_empty()
            && let Err(e) = client.write_all(&server.read_ahead).await
        {
            tracing::debug!(upstream = %upstream, error = %e, "upgraded connection ended");
            return;
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server_io).await {
            tracing::debug!(upstream = %upstream, error = %e, "upgraded connection ended");
        }
    });
    resp
}

/// Drops hop-by-hop fields from an upstream's response, in place (taking it apart and
/// back together costs two copies of the whole response).
fn downstream_response(mut resp: Response<Body>) -> Response<Body> {
    let h = resp.headers_mut();
    if h.keys().any(is_hop_by_hop) {
        for name in &HOP_BY_HOP {
            h.remove(name);
        }
    }
    resp
}

fn hash_of(on: &HashOn, headers: &HeaderMap, peer: SocketAddr) -> u64 {
    match on {
        HashOn::Header(name) => {
            let v = headers
                .get(name.as_str())
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            tessera_balance::hash_key(v)
        }
        HashOn::Cookie(name) => {
            let value = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
                .unwrap_or("");
            tessera_balance::hash_key(value.as_bytes())
        }
        HashOn::ClientIp(_) => tessera_balance::hash_key(peer.ip().to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::floor::net::{Cidr, HOP_BY_HOP, is_hop_by_hop, strip_port, unbracket};

    #[test]
    fn hop_by_hop_names_are_recognised() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for other in [
            "host",
            "te",
            "content-length",
            "x-forwarded-for",
            "upgrade-insecure-requests",
        ] {
            assert!(
                !is_hop_by_hop(&http::HeaderName::from_static(other)),
                "{other}"
            );
        }
    }

    #[test]
    fn cidr_blocks_match_their_addresses() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.255.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped IPv6");
        assert!(!c.contains(ip("::1")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        for bad in ["10.0.0.0/33", "x", "::/129", "1.2.3.4/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_ports_are_stripped() {
        assert_eq!(strip_port("shop.example.com:8080"), "shop.example.com");
        assert_eq!(strip_port("shop.example.com"), "shop.example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("host:abc"), "host:abc");
        // Endpoint addresses become TLS server names this way.
        assert_eq!(unbracket(strip_port("[::1]:443")), "::1");
        assert_eq!(unbracket(strip_port("10.0.0.1:80")), "10.0.0.1");
        assert_eq!(unbracket(strip_port("api.internal:8443")), "api.internal");
    }
}
