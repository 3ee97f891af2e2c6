//! gRPC through the SDK against a real registry: services served by `GrpcServer` on axum,
//! called by a generated client (grpc.health.v1's) through `GrpcChannel`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera::grpc::{Code, GrpcChannel, GrpcPolicy, GrpcServer, Ready};
use tessera::{Check, Registration};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use common::{App, Server, wait_for};

/// Ready while the flag is up.
struct Flag(Arc<AtomicBool>);

impl Ready for Flag {
    async fn ready(&self) -> Result<(), String> {
        if self.0.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("switched off".into())
        }
    }
}

/// Never answers; raises its flag when the call is dropped.
struct Hang(Arc<AtomicBool>);

struct RaiseOnDrop(Arc<AtomicBool>);
impl Drop for RaiseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Ready for Hang {
    async fn ready(&self) -> Result<(), String> {
        let _raise = RaiseOnDrop(self.0.clone());
        std::future::pending().await
    }
}

/// `router` counting the requests it gets, and keeping the last `grpc-timeout` and
/// `traceparent` it saw.
#[derive(Clone, Default)]
struct Seen {
    calls: Arc<AtomicU32>,
    timeout: Arc<Mutex<Option<String>>>,
    traceparent: Arc<Mutex<Option<String>>>,
}

impl Seen {
    fn wrap(&self, router: axum::Router) -> axum::Router {
        let seen = self.clone();
        router.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let seen = seen.clone();
                async move {
                    seen.calls.fetch_add(1, Ordering::SeqCst);
                    {
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .map(|v| v.to_str().unwrap_or_default().to_owned())
                        };
                        *seen.timeout.lock().unwrap() = header("grpc-timeout");
                        *seen.traceparent.lock().unwrap() = header("traceparent");
                    }
                    next.run(req).await
                }
            },
        ))
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

fn check(service: &str) -> tonic::Request<HealthCheckRequest> {
    tonic::Request::new(HealthCheckRequest {
        service: service.into(),
    })
}

async fn serving(channel: &GrpcChannel) -> Result<HealthCheckResponse, tonic::Status> {
    HealthClient::new(channel.clone())
        .check(check(""))
        .await
        .map(tonic::Response::into_inner)
}

/// An instance answering every gRPC call UNAVAILABLE, as one that is shutting down does.
fn unavailable() -> axum::Router {
    axum::Router::new().fallback(|| async {
        tessera_web::grpc_status::<axum::body::Body>(Code::Unavailable, "going away")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_retried_past_unavailable_only_and_follow_the_grpc_health_check() {
    let server = Server::start().await;
    let registry = server.registry();
    let up = Arc::new(AtomicBool::new(true));
    let good_seen = Seen::default();
    let good = App::start(
        good_seen.wrap(
            GrpcServer::new()
                .into_router(Arc::new(Flag(up.clone())))
                .unwrap(),
        ),
    )
    .await;
    let bad_seen = Seen::default();
    let bad = App::start(bad_seen.wrap(unavailable())).await;
    // The good instance is checked by the registry through its gRPC health service.
    Registration::new("hs", good.addr)
        .check(Check::Grpc {
            service: String::new(),
            interval: Duration::from_secs(1),
        })
        .register(&registry)
        .await
        .unwrap();
    Registration::new("hs", bad.addr)
        .register(&registry)
        .await
        .unwrap();
    let url = format!("http://{}/v1/health/service/hs?passing", server.addr);
    wait_for("both instances passing", || async {
        serde_json::from_str::<serde_json::Value>(&common::http_get(&url).await)
            .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 2))
    })
    .await;

    // UNAVAILABLE is retried on the other instance: every call succeeds, and some went
    // to the bad instance first.
    let channel = GrpcChannel::new(&registry, "hs");
    for _ in 0..20 {
        let r = serving(&channel).await.expect("retried past UNAVAILABLE");
        assert_eq!(r.status, ServingStatus::Serving as i32);
    }
    assert!(
        bad_seen.calls() > 0,
        "the balancer never tried the bad instance"
    );
    // Each try carried the time left as grpc-timeout (15 s by default; less by now).
    let sent = good_seen.timeout.lock().unwrap().clone().unwrap();
    let left = tessera_core::grpc::parse_timeout(sent.as_bytes()).unwrap();
    assert!(
        left <= Duration::from_secs(5) && left > Duration::ZERO,
        "{sent}"
    );

    // NOT_FOUND is the callee's answer, not a failure to retry: one try at the good
    // instance per call.
    let before = good_seen.calls();
    for _ in 0..5 {
        let e = HealthClient::new(channel.clone())
            .check(check("no.such.Service"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    }
    assert_eq!(good_seen.calls() - before, 5);

    // Unless the method's policy says so: then it is tried up to the attempts allowed.
    Registration::new("solo", good.addr)
        .register(&registry)
        .await
        .unwrap();
    let policy = GrpcPolicy {
        methods: BTreeMap::from([(
            "/grpc.health.v1.Health/Check".to_owned(),
            vec![Code::NotFound],
        )]),
        ..GrpcPolicy::default()
    };
    let solo = GrpcChannel::with_policy(&registry, "solo", policy);
    let before = good_seen.calls();
    let e = HealthClient::new(solo)
        .check(check("no.such.Service"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(good_seen.calls() - before, 3, "three attempts");

    // Not ready: the registry's gRPC check turns the good instance critical, and with
    // only the bad one left, callers get UNAVAILABLE.
    up.store(false, Ordering::SeqCst);
    wait_for("the gRPC check critical", || async {
        serde_json::from_str::<serde_json::Value>(&common::http_get(&url).await)
            .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 1))
    })
    .await;
    let checks = common::http_get(&format!("http://{}/v1/health/checks/hs", server.addr)).await;
    assert!(checks.contains("status: NOT_SERVING"), "{checks}");
    wait_for("callers see UNAVAILABLE", || async {
        serving(&channel)
            .await
            .is_err_and(|e| e.code() == tonic::Code::Unavailable)
    })
    .await;
    up.store(true, Ordering::SeqCst);
    wait_for("serving again", || async {
        serving(&channel).await.is_ok()
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_runs_out_at_the_callee_is_deadline_exceeded_at_the_caller() {
    let server = Server::start().await;
    let registry = server.registry();
    let dropped = Arc::new(AtomicBool::new(false));
    let seen = Seen::default();
    let slow = App::start(
        seen.wrap(
            GrpcServer::new()
                .into_router(Arc::new(Hang(dropped.clone())))
                .unwrap(),
        ),
    )
    .await;
    Registration::new("slow", slow.addr)
        .register(&registry)
        .await
        .unwrap();

    // The caller's deadline travels as grpc-timeout; it runs out and the caller hears
    // DEADLINE_EXCEEDED, not a retry or UNAVAILABLE; the callee stopped working on it.
    let channel = GrpcChannel::new(&registry, "slow");
    let mut req = check("");
    req.set_timeout(Duration::from_secs(1));
    let e = HealthClient::new(channel).check(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    let sent = seen.timeout.lock().unwrap().clone().unwrap();
    let limit = tessera_core::grpc::parse_timeout(sent.as_bytes()).unwrap();
    assert!(limit <= Duration::from_secs(1), "{sent}");
    assert_eq!(seen.calls(), 1, "a deadline is not retried");
    wait_for("the callee's handler dropped", || async {
        dropped.load(Ordering::SeqCst)
    })
    .await;

    // The callee's half alone: a caller that sends grpc-timeout and then waits as long
    // as it takes gets the callee's DEADLINE_EXCEEDED, saying whose deadline it was.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = http::Request::post(format!("http://{}/grpc.health.v1.Health/Check", slow.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "1S")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "4");
    let message = resp.headers()["grpc-message"].to_str().unwrap();
    assert!(message.contains("grpc-timeout"), "{message}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_while_serving_sends_the_trace_in_its_metadata() {
    let server = Server::start().await;
    let registry = server.registry();
    let collector = tessera_testkit::otlp::Collector::start().await;
    let seen = Seen::default();
    let back = App::start(
        seen.wrap(
            GrpcServer::new()
                .into_router(Arc::new(Flag(Arc::new(AtomicBool::new(true)))))
                .unwrap(),
        ),
    )
    .await;
    Registration::new("back", back.addr)
        .register(&registry)
        .await
        .unwrap();
    let channel = GrpcChannel::new(&registry, "back");
    let front = App::start(tessera_web::with_traces(
        axum::Router::new().route(
            "/front",
            axum::routing::get(move || {
                let channel = channel.clone();
                async move { serving(&channel).await.map(|_| "ok").unwrap_or("failed") }
            }),
        ),
        Some(collector.tracer("front", tessera_trace::Sampler::default())),
    ))
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client = common::hyper_util_client();
    let req = http::Request::get(format!("http://{}/front", front.addr))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let sent = seen
        .traceparent
        .lock()
        .unwrap()
        .clone()
        .expect("a traceparent");
    assert!(sent.starts_with(&format!("00-{trace}-")), "{sent}");
    assert!(
        !sent.contains("00f067aa0ba902b7"),
        "the callee's parent is the try's span"
    );
    // The try is a client span named and described by OpenTelemetry's RPC conventions,
    // and the callee's parent.
    let try_span = || {
        collector
            .spans()
            .into_iter()
            .find(|s| s.kind == 3 && s.trace_id == trace)
    };
    wait_for("the try's span at the collector", || {
        std::future::ready(try_span().is_some())
    })
    .await;
    let span = try_span().unwrap();
    assert_eq!(span.name, "grpc.health.v1.Health/Check");
    assert_eq!(span.attributes["rpc.system"], "grpc");
    assert_eq!(span.attributes["rpc.service"], "grpc.health.v1.Health");
    assert_eq!(span.attributes["rpc.method"], "Check");
    assert_eq!(span.attributes["rpc.grpc.status_code"], "0");
    assert!(sent.contains(&span.span_id), "{sent} {span:?}");
    server.stop().await;
}
