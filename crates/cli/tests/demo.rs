//! `tessera demo` end to end, as a newcomer runs it: real processes (server, gateway, two
//! replicas of each shop service), real HTTP through the gateway, and a clean stop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // each test crate uses a part of it
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use common::BIN;

struct Demo {
    child: Child,
    _stdin: Option<ChildStdin>,
    gateway: String,
    registry: String,
    admin_password: String,
    /// With `--prometheus`: where it listens.
    prometheus: Option<String>,
}

impl Demo {
    async fn start(dir: &Path) -> Demo {
        Demo::start_with(dir, &[], &[]).await
    }

    async fn start_with(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Demo {
        let mut child = Command::new(BIN)
            .args([
                "demo",
                "--gateway",
                "127.0.0.1:0",
                "--registry",
                "127.0.0.1:0",
                "--fresh",
            ])
            .args(extra)
            .arg("--data-dir")
            .arg(dir)
            .env_remove("TESSERA_STOP_ON_STDIN_EOF")
            .env_remove("DATABASE_URL")
            .env_remove("TESSERA_DATABASE_URL")
            .env_remove("TESSERA_EVENTS")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tessera demo");
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut gateway, mut registry, mut admin_password) = (None, None, None);
        let mut prometheus = None;
        let mut said = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(180), lines.next_line())
                .await
                .expect("the demo came up in time")
                .unwrap()
                .unwrap_or_else(|| {
                    panic!(
                        "the demo exited before it was up; what it printed:\n{}\nits logs:\n{}",
                        said.join("\n"),
                        log_tails(&dir.join("logs"))
                    )
                });
            said.push(line.clone());
            let word = |prefix: &str| {
                line.trim()
                    .strip_prefix(prefix)
                    .and_then(|r| r.split_whitespace().next())
                    .map(str::to_owned)
            };
            gateway =
                gateway.or(word("gateway:").map(|u| u.trim_start_matches("http://").to_owned()));
            registry =
                registry.or(word("registry:").map(|u| u.trim_start_matches("http://").to_owned()));
            prometheus = prometheus.or(word("Prometheus:")
                .and_then(|u| Some(u.strip_prefix("http://")?.split('/').next()?.to_owned())));
            if let Some(rest) = line.trim().strip_prefix("shop admin admin@shop.test / ") {
                admin_password = Some(rest.trim().to_owned());
            }
            if line.contains("Press Ctrl-C") {
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Demo {
            child,
            _stdin: stdin,
            gateway: gateway.unwrap(),
            registry: registry.unwrap(),
            admin_password: admin_password.unwrap(),
            prometheus,
        }
    }

    /// Stops the demo the way Ctrl-C does (SIGINT) and waits for it.
    async fn stop(mut self) {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the demo stopped in time")
            .unwrap();
        assert!(status.success(), "demo exit status {status}");
    }
}

type Http = Client<HttpConnector, Full<Bytes>>;

/// The last lines of every log in `dir`: the test's temporary directory is gone once it
/// fails, so what went wrong has to be in its message.
fn log_tails(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n");
        out.push_str(&format!("--- {}\n{tail}\n", entry.path().display()));
    }
    out
}

fn client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(
    c: &Http,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let resp = c.request(req.body(Full::new(body)).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The `WWW-Authenticate` header of an unauthenticated request (the gateway's names an
/// `error`, the services' a `realm`: it tells who refused).
async fn www_authenticate(c: &Http, method: &str, url: &str) -> String {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    resp.headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn http_text(c: &Http, url: &str) -> String {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

async fn wait_for<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tessera_testkit::wait_until(what, std::time::Duration::from_secs(60), cond).await;
}

/// Process ids whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// A second `tessera demo` beside a running one: on a port in use, or on the same data
/// dir, it exits with an error naming the problem, before it starts anything or writes a
/// file, and the running demo's registry and config are as they were.
async fn a_second_demo_is_refused_and_changes_nothing(c: &Http, demo: &Demo, dir: &Path) {
    let config = std::fs::read(dir.join("gateway.toml")).unwrap();
    let instances = |c: Http, registry: String| async move {
        let (_, v) = call(
            &c,
            "GET",
            &format!("http://{registry}/v1/agent/services"),
            None,
            None,
        )
        .await;
        v.as_object().unwrap().len()
    };
    let before = instances(c.clone(), demo.registry.clone()).await;
    let other = tempfile::tempdir().unwrap();
    let cases: [(Vec<String>, &str); 2] = [
        (
            vec![
                "--registry".into(),
                demo.registry.clone(),
                "--gateway".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                other.path().to_string_lossy().into_owned(),
            ],
            demo.registry.as_str(),
        ),
        (
            vec![
                "--registry".into(),
                "127.0.0.1:0".into(),
                "--gateway".into(),
                "127.0.0.1:0".into(),
                "--fresh".into(),
                "--data-dir".into(),
                dir.to_string_lossy().into_owned(),
            ],
            "in use by another `tessera demo`",
        ),
    ];
    for (args, needle) in cases {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(BIN)
                .arg("demo")
                .args(&args)
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .expect("the second demo gave up in time")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(
        std::fs::read_dir(other.path()).unwrap().next().is_none(),
        "the refused demo wrote into its data dir"
    );
    assert_eq!(std::fs::read(dir.join("gateway.toml")).unwrap(), config);
    assert_eq!(instances(c.clone(), demo.registry.clone()).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_works_and_the_demo_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // Spans from every process go to a collector here (what `OTEL_*` tells the demo).
    let collector = tessera_testkit::otlp::Collector::start().await;
    let demo = Demo::start_with(
        dir.path(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let c = client();
    let gw = format!("http://{}", demo.gateway);
    a_second_demo_is_refused_and_changes_nothing(&c, &demo, dir.path()).await;
    // Secrets in the data dir are the owner's only.
    for secret in ["admin-password", "users/users-signing-key.der"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    // A shop service's unknown route and wrong method answer the JSON error shape.
    let (s, v) = call(&c, "GET", &format!("{gw}/api/catalog"), None, None).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");
    // Logs are plain text: no terminal colour codes.
    let log = std::fs::read_to_string(dir.path().join("logs/server.log")).unwrap();
    assert!(!log.contains('\u{1b}'), "ANSI escape codes in server.log");

    // Browse without a token; writes to the catalog need an admin.
    let (s, products) = call(&c, "GET", &format!("{gw}/api/catalog/products"), None, None).await;
    assert_eq!(s, 200);
    let stock_of = |products: &Value, id: &str| {
        products
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .unwrap()["stock"]
            .as_i64()
            .unwrap()
    };
    let machine_stock = stock_of(&products, "machine");
    let mug_stock = stock_of(&products, "mug");
    let new_product = json!({"id": "spoon", "name": "Spoon", "price_cents": 100, "stock": 5});
    let (s, v) = call(
        &c,
        "POST",
        &format!("{gw}/api/catalog/products"),
        None,
        Some(new_product.clone()),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (401, Some("unauthorized")));

    // The gateway itself refuses requests without a token on protected routes.
    for (m, path) in [
        ("POST", "/api/catalog/products"),
        ("GET", "/api/cart"),
        ("GET", "/api/orders"),
    ] {
        let w = www_authenticate(&c, m, &format!("{gw}{path}")).await;
        assert!(w.starts_with("Bearer error="), "{m} {path}: {w}");
    }

    // Register, log in.
    let creds = json!({"email": "ada@example.com", "password": "correct-horse"});
    let (s, _) = call(
        &c,
        "POST",
        &format!("{gw}/api/users/register"),
        None,
        Some(creds.clone()),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        &c,
        "POST",
        &format!("{gw}/api/users/register"),
        None,
        Some(creds.clone()),
    )
    .await;
    assert_eq!(s, 409, "the same email twice");
    let (s, v) = call(
        &c,
        "POST",
        &format!("{gw}/api/users/login"),
        None,
        Some(json!({"email": "ada@example.com", "password": "wrong-horse"})),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (401, Some("bad_credentials")));
    let (s, v) = call(
        &c,
        "POST",
        &format!("{gw}/api/users/login"),
        None,
        Some(creds),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    let t = Some(token.as_str());
    let (s, _) = call(
        &c,
        "POST",
        &format!("{gw}/api/catalog/products"),
        t,
        Some(new_product),
    )
    .await;
    assert_eq!(s, 403, "customers cannot write the catalog");
    let (s, v) = call(
        &c,
        "GET",
        &format!("{gw}/api/cart"),
        Some("not-a-token"),
        None,
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (401, Some("unauthorized")));

    // Cart, checkout (saga), order, balance, cart emptied by the OrderPlaced event.
    let (s, _) = call(
        &c,
        "POST",
        &format!("{gw}/api/cart/items"),
        t,
        Some(json!({"product_id": "mug", "quantity": 2})),
    )
    .await;
    assert_eq!(s, 200);
    // The checkout comes with a trace of its own.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = http::Request::post(format!("{gw}/api/orders/checkout"))
        .header("authorization", format!("Bearer {token}"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let s = resp.status().as_u16();
    let order: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(s, 201, "{order}");
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["total_cents"], 1980);
    checkout_is_one_trace(&collector, trace).await;
    let traced_order = order["id"].as_str().unwrap().to_owned();
    let (_, me) = call(
        &c,
        "GET",
        &format!("{gw}/api/payments/accounts/me"),
        t,
        None,
    )
    .await;
    assert_eq!(me["balance_cents"], 20_000 - 1980);
    let (_, orders) = call(&c, "GET", &format!("{gw}/api/orders"), t, None).await;
    assert_eq!(orders.as_array().unwrap().len(), 1);
    wait_for("the cart to be emptied by OrderPlaced", || {
        let (c, url) = (c.clone(), format!("{gw}/api/cart"));
        async move {
            call(&c, "GET", &url, t, None).await.1["items"]
                .as_array()
                .is_some_and(Vec::is_empty)
        }
    })
    .await;
    let (s, v) = call(&c, "POST", &format!("{gw}/api/orders/checkout"), t, None).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("the cart is empty")));

    // Short of funds: the saga compensates, the order is cancelled with the reason, and
    // the stock taken by the first step is back.
    let body = json!({"items": [{"product_id": "machine", "quantity": 1}]});
    let (s, order) = call(
        &c,
        "POST",
        &format!("{gw}/api/orders/checkout"),
        t,
        Some(body),
    )
    .await;
    assert_eq!(s, 201, "{order}");
    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["reason"], "insufficient funds");
    let (_, products) = call(&c, "GET", &format!("{gw}/api/catalog/products"), None, None).await;
    assert_eq!(stock_of(&products, "machine"), machine_stock);
    assert_eq!(stock_of(&products, "mug"), mug_stock - 2);
    let (_, me) = call(
        &c,
        "GET",
        &format!("{gw}/api/payments/accounts/me"),
        t,
        None,
    )
    .await;
    assert_eq!(
        me["balance_cents"],
        20_000 - 1980,
        "nothing charged for the cancelled order"
    );

    // An order id only its owner (or an admin) can see.
    let other = json!({"email": "bob@example.com", "password": "battery-staple"});
    call(
        &c,
        "POST",
        &format!("{gw}/api/users/register"),
        None,
        Some(other.clone()),
    )
    .await;
    let (_, v) = call(
        &c,
        "POST",
        &format!("{gw}/api/users/login"),
        None,
        Some(other),
    )
    .await;
    let bob = v["token"].as_str().unwrap().to_owned();
    let url = format!("{gw}/api/orders/{}", order["id"].as_str().unwrap());
    assert_eq!(call(&c, "GET", &url, Some(&bob), None).await.0, 404);
    assert_eq!(call(&c, "GET", &url, t, None).await.0, 200);

    // The events: one OrderPlaced and one OrderCancelled in the order category.
    wait_for("both order events in the event store", || {
        let (c, url) = (
            c.clone(),
            format!("http://{}/v1/streams/order-*", demo.registry),
        );
        async move {
            let (_, v) = call(&c, "GET", &url, None, None).await;
            let kinds: Vec<&str> = v
                .as_array()
                .map(|a| a.iter().filter_map(|e| e["type"].as_str()).collect())
                .unwrap_or_default();
            kinds.contains(&"OrderPlaced") && kinds.contains(&"OrderCancelled")
        }
    })
    .await;
    // The traced checkout's event carries its trace, from the outbox row to the store.
    let url = format!("http://{}/v1/streams/order-{traced_order}", demo.registry);
    let (_, v) = call(&c, "GET", &url, None, None).await;
    let placed = v
        .as_array()
        .and_then(|a| a.iter().find(|e| e["type"] == "OrderPlaced"))
        .unwrap_or_else(|| panic!("{v}"));
    let carried = placed["metadata"]["traceparent"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(carried.split('-').nth(1), Some(trace), "{placed}");

    // One metrics scheme over the whole demo, each `/metrics` accepted by promtool: the
    // server's registry, sagas, participant calls and consumer groups; orders' calls to
    // the services it uses.
    let server_metrics = http_text(&c, &format!("http://{}/metrics", demo.registry)).await;
    tessera_testkit::prometheus::check_metrics(&server_metrics);
    let value = |text: &str, prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in {text}"))
    };
    for (prefix, at_least) in [
        ("tessera_sagas{status=\"completed\"}", 1.0),
        (
            "tessera_coordinator_calls_total{participant=\"payments\",result=\"ok\"}",
            1.0,
        ),
        (
            "tessera_coordinator_call_duration_seconds_count{participant=\"catalog\"}",
            1.0,
        ),
        ("tessera_registry_instances{status=\"passing\"}", 10.0),
        ("tessera_events_appended_total", 2.0),
        (
            "tessera_http_server_requests_total{method=\"POST\",route=\"/v1/sagas\",status=\"2xx\"}",
            1.0,
        ),
    ] {
        assert!(
            value(&server_metrics, prefix) >= at_least,
            "{prefix} in {server_metrics}"
        );
    }
    assert!(
        server_metrics
            .contains("tessera_events_consumer_group_lag{group=\"cart\",selection=\"order-*\"}"),
        "{server_metrics}"
    );
    let (_, v) = call(
        &c,
        "GET",
        &format!("http://{}/v1/health/service/orders?passing", demo.registry),
        None,
        None,
    )
    .await;
    let mut reported = false;
    for e in v.as_array().unwrap() {
        let url = format!("http://127.0.0.1:{}/metrics", e["Service"]["Port"]);
        let text = http_text(&c, &url).await;
        tessera_testkit::prometheus::check_metrics(&text);
        reported |=
            text.contains("tessera_client_requests_total{upstream=\"catalog\",status=\"2xx\"}");
    }
    assert!(reported, "an orders replica reports its calls to catalog");

    // The admin seeded by the demo can write the catalog.
    let (_, v) = call(
        &c,
        "POST",
        &format!("{gw}/api/users/login"),
        None,
        Some(json!({"email": "admin@shop.test", "password": demo.admin_password})),
    )
    .await;
    let admin = v["token"].as_str().unwrap().to_owned();
    let (s, v) = call(
        &c,
        "DELETE",
        &format!("{gw}/api/catalog/products"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{v}"
    );
    let (s, _) = call(
        &c,
        "POST",
        &format!("{gw}/api/catalog/products"),
        Some(&admin),
        Some(json!({"id": "spoon", "name": "Spoon", "price_cents": 100, "stock": 5})),
    )
    .await;
    assert_eq!(s, 201);

    // The data adds up.
    let (ok, out, err) = common::run_cli(
        &demo.registry,
        &["demo", "--verify", "--registry", &demo.registry],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("consistent"), "{out}");

    // Every service instance's port, to check they are all closed after the stop.
    let mut ports = vec![demo.gateway.clone(), demo.registry.clone()];
    for svc in ["users", "catalog", "cart", "orders", "payments"] {
        let (_, v) = call(
            &c,
            "GET",
            &format!("http://{}/v1/health/service/{svc}?passing", demo.registry),
            None,
            None,
        )
        .await;
        let entries = v.as_array().unwrap();
        assert_eq!(entries.len(), 2, "two replicas of {svc}");
        for e in entries {
            let at = format!("127.0.0.1:{}", e["Service"]["Port"]);
            // Every instance serves its health and Prometheus metrics.
            assert_eq!(
                call(&c, "GET", &format!("http://{at}/health"), None, None)
                    .await
                    .0,
                200
            );
            let metrics = http_text(&c, &format!("http://{at}/metrics")).await;
            assert!(
                metrics.contains(
                    "tessera_http_server_requests_total{method=\"GET\",route=\"/health\",status=\"2xx\"}"
                ),
                "{svc} metrics: {metrics}"
            );
            tessera_testkit::prometheus::check_metrics(&metrics);
            ports.push(at);
        }
    }
    // A compensation that arrives before its action (the action's request was slow)
    // leaves a tombstone: the late action is refused instead of taking effect.
    let instance = |svc: &str| {
        let reg = demo.registry.clone();
        let c = c.clone();
        let svc = svc.to_owned();
        async move {
            let url = format!("http://{reg}/v1/health/service/{svc}?passing");
            let (_, v) = call(&c, "GET", &url, None, None).await;
            format!("http://127.0.0.1:{}", v[0]["Service"]["Port"])
        }
    };
    let post = |url: String, body: Option<Value>| {
        let c = c.clone();
        async move { call(&c, "POST", &url, None, body).await }
    };
    let catalog = instance("catalog").await;
    let payments = instance("payments").await;
    let reserve = json!({"order_id": "late-1", "items": [{"product_id": "mug", "quantity": 1}]});
    let charge = json!({"order_id": "late-2", "user_id": "someone", "amount_cents": 100});
    for (undo, action, body, code) in [
        (
            format!("{catalog}/internal/reservations/late-1/release"),
            format!("{catalog}/internal/reservations"),
            reserve,
            "released",
        ),
        (
            format!("{payments}/internal/charges/late-2/refund"),
            format!("{payments}/internal/charges"),
            charge,
            "refunded",
        ),
    ] {
        assert_eq!(post(undo, None).await.0, 200);
        let (s, v) = post(action, Some(body)).await;
        assert_eq!((s, v["code"].as_str()), (409, Some(code)), "{v}");
    }
    // And a repeated action is answered again without a second effect.
    let charge = json!({"order_id": "late-3", "user_id": "someone", "amount_cents": 100});
    for _ in 0..2 {
        let url = format!("{payments}/internal/charges");
        assert_eq!(post(url, Some(charge.clone())).await.0, 200);
    }
    // --verify notices a payment taken for no order (exit 1, naming it) ...
    let verify_args = ["demo", "--verify", "--registry", demo.registry.as_str()];
    let verify = || common::run_cli(&demo.registry, &verify_args);
    let (ok, out, _) = verify().await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("payment was taken for order late-3, which does not exist"),
        "{out}"
    );
    // ... and is satisfied once it is refunded.
    let (s, _) = call(
        &c,
        "POST",
        &format!("{payments}/internal/charges/late-3/refund"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (ok, out, err) = verify().await;
    assert!(ok, "{out}{err}");
    let data_dir = dir.path().to_string_lossy().into_owned();
    assert!(
        processes_mentioning(&data_dir).len() >= 12,
        "server, gateway and 10 services run"
    );
    demo.stop().await;
    wait_for("every child process to be gone", || {
        let d = data_dir.clone();
        async move { processes_mentioning(&d).is_empty() }
    })
    .await;
    for p in ports {
        assert!(
            tokio::net::TcpStream::connect(&p).await.is_err(),
            "{p} still accepts connections"
        );
    }
}

/// The checkout's spans at the collector make one trace: the gateway's server span under
/// the caller, orders' server span under the gateway's try, cart's under one of orders'
/// calls, the checkout saga under orders' call that started it, with its step calls and
/// the participants they reached, the outbox relay's append of the OrderPlaced event
/// orders' confirm step wrote, and cart's handling of it.
/// `tessera demo --prometheus`: Debian's Prometheus finds every process through the
/// registry's HTTP service discovery and scrapes each (`up == 1`), and every PromQL
/// expression of the Grafana dashboards in `deploy/grafana` returns data from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_is_found_by_prometheus_and_every_dashboard_query_answers() {
    if tessera_testkit::prometheus::promtool().is_none() {
        return; // promtool and prometheus come in one package; it said why
    }
    let dir = tempfile::tempdir().unwrap();
    let collector = tessera_testkit::otlp::Collector::start().await;
    let demo = Demo::start_with(
        dir.path(),
        &["--prometheus", "127.0.0.1:0"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint)],
    )
    .await;
    let prom = demo.prometheus.clone().expect("the demo names Prometheus");
    let c = client();
    let gw = format!("http://{}", demo.gateway);
    // Traffic for the rates: a shopper's checkout (gateway, services, a saga, events).
    let token = shopper(&c, &gw, "watcher@shop.test", "watcher-password").await;
    add_a_mug(&c, &gw, &token).await;
    let (s, v) = checkout_with_key(&c, &gw, &token, "watched-order").await;
    assert!(s < 300, "{s} {v}");

    let query = |expr: String| {
        let (c, prom) = (c.clone(), prom.clone());
        async move {
            let url = format!("http://{prom}/api/v1/query?query={}", form_encode(&expr));
            let (s, v) = call(&c, "GET", &url, None, None).await;
            assert!(s == 200 || s == 503, "{expr}: {s} {v}");
            v["data"]["result"].as_array().cloned().unwrap_or_default()
        }
    };
    // Every process: the server, the gateway, two replicas of each of five services.
    wait_for("Prometheus has every demo process up", || async move {
        let up = query("up".into()).await;
        up.len() == 12 && up.iter().all(|r| r["value"][1] == "1")
    })
    .await;
    let up = query("count by (service) (up)".into()).await;
    let mut services: Vec<(String, String)> = up
        .iter()
        .map(|r| {
            (
                r["metric"]["service"].as_str().unwrap().to_owned(),
                r["value"][1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    services.sort();
    let want: Vec<(String, String)> = [
        ("cart", "2"),
        ("catalog", "2"),
        ("orders", "2"),
        ("payments", "2"),
        ("tessera-gateway", "1"),
        ("tessera-server", "1"),
        ("users", "2"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    assert_eq!(services, want);

    // Every dashboard query, with Grafana's `$__rate_interval` as a minute.
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana");
    let mut exprs = Vec::new();
    for entry in std::fs::read_dir(&dashboards).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for panel in d["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().unwrap() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m");
                exprs.push((
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    expr,
                ));
            }
        }
    }
    assert!(exprs.len() >= 40, "{} queries", exprs.len());
    for (file, expr) in exprs {
        wait_for(&format!("{file}: {expr} returns data"), || {
            let expr = expr.clone();
            async move { !query(expr).await.is_empty() }
        })
        .await;
    }
    demo.stop().await;
}

/// `application/x-www-form-urlencoded` for a query parameter.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn checkout_is_one_trace(collector: &tessera_testkit::otlp::Collector, trace: &str) {
    use tessera_testkit::otlp::SeenSpan;
    let find = |spans: &[SeenSpan], service: &str, kind: u64, parent: &str| {
        spans
            .iter()
            .find(|s| {
                s.service == service
                    && s.kind == kind
                    && (parent.is_empty() || s.parent_id == parent)
            })
            .cloned()
    };
    let chain = |spans: &[SeenSpan]| {
        let gw = find(spans, "gateway", 2, "00f067aa0ba902b7")?;
        let gw_try = find(spans, "gateway", 3, &gw.span_id)?;
        let orders = find(spans, "orders", 2, &gw_try.span_id)?;
        // orders calls users (keys), cart and catalog: cart's parent is one of them.
        let cart = spans.iter().find(|c| {
            c.service == "cart"
                && c.kind == 2
                && spans.iter().any(|call| {
                    call.service == "orders"
                        && call.kind == 3
                        && call.parent_id == orders.span_id
                        && call.span_id == c.parent_id
                })
        })?;
        // orders starts the checkout saga on the server: the saga is a span under that
        // request, each step call one under the saga, and the participant continues it.
        let child_of = |parent: &SeenSpan, service: &str, kind: u64| {
            spans
                .iter()
                .filter(|s| s.service == service && s.kind == kind && s.parent_id == parent.span_id)
                .cloned()
                .collect::<Vec<_>>()
        };
        let start = child_of(&orders, "orders", 3)
            .into_iter()
            .flat_map(|call| child_of(&call, "tessera-server", 2))
            .find(|s| s.name == "POST /v1/sagas")?;
        let saga = child_of(&start, "tessera-server", 1).into_iter().next()?;
        let steps = child_of(&saga, "tessera-server", 3);
        let participant = steps
            .iter()
            .flat_map(|step| ["catalog", "payments"].map(|p| child_of(step, p, 2)))
            .flatten()
            .next()?;
        // orders writes OrderPlaced while serving the saga's confirm step; cart's handling
        // of it is a consumer span of the same trace, under that request.
        let consumed = spans.iter().find(|c| {
            c.service == "cart"
                && c.kind == 5
                && spans.iter().any(|o| {
                    o.service == "orders"
                        && o.name == "POST /internal/orders/{id}/confirm"
                        && o.span_id == c.parent_id
                })
        })?;
        assert_eq!(consumed.name, "process OrderPlaced");
        // The outbox relay's append of that event is in the trace too, under the same request.
        spans.iter().find(|a| {
            a.service == "tessera-server"
                && a.name == "POST /v1/streams/{stream}"
                && a.parent_id == consumed.parent_id
        })?;
        Some((gw, orders, cart.clone(), saga, steps, participant))
    };
    let of_trace = || -> Vec<SeenSpan> {
        collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace)
            .collect()
    };
    wait_for("the checkout's whole trace at the collector", || {
        let whole = chain(&of_trace()).is_some();
        async move { whole }
    })
    .await;
    let (gw, orders, cart, saga, steps, participant) = chain(&of_trace()).unwrap();
    assert_eq!(gw.attributes["url.path"], "/api/orders/checkout");
    assert_eq!(gw.attributes["http.response.status_code"], "201");
    assert_eq!(orders.attributes["http.response.status_code"], "201");
    // orders reads (and clears) the cart over gRPC: a span by the RPC conventions.
    assert_eq!(cart.attributes["rpc.system"], "grpc");
    assert_eq!(cart.attributes["rpc.service"], "tessera.shop.cart.v1.Cart");
    assert!(
        cart.name.starts_with("tessera.shop.cart.v1.Cart/"),
        "{cart:?}"
    );
    assert_eq!(saga.name, "saga checkout");
    assert_eq!(saga.attributes["tessera.saga.status"], "completed");
    assert!(
        steps.iter().all(|s| s.name.starts_with("step ")),
        "{steps:?}"
    );
    assert_eq!(participant.attributes["http.request.method"], "POST");
}

/// `tessera demo --load --chaos` with every shop service on SQLite, or on PostgreSQL
/// when `database_url` is given.
async fn chaos_run(database_url: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "demo",
        "--gateway",
        "127.0.0.1:0",
        "--registry",
        "127.0.0.1:0",
        "--fresh",
    ])
    .args([
        "--load",
        "--chaos",
        "--duration",
        "12s",
        "--concurrency",
        "8",
        "--shoppers",
        "8",
    ])
    .arg("--data-dir")
    .arg(dir.path())
    .env_remove("DATABASE_URL")
    .env_remove("TESSERA_DATABASE_URL")
    .env_remove("TESSERA_EVENTS")
    .stdin(Stdio::null())
    .kill_on_drop(true);
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("chaos: killed"), "{stdout}");
    assert!(
        stdout.contains("consistent: every confirmed order"),
        "{stdout}"
    );
    // Zero failed idempotent requests: reads are retried by the gateway, checkouts by
    // the client with the same Idempotency-Key.
    assert!(
        stdout.contains("failed idempotent requests: 0 "),
        "{stdout}"
    );
    let confirmed = stdout
        .lines()
        .find(|l| l.starts_with("orders: "))
        .expect("report");
    assert!(!confirmed.starts_with("orders: 0 confirmed"), "{stdout}");
    // The server stays healthy under the load: no ERROR line (the event store's writer
    // once clashed with consumer-group acks here, "database is locked").
    let server_log = std::fs::read_to_string(dir.path().join("logs/server.log")).unwrap();
    let errors: Vec<&str> = server_log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "ERROR lines in server.log: {errors:#?}");
    let data_dir = dir.path().to_string_lossy().into_owned();
    wait_for("every child process to be gone", || {
        let d = data_dir.clone();
        async move { processes_mentioning(&d).is_empty() }
    })
    .await;
}

/// Registers a customer and logs in: their token.
async fn shopper(c: &Http, gw: &str, email: &str, password: &str) -> String {
    let creds = json!({"email": email, "password": password});
    let (s, v) = call(
        c,
        "POST",
        &format!("{gw}/api/users/register"),
        None,
        Some(creds.clone()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (_, v) = call(
        c,
        "POST",
        &format!("{gw}/api/users/login"),
        None,
        Some(creds),
    )
    .await;
    v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned()
}

/// POST with an `Idempotency-Key`, as a client retrying a checkout does.
/// Puts one mug in the shopper's cart.
async fn add_a_mug(c: &Http, gw: &str, token: &str) {
    let (s, v) = call(
        c,
        "POST",
        &format!("{gw}/api/cart/items"),
        Some(token),
        Some(json!({"product_id": "mug", "quantity": 1})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

async fn checkout_with_key(c: &Http, gw: &str, token: &str, key: &str) -> (u16, Value) {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("{gw}/api/orders/checkout"))
        .header("authorization", format!("Bearer {token}"))
        .header("idempotency-key", key)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The whole demo on a real tmpfs that fills up during a checkout: the answer is the
/// order (held pending) or a JSON error, never a hang or a half-made order; once the disk
/// has room, the retry with the same Idempotency-Key ends with exactly one confirmed
/// order, and stock and balances add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_on_a_full_disk_is_kept_once_or_refused_cleanly() {
    let Some(disk) = tessera_testkit::Tmpfs::mount_or_skip(512 << 20) else {
        return;
    };
    let dir = disk.path().join("demo");
    let demo = Demo::start(&dir).await;
    let c = client();
    let gw = format!("http://{}", demo.gateway);
    let token = shopper(&c, &gw, "full@shop.test", "full-disk-pass-1").await;
    let t = Some(token.as_str());
    let (s, _) = call(
        &c,
        "POST",
        &format!("{gw}/api/cart/items"),
        t,
        Some(json!({"product_id": "mug", "quantity": 1})),
    )
    .await;
    assert_eq!(s, 200);

    let filler = disk.fill();
    let (s, v) = tokio::time::timeout(
        Duration::from_secs(120),
        checkout_with_key(&c, &gw, &token, "full-1"),
    )
    .await
    .expect("a checkout on a full disk is answered");
    match s {
        201 | 202 => {}
        500..=599 => {
            assert_eq!((s, v["code"].as_str()), (507, Some("storage_full")), "{v}");
            assert!(
                v["error"].as_str().is_some_and(|e| e.contains("ENOSPC")),
                "{v}"
            );
            // Nothing half-made: no order exists for it yet.
            let (_, orders) = call(&c, "GET", &format!("{gw}/api/orders"), t, None).await;
            let n = orders.as_array().map_or(0, Vec::len);
            assert!(n <= 1, "{orders}");
        }
        other => panic!("checkout on a full disk: {other} {v}"),
    }
    disk.free(&filler);

    // The client retries with the same key until the order is settled.
    wait_for("the retried checkout to be confirmed", || {
        let (c, gw, token) = (c.clone(), gw.clone(), token.clone());
        async move {
            let (s, v) = checkout_with_key(&c, &gw, &token, "full-1").await;
            (s == 201 || s == 200) && v["status"] == "confirmed"
        }
    })
    .await;
    let (_, orders) = call(&c, "GET", &format!("{gw}/api/orders"), t, None).await;
    assert_eq!(
        orders.as_array().map(Vec::len),
        Some(1),
        "exactly one order: {orders}"
    );
    let (ok, out, err) = common::run_cli(
        &demo.registry,
        &["demo", "--verify", "--registry", &demo.registry],
    )
    .await;
    assert!(ok, "{out}\n{err}");
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_burst_with_replicas_killed_leaves_no_inconsistent_order() {
    chaos_run(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_runs_on_postgresql_too() {
    let Some(db) = tessera_testkit::PgDatabase::create_or_skip() else {
        return;
    };
    chaos_run(Some(&db.url)).await;
}

/// `tessera demo --cluster`: 3 etcd members and 3 servers on them. A checkout works;
/// the first server (the one listed first to the gateway and the shop) is killed with
/// SIGKILL; a second shopper's checkout (retried with its Idempotency-Key, as a client
/// does) is confirmed on the others, and the catalog still answers through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_demo_survives_a_killed_server() {
    if std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(std::env::var_os("CI").is_none(), "etcd is required in CI");
        eprintln!("skipping: etcd is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start_with(dir.path(), &["--cluster", "--replicas", "1"], &[]).await;
    let c = client();
    let gw = format!("http://{}", demo.gateway);
    let buy = |email: &'static str| {
        let (c, gw) = (c.clone(), gw.clone());
        async move {
            let token = shopper(&c, &gw, email, "password-123456").await;
            add_a_mug(&c, &gw, &token).await;
            wait_for("the checkout to be confirmed", || {
                let (c, gw, token) = (c.clone(), gw.clone(), token.clone());
                async move {
                    let (s, v) = checkout_with_key(&c, &gw, &token, email).await;
                    (s == 201 || s == 200) && v["status"] == "confirmed"
                }
            })
            .await;
        }
    };
    buy("before@shop.test").await;
    let first = format!("{}/server-1", dir.path().display());
    let pids = processes_mentioning(&first);
    assert_eq!(pids.len(), 1, "server-1: {pids:?}");
    tessera_testkit::signal(pids[0], "KILL");
    wait_for("server-1 to be gone", || {
        let first = first.clone();
        async move { processes_mentioning(&first).is_empty() }
    })
    .await;
    buy("after@shop.test").await;
    let (s, _) = call(&c, "GET", &format!("{gw}/api/catalog/products"), None, None).await;
    assert_eq!(s, 200);
    // The demo itself goes on (a cluster server may die) and stops cleanly.
    demo.stop().await;
}

/// Orders reads each buyer's cart over gRPC at checkout. A cart replica killed with
/// kill -9 while four buyers check out in a loop fails none of their checkouts: the
/// calls that meet the dead replica (a reset stream, a refused connection) are
/// UNAVAILABLE, which orders' channel retries on the other replica until the registry
/// drops the dead one. The checkouts are plain POSTs, never retried by the buyers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_replica_killed_under_checkouts_fails_none() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path()).await;
    let c = client();
    let gw = format!("http://{}", demo.gateway);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut buyers = Vec::new();
    for i in 0..4 {
        let token = shopper(&c, &gw, &format!("grpc{i}@shop.test"), "grpc-kill-pass-1").await;
        let (c, gw, done, killed, stop) = (
            c.clone(),
            gw.clone(),
            done.clone(),
            killed.clone(),
            stop.clone(),
        );
        buyers.push(tokio::spawn(async move {
            let (mut after_kill, mut failed) = (0u32, Vec::new());
            // Bounded: 40 checkouts of one or two filters (4.50 each) fit the 200.00
            // every account starts with, and two minutes.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            for _ in 0..40 {
                if stop.is_cancelled() || tokio::time::Instant::now() > deadline {
                    break;
                }
                // Filling the cart is REST through the gateway, a POST it does not
                // resend: one that met the dying replica is simply made again.
                let url = format!("{gw}/api/cart/items");
                let item = json!({"product_id": "filter", "quantity": 1});
                wait_for("the cart to take an item", || {
                    let (c, url, token, item) =
                        (c.clone(), url.clone(), token.clone(), item.clone());
                    async move { call(&c, "POST", &url, Some(&token), Some(item)).await.0 == 200 }
                })
                .await;
                let was_killed = killed.load(std::sync::atomic::Ordering::SeqCst);
                let (s, v) = call(
                    &c,
                    "POST",
                    &format!("{gw}/api/orders/checkout"),
                    Some(&token),
                    None,
                )
                .await;
                if (s == 201 && v["status"] == "confirmed") || s == 202 {
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    after_kill += u32::from(was_killed);
                } else {
                    failed.push(format!("{s} {v}"));
                }
            }
            (after_kill, failed)
        }));
    }
    let reached = |n: u32| {
        let done = done.clone();
        move || std::future::ready(done.load(std::sync::atomic::Ordering::SeqCst) >= n)
    };
    wait_for("eight checkouts before the kill", reached(8)).await;
    // Whether a call meets the dead replica before the registry drops it is the
    // balancer's choice, so kill again (a fresh replica replacing each) until orders has
    // had to route around one: bounded, each round gives it even odds or better.
    let orders_retries = || async {
        let (_, instances) = call(
            &c,
            "GET",
            &format!("http://{}/v1/health/service/orders", demo.registry),
            None,
            None,
        )
        .await;
        let mut retries = 0.0;
        for i in instances.as_array().into_iter().flatten() {
            let url = format!(
                "http://{}:{}/metrics",
                i["Service"]["Address"].as_str().unwrap(),
                i["Service"]["Port"]
            );
            for line in http_text(&c, &url).await.lines() {
                if let Some(n) =
                    line.strip_prefix("tessera_client_retries_total{upstream=\"cart\"} ")
                {
                    retries += n.parse::<f64>().unwrap();
                }
            }
        }
        retries
    };
    let d = dir.path().to_string_lossy().into_owned();
    let mut replacements = Vec::new();
    for round in 1..=10 {
        let cart = processes_mentioning(&d)
            .into_iter()
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("shop\0cart\0"))
            })
            .expect("a cart replica");
        let sent = std::process::Command::new("kill")
            .args(["-9", &cart.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        killed.store(true, std::sync::atomic::Ordering::SeqCst);
        let at_kill = done.load(std::sync::atomic::Ordering::SeqCst);
        wait_for("ten checkouts after the kill", reached(at_kill + 10)).await;
        if orders_retries().await > 0.0 {
            break;
        }
        assert!(round < 10, "orders never had to retry a call to the cart");
        replacements
            .push(common::spawn_shop("cart", &demo.registry, &dir.path().join("cart")).await);
        let url = format!("http://{}/v1/health/service/cart?passing", demo.registry);
        wait_for("two cart replicas again", || {
            let (c, url) = (c.clone(), url.clone());
            async move {
                call(&c, "GET", &url, None, None)
                    .await
                    .1
                    .as_array()
                    .is_some_and(|a| a.len() == 2)
            }
        })
        .await;
    }
    stop.cancel();
    let mut after = 0;
    for b in buyers {
        let (n, failed) = b.await.unwrap();
        assert!(failed.is_empty(), "failed checkouts: {failed:#?}");
        after += n;
    }
    assert!(after >= 10, "{after} checkouts after the kill");
    drop(replacements);
    demo.stop().await;
}
