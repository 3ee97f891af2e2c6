//! TCC transactions against real participant services that keep reservation state the
//! way TCC participants must (empty rollback, late tries refused): commit, abort, a timed
//! out try whose late arrival is refused, phase-two retries, and recovery in both phases
//! after the coordinator's runtime is torn down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use tessera_coordinator::Coordinator;

use crate::support::{Api, Backend};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Reservation {
    Tried,
    Confirmed,
    Cancelled,
    /// Cancelled before any try arrived.
    CancelledEmpty,
}

#[derive(Clone, Default)]
struct Behaviour {
    fail_first: u32,
    always_fail: bool,
    status: u16,
    delay_ms: u64,
}

#[derive(Default)]
struct Participants {
    state: Mutex<HashMap<(String, String), Reservation>>,
    behaviours: Mutex<HashMap<String, Behaviour>>,
    counts: Mutex<HashMap<String, u32>>,
    /// (participant/op, Idempotency-Key, answer)
    log: Mutex<Vec<(String, String, u16)>>,
}

impl Participants {
    fn set(&self, what: &str, b: Behaviour) {
        self.behaviours.lock().unwrap().insert(what.into(), b);
    }
    fn state(&self, name: &str, tx: &str) -> Option<Reservation> {
        self.state
            .lock()
            .unwrap()
            .get(&(name.to_owned(), tx.to_owned()))
            .copied()
    }
    fn log_for(&self, what: &str) -> Vec<(String, u16)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, _, _)| w == what)
            .map(|(_, k, s)| (k.clone(), *s))
            .collect()
    }
}

async fn op(
    State(p): State<Arc<Participants>>,
    Path((name, op)): Path<(String, String)>,
    headers: HeaderMap,
) -> StatusCode {
    // Runs to the end even if the coordinator stops waiting (as a request delayed in the
    // network still arrives), so a late try is really processed.
    tokio::spawn(apply(p, name, op, headers)).await.unwrap()
}

async fn apply(p: Arc<Participants>, name: String, op: String, headers: HeaderMap) -> StatusCode {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let tx = key.split('/').next().unwrap_or("").to_owned();
    let what = format!("{name}/{op}");
    let b = p
        .behaviours
        .lock()
        .unwrap()
        .get(&what)
        .cloned()
        .unwrap_or_default();
    let n = {
        let mut c = p.counts.lock().unwrap();
        let n = c.entry(what.clone()).or_insert(0);
        *n += 1;
        *n
    };
    if b.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(b.delay_ms)).await;
    }
    let status = if b.always_fail || n <= b.fail_first {
        b.status
    } else {
        let mut st = p.state.lock().unwrap();
        let k = (name.clone(), tx);
        let cur = st.get(&k).copied();
        match (op.as_str(), cur) {
            // A try after its cancel is refused (no hanging reservation).
            ("try", Some(Reservation::Cancelled | Reservation::CancelledEmpty)) => 409,
            ("try", _) => {
                st.insert(k, Reservation::Tried);
                200
            }
            ("confirm", Some(Reservation::Tried | Reservation::Confirmed)) => {
                st.insert(k, Reservation::Confirmed);
                200
            }
            ("confirm", _) => 409,
            // A cancel for a try that never arrived: an empty rollback, remembered.
            ("cancel", None) => {
                st.insert(k, Reservation::CancelledEmpty);
                200
            }
            ("cancel", Some(Reservation::Tried)) => {
                st.insert(k, Reservation::Cancelled);
                200
            }
            ("cancel", Some(_)) => 200,
            _ => 404,
        }
    };
    p.log.lock().unwrap().push((what, key, status));
    StatusCode::from_u16(status).unwrap()
}

async fn participants() -> (Arc<Participants>, SocketAddr) {
    let p = Arc::new(Participants::default());
    let app = axum::Router::new()
        .route("/{name}/{op}", post(op))
        .with_state(p.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (p, addr)
}

async fn coordinator(backend: &Backend) -> (Coordinator, Api) {
    let c = backend.open(None).await;
    let api = Api::serve(&c).await;
    (c, api)
}

async fn finished(api: &Api, id: &str) -> Value {
    api.until(&format!("/v1/tcc/{id}"), &["confirmed", "cancelled"])
        .await
}

fn transfer(addr: SocketAddr, timeout: &str, attempts: u32) -> Value {
    let participant = |name: &str| {
        let call =
            |op: &str| json!({"url": format!("http://{addr}"), "path": format!("/{name}/{op}")});
        json!({
            "name": name, "try": call("try"), "confirm": call("confirm"), "cancel": call("cancel"),
            "timeout": timeout,
            "retry": {"max_attempts": attempts, "backoff": "5ms", "max_backoff": "20ms"}
        })
    };
    json!({
        "name": "transfer",
        "participants": [participant("debit"), participant("credit")],
        "phase_two_retry": {"max_attempts": 1000, "backoff": "5ms", "max_backoff": "20ms"}
    })
}

/// A transaction started by a traced request is a span of its trace: every try and
/// confirm a client span under it, which the participant is asked to continue.
#[tokio::test]
async fn a_traced_start_makes_the_transaction_and_its_calls_spans_of_the_trace() {
    let collector = tessera_testkit::otlp::Collector::start().await;
    let (_p, addr) = participants().await;
    let c = Backend::sqlite().open(None).await;
    let api = Api::serve_traced(
        &c,
        collector.tracer("coordinator", tessera_trace::Sampler::default()),
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let (s, v) = api
        .send_with(
            "POST",
            "/v1/tcc",
            Some(&transfer(addr, "5s", 2)),
            &[("traceparent", &parent)],
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(finished(&api, &id).await["status"], "confirmed");
    let of_trace = || {
        collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace)
            .collect::<Vec<_>>()
    };
    tessera_testkit::wait_until("the spans", std::time::Duration::from_secs(60), || {
        let n = of_trace().len();
        async move { n >= 6 }
    })
    .await;
    let spans = of_trace();
    let start = spans.iter().find(|s| s.name == "POST /v1/tcc").unwrap();
    let tx = spans.iter().find(|s| s.kind == 1).unwrap();
    assert_eq!(
        (tx.name.as_str(), tx.parent_id.as_str()),
        ("tcc transfer", start.span_id.as_str())
    );
    assert_eq!(tx.attributes["tessera.tcc.status"], "confirmed");
    let mut calls: Vec<&str> = spans
        .iter()
        .filter(|s| s.kind == 3)
        .inspect(|s| assert_eq!(s.parent_id, tx.span_id, "{s:?}"))
        .map(|s| s.name.as_str())
        .collect();
    calls.sort_unstable();
    assert_eq!(
        calls,
        ["confirm credit", "confirm debit", "try credit", "try debit"]
    );
}

#[tokio::test]
async fn all_tries_succeed_so_all_confirm() {
    commits(&Backend::sqlite()).await;
}

pub async fn commits(backend: &Backend) {
    let (p, addr) = participants().await;
    let (_c, api) = coordinator(backend).await;
    let (s, v) = api
        .send("POST", "/v1/tcc", Some(&transfer(addr, "5s", 2)), None)
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let v = finished(&api, &id).await;
    assert_eq!(v["status"], "confirmed", "{v}");
    for name in ["debit", "credit"] {
        assert_eq!(p.state(name, &id), Some(Reservation::Confirmed));
        assert_eq!(
            p.log_for(&format!("{name}/confirm")),
            vec![(format!("{id}/{name}/confirm"), 200)]
        );
        assert!(p.log_for(&format!("{name}/cancel")).is_empty());
    }
}

#[tokio::test]
async fn a_refused_try_cancels_everyone_including_an_empty_rollback() {
    refused_try_cancels_everyone(&Backend::sqlite()).await;
}

pub async fn refused_try_cancels_everyone(backend: &Backend) {
    let (p, addr) = participants().await;
    p.set(
        "credit/try",
        Behaviour {
            always_fail: true,
            status: 422,
            ..Default::default()
        },
    );
    let (_c, api) = coordinator(backend).await;
    let (_, v) = api
        .send("POST", "/v1/tcc", Some(&transfer(addr, "5s", 2)), None)
        .await;
    let id = v["id"].as_str().unwrap().to_owned();
    let v = finished(&api, &id).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(v["error"].as_str().unwrap().contains("credit"), "{v}");
    assert_eq!(p.state("debit", &id), Some(Reservation::Cancelled));
    assert_eq!(p.state("credit", &id), Some(Reservation::CancelledEmpty));
    assert_eq!(
        v["participants"][1]["try_attempts"], 1,
        "a 422 is final: not retried"
    );
    assert!(p.log_for("debit/confirm").is_empty());
}

#[tokio::test]
async fn a_try_that_arrives_after_its_cancel_is_refused() {
    let backend = Backend::sqlite();
    let (p, addr) = participants().await;
    // credit's try is slower than its timeout: the coordinator gives up, cancels, and the
    // participant sees the cancel first, then the stale try.
    p.set(
        "credit/try",
        Behaviour {
            delay_ms: 600,
            ..Default::default()
        },
    );
    let (_c, api) = coordinator(&backend).await;
    let (_, v) = api
        .send("POST", "/v1/tcc", Some(&transfer(addr, "100ms", 1)), None)
        .await;
    let id = v["id"].as_str().unwrap().to_owned();
    let v = finished(&api, &id).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(p.state("debit", &id), Some(Reservation::Cancelled));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while p.log_for("credit/try").is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        p.log_for("credit/try"),
        vec![(format!("{id}/credit/try"), 409)]
    );
    assert_eq!(p.state("credit", &id), Some(Reservation::CancelledEmpty));
}

#[tokio::test]
async fn phase_two_retries_until_every_participant_answers() {
    let backend = Backend::sqlite();
    let (p, addr) = participants().await;
    p.set(
        "debit/confirm",
        Behaviour {
            fail_first: 3,
            status: 503,
            ..Default::default()
        },
    );
    let (_c, api) = coordinator(&backend).await;
    let (_, v) = api
        .send("POST", "/v1/tcc", Some(&transfer(addr, "5s", 1)), None)
        .await;
    let id = v["id"].as_str().unwrap().to_owned();
    let v = finished(&api, &id).await;
    assert_eq!(v["status"], "confirmed", "{v}");
    assert_eq!(v["participants"][0]["phase_two_attempts"], 4);
    assert_eq!(p.state("debit", &id), Some(Reservation::Confirmed));
    let keys: Vec<String> = p
        .log_for("debit/confirm")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![format!("{id}/debit/confirm"); 4]);
}

#[tokio::test]
async fn starts_are_idempotent_and_bad_definitions_are_refused() {
    let backend = Backend::sqlite();
    let (p, addr) = participants().await;
    let (_c, api) = coordinator(&backend).await;
    let def = transfer(addr, "5s", 1);
    let (s1, v1) = api.send("POST", "/v1/tcc", Some(&def), Some("t-1")).await;
    let (s2, v2) = api.send("POST", "/v1/tcc", Some(&def), Some("t-1")).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(v1["id"], v2["id"]);
    finished(&api, v1["id"].as_str().unwrap()).await;
    assert_eq!(p.log_for("debit/try").len(), 1);
    let (s, v) = api
        .send("POST", "/v1/tcc", Some(&json!({"participants": []})), None)
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("participants"), "{v}");
    let mut bad = transfer(addr, "5s", 1);
    bad["participants"][1]["name"] = json!("debit");
    let (s, v) = api.send("POST", "/v1/tcc", Some(&bad), None).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("participants[1].name"),
        "{v}"
    );
    let (s, _) = api.send("GET", "/v1/tcc?status=maybe", None, None).await;
    assert_eq!(s, 400);
    let (s, list) = api
        .send("GET", "/v1/tcc?status=confirmed", None, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["id"], v1["id"]);
    let (_, metrics) = api
        .send("GET", "/v1/tessera/coordinator/metrics", None, None)
        .await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("tessera_tcc_transactions{status=\"confirmed\"} 1"),
        "{metrics}"
    );
}

/// Starts a transaction on a coordinator whose runtime is then dropped (every task
/// stops, as in a kill) once `until` holds; returns the transaction id.
fn crash_when(backend: &Backend, addr: SocketAddr, until: impl Fn() -> bool) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let id = rt.block_on(async {
        let (_c, api) = coordinator(backend).await;
        let (_, v) = api
            .send("POST", "/v1/tcc", Some(&transfer(addr, "30s", 1)), None)
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !until() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        v["id"].as_str().unwrap().to_owned()
    });
    rt.shutdown_background();
    id
}

#[test]
fn recovery_finishes_phase_two_and_cancels_an_interrupted_try() {
    recovers(&Backend::sqlite(), &Backend::sqlite());
}

/// `first` sees a crash while confirming, `second` one while trying.
pub fn recovers(first: &Backend, second: &Backend) {
    let rt_p = tokio::runtime::Runtime::new().unwrap();
    let (p, addr) = rt_p.block_on(participants());
    let slow = Behaviour {
        delay_ms: 600_000,
        ..Default::default()
    };

    // Crash while confirming: after restart the commit decision is carried out.
    let backend = first;
    p.set("debit/confirm", slow.clone());
    let counts = |what: &str| p.counts.lock().unwrap().get(what).copied().unwrap_or(0);
    let id = crash_when(backend, addr, || counts("debit/confirm") == 1);
    p.set("debit/confirm", Behaviour::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (c, api) = coordinator(backend).await;
        assert_eq!(c.resume().await.unwrap(), 1);
        let v = finished(&api, &id).await;
        assert_eq!(v["status"], "confirmed", "{v}");
    });
    assert_eq!(p.state("debit", &id), Some(Reservation::Confirmed));
    assert_eq!(p.state("credit", &id), Some(Reservation::Confirmed));

    // Crash while trying: no decision was recorded, so everyone is cancelled.
    let backend = second;
    p.set("credit/try", slow);
    let before = (counts("debit/try"), counts("credit/try"));
    // Tries go out together: the crash waits for both, so debit's reservation exists
    // (counted and recorded in the same step) and must be rolled back, not found empty.
    let id = crash_when(backend, addr, || {
        (counts("debit/try"), counts("credit/try")) == (before.0 + 1, before.1 + 1)
    });
    rt.block_on(async {
        let (c, api) = coordinator(backend).await;
        assert_eq!(c.resume().await.unwrap(), 1);
        let v = finished(&api, &id).await;
        assert_eq!(v["status"], "cancelled", "{v}");
        assert!(v["error"].as_str().unwrap().contains("interrupted"), "{v}");
    });
    assert_eq!(p.state("debit", &id), Some(Reservation::Cancelled));
    assert_eq!(p.state("credit", &id), Some(Reservation::CancelledEmpty));
}
