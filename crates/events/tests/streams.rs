//! The event store through its real HTTP API on a loopback port: optimistic concurrency,
//! idempotent appends, forward and category reads, server-sent-event subscriptions that
//! catch up, go live and resume across a server restart with no gap and no duplicate,
//! and consumer-group offsets that survive the restart.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tessera_events::EventStore;

/// Which backend a test server runs on; the same value reopens it after a "restart".
pub enum Kind {
    Sqlite(tempfile::TempDir),
    /// A namespace of its own on the machine's NATS; its streams are deleted on drop.
    Nats(String),
}

const NATS_URL: &str = "nats://127.0.0.1:4222";

impl Kind {
    fn sqlite() -> Kind {
        Kind::Sqlite(tempfile::tempdir().unwrap())
    }

    /// Outside CI a missing NATS skips the test (None); in CI it fails it.
    async fn nats() -> Option<Kind> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        if let Err(e) = async_nats::connect(NATS_URL).await {
            assert!(
                std::env::var("CI").is_err(),
                "NATS at {NATS_URL} is required in CI: {e}"
            );
            eprintln!("skipping: no NATS at {NATS_URL} ({e})");
            return None;
        }
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Kind::Nats(format!("t{}x{n}", std::process::id())))
    }

    fn is_nats(&self) -> bool {
        matches!(self, Kind::Nats(_))
    }
}

impl Drop for Kind {
    fn drop(&mut self) {
        if let Kind::Nats(ns) = self {
            let ns = ns.to_ascii_uppercase();
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async {
                        if let Ok(c) = async_nats::connect(NATS_URL).await {
                            let js = async_nats::jetstream::new(c);
                            let _ = js.delete_stream(format!("{ns}_EVENTS")).await;
                            let _ = js.delete_stream(format!("{ns}_OFFSETS")).await;
                        }
                    })
            })
            .join();
        }
    }
}

struct Server {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    events: EventStore,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(kind: &Kind) -> Server {
        let events = match kind {
            Kind::Sqlite(dir) => EventStore::open(dir.path()).await.unwrap(),
            Kind::Nats(ns) => EventStore::open_nats(NATS_URL, ns).await.unwrap(),
        };
        let app = events.router(Arc::new(tessera_core::AllowAll));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Server {
            base: format!("http://{addr}"),
            http: Client::builder(TokioExecutor::new()).build_http(),
            events,
            task,
        }
    }

    async fn metrics(&self) -> String {
        let mut out = tessera_metrics::Text::new();
        self.events.render_metrics(&mut out).await.unwrap();
        let text = out.finish();
        tessera_testkit::prometheus::check_metrics(&text);
        text
    }

    fn stop(self) {
        self.events.shutdown();
        self.task.abort();
    }

    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .body(Full::new(body))
            .unwrap();
        let resp = self.http.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned()));
        (status, v)
    }

    async fn append(&self, stream: &str, expected: Value, events: &[(&str, &str)]) -> (u16, Value) {
        let events: Vec<Value> = events
            .iter()
            .map(|(id, kind)| json!({"id": id, "type": kind, "data": {"id": id}}))
            .collect();
        self.send(
            "POST",
            &format!("/v1/streams/{stream}"),
            Some(json!({"expected_version": expected, "events": events})),
        )
        .await
    }

    async fn subscribe(&self, path: &str, last_event_id: Option<i64>) -> Subscription {
        let mut req = http::Request::builder().uri(format!("{}{path}", self.base));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = self
            .http
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Subscription {
            body: resp.into_body(),
            buf: String::new(),
        }
    }
}

/// A server-sent-event stream being read.
struct Subscription {
    body: hyper::body::Incoming,
    buf: String,
}

impl Subscription {
    /// The next event: (id, event JSON).
    async fn next(&mut self) -> (i64, Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let Some(id) = id {
                    return (id, serde_json::from_str(&data).unwrap());
                }
                continue; // a keep-alive comment
            }
            let frame = tokio::time::timeout(Duration::from_secs(60), self.body.frame())
                .await
                .expect("an event in time")
                .expect("the stream stays open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }
}

async fn two_writers_expecting_the_same_version_one_wins(kind: &Kind) {
    let s = Server::start(kind).await;
    let (st, v) = s
        .append("order-1", json!("no_stream"), &[("e0", "OrderPlaced")])
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (v["first_version"].as_i64(), v["last_version"].as_i64()),
        (Some(0), Some(0))
    );
    let (a, b) = tokio::join!(
        s.append("order-1", json!(0), &[("a1", "ItemAdded")]),
        s.append("order-1", json!(0), &[("b1", "ItemAdded")]),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{a:?} {b:?}");
    let loser = if a.0 == 409 { a.1 } else { b.1 };
    assert_eq!(loser["code"], "wrong_expected_version");
    assert!(
        loser["error"].as_str().unwrap().contains("at version 1"),
        "{loser}"
    );
    // no_stream on an existing stream, and exists on a missing one, are refused.
    assert_eq!(
        s.append("order-1", json!("no_stream"), &[("x", "T")])
            .await
            .0,
        409
    );
    assert_eq!(
        s.append("order-9", json!("exists"), &[("y", "T")]).await.0,
        409
    );
    let (_, events) = s.send("GET", "/v1/streams/order-1", None).await;
    assert_eq!(events.as_array().unwrap().len(), 2);
}

async fn appending_the_same_event_ids_again_changes_nothing(kind: &Kind) {
    let s = Server::start(kind).await;
    let batch = [("p1", "Paid"), ("p2", "Receipted")];
    let (st, first) = s.append("payment-7", json!("any"), &batch).await;
    assert_eq!(st, 201);
    // A retry after a lost answer: same ids, even with a now-stale expected version.
    let (st, again) = s.append("payment-7", json!("no_stream"), &batch).await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["last_version"], first["last_version"]);
    let (_, events) = s.send("GET", "/v1/streams/payment-7", None).await;
    assert_eq!(events.as_array().unwrap().len(), 2);
    if kind.is_nats() {
        // JetStream deduplicates by id across the whole store and per event, so these
        // two cases are answered as repeats there (documented in the NATS backend).
        return;
    }
    // The same id in another stream, or mixed with new ids, is a conflict.
    let (st, v) = s.append("payment-8", json!("any"), &[("p1", "Paid")]).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("duplicate_event_id")));
    let (st, _) = s
        .append(
            "payment-7",
            json!("any"),
            &[("p2", "Receipted"), ("p3", "Refunded")],
        )
        .await;
    assert_eq!(st, 409);
}

async fn reads_go_forward_by_stream_and_by_category(kind: &Kind) {
    let s = Server::start(kind).await;
    s.append("order-1", json!("any"), &[("o1a", "Placed")])
        .await;
    s.append("cart-1", json!("any"), &[("c1a", "Added")]).await;
    s.append("order-2", json!("any"), &[("o2a", "Placed")])
        .await;
    s.append(
        "order-1",
        json!("any"),
        &[("o1b", "Paid"), ("o1c", "Shipped")],
    )
    .await;
    let (_, v) = s
        .send("GET", "/v1/streams/order-1?from=1&limit=1", None)
        .await;
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["o1b"]);
    assert_eq!(v[0]["version"], 1);
    assert_eq!(v[0]["data"]["id"], "o1b");
    // The category feed: every order stream, in commit order, by global position.
    let (_, v) = s.send("GET", "/v1/streams/order-*", None).await;
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["o1a", "o2a", "o1b", "o1c"]);
    let positions: Vec<i64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let (_, all) = s.send("GET", "/v1/streams/*", None).await;
    assert_eq!(all.as_array().unwrap().len(), 5);
    let (_, v) = s.send("GET", "/v1/streams/nothing-here", None).await;
    assert_eq!(v, json!([]));
}

async fn subscriptions_catch_up_go_live_and_resume_after_a_restart(kind: &Kind) {
    let s = Server::start(kind).await;
    for i in 0..3 {
        s.append("order-5", json!("any"), &[(&format!("e{i}"), "Step")])
            .await;
    }
    let mut sub = s.subscribe("/v1/streams/order-5/subscribe", None).await;
    let mut cat = s.subscribe("/v1/streams/order-*/subscribe", None).await;
    for want in 0..3 {
        let (id, e) = sub.next().await;
        assert_eq!(
            (id, e["id"].as_str().unwrap()),
            (want, format!("e{want}").as_str())
        );
    }
    // Live: appended after the subscriber caught up.
    for i in 3..5 {
        s.append("order-5", json!("any"), &[(&format!("e{i}"), "Step")])
            .await;
    }
    let mut last = 0;
    for want in 3..5 {
        let (id, _) = sub.next().await;
        assert_eq!(id, want);
        last = id;
    }
    for want in 1..=5 {
        assert_eq!(
            cat.next().await.0,
            want,
            "category ids are global positions"
        );
    }
    // The server restarts (its subscriptions end); events are appended meanwhile.
    drop((sub, cat));
    s.stop();
    let s = Server::start(kind).await;
    s.append("order-5", json!(4), &[("e5", "Step")]).await;
    let mut sub = s
        .subscribe("/v1/streams/order-5/subscribe", Some(last))
        .await;
    s.append("order-5", json!(5), &[("e6", "Step")]).await;
    assert_eq!(
        sub.next().await.0,
        5,
        "resumes right after the last seen event"
    );
    assert_eq!(sub.next().await.0, 6);
}

async fn consumer_group_offsets_are_durable_and_only_move_forward(kind: &Kind) {
    let s = Server::start(kind).await;
    for i in 0..4 {
        s.append("cart-3", json!("any"), &[(&format!("c{i}"), "Changed")])
            .await;
    }
    let (st, _) = s
        .send("GET", "/v1/streams/cart-3/groups/projector", None)
        .await;
    assert_eq!(st, 404);
    let mut sub = s
        .subscribe("/v1/streams/cart-3/subscribe?group=projector", None)
        .await;
    assert_eq!(sub.next().await.0, 0, "a new group starts at the beginning");
    let (st, v) = s
        .send(
            "PUT",
            "/v1/streams/cart-3/groups/projector",
            Some(json!({"acked": 1})),
        )
        .await;
    assert_eq!((st, v["acked"].as_i64()), (200, Some(1)));
    let (_, v) = s
        .send(
            "PUT",
            "/v1/streams/cart-3/groups/projector",
            Some(json!({"acked": 0})),
        )
        .await;
    assert_eq!(v["acked"], 1, "an older ack does not move the offset back");
    let m = s.metrics().await;
    for line in [
        "tessera_events_appends_total{result=\"ok\"} 4\n",
        "tessera_events_appended_total 4\n",
        "tessera_events_subscribers 1\n",
        "tessera_events_consumer_group_lag{group=\"projector\",selection=\"cart-3\"} 2\n",
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
    drop(sub);
    s.stop();
    let s = Server::start(kind).await;
    let (_, v) = s
        .send("GET", "/v1/streams/cart-3/groups/projector", None)
        .await;
    assert_eq!(v["acked"], 1);
    let mut sub = s
        .subscribe("/v1/streams/cart-3/subscribe?group=projector", None)
        .await;
    assert_eq!(
        sub.next().await.0,
        2,
        "continues after the acknowledged offset"
    );
    // A restarted server knows the group from its subscription.
    let m = s.metrics().await;
    assert!(
        m.contains(
            "tessera_events_consumer_group_lag{group=\"projector\",selection=\"cart-3\"} 2\n"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn bad_requests_name_the_problem() {
    let kind = &Kind::sqlite();
    let s = Server::start(kind).await;
    let cases = [
        (
            "/v1/streams/bad%20name",
            json!({"events": [{"id": "a", "type": "T"}]}),
            "invalid stream name",
        ),
        (
            "/v1/streams/order-*",
            json!({"events": [{"id": "a", "type": "T"}]}),
            "category",
        ),
        (
            "/v1/streams/s",
            json!({"expected_version": "maybe", "events": [{"id": "a", "type": "T"}]}),
            "expected_version",
        ),
        ("/v1/streams/s", json!({"events": []}), "events"),
        (
            "/v1/streams/s",
            json!({"events": [{"id": "a", "type": "T", "extra": 1}]}),
            "extra",
        ),
        (
            "/v1/streams/s",
            json!({"events": [{"id": "a", "type": ""}]}),
            "events[0].type",
        ),
        (
            "/v1/streams/s",
            json!({"events": [{"id": "a", "type": "T"}, {"id": "a", "type": "T"}]}),
            "twice",
        ),
    ];
    for (path, body, needle) in cases {
        let (st, v) = s.send("POST", path, Some(body)).await;
        assert_eq!(st, 400, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{path}: {v}");
    }
    let (st, _) = s.send("GET", "/v1/streams/s?from=x", None).await;
    assert_eq!(st, 400);
}

/// Appends to new streams and consumer-group acks from many clients at once, as the
/// demo's outbox relays and subscribers make them: every one succeeds. (Acks once had a
/// writer of their own, and SQLite refused the clashes with "database is locked".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_and_acks_never_clash() {
    let kind = Kind::sqlite();
    let server = Arc::new(Server::start(&kind).await);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = server.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let (st, v) = s
                    .append(
                        &format!("order-{w}-{i}"),
                        json!("no_stream"),
                        &[(&format!("e{w}-{i}"), "Placed")],
                    )
                    .await;
                assert_eq!(st, 201, "append {w}/{i}: {v}");
            }
        }));
        let s = server.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let (st, v) = s
                    .send(
                        "PUT",
                        &format!("/v1/streams/order-*/groups/g{w}"),
                        Some(json!({"acked": i})),
                    )
                    .await;
                assert_eq!(st, 200, "ack {w}/{i}: {v}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Each scenario on the embedded store and on NATS JetStream.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(&super::Kind::sqlite()).await;
            })*
        }
        mod nats {
            $(#[tokio::test]
            async fn $name() {
                if let Some(kind) = super::Kind::nats().await {
                    super::$name(&kind).await;
                }
            })*
        }
    };
}

on_both!(
    two_writers_expecting_the_same_version_one_wins,
    appending_the_same_event_ids_again_changes_nothing,
    reads_go_forward_by_stream_and_by_category,
    subscriptions_catch_up_go_live_and_resume_after_a_restart,
    consumer_group_offsets_are_durable_and_only_move_forward,
);

#[tokio::test]
async fn two_servers_sharing_jetstream_see_each_others_appends() {
    let Some(kind) = Kind::nats().await else {
        return;
    };
    let a = Server::start(&kind).await;
    let b = Server::start(&kind).await;
    assert_eq!(
        a.append("acct-1", json!("no_stream"), &[("x0", "Opened")])
            .await
            .0,
        201
    );
    assert_eq!(
        b.append("acct-1", json!(0), &[("x1", "Credited")]).await.0,
        201
    );
    // `a` last saw version 0: its stale view is corrected, not trusted.
    let (st, v) = a.append("acct-1", json!(0), &[("x2", "Debited")]).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("at version 1"), "{v}");
    assert_eq!(
        a.append("acct-1", json!(1), &[("x2", "Debited")]).await.0,
        201
    );
    let (_, events) = b.send("GET", "/v1/streams/acct-1", None).await;
    let versions: Vec<i64> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [0, 1, 2]);
    // A live subscriber on one server sees an append made through the other.
    let mut sub = a.subscribe("/v1/streams/acct-*/subscribe", None).await;
    for _ in 0..3 {
        sub.next().await;
    }
    b.append("acct-1", json!(2), &[("x3", "Closed")]).await;
    assert_eq!(sub.next().await.1["id"], "x3");
}
