//! Sagas against a real participant service on a loopback port, through the coordinator's
//! real HTTP API: success, failure at each step with reverse compensation, timeouts,
//! compensation retries, `stuck`, idempotent start, and resuming after the coordinator's
//! runtime is torn down mid-saga.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use tessera_coordinator::{Coordinator, Resolve};

use crate::support::{Api, Backend};

/// How the participant answers one path: fail `fail_first` times with `fail_status`
/// (then succeed), or fail always; optionally after a delay.
#[derive(Clone, Default)]
struct Behaviour {
    fail_first: u32,
    always_fail: bool,
    fail_status: u16,
    delay_ms: u64,
}

#[derive(Default)]
struct Participant {
    behaviours: Mutex<HashMap<String, Behaviour>>,
    /// Every call: (path, Idempotency-Key).
    calls: Mutex<Vec<(String, String)>>,
    seen: Mutex<HashMap<String, u32>>,
}

impl Participant {
    fn set(&self, path: &str, b: Behaviour) {
        self.behaviours.lock().unwrap().insert(path.to_owned(), b);
    }
    fn calls(&self) -> Vec<(String, String)> {
        self.calls.lock().unwrap().clone()
    }
    fn paths(&self) -> Vec<String> {
        self.calls().into_iter().map(|(p, _)| p).collect()
    }
}

async fn handle(
    State(p): State<Arc<Participant>>,
    Path((step, op)): Path<(String, String)>,
    headers: HeaderMap,
) -> StatusCode {
    let path = format!("/{step}/{op}");
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    p.calls.lock().unwrap().push((path.clone(), key));
    let b = p
        .behaviours
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or_default();
    let n = {
        let mut seen = p.seen.lock().unwrap();
        let n = seen.entry(path).or_insert(0);
        *n += 1;
        *n
    };
    if b.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(b.delay_ms)).await;
    }
    if b.always_fail || n <= b.fail_first {
        return StatusCode::from_u16(b.fail_status).unwrap();
    }
    StatusCode::OK
}

async fn participant() -> (Arc<Participant>, SocketAddr) {
    let p = Arc::new(Participant::default());
    let app = axum::Router::new()
        .route("/{step}/{op}", post(handle))
        .with_state(p.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (p, addr)
}

/// A resolver that knows one service.
struct Fixed(String, SocketAddr);

impl Resolve for Fixed {
    fn healthy(&self, service: &str) -> Vec<(String, u32)> {
        if service == self.0 {
            vec![(self.1.to_string(), 1)]
        } else {
            Vec::new()
        }
    }
}

async fn coordinator(backend: &Backend, addr: SocketAddr) -> (Coordinator, Api) {
    let c = backend
        .open(Some(Arc::new(Fixed("shop".into(), addr))))
        .await;
    let api = Api::serve(&c).await;
    (c, api)
}

async fn start(api: &Api, def: &Value, key: Option<&str>) -> (u16, Value) {
    api.send("POST", "/v1/sagas", Some(def), key).await
}

async fn finished(api: &Api, id: &str) -> Value {
    api.until(
        &format!("/v1/sagas/{id}"),
        &["completed", "compensated", "stuck"],
    )
    .await
}

/// Three steps a, b, c on the participant (b through the registry resolver), fast retries.
fn three_steps(addr: SocketAddr, timeout: &str, attempts: u32) -> Value {
    let step = |name: &str, target: Value| {
        let mut action = json!({"path": format!("/{name}/do"), "body": {"step": name}});
        let mut undo = json!({"path": format!("/{name}/undo")});
        for c in [&mut action, &mut undo] {
            for (k, v) in target.as_object().unwrap() {
                c[k] = v.clone();
            }
        }
        json!({
            "name": name, "action": action, "compensation": undo, "timeout": timeout,
            "retry": {"max_attempts": attempts, "backoff": "5ms", "max_backoff": "20ms"}
        })
    };
    let url = json!({"url": format!("http://{addr}")});
    json!({
        "name": "checkout",
        "steps": [step("a", url.clone()), step("b", json!({"service": "shop"})), step("c", url)],
        "compensation_retry": {"max_attempts": 5, "backoff": "5ms", "max_backoff": "20ms"}
    })
}

#[tokio::test]
async fn a_saga_runs_its_steps_once_each_with_idempotency_keys() {
    runs_its_steps_once(&Backend::sqlite()).await;
}

pub async fn runs_its_steps_once(backend: &Backend) {
    let (p, addr) = participant().await;
    let (_c, api) = coordinator(backend, addr).await;
    let (s, v) = start(&api, &three_steps(addr, "5s", 3), None).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let v = finished(&api, &id).await;
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(
        p.calls(),
        vec![
            ("/a/do".into(), format!("{id}/a/action")),
            ("/b/do".into(), format!("{id}/b/action")),
            ("/c/do".into(), format!("{id}/c/action")),
        ]
    );
    for step in v["steps"].as_array().unwrap() {
        assert_eq!(step["status"], "succeeded");
        assert_eq!(step["action_attempts"], 1);
        assert_eq!(step["attempts"][0]["outcome"], "200");
    }
    let (s, list) = api.get("/v1/sagas?status=completed").await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["id"], id.as_str());
}

#[tokio::test]
async fn a_refused_step_compensates_the_earlier_ones_in_reverse() {
    refused_steps_compensate_in_reverse(Backend::sqlite).await;
}

pub async fn refused_steps_compensate_in_reverse(backend: impl Fn() -> Backend) {
    for failing in ["a", "b", "c"] {
        let backend = backend();
        let (p, addr) = participant().await;
        p.set(
            &format!("/{failing}/do"),
            Behaviour {
                always_fail: true,
                fail_status: 409,
                ..Default::default()
            },
        );
        let (_c, api) = coordinator(&backend, addr).await;
        let (_, v) = start(&api, &three_steps(addr, "5s", 3), None).await;
        let id = v["id"].as_str().unwrap().to_owned();
        let v = finished(&api, &id).await;
        assert_eq!(v["status"], "compensated", "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains(&format!("step {failing} failed")),
            "{v}"
        );
        let expected: Vec<String> = match failing {
            // A 409 is final: each failing action is tried once.
            "a" => vec!["/a/do"],
            "b" => vec!["/a/do", "/b/do", "/a/undo"],
            _ => vec!["/a/do", "/b/do", "/c/do", "/b/undo", "/a/undo"],
        }
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(p.paths(), expected, "failing at {failing}");
        let failed = v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == failing)
            .unwrap();
        assert_eq!(
            failed["status"], "not_compensated",
            "a refused action had no effect"
        );
        assert_eq!(failed["action_attempts"], 1, "a 409 is final: not retried");
        // Every compensation carried its own key.
        for (path, key) in p.calls() {
            if let Some(step) = path.strip_suffix("/undo") {
                assert_eq!(key, format!("{id}{step}/compensation"));
            }
        }
    }
}

#[tokio::test]
async fn a_step_that_timed_out_is_compensated_too() {
    let backend = Backend::sqlite();
    let (p, addr) = participant().await;
    p.set(
        "/b/do",
        Behaviour {
            delay_ms: 2_000,
            ..Default::default()
        },
    );
    let (_c, api) = coordinator(&backend, addr).await;
    let (_, v) = start(&api, &three_steps(addr, "150ms", 1), None).await;
    let v = finished(&api, v["id"].as_str().unwrap()).await;
    assert_eq!(v["status"], "compensated", "{v}");
    assert!(
        v["steps"][1]["attempts"][0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("timeout")
    );
    // b may have run: its compensation runs before a's.
    assert_eq!(p.paths(), vec!["/a/do", "/b/do", "/b/undo", "/a/undo"]);
    assert_eq!(v["steps"][1]["status"], "compensated");
}

#[tokio::test]
async fn transient_failures_are_retried_and_compensations_retry_until_they_succeed() {
    let backend = Backend::sqlite();
    let (p, addr) = participant().await;
    // a succeeds on its third try; c is refused; a's compensation fails twice first.
    p.set(
        "/a/do",
        Behaviour {
            fail_first: 2,
            fail_status: 503,
            ..Default::default()
        },
    );
    // b is told "too many requests" once: 429 means try again later.
    p.set(
        "/b/do",
        Behaviour {
            fail_first: 1,
            fail_status: 429,
            ..Default::default()
        },
    );
    p.set(
        "/c/do",
        Behaviour {
            always_fail: true,
            fail_status: 400,
            ..Default::default()
        },
    );
    p.set(
        "/a/undo",
        Behaviour {
            fail_first: 2,
            fail_status: 500,
            ..Default::default()
        },
    );
    let (_c, api) = coordinator(&backend, addr).await;
    let (_, v) = start(&api, &three_steps(addr, "5s", 3), None).await;
    let v = finished(&api, v["id"].as_str().unwrap()).await;
    assert_eq!(v["status"], "compensated", "{v}");
    assert_eq!(v["steps"][0]["action_attempts"], 3);
    assert_eq!(v["steps"][1]["action_attempts"], 2, "429 is retried");
    assert_eq!(v["steps"][2]["action_attempts"], 1, "400 is final");
    assert_eq!(v["error"], "step c failed after 1 attempt: 400");
    assert_eq!(v["steps"][0]["compensation_attempts"], 3);
    assert_eq!(v["steps"][0]["status"], "compensated");
    assert_eq!(v["steps"][1]["status"], "compensated");
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_leaves_the_saga_stuck_and_visible() {
    let backend = Backend::sqlite();
    let (p, addr) = participant().await;
    p.set(
        "/b/do",
        Behaviour {
            always_fail: true,
            fail_status: 422,
            ..Default::default()
        },
    );
    p.set(
        "/a/undo",
        Behaviour {
            always_fail: true,
            fail_status: 500,
            ..Default::default()
        },
    );
    let (_c, api) = coordinator(&backend, addr).await;
    let (_, v) = start(&api, &three_steps(addr, "5s", 1), None).await;
    let id = v["id"].as_str().unwrap().to_owned();
    let v = finished(&api, &id).await;
    assert_eq!(v["status"], "stuck", "{v}");
    assert_eq!(v["steps"][0]["compensation_attempts"], 5);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("compensation of step a failed 5 times")
    );
    let (_, stuck) = api.get("/v1/sagas?status=stuck").await;
    assert_eq!(stuck[0]["id"], id.as_str());
    let (_, metrics) = api.get("/v1/tessera/coordinator/metrics").await;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("tessera_sagas{status=\"stuck\"} 1"), "{text}");
    assert!(text.contains("tessera_sagas_stuck_total 1"), "{text}");
    // The insert, the turn to compensating and the stuck verdict, at least, were
    // committed, in at most as many transactions as writes.
    let counter = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let (writes, commits) = (
        counter("tessera_coordinator_store_writes_total"),
        counter("tessera_coordinator_store_commits_total"),
    );
    assert!(writes >= 3 && (1..=writes).contains(&commits), "{text}");
    assert_eq!(p.paths().iter().filter(|p| *p == "/a/undo").count(), 5);
    // Each participant call counted by result and timed: a's action and its five failed
    // compensations (a names a URL), b's 422 (b names the registry service `shop`).
    for (participant, result, n) in [
        ("url", "ok", 1),
        ("url", "failed", 5),
        ("url", "rejected", 0),
        ("shop", "refused", 1),
    ] {
        let line = format!(
            "tessera_coordinator_calls_total{{participant=\"{participant}\",result=\"{result}\"}} {n}\n"
        );
        assert!(text.contains(&line), "{line} in {text}");
    }
    assert!(
        text.contains("tessera_coordinator_call_duration_seconds_count{participant=\"url\"} 6\n"),
        "{text}"
    );
    tessera_testkit::prometheus::check_metrics(text);
}

#[tokio::test]
async fn the_same_idempotency_key_starts_one_saga() {
    let backend = Backend::sqlite();
    let (p, addr) = participant().await;
    let (_c, api) = coordinator(&backend, addr).await;
    let def = three_steps(addr, "5s", 3);
    let (s1, v1) = start(&api, &def, Some("order-42")).await;
    let (s2, v2) = start(&api, &def, Some("order-42")).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(v1["id"], v2["id"]);
    finished(&api, v1["id"].as_str().unwrap()).await;
    assert_eq!(p.paths(), vec!["/a/do", "/b/do", "/c/do"]);
    let (s3, v3) = start(&api, &def, Some("order-43")).await;
    assert_eq!(s3, 201);
    assert_ne!(v3["id"], v1["id"]);
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_reason() {
    let backend = Backend::sqlite();
    let (_p, addr) = participant().await;
    let (_c, api) = coordinator(&backend, addr).await;
    let (s, v) = start(&api, &json!({"steps": []}), None).await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("steps"), "{v}");
    assert_eq!(v["code"], "bad_definition");
    let (s, v) = start(
        &api,
        &json!({"steps": [{"name": "x", "action": {"url": "http://h:1"}, "retries": 3}]}),
        None,
    )
    .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("steps[0]"), "{v}");
    assert!(v["error"].as_str().unwrap().contains("retries"), "{v}");
    let (s, v) = api.get("/v1/sagas/nope").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
    let (s, v) = api.get("/v1/sagas?status=done").await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = api.send("POST", "/v1/sagas", None, None).await;
    assert_eq!(s, 400);
}

#[test]
fn a_saga_interrupted_mid_step_resumes_after_a_restart() {
    resumes_after_a_restart(&Backend::sqlite());
}

pub fn resumes_after_a_restart(backend: &Backend) {
    // The participant lives on its own runtime, across the coordinator's "crash".
    let rt_p = tokio::runtime::Runtime::new().unwrap();
    let (p, addr) = rt_p.block_on(participant());
    p.set(
        "/b/do",
        Behaviour {
            delay_ms: 600_000,
            ..Default::default()
        },
    );
    // First coordinator: starts the saga, which blocks in step b. Dropping its runtime
    // stops every task mid-flight, as a kill would: no further writes happen.
    let id = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let id = rt.block_on(async {
            let (_c, api) = coordinator(backend, addr).await;
            let (_, v) = start(&api, &three_steps(addr, "30s", 3), None).await;
            let id = v["id"].as_str().unwrap().to_owned();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !p.paths().contains(&"/b/do".to_owned()) {
                assert!(tokio::time::Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            id
        });
        rt.shutdown_background();
        id
    };
    p.set("/b/do", Behaviour::default());
    // Second coordinator on the same data: resumes and finishes.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (c, api) = coordinator(backend, addr).await;
        assert_eq!(c.resume().await.unwrap(), 1);
        let v = finished(&api, &id).await;
        assert_eq!(v["status"], "completed", "{v}");
    });
    // b ran twice, both times with the same key; a was not repeated.
    let calls = p.calls();
    let b: Vec<_> = calls.iter().filter(|(p, _)| p == "/b/do").collect();
    assert_eq!(b.len(), 2);
    assert!(b.iter().all(|(_, k)| *k == format!("{id}/b/action")));
    assert_eq!(calls.iter().filter(|(p, _)| p == "/a/do").count(), 1);
    assert_eq!(calls.last().unwrap().0, "/c/do");
}

/// A saga started by a traced request is a span of that trace, and after the coordinator
/// dies mid-step the one that resumes it continues the same trace: the saga span and every
/// step call under it, the call cut by the crash made again, and the step that had
/// finished not replayed (no second span for it).
#[test]
fn a_resumed_saga_continues_its_trace_and_replays_make_no_spans() {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let rt_p = tokio::runtime::Runtime::new().unwrap();
    let (p, addr) = rt_p.block_on(participant());
    let collector = rt_p.block_on(tessera_testkit::otlp::Collector::start());
    let tracer = || collector.tracer("coordinator", tessera_trace::Sampler::default());
    let spans_named = |prefix: &str| {
        collector
            .spans()
            .into_iter()
            .filter(|s| s.name.starts_with(prefix))
            .collect::<Vec<_>>()
    };
    // Polled on the participant's runtime, which outlives both coordinators.
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        rt_p.block_on(tessera_testkit::wait_until(
            what,
            Duration::from_secs(60),
            || {
                let ok = cond();
                async move { ok }
            },
        ));
    };
    p.set(
        "/b/do",
        Behaviour {
            delay_ms: 600_000,
            ..Default::default()
        },
    );
    let backend = Backend::sqlite();
    let id = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let id = rt.block_on(async {
            let c = backend
                .open(Some(Arc::new(Fixed("shop".into(), addr))))
                .await;
            let api = Api::serve_traced(&c, tracer()).await;
            let parent = format!("00-{trace}-00f067aa0ba902b7-01");
            let (s, v) = api
                .send_with(
                    "POST",
                    "/v1/sagas",
                    Some(&three_steps(addr, "30s", 3)),
                    &[("traceparent", &parent)],
                )
                .await;
            assert_eq!(s, 201, "{v}");
            v["id"].as_str().unwrap().to_owned()
        });
        wait("step b called and step a's span out", &|| {
            p.paths().contains(&"/b/do".to_owned()) && !spans_named("step a").is_empty()
        });
        rt.shutdown_background();
        id
    };
    p.set("/b/do", Behaviour::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = backend
            .open(Some(Arc::new(Fixed("shop".into(), addr))))
            .await;
        let api = Api::serve_traced(&c, tracer()).await;
        assert_eq!(c.resume().await.unwrap(), 1);
        assert_eq!(finished(&api, &id).await["status"], "completed");
    });
    wait("the saga's span", &|| !spans_named("saga ").is_empty());
    // The test's polls for the saga's status are traces of their own.
    let spans: Vec<_> = collector
        .spans()
        .into_iter()
        .filter(|s| !s.name.starts_with("GET "))
        .collect();
    assert!(spans.iter().all(|s| s.trace_id == trace), "{spans:?}");
    let start = spans.iter().find(|s| s.name == "POST /v1/sagas").unwrap();
    let saga = &spans_named("saga ")[0];
    assert_eq!((saga.name.as_str(), saga.kind), ("saga checkout", 1));
    assert_eq!(
        saga.parent_id, start.span_id,
        "the saga is a span of the request"
    );
    assert_eq!(saga.attributes["tessera.saga.id"], id);
    let steps: Vec<&str> = spans
        .iter()
        .filter(|s| s.name.starts_with("step "))
        .map(|s| s.name.as_str())
        .collect();
    let count = |n: &str| steps.iter().filter(|s| **s == n).count();
    // a before the crash, b's call cut by it never ended, b again and c after it.
    assert_eq!(
        (count("step a"), count("step b"), count("step c")),
        (1, 1, 1),
        "{steps:?}"
    );
    for s in spans.iter().filter(|s| s.name.starts_with("step ")) {
        assert_eq!(s.parent_id, saga.span_id, "{s:?}");
        assert_eq!(s.kind, 3);
        assert_eq!(s.attributes["tessera.saga.id"], id);
        let host = if s.name == "step b" {
            "shop"
        } else {
            "127.0.0.1"
        };
        assert_eq!(s.attributes["server.address"], host);
    }
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_post_does_not_orphan_its_saga() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::sqlite();
    let (_p, addr) = participant().await;
    let (_c, api) = coordinator(&backend, addr).await;
    let body = three_steps(addr, "5s", 1).to_string();
    let request = format!(
        "POST /v1/sagas HTTP/1.1\r\nhost: c\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let server = api.base.trim_start_matches("http://").to_owned();
    // Each client sends its POST and closes at once, cancelling the request mid-flight.
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(&server).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        drop(s);
    }
    // Whatever was stored must finish: nothing is left running.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, running) = api.get("/v1/sagas?status=running").await;
        let (_, done) = api.get("/v1/sagas?status=completed&limit=1000").await;
        if running.as_array().unwrap().is_empty() && !done.as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "orphaned sagas: {running}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_participant_that_keeps_failing_trips_its_breaker() {
    let backend = Backend::sqlite();
    let (p, addr) = participant().await;
    p.set(
        "/a/do",
        Behaviour {
            always_fail: true,
            fail_status: 503,
            ..Default::default()
        },
    );
    let (_c, api) = coordinator(&backend, addr).await;
    // Many quick attempts against a participant that always fails: after enough errors
    // the breaker opens and the rest are refused without reaching it.
    let mut def = three_steps(addr, "5s", 60);
    def["steps"][0]["retry"] = json!({"max_attempts": 60, "backoff": "1ms", "max_backoff": "2ms"});
    let (_, v) = start(&api, &def, None).await;
    let v = finished(&api, v["id"].as_str().unwrap()).await;
    assert_eq!(v["status"], "compensated", "{v}");
    assert_eq!(v["steps"][0]["action_attempts"], 60);
    let reached = p.paths().iter().filter(|p| *p == "/a/do").count();
    assert!(
        reached < 60,
        "the breaker held back some attempts ({reached} reached)"
    );
    let last = &v["steps"][0]["attempts"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["outcome"];
    assert!(
        last.as_str().unwrap().starts_with("circuit breaker open"),
        "{last}"
    );
}

/// A resolver that lists a dead instance next to the live one, as the registry does for
/// a moment after a replica is killed (until its health check fails).
struct WithDead(SocketAddr, SocketAddr);

impl Resolve for WithDead {
    fn healthy(&self, service: &str) -> Vec<(String, u32)> {
        if service == "shop" {
            vec![(self.0.to_string(), 1), (self.1.to_string(), 1)]
        } else {
            Vec::new()
        }
    }
}

#[tokio::test]
async fn a_refused_connection_moves_the_call_to_another_instance() {
    let (p, addr) = participant().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connections to it are refused
    let backend = Backend::sqlite();
    let c = backend.open(Some(Arc::new(WithDead(dead, addr)))).await;
    let api = Api::serve(&c).await;
    // One attempt per step: the failover happens inside the attempt.
    for _ in 0..10 {
        let (_, v) = start(&api, &three_steps(addr, "5s", 1), None).await;
        let v = finished(&api, v["id"].as_str().unwrap()).await;
        assert_eq!(v["status"], "completed", "{v}");
        assert_eq!(v["steps"][1]["action_attempts"], 1);
    }
    assert_eq!(p.paths().iter().filter(|p| *p == "/b/do").count(), 10);
}
