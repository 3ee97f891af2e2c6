//! The admin server (default `127.0.0.1:8081`): health, readiness, Prometheus metrics,
//! the live route table and upstream state, and config reload.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;

use crate::floor::metrics::label;
use crate::protocol::h1::body::Body;
use crate::server::Shared;

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Body::bytes(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r
}

fn json_resp(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    text(status, "application/json", v.to_string())
}

pub async fn handle(gw: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            let table = gw.proxy.table.load();
            let waiting: Vec<&str> = table
                .upstreams
                .values()
                .filter(|u| !u.feed.ready.load(Ordering::Acquire))
                .map(|u| u.name.as_str())
                .collect();
            if waiting.is_empty() {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("waiting for discovery of: {}\n", waiting.join(", ")),
                )
            }
        }
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render_metrics(&gw),
        ),
        (&Method::GET, "/admin/routes") => {
            let table = gw.proxy.table.load();
            let routes: Vec<_> = table.routes.iter().map(|r| r.describe.clone()).collect();
            json_resp(StatusCode::OK, json!(routes))
        }
        (&Method::GET, "/admin/upstreams") => json_resp(StatusCode::OK, upstreams(&gw)),
        (&Method::GET, "/admin/tls") => match &gw.certs {
            Some(certs) => json_resp(StatusCode::OK, certs.describe()),
            None => json_resp(
                StatusCode::NOT_FOUND,
                json!({"error": "TLS is not configured", "code": "not_found"}),
            ),
        },
        (&Method::POST, "/admin/reload") => match gw.reload() {
            Ok(()) => json_resp(StatusCode::OK, json!({"reloaded": true})),
            Err(e) => json_resp(
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string(), "code": "invalid_config"}),
            ),
        },
        (method, path) => match ENDPOINTS.iter().find(|(p, _)| *p == path) {
            Some((_, allow)) => {
                let mut r = json_resp(
                    StatusCode::METHOD_NOT_ALLOWED,
                    json!({"error": format!("{method} is not allowed on {path} (see Allow)"),
                           "code": "method_not_allowed"}),
                );
                r.headers_mut()
                    .insert(header::ALLOW, http::HeaderValue::from_static(allow));
                r
            }
            None => json_resp(
                StatusCode::NOT_FOUND,
                json!({"error": format!("no admin endpoint {path}"), "code": "not_found"}),
            ),
        },
    }
}

/// The admin endpoints and their methods, for 405's `Allow`.
const ENDPOINTS: [(&str, &str); 7] = [
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/metrics", "GET"),
    ("/admin/routes", "GET"),
    ("/admin/upstreams", "GET"),
    ("/admin/tls", "GET"),
    ("/admin/reload", "POST"),
];

fn upstreams(gw: &Shared) -> serde_json::Value {
    let table = gw.proxy.table.load();
    let mut out = serde_json::Map::new();
    let mut names: Vec<&String> = table.upstreams.keys().collect();
    names.sort();
    for name in names {
        let u = &table.upstreams[name];
        let snap = u.feed.snapshot.load();
        let endpoints: Vec<_> = snap
            .set
            .endpoints
            .iter()
            .zip(&snap.outliers)
            .map(|(e, o)| {
                json!({
                    "address": e.addr,
                    "weight": e.weight,
                    "in_flight": e.load.in_flight(),
                    "ewma_ms": e.load.ewma_nanos() / 1e6,
                    "ejected": o.is_ejected(),
                    "ejections": o.ejections(),
                })
            })
            .collect();
        out.insert(
            name.clone(),
            json!({
                "service": if u.feed.service.is_empty() { None } else { Some(&u.feed.service) },
                "policy": u.balancer.policy,
                "protocol": u.protocol,
                "registry_ok": u.feed.registry_ok.load(Ordering::Relaxed),
                "breaker": u.breaker.as_ref().map(|b| b.state()),
                "in_flight": u.bulkhead.in_flight(),
                "endpoints": endpoints,
            }),
        );
    }
    serde_json::Value::Object(out)
}

type CounterFn = fn(&crate::policy::upstream::UpstreamMetrics) -> u64;

fn render_metrics(gw: &Shared) -> String {
    let table = gw.proxy.table.load();
    let mut o = String::with_capacity(8 * 1024);
    o.push_str(
        "# HELP tessera_gateway_requests_total Requests answered, by route and status class.\n",
    );
    o.push_str("# TYPE tessera_gateway_requests_total counter\n");
    for r in &table.routes {
        for (i, c) in r.metrics.by_class.iter().enumerate() {
            let _ = writeln!(
                o,
                "tessera_gateway_requests_total{{route=\"{}\",upstream=\"{}\",status=\"{}xx\"}} {}",
                label(&r.name),
                label(r.upstream.as_ref().map(|u| u.name.as_str()).unwrap_or("")),
                i + 1,
                c.load(Ordering::Relaxed)
            );
        }
    }
    o.push_str("# HELP tessera_gateway_request_duration_seconds Time to answer, by route.\n");
    o.push_str("# TYPE tessera_gateway_request_duration_seconds histogram\n");
    for r in &table.routes {
        r.metrics.latency.render(
            &mut o,
            "tessera_gateway_request_duration_seconds",
            &format!("route=\"{}\"", label(&r.name)),
        );
    }
    if let Some((_, redis)) = &table.redis {
        let _ = write!(
            o,
            "# HELP tessera_gateway_redis_up Whether shared rate limits reach Redis (else they are decided locally).\n\
             # TYPE tessera_gateway_redis_up gauge\ntessera_gateway_redis_up {}\n\
             # HELP tessera_gateway_redis_failures_total Rate-limit calls Redis did not answer, decided locally.\n\
             # TYPE tessera_gateway_redis_failures_total counter\ntessera_gateway_redis_failures_total {}\n",
            u8::from(redis.is_up()),
            redis.failures.load(Ordering::Relaxed)
        );
    }
    let mut names: Vec<&String> = table.upstreams.keys().collect();
    names.sort();
    let counters: [(&str, &str, CounterFn); 6] = [
        (
            "upstream_requests_total",
            "Requests sent to the upstream (first tries)",
            |m| m.requests.load(Ordering::Relaxed),
        ),
        ("upstream_retries_total", "Retries made", |m| {
            m.retries.load(Ordering::Relaxed)
        }),
        (
            "upstream_retry_budget_exhausted_total",
            "Retries refused by the retry budget",
            |m| m.budget_exhausted.load(Ordering::Relaxed),
        ),
        (
            "upstream_ejections_total",
            "Endpoints ejected by outlier detection",
            |m| m.ejections.load(Ordering::Relaxed),
        ),
        (
            "upstream_breaker_rejections_total",
            "Requests refused by an open breaker",
            |m| m.breaker_rejections.load(Ordering::Relaxed),
        ),
        (
            "upstream_bulkhead_rejections_total",
            "Requests refused by a full bulkhead",
            |m| m.bulkhead_rejections.load(Ordering::Relaxed),
        ),
    ];
    for (metric, help, get) in counters {
        let _ = writeln!(
            o,
            "# HELP tessera_gateway_{metric} {help}.\n# TYPE tessera_gateway_{metric} counter"
        );
        for n in &names {
            let _ = writeln!(
                o,
                "tessera_gateway_{metric}{{upstream=\"{}\"}} {}",
                label(n),
                get(&table.upstreams[*n].metrics)
            );
        }
    }
    o.push_str("# HELP tessera_gateway_upstream_endpoints Endpoints known, and how many are ejected.\n# TYPE tessera_gateway_upstream_endpoints gauge\n");
    for n in &names {
        let u = &table.upstreams[*n];
        let snap = u.feed.snapshot.load();
        let ejected = snap.outliers.iter().filter(|o| o.is_ejected()).count();
        let _ = writeln!(
            o,
            "tessera_gateway_upstream_endpoints{{upstream=\"{}\",state=\"known\"}} {}",
            label(n),
            snap.set.len()
        );
        let _ = writeln!(
            o,
            "tessera_gateway_upstream_endpoints{{upstream=\"{}\",state=\"ejected\"}} {ejected}",
            label(n)
        );
    }
    o.push_str("# HELP tessera_gateway_upstream_breaker_state Breaker state: 0 closed, 1 half-open, 2 open.\n# TYPE tessera_gateway_upstream_breaker_state gauge\n");
    for n in &names {
        if let Some(b) = &table.upstreams[*n].breaker {
            let v = match b.state() {
                tessera_resilience::State::Closed => 0,
                tessera_resilience::State::HalfOpen => 1,
                tessera_resilience::State::Open => 2,
            };
            let _ = writeln!(
                o,
                "tessera_gateway_upstream_breaker_state{{upstream=\"{}\"}} {v}",
                label(n)
            );
        }
    }
    o.push_str("# HELP tessera_gateway_registry_up Whether discovery reaches the registry, per upstream.\n# TYPE tessera_gateway_registry_up gauge\n");
    for n in &names {
        let u = &table.upstreams[*n];
        if !u.feed.service.is_empty() {
            let up = u.feed.registry_ok.load(Ordering::Relaxed) as u8;
            let _ = writeln!(
                o,
                "tessera_gateway_registry_up{{upstream=\"{}\"}} {up}",
                label(n)
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP tessera_gateway_idle_buffer_releases_total Keep-alive connections that gave their buffers back after a second idle (process-wide).\n# TYPE tessera_gateway_idle_buffer_releases_total counter\ntessera_gateway_idle_buffer_releases_total {}",
        crate::protocol::h1::server::IDLE_RELEASES.load(Ordering::Relaxed)
    );
    if let Some(tracer) = &gw.proxy.tracer {
        let stats = tracer.stats();
        let _ = writeln!(
            o,
            "# HELP tessera_trace_spans_exported_total Spans the collector accepted.\n# TYPE tessera_trace_spans_exported_total counter\ntessera_trace_spans_exported_total {}\n# HELP tessera_trace_spans_dropped_total Spans lost: the export queue was full or the collector failed.\n# TYPE tessera_trace_spans_dropped_total counter\ntessera_trace_spans_dropped_total {}",
            stats.exported.load(Ordering::Relaxed),
            stats.dropped.load(Ordering::Relaxed)
        );
    }
    if let Some(workers) = gw.worker_connections.get() {
        o.push_str("# HELP tessera_gateway_worker_connections_total Client connections accepted, by worker thread.\n# TYPE tessera_gateway_worker_connections_total counter\n");
        for (i, n) in workers.iter().enumerate() {
            let _ = writeln!(
                o,
                "tessera_gateway_worker_connections_total{{worker=\"{i}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP tessera_gateway_config_reloads_total Config reloads applied.\n# TYPE tessera_gateway_config_reloads_total counter\ntessera_gateway_config_reloads_total {}",
        gw.reloads.load(Ordering::Relaxed)
    );
    o
}
