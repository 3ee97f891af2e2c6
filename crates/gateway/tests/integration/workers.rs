//! A gateway on two worker threads (`Gateway::run_workers`, as `workers = 2` runs it):
//! connections spread over both, and what the config promises for the gateway holds for
//! the gateway, not per worker: breakers, budgets, limits, ejections, reloads, draining.
//! Each phase opens a fresh connection per request and checks, from the per-worker
//! connection counters, that both workers served some of them.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{TestGateway, Upstream, wait_for};

/// One request on a connection of its own: the status and the body.
async fn once(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// `n` requests at once, each on its own connection.
async fn burst(addr: SocketAddr, path: &str, n: usize) -> Vec<(u16, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let path = path.to_owned();
            tokio::spawn(async move { once(addr, &path).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Connections each worker has accepted.
async fn accepted(gw: &TestGateway) -> Vec<u64> {
    let (_, _, m) = gw.admin_http().get("/metrics").await;
    let m = m.as_str().unwrap().to_owned();
    let counts: Vec<u64> = m
        .lines()
        .filter(|l| l.starts_with("tessera_gateway_worker_connections_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 2, "{m}");
    counts
}

/// Runs `phase` and checks that both workers accepted some of its connections.
async fn on_both_workers<F: Future>(gw: &TestGateway, phase: F) -> F::Output {
    let before = accepted(gw).await;
    let out = phase.await;
    let after = accepted(gw).await;
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "one worker served every connection: {before:?} -> {after:?}"
    );
    out
}

fn metric(m: &str, name: &str) -> u64 {
    m.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

/// A two-worker gateway config: one route to upstream `u` over `endpoints`, with extra
/// lines for the route and for the upstream.
fn config(endpoints: &[&Upstream], route: &str, upstream: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    format!(
        "workers = 2\n[[routes]]\nupstream = \"u\"\n{route}\n[upstreams.u]\nendpoints = [{}]\n{upstream}\n",
        eps.join(", ")
    )
}

async fn metrics(gw: &TestGateway) -> String {
    let (_, _, m) = gw.admin_http().get("/metrics").await;
    m.as_str().unwrap().to_owned()
}

#[tokio::test]
async fn connections_land_on_every_worker_and_are_served() {
    let a = Upstream::start("a").await;
    let gw = TestGateway::start_workers(&config(&[&a], "", ""), 2).await;
    let answers = on_both_workers(&gw, burst(gw.addr, "/x", 40)).await;
    assert!(
        answers
            .iter()
            .all(|(s, b)| *s == 200 && b.contains("\"id\":\"a\"")),
        "{answers:?}"
    );
    assert_eq!(accepted(&gw).await.iter().sum::<u64>(), 40);
    assert_eq!(a.hits(), 40);
}

#[tokio::test]
async fn a_breaker_opened_by_failures_rejects_on_every_worker() {
    let a = Upstream::start("a").await;
    a.set_status(503);
    let gw = TestGateway::start_workers(
        &config(
            &[&a],
            "retries = { attempts = 0 }",
            "outlier = { enabled = false }\nbreaker = { min_calls = 5, error_rate = 0.5, open_for = \"1h\", half_open_probes = 2 }",
        ),
        2,
    )
    .await;
    // Failures seen on whichever worker took each connection.
    for _ in 0..5 {
        assert_eq!(once(gw.addr, "/").await.0, 503);
    }
    wait_for("the breaker to open", || async {
        gw.upstreams().await["u"]["breaker"] == "Open"
    })
    .await;
    let hits = a.hits();
    let answers = on_both_workers(&gw, burst(gw.addr, "/", 20)).await;
    assert!(
        answers
            .iter()
            .all(|(s, b)| *s == 503 && b.contains("breaker_open")),
        "{answers:?}"
    );
    assert_eq!(
        a.hits(),
        hits,
        "an open breaker calls the upstream from no worker"
    );
}

#[tokio::test]
async fn a_rate_limit_is_exact_across_workers() {
    let a = Upstream::start("a").await;
    let gw = TestGateway::start_workers(
        &config(&[&a], "rate_limit = { rate = 0.001, burst = 10 }", ""),
        2,
    )
    .await;
    let answers = on_both_workers(&gw, burst(gw.addr, "/", 60)).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let limited = answers.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(
        (ok, limited),
        (10, 50),
        "burst 10 means 10 for the gateway: {answers:?}"
    );
}

#[tokio::test]
async fn a_retry_budget_is_exact_across_workers() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    a.set_status(503);
    b.set_status(503);
    // No share of requests, a floor of 1 retry/s over the 10 s window: 10 retries in all.
    let gw = TestGateway::start_workers(
        &config(
            &[&a, &b],
            "retries = { attempts = 1 }",
            "breaker = { enabled = false }\noutlier = { enabled = false }\nretry_budget = { ratio = 0.0, min_per_sec = 1 }",
        ),
        2,
    )
    .await;
    let started = std::time::Instant::now();
    let answers = on_both_workers(&gw, burst(gw.addr, "/", 60)).await;
    let took = started.elapsed();
    assert!(answers.iter().all(|(s, _)| *s == 503), "{answers:?}");
    let m = metrics(&gw).await;
    let retries = metric(&m, "tessera_gateway_upstream_retries_total{upstream=\"u\"}");
    let refused = metric(
        &m,
        "tessera_gateway_upstream_retry_budget_exhausted_total{upstream=\"u\"}",
    );
    // (The window is 10 s: a burst that took longer would have had more.)
    assert_eq!((retries, refused), (10, 50), "60 requests in {took:?}");
    assert_eq!(a.hits() + b.hits(), 70);
}

#[tokio::test]
async fn an_ejection_is_seen_by_every_worker() {
    let good = Upstream::start("good").await;
    let bad = Upstream::start("bad").await;
    bad.set_status(503);
    let gw = TestGateway::start_workers(
        &config(
            &[&good, &bad],
            "retries = { attempts = 0 }",
            "policy = \"round_robin\"\nbreaker = { enabled = false }\noutlier = { consecutive_errors = 3, base_ejection = \"1h\", max_ejected_percent = 50 }",
        ),
        2,
    )
    .await;
    wait_for("the bad endpoint to be ejected", || async {
        once(gw.addr, "/").await;
        gw.upstreams().await["u"]["endpoints"][1]["ejected"] == true
    })
    .await;
    let hits = bad.hits();
    let answers = on_both_workers(&gw, burst(gw.addr, "/", 20)).await;
    assert!(
        answers
            .iter()
            .all(|(s, b)| *s == 200 && b.contains("\"id\":\"good\"")),
        "{answers:?}"
    );
    assert_eq!(bad.hits(), hits, "no worker sends to the ejected endpoint");
}

#[tokio::test]
async fn a_reload_swaps_every_workers_routes() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let only = |up: &Upstream| format!("watch_config = false\n{}", config(&[up], "", ""));
    let gw = TestGateway::start_workers(&only(&a), 2).await;
    let answers = on_both_workers(&gw, burst(gw.addr, "/", 20)).await;
    assert!(
        answers.iter().all(|(_, b)| b.contains("\"id\":\"a\"")),
        "{answers:?}"
    );
    std::fs::write(&gw.config_path, only(&b)).unwrap();
    let (s, _, v) = gw
        .admin_http()
        .send(Method::POST, "/admin/reload", &[], Bytes::new())
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let answers = on_both_workers(&gw, burst(gw.addr, "/", 20)).await;
    assert!(
        answers
            .iter()
            .all(|(s, b)| *s == 200 && b.contains("\"id\":\"b\"")),
        "{answers:?}"
    );
}

#[tokio::test]
async fn shutting_down_drains_in_flight_requests_on_every_worker() {
    let a = Upstream::start("a").await;
    a.delay_ms.store(2_000, std::sync::atomic::Ordering::SeqCst);
    let mut gw = TestGateway::start_workers(
        &format!(
            "drain_timeout = \"60s\"\n{}",
            config(&[&a], "timeout = \"60s\"\nretries = { attempts = 0 }", "")
        ),
        2,
    )
    .await;
    let before = accepted(&gw).await;
    let addr = gw.addr;
    let in_flight = tokio::spawn(burst(addr, "/", 20));
    wait_for("every request to reach the upstream", || async {
        a.hits() == 20
    })
    .await;
    let after = accepted(&gw).await;
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "{before:?} -> {after:?}"
    );
    // Stops accepting, then waits for the 20 requests held by the slow upstream.
    gw.stop().await;
    let answers = in_flight.await.unwrap();
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after the drain"
    );
}
