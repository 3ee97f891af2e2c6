//! Failures hidden or contained: a killed upstream, a retry budget, the breaker, outlier
//! ejection, the bulkhead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::StatusCode;

use crate::support::{TestGateway, Upstream, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_upstream_mid_traffic_fails_no_get() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let gw = TestGateway::start(&format!(
        "[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\", \"{}\", \"{}\"]\n",
        a.addr, b.addr, c.addr
    ))
    .await;
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (h, failures, done) = (gw.http.clone(), failures.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            for _ in 0..250 {
                let (s, _, v) = h.get("/x").await;
                if s != StatusCode::OK {
                    failures.fetch_add(1, Ordering::SeqCst);
                    eprintln!("failed: {s} {v}");
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    wait_for("traffic flowing", || async {
        done.load(Ordering::SeqCst) >= 400
    })
    .await;
    b.kill();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "client-visible errors after a kill"
    );
    assert!(a.hits() + c.hits() >= 2000 - b.hits());
}

#[tokio::test]
async fn retry_budget_caps_amplification() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    a.set_status(503);
    b.set_status(503);
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
upstream = "u"
retries = {{ attempts = 2 }}
[upstreams.u]
endpoints = ["{}", "{}"]
breaker = {{ enabled = false }}
outlier = {{ enabled = false }}
retry_budget = {{ ratio = 0.2, min_per_sec = 0 }}
"#,
        a.addr, b.addr
    ))
    .await;
    for _ in 0..500 {
        let (s, _, _) = gw.http.get("/").await;
        assert_eq!(
            s,
            StatusCode::SERVICE_UNAVAILABLE,
            "the upstream's own 503 passes through"
        );
    }
    let seen = a.hits() + b.hits();
    // Without a budget: 500 × 3 = 1,500. With it: at most 500 + 20%.
    assert!(
        seen <= 600,
        "upstreams saw {seen} requests for 500 client requests"
    );
    assert!(
        seen >= 550,
        "the budget allows retries up to 20%: saw {seen}"
    );
    let (_, _, m) = gw.admin_http().get("/metrics").await;
    let m = m.as_str().unwrap().to_owned();
    tessera_testkit::prometheus::check_metrics(&m);
    assert!(
        m.contains("tessera_gateway_upstream_retry_budget_exhausted_total{upstream=\"u\"}"),
        "{m}"
    );
}

/// A gateway whose breaker stays open for `open_for`.
async fn breaker_gateway(a: &Upstream, open_for: &str) -> TestGateway {
    TestGateway::start(&format!(
        r#"
[[routes]]
upstream = "u"
retries = {{ attempts = 0 }}
[upstreams.u]
endpoints = ["{}"]
outlier = {{ enabled = false }}
breaker = {{ min_calls = 5, error_rate = 0.5, open_for = "{open_for}", half_open_probes = 2 }}
"#,
        a.addr
    ))
    .await
}

/// Open and closed again, each step waited for, never timed: the open spell is an hour
/// while the test checks that it rejects, and a second while it waits for the probes.
#[tokio::test]
async fn breaker_opens_half_opens_and_closes() {
    let a = Upstream::start("a").await;
    a.set_status(503);
    let gw = breaker_gateway(&a, "1h").await;
    for _ in 0..5 {
        gw.http.get("/").await;
    }
    assert_eq!(a.hits(), 5);
    let (s, hd, v) = gw.http.get("/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["code"], "breaker_open");
    assert!(hd.contains_key("retry-after"));
    assert_eq!(a.hits(), 5, "an open breaker does not call the upstream");
    assert_eq!(gw.upstreams().await["u"]["breaker"], "Open");

    let a = Upstream::start("a").await;
    a.set_status(503);
    let gw = breaker_gateway(&a, "1s").await;
    for _ in 0..5 {
        gw.http.get("/").await;
    }
    a.set_status(200);
    wait_for("half-open lets probes through", || async {
        gw.http.get("/").await.0 == StatusCode::OK
    })
    .await;
    wait_for("closed after probes", || async {
        gw.http.get("/").await;
        gw.upstreams().await["u"]["breaker"] == "Closed"
    })
    .await;
}

/// A round-robin gateway over `good` and `bad` that ejects for `ejection`.
async fn outlier_gateway(good: &Upstream, bad: &Upstream, ejection: &str) -> TestGateway {
    TestGateway::start(&format!(
        r#"
[[routes]]
upstream = "u"
retries = {{ attempts = 0 }}
[upstreams.u]
endpoints = ["{}", "{}"]
policy = "round_robin"
breaker = {{ enabled = false }}
outlier = {{ consecutive_errors = 3, base_ejection = "{ejection}", max_ejected_percent = 50 }}
"#,
        good.addr, bad.addr
    ))
    .await
}

/// Ejected (an hour, while the test checks it), and back after a one-second ejection
/// (waited for).
#[tokio::test]
async fn outliers_are_ejected_and_return() {
    let good = Upstream::start("good").await;
    let bad = Upstream::start("bad").await;
    bad.set_status(503);
    let gw = outlier_gateway(&good, &bad, "1h").await;
    for _ in 0..10 {
        gw.http.get("/").await;
    }
    let before = bad.hits();
    assert_eq!(before, 3, "ejected after 3 consecutive errors");
    let ups = gw.upstreams().await;
    let ejected: Vec<bool> = ups["u"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ejected"].as_bool().unwrap())
        .collect();
    assert_eq!(ejected, vec![false, true]);
    for _ in 0..10 {
        assert_eq!(gw.http.get("/").await.0, StatusCode::OK);
    }
    assert_eq!(bad.hits(), before);

    let bad = Upstream::start("bad").await;
    bad.set_status(503);
    let gw = outlier_gateway(&good, &bad, "1s").await;
    for _ in 0..10 {
        gw.http.get("/").await;
    }
    let before = bad.hits();
    bad.set_status(200);
    wait_for("ejection ends", || async {
        gw.http.get("/").await;
        bad.hits() > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_answers_503_with_retry_after() {
    let slow = Upstream::start("slow").await;
    slow.delay_ms.store(500, Ordering::SeqCst);
    let gw = TestGateway::start(&format!(
        "[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\"]\nmax_in_flight = 2\n",
        slow.addr
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let h = gw.http.clone();
        tasks.push(tokio::spawn(async move { h.get("/").await }));
    }
    let mut ok = 0;
    let mut full = 0;
    for t in tasks {
        let (s, hd, v) = t.await.unwrap();
        if s == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(v["code"], "bulkhead_full");
            assert!(hd.contains_key("retry-after"));
            full += 1;
        }
    }
    assert!(ok >= 2 && full >= 1, "ok {ok}, refused {full}");
}

#[tokio::test]
async fn panic_threshold_uses_ejected_endpoints_when_too_few_are_left() {
    let good = Upstream::start("good").await;
    let bad1 = Upstream::start("bad1").await;
    let bad2 = Upstream::start("bad2").await;
    bad1.set_status(503);
    bad2.set_status(503);
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
upstream = "u"
retries = {{ attempts = 0 }}
[upstreams.u]
endpoints = ["{}", "{}", "{}"]
policy = "round_robin"
panic_threshold = 50
breaker = {{ enabled = false }}
outlier = {{ consecutive_errors = 1, base_ejection = "60s", max_ejected_percent = 100 }}
"#,
        good.addr, bad1.addr, bad2.addr
    ))
    .await;
    for _ in 0..6 {
        gw.http.get("/").await;
    }
    let ups = gw.upstreams().await;
    let ejected = ups["u"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ejected"] == true)
        .count();
    assert_eq!(ejected, 2, "{ups}");
    // One of three usable is below 50%: balance over all three again.
    let before = bad1.hits() + bad2.hits();
    for _ in 0..30 {
        gw.http.get("/").await;
    }
    assert!(
        bad1.hits() + bad2.hits() > before,
        "panic mode sends traffic to ejected endpoints too"
    );
    assert!(good.hits() >= 10);
}

/// Beyond `max_in_flight` the gateway sheds at once with 503 instead of queueing: every
/// refusal comes back while the admitted requests are still waiting on their upstream.
#[tokio::test]
async fn requests_beyond_the_global_limit_are_shed_with_503() {
    let up = Upstream::start("slow").await;
    up.delay_ms.store(3000, Ordering::SeqCst);
    let gw = TestGateway::start(&format!(
        "max_in_flight = 2\n[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut admitted = Vec::new();
    for _ in 0..2 {
        let (http, order) = (gw.http.clone(), order.clone());
        admitted.push(tokio::spawn(async move {
            let s = http.get("/").await.0;
            order.lock().unwrap().push(s);
        }));
    }
    crate::support::wait_for("both slow requests to reach the upstream", || async {
        up.hits() == 2
    })
    .await;
    for _ in 0..4 {
        let (s, h, body) = gw.http.get("/").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["code"], "overloaded");
        assert!(h.get("retry-after").is_some());
        order.lock().unwrap().push(s);
    }
    for t in admitted {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order,
        [
            [StatusCode::SERVICE_UNAVAILABLE; 4].as_slice(),
            &[StatusCode::OK; 2]
        ]
        .concat(),
        "shed at once, not queued behind the admitted ones"
    );
    assert_eq!(up.hits(), 2);
}

/// A client address with `max_connections_per_ip` connections open gets 503 on the next.
#[tokio::test]
async fn connections_per_client_address_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("u").await;
    let gw = TestGateway::start(&format!(
        "max_connections_per_ip = 2\n[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut third = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut all = Vec::new();
    third.read_to_end(&mut all).await.unwrap();
    let all = String::from_utf8_lossy(&all);
    assert!(all.starts_with("HTTP/1.1 503"), "{all}");
    assert!(all.contains("too_many_connections"), "{all}");
    // Closing one frees its place.
    drop(held.pop());
    crate::support::wait_for("a freed connection slot", || async {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        if s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.is_ok() && &buf == b"HTTP/1.1 200"
    })
    .await;
}

/// An upstream with a 2 MB body limit that answers 413 from the head alone and closes
/// without reading the body (as nginx's `client_max_body_size` and hyper do).
async fn limited_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use bytes::Bytes;
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let len: u64 = req
                            .headers()
                            .get(http::header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(0);
                        let (status, body) = if len > 2 * 1024 * 1024 {
                            (
                                StatusCode::PAYLOAD_TOO_LARGE,
                                r#"{"error":"body over 2 MB"}"#,
                            )
                        } else {
                            (StatusCode::OK, r#"{"ok":true}"#)
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A 3 MB body to upstreams whose limit is 2 MB: the client gets their 413 every time,
/// never a 502, and neither endpoint is penalised for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_413_before_the_body_is_read_reaches_the_client() {
    let (a, _ta) = limited_upstream().await;
    let (b, _tb) = limited_upstream().await;
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["{a}", "{b}"]
"#
    ))
    .await;
    let big = vec![b'x'; 3 * 1024 * 1024];
    for i in 0..10 {
        let (s, _, v) = gw
            .http
            .send(http::Method::POST, "/upload", &[], big.clone())
            .await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "try {i}: {v}");
        assert_eq!(v["error"], "body over 2 MB", "the upstream's own answer");
    }
    let (s, _, _) = gw
        .http
        .send(http::Method::POST, "/upload", &[], vec![b'x'; 1000])
        .await;
    assert_eq!(s, StatusCode::OK);
    let ups = gw.upstreams().await;
    for e in ups["u"]["endpoints"].as_array().unwrap() {
        assert_eq!(e["ejected"], false, "{e}");
        assert!(e["ewma_ms"].as_f64().unwrap() < 1000.0, "penalised: {e}");
    }
}

/// A 502 tells the client which upstream failed, never where it lives.
#[tokio::test]
async fn a_502_names_no_internal_address() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["{addr}"]
"#
    ))
    .await;
    let (s, _, v) = gw.http.get("/").await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    let text = v.to_string();
    assert!(
        !text.contains("127.0.0.1") && !text.contains(&addr.port().to_string()),
        "{text}"
    );
    assert_eq!(v["code"], "upstream_connect");
}

/// The admin API answers a wrong method with 405 and `Allow`, an unknown path with 404,
/// both in the JSON error shape.
#[tokio::test]
async fn admin_errors_are_json_with_allow() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(&format!(
        "[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let admin = gw.admin_http();
    let (s, h, v) = admin
        .send(http::Method::DELETE, "/metrics", &[], bytes::Bytes::new())
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h["allow"], "GET");
    assert_eq!(v["code"], "method_not_allowed");
    let (s, h, v) = admin.get("/admin/reload").await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h["allow"], "POST");
    assert_eq!(v["code"], "method_not_allowed");
    let (s, _, v) = admin.get("/nope").await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}
