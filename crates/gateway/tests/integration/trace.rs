//! Traces through the gateway, exported to a real OTLP/HTTP collector: the caller's
//! trace continues, each try is a client span under the request's server span, the
//! upstream's parent is the try, and what the sampler does not record passes untouched.

use http::{Method, StatusCode};
use tessera_testkit::otlp::{Collector, SeenSpan};
use tessera_trace::{Sampler, Tracer};

use crate::support::{TestGateway, Upstream, wait_for};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn tracer(collector: &Collector, sampler: Sampler) -> Tracer {
    collector.tracer("gw", sampler)
}

fn gateway_config(endpoints: &[&Upstream], extra: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    format!(
        "[[routes]]\nname = \"shop\"\nupstream = \"u\"\n{extra}\n[upstreams.u]\nendpoints = [{}]\npolicy = \"round_robin\"\nbreaker = {{ enabled = false }}\noutlier = {{ enabled = false }}\n",
        eps.join(", ")
    )
}

/// The spans of `trace`, once `n` have arrived.
async fn spans_of(collector: &Collector, trace: &str, n: usize) -> Vec<SeenSpan> {
    wait_for("the spans to be exported", || async {
        collector
            .spans()
            .iter()
            .filter(|s| s.trace_id == trace)
            .count()
            >= n
    })
    .await;
    collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace)
        .collect()
}

/// What the upstream received as `traceparent`, split into its four fields.
fn seen_traceparent(body: &serde_json::Value) -> Vec<String> {
    body["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent upstream: {body}"))
        .split('-')
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_request_continues_the_callers_trace_with_a_span_per_hop() {
    let collector = Collector::start().await;
    let up = Upstream::start("a").await;
    let gw = TestGateway::start_traced(
        &gateway_config(&[&up], ""),
        tracer(&collector, Sampler::default()),
    )
    .await;
    let parent = format!("00-{TRACE}-{CALLER}-01");
    let (status, _, body) = gw
        .http
        .send(
            Method::GET,
            "/cart?id=1",
            &[("traceparent", &parent), ("tracestate", "vendor=abc")],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let upstream_saw = seen_traceparent(&body);
    assert_eq!(upstream_saw[0], "00");
    assert_eq!(
        upstream_saw[1], TRACE,
        "the upstream is in the caller's trace"
    );
    assert_ne!(
        upstream_saw[2], CALLER,
        "the upstream's parent is the gateway's try"
    );
    assert_eq!(upstream_saw[3], "01");
    assert_eq!(body["headers"]["tracestate"], "vendor=abc");

    let spans = spans_of(&collector, TRACE, 2).await;
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    let client = spans.iter().find(|s| s.kind == 3).expect("a client span");
    assert_eq!(server.parent_id, CALLER);
    assert_eq!(server.name, "GET shop");
    assert_eq!(server.service, "gw");
    assert_eq!(server.attributes["http.request.method"], "GET");
    assert_eq!(server.attributes["url.path"], "/cart");
    assert_eq!(server.attributes["url.scheme"], "http");
    assert_eq!(server.attributes["http.response.status_code"], "200");
    assert_eq!(server.attributes["http.route"], "shop");
    assert_eq!(server.attributes["client.address"], "127.0.0.1");
    assert_eq!(client.parent_id, server.span_id);
    assert_eq!(
        client.span_id, upstream_saw[2],
        "the try is the upstream's parent"
    );
    assert_eq!(client.name, "GET");
    assert_eq!(client.attributes["server.address"], "127.0.0.1");
    assert_eq!(client.attributes["server.port"], up.addr.port().to_string());
    assert_eq!(client.attributes["http.response.status_code"], "200");
    assert!(!client.attributes.contains_key("http.request.resend_count"));
    assert_eq!((server.status_code, client.status_code), (0, 0));
}

#[tokio::test]
async fn a_retry_is_a_second_client_span_under_the_same_request() {
    let collector = Collector::start().await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    a.set_status(503);
    let gw = TestGateway::start_traced(
        &gateway_config(&[&a, &b], "retries = { attempts = 2, backoff = \"1ms\" }"),
        tracer(&collector, Sampler::default()),
    )
    .await;
    // Round robin from the first endpoint: a answers 503, the retry goes to b.
    let mut traced = None;
    for i in 0..4 {
        let trace = format!("{TRACE:.30}{i:02x}");
        let parent = format!("00-{trace}-{CALLER}-01");
        let (status, _, body) = gw
            .http
            .send(Method::GET, "/", &[("traceparent", &parent)], "")
            .await;
        assert_eq!(status, StatusCode::OK);
        if body["id"] == "b" && a.hits() > 0 {
            traced = Some(trace);
            break;
        }
    }
    let trace = traced.expect("a request that was retried");
    let spans = spans_of(&collector, &trace, 3).await;
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    let mut tries: Vec<&SeenSpan> = spans.iter().filter(|s| s.kind == 3).collect();
    tries.sort_by_key(|s| s.attributes.get("http.request.resend_count").cloned());
    assert_eq!(tries.len(), 2, "{spans:?}");
    assert!(tries.iter().all(|t| t.parent_id == server.span_id));
    // No resend count sorts first.
    let (first, second) = (tries[0], tries[1]);
    assert_eq!(first.attributes["http.response.status_code"], "503");
    assert_eq!(first.attributes["error.type"], "503");
    assert_eq!(first.status_code, 2);
    assert!(!first.attributes.contains_key("http.request.resend_count"));
    assert_eq!(second.attributes["http.request.resend_count"], "1");
    assert_eq!(second.attributes["http.response.status_code"], "200");
    assert_eq!(second.attributes["server.port"], b.addr.port().to_string());
    assert_eq!(server.attributes["http.response.status_code"], "200");
}

#[tokio::test]
async fn what_is_not_recorded_passes_untouched_and_a_root_starts_a_trace() {
    let collector = Collector::start().await;
    let up = Upstream::start("a").await;
    // Follows the caller; records no new trace of its own.
    let sampler = Sampler::parse(Some("parentbased_always_off"), None).unwrap();
    let gw =
        TestGateway::start_traced(&gateway_config(&[&up], ""), tracer(&collector, sampler)).await;
    let unsampled = format!("00-{TRACE}-{CALLER}-00");
    let (_, _, body) = gw
        .http
        .send(Method::GET, "/", &[("traceparent", &unsampled)], "")
        .await;
    assert_eq!(body["headers"]["traceparent"], unsampled.as_str());
    let (_, _, body) = gw.http.get("/").await;
    assert!(body["headers"].get("traceparent").is_none(), "{body}");
    // A recorded one after them: once its spans are in, nothing else came.
    let other = "11111111111111111111111111111111";
    let sampled = format!("00-{other}-{CALLER}-01");
    gw.http
        .send(Method::GET, "/", &[("traceparent", &sampled)], "")
        .await;
    spans_of(&collector, other, 2).await;
    assert!(collector.spans().iter().all(|s| s.trace_id == other));

    // always_on starts a trace for a request that brings none.
    let collector = Collector::start().await;
    let sampler = Sampler::parse(Some("always_on"), None).unwrap();
    let gw =
        TestGateway::start_traced(&gateway_config(&[&up], ""), tracer(&collector, sampler)).await;
    let (_, _, body) = gw.http.get("/").await;
    let saw = seen_traceparent(&body);
    let spans = spans_of(&collector, &saw[1], 2).await;
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(server.parent_id, "", "a root span");
    assert_eq!(saw[3], "01");
    // A refused request is traced too.
    let refused = "22222222222222222222222222222222";
    let parent = format!("00-{refused}-{CALLER}-01");
    let (status, _, _) = gw
        .http
        .send(Method::GET, "/%2e%2e/x", &[("traceparent", &parent)], "")
        .await;
    assert!(status.is_client_error(), "{status}");
    let spans = spans_of(&collector, refused, 1).await;
    assert_eq!(spans.len(), 1, "no upstream try: {spans:?}");
    assert_eq!(spans[0].name, "GET", "no route: {spans:?}");
    assert_eq!(
        spans[0].attributes["http.response.status_code"],
        status.as_u16().to_string()
    );
    let (_, _, m) = gw.admin_http().get("/metrics").await;
    let m = m.as_str().unwrap();
    assert!(m.contains("tessera_trace_spans_dropped_total 0"), "{m}");
    tessera_testkit::prometheus::check_metrics(m);
}

/// The gateway's own decisions show in the trace as span events: an ejection and a
/// breaker opening on the try that caused them, a retry the budget refused on the try
/// that is not retried, and a refusal (breaker open, rate limit) on the request's span.
#[tokio::test]
async fn the_gateways_own_decisions_are_span_events() {
    let collector = Collector::start().await;
    let a = Upstream::start("a").await;
    a.set_status(503);
    let config = format!(
        r#"
[[routes]]
name = "limited"
path = {{ prefix = "/limited" }}
upstream = "ok"
rate_limit = {{ rate = 0.001, burst = 1 }}
[[routes]]
name = "failing"
upstream = "u"
retries = {{ attempts = 2, backoff = "1ms" }}
[upstreams.ok]
endpoints = ["{a}"]
[upstreams.u]
endpoints = ["{a}"]
breaker = {{ min_calls = 1, error_rate = 0.5, open_for = "1h" }}
outlier = {{ consecutive_errors = 1, max_ejected_percent = 100 }}
retry_budget = {{ ratio = 0.0, min_per_sec = 0 }}
"#,
        a = a.addr
    );
    let gw = TestGateway::start_traced(&config, tracer(&collector, Sampler::default())).await;
    let send = |trace: &'static str, path: &'static str| {
        let parent = format!("00-{trace}-{CALLER}-01");
        let http = &gw.http;
        async move {
            http.send(Method::GET, path, &[("traceparent", &parent)], "")
                .await
                .0
        }
    };
    // The first failure ejects the endpoint and opens the breaker; the budget (0) refuses
    // the retry.
    let first = "11111111111111111111111111111111";
    assert_eq!(send(first, "/").await, StatusCode::SERVICE_UNAVAILABLE);
    let spans = spans_of(&collector, first, 2).await;
    let tried = spans.iter().find(|s| s.kind == 3).unwrap();
    for e in [
        "endpoint ejected",
        "circuit breaker opened",
        "retry budget exhausted",
    ] {
        assert!(tried.events.iter().any(|n| n == e), "{e}: {tried:?}");
    }
    // Now the breaker refuses: no try, an event on the request's span.
    let second = "22222222222222222222222222222222";
    assert_eq!(send(second, "/").await, StatusCode::SERVICE_UNAVAILABLE);
    let spans = spans_of(&collector, second, 1).await;
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(spans[0].events, ["circuit breaker open"]);
    // The rate limit allows one request, then refuses.
    let third = "33333333333333333333333333333333";
    send("44444444444444444444444444444444", "/limited").await;
    assert_eq!(send(third, "/limited").await, StatusCode::TOO_MANY_REQUESTS);
    let spans = spans_of(&collector, third, 1).await;
    assert_eq!(spans[0].events, ["rate limit exceeded"], "{spans:?}");
}
