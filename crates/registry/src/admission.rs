//! Admission control: a saturated registry says so at once (429 with `Retry-After`)
//! instead of letting requests queue until their clients time out, which only makes the
//! clients retry into the same queue. Two limits, as Consul's `limits` has them:
//! requests being worked on (parked blocking queries are waiting, not working, and do not
//! count), and open connections per client address (`http_max_conns_per_client`).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::api::AppState;

/// `[limits]` in the server config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests worked on at once (blocking queries parked on a change excluded);
    /// beyond it, 429. 0 turns the limit off.
    pub max_in_flight: usize,
    /// Open connections from one client address; beyond it the new connection gets a
    /// 429 and is closed. 0 turns the limit off. High by default because every local
    /// client shares 127.0.0.1 and each blocking query holds a connection.
    pub max_conns_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: 4096,
            max_conns_per_client: 16_384,
        }
    }
}

/// Seconds a refused client is asked to wait.
const RETRY_AFTER: &str = "1";

/// Middleware over the server's routes (registry, coordinator, events): 429 once
/// `max_in_flight` requests are being worked on.
pub(crate) async fn admit(State(reg): State<AppState>, req: Request, next: Next) -> Response {
    let limit = reg.config.limits.max_in_flight;
    let working = reg.in_flight.fetch_add(1, Ordering::AcqRel);
    let _done = Release(&reg.in_flight);
    let parked = usize::try_from(reg.parked.load(Ordering::Relaxed)).unwrap_or(0);
    if limit > 0 && working.saturating_sub(parked) >= limit {
        reg.refused.fetch_add(1, Ordering::Relaxed);
        return too_busy(&format!(
            "the server is saturated ({limit} requests in progress); retry after {RETRY_AFTER}s"
        ));
    }
    next.run(req).await
}

struct Release<'a>(&'a AtomicUsize);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn too_busy(msg: &str) -> Response {
    let body = serde_json::json!({"error": msg, "code": "too_busy"});
    let mut resp = (axum::http::StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static(RETRY_AFTER),
    );
    resp
}

/// The server's listener, counting connections per client address.
pub(crate) struct LimitedListener {
    inner: TcpListener,
    registry: AppState,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl LimitedListener {
    pub fn new(inner: TcpListener, registry: AppState) -> LimitedListener {
        LimitedListener {
            inner,
            registry,
            open: Arc::default(),
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            // Small JSON answers must not wait on Nagle's algorithm (40 ms with delayed
            // ACKs).
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let ip = addr.ip();
            let max = self.registry.config.limits.max_conns_per_client;
            let admitted = {
                let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
                let n = open.entry(ip).or_insert(0);
                if max > 0 && *n >= max {
                    false
                } else {
                    *n += 1;
                    true
                }
            };
            if admitted {
                let counted = Counted {
                    stream,
                    ip,
                    open: self.open.clone(),
                };
                return (counted, addr);
            }
            self.registry.refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream, max));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Answers a connection over the per-client limit with a 429 and closes it.
async fn refuse(mut stream: TcpStream, limit: usize) {
    let body = serde_json::json!({
        "error": format!("too many connections from this address (limit {limit}); retry after {RETRY_AFTER}s"),
        "code": "too_many_connections",
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: {RETRY_AFTER}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = async {
        // The request head first: an answer that arrives before the request confuses
        // clients (an unexpected message on an idle connection).
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 64 * 1024 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            got.extend_from_slice(&chunk[..n]);
        }
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sends until it closes: closing with its request unread
        // would reset the connection, and the client could lose the 429 it was sent.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), answer).await;
}

/// A client connection that leaves its address's count when dropped.
pub(crate) struct Counted {
    stream: TcpStream,
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
