//! Routing, rewriting, error answers, balancing and reloads through a running gateway.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::{Http, TestGateway, Upstream, wait_for};

#[tokio::test]
async fn routes_by_precedence_and_rewrites() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
name = "prefix-short"
path = {{ prefix = "/api" }}
upstream = "a"

[[routes]]
name = "prefix-long"
path = {{ prefix = "/api/users" }}
upstream = "b"
strip_prefix = true
request_headers = {{ add = {{ "x-added" = "1" }}, remove = ["x-secret"] }}
response_headers = {{ add = {{ "x-route" = "users" }}, remove = ["x-upstream"] }}

[[routes]]
name = "exact"
path = {{ exact = "/api/users/me" }}
upstream = "c"

[[routes]]
name = "regex"
path = {{ regex = "^/v[0-9]+/items$" }}
upstream = "c"

[[routes]]
name = "canary"
path = {{ prefix = "/api" }}
headers = {{ "x-canary" = "yes" }}
upstream = "b"
rewrite_prefix = "/internal"

[[routes]]
name = "host"
host = "*.example.com"
upstream = "c"

[[routes]]
name = "post-only"
path = {{ exact = "/submit" }}
methods = ["POST"]
upstream = "a"

[upstreams.a]
endpoints = ["{}"]
[upstreams.b]
endpoints = ["{}"]
[upstreams.c]
endpoints = ["{}"]
"#,
        a.addr, b.addr, c.addr
    ))
    .await;
    let h = &gw.http;
    let (s, hd, v) = h
        .send(
            Method::GET,
            "/api/users/42?x=1",
            &[("x-secret", "s"), ("x-keep", "k")],
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["id"], "b", "longest prefix wins");
    assert_eq!(v["path"], "/42?x=1", "prefix stripped, query kept");
    assert_eq!(v["headers"]["x-added"], "1");
    assert_eq!(v["headers"]["x-keep"], "k");
    assert!(v["headers"].get("x-secret").is_none());
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(hd["x-route"], "users");
    assert!(hd.get("x-upstream").is_none());

    assert_eq!(
        h.get("/api/users/me").await.2["id"],
        "c",
        "exact beats prefix"
    );
    assert_eq!(h.get("/v2/items").await.2["id"], "c", "regex");
    assert_eq!(h.get("/api/other").await.2["id"], "a");
    assert_eq!(
        h.get("/apix").await.0,
        StatusCode::NOT_FOUND,
        "prefix matches whole segments"
    );
    let (_, _, v) = h
        .send(
            Method::GET,
            "/api/things",
            &[("x-canary", "yes")],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        v["id"], "a",
        "same-rank prefix routes: the first in the file wins"
    );
    let (_, _, v) = h
        .send(
            Method::GET,
            "/anything",
            &[("host", "shop.example.com")],
            Bytes::new(),
        )
        .await;
    assert_eq!(v["id"], "c", "wildcard host");
    assert_eq!(v["headers"]["host"], "shop.example.com", "client host kept");
    let (s, _, _) = h.get("/submit").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "method narrows the route");
    let (_, _, v) = h.send(Method::POST, "/submit", &[], "payload").await;
    assert_eq!(v["body"], "payload");

    let (s, hd, v) = h.get("/nowhere").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(hd["content-type"], "application/json");
    assert_eq!(v["code"], "no_route");
    assert!(v["error"].as_str().unwrap().contains("/nowhere"));

    let (_, _, routes) = gw.admin_http().get("/admin/routes").await;
    let names: Vec<&str> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names[..3],
        ["host", "exact", "post-only"],
        "host first, then exact paths"
    );
}

#[tokio::test]
async fn rewrite_prefix_and_error_mapping() {
    let a = Upstream::start("a").await;
    let slow = Upstream::start("slow").await;
    slow.delay_ms
        .store(2_000, std::sync::atomic::Ordering::SeqCst);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
path = {{ prefix = "/old" }}
upstream = "a"
rewrite_prefix = "/new"

[[routes]]
path = {{ prefix = "/dead" }}
upstream = "dead"

[[routes]]
path = {{ prefix = "/slow" }}
upstream = "slow"
timeout = "200ms"

[[routes]]
path = {{ prefix = "/fallback" }}
upstream = "dead"
fallback = {{ status = 200, body = '{{"cached":true}}' }}

[upstreams.a]
endpoints = ["{}"]
[upstreams.dead]
endpoints = ["{dead}"]
[upstreams.slow]
endpoints = ["{}"]
"#,
        a.addr, slow.addr
    ))
    .await;
    let h = &gw.http;
    assert_eq!(h.get("/old/x/y").await.2["path"], "/new/x/y");
    assert_eq!(h.get("/old").await.2["path"], "/new");
    let (s, _, v) = h.get("/dead").await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(v["code"], "upstream_connect");
    let (s, _, v) = h.get("/slow").await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(v["code"], "deadline_exceeded");
    let (s, _, v) = h.get("/fallback").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["cached"], true);
}

#[tokio::test]
async fn balancing_follows_weights_and_hash_keys() {
    let ups: Vec<Upstream> = futures_join(["a", "b", "c"]).await;
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
path = {{ prefix = "/rr" }}
upstream = "rr"
[[routes]]
path = {{ prefix = "/sticky" }}
upstream = "sticky"

[upstreams.rr]
endpoints = ["{} 3", "{} 1"]
policy = "round_robin"
[upstreams.sticky]
endpoints = ["{}", "{}", "{}"]
policy = "maglev"
hash = {{ header = "x-user" }}
"#,
        ups[0].addr, ups[1].addr, ups[0].addr, ups[1].addr, ups[2].addr
    ))
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let (_, _, v) = gw.http.get("/rr").await;
        *counts
            .entry(v["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(counts["a"], 300, "{counts:?}");
    assert_eq!(counts["b"], 100, "{counts:?}");

    let mut owner: HashMap<String, String> = HashMap::new();
    for u in 0..60 {
        let user = format!("user-{u}");
        let (_, _, v) = gw
            .http
            .send(Method::GET, "/sticky", &[("x-user", &user)], Bytes::new())
            .await;
        let id = v["id"].as_str().unwrap().to_owned();
        for _ in 0..3 {
            let (_, _, again) = gw
                .http
                .send(Method::GET, "/sticky", &[("x-user", &user)], Bytes::new())
                .await;
            assert_eq!(again["id"], id.as_str(), "same key, same endpoint");
        }
        owner.insert(user, id);
    }
    assert_eq!(
        owner
            .values()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3,
        "keys spread"
    );
    // Endpoint c leaves: keys owned by a and b stay where they were.
    let cfg = std::fs::read_to_string(&gw.config_path).unwrap();
    let cfg = cfg.replace(&format!(", \"{}\"]", ups[2].addr), "]");
    std::fs::write(&gw.config_path, cfg).unwrap();
    let (s, _, v) = gw
        .admin_http()
        .send(Method::POST, "/admin/reload", &[], Bytes::new())
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (mut stayed_total, mut moved) = (0, 0);
    for (user, id) in &owner {
        let (_, _, v) = gw
            .http
            .send(Method::GET, "/sticky", &[("x-user", user)], Bytes::new())
            .await;
        if id != "c" {
            stayed_total += 1;
            if v["id"] != id.as_str() {
                moved += 1;
            }
        } else {
            assert_ne!(v["id"], "c");
        }
    }
    // Maglev moves the leaving endpoint's keys and (by design) only a sliver of others.
    assert!(
        moved * 10 <= stayed_total,
        "{moved} of {stayed_total} keys moved although their endpoint stayed"
    );
}

async fn futures_join<const N: usize>(ids: [&str; N]) -> Vec<Upstream> {
    let mut out = Vec::new();
    for id in ids {
        out.push(Upstream::start(id).await);
    }
    out
}

#[tokio::test]
async fn h2c_both_ways() {
    let up = Upstream::start("h2").await;
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
path = {{ prefix = "/h1" }}
upstream = "h1"
[[routes]]
path = {{ prefix = "/h2" }}
upstream = "h2"
[upstreams.h1]
endpoints = ["{0}"]
[upstreams.h2]
endpoints = ["{0}"]
protocol = "h2c"
"#,
        up.addr
    ))
    .await;
    let h2 = Http::h2c(gw.addr);
    let (s, _, v) = h2.get("/h2/x").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["version"], "HTTP/2.0",
        "h2c client → gateway → h2c upstream"
    );
    let (_, _, v) = h2.get("/h1/x").await;
    assert_eq!(v["version"], "HTTP/1.1", "h2c client → HTTP/1.1 upstream");
    // A plain HTTP/1.1 request's raw fields become HTTP/2 fields upstream.
    let (_, _, v) = gw
        .http
        .send(Method::GET, "/h2/x", &[("x-probe", "p1")], Bytes::new())
        .await;
    assert_eq!(v["version"], "HTTP/2.0", "HTTP/1.1 client → h2c upstream");
    assert_eq!(v["headers"]["x-probe"], "p1", "{v}");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1", "{v}");
}

#[tokio::test]
async fn reloads_swap_routes_and_refuse_bad_configs() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let conf = |id: &str| {
        format!(
            "[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
            if id == "a" { a.addr } else { b.addr }
        )
    };
    let gw = TestGateway::start(&conf("a")).await;
    let admin = gw.admin_http();
    assert_eq!(gw.http.get("/").await.2["id"], "a");

    // Invalid file: refused, the old config keeps serving.
    std::fs::write(&gw.config_path, "[[routes]]\nupstream = \"missing\"\n").unwrap();
    let (s, _, v) = admin
        .send(Method::POST, "/admin/reload", &[], Bytes::new())
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("missing"), "{v}");
    assert_eq!(gw.http.get("/").await.2["id"], "a");

    // Reload under load: no request fails while the table is swapped back and forth.
    let load = {
        let h = gw.http.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            for _ in 0..600 {
                let (s, _, _) = h.get("/").await;
                if s != StatusCode::OK {
                    failures += 1;
                }
            }
            failures
        })
    };
    for i in 0..20 {
        std::fs::write(&gw.config_path, conf(if i % 2 == 0 { "b" } else { "a" })).unwrap();
        let (s, _, _) = admin
            .send(Method::POST, "/admin/reload", &[], Bytes::new())
            .await;
        assert_eq!(s, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(load.await.unwrap(), 0, "requests failed during reloads");

    // A change to the file is picked up on its own.
    std::fs::write(&gw.config_path, conf("b")).unwrap();
    wait_for("file change reloads", || async {
        gw.http.get("/").await.2["id"] == "b"
    })
    .await;
    let (_, _, metrics) = admin.get("/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("tessera_gateway_config_reloads_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let slow = Upstream::start("slow").await;
    slow.delay_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    let mut gw = TestGateway::start(&format!(
        "[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
        slow.addr
    ))
    .await;
    let h = gw.http.clone();
    let in_flight = tokio::spawn(async move { h.get("/").await });
    wait_for("request reached the upstream", || async {
        slow.hits() == 1
    })
    .await;
    gw.stop().await;
    let (s, _, v) = in_flight.await.unwrap();
    assert_eq!(s, StatusCode::OK, "the in-flight request finished: {v}");
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn bodies_stream_and_only_safe_retries_happen() {
    let up = Upstream::start("echo").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = TestGateway::start(&format!(
        r#"
max_replay_body_bytes = 1024
[[routes]]
path = {{ prefix = "/one" }}
upstream = "one"
[[routes]]
path = {{ prefix = "/two" }}
upstream = "two"
[upstreams.one]
endpoints = ["{0}"]
[upstreams.two]
endpoints = ["{dead}", "{0}"]
policy = "round_robin"
outlier = {{ enabled = false }}
breaker = {{ enabled = false }}
"#,
        up.addr
    ))
    .await;
    // A body larger than the replay cap streams through whole.
    let big = "x".repeat(300_000);
    let (s, _, v) = gw.http.send(Method::POST, "/one", &[], big.clone()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["body"].as_str().unwrap().len(), big.len());
    // A refused connection is retried even for POST: nothing reached the upstream.
    for i in 0..6 {
        let (s, _, v) = gw
            .http
            .send(Method::POST, "/two", &[], format!("order {i}"))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["body"], format!("order {i}"));
    }
    // A POST answered 503 is not replayed (not idempotent, route not marked retryable).
    up.set_status(503);
    let before = up.hits();
    let (s, _, _) = gw.http.send(Method::POST, "/one", &[], "pay").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.hits(), before + 1, "exactly one try");
    // The same GET is retried (here on the only endpoint: 1 + 2 retries).
    let before = up.hits();
    gw.http.get("/one").await;
    assert_eq!(up.hits(), before + 3);
}

#[tokio::test]
async fn upstream_connections_are_reused_until_idle_too_long() {
    use std::sync::atomic::Ordering;
    let keep = Upstream::start("keep").await;
    let expire = Upstream::start("expire").await;
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
path = {{ prefix = "/keep" }}
upstream = "keep"
[[routes]]
path = {{ prefix = "/expire" }}
upstream = "expire"
[upstreams.keep]
endpoints = ["{}"]
[upstreams.expire]
endpoints = ["{}"]
idle_timeout = "0s"
"#,
        keep.addr, expire.addr
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(gw.http.get("/keep").await.0, StatusCode::OK);
        assert_eq!(gw.http.get("/expire").await.0, StatusCode::OK);
    }
    assert_eq!(
        keep.accepts.load(Ordering::SeqCst),
        1,
        "one pooled connection serves them all"
    );
    assert_eq!(
        expire.accepts.load(Ordering::SeqCst),
        10,
        "an idle connection past the timeout is not reused"
    );
}

/// `X-Forwarded-*` and `Forwarded` from a client are replaced unless the client is a
/// trusted proxy, whose `X-Forwarded-For` is extended and whose `X-Forwarded-Proto` kept.
#[tokio::test]
async fn forwarded_headers_are_only_believed_from_trusted_proxies() {
    let up = Upstream::start("a").await;
    let spoof: &[(&str, &str)] = &[
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=6.6.6.6"),
    ];
    for (trusted, want_xff) in [
        ("", "127.0.0.1"),
        ("trusted_proxies = [\"127.0.0.0/8\"]", "6.6.6.6, 127.0.0.1"),
    ] {
        let gw = TestGateway::start(&format!(
            "{trusted}\n[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
            up.addr
        ))
        .await;
        let (s, _, v) = gw.http.send(Method::GET, "/", spoof, Bytes::new()).await;
        assert_eq!(s, StatusCode::OK);
        let h = &v["headers"];
        assert_eq!(h["x-forwarded-for"], want_xff, "{trusted}");
        // What a trusted proxy says the client used (it may have terminated TLS).
        let want_proto = if trusted.is_empty() { "http" } else { "https" };
        assert_eq!(h["x-forwarded-proto"], want_proto, "{trusted}");
        if trusted.is_empty() {
            assert!(h.get("x-forwarded-host").is_none(), "{h}");
            assert!(h.get("forwarded").is_none(), "{h}");
        } else {
            assert_eq!(h["x-forwarded-host"], "evil.example");
        }
    }
    let err = tessera_gateway::Config::parse("trusted_proxies = [\"10.0.0.0/33\"]\n").unwrap_err();
    assert!(err.to_string().contains("trusted_proxies"), "{err}");
}
