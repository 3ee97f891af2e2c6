//! The SDK against a real registry + coordinator (the same crates `tessera server` runs),
//! on loopback ports chosen by the OS, with real axum services.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::routing::{get, post};
use serde_json::{Value, json};
use tessera::{
    Alg, AuthError, Call, Check, Coordinator, Error, Events, JwksVerifier, JwtError, Participant,
    Registration, Registry, Saga, ServiceClient, Step, Tcc, Validation,
};

use common::{App, Server, checks, hyper_util_client, wait_for};

#[tokio::test]
async fn ttl_registration_stays_passing_and_deregisters_on_shutdown() {
    let server = Server::start().await;
    let registry = server.registry();
    let addr: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let me = Registration::new("orders", addr)
        .tag("v1")
        .meta("zone", "a")
        .weight(3)
        .check(Check::Ttl(Duration::from_secs(2)))
        .register(&registry)
        .await
        .unwrap();
    let watch = registry.watch("orders");
    assert!(watch.ready(Duration::from_secs(30)).await);
    let now = watch.current();
    assert_eq!(now.instances.len(), 1, "passing from the first moment");
    let i = &now.instances[0];
    assert_eq!((i.id.as_str(), i.port, i.weight), (me.id(), 40001, 3));
    assert_eq!(i.tags, vec!["v1".to_owned()]);
    assert_eq!(i.meta.get("zone").map(String::as_str), Some("a"));

    // Three TTLs later the heartbeat has kept it passing.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        checks(&server, "orders").await,
        vec![(me.id().to_owned(), "passing".to_owned())]
    );

    me.deregister().await.unwrap();
    assert!(checks(&server, "orders").await.is_empty());
    wait_for("the watch to see the instance go", || {
        let w = watch.clone();
        async move { w.current().instances.is_empty() }
    })
    .await;
    server.stop().await;
}

/// A registry at its connection limit answers 429; registration waits the Retry-After
/// (with jitter) and succeeds once a connection is free, instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_waits_out_a_saturated_registry() {
    let server = Server::start_with(|c| c.limits.max_conns_per_client = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let registry = server.registry();
    let addr: SocketAddr = "127.0.0.1:40009".parse().unwrap();
    let registering = tokio::spawn(async move {
        Registration::new("orders", addr)
            .check(Check::Ttl(Duration::from_secs(30)))
            .register(&registry)
            .await
    });
    wait_for("the registry to refuse a connection", || {
        let refused = server.inner.stats().refused;
        async move { refused > 0 }
    })
    .await;
    drop(held);
    let me = registering
        .await
        .unwrap()
        .expect("registered after the 429");
    assert!(server.inner.has_service(me.id()));
    me.deregister().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_process_that_stops_heartbeating_goes_critical() {
    let server = Server::start().await;
    let registry = server.registry();
    let me = Registration::new("cart", "127.0.0.1:40002".parse().unwrap())
        .check(Check::Ttl(Duration::from_secs(1)))
        .register(&registry)
        .await
        .unwrap();
    let id = me.id().to_owned();
    drop(me); // what a crash looks like: no deregistration, no more passes
    wait_for("the TTL check to lapse", || async {
        checks(&server, "cart").await == vec![(id.clone(), "critical".to_owned())]
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn http_checks_are_polled_by_the_registry() {
    let server = Server::start().await;
    let app = App::start(axum::Router::new().route("/health", get(|| async { "ok" }))).await;
    let me = Registration::new("users", app.addr)
        .check(Check::Http {
            path: "/health".into(),
            interval: Duration::from_millis(200),
        })
        .register(&server.registry())
        .await
        .unwrap();
    wait_for("the HTTP check to pass", || async {
        checks(&server, "users").await == vec![(me.id().to_owned(), "passing".to_owned())]
    })
    .await;
    drop(app);
    wait_for("the HTTP check to fail", || async {
        checks(&server, "users").await == vec![(me.id().to_owned(), "critical".to_owned())]
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn discovery_follows_changes_and_serves_from_cache_when_the_registry_is_gone() {
    let server = Server::start().await;
    let registry = Registry::new(server.addr.to_string()).with_wait(Duration::from_secs(600));
    let a = Registration::new("web", "127.0.0.1:40010".parse().unwrap())
        .register(&registry)
        .await
        .unwrap();
    let _b = Registration::new("web", "127.0.0.1:40011".parse().unwrap())
        .register(&registry)
        .await
        .unwrap();
    let mut watch = registry.watch("web");
    assert!(watch.ready(Duration::from_secs(30)).await);
    wait_for("both instances", || {
        let w = watch.clone();
        async move { w.current().instances.len() == 2 }
    })
    .await;
    // A change reaches the blocked query: its wait is 10 minutes, so the answer can only
    // come within the (generous) deadline below if the change woke it.
    a.deregister().await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let now = watch.changed().await;
            if now.instances.len() == 1 {
                break now;
            }
        }
    })
    .await
    .expect("the blocking query was woken by the change");
    assert_eq!(seen.instances[0].port, 40011);
    assert!(seen.registry_ok);

    server.stop().await;
    wait_for("the watch to notice the registry is gone", || {
        let w = watch.clone();
        async move { !w.current().registry_ok }
    })
    .await;
    let cached = watch.current();
    assert_eq!(cached.instances.len(), 1, "last known instances kept");
    assert_eq!(cached.instances[0].port, 40011);
}

#[tokio::test]
async fn the_client_balances_retries_idempotent_calls_and_survives_a_dead_instance() {
    let server = Server::start().await;
    let registry = server.registry();
    let hits = Arc::new(AtomicU32::new(0));
    let ok = |name: &'static str, hits: Arc<AtomicU32>| {
        axum::Router::new()
            .route(
                "/who",
                get(move || {
                    hits.fetch_add(1, Ordering::Relaxed);
                    async move { name }
                }),
            )
            .route("/write", post(move || async move { name }))
    };
    let failing = axum::Router::new()
        .route(
            "/who",
            get(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "busy") }),
        )
        .route(
            "/write",
            post(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "busy") }),
        );
    let good = App::start(ok("good", hits.clone())).await;
    let bad = App::start(failing).await;
    let dead = App::start(ok("dead", hits.clone())).await;
    for app in [&good, &bad, &dead] {
        Registration::new("api", app.addr)
            .register(&registry)
            .await
            .unwrap();
    }
    let client = ServiceClient::new(&registry, "api");
    assert!(client.watch().ready(Duration::from_secs(30)).await);
    wait_for("three instances", || {
        let c = client.clone();
        async move { c.watch().current().instances.len() == 3 }
    })
    .await;
    drop(dead); // still registered and passing (TTL), but refusing connections

    for _ in 0..60 {
        let r = client.get("/who").send().await.unwrap();
        assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());
        assert_eq!(r.text(), "good");
    }
    // A POST without an idempotency key that reached a 503 is not repeated (a fresh
    // client: the first one has ejected the failing instance by now)...
    let fresh = ServiceClient::new(&registry, "api");
    assert!(fresh.watch().ready(Duration::from_secs(30)).await);
    let mut saw_503 = false;
    for _ in 0..40 {
        let r = fresh.post("/write").send().await.unwrap();
        saw_503 |= r.status == http::StatusCode::SERVICE_UNAVAILABLE;
    }
    assert!(saw_503, "non-idempotent POSTs are not retried after a 503");
    // ...but with one it is.
    for i in 0..40 {
        let r = client
            .post("/write")
            .idempotency_key(&format!("k{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, http::StatusCode::OK);
    }
    assert!(hits.load(Ordering::Relaxed) >= 60);
    server.stop().await;
}

#[tokio::test]
async fn a_client_for_an_unknown_service_says_so() {
    let server = Server::start().await;
    let client = ServiceClient::new(&server.registry(), "nowhere");
    let ready = client.watch().ready(Duration::from_secs(30)).await;
    assert!(ready, "{:?}", client.watch().current());
    let err = client.get("/").send().await.unwrap_err();
    assert!(
        matches!(err, Error::NoInstance(ref s) if s == "nowhere"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test]
async fn sagas_built_in_code_complete_or_compensate() {
    let server = Server::start().await;
    let registry = server.registry();
    let released = Arc::new(AtomicU32::new(0));
    let r2 = released.clone();
    let app = App::start(
        axum::Router::new()
            .route("/reserve", post(|| async { "reserved" }))
            .route(
                "/release",
                post(move || {
                    r2.fetch_add(1, Ordering::Relaxed);
                    async { "released" }
                }),
            )
            .route(
                "/charge",
                post(|body: axum::Json<Value>| async move {
                    if body["amount"].as_u64().unwrap_or(0) > 100 {
                        (http::StatusCode::PAYMENT_REQUIRED, "insufficient funds")
                    } else {
                        (http::StatusCode::OK, "charged")
                    }
                }),
            ),
    )
    .await;
    let _me = Registration::new("shop", app.addr)
        .register(&registry)
        .await
        .unwrap();
    let coordinator = Coordinator::new(&registry);
    let saga = |amount: u64| {
        Saga::new("checkout")
            .step(
                Step::new("reserve", Call::post("shop", "/reserve"))
                    .compensate(Call::post("shop", "/release"))
                    .timeout(Duration::from_secs(5)),
            )
            .step(Step::new(
                "charge",
                Call::post("shop", "/charge").json(json!({"amount": amount})),
            ))
    };
    let ok = coordinator
        .start_saga(&saga(50), Some("order-1"))
        .await
        .unwrap();
    let again = coordinator
        .start_saga(&saga(50), Some("order-1"))
        .await
        .unwrap();
    assert_eq!(ok.id, again.id, "same idempotency key, same saga");
    let done = coordinator
        .wait_saga(&ok.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.status, "completed");

    let bad = coordinator.start_saga(&saga(500), None).await.unwrap();
    let done = coordinator
        .wait_saga(&bad.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.status, "compensated", "{:?}", done.error);
    assert!(done.error.unwrap_or_default().contains("charge"));
    assert_eq!(released.load(Ordering::Relaxed), 1);
    server.stop().await;
}

#[tokio::test]
async fn jwks_keys_rotate_and_survive_an_outage() {
    use tessera::jwt::Signer;
    let first = Arc::new(Signer::ed25519(&Signer::generate_pkcs8().unwrap()).unwrap());
    let second = Arc::new(Signer::ed25519(&Signer::generate_pkcs8().unwrap()).unwrap());
    let published = Arc::new(std::sync::Mutex::new(vec![first.jwk()]));
    let p = published.clone();
    let app = App::start(axum::Router::new().route(
        "/jwks.json",
        get(move || {
            let keys = p.lock().unwrap().clone();
            async move { axum::Json(json!({ "keys": keys })) }
        }),
    ))
    .await;
    let mut verifier = JwksVerifier::from_url(
        &format!("http://{}/jwks.json", app.addr),
        Validation::new(&[Alg::EdDSA]),
    );
    verifier.min_refresh_gap = Duration::ZERO;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let t1 = first.sign(&json!({"sub": "ada", "exp": exp}));
    let claims = verifier
        .verify_header(Some(&format!("Bearer {t1}")))
        .await
        .unwrap();
    assert_eq!(claims.sub(), Some("ada"));
    assert!(matches!(
        verifier.verify_header(None).await,
        Err(AuthError::Missing)
    ));

    // The issuer rotates: a token with the new kid makes the verifier fetch again.
    published.lock().unwrap().push(second.jwk());
    let t2 = second.sign(&json!({"sub": "bob", "exp": exp}));
    assert_eq!(verifier.verify(&t2).await.unwrap().sub(), Some("bob"));

    // The JWKS endpoint goes away: known keys keep working, unknown ones do not.
    drop(app);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(verifier.verify(&t1).await.unwrap().sub(), Some("ada"));
    let third = Signer::ed25519(&Signer::generate_pkcs8().unwrap()).unwrap();
    let t3 = third.sign(&json!({"sub": "eve", "exp": exp}));
    assert!(matches!(
        verifier.verify(&t3).await,
        Err(AuthError::Invalid(JwtError::UnknownKid(_)))
    ));
}

#[tokio::test]
async fn tcc_built_in_code_confirms_or_cancels() {
    let server = Server::start().await;
    let registry = server.registry();
    let confirmed = Arc::new(AtomicU32::new(0));
    let cancelled = Arc::new(AtomicU32::new(0));
    let (c2, x2) = (confirmed.clone(), cancelled.clone());
    let app = App::start(
        axum::Router::new()
            .route(
                "/try",
                post(|body: axum::Json<Value>| async move {
                    if body["seats"].as_u64().unwrap_or(0) > 2 {
                        (http::StatusCode::CONFLICT, "sold out")
                    } else {
                        (http::StatusCode::OK, "held")
                    }
                }),
            )
            .route(
                "/confirm",
                post(move || {
                    c2.fetch_add(1, Ordering::Relaxed);
                    async { "ok" }
                }),
            )
            .route(
                "/cancel",
                post(move || {
                    x2.fetch_add(1, Ordering::Relaxed);
                    async { "ok" }
                }),
            ),
    )
    .await;
    let _me = Registration::new("seats", app.addr)
        .register(&registry)
        .await
        .unwrap();
    let coordinator = Coordinator::new(&registry);
    let tcc = |seats: u64| {
        Tcc::new("booking").participant(Participant::new(
            "seats",
            Call::post("seats", "/try").json(json!({"seats": seats})),
            Call::post("seats", "/confirm"),
            Call::post("seats", "/cancel"),
        ))
    };
    let wait = |id: String| {
        let c = coordinator.clone();
        async move {
            let mut run = c.tcc(&id).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while !run.is_final() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                run = c.tcc(&id).await.unwrap();
            }
            run
        }
    };
    let ok = coordinator.start_tcc(&tcc(2), None).await.unwrap();
    assert_eq!(wait(ok.id).await.status, "confirmed");
    let refused = coordinator.start_tcc(&tcc(5), None).await.unwrap();
    assert_eq!(wait(refused.id).await.status, "cancelled");
    assert_eq!(confirmed.load(Ordering::Relaxed), 1);
    assert_eq!(cancelled.load(Ordering::Relaxed), 1);
    server.stop().await;
}

#[tokio::test]
async fn subscriptions_deliver_catch_up_then_live_and_resume_after_the_acked_offset() {
    let server = Server::start().await;
    let registry = server.registry();
    let append = |stream: &'static str, id: &'static str| {
        let url = format!("http://{}/v1/streams/{stream}", server.addr);
        async move {
            let body = json!({"events": [{"id": id, "type": "Placed", "data": {"n": id}}]});
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_string(),
                )))
                .unwrap();
            let status = hyper_util_client().request(req).await.unwrap().status();
            assert!(status.is_success(), "{status}");
        }
    };
    append("order-1", "e1").await;
    append("order-2", "e2").await;
    let events = Events::new(&registry);
    let mut sub = events.subscribe("order-*", "billing");
    let first = sub.next().await.unwrap();
    assert_eq!((first.event_id(), first.kind()), ("e1", "Placed"));
    assert_eq!(first.stream(), "order-1");
    assert_eq!(sub.next().await.unwrap().event_id(), "e2");
    append("order-3", "e3").await; // live
    let third = sub.next().await.unwrap();
    assert_eq!(third.event_id(), "e3");
    assert_eq!(third.data()["n"], "e3");
    events.ack("order-*", "billing", first.id).await.unwrap();
    drop(sub);
    // A new subscription of the same group starts after what the group acknowledged.
    let mut again = events.subscribe("order-*", "billing");
    assert_eq!(again.next().await.unwrap().event_id(), "e2");
    server.stop().await;
}

/// A client given several servers sharing one catalog (on etcd) moves to the next when
/// its server goes away: registration goes on, and a watch keeps following changes
/// through the other server (its blocking query keeps its index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_client_fails_over_between_servers_on_etcd() {
    let Some(etcd) = tessera_testkit::EtcdCluster::start_or_skip(3).await else {
        return;
    };
    let store = format!("etcd://{}", etcd.client_addrs().join(","));
    let on_etcd = |node: &'static str| {
        let store = store.clone();
        move |c: &mut tessera_registry::Config| {
            c.store = store;
            c.node_name = node.into();
        }
    };
    let first = Server::start_with(on_etcd("s1")).await;
    let second = Server::start_with(on_etcd("s2")).await;
    let registry = Registry::new(format!("{},{}", first.addr, second.addr))
        .with_wait(Duration::from_secs(600));
    assert_eq!(registry.address(), first.addr.to_string());
    let _a = Registration::new("web", "127.0.0.1:40020".parse().unwrap())
        .register(&registry)
        .await
        .unwrap();
    let mut watch = registry.watch("web");
    assert!(watch.ready(Duration::from_secs(30)).await);
    first.stop().await;
    // The next registration finds the first server gone and is made through the second.
    let _b = Registration::new("web", "127.0.0.1:40021".parse().unwrap())
        .register(&registry)
        .await
        .unwrap();
    assert_eq!(registry.address(), second.addr.to_string());
    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let now = watch.changed().await;
            if now.instances.iter().any(|i| i.port == 40021) {
                break now;
            }
        }
    })
    .await
    .expect("the watch moved to the second server and saw the new instance");
    assert!(seen.registry_ok);
    assert!(
        seen.instances.iter().any(|i| i.port == 40020),
        "the first instance is still known"
    );
    second.stop().await;
}

/// `router` serving its requests as server spans of `tracer`, as a service's middleware
/// does.
fn traced(router: axum::Router, tracer: tessera::trace::Tracer) -> axum::Router {
    tessera_web::with_traces(router, Some(tracer))
}

#[tokio::test]
async fn a_call_made_while_serving_continues_the_callers_trace() {
    let server = Server::start().await;
    let registry = server.registry();
    let collector = tessera_testkit::otlp::Collector::start().await;
    // back answers with the traceparent it was sent.
    let back = App::start(traced(
        axum::Router::new().route(
            "/items/{id}",
            get(|h: http::HeaderMap| async move {
                h.get("traceparent")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            }),
        ),
        collector.tracer("back", tessera_trace::Sampler::default()),
    ))
    .await;
    Registration::new("back", back.addr)
        .register(&registry)
        .await
        .unwrap();
    let client = ServiceClient::new(&registry, "back");
    assert!(client.watch().ready(Duration::from_secs(30)).await);
    // front calls back while serving.
    let front = App::start(traced(
        axum::Router::new().route(
            "/page",
            get(move || {
                let client = client.clone();
                async move { client.get("/items/7").send().await.unwrap().text() }
            }),
        ),
        collector.tracer("front", tessera_trace::Sampler::default()),
    ))
    .await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let c = hyper_util_client();
    let req = http::Request::get(format!("http://{}/page", front.addr))
        .header("traceparent", format!("00-{trace}-{caller}-01"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let back_saw = String::from_utf8(
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();

    wait_for("three spans", || {
        let n = collector.spans().len();
        async move { n >= 3 }
    })
    .await;
    let spans = collector.spans();
    let find = |service: &str, kind: u64| {
        spans
            .iter()
            .find(|s| s.service == service && s.kind == kind)
            .unwrap_or_else(|| panic!("no {service} span of kind {kind}: {spans:?}"))
    };
    let (front_server, front_client, back_server) =
        (find("front", 2), find("front", 3), find("back", 2));
    assert!(spans.iter().all(|s| s.trace_id == trace), "{spans:?}");
    assert_eq!(front_server.parent_id, caller);
    assert_eq!(front_server.name, "GET /page");
    assert_eq!(front_client.parent_id, front_server.span_id);
    assert_eq!(back_server.parent_id, front_client.span_id);
    assert_eq!(back_saw, format!("00-{trace}-{}-01", front_client.span_id));
    assert_eq!(back_server.name, "GET /items/{id}");
    assert_eq!(back_server.attributes["http.route"], "/items/{id}");
    assert_eq!(back_server.attributes["url.path"], "/items/7");
    assert_eq!(front_client.attributes["http.response.status_code"], "200");
    assert_eq!(
        front_client.attributes["server.port"],
        back.addr.port().to_string()
    );
    server.stop().await;
}

/// A service listening on every interface registers the address on its route to the
/// registry (a container's own address), not the wildcard.
#[tokio::test]
async fn a_wildcard_listener_advertises_the_address_toward_the_registry() {
    let registry = tessera::Registry::new("127.0.0.1:8500");
    let wildcard: std::net::SocketAddr = "0.0.0.0:9000".parse().unwrap();
    assert_eq!(
        registry.advertised(wildcard).await.unwrap(),
        "127.0.0.1:9000".parse().unwrap()
    );
    let given: std::net::SocketAddr = "10.1.2.3:9000".parse().unwrap();
    assert_eq!(registry.advertised(given).await.unwrap(), given);
    let unresolvable = tessera::Registry::new("no-such-host.invalid:8500");
    let err = unresolvable.advertised(wildcard).await.unwrap_err();
    assert!(
        err.to_string().contains("cannot tell which address"),
        "{err}"
    );
}
