//! The saga coordinator inside a real `tessera server` process, killed with SIGKILL while
//! sagas are blocked at different points (first step, middle step, a compensation), then
//! restarted on the same data dir: every saga finishes, and the participant's call log
//! shows a repeated call only where the kill interrupted one, always with the same key.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::process::Child;

#[allow(dead_code)] // each test crate uses a part of it
mod common;

use common::run_cli;

async fn spawn_server(data_dir: &Path) -> (Child, String) {
    common::spawn_server(data_dir, &["--node", "n1"]).await
}

/// A server with ACLs on (default deny) and the management token `root-secret`.
async fn spawn_server_with_acls(data_dir: &Path) -> (Child, String) {
    let config = data_dir.join("server.toml");
    std::fs::write(
        &config,
        "[acl]\nenabled = true\ninitial_management = \"root-secret\"\n",
    )
    .unwrap();
    spawn_server_with(data_dir, &["--config", config.to_str().unwrap()]).await
}

async fn spawn_server_with(data_dir: &Path, extra: &[&str]) -> (Child, String) {
    let mut args = vec!["--node", "n1"];
    args.extend_from_slice(extra);
    common::spawn_server(data_dir, &args).await
}

/// A participant whose calls are logged; a gated path holds its caller until released;
/// a refused path answers 409.
#[derive(Default)]
struct Participant {
    calls: Mutex<Vec<(String, String)>>,
    /// Each call's path and `traceparent` (empty when it had none).
    parents: Mutex<Vec<(String, String)>>,
    gates: Mutex<HashSet<String>>,
    refused: Mutex<HashSet<String>>,
    released: tokio::sync::Notify,
    open: std::sync::atomic::AtomicBool,
}

impl Participant {
    fn calls_to(&self, path: &str) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, k)| k.clone())
            .collect()
    }
}

async fn participant() -> (Arc<Participant>, String) {
    let p = Arc::new(Participant::default());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let pp = p.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let p = pp.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let p = p.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let key = req
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        p.calls.lock().unwrap().push((path.clone(), key));
                        let parent = req
                            .headers()
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        p.parents.lock().unwrap().push((path.clone(), parent));
                        let gated = p.gates.lock().unwrap().contains(&path);
                        while gated && !p.open.load(std::sync::atomic::Ordering::SeqCst) {
                            let wait = p.released.notified();
                            if p.open.load(std::sync::atomic::Ordering::SeqCst) {
                                break;
                            }
                            wait.await;
                        }
                        let status = if p.refused.lock().unwrap().contains(&path) {
                            409
                        } else {
                            200
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (p, addr)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn send(c: &HttpClient, method: &str, url: String, body: Option<Value>) -> (u16, Value) {
    send_as(c, method, url, body, None).await
}

async fn send_as(
    c: &HttpClient,
    method: &str,
    url: String,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let headers: Vec<_> = token.map(|t| ("x-consul-token", t)).into_iter().collect();
    send_with(c, method, url, body, &headers).await
}

async fn send_with(
    c: &HttpClient,
    method: &str,
    url: String,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned()));
    (status, v)
}

fn saga(label: &str, participant: &str) -> Value {
    let step = |name: &str| {
        json!({
            "name": name,
            "action": {"url": format!("http://{participant}"), "path": format!("/{label}/{name}/do")},
            "compensation": {"url": format!("http://{participant}"), "path": format!("/{label}/{name}/undo")},
            "timeout": "120s",
            "retry": {"max_attempts": 2, "backoff": "10ms", "max_backoff": "50ms"}
        })
    };
    json!({"name": label, "steps": [step("a"), step("b"), step("c")],
           "compensation_retry": {"max_attempts": 50, "backoff": "10ms", "max_backoff": "100ms"}})
}

/// The coordinator and the event store on a real tmpfs that fills up. A saga start and an
/// event append are refused with 507 `storage_full`, naming the cause, and leave nothing
/// behind; once the disk has room, the same requests (same Idempotency-Key, same event
/// id) are kept exactly once, with no restart in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_saga_starts_and_appends_cleanly_until_it_has_room() {
    let Some(disk) = tessera_testkit::Tmpfs::mount_or_skip(64 << 20) else {
        return;
    };
    let (p, paddr) = participant().await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let (_server, addr) = spawn_server(disk.path()).await;
    let start = |key: &'static str| {
        let (c, addr, def) = (c.clone(), addr.clone(), saga("full", &paddr));
        async move {
            let url = format!("http://{addr}/v1/sagas");
            send_with(&c, "POST", url, Some(def), &[("idempotency-key", key)]).await
        }
    };
    let append = |id: &'static str| {
        let (c, addr) = (c.clone(), addr.clone());
        async move {
            let events = json!({"events": [{"id": id, "type": "filled", "data": {"n": 1}}]});
            let url = format!("http://{addr}/v1/streams/disk-full");
            send(&c, "POST", url, Some(events)).await
        }
    };
    let refused = |what: &str, (s, v): (u16, Value)| {
        assert_eq!(
            (s, v["code"].as_str()),
            (507, Some("storage_full")),
            "{what}: {v}"
        );
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("ENOSPC") || e.contains("SQLITE_FULL"),
            "{what}: {v}"
        );
    };

    let filler = disk.fill();
    refused("saga start", start("disk-1").await);
    refused("event append", append("event-1").await);
    // Nothing half-made: no saga row, no event, and reads still answer.
    let (s, sagas) = send(&c, "GET", format!("http://{addr}/v1/sagas"), None).await;
    assert_eq!(
        (s, sagas.as_array().map(Vec::len)),
        (200, Some(0)),
        "{sagas}"
    );
    let (s, events) = send(
        &c,
        "GET",
        format!("http://{addr}/v1/streams/disk-full"),
        None,
    )
    .await;
    assert_eq!(
        (s, events.as_array().map(Vec::len)),
        (200, Some(0)),
        "{events}"
    );
    assert!(p.calls.lock().unwrap().is_empty(), "a refused saga ran");

    disk.free(&filler);
    // The clients retry the same requests; each is kept once, however often it is sent.
    wait_until("the saga start to be kept", || async {
        matches!(start("disk-1").await.0, 200 | 201)
    })
    .await;
    wait_until("the append to be kept", || async {
        matches!(append("event-1").await.0, 200 | 201)
    })
    .await;
    let (s, again) = start("disk-1").await;
    assert_eq!(s, 200, "a repeat answers the saga already started: {again}");
    append("event-1").await;
    let (_, sagas) = send(&c, "GET", format!("http://{addr}/v1/sagas"), None).await;
    assert_eq!(sagas.as_array().map(Vec::len), Some(1), "{sagas}");
    let (_, events) = send(
        &c,
        "GET",
        format!("http://{addr}/v1/streams/disk-full"),
        None,
    )
    .await;
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    let id = again["id"].as_str().unwrap().to_owned();
    wait_until("the saga to complete", || async {
        let (_, v) = send(&c, "GET", format!("http://{addr}/v1/sagas/{id}"), None).await;
        v["status"] == "completed"
    })
    .await;
    assert_eq!(p.calls_to("/full/a/do").len(), 1);
}

/// Admission control covers the event store's and the coordinator's APIs too: beyond
/// `max_in_flight`, a burst of appends gets 429 `too_busy` with `Retry-After`, and
/// exactly the appends that were answered 201 are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_max_in_flight_gets_429_on_events_and_sagas() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[limits]\nmax_in_flight = 2\n").unwrap();
    let (_server, addr) =
        spawn_server_with(dir.path(), &["--config", config.to_str().unwrap()]).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (c, addr) = (c.clone(), addr.clone());
            tokio::spawn(async move {
                let body = json!({"events": [{"id": format!("burst-{i}"), "type": "t", "data": {"pad": "x".repeat(10_000)}}]});
                send(&c, "POST", format!("http://{addr}/v1/streams/burst"), Some(body)).await
            })
        })
        .collect();
    let (mut kept, mut busy) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (201, _) => kept += 1,
            (429, v) => {
                assert_eq!(v["code"], "too_busy", "{v}");
                busy += 1;
            }
            (s, v) => panic!("{s}: {v}"),
        }
    }
    assert!(
        busy > 0,
        "100 concurrent appends never exceeded 2 in flight"
    );
    let url = format!("http://{addr}/v1/streams/burst?limit=1000");
    let (_, events) = send(&c, "GET", url, None).await;
    assert_eq!(
        events.as_array().map(Vec::len),
        Some(kept),
        "exactly the 201s are stored"
    );
    // The same limit guards saga starts.
    let (_p, paddr) = participant().await;
    let starts: Vec<_> = (0..50)
        .map(|_| {
            let (c, addr, def) = (c.clone(), addr.clone(), saga("held", &paddr));
            tokio::spawn(async move {
                send(&c, "POST", format!("http://{addr}/v1/sagas"), Some(def)).await
            })
        })
        .collect();
    let mut codes = std::collections::BTreeMap::new();
    for t in starts {
        let (s, v) = t.await.unwrap();
        assert!(
            s == 201 || (s == 429 && v["code"] == "too_busy"),
            "{s}: {v}"
        );
        *codes.entry(s).or_insert(0) += 1;
    }
    assert!(codes.contains_key(&429), "{codes:?}");
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, f: impl FnMut() -> F) {
    tessera_testkit::wait_until(what, Duration::from_secs(60), f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_saga_then_restart_finishes_every_saga() {
    let dir = tempfile::tempdir().unwrap();
    let (p, paddr) = participant().await;
    // s1 stops in its first step, s2 in its middle step, s3 while compensating b (its
    // step c is refused).
    for gate in ["/s1/a/do", "/s2/b/do", "/s3/b/undo"] {
        p.gates.lock().unwrap().insert(gate.into());
    }
    p.refused.lock().unwrap().insert("/s3/c/do".into());
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let (mut server, addr) = spawn_server(dir.path()).await;
    let mut ids = HashMap::new();
    for label in ["s1", "s2", "s3"] {
        let (s, v) = send(
            &c,
            "POST",
            format!("http://{addr}/v1/sagas"),
            Some(saga(label, &paddr)),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        ids.insert(label, v["id"].as_str().unwrap().to_owned());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ["/s1/a/do", "/s2/b/do", "/s3/b/undo"]
        .iter()
        .any(|g| p.calls_to(g).is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sagas did not reach their gates"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.start_kill().unwrap();
    server.wait().await.unwrap();

    p.open.store(true, std::sync::atomic::Ordering::SeqCst);
    p.released.notify_waiters();
    let (_server, addr) = spawn_server(dir.path()).await;
    for (label, want) in [
        ("s1", "completed"),
        ("s2", "completed"),
        ("s3", "compensated"),
    ] {
        let id = &ids[label];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (s, v) = send(&c, "GET", format!("http://{addr}/v1/sagas/{id}"), None).await;
            assert_eq!(s, 200, "{v}");
            if v["status"] == want {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{label}: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every call carried its step's key; only the interrupted calls were repeated.
    let calls = p.calls.lock().unwrap().clone();
    for (path, key) in &calls {
        let mut parts = path.trim_start_matches('/').split('/');
        let (label, step, op) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let kind = if op == "do" { "action" } else { "compensation" };
        assert_eq!(key, &format!("{}/{step}/{kind}", ids[label]), "{path}");
    }
    let count = |path: &str| p.calls_to(path).len();
    assert_eq!(count("/s1/a/do"), 2, "interrupted, so called again");
    assert_eq!((count("/s1/b/do"), count("/s1/c/do")), (1, 1));
    assert_eq!(
        (count("/s2/a/do"), count("/s2/b/do"), count("/s2/c/do")),
        (1, 2, 1)
    );
    assert_eq!(
        count("/s3/c/do"),
        1,
        "refused once (a 409 is final), never compensated"
    );
    assert_eq!(count("/s3/c/undo"), 0);
    assert_eq!((count("/s3/b/undo"), count("/s3/a/undo")), (2, 1));
    assert_eq!((count("/s1/a/undo"), count("/s2/a/undo")), (0, 0));
}

/// A traced saga whose server is killed with SIGKILL mid-step continues its trace after
/// the restart: the step interrupted and the steps after it are client spans of the same
/// trace under the saga's stored span, the participant sees that trace on every call, the
/// saga span the new server sends ends the trace where the starting request left it, and
/// the step finished before the kill makes no second span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_resumed_after_kill_9_continues_its_trace() {
    let collector = tessera_testkit::otlp::Collector::start().await;
    let server = || {
        let mut cmd = tokio::process::Command::new(common::BIN);
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        cmd
    };
    let dir = tempfile::tempdir().unwrap();
    let (p, paddr) = participant().await;
    p.gates.lock().unwrap().insert("/t1/b/do".into());
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let (mut first, addr) =
        common::spawn_server_with(server(), "127.0.0.1:0", dir.path(), &["--node", "n1"]).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let (s, v) = send_with(
        &c,
        "POST",
        format!("http://{addr}/v1/sagas"),
        Some(saga("t1", &paddr)),
        &[("traceparent", &format!("00-{trace}-{caller_span}-01"))],
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let spans = || {
        collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace)
            .collect::<Vec<_>>()
    };
    // Killed once it is in b and has sent the spans of what it finished: the request
    // that started the saga, and step a.
    wait_until("the saga reaches its gated step", || async {
        !p.calls_to("/t1/b/do").is_empty()
    })
    .await;
    wait_until("the first server's spans are exported", || async {
        let seen = spans();
        seen.iter().any(|s| s.name == "POST /v1/sagas") && seen.iter().any(|s| s.name == "step a")
    })
    .await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    p.open.store(true, std::sync::atomic::Ordering::SeqCst);
    p.released.notify_waiters();
    let (_second, addr) =
        common::spawn_server_with(server(), "127.0.0.1:0", dir.path(), &["--node", "n1"]).await;
    wait_until("the resumed saga completes", || async {
        saga_status(&c, &addr, &id).await["status"] == "completed"
    })
    .await;
    // The participant saw the one trace on every call, before the kill and after.
    let parents = p.parents.lock().unwrap().clone();
    assert_eq!(parents.len(), 4, "a, b (killed), b again, c: {parents:?}");
    for (path, parent) in &parents {
        assert_eq!(parent.split('-').nth(1), Some(trace), "{path}: {parent}");
    }
    // The restarted server's spans: b's retry, c, and the saga's own span at the end.
    wait_until("the saga's span is exported", || async {
        spans().iter().any(|s| s.name == "saga t1")
    })
    .await;
    let spans = spans();
    let started = spans.iter().find(|s| s.name == "POST /v1/sagas").unwrap();
    assert_eq!(started.parent_id, caller_span, "{spans:?}");
    let saga_span = spans.iter().find(|s| s.name == "saga t1").unwrap();
    assert_eq!(saga_span.parent_id, started.span_id, "{spans:?}");
    let steps = |step: &str| {
        spans
            .iter()
            .filter(|s| s.attributes.get("tessera.saga.step").map(String::as_str) == Some(step))
            .collect::<Vec<_>>()
    };
    for step in ["b", "c"] {
        let found = steps(step);
        assert_eq!(found.len(), 1, "one span for {step}: {spans:?}");
        assert_eq!(found[0].parent_id, saga_span.span_id, "{spans:?}");
        assert_eq!(found[0].kind, 3, "a client span: {spans:?}");
    }
    // a was done before the kill: the first server sent its span, the second made none.
    assert_eq!(steps("a").len(), 1, "{spans:?}");
    assert_eq!(steps("a")[0].parent_id, saga_span.span_id, "{spans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_steps_reach_registered_services_and_acls_guard_the_new_apis() {
    let dir = tempfile::tempdir().unwrap();
    let (p, paddr) = participant().await;
    let (_server, addr) = spawn_server_with_acls(dir.path()).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let root = Some("root-secret");
    // The participant registers like any service (no check: passing).
    let (host, port) = paddr.rsplit_once(':').unwrap();
    let (s, v) = send_as(
        &c,
        "PUT",
        format!("http://{addr}/v1/agent/service/register"),
        Some(json!({"Name": "ledger", "ID": "ledger-1", "Address": host, "Port": port.parse::<u16>().unwrap()})),
        root,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let def = json!({"steps": [{"name": "book", "action": {"service": "ledger", "path": "/svc/book/do"}}]});
    // ACLs on: no token, no saga, no events; the management token may do both.
    let (s, v) = send(
        &c,
        "POST",
        format!("http://{addr}/v1/sagas"),
        Some(def.clone()),
    )
    .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (403, Some("permission_denied")),
        "{v}"
    );
    let append = json!({"events": [{"id": "e1", "type": "Booked"}]});
    let (s, _) = send(
        &c,
        "POST",
        format!("http://{addr}/v1/streams/ledger-1"),
        Some(append.clone()),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = send(
        &c,
        "GET",
        format!("http://{addr}/v1/streams/ledger-1"),
        None,
    )
    .await;
    assert_eq!(s, 403);
    let (s, v) = send_as(
        &c,
        "POST",
        format!("http://{addr}/v1/streams/ledger-1"),
        Some(append),
        root,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = send_as(
        &c,
        "POST",
        format!("http://{addr}/v1/sagas"),
        Some(def),
        root,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = send_as(
            &c,
            "GET",
            format!("http://{addr}/v1/sagas/{id}"),
            None,
            root,
        )
        .await;
        if v["status"] == "completed" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The step went to the registered instance, resolved in-process from the registry.
    assert_eq!(
        p.calls_to("/svc/book/do"),
        vec![format!("{id}/book/action")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_commands_start_wait_list_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let (p, paddr) = participant().await;
    p.refused.lock().unwrap().insert("/bad/x/do".into());
    let (_server, addr) = spawn_server(dir.path()).await;
    let ok = dir.path().join("ok.json");
    std::fs::write(&ok, saga("good", &paddr).to_string()).unwrap();
    let (success, out, err) = run_cli(
        &addr,
        &[
            "saga",
            "start",
            ok.to_str().unwrap(),
            "--key",
            "k1",
            "--wait",
        ],
    )
    .await;
    assert!(success, "{out}{err}");
    assert!(
        out.contains("started") && out.contains("completed"),
        "{out}"
    );
    let id = out.split_whitespace().nth(1).unwrap().to_owned();
    // The same key again: the first saga, not a second one.
    let (success, out, _) = run_cli(
        &addr,
        &["saga", "start", ok.to_str().unwrap(), "--key", "k1"],
    )
    .await;
    assert!(
        success && out.contains(&id) && out.contains("already started"),
        "{out}"
    );
    // A saga whose step is refused ends compensated, and the command says so (exit 1).
    let bad = dir.path().join("bad.json");
    let def = json!({"name": "bad", "steps": [{"name": "x",
        "action": {"url": format!("http://{paddr}"), "path": "/bad/x/do"},
        "retry": {"max_attempts": 1, "backoff": "1ms", "max_backoff": "1ms"}}]});
    std::fs::write(&bad, def.to_string()).unwrap();
    let (success, out, err) =
        run_cli(&addr, &["saga", "start", bad.to_str().unwrap(), "--wait"]).await;
    assert!(!success, "{out}");
    assert!(
        out.contains("compensated") && err.contains("ended compensated"),
        "{out}{err}"
    );
    let (_, out, _) = run_cli(&addr, &["saga", "list", "--status", "completed"]).await;
    assert!(out.contains(&id) && out.contains("good"), "{out}");
    let (success, out, _) = run_cli(&addr, &["saga", "get", &id]).await;
    assert!(success, "{out}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["steps"].as_array().unwrap().len(), 3);
    let (success, _, err) = run_cli(&addr, &["saga", "get", "nope"]).await;
    assert!(!success && err.contains("no saga nope"), "{err}");
    let missing = dir.path().join("missing.json");
    let (success, _, err) = run_cli(&addr, &["saga", "start", missing.to_str().unwrap()]).await;
    assert!(!success && err.contains("cannot read"), "{err}");
}

/// With ACLs on, every write endpoint of `tessera server` refuses a request without a
/// token (403, reason named) and changes nothing; the same writes with the management
/// token succeed (so the refusals are about the token, not the request).
#[tokio::test]
async fn with_acls_on_every_write_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = spawn_server_with_acls(dir.path()).await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = |p: &str| format!("http://{addr}{p}");
    let root = Some("root-secret");
    // Something for the deregistrations and check updates to act on.
    let (s, v) = send_as(
        &c,
        "PUT",
        url("/v1/agent/service/register"),
        Some(json!({"Name": "web", "ID": "web1", "Port": 80,
                    "Check": {"CheckID": "web1-ttl", "TTL": "30s"}})),
        root,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = send_as(&c, "PUT", url("/v1/kv/keep"), Some(json!("v")), root).await;
    assert_eq!(s, 200);

    let writes: Vec<(&str, &str, Option<Value>)> = vec![
        (
            "PUT",
            "/v1/agent/service/register",
            Some(json!({"Name": "evil"})),
        ),
        ("PUT", "/v1/agent/service/deregister/web1", None),
        (
            "PUT",
            "/v1/agent/service/maintenance/web1?enable=true",
            None,
        ),
        (
            "PUT",
            "/v1/agent/check/register",
            Some(json!({"Name": "c", "TTL": "10s"})),
        ),
        ("PUT", "/v1/agent/check/deregister/web1-ttl", None),
        ("PUT", "/v1/agent/check/pass/web1-ttl", None),
        ("PUT", "/v1/agent/check/warn/web1-ttl", None),
        ("PUT", "/v1/agent/check/fail/web1-ttl", None),
        (
            "PUT",
            "/v1/agent/check/update/web1-ttl",
            Some(json!({"Status": "critical"})),
        ),
        (
            "PUT",
            "/v1/catalog/register",
            Some(json!({"Node": "n", "Address": "1.2.3.4"})),
        ),
        ("PUT", "/v1/catalog/deregister", Some(json!({"Node": "n"}))),
        ("PUT", "/v1/kv/evil", Some(json!("x"))),
        ("DELETE", "/v1/kv/keep", None),
        ("DELETE", "/v1/kv/?recurse", None),
        (
            "PUT",
            "/v1/acl/policy",
            Some(json!({"Name": "p", "Rules": ""})),
        ),
        ("PUT", "/v1/acl/token", Some(json!({"Policies": []}))),
        (
            "POST",
            "/v1/sagas",
            Some(json!({"steps": [{"name": "a", "action": {"url": "http://127.0.0.1:1"}}]})),
        ),
        ("POST", "/v1/tcc", Some(json!({"participants": []}))),
        (
            "POST",
            "/v1/streams/orders-1",
            Some(json!({"events": [{"id": "e1", "type": "X"}]})),
        ),
        (
            "PUT",
            "/v1/streams/orders-1/groups/g",
            Some(json!({"offset": 1})),
        ),
    ];
    for token in [None, Some("not-a-token")] {
        for (method, path, body) in &writes {
            let (s, v) = send_as(&c, method, url(path), body.clone(), token).await;
            assert_eq!(s, 403, "{method} {path} with {token:?}: {v}");
            // JSON from the coordinator and event store, Consul's text from the registry.
            let named = v["code"] == "permission_denied"
                || v.as_str().is_some_and(|t| {
                    t.contains("Permission denied") || t.contains("ACL not found")
                });
            assert!(named, "{method} {path}: {v}");
        }
    }
    // Nothing changed.
    let (s, v) = send_as(&c, "GET", url("/v1/agent/services"), None, root).await;
    assert_eq!(s, 200);
    assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["web1"]);
    let (_, v) = send_as(&c, "GET", url("/v1/health/service/web"), None, root).await;
    let ttl = v[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == "web1-ttl")
        .unwrap();
    assert_eq!(
        ttl["Status"], "critical",
        "a refused check update changed it: {v}"
    );
    assert_eq!(
        send_as(&c, "GET", url("/v1/kv/keep"), None, root).await.0,
        200
    );
    assert_eq!(
        send_as(&c, "GET", url("/v1/kv/evil"), None, root).await.0,
        404
    );
    let (_, stream) = send_as(&c, "GET", url("/v1/streams/orders-1"), None, root).await;
    assert!(!stream.to_string().contains("e1"), "{stream}");
    // The management token may.
    let (s, v) = send_as(&c, "PUT", url("/v1/agent/check/pass/web1-ttl"), None, root).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = send_as(&c, "PUT", url("/v1/kv/evil"), Some(json!("x")), root).await;
    assert_eq!(s, 200, "{v}");
}

/// A counter from a server's coordinator metrics.
async fn coordinator_metric(c: &HttpClient, addr: &str, name: &str) -> u64 {
    let (_, v) = send(
        c,
        "GET",
        format!("http://{addr}/v1/tessera/coordinator/metrics"),
        None,
    )
    .await;
    v.as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn saga_status(c: &HttpClient, addr: &str, id: &str) -> Value {
    send(c, "GET", format!("http://{addr}/v1/sagas/{id}"), None)
        .await
        .1
}

/// Two `tessera server`s, a and b, sharing one new PostgreSQL database (each its own
/// data dir), and a saga `label` started on a and blocked in its step b (gated at the
/// participant).
struct Handover {
    p: Arc<Participant>,
    c: HttpClient,
    a: Child,
    a_addr: String,
    b_addr: String,
    id: String,
    label: &'static str,
    _b: Child,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _db: tessera_testkit::PgDatabase,
}

impl Handover {
    async fn start(label: &'static str, extra: &[&str]) -> Option<Handover> {
        let db = tessera_testkit::PgDatabase::create_or_skip()?;
        let (p, paddr) = participant().await;
        p.gates.lock().unwrap().insert(format!("/{label}/b/do"));
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let flags = |node: &'static str| {
            let mut f = vec!["--node", node, "--database-url", db.url.as_str()];
            f.extend_from_slice(extra);
            f
        };
        let (a, a_addr) = common::spawn_server(dirs.0.path(), &flags("a")).await;
        let (b, b_addr) = common::spawn_server(dirs.1.path(), &flags("b")).await;
        let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let (s, v) = send(
            &c,
            "POST",
            format!("http://{a_addr}/v1/sagas"),
            Some(saga(label, &paddr)),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let h = Handover {
            p,
            c,
            a,
            a_addr,
            b_addr,
            id,
            label,
            _b: b,
            _dirs: dirs,
            _db: db,
        };
        h.step_b_called(1, "a to block in step b").await;
        Some(h)
    }

    /// Waits until step b has been called `n` times (each call blocks until released).
    async fn step_b_called(&self, n: usize, what: &str) {
        let path = format!("/{}/b/do", self.label);
        wait_until(what, || {
            let called = self.p.calls_to(&path).len();
            async move { called == n }
        })
        .await;
    }

    /// Answers every blocked call, and every call from now on.
    fn release(&self) {
        self.p.open.store(true, std::sync::atomic::Ordering::SeqCst);
        self.p.released.notify_waiters();
    }

    async fn completed_on_b(&self) {
        wait_until("b to complete the saga", || {
            let (c, b, id) = (self.c.clone(), self.b_addr.clone(), self.id.clone());
            async move { saga_status(&c, &b, &id).await["status"] == "completed" }
        })
        .await;
    }

    fn calls(&self, step: &str) -> Vec<String> {
        self.p.calls_to(&format!("/{}/{step}/do", self.label))
    }

    fn key(&self, step: &str) -> String {
        format!("{}/{step}/action", self.id)
    }
}

/// A saga started on server a is blocked in its middle step when a is killed with
/// SIGKILL: b takes it over once the lease (10 s) runs out and completes it, calling the
/// interrupted step again with the same key and no other step twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinators_saga_is_finished_by_another() {
    let Some(mut h) = Handover::start("k1", &[]).await else {
        return;
    };
    h.a.start_kill().unwrap();
    h.a.wait().await.unwrap();
    h.release();
    h.completed_on_b().await;
    assert_eq!(h.calls("a"), [h.key("a")]);
    assert_eq!(
        h.calls("b"),
        [h.key("b"), h.key("b")],
        "interrupted: called again, same key"
    );
    assert_eq!(h.calls("c"), [h.key("c")]);
    assert_eq!(
        coordinator_metric(&h.c, &h.b_addr, "tessera_coordinator_claimed_total").await,
        1
    );
}

/// A paused owner cannot write: server a is frozen with SIGSTOP while its saga waits on
/// step b; b takes the saga over after the lease and completes it; when a wakes, its
/// call answered, its transition is refused by the fence (counted), it calls no further
/// step, and the saga stays exactly as b left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_coordinator_cannot_write_a_transition() {
    let Some(h) = Handover::start("p1", &[]).await else {
        return;
    };
    let pid = h.a.id().unwrap();
    tessera_testkit::signal(pid, "STOP");
    // b's claim calls step b again (same key), which blocks too; then both are answered.
    h.step_b_called(2, "b to take the saga over").await;
    h.release();
    h.completed_on_b().await;
    let done = saga_status(&h.c, &h.b_addr, &h.id).await;
    tessera_testkit::signal(pid, "CONT");
    wait_until("a's late write to be refused", || {
        let (c, a) = (h.c.clone(), h.a_addr.clone());
        async move { coordinator_metric(&c, &a, "tessera_coordinator_fenced_total").await == 1 }
    })
    .await;
    assert_eq!(
        saga_status(&h.c, &h.b_addr, &h.id).await,
        done,
        "the stale owner changed the saga"
    );
    assert_eq!(
        saga_status(&h.c, &h.a_addr, &h.id).await,
        done,
        "a shows the stored saga"
    );
    assert_eq!(h.calls("c").len(), 1, "step c once, by b");
}

/// A server that stops (SIGTERM) hands its sagas over at once: it ends its leases and
/// NOTIFYs the others. The lease here is 20 minutes and the others poll every tenth of
/// it, so only the notification can explain the takeover within the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_coordinator_hands_its_sagas_over_at_once() {
    let Some(mut h) = Handover::start("h1", &["--saga-lease", "1200s"]).await else {
        return;
    };
    tessera_testkit::signal(h.a.id().unwrap(), "TERM");
    let exit = h.a.wait().await.unwrap();
    assert!(exit.success(), "{exit:?}");
    h.step_b_called(2, "b to take the saga over").await;
    h.release();
    h.completed_on_b().await;
    assert_eq!(h.calls("b"), [h.key("b"), h.key("b")]);
}
