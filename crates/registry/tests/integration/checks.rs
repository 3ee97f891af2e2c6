//! Server-run checks against real local targets: HTTP (2xx/429/5xx), TCP, hysteresis.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::support::{TestServer, check_status, wait_for};

/// An HTTP target whose status can be flipped, counting the requests it answers with
/// each status.
struct Target {
    addr: std::net::SocketAddr,
    status: Arc<AtomicU16>,
    served: Arc<AtomicUsize>,
}

impl Target {
    async fn start(initial: u16) -> Target {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(initial));
        let served = Arc::new(AtomicUsize::new(0));
        let (st, sv) = (status.clone(), served.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (st, sv) = (st.clone(), sv.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let code = st.load(Ordering::SeqCst);
                        sv.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let mut resp = hyper::Response::new(Full::new(Bytes::from(format!(
                                "status {code}"
                            ))));
                            *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Target {
            addr,
            status,
            served,
        }
    }

    /// Flips the status and returns the request count at the flip.
    fn set(&self, code: u16) -> usize {
        self.status.store(code, Ordering::SeqCst);
        self.served.load(Ordering::SeqCst)
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn http_check_statuses() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    let target = Target::start(200).await;
    h.register(json!({"Name": "web", "ID": "w1", "Check": {
        "HTTP": format!("http://{}/health", target.addr), "Interval": "100ms", "Timeout": "2s"}}))
        .await;
    wait_for("passing on 200", || async {
        check_status(h, "service:w1").await.as_deref() == Some("passing")
    })
    .await;
    let (_, _, v) = h.get("/v1/agent/checks").await;
    let out = v["service:w1"]["Output"].as_str().unwrap();
    assert!(
        out.contains("200 OK") && out.contains("status 200"),
        "{out}"
    );
    assert_eq!(v["service:w1"]["Type"], "http");
    assert_eq!(v["service:w1"]["Interval"], "100ms");

    target.set(429);
    wait_for("warning on 429", || async {
        check_status(h, "service:w1").await.as_deref() == Some("warning")
    })
    .await;
    target.set(503);
    wait_for("critical on 503", || async {
        check_status(h, "service:w1").await.as_deref() == Some("critical")
    })
    .await;
    let (_, _, v) = h.get("/v1/health/service/web?passing").await;
    assert_eq!(v.as_array().unwrap().len(), 0);
    target.set(204);
    wait_for("passing again", || async {
        check_status(h, "service:w1").await.as_deref() == Some("passing")
    })
    .await;
}

#[tokio::test]
async fn hysteresis_needs_consecutive_results() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    let target = Target::start(200).await;
    h.register(json!({"Name": "web", "ID": "w1", "Check": {
        "HTTP": format!("http://{}/", target.addr), "Interval": "100ms",
        "SuccessBeforePassing": 3, "FailuresBeforeCritical": 4, "Status": "critical"}}))
        .await;
    let start = target.served();
    wait_for("passing after 3 successes", || async {
        check_status(h, "service:w1").await.as_deref() == Some("passing")
    })
    .await;
    assert!(
        target.served() - start >= 3,
        "went passing after {} probes",
        target.served() - start
    );

    let at_flip = target.set(500);
    wait_for("critical after 4 failures", || async {
        check_status(h, "service:w1").await.as_deref() == Some("critical")
    })
    .await;
    // The status the check went critical on was the 4th failure or later; the target may
    // have answered one more probe since.
    assert!(
        target.served() - at_flip >= 4,
        "went critical after {} failures",
        target.served() - at_flip
    );

    let at_flip = target.set(200);
    wait_for("passing after 3 successes", || async {
        check_status(h, "service:w1").await.as_deref() == Some("passing")
    })
    .await;
    assert!(target.served() - at_flip >= 3);
}

#[tokio::test]
async fn tcp_check_follows_the_listener() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        loop {
            if listener.accept().await.is_err() {
                return;
            }
        }
    });
    h.register(json!({"Name": "db", "Check": {"TCP": addr.to_string(), "Interval": "100ms"}}))
        .await;
    wait_for("tcp passing", || async {
        check_status(h, "service:db").await.as_deref() == Some("passing")
    })
    .await;
    accept.abort();
    let _ = accept.await;
    wait_for("tcp critical", || async {
        check_status(h, "service:db").await.as_deref() == Some("critical")
    })
    .await;
    let (_, _, v) = h.get("/v1/agent/checks").await;
    assert!(
        v["service:db"]["Output"]
            .as_str()
            .unwrap()
            .contains("TCP connect"),
        "{v}"
    );
}

#[tokio::test]
async fn unreachable_http_target_is_critical() {
    let srv = TestServer::start().await;
    let h = &srv.http;
    // Bind then drop: a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    h.register(json!({"Name": "x", "Check": {"HTTP": format!("http://127.0.0.1:{port}/"), "Interval": "100ms", "Status": "passing"}})).await;
    wait_for("critical when refused", || async {
        check_status(h, "service:x").await.as_deref() == Some("critical")
    })
    .await;
}
