//! Per-route rate limits through the real gateway: exactly `burst` requests pass per
//! key (the rate is set so low that nothing refills during the test), the rest get 429
//! with `Retry-After` and `RateLimit-*`, and refused requests never reach the upstream.

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
}
