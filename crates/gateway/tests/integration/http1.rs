//! The gateway's own HTTP/1.1 codec, on the wire: every response framing an upstream can
//! use, keep-alive surviving each of them, pipelining, `Connection: close`, the slow-client
//! timeout, and the requests it hands to hyper (HTTP/1.0, chunked uploads, `Expect`,
//! malformed heads).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{TestGateway, Upstream, wait_for};

/// What the scripted upstream writes for one request: each chunk in its own write, with
/// a pause between, so the gateway sees bodies arrive in pieces.
struct Script {
    chunks: Vec<&'static [u8]>,
    close: bool,
}

fn script(method: &str, path: &str) -> Script {
    let keep = |chunks: Vec<&'static [u8]>| Script {
        chunks,
        close: false,
    };
    match (method, path) {
        (_, "/chunked") => keep(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n6\r\n world\r\n0\r\n\r\n",
        ]),
        (_, "/trailers") => keep(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n3\r\nabc\r\n",
            b"0\r\nx-checksum: 900150983cd24fb0\r\n\r\n",
        ]),
        (_, "/close") => Script {
            chunks: vec![b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"close"],
            close: true,
        },
        (_, "/big") => keep(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 40000\r\n\r\n",
            &[b'a'; 20000],
            &[b'b'; 20000],
        ]),
        (_, "/continue") => keep(vec![
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ]),
        ("HEAD", "/head") => keep(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ncontent-type: text/plain\r\n\r\n",
        ]),
        (_, "/nocontent") => keep(vec![b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n"]),
        (_, "/hop") => keep(vec![
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\nX-Odd-Case:  v1 \r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\nContent-Length: 2\r\nUpgrade: h2c\r\n\r\nhi",
        ]),
        (_, "/lf") => keep(vec![b"HTTP/1.1 200 OK\nx-lf: 1\ncontent-length: 2\n\nlf"]),
        (_, "/verbatim") => keep(vec![
            b"HTTP/1.1 200 OK\r\nX-Odd-Case:  v1 \r\nContent-Length: 2\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n\r\nhi",
        ]),
        (_, "/twolengths") => keep(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\ncontent-length: 2\r\n\r\nhi",
        ]),
        _ => keep(vec![b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"]),
    }
}

/// A raw-socket upstream answering from `script`. Counts connections accepted; with
/// `linger`, closes each connection that long after every response (an upstream whose
/// keep-alive timeout is shorter than the gateway's), counting those closes.
struct Scripted {
    addr: std::net::SocketAddr,
    accepts: Arc<AtomicUsize>,
    closes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads until `buf` holds a whole request head; where its blank line starts, or `None`
/// when the connection ends first.
async fn next_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn scripted(linger: Option<Duration>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let closes = Arc::new(AtomicUsize::new(0));
    let (acc, cl) = (accepts.clone(), closes.clone());
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            acc.fetch_add(1, Ordering::SeqCst);
            let cl = cl.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = next_head(&mut s, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let mut line = head.split(' ');
                    let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
                    let sc = script(method, path);
                    for (i, chunk) in sc.chunks.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if s.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                    if sc.close {
                        return;
                    }
                    if let Some(d) = linger {
                        tokio::time::sleep(d).await;
                        drop(s);
                        cl.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    Scripted {
        addr,
        accepts,
        closes,
        task,
    }
}

async fn gateway_to(addr: std::net::SocketAddr, extra: &str) -> TestGateway {
    TestGateway::start(&format!(
        r#"
{extra}
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["{addr}"]
"#
    ))
    .await
}

#[tokio::test]
async fn every_upstream_framing_reaches_the_client_and_keep_alive_survives() {
    let up = scripted(None).await;
    let gw = gateway_to(up.addr, "").await;
    // One client connection for everything: a framing mistake would corrupt the next
    // exchange on it.
    let io = TokioIo::new(TcpStream::connect(gw.addr).await.unwrap());
    let (mut client, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    for round in 0..2 {
        let mut cases = vec![
            (
                Method::GET,
                "/chunked",
                StatusCode::OK,
                b"hello world".to_vec(),
            ),
            (
                Method::GET,
                "/close",
                StatusCode::OK,
                b"until close".to_vec(),
            ),
            (Method::GET, "/big", StatusCode::OK, {
                let mut v = vec![b'a'; 20000];
                v.extend_from_slice(&[b'b'; 20000]);
                v
            }),
            (Method::GET, "/continue", StatusCode::OK, b"ok".to_vec()),
            (Method::HEAD, "/head", StatusCode::OK, Vec::new()),
            (
                Method::GET,
                "/nocontent",
                StatusCode::NO_CONTENT,
                Vec::new(),
            ),
            (Method::GET, "/missing", StatusCode::NOT_FOUND, Vec::new()),
        ];
        if round == 1 {
            cases.reverse();
        }
        for (method, path, status, body) in cases {
            let req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header("host", "gw")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = client.send_request(req).await.unwrap();
            assert_eq!(resp.status(), status, "{method} {path}");
            if method == Method::HEAD {
                assert_eq!(
                    resp.headers()["content-length"],
                    "1234",
                    "HEAD keeps the length"
                );
            }
            if path == "/nocontent" {
                assert_eq!(resp.headers()["x-a"], "1");
            }
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got, body, "{method} {path}");
        }
        // Hop-by-hop fields stay behind; the rest pass as sent (value trimmed), the
        // upstream's Date included; bare-LF heads are re-encoded.
        let req = Request::builder()
            .uri("/hop")
            .header("host", "gw")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        let h = resp.headers().clone();
        assert_eq!(h["x-odd-case"], "v1");
        assert_eq!(h["date"], "Tue, 01 Jan 2030 00:00:00 GMT");
        assert_eq!(h.get_all("date").iter().count(), 1);
        for gone in ["keep-alive", "upgrade"] {
            assert!(!h.contains_key(gone), "{gone} was forwarded: {h:?}");
        }
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "hi");
        let req = Request::builder()
            .uri("/lf")
            .header("host", "gw")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.headers()["x-lf"], "1");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "lf");
        // Trailers from a chunked upstream response reach an HTTP/1.1 client.
        let req = Request::builder()
            .uri("/trailers")
            .header("host", "gw")
            .header("te", "trailers")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers forwarded");
        assert_eq!(trailers["x-checksum"], "900150983cd24fb0");
        assert_eq!(collected.to_bytes(), "abc");
    }
    // Close-delimited answers cost a connection each; every other exchange reused one.
    assert_eq!(up.accepts.load(Ordering::SeqCst), 3);
}

/// Writes `req` and reads one response with a Content-Length body (or none); returns the
/// head and the body.
async fn exchange(s: &mut TcpStream, req: &[u8], pending: &mut Vec<u8>) -> (String, Vec<u8>) {
    s.write_all(req).await.unwrap();
    read_response(s, pending).await
}

async fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> (String, Vec<u8>) {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            let len = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim().parse::<usize>().unwrap())
                .unwrap_or(0);
            let informational = head.starts_with("HTTP/1.1 1");
            let body_len = if informational { 0 } else { len };
            if pending.len() >= end + 4 + body_len {
                let body = pending[end + 4..end + 4 + body_len].to_vec();
                pending.drain(..end + 4 + body_len);
                return (head, body);
            }
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed; had {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    }
}

async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut all))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    all
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn client_side_requests_fast_and_handed_off() {
    let up = Upstream::start("echo").await;
    let gw = gateway_to(up.addr, "max_replay_body_bytes = 64").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();

    // Two pipelined requests in one write: answered in order.
    s.write_all(b"GET /one HTTP/1.1\r\nhost: a\r\n\r\nGET /two HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let (h1, b1) = read_response(&mut s, &mut pending).await;
    let (h2, b2) = read_response(&mut s, &mut pending).await;
    assert!(h1.starts_with("HTTP/1.1 200") && h2.starts_with("HTTP/1.1 200"));
    assert_eq!(json(&b1)["path"], "/one");
    assert_eq!(json(&b2)["path"], "/two");

    // A small body is read whole; the upstream gets it with its length.
    let (h, b) = exchange(
        &mut s,
        b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello",
        &mut pending,
    )
    .await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(h.to_ascii_lowercase().contains("\r\ndate: "), "{h}");
    assert_eq!(json(&b)["body"], "hello");
    assert_eq!(json(&b)["headers"]["content-length"], "5");

    // Handed to hyper on the same connection: a chunked upload, then `Expect`.
    let (h, b) = exchange(
        &mut s,
        b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        &mut pending,
    )
    .await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(json(&b)["body"], "hello world");
    s.write_all(b"PUT /e HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
        .await
        .unwrap();
    let (h, _) = read_response(&mut s, &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 100"), "{h}");
    let (h, b) = exchange(&mut s, b"hi", &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(json(&b)["body"], "hi");
    // A body above the replay cap streams (and still arrives whole).
    let big = "y".repeat(1000);
    let req = format!("POST /big HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n{big}");
    let (h, b) = exchange(&mut s, req.as_bytes(), &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(json(&b)["body"], big);

    // `Connection: close` is answered with the same and the connection ends.
    let (h, b) = exchange(
        &mut s,
        b"GET /last HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        &mut pending,
    )
    .await;
    assert!(h.to_ascii_lowercase().contains("connection: close"), "{h}");
    assert_eq!(json(&b)["path"], "/last");
    assert!(read_to_end(&mut s).await.is_empty());

    // HTTP/1.0 is served (by hyper).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /old HTTP/1.0\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let all = String::from_utf8_lossy(&read_to_end(&mut s).await).into_owned();
    assert!(all.starts_with("HTTP/1.0 200"), "{all}");
    assert!(all.contains("\"path\":\"/old\""), "{all}");

    // Malformed and ambiguous heads are refused with 400 and the connection closed.
    for bad in [
        &b"GET / HTTP/1.1\r\nbad header\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nhost : a\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
    ] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(bad).await.unwrap();
        let all = String::from_utf8_lossy(&read_to_end(&mut s).await).into_owned();
        assert!(
            all.starts_with("HTTP/1.1 400"),
            "{:?} → {all}",
            String::from_utf8_lossy(bad)
        );
    }
}

/// Hostile and oversized heads, each on its own connection: the status, a closed
/// connection, and an upstream that saw nothing.
#[tokio::test]
async fn a_negative_corpus_is_refused_before_the_upstream() {
    let up = Upstream::start("echo").await;
    let gw = gateway_to(up.addr, "max_request_body_bytes = 1000").await;
    let headers = |n: usize| -> Vec<u8> {
        let mut v = b"GET / HTTP/1.1\r\nhost: a\r\n".to_vec();
        for i in 0..n {
            v.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        v.extend_from_slice(b"\r\n");
        v
    };
    let long = |n: usize| {
        [
            b"GET /".as_slice(),
            &vec![b'a'; n],
            b" HTTP/1.1\r\nhost: a\r\n\r\n",
        ]
        .concat()
    };
    let big_field = [
        b"GET / HTTP/1.1\r\nhost: a\r\nx: ".as_slice(),
        &vec![b'a'; 40_000],
        b"\r\n\r\n",
    ]
    .concat();
    let chunked = |body: &[u8]| {
        [
            b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n".as_slice(),
            body,
        ]
        .concat()
    };
    let corpus: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bare LF", b"GET / HTTP/1.1\nhost: a\n\n".to_vec(), "400"),
        ("one bare LF", b"GET / HTTP/1.1\r\nhost: a\nx: b\r\n\r\n".to_vec(), "400"),
        ("bare CR", b"GET / HTTP/1.1\r\nhost: a\rx: b\r\n\r\n".to_vec(), "400"),
        ("NUL in a value", b"GET / HTTP/1.1\r\nhost: a\r\nx: a\x00b\r\n\r\n".to_vec(), "400"),
        ("obs-fold", b"GET / HTTP/1.1\r\nhost: a\r\nx: a\r\n folded\r\n\r\n".to_vec(), "400"),
        ("space before colon", b"GET / HTTP/1.1\r\nhost : a\r\n\r\n".to_vec(), "400"),
        ("CL and TE", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), "400"),
        ("two lengths", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec(), "400"),
        ("target over 8 KiB", long(9_000), "414"),
        ("request line over 32 KiB, unfinished", long(40_000)[..35_000].to_vec(), "414"),
        ("101 fields", headers(101), "431"),
        ("head over 32 KiB", big_field, "431"),
        ("body over the limit", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1001\r\n\r\n".to_vec(), "413"),
        ("chunk size not hex", chunked(b"zz\r\nhello\r\n0\r\n\r\n"), "400"),
        ("chunk size overflows", chunked(b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), "400"),
        ("chunk longer than its size", chunked(b"3\r\nhello\r\n0\r\n\r\n"), "400"),
        ("chunk size with a bare LF", chunked(b"5\nhello\r\n0\r\n\r\n"), "400"),
        ("chunked body over the limit", chunked(&[b"3e8\r\n".as_slice(), &[b'x'; 1000], b"\r\n1\r\nx\r\n0\r\n\r\n"].concat()), "413"),
    ];
    for (what, wire, status) in corpus {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&wire).await.unwrap();
        let all: String = String::from_utf8_lossy(&read_to_end(&mut s).await)
            .chars()
            .take(400)
            .collect();
        assert!(
            all.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {all}"
        );
        assert!(
            all.contains("\"code\""),
            "{what}: the reason is named: {all}"
        );
    }
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    // Within the limits, the same gateway serves.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    let (h, _) = exchange(&mut s, &headers(90), &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(up.hits(), 1);
}

/// The MUSTs of RFC 9112 and RFC 9110 about a received request, one case each: 400 (or
/// the named 4xx/5xx), a closed connection, and nothing forwarded.
#[tokio::test]
async fn rfc_9112_and_9110_musts_about_requests() {
    let up = Upstream::start("echo").await;
    let gw = gateway_to(up.addr, "").await;
    let corpus: Vec<(&str, &[u8], &str)> = vec![
        // RFC 9112 §3.2: Host.
        ("no Host", b"GET / HTTP/1.1\r\n\r\n", "400"),
        ("two Host lines", b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", "400"),
        ("two Hosts in one line", b"GET / HTTP/1.1\r\nhost: a, b\r\n\r\n", "400"),
        ("Host with a space", b"GET / HTTP/1.1\r\nhost: a b\r\n\r\n", "400"),
        ("Host with userinfo", b"GET / HTTP/1.1\r\nhost: user@a\r\n\r\n", "400"),
        ("Host with a path", b"GET / HTTP/1.1\r\nhost: a/b\r\n\r\n", "400"),
        ("Host with a bad port", b"GET / HTTP/1.1\r\nhost: a:x\r\n\r\n", "400"),
        ("no Host, chunked", b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        // §3.2: request-target forms.
        ("asterisk-form on GET", b"GET * HTTP/1.1\r\nhost: a\r\n\r\n", "400"),
        ("authority-form on GET", b"GET a:80 HTTP/1.1\r\nhost: a\r\n\r\n", "400"),
        ("relative target", b"GET a/b HTTP/1.1\r\nhost: a\r\n\r\n", "400"),
        ("target with a fragment", b"GET /a#b HTTP/1.1\r\nhost: a\r\n\r\n", "400"),
        // §3: the request line.
        ("two spaces", b"GET  / HTTP/1.1\r\nhost: a\r\n\r\n", "400"),
        ("tab as separator", b"GET\t/ HTTP/1.1\r\nhost: a\r\n\r\n", "400"),
        ("lowercase version", b"GET / http/1.1\r\nhost: a\r\n\r\n", "400"),
        ("bad version", b"GET / HTTP/1.x\r\nhost: a\r\n\r\n", "400"),
        ("method with a bad character", b"G(T / HTTP/1.1\r\nhost: a\r\n\r\n", "400"),
        // §2.2: whitespace before the first field.
        ("space before the first field", b"GET / HTTP/1.1\r\n host: a\r\n\r\n", "400"),
        // §5 and RFC 9110 §5.5: field syntax.
        ("field name with a space", b"GET / HTTP/1.1\r\nhost: a\r\nx y: z\r\n\r\n", "400"),
        ("empty field name", b"GET / HTTP/1.1\r\nhost: a\r\n: z\r\n\r\n", "400"),
        ("field without a colon", b"GET / HTTP/1.1\r\nhost: a\r\nxyz\r\n\r\n", "400"),
        ("tab before the colon", b"GET / HTTP/1.1\r\nhost\t: a\r\n\r\n", "400"),
        ("control character in a value", b"GET / HTTP/1.1\r\nhost: a\r\nx: a\x01b\r\n\r\n", "400"),
        ("DEL in a field name", b"GET / HTTP/1.1\r\nhost: a\r\nx\x7f: b\r\n\r\n", "400"),
        // §6: framing.
        ("TE not ending in chunked", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n", "400"),
        ("TE chunked twice", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "400"),
        ("unknown transfer coding", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\n\r\n", "400"),
        ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        ("two TE lines", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        ("negative length", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: -1\r\n\r\n", "400"),
        ("signed length", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: +1\r\n\r\nx", "400"),
        ("length list", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1, 1\r\n\r\nx", "400"),
        ("hex length", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0x1\r\n\r\nx", "400"),
        ("length overflowing u64", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 99999999999999999999999\r\n\r\n", "400"),
        ("empty length", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: \r\n\r\n", "400"),
        ("chunk extension with a bare LF", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1;a=b\nx\r\n0\r\n\r\n", "400"),
        ("chunk data without its CRLF", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\nxy0\r\n\r\n", "400"),
    ];
    let mut failures = Vec::new();
    for (what, wire, status) in corpus {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let _ = s.write_all(wire).await;
        let all: String = String::from_utf8_lossy(&read_to_end(&mut s).await)
            .chars()
            .take(300)
            .collect();
        if !all.starts_with(&format!("HTTP/1.1 {status}")) {
            failures.push(format!("{what}: {all:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    // Absolute-form: the target's authority is the host (section 3.2.2), not Host.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    let (h, b) = exchange(
        &mut s,
        b"GET http://b/x HTTP/1.1\r\nhost: a\r\n\r\n",
        &mut pending,
    )
    .await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(json(&b)["headers"]["host"], "b");
    assert_eq!(json(&b)["path"], "/x");
    // HTTP/1.0 needs no Host, and OPTIONS * is allowed.
    for ok in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let _ = s.write_all(ok).await;
        let mut buf = [0u8; 12];
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let got = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            got.starts_with("HTTP/1.") && !got.contains("400"),
            "{}: {got}",
            String::from_utf8_lossy(ok)
        );
    }
}

/// `Upgrade: h2c` is not acted on: the request reaches the upstream as plain HTTP/1.1,
/// without the upgrade fields.
#[tokio::test]
async fn an_h2c_upgrade_is_stripped() {
    let up = Upstream::start("echo").await;
    let gw = gateway_to(up.addr, "").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    let (h, b) = exchange(
        &mut s,
        b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n",
        &mut pending,
    )
    .await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let seen = &json(&b)["headers"];
    assert!(seen.get("upgrade").is_none(), "{seen}");
    assert!(seen.get("http2-settings").is_none(), "{seen}");
    assert!(seen.get("connection").is_none(), "{seen}");
}

#[tokio::test]
async fn slow_and_idle_clients_are_timed_out() {
    let up = Upstream::start("echo").await;
    let gw = gateway_to(up.addr, r#"header_read_timeout = "300ms""#).await;
    // Half a head, then nothing: 408 and closed.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhos").await.unwrap();
    let all = String::from_utf8_lossy(&read_to_end(&mut s).await).into_owned();
    assert!(all.starts_with("HTTP/1.1 408"), "{all}");
    // An idle keep-alive connection is closed quietly after its requests (the timer
    // armed for the first is the one that fires after the last). A deadline of seconds:
    // each request must beat it.
    let gw = gateway_to(up.addr, r#"header_read_timeout = "3s""#).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..3 {
        let (h, _) = exchange(&mut s, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", &mut pending).await;
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    }
    assert!(read_to_end(&mut s).await.is_empty());
    // A body that stops arriving: the fast path's body shares the head's deadline.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let all = String::from_utf8_lossy(&read_to_end(&mut s).await).into_owned();
    assert!(all.starts_with("HTTP/1.1 408"), "{all}");
    // A chunked one is read ahead within the route's deadline.
    let gw = TestGateway::start(&format!(
        "[[routes]]\nupstream = \"u\"\ntimeout = \"300ms\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
        .await
        .unwrap();
    let all = String::from_utf8_lossy(&read_to_end(&mut s).await).into_owned();
    assert!(all.starts_with("HTTP/1.1 408"), "{all}");
    assert!(all.contains("body_timeout"), "{all}");
    assert_eq!(
        up.hits(),
        3,
        "only the complete requests reached the upstream"
    );
}

/// A keep-alive connection idle for a second gives its buffers back, and reads its next
/// request into a small one first: a head longer than that first read, and two
/// pipelined requests, still arrive whole.
#[tokio::test]
async fn an_idle_connection_gives_its_buffers_back_and_serves_on() {
    let up = Upstream::start("echo").await;
    let gw = gateway_to(up.addr, "").await;
    let released = || async {
        let (_, _, m) = gw.admin_http().get("/metrics").await;
        m.as_str()
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("tessera_gateway_idle_buffer_releases_total "))
            .map(|v| v.parse::<u64>().unwrap())
            .unwrap()
    };
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    let get = b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n";
    let before = released().await;
    let (h, _) = exchange(&mut s, get, &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    wait_for("the idle connection to give its buffers back", || async {
        released().await > before
    })
    .await;
    let long = format!(
        "GET /long HTTP/1.1\r\nhost: a\r\nx-long: {}\r\n\r\n",
        "v".repeat(3000)
    );
    let (h, body) = exchange(&mut s, long.as_bytes(), &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let v = json(&body);
    assert_eq!(v["path"], "/long");
    assert_eq!(v["headers"]["x-long"].as_str().unwrap().len(), 3000);
    let before = released().await;
    wait_for(
        "the idle connection to give its buffers back again",
        || async { released().await > before },
    )
    .await;
    let two = [&get[..], &get[..]].concat();
    let (h, _) = exchange(&mut s, &two, &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let (h, _) = read_response(&mut s, &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    // The upstream closes each connection shortly after answering, as one with a short
    // keep-alive timeout does. A POST (never retried) after that must still succeed: the
    // pool notices the close instead of sending on the dead connection.
    let up = scripted(Some(Duration::from_millis(50))).await;
    let gw = gateway_to(up.addr, "").await;
    for i in 1..=3 {
        let (s, _, _) = gw.http.send(Method::POST, "/big", &[], "x").await;
        assert_eq!(s, StatusCode::OK);
        wait_for("the upstream to close its side", || async {
            up.closes.load(Ordering::SeqCst) >= i
        })
        .await;
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), 3);
}

/// A chunked upload too large to hold is streamed; when its framing breaks halfway the
/// client gets 400 and the connection closes, and the upstream is not blamed for it.
#[tokio::test]
async fn a_broken_streamed_upload_is_the_clients_fault() {
    let up = Upstream::start("echo").await;
    let gw = gateway_to(
        up.addr,
        "max_replay_body_bytes = 64\nmax_request_body_bytes = 4000",
    )
    .await;
    let good = [b"c8\r\n".as_slice(), &[b'x'; 200], b"\r\n"].concat();
    let head = b"POST /up HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n";
    for _ in 0..8 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let wire = [head.as_slice(), &good, b"zz\r\n"].concat();
        s.write_all(&wire).await.unwrap();
        let all = String::from_utf8_lossy(&read_to_end(&mut s).await).into_owned();
        assert!(all.starts_with("HTTP/1.1 400"), "{all}");
        assert!(all.contains("bad_request_body"), "{all}");
    }
    // Past the limit while streaming: 413.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut wire = head.to_vec();
    for _ in 0..25 {
        wire.extend_from_slice(&good);
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let _ = s.write_all(&wire).await;
    let all = String::from_utf8_lossy(&read_to_end(&mut s).await).into_owned();
    assert!(all.starts_with("HTTP/1.1 413"), "{all}");
    // The endpoint was not ejected or tripped: it still serves, and a whole streamed
    // upload arrives intact.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    let wire = [head.as_slice(), &good, &good, b"0\r\n\r\n"].concat();
    let (h, b) = exchange(&mut s, &wire, &mut pending).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(json(&b)["body"].as_str().unwrap().len(), 400);
    let ups = gw.upstreams().await;
    assert_eq!(ups["u"]["endpoints"][0]["ejected"], false, "{ups}");
}

/// An upstream that records each request head (through its blank line) and body as it
/// arrived, and answers `ok`.
async fn recording() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = next_head(&mut s, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[end + 4..end + 4 + len].to_vec();
                    buf.drain(..end + 4 + len);
                    let _ = tx.send((head, body));
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx, task)
}

/// Requests whose fields need nothing but passing on go upstream as the client wrote
/// them (case, spacing, order), minus hop-by-hop fields and with the gateway's framing
/// and forwarding fields; the others still get every rule of the general path.
#[tokio::test]
async fn plain_request_fields_go_upstream_as_written() {
    let (addr, mut seen, task) = recording().await;
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
path = {{ exact = "/edit" }}
upstream = "u"
request_headers = {{ add = {{ "x-added" = "1" }} }}
[[routes]]
upstream = "u"
[upstreams.u]
endpoints = ["{addr}"]
"#
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    let mut pass = async |req: &[u8]| {
        let (head, body) = exchange(&mut s, req, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"ok");
        seen.recv().await.unwrap()
    };

    // Every field passes: one copy of the lines as sent.
    let (head, _) = pass(b"GET /v?q=1 HTTP/1.1\r\nHost: gw\r\nX-Odd-Case:  v1 \r\nAccept: */*\r\nx-a: 1\r\nX-A: 2\r\n\r\n").await;
    assert_eq!(
        head,
        "GET /v?q=1 HTTP/1.1\r\nHost: gw\r\nX-Odd-Case:  v1 \r\nAccept: */*\r\nx-a: 1\r\nX-A: 2\r\n\
         x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\r\n"
    );
    // No field but Host (HTTP/1.1 needs it: RFC 9112 section 3.2).
    let (head, _) = pass(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(
        head,
        "GET / HTTP/1.1\r\nHost: gw\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\r\n"
    );
    // Hop-by-hop fields stay behind; the length is the gateway's, from the body it sends.
    let (head, body) = pass(b"POST /f HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\nProxy-Connection: x\r\nContent-Length: 2\r\nA: b\r\n\r\nhi").await;
    assert_eq!(
        head,
        "POST /f HTTP/1.1\r\nHost: gw\r\nA: b\r\nx-forwarded-for: 127.0.0.1\r\n\
         x-forwarded-proto: http\r\ncontent-length: 2\r\n\r\n"
    );
    assert_eq!(body, b"hi");
    // A zero length the client sent is kept on a GET, as on the general path.
    let (head, _) = pass(b"GET /z HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n").await;
    assert!(head.ends_with("content-length: 0\r\n\r\n"), "{head}");
    // A field the client names in Connection, and forwarding fields from an untrusted
    // client, take the general path: removed and replaced.
    let (head, _) = pass(b"GET /g HTTP/1.1\r\nHost: gw\r\nConnection: x-secret\r\nX-Secret: s\r\nX-Forwarded-For: 6.6.6.6\r\nX-Keep: k\r\n\r\n").await;
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("x-secret"), "{head}");
    assert!(!lower.contains("connection"), "{head}");
    assert!(!lower.contains("6.6.6.6"), "{head}");
    assert!(lower.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
    assert!(lower.contains("x-keep: k\r\n"), "{head}");
    // A route that edits the request's fields gets a header map.
    let (head, _) = pass(b"GET /edit HTTP/1.1\r\nHost: gw\r\nX-Mine: m\r\n\r\n").await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-added: 1\r\n"), "{head}");
    assert!(lower.contains("x-mine: m\r\n"), "{head}");
    assert!(lower.contains("host: gw\r\n"), "{head}");
    task.abort();
}

/// An upstream's response fields that need nothing from the gateway reach the client as
/// the upstream wrote them, in one copy; repeated lengths, hop-by-hop fields and bare-LF
/// lines are rewritten field by field.
#[tokio::test]
async fn plain_response_fields_reach_the_client_as_written() {
    let up = scripted(None).await;
    let gw = gateway_to(up.addr, "").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    let (head, body) = exchange(
        &mut s,
        b"GET /verbatim HTTP/1.1\r\nhost: gw\r\n\r\n",
        &mut pending,
    )
    .await;
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\nX-Odd-Case:  v1 \r\nContent-Length: 2\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT"
    );
    assert_eq!(body, b"hi");
    let (head, body) = exchange(
        &mut s,
        b"GET /twolengths HTTP/1.1\r\nhost: gw\r\n\r\n",
        &mut pending,
    )
    .await;
    assert_eq!(
        head.to_ascii_lowercase().matches("content-length").count(),
        1,
        "{head}"
    );
    assert!(head.contains("X-A: 1\r\n"), "{head}");
    assert!(head.contains("date: "), "the gateway's own Date: {head}");
    assert_eq!(body, b"hi");
}

/// A keep-alive connection waiting for its next request is closed when the gateway
/// stops, however long its idle timeout: the wait for shutdown is registered once per
/// connection and still wakes it after many requests.
#[tokio::test]
async fn idle_keep_alive_connections_close_at_shutdown() {
    let up = Upstream::start("echo").await;
    let mut gw = gateway_to(up.addr, r#"header_read_timeout = "1h""#).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..3 {
        let (h, _) = exchange(&mut s, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", &mut pending).await;
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    }
    let stopping = tokio::spawn(async move { gw.stop().await });
    assert!(read_to_end(&mut s).await.is_empty());
    stopping.await.unwrap();
}
