//! The admin server (default `127.0.0.1:8081`): health, readiness, Prometheus metrics,
//! the live route table and upstream state, and config reload.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;

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
        (&Method::GET, "/readyz") if gw.draining.load(Ordering::Acquire) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining: stopping after its drain delay\n".into(),
        ),
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
            tessera_metrics::CONTENT_TYPE,
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
    use tessera_metrics::Kind::{Counter, Gauge, Histogram};
    let table = gw.proxy.table.load();
    let mut o = tessera_metrics::Text::new();
    let upstream_of = |r: &crate::policy::routes::Route| {
        r.upstream
            .as_ref()
            .map(|u| u.name.clone())
            .unwrap_or_default()
    };
    o.family(
        "tessera_gateway_requests_total",
        Counter,
        "Requests answered, by route, upstream and status class.",
    );
    for r in &table.routes {
        let up = upstream_of(r);
        r.metrics.samples(
            &mut o,
            "tessera_gateway_requests_total",
            &[("route", &r.name), ("upstream", &up)],
        );
    }
    o.family(
        "tessera_gateway_request_duration_seconds",
        Histogram,
        "Time to answer, by route and upstream.",
    );
    for r in &table.routes {
        let up = upstream_of(r);
        o.histogram(
            "tessera_gateway_request_duration_seconds",
            &[("route", &r.name), ("upstream", &up)],
            &r.metrics.duration,
        );
    }
    if let Some((_, redis)) = &table.redis {
        o.single(
            "tessera_gateway_redis_up",
            Gauge,
            "Whether shared rate limits reach Redis (else they are decided locally).",
            u8::from(redis.is_up()),
        );
        o.single(
            "tessera_gateway_redis_failures_total",
            Counter,
            "Rate-limit calls Redis did not answer, decided locally.",
            redis.failures.load(Ordering::Relaxed),
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
        let metric = format!("tessera_gateway_{metric}");
        o.family(&metric, Counter, &format!("{help}."));
        for n in &names {
            o.sample(
                &metric,
                &[("upstream", n)],
                get(&table.upstreams[*n].metrics),
            );
        }
    }
    o.family(
        "tessera_gateway_upstream_endpoints",
        Gauge,
        "Endpoints known, and how many are ejected.",
    );
    for n in &names {
        let u = &table.upstreams[*n];
        let snap = u.feed.snapshot.load();
        let ejected = snap.outliers.iter().filter(|o| o.is_ejected()).count();
        o.sample(
            "tessera_gateway_upstream_endpoints",
            &[("upstream", n), ("state", "known")],
            snap.set.len(),
        );
        o.sample(
            "tessera_gateway_upstream_endpoints",
            &[("upstream", n), ("state", "ejected")],
            ejected,
        );
    }
    o.family(
        "tessera_gateway_upstream_breaker_state",
        Gauge,
        "Breaker state: 0 closed, 1 half-open, 2 open.",
    );
    for n in &names {
        if let Some(b) = &table.upstreams[*n].breaker {
            o.sample(
                "tessera_gateway_upstream_breaker_state",
                &[("upstream", n)],
                b.state().gauge(),
            );
        }
    }
    o.family(
        "tessera_gateway_registry_up",
        Gauge,
        "Whether discovery reaches the registry, per upstream.",
    );
    for n in &names {
        let u = &table.upstreams[*n];
        if !u.feed.service.is_empty() {
            o.sample(
                "tessera_gateway_registry_up",
                &[("upstream", n)],
                u8::from(u.feed.registry_ok.load(Ordering::Relaxed)),
            );
        }
    }
    o.single(
        "tessera_gateway_idle_buffer_releases_total",
        Counter,
        "Keep-alive connections that gave their buffers back after a second idle (process-wide).",
        crate::protocol::h1::server::IDLE_RELEASES.load(Ordering::Relaxed),
    );
    if let Some(tracer) = &gw.proxy.tracer {
        tracer.render_metrics(&mut o);
    }
    if let Some(workers) = gw.worker_connections.get() {
        o.family(
            "tessera_gateway_worker_connections_total",
            Counter,
            "Client connections accepted, by worker thread.",
        );
        for (i, n) in workers.iter().enumerate() {
            o.sample(
                "tessera_gateway_worker_connections_total",
                &[("worker", &i.to_string())],
                n.load(Ordering::Relaxed),
            );
        }
    }
    o.single(
        "tessera_gateway_config_reloads_total",
        Counter,
        "Config reloads applied.",
        gw.reloads.load(Ordering::Relaxed),
    );
    o.finish()
}
