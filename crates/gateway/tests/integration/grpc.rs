//! gRPC callers through the gateway: deadlines from `grpc-timeout`, retries by gRPC
//! status, against upstreams that speak gRPC's framing over h2c.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::TestGateway;

/// A gRPC upstream that answers each call with `code` (0: one message, then OK in the
/// trailers; else the status alone, trailers-only), or never, when it `hangs`.
struct GrpcUpstream {
    addr: SocketAddr,
    code: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    /// The last request's `grpc-timeout` and body.
    seen: Arc<Mutex<(Option<String>, Bytes)>>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcUpstream {
    async fn start(code: u16, hangs: bool) -> GrpcUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let code = Arc::new(AtomicU16::new(code));
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new((None, Bytes::new())));
        let (c, h, s) = (code.clone(), hits.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, h, s) = (c.clone(), h.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (c, h, s) = (c.clone(), h.clone(), s.clone());
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            let timeout = req
                                .headers()
                                .get("grpc-timeout")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            *s.lock().unwrap() = (timeout, body.clone());
                            if hangs {
                                std::future::pending::<()>().await;
                            }
                            let code = c.load(Ordering::SeqCst);
                            let mut resp = http::Response::builder()
                                .header("content-type", "application/grpc");
                            let body = if code == 0 {
                                // The request's message echoed back.
                                let mut trailers = HeaderMap::new();
                                trailers.insert("grpc-status", "0".parse().unwrap());
                                Full::new(body)
                                    .with_trailers(async move { Some(Ok(trailers)) })
                                    .boxed()
                            } else {
                                resp = resp
                                    .header("grpc-status", code.to_string())
                                    .header("grpc-message", "from the upstream");
                                Full::new(Bytes::new()).boxed()
                            };
                            Ok::<_, Infallible>(resp.body(body).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        GrpcUpstream {
            addr,
            code,
            hits,
            seen,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One gRPC message frame.
fn message(payload: &[u8]) -> Bytes {
    let mut b = vec![0];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    Bytes::from(b)
}

/// What a gRPC caller sees: the status (from the trailers, or the headers of a
/// trailers-only answer), its message, and the body.
struct Answer {
    status: String,
    message: String,
    body: Bytes,
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::combinators::BoxBody<Bytes, Infallible>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A unary call as grpcio sends one: HTTP/2, a body of unknown length (no
/// `content-length`), so the gateway streams it.
async fn call(c: &Client, gw: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let frame = message(b"ping");
    let body = StreamBody::new(futures_stream(frame)).boxed();
    let mut req = http::Request::post(format!("http://{gw}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c.request(req.body(body).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let head = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |n: &str| {
        trailers
            .get(n)
            .or(head.get(n))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    Answer {
        status: field("grpc-status"),
        message: field("grpc-message"),
        body: collected.to_bytes(),
    }
}

/// One data frame, then the end: a stream whose length the body does not announce.
fn futures_stream(
    data: Bytes,
) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    tokio_stream::iter([Ok(Frame::data(data))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_retried_elsewhere_and_other_statuses_are_not() {
    let good = GrpcUpstream::start(0, false).await;
    let bad = GrpcUpstream::start(14, false).await;
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
path = {{ prefix = "/demo.Echo/" }}
upstream = "echo"
[[routes]]
path = {{ prefix = "/demo.Busy/" }}
upstream = "echo"
retries = {{ attempts = 2, grpc_retry_on = ["unavailable", "resource_exhausted"] }}
[upstreams.echo]
endpoints = ["{}", "{}"]
protocol = "h2c"
# Each endpoint in turn, so calls meet the bad one first half the time.
policy = "round_robin"
# Every call here meets the bad endpoint now and then, by design.
[upstreams.echo.outlier]
enabled = false
[upstreams.echo.breaker]
enabled = false
"#,
        good.addr, bad.addr
    ))
    .await;
    let c = client();

    // UNAVAILABLE (trailers-only) is retried on the other endpoint, though a gRPC call
    // is a POST: every call succeeds, with its message through, and some met the bad
    // endpoint first.
    for _ in 0..20 {
        let a = call(&c, gw.addr, "/demo.Echo/Say", &[]).await;
        assert_eq!(a.status, "0", "{}", a.message);
        assert_eq!(a.body, message(b"ping"));
    }
    assert!(bad.hits() > 0, "the bad endpoint was never tried");
    assert_eq!(good.hits(), 20);
    let (_, body) = good.seen.lock().unwrap().clone();
    assert_eq!(
        body,
        message(b"ping"),
        "the retried call carried its message"
    );

    // INVALID_ARGUMENT is the callee's answer: passed on, never retried.
    bad.code.store(3, Ordering::SeqCst);
    let before = good.hits() + bad.hits();
    let mut refused = 0;
    for _ in 0..20 {
        let a = call(&c, gw.addr, "/demo.Echo/Say", &[]).await;
        if a.status == "3" {
            assert_eq!(a.message, "from the upstream");
            refused += 1;
        } else {
            assert_eq!(a.status, "0");
        }
    }
    assert!(refused > 0);
    assert_eq!(good.hits() + bad.hits() - before, 20, "one try per call");

    // A route that lists RESOURCE_EXHAUSTED retries it too.
    bad.code.store(8, Ordering::SeqCst);
    for _ in 0..10 {
        let a = call(&c, gw.addr, "/demo.Busy/Say", &[]).await;
        assert_eq!(a.status, "0", "{}", a.message);
    }
    let a = call(&c, gw.addr, "/demo.Echo/Say", &[]).await;
    assert!(a.status == "0" || a.status == "8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_caps_the_route_deadline_and_travels_upstream() {
    let slow = GrpcUpstream::start(0, true).await;
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
path = {{ prefix = "/demo.Slow/" }}
upstream = "slow"
timeout = "60s"
[upstreams.slow]
endpoints = ["{}"]
protocol = "h2c"
"#,
        slow.addr
    ))
    .await;
    let c = client();
    let a = call(&c, gw.addr, "/demo.Slow/Wait", &[("grpc-timeout", "1S")]).await;
    assert_eq!(a.status, "4", "DEADLINE_EXCEEDED: {}", a.message);
    assert!(a.message.contains("1s"), "{}", a.message);
    assert_eq!(slow.hits(), 1, "a deadline is not retried");
    let (sent, _) = slow.seen.lock().unwrap().clone();
    let sent = sent.expect("grpc-timeout upstream");
    let left = tessera_core::grpc::parse_timeout(sent.as_bytes()).unwrap();
    assert!(
        left <= Duration::from_secs(1) && left > Duration::ZERO,
        "{sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_calls_from_http1_are_translated_both_ways() {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    let echo = GrpcUpstream::start(0, false).await;
    // A port nothing listens on.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
path = {{ prefix = "/demo.Echo/" }}
upstream = "echo"
grpc_web = true
[[routes]]
path = {{ prefix = "/demo.Gone/" }}
upstream = "gone"
grpc_web = true
[upstreams.echo]
endpoints = ["{}"]
protocol = "h2c"
[upstreams.gone]
endpoints = ["{}"]
protocol = "h2c"
"#,
        echo.addr, gone
    ))
    .await;
    let trailer = b"\x80\0\0\0\x10grpc-status: 0\r\n";
    let mut want = message(b"ping").to_vec();
    want.extend_from_slice(trailer);

    // Binary, as a browser's fetch sends it over HTTP/1.1.
    let (s, h, body) = post_http1(
        gw.addr,
        "/demo.Echo/Say",
        "application/grpc-web+proto",
        message(b"ping"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/grpc-web+proto");
    let (_, got) = echo.seen.lock().unwrap().clone();
    assert_eq!(got, message(b"ping"), "the upstream got plain gRPC");
    assert_eq!(&body[..], &want[..]);

    // Text: base64 both ways.
    let text = Bytes::from(STANDARD.encode(message(b"ping")));
    let (s, h, body) =
        post_http1(gw.addr, "/demo.Echo/Say", "application/grpc-web-text", text).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/grpc-web-text+proto");
    assert_eq!(STANDARD.decode(&body).unwrap(), want);

    // The gateway's own refusal, in gRPC-Web's terms.
    let (s, h, _) = gw
        .http
        .send(
            http::Method::POST,
            "/demo.Gone/Say",
            &[("content-type", "application/grpc-web+proto")],
            message(b"ping"),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/grpc-web+proto");
    assert_eq!(h["grpc-status"], "14");

    // Text that is not base64 is the caller's mistake.
    let (s, h, _) = gw
        .http
        .send(
            http::Method::POST,
            "/demo.Echo/Say",
            &[("content-type", "application/grpc-web-text")],
            Bytes::from_static(b"%%%%"),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(h["grpc-status"], "3", "INVALID_ARGUMENT");
}

/// An HTTP/1.1 POST: the answer's status, head and body bytes.
async fn post_http1(
    gw: SocketAddr,
    path: &str,
    content_type: &str,
    body: Bytes,
) -> (u16, HeaderMap, Bytes) {
    let c = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{gw}{path}"))
        .header("content-type", content_type)
        .header("x-grpc-web", "1")
        .body(Full::new(body))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let (s, h) = (resp.status().as_u16(), resp.headers().clone());
    (s, h, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_is_traced_as_rpc_spans() {
    let collector = tessera_testkit::otlp::Collector::start().await;
    let up = GrpcUpstream::start(5, false).await;
    let gw = TestGateway::start_traced(
        &format!(
            r#"
[[routes]]
path = {{ prefix = "/demo.Echo/" }}
upstream = "echo"
[upstreams.echo]
endpoints = ["{}"]
protocol = "h2c"
"#,
            up.addr
        ),
        collector.tracer("gw", tessera_trace::Sampler::default()),
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let a = call(
        &client(),
        gw.addr,
        "/demo.Echo/Find",
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(a.status, "5", "NOT_FOUND from the upstream");
    let spans = || {
        collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace)
            .collect::<Vec<_>>()
    };
    crate::support::wait_for("the server and try spans", || {
        std::future::ready(spans().len() >= 2)
    })
    .await;
    let spans = spans();
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    let try_ = spans.iter().find(|s| s.kind == 3).unwrap();
    for s in [server, try_] {
        assert_eq!(s.name, "demo.Echo/Find");
        assert_eq!(s.attributes["rpc.system"], "grpc");
        assert_eq!(s.attributes["rpc.service"], "demo.Echo");
        assert_eq!(s.attributes["rpc.method"], "Find");
        assert_eq!(s.attributes["rpc.grpc.status_code"], "5");
    }
    assert_eq!(try_.parent_id, server.span_id);
    // NOT_FOUND is the caller's matter: an error to the client, not to the server.
    assert_eq!(try_.status_code, 2);
    assert_ne!(server.status_code, 2);
}
