//! Per-route rate limits through the real gateway: exactly `burst` requests pass per
//! key (the rate is set so low that nothing refills during the test), the rest get 429
//! with `Retry-After` and `RateLimit-*`, and refused requests never reach the upstream.
//! Shared limits run against a `redis-server` each test starts (and kills) itself.

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::{TestGateway, Upstream};

fn config(up: &Upstream, key: &str) -> String {
    format!(
        r#"
[[routes]]
name = "limited"
path = {{ prefix = "/" }}
upstream = "app"
rate_limit = {{ rate = 0.001, burst = 5, key = "{key}" }}

[upstreams.app]
endpoints = ["{}"]
"#,
        up.addr
    )
}

#[tokio::test]
async fn exactly_the_burst_passes_per_client_and_the_rest_get_429() {
    let up = Upstream::start("app").await;
    let gw = TestGateway::start(&config(&up, "ip")).await;
    let mut statuses = Vec::new();
    for i in 0..12 {
        let (s, h, body) = gw.http.get("/x").await;
        statuses.push(s);
        if i < 5 {
            assert_eq!(s, StatusCode::OK);
            assert_eq!(h["ratelimit-limit"], "5");
            assert_eq!(h["ratelimit-remaining"], (4 - i).to_string().as_str());
        } else {
            assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
            assert_eq!(body["code"], "rate_limited");
            let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(
                retry >= 900,
                "a new request is ~1000 s away at 0.001/s: {retry}"
            );
            assert_eq!(h["ratelimit-remaining"], "0");
        }
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 5);
    assert_eq!(up.hits(), 5, "refused requests never reach the upstream");
}

#[tokio::test]
async fn a_header_key_gives_each_api_key_its_own_budget() {
    let up = Upstream::start("app").await;
    let gw = TestGateway::start(&config(&up, "header:x-api-key")).await;
    let mut ok = std::collections::HashMap::new();
    for i in 0..24 {
        let key = ["alpha", "beta", "gamma"][i % 3];
        let (s, _, _) = gw
            .http
            .send(Method::GET, "/x", &[("x-api-key", key)], Bytes::new())
            .await;
        if s == StatusCode::OK {
            *ok.entry(key).or_insert(0) += 1;
        }
    }
    assert_eq!(ok.values().copied().collect::<Vec<_>>(), vec![5, 5, 5]);
    // Without the header the client address is the key: a fresh budget of its own.
    let mut passed = 0;
    for _ in 0..8 {
        if gw.http.get("/x").await.0 == StatusCode::OK {
            passed += 1;
        }
    }
    assert_eq!(passed, 5);
}

#[test]
fn rate_limit_config_errors_name_the_key() {
    let cfg = |rl: &str| {
        format!(
            "[[routes]]\nupstream = \"a\"\nrate_limit = {rl}\n[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n"
        )
    };
    let err = |t: String| tessera_gateway::Config::parse(&t).unwrap_err().to_string();
    assert!(err(cfg("{ rate = 0.0, burst = 1 }")).contains("routes[0].rate_limit.rate"));
    assert!(err(cfg("{ rate = 1.0, burst = 0 }")).contains("routes[0].rate_limit.burst"));
    assert!(
        err(cfg("{ rate = 1.0, burst = 1, key = \"cookie\" }"))
            .contains("routes[0].rate_limit.key")
    );
    assert!(
        err(cfg("{ rate = 1.0, burst = 1, key = \"jwt_sub\" }")).contains("needs the route's auth")
    );
    assert!(err(cfg("{ rate = 1.0, burst = 1, per = 3 }")).contains("per"));
    assert!(
        err(cfg("{ rate = 1.0, burst = 1, shared = true }"))
            .contains("routes[0].rate_limit.shared: needs a [redis] section")
    );
}

/// A reload with the same limit keeps what each client has spent; a changed limit
/// starts over.
#[tokio::test]
async fn a_reload_keeps_the_spent_budget_unless_the_limit_changes() {
    let up = Upstream::start("app").await;
    let gw = TestGateway::start(&config(&up, "ip")).await;
    let passed = |gw: &TestGateway| {
        let http = gw.http.clone();
        async move {
            let mut n = 0;
            for _ in 0..8 {
                if http.get("/x").await.0 == StatusCode::OK {
                    n += 1;
                }
            }
            n
        }
    };
    let reload = |gw: &TestGateway| {
        let admin = gw.admin_http();
        async move {
            let (s, _, body) = admin
                .send(Method::POST, "/admin/reload", &[], Bytes::new())
                .await;
            assert_eq!(s, StatusCode::OK, "{body}");
        }
    };
    assert_eq!(passed(&gw).await, 5);
    reload(&gw).await;
    assert_eq!(passed(&gw).await, 0, "the reload handed out a fresh burst");
    std::fs::write(
        &gw.config_path,
        config(&up, "ip").replace("burst = 5", "burst = 3"),
    )
    .unwrap();
    reload(&gw).await;
    assert_eq!(passed(&gw).await, 3);
}

/// A `redis-server` of the test's own on a free loopback port, so it can be killed
/// and restarted without touching the machine's Redis.
struct RedisServer {
    port: u16,
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// `None` (with the reason printed) when there is no redis-server outside CI.
    async fn start() -> Option<RedisServer> {
        let found = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is not installed (CI needs it)"
            );
            eprintln!("skipped: redis-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            port,
            child: None,
            _dir: tempfile::tempdir().unwrap(),
        };
        server.run().await;
        Some(server)
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn run(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self._dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = self.address();
        crate::support::wait_for("redis-server to answer PING", || {
            let addr = addr.clone();
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                    return false;
                };
                let mut buf = [0u8; 7];
                s.write_all(b"PING\r\n").await.is_ok()
                    && s.read_exact(&mut buf).await.is_ok()
                    && &buf == b"+PONG\r\n"
            }
        })
        .await;
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn shared_config(up: &Upstream, redis: &RedisServer) -> String {
    format!(
        r#"
[redis]
address = "{}"
timeout = "2s"

[[routes]]
name = "shared"
path = {{ prefix = "/shared" }}
upstream = "app"
rate_limit = {{ rate = 0.001, burst = 10, key = "header:x-client", shared = true }}

[[routes]]
name = "local"
path = {{ prefix = "/local" }}
upstream = "app"
rate_limit = {{ rate = 0.001, burst = 10, key = "header:x-client" }}

[upstreams.app]
endpoints = ["{}"]
"#,
        redis.address(),
        up.addr
    )
}

async fn status(gw: &TestGateway, path: &str, client: &str) -> (StatusCode, http::HeaderMap) {
    let (s, h, _) = gw
        .http
        .send(Method::GET, path, &[("x-client", client)], Bytes::new())
        .await;
    (s, h)
}

#[tokio::test]
async fn a_shared_limit_is_exact_across_two_gateways() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let up = Upstream::start("app").await;
    let a = TestGateway::start(&shared_config(&up, &redis)).await;
    let b = TestGateway::start(&shared_config(&up, &redis)).await;

    // Alternating between the gateways: one budget of 10, counted down in order.
    let mut remaining = Vec::new();
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (s, h) = status(gw, "/shared", "one").await;
        if s == StatusCode::OK {
            remaining.push(h["ratelimit-remaining"].to_str().unwrap().to_owned());
        } else {
            assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
            assert!(h.contains_key("retry-after"));
        }
    }
    let want: Vec<String> = (0..10).rev().map(|n| n.to_string()).collect();
    assert_eq!(remaining, want);
    // The same limit kept by each gateway alone lets twice as many through.
    let mut local = 0;
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if status(gw, "/local", "one").await.0 == StatusCode::OK {
            local += 1;
        }
    }
    assert_eq!(local, 20);

    // Concurrent requests on both gateways: still exactly the burst.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let http = if i % 2 == 0 {
            a.http.clone()
        } else {
            b.http.clone()
        };
        tasks.spawn(async move {
            http.send(Method::GET, "/shared", &[("x-client", "two")], Bytes::new())
                .await
                .0
        });
    }
    let mut ok = 0;
    while let Some(s) = tasks.join_next().await {
        if s.unwrap() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 10);
    // The client keys (here standing in for API keys) are not readable in Redis.
    let keys = redis_keys(&redis).await;
    assert!(!keys.is_empty());
    assert!(
        keys.iter()
            .all(|k| k.starts_with("tessera:rl:shared:") && !k.contains("two")),
        "{keys:?}"
    );
    let (_, _, metrics) = a.admin_http().get("/metrics").await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("tessera_gateway_redis_up 1"), "{metrics}");
    tessera_testkit::prometheus::check_metrics(metrics);
}

#[tokio::test]
async fn without_redis_each_gateway_limits_locally_until_it_is_back() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let up = Upstream::start("app").await;
    let a = TestGateway::start(&shared_config(&up, &redis)).await;
    let b = TestGateway::start(&shared_config(&up, &redis)).await;
    assert_eq!(status(&a, "/shared", "warm").await.0, StatusCode::OK);
    assert_eq!(status(&b, "/shared", "warm").await.0, StatusCode::OK);

    redis.kill();
    let mut per_gateway = Vec::new();
    for gw in [&a, &b] {
        let mut ok = 0;
        for _ in 0..15 {
            if status(gw, "/shared", "outage").await.0 == StatusCode::OK {
                ok += 1;
            }
        }
        per_gateway.push(ok);
    }
    assert_eq!(
        per_gateway,
        vec![10, 10],
        "each gateway keeps the limit alone"
    );
    for gw in [&a, &b] {
        let (_, _, metrics) = gw.admin_http().get("/metrics").await;
        let m = metrics.as_str().unwrap();
        assert!(m.contains("tessera_gateway_redis_up 0"), "{m}");
        assert!(
            !m.contains("tessera_gateway_redis_failures_total 0\n"),
            "{m}"
        );
    }

    redis.run().await;
    for gw in [&a, &b] {
        let admin = gw.admin_http();
        crate::support::wait_for("the gateway to reach redis again", || {
            let admin = admin.clone();
            async move {
                let (_, _, m) = admin.get("/metrics").await;
                m.as_str()
                    .is_some_and(|m| m.contains("tessera_gateway_redis_up 1"))
            }
        })
        .await;
    }
    let mut ok = 0;
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if status(gw, "/shared", "after").await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "shared again");
}

/// Every key in the test's Redis (`KEYS *`, fine for a handful).
async fn redis_keys(redis: &RedisServer) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(redis.address())
        .await
        .unwrap();
    s.write_all(b"KEYS *\r\n").await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The reply is small; read until it parses as a complete array.
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "redis closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let mut lines = text.split("\r\n");
        let count: usize = lines
            .next()
            .unwrap()
            .trim_start_matches('*')
            .parse()
            .unwrap();
        let items: Vec<&str> = lines.skip(1).step_by(2).take(count).collect();
        if items.len() == count && text.ends_with("\r\n") {
            return items.into_iter().map(str::to_owned).collect();
        }
    }
}
