//! Admission control over real sockets: a connection flood from one address and a burst
//! of writes beyond the in-flight limit are answered 429 with `Retry-After`, at once.

use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::TestServer;

/// Sends one keep-alive request on `conn` and reads the head and body of the answer
/// (or what arrives before the server closes).
async fn ask(conn: &mut TcpStream) -> String {
    let _ = conn
        .write_all(b"GET /v1/status/leader HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let read = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_owned)
                            })
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        if len.is_some_and(|len| body.len() >= len) {
                            break;
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("an answer");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_connection_flood_gets_429_and_the_limit_frees_up() {
    let srv = TestServer::start_with(|c| c.limits.max_conns_per_client = 20).await;
    // The test's own client keeps one pooled connection open: 19 more fit.
    let mut conns = Vec::new();
    for _ in 0..30 {
        conns.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    let mut ok = 0;
    let mut refused = 0;
    for c in &mut conns {
        let answer = ask(c).await;
        if answer.starts_with("HTTP/1.1 200") {
            ok += 1;
        } else {
            assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
            let lower = answer.to_ascii_lowercase();
            assert!(lower.contains("retry-after: 1"), "{answer}");
            assert!(
                answer.contains(r#""code":"too_many_connections""#),
                "{answer}"
            );
            refused += 1;
        }
    }
    assert_eq!((ok, refused), (19, 11));
    drop(conns);
    // Closed connections leave the count: new ones are served again.
    crate::support::wait_for("connections counted out", || async {
        let mut c = TcpStream::connect(srv.addr).await.unwrap();
        ask(&mut c).await.starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_beyond_the_in_flight_limit_get_429() {
    let srv = TestServer::start_with(|c| c.limits.max_in_flight = 2).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let h = srv.http.clone();
        tasks.push(tokio::spawn(async move {
            h.raw(
                http::Method::PUT,
                &format!("/v1/kv/burst/{i}"),
                vec![b'x'; 10_000],
                &[],
            )
            .await
        }));
    }
    let mut busy = 0;
    for t in tasks {
        let (status, headers, body) = t.await.unwrap();
        match status {
            StatusCode::OK => {}
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(headers["retry-after"], "1");
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["code"], "too_busy", "{v}");
                busy += 1;
            }
            other => panic!("{other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert!(
        busy > 0,
        "100 concurrent fsynced writes never exceeded 2 in flight"
    );
    // Parked blocking queries do not count: with two parked, writes still go through.
    let h = srv.http.clone();
    let (_, hd, _) = h.get("/v1/kv/parked").await;
    let index = crate::support::index_of(&hd);
    let mut parked = Vec::new();
    for _ in 0..2 {
        let h = h.clone();
        parked.push(tokio::spawn(async move {
            h.get(&format!("/v1/kv/parked?index={index}&wait=30s"))
                .await
                .0
        }));
    }
    crate::support::wait_for("two parked queries", || async {
        let (_, _, v) = h.get("/v1/agent/metrics").await;
        v["Gauges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["Name"] == "tessera.http.blocking_queries" && g["Value"] == 2.0)
    })
    .await;
    let (s, _) = h.put("/v1/kv/parked", "wake").await;
    assert_eq!(s, StatusCode::OK);
    for p in parked {
        assert_eq!(p.await.unwrap(), StatusCode::OK);
    }
}
