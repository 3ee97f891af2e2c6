//! The exporter against a real HTTP collector on a loopback port.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use tessera_trace::export::Config;
use tessera_trace::otlp::Resource;
use tessera_trace::{Exporter, Kind, Span, SpanId, Status, TraceId};
use tokio::net::TcpListener;

/// What the collector was sent: (path, content type, body).
type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A collector answering `status`, after `stall` (a collector that hangs).
async fn collector(status: u16, stall: Duration) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let s = s.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let ct = req
                            .headers()
                            .get("content-type")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        s.lock().unwrap().push((path, ct, body));
                        tokio::time::sleep(stall).await;
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/v1/traces"), seen)
}

fn config(endpoint: &str, queue: usize, batch: usize) -> Config {
    Config {
        endpoint: endpoint.parse().unwrap(),
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn spans_are_posted_as_protobuf_in_batches() {
    let (url, seen) = collector(200, Duration::ZERO).await;
    let exporter = Exporter::start(config(&url, 64, 2));
    for name in ["a", "b", "c"] {
        exporter.record(span(name));
    }
    wait_for("3 spans exported", || {
        exporter.stats().exported.load(Ordering::Relaxed) == 3
    })
    .await;
    let seen = seen.lock().unwrap();
    // A batch holds at most 2: the third went in a second post.
    assert_eq!(seen.len(), 2);
    for (path, ct, body) in seen.iter() {
        assert_eq!(path, "/v1/traces");
        assert_eq!(ct, "application/x-protobuf");
        assert!(
            body.windows(4).any(|w| w == b"test"),
            "the resource is in every post"
        );
    }
    assert_eq!(exporter.stats().dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    // The collector takes the first post and hangs: the batch task waits on it while the
    // queue (2) fills.
    let (url, seen) = collector(200, Duration::from_secs(3600)).await;
    let exporter = Exporter::start(config(&url, 2, 1));
    exporter.record(span("first"));
    wait_for("the first post", || seen.lock().unwrap().len() == 1).await;
    for _ in 0..5 {
        exporter.record(span("more"));
    }
    assert_eq!(exporter.stats().dropped.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_failing_collector_costs_the_batch_and_is_counted() {
    let (url, seen) = collector(503, Duration::ZERO).await;
    let exporter = Exporter::start(config(&url, 64, 512));
    exporter.record(span("x"));
    exporter.record(span("y"));
    wait_for("2 spans dropped", || {
        exporter.stats().dropped.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(exporter.stats().exported.load(Ordering::Relaxed), 0);
}
