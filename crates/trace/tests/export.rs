//! The exporter against a real HTTP collector on a loopback port.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tessera_testkit::otlp::Collector;
use tessera_trace::export::Config;
use tessera_trace::otlp::Resource;
use tessera_trace::{Exporter, Kind, Span, SpanId, Status, TraceId};

fn config(collector: &Collector, queue: usize, batch: usize) -> Config {
    Config {
        endpoint: format!("{}/v1/traces", collector.endpoint).parse().unwrap(),
        resource: Resource {
            attributes: vec![("service.name".into(), "test".into())],
        },
        delay: Duration::from_millis(50),
        queue,
        batch,
        timeout: Duration::from_secs(60),
    }
}

fn span(name: &'static str) -> Span {
    let now = SystemTime::now();
    Span {
        trace_id: TraceId::random(),
        span_id: SpanId::random(),
        parent: None,
        tracestate: None,
        name: name.into(),
        kind: Kind::Server,
        start: now,
        end: now,
        attributes: vec![("http.request.method", "GET".into())],
        events: vec![],
        status: Status::Unset,
    }
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    tessera_testkit::wait_until(what, Duration::from_secs(60), || {
        let ok = cond();
        async move { ok }
    })
    .await;
}

#[tokio::test]
async fn spans_are_posted_as_protobuf_in_batches() {
    let collector = Collector::start().await;
    let exporter = Exporter::start(config(&collector, 64, 2));
    for name in ["a", "b", "c"] {
        exporter.record(span(name));
    }
    wait_for("3 spans exported", || {
        exporter.stats().exported.load(Ordering::Relaxed) == 3
    })
    .await;
    let posts = collector.posts();
    // A batch holds at most 2: the third went in a second post.
    assert_eq!(posts.len(), 2);
    for p in &posts {
        assert_eq!(p.path, "/v1/traces");
        assert_eq!(p.content_type, "application/x-protobuf");
    }
    let spans = collector.spans();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    for s in &spans {
        assert_eq!(s.service, "test");
        assert_eq!(s.kind, 2);
        assert_eq!(s.attributes["http.request.method"], "GET");
        assert_eq!(
            (s.trace_id.len(), s.span_id.len(), s.parent_id.len()),
            (32, 16, 0)
        );
    }
    assert_eq!(exporter.stats().dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    // The collector takes the first post and hangs: the batch task waits on it while the
    // queue (2) fills.
    let collector = Collector::answering(None).await;
    let exporter = Exporter::start(config(&collector, 2, 1));
    exporter.record(span("first"));
    wait_for("the first post", || collector.posts().len() == 1).await;
    for _ in 0..5 {
        exporter.record(span("more"));
    }
    assert_eq!(exporter.stats().dropped.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_failing_collector_costs_the_batch_and_is_counted() {
    let collector = Collector::answering(Some(503)).await;
    let exporter = Exporter::start(config(&collector, 64, 512));
    exporter.record(span("x"));
    exporter.record(span("y"));
    wait_for("2 spans dropped", || {
        exporter.stats().dropped.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(collector.posts().len(), 1);
    assert_eq!(exporter.stats().exported.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_flush_posts_what_is_queued_without_waiting_out_the_delay() {
    let collector = Collector::start().await;
    let mut config = config(&collector, 64, 512);
    config.delay = Duration::from_secs(3600);
    let exporter = Exporter::start(config);
    // Nothing queued: answered at once.
    exporter.flush(Duration::from_secs(60)).await;
    exporter.record(span("a"));
    exporter.record(span("b"));
    exporter.flush(Duration::from_secs(60)).await;
    assert_eq!(exporter.stats().exported.load(Ordering::Relaxed), 2);
    let names: Vec<String> = collector.spans().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "b"]);
}
