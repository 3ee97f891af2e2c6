//! Our HTTP/1.1 server side, for the requests that make up nearly all proxy traffic:
//! HTTP/1.1, origin-form target, no body or a `Content-Length` body within the replay
//! cap. Such a request is read, handed to the proxy and answered from this one task, with
//! one timer per connection instead of one per request.
//!
//! Everything else on the connection (HTTP/2 prior knowledge, HTTP/1.0, upgrades,
//! `Expect`, chunked or large uploads, and any head that does not parse cleanly) is handed
//! to hyper's server together with the bytes already read, so hyper's codec stays the one
//! that decides about unusual and malformed input.

use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::grouped::PlainSocket;
use crate::protocol::h1::body::Body;
use crate::protocol::h1::client::{FieldRanges, write_fields, write_length};
use crate::protocol::h1::fields::{Plain, RawFields};
use crate::protocol::peer::Peer;
use crate::protocol::timer::LazyTimer;

/// Request heads larger than this go to hyper, which answers 431.
/// Largest request head (request line and fields): more is 431, or 414 while the request
/// line itself has not ended.
pub const MAX_HEAD: usize = 32 * 1024;
/// Most header fields in one request (431 beyond).
pub const MAX_HEADERS: usize = 100;
/// Longest request target (414 beyond), as nginx's default buffers allow.
const MAX_TARGET: usize = 8 * 1024;
/// Response bodies up to this size are written in one `write` with their head.
const INLINE_BODY: usize = 64 * 1024;
/// How long a keep-alive connection waits for its next request before it gives its
/// buffers back (12 KiB; taken again when the next request comes). Long enough that a
/// busy connection never does: its timer is left armed, and fires once a second.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// Times an idle connection gave its buffers back, in this process.
pub static IDLE_RELEASES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What answers the requests a connection reads (the proxy, in the gateway). Generic,
/// not a trait object: the server is compiled for its one handler, so nothing is boxed
/// per request.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. `raw`, when given, holds the request's header fields as the
    /// client wrote them (its map is then empty); `start` is when it arrived; `timer`,
    /// when the connection has one, is the connection's timer to reuse.
    fn handle(
        &self,
        req: &mut Request<Body>,
        raw: Option<RawFields<'_>>,
        peer: &Peer,
        start: Instant,
        timer: Option<&mut LazyTimer>,
    ) -> impl Future<Output = Response<Body>> + Send;

    /// Whether the connection must end after `response`, which this handler made (what
    /// is left of the request's body cannot be trusted to frame the next request).
    fn ends_connection(&self, response: &Response<Body>) -> bool;
}

/// What the connection loop needs besides the socket.
pub struct Ctx<H> {
    pub handler: Arc<H>,
    /// Request bodies up to this many bytes are read here; larger ones go to hyper.
    pub replay_cap: usize,
    /// The most a request body may be.
    pub max_body: u64,
    pub peer: Peer,
    pub stop: CancellationToken,
    pub header_timeout: Duration,
    pub hyper: Arc<auto::Builder<TokioExecutor>>,
}

enum Next {
    Close,
    /// Idle since then for a while, buffers given back: the next request is waited for
    /// outside the request state.
    Idle(Instant),
    /// Serve the rest of the connection with hyper; these bytes were read already.
    HandOff(BytesMut),
}

/// Serves one client connection (TCP, or TLS over it) until it closes, the server stops,
/// or it is handed off. `h2` says ALPN chose HTTP/2: hyper's from the first byte.
pub async fn serve<IO, H: Handler>(io: IO, ctx: Ctx<H>, watcher: Watcher, h2: bool)
where
    IO: AsyncRead + AsyncWrite + PlainSocket + Unpin + Send + 'static,
{
    let mut conn = Conn {
        io,
        buf: BytesMut::with_capacity(8 * 1024),
        out: Vec::with_capacity(4 * 1024),
        head_timer: LazyTimer::default(),
        upstream_timer: LazyTimer::default(),
        fields: Vec::with_capacity(16),
    };
    let next = if h2 {
        Next::HandOff(BytesMut::new())
    } else {
        // The request state (the proxy's future inside) lives in its own allocation,
        // made when a connection becomes busy and freed when it has been idle a second:
        // a busy connection pays for it once, an idle one holds only this small future.
        let mut idle_since = Instant::now();
        loop {
            match Box::pin(conn.run(&ctx, idle_since)).await {
                Next::Idle(since) => idle_since = since,
                other => break other,
            }
            let deadline = idle_since + ctx.header_timeout;
            let cancelled = std::pin::pin!(ctx.stop.cancelled());
            let mut stop = Stop::new(&ctx.stop, cancelled);
            match conn.fill(deadline, Some(&mut stop)).await {
                Fill::Read => {}
                Fill::Eof | Fill::Stopped | Fill::TimedOut => break Next::Close,
            }
        }
    };
    if let Next::Close = next {
        // Sends what TLS still buffers, then its close_notify (a FIN on plain TCP); a
        // client that stops reading does not hold the task past the header timeout.
        let _ = tokio::time::timeout(ctx.header_timeout, conn.io.shutdown()).await;
        return;
    }
    if let Next::HandOff(read) = next {
        let Ctx {
            handler,
            peer,
            hyper,
            ..
        } = ctx;
        let svc = service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            let peer = peer.clone();
            async move {
                let mut req = req.map(Body::Stream);
                // hyper closes the connection itself when the response says so. Boxed:
                // hyper moves this future into each HTTP/2 stream's task, several times;
                // unboxed, the whole request future (kilobytes) is copied each time
                // (memmove was the largest item in a profile of gRPC load).
                let mut resp =
                    Box::pin(handler.handle(&mut req, None, &peer, Instant::now(), None)).await;
                // hyper writes the header map, so raw upstream fields become one here.
                crate::protocol::h1::body::materialize(&mut resp);
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let io = TokioIo::new(Prefixed {
            read: read.freeze(),
            io: conn.io,
        });
        // Boxed: hyper's connection state would otherwise be in every connection's
        // future, idle ones included.
        let served =
            Box::pin(watcher.watch(hyper.serve_connection_with_upgrades(io, svc).into_owned()));
        if let Err(e) = served.await {
            tracing::trace!(error = %e, "connection ended with an error");
        }
    }
}

struct Conn<IO> {
    io: IO,
    buf: BytesMut,
    out: Vec<u8>,
    /// For the header deadline; re-armed lazily, so a keep-alive request costs no timer
    /// operation.
    head_timer: LazyTimer,
    /// For the proxy's per-try timeouts, the same way.
    upstream_timer: LazyTimer,
    fields: FieldRanges,
}

/// A request head the fast path accepts; its fields' positions are in `Conn::fields`.
struct Head {
    len: usize,
    body_len: u64,
    close: bool,
    method: Method,
    path: Range<usize>,
    plain: Plain,
}

enum Parsed {
    Partial,
    Fast(Head),
    /// Valid or not, this is hyper's to handle.
    Other,
    /// Refused here with this status and reason, and the connection closed.
    Reject(u16, &'static str),
}

/// The server's shutdown, as an idle connection waits for it.
struct Stop<'a, 'b> {
    token: &'a CancellationToken,
    cancelled: Pin<&'b mut tokio_util::sync::WaitForCancellationFuture<'a>>,
    /// `cancelled` was polled and holds this task's waker.
    armed: bool,
}

impl<'a, 'b> Stop<'a, 'b> {
    fn new(
        token: &'a CancellationToken,
        cancelled: Pin<&'b mut tokio_util::sync::WaitForCancellationFuture<'a>>,
    ) -> Self {
        Stop {
            token,
            cancelled,
            armed: false,
        }
    }

    /// Whether the server is stopping. The wait registers the task's waker once per
    /// connection, not once per request: re-polling it locks the token's waiter list
    /// each time (callgrind: about 150 instructions a request), and the waker of the
    /// connection's task does not change.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if self.armed {
            return self.token.is_cancelled();
        }
        self.armed = true;
        self.cancelled.as_mut().poll(cx).is_ready()
    }
}

/// A read for a connection that gave its buffer back: into a small one on the stack,
/// then into `buf`, taken at full size only now that bytes have come.
#[cold]
#[inline(never)]
fn poll_first_read<IO: AsyncRead + Unpin>(
    io: &mut IO,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    let mut first = [0u8; 512];
    let mut rb = tokio::io::ReadBuf::new(&mut first);
    std::task::ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    buf.reserve(8 * 1024);
    buf.extend_from_slice(rb.filled());
    Poll::Ready(Ok(rb.filled().len()))
}

enum Fill {
    Read,
    Eof,
    TimedOut,
    Stopped,
}

impl<IO: AsyncRead + AsyncWrite + PlainSocket + Unpin> Conn<IO> {
    /// Serves requests until the connection closes, is handed off, or has been idle
    /// (since `idle_since`, at first) long enough to give its buffers back.
    async fn run<H: Handler>(&mut self, ctx: &Ctx<H>, idle_since: Instant) -> Next {
        let cancelled = std::pin::pin!(ctx.stop.cancelled());
        let mut stop = Stop::new(&ctx.stop, cancelled);
        let mut idle_since = idle_since;
        loop {
            // Waiting for a request: between requests and while its head arrives.
            let deadline = idle_since + ctx.header_timeout;
            let head = loop {
                let limits = (ctx.replay_cap, ctx.max_body);
                match parse(&self.buf, limits, &mut self.fields) {
                    Parsed::Fast(h) => break h,
                    Parsed::Other => return Next::HandOff(std::mem::take(&mut self.buf)),
                    Parsed::Reject(status, why) => {
                        let _ = self.io.write_all(&refusal(status, why)).await;
                        return Next::Close;
                    }
                    Parsed::Partial if self.buf.len() > MAX_HEAD => {
                        let (status, why) = if self.buf.contains(&b'\n') {
                            (431, "request head larger than 32 KiB")
                        } else {
                            (414, "request line longer than 32 KiB")
                        };
                        let _ = self.io.write_all(&refusal(status, why)).await;
                        return Next::Close;
                    }
                    Parsed::Partial => {}
                }
                // An idle connection closes on shutdown; one mid-head gets its chance.
                let stop = if self.buf.is_empty() {
                    Some(&mut stop)
                } else {
                    None
                };
                // Idle with buffers held: wake once, a while in, to give them back.
                let holding = self.buf.is_empty() && self.buf.capacity() > 0;
                let wait = if holding {
                    deadline.min(idle_since + SHRINK_AFTER)
                } else {
                    deadline
                };
                match self.fill(wait, stop).await {
                    Fill::Read => {}
                    Fill::Eof | Fill::Stopped => return Next::Close,
                    Fill::TimedOut if holding && wait < deadline => {
                        self.buf = BytesMut::new();
                        self.out = Vec::new();
                        self.fields = FieldRanges::new();
                        IDLE_RELEASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Next::Idle(idle_since);
                    }
                    Fill::TimedOut => {
                        if !self.buf.is_empty() {
                            let _ = self.io.write_all(REQUEST_TIMEOUT).await;
                        }
                        return Next::Close;
                    }
                }
            };
            let head_bytes = self.buf.split_to(head.len).freeze();
            let body_len = head.body_len as usize;
            while self.buf.len() < body_len {
                match self.fill(deadline, None).await {
                    Fill::Read => {}
                    Fill::TimedOut => {
                        let _ = self.io.write_all(REQUEST_TIMEOUT).await;
                        return Next::Close;
                    }
                    _ => return Next::Close,
                }
            }
            let body = if body_len == 0 {
                Body::empty()
            } else {
                Body::bytes(self.buf.split_to(body_len).freeze())
            };
            let head_request = head.method == Method::HEAD;
            let close = head.close;
            // Plain fields go upstream as written, without a header map.
            let raw = (head.plain != Plain::No).then_some(RawFields {
                head: &head_bytes,
                ranges: &self.fields,
                verbatim: head.plain == Plain::Verbatim,
            });
            let map_from = raw.is_none().then_some(&self.fields);
            let Some(mut req) = build_request(&head_bytes, head, map_from, body) else {
                // Parsed once already, so this does not happen; hyper gets the bytes.
                let mut all = BytesMut::from(&head_bytes[..]);
                all.extend_from_slice(&self.buf);
                return Next::HandOff(all);
            };
            let start = Instant::now();
            let resp = ctx
                .handler
                .handle(
                    &mut req,
                    raw,
                    &ctx.peer,
                    start,
                    Some(&mut self.upstream_timer),
                )
                .await;
            let close = close || ctx.stop.is_cancelled() || ctx.handler.ends_connection(&resp);
            if self.respond(resp, head_request, close).await.is_err() || close {
                return Next::Close;
            }
            idle_since = Instant::now();
        }
    }

    /// Reads more bytes, up to `deadline`; `stop` ends an idle wait. A connection that
    /// gave its buffer back waits with a small one on the stack, and takes a full one
    /// only once bytes come.
    async fn fill(&mut self, deadline: Instant, mut stop: Option<&mut Stop<'_, '_>>) -> Fill {
        if self.buf.capacity() > 0 && self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(8 * 1024);
        }
        std::future::poll_fn(|cx| {
            let read = if self.buf.capacity() > 0 {
                tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
            } else {
                poll_first_read(&mut self.io, cx, &mut self.buf)
            };
            match read {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Fill::Eof),
                Poll::Ready(Ok(_)) => return Poll::Ready(Fill::Read),
                Poll::Pending => {}
            }
            if let Some(stop) = stop.as_mut()
                && stop.poll(cx)
            {
                return Poll::Ready(Fill::Stopped);
            }
            self.head_timer
                .poll_until(cx, deadline)
                .map(|()| Fill::TimedOut)
        })
        .await
    }

    async fn respond(
        &mut self,
        resp: Response<Body>,
        head_request: bool,
        close: bool,
    ) -> io::Result<()> {
        self.write_response(resp, head_request, close).await?;
        // A no-op on TCP; TLS holds the last record until flushed.
        self.io.flush().await
    }

    /// Writes `out` in this turn's order of writes ([`crate::protocol::grouped`]).
    async fn send_out(&mut self) -> io::Result<()> {
        crate::protocol::grouped::write_all(
            &mut self.io,
            crate::protocol::grouped::CLIENTS,
            &mut self.out,
        )
        .await
    }

    async fn write_response(
        &mut self,
        resp: Response<Body>,
        head_request: bool,
        close: bool,
    ) -> io::Result<()> {
        let (parts, mut body) = resp.into_parts();
        let status = parts.status;
        let w = &mut self.out;
        w.clear();
        if status == StatusCode::OK {
            w.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        } else {
            w.extend_from_slice(b"HTTP/1.1 ");
            w.extend_from_slice(status.as_str().as_bytes());
            w.push(b' ');
            w.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        let no_body = head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let mut chunked = false;
        let mut has_date = false;
        for (name, value) in &parts.headers {
            // A HEAD or 304 answer keeps the upstream's Content-Length: it describes the
            // representation, not this (empty) message. Otherwise framing is ours.
            if !no_body && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) {
                continue;
            }
            // `close` decides this one.
            if name == header::CONNECTION {
                continue;
            }
            has_date |= name == header::DATE;
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        // The upstream's lines as they came, its length (that of the body it sent, held
        // whole) included.
        let verbatim = match &body {
            Body::Raw(raw) => raw.verbatim,
            _ => None,
        };
        if let (Some((from, to)), Body::Raw(raw)) = (verbatim, &body) {
            w.extend_from_slice(&raw.head[from as usize..to as usize]);
            has_date |= raw.has_date;
        } else if let Body::Raw(raw) = &body {
            // The upstream's own lines, minus hop-by-hop fields and (unless the answer
            // has no body) its framing, which is ours to write.
            for (name, value) in raw.lines() {
                if skip_raw_field(name, no_body) {
                    continue;
                }
                has_date |= name.eq_ignore_ascii_case(b"date");
                w.extend_from_slice(name);
                w.extend_from_slice(b": ");
                w.extend_from_slice(value);
                w.extend_from_slice(b"\r\n");
            }
        }
        if !no_body && verbatim.is_none() {
            match body.size_hint().exact() {
                Some(n) => write_length(w, n),
                None => {
                    chunked = true;
                    w.extend_from_slice(b"transfer-encoding: chunked\r\n");
                }
            }
        }
        if !has_date {
            w.extend_from_slice(b"date: ");
            crate::protocol::h1::date::append(w);
            w.extend_from_slice(b"\r\n");
        }
        if close {
            w.extend_from_slice(b"connection: close\r\n");
        }
        w.extend_from_slice(b"\r\n");
        if no_body {
            return self.send_out().await;
        }
        let whole = match &mut body {
            Body::Full(b) => Some(b.take()),
            Body::Raw(raw) => Some(raw.body.take()),
            _ => None,
        };
        if let Some(b) = whole {
            return match b {
                Some(b) if b.len() <= INLINE_BODY => {
                    self.out.extend_from_slice(&b);
                    self.send_out().await
                }
                Some(b) => {
                    self.send_out().await?;
                    self.io.write_all(&b).await
                }
                None => self.send_out().await,
            };
        }
        self.io.write_all(&self.out).await?;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(io::Error::other)?;
            match frame.into_data() {
                Ok(data) if !chunked => self.io.write_all(&data).await?,
                Ok(data) if !data.is_empty() => {
                    self.out.clear();
                    {
                        use std::io::Write as _;
                        let _ = write!(self.out, "{:x}\r\n", data.len());
                    }
                    self.io.write_all(&self.out).await?;
                    self.io.write_all(&data).await?;
                    self.io.write_all(b"\r\n").await?;
                }
                Ok(_) => {}
                Err(frame) => {
                    if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                        self.out.clear();
                        self.out.extend_from_slice(b"0\r\n");
                        write_fields(&mut self.out, &trailers);
                        self.out.extend_from_slice(b"\r\n");
                        self.io.write_all(&self.out).await?;
                        return Ok(());
                    }
                }
            }
        }
        if chunked {
            self.io.write_all(b"0\r\n\r\n").await?;
        }
        Ok(())
    }
}

/// A refusal (400, 413, 414, 431) in the gateway's JSON error shape, closing the
/// connection: after a head that cannot be trusted, nothing more on it can be either.
fn refusal(status: u16, why: &str) -> Vec<u8> {
    let (phrase, code) = match status {
        413 => ("Content Too Large", "body_too_large"),
        414 => ("URI Too Long", "target_too_long"),
        431 => ("Request Header Fields Too Large", "head_too_large"),
        _ => ("Bad Request", "bad_request"),
    };
    let body =
        serde_json::json!({"error": format!("{}: {why}", phrase.to_lowercase()), "code": code})
            .to_string();
    format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Whether every line of a parsed head ends in CRLF. Parsers disagree on bare LF
/// (httparse and hyper accept it, some servers do not), which is what request smuggling
/// feeds on. A head's lines end right after the request line's ` HTTP/1.x` (`path_end` +
/// 9), after each field value (past optional blanks), and at its end, so those are the
/// only places to look: no scan of the whole head.
fn crlf_lines(head: &[u8], path_end: usize, fields: &FieldRanges) -> bool {
    let ends_line = |i: usize| crate::protocol::h1::crlf_after(head, i).is_some();
    ends_line(path_end + 9)
        && fields.iter().all(|(_, value)| ends_line(value.end))
        && head.ends_with(b"\r\n\r\n")
}

/// Whether a raw upstream field stays out of the client's response: hop-by-hop fields
/// always, the length when the gateway frames the body itself.
fn skip_raw_field(name: &[u8], no_body: bool) -> bool {
    if no_body {
        crate::floor::net::is_hop_by_hop_raw(name)
    } else {
        crate::protocol::h1::fields::dropped(name)
    }
}

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// What the request parser makes of `buf` with the default limits: `"partial"`,
/// `"fast"`, `"other"` (hyper's to handle) or `"reject"`. For fuzzing.
pub fn parse_request_head(buf: &[u8]) -> &'static str {
    let mut ranges = Vec::new();
    match parse(buf, (64 * 1024, 64 * 1024 * 1024), &mut ranges) {
        Parsed::Partial => "partial",
        Parsed::Fast(_) => {
            for (name, value) in &ranges {
                assert!(
                    name.end <= buf.len() && value.end <= buf.len(),
                    "field outside the input"
                );
            }
            "fast"
        }
        Parsed::Other => "other",
        Parsed::Reject(status, _) => {
            assert!((400..500).contains(&status), "a rejection is a 4xx");
            "reject"
        }
    }
}

/// Decides whether the head at the start of `buf` is complete and takes the fast path;
/// the field positions go to `ranges`. `limits` are the replay cap (bodies up to it are
/// read here) and the largest body accepted at all.
fn parse(buf: &[u8], limits: (usize, u64), ranges: &mut FieldRanges) -> Parsed {
    let (body_cap, max_body) = limits;
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Not HTTP/1.x: an HTTP/2 preface (h2c with prior knowledge) is hyper's.
        Err(httparse::Error::Version) => return Parsed::Other,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject(431, "more than 100 header fields");
        }
        Err(e) => return Parsed::Reject(400, malformed(e)),
    };
    if len > MAX_HEAD {
        return Parsed::Reject(431, "request head larger than 32 KiB");
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::Other;
    };
    if path.len() > MAX_TARGET {
        return Parsed::Reject(414, "request target longer than 8 KiB");
    }
    if path.contains('#') {
        return Parsed::Reject(400, "a fragment in the request target");
    }
    if path == "*" && method != "OPTIONS" {
        return Parsed::Reject(400, "the asterisk target is only for OPTIONS");
    }
    let unusual = req.version != Some(1) || !path.starts_with('/');
    let base = buf.as_ptr() as usize;
    let path_at = path.as_ptr() as usize - base;
    let mut body_len: Option<u64> = None;
    let mut lengths = 0;
    let mut other = false;
    let mut transfer_coded = false;
    let mut hosts = 0;
    let mut close = false;
    let mut plain = Plain::Verbatim;
    ranges.clear();
    for f in req.headers.iter() {
        let name = f.name.as_bytes();
        let name_at = name.as_ptr() as usize - base;
        let value_at = f.value.as_ptr() as usize - base;
        ranges.push((
            name_at..name_at + name.len(),
            value_at..value_at + f.value.len(),
        ));
        plain = plain.with(name, f.value);
        // Only the names that change framing or connection handling are looked at.
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                lengths += 1;
                match crate::protocol::h1::client::parse_decimal(f.value) {
                    Some(n) if n > max_body => {
                        return Parsed::Reject(413, "Content-Length above the gateway's limit");
                    }
                    Some(n) if n as usize <= body_cap => body_len = Some(n),
                    _ => other = true,
                }
            }
            4 if name.eq_ignore_ascii_case(b"host") => {
                hosts += 1;
                if hosts > 1 {
                    return Parsed::Reject(400, "more than one Host field");
                }
                if !crate::floor::net::valid_host(f.value) {
                    return Parsed::Reject(400, "an invalid Host field value");
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                // Only chunked is understood; another coding, or chunked twice, leaves
                // the body's end to a guess (RFC 9112 section 6.1).
                if transfer_coded || !f.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Parsed::Reject(400, "a transfer coding other than one chunked");
                }
                if req.version != Some(1) {
                    return Parsed::Reject(400, "Transfer-Encoding in an HTTP/1.0 request");
                }
                transfer_coded = true;
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => other = true,
            6 if name.eq_ignore_ascii_case(b"expect") => other = true,
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in f.value.split(|&b| b == b',') {
                    if token.trim_ascii().eq_ignore_ascii_case(b"close") {
                        close = true;
                    }
                }
            }
            _ => {}
        }
    }
    if hosts == 0 && req.version == Some(1) {
        return Parsed::Reject(400, "an HTTP/1.1 request needs a Host field");
    }
    if !crlf_lines(&buf[..len], path_at + path.len(), ranges) {
        return Parsed::Reject(400, "a line ends in a bare LF (CRLF required)");
    }
    // Two framings at once is how requests are smuggled past a proxy that reads one
    // and an upstream that reads the other: refused outright (RFC 9112 section 6.1 allows
    // it), never guessed at.
    if transfer_coded && lengths > 0 {
        return Parsed::Reject(400, "both Content-Length and Transfer-Encoding");
    }
    // Repeated (even equal) lengths are refused, as nginx does: which one a later hop
    // reads is not for a client to pick.
    if lengths > 1 {
        return Parsed::Reject(400, "Content-Length appears more than once");
    }
    if unusual || other || transfer_coded {
        return Parsed::Other;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    Parsed::Fast(Head {
        len,
        body_len: body_len.unwrap_or(0),
        close,
        method,
        path: path_at..path_at + path.len(),
        plain,
    })
}

/// What is wrong with a head httparse refused, in words for the 400.
fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header field name (space before the colon?)",
        httparse::Error::HeaderValue => "invalid header field value (control character?)",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method or request target",
        _ => "malformed request head",
    }
}

/// The request from a head that `parse` accepted; its header values share `head`.
/// Without `fields` its header map stays empty (and unallocated): the fields travel raw.
fn build_request(
    head: &Bytes,
    parsed: Head,
    fields: Option<&FieldRanges>,
    body: Body,
) -> Option<Request<Body>> {
    let uri = Uri::from_maybe_shared(head.slice(parsed.path)).ok()?;
    let mut request = Request::new(body);
    *request.method_mut() = parsed.method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    if let Some(fields) = fields {
        let headers = request.headers_mut();
        // Room for a field or two the proxy may add (identity headers, a route's edits);
        // X-Forwarded-* are written after the map, not put in it.
        headers.reserve(fields.len() + 2);
        for (name, value) in fields {
            let name = HeaderName::from_bytes(&head[name.clone()]).ok()?;
            let value = HeaderValue::from_maybe_shared(head.slice(value.clone())).ok()?;
            headers.append(name, value);
        }
    }
    Some(request)
}

/// A socket with bytes already read from it in front, for the hand-off to hyper.
struct Prefixed<IO> {
    read: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let chunk = self.read.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_fields_skipped_are_hop_by_hop_and_our_framing() {
        for name in [
            "Connection",
            "keep-alive",
            "Proxy-Connection",
            "proxy-authenticate",
            "TRAILER",
            "upgrade",
            "Transfer-Encoding",
        ] {
            assert!(skip_raw_field(name.as_bytes(), false), "{name}");
            assert!(skip_raw_field(name.as_bytes(), true), "{name}");
        }
        // The length describes the representation when the answer has no body.
        assert!(skip_raw_field(b"Content-Length", false));
        assert!(!skip_raw_field(b"Content-Length", true));
        for name in [
            "date",
            "content-type",
            "x-connection",
            "upgrades",
            "keep-alive2",
            "",
        ] {
            assert!(!skip_raw_field(name.as_bytes(), false), "{name}");
        }
    }

    fn fast(wire: &[u8]) -> Option<(usize, u64, bool)> {
        match parse(wire, (1024, 1 << 20), &mut Vec::new()) {
            Parsed::Fast(h) => Some((h.len, h.body_len, h.close)),
            _ => None,
        }
    }

    #[test]
    fn plain_requests_take_the_fast_path() {
        let get = b"GET /a?b=c HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(fast(get), Some((get.len(), 0, false)));
        let blanks = b"GET / HTTP/1.1\r\nhost: x  \r\nempty:\r\nx-tab:\tv\t\r\n\r\n";
        assert_eq!(fast(blanks), Some((blanks.len(), 0, false)));
        let post = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: keep-alive, close\r\n\r\nhello";
        assert_eq!(fast(post), Some((post.len() - 5, 5, true)));
        assert!(matches!(
            parse(b"GET /a HTTP/1.1\r\nhost", (1024, 1 << 20), &mut Vec::new()),
            Parsed::Partial
        ));
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for wire in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"GET /a HTTP/1.0\r\n\r\n",
            b"GET http://x/a HTTP/1.1\r\nhost: x\r\n\r\n",
            b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.0\r\ncontent-length: 0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: +5\r\n\r\n",
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2048\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"POST /a HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
        ] {
            assert!(
                matches!(parse(wire, (1024, 1 << 20), &mut Vec::new()), Parsed::Other),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn two_framings_are_refused() {
        for wire in [
            &b"POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.0\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(
                parse(wire, (1024, 1 << 20), &mut Vec::new()),
                Parsed::Reject(400, _)
            ));
        }
    }

    #[test]
    fn hostile_heads_are_refused_with_the_right_status() {
        let many: Vec<u8> = [&b"GET / HTTP/1.1\r\n"[..]]
            .into_iter()
            .chain(std::iter::repeat_n(&b"x: y\r\n"[..], 101))
            .chain([&b"\r\n"[..]])
            .flatten()
            .copied()
            .collect();
        let long_target = [b"GET /".as_slice(), &[b'a'; 9000], b" HTTP/1.1\r\n\r\n"].concat();
        let cases: Vec<(&[u8], u16)> = vec![
            (b"GET / HTTP/1.1\r\nhost: a\r\n\n", 400),
            (b"GET / HTTP/1.1\nhost: a\n\n", 400),
            (b"GET / HTTP/1.1\r\nhost: a\nx: b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nname : v\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nx: a\r\n  folded\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nhost: a\rx: b\r\n\r\n", 400),
            (&many, 431),
            (&long_target, 414),
            (b"POST / HTTP/1.1\r\ncontent-length: 2000000\r\n\r\n", 413),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
                400,
            ),
        ];
        for (wire, status) in cases {
            match parse(wire, (1024, 1 << 20), &mut Vec::new()) {
                Parsed::Reject(s, _) => {
                    assert_eq!(s, status, "{:?}", String::from_utf8_lossy(wire))
                }
                _ => panic!("not refused: {:?}", String::from_utf8_lossy(wire)),
            }
        }
    }

    #[test]
    fn requests_share_the_head_bytes() {
        let head =
            Bytes::from_static(b"PUT /x%20y?q=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2\r\n\r\n");
        let mut fields = Vec::new();
        let Parsed::Fast(parsed) = parse(&head, (1024, 1 << 20), &mut fields) else {
            panic!("not a fast-path head");
        };
        let req = build_request(&head, parsed, Some(&fields), Body::empty()).unwrap();
        assert_eq!(req.method(), Method::PUT);
        assert_eq!(req.uri().path(), "/x%20y");
        assert_eq!(req.uri().query(), Some("q=1"));
        assert_eq!(req.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(req.headers()["host"], "h");
    }
}
