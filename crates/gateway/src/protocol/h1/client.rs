//! Our HTTP/1.1 client side: one exchange at a time on a connection the request task owns.
//! hyper's client runs each connection as its own task fed through a channel; on a proxy
//! that is two task switches and a channel hand-off per request, about a third of the
//! gateway's user-space instructions. Here the request task writes the request and reads
//! the response head itself; a small body comes back as bytes and the connection returns
//! to its pool at once, a larger one streams and returns the connection at its end.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use crate::protocol::transport::Io;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWriteExt;

use crate::protocol::h1::body::{Body, RAW_FIELDS, RawResponse};
use crate::protocol::h1::pool::Conns;

/// Response heads larger than this are refused (nginx's default buffers are far smaller).
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head or trailer section.
const MAX_HEADERS: usize = 100;
/// Bodies up to this size are copied out of the read buffer, so the buffer is reused for
/// the next response instead of being shared with the body.
const COPY_BODY: usize = 16 * 1024;
/// Request bodies up to this size are sent in the same write as the head.
const INLINE_BODY: usize = 16 * 1024;
/// A chunk-size line (with extensions) or a trailer section longer than this is an error.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// An open HTTP/1.1 connection to one upstream endpoint.
pub struct H1Conn {
    pub io: Io,
    /// The `Connector::id` that opened it.
    pub transport: u64,
    /// Bytes read but not yet consumed.
    buf: BytesMut,
    /// The outgoing head (and small body), reused between requests.
    wbuf: Vec<u8>,
    /// Where the last response head's fields are, reused between requests.
    fields: FieldRanges,
}

/// How an exchange failed, which decides whether it may be retried.
#[derive(Debug)]
pub enum SendError {
    /// The request never reached the upstream: any request may go elsewhere.
    Unsent(String),
    /// The upstream may have seen the request.
    Io(String),
    /// The client's body failed while it was being forwarded (the upstream may have seen
    /// part of it): nothing is to be read from the upstream.
    RequestBody(String),
}

/// The response, and for a `101 Switching Protocols` the connection, now a raw tunnel.
pub struct Exchange {
    pub response: Response<Body>,
    pub upgraded: Option<Upgraded>,
}

/// A connection that switched protocols, with any bytes the upstream already sent.
pub struct Upgraded {
    pub io: Io,
    pub read_ahead: Bytes,
}

impl H1Conn {
    pub fn new(io: Io, transport: u64) -> H1Conn {
        H1Conn {
            io,
            transport,
            buf: BytesMut::with_capacity(8 * 1024),
            wbuf: Vec::with_capacity(1024),
            fields: Vec::with_capacity(16),
        }
    }

    fn reserve(&mut self) {
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(8 * 1024);
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.reserve();
        tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// What goes in the request head.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Origin-form target (`/path?query`).
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// The client's own field lines, written after `headers`, filtered.
    pub raw: Option<crate::protocol::h1::fields::RawFields<'a>>,
    /// Field lines (CRLF-terminated) written after the others: the proxy's
    /// `X-Forwarded-*`.
    pub extra: &'a [u8],
}

/// Sends the request on `conn` and reads the response head. `home` takes the connection
/// back when the exchange is complete.
pub async fn send(
    mut conn: H1Conn,
    head: RequestHead<'_>,
    body: Body,
    home: &Arc<Conns>,
    since: std::time::Instant,
) -> Result<Exchange, SendError> {
    let method = head.method;
    let head_only = *method == Method::HEAD;
    // An upstream may answer before it has read the whole request (413 for a body over
    // its limit, 400, 401) and close; writing the rest then fails. Its answer wins over
    // our write error, as in nginx: the client gets it, and the endpoint did nothing wrong.
    let early = match write_request(&mut conn, &head, body, Arc::as_ptr(home) as usize).await {
        Ok(()) => false,
        Err(e @ SendError::RequestBody(_)) => return Err(e),
        Err(e) if answered_early(&mut conn, head_only).await => {
            tracing::debug!(error = ?e, "upstream answered before reading the whole request");
            true
        }
        Err(e) => return Err(e),
    };

    loop {
        let Some((head_len, mut info)) = parse_head(&conn.buf, head_only, &mut conn.fields)? else {
            if conn.buf.len() >= MAX_HEAD {
                return Err(SendError::Io(format!(
                    "response head larger than {MAX_HEAD} bytes"
                )));
            }
            match conn.fill().await {
                Ok(0) => {
                    return Err(SendError::Io(
                        "connection closed before a response".to_owned(),
                    ));
                }
                Ok(_) => continue,
                Err(e) => return Err(SendError::Io(format!("reading the response: {e}"))),
            }
        };
        let head = conn.buf.split_to(head_len).freeze();
        if info.status.is_informational() && info.status != StatusCode::SWITCHING_PROTOCOLS {
            continue; // 100 Continue, 103 Early Hints: the final answer follows
        }
        // Part of the request is unsent: the connection cannot carry another.
        info.reusable &= !early;
        let mut response = Response::new(Body::empty());
        *response.status_mut() = info.status;
        *response.version_mut() = Version::HTTP_11;
        // The common answer: whole in the buffer, CRLF-terminated lines. Its fields go
        // through as raw lines; no header map is built unless something needs one.
        let whole = matches!(info.framing, Framing::Length(n) if conn.buf.len() as u64 >= n);
        if whole
            && info.status != StatusCode::SWITCHING_PROTOCOLS
            && conn.fields.len() <= RAW_FIELDS
            && head.len() < usize::from(u16::MAX)
        {
            let mut spans = [(0u16, 0u16, 0u16, 0u16); RAW_FIELDS];
            for (span, (name, value)) in spans.iter_mut().zip(&conn.fields) {
                // In range: the head is shorter than u16::MAX.
                *span = (
                    name.start as u16,
                    name.end as u16,
                    value.start as u16,
                    value.end as u16,
                );
            }
            let len = conn.fields.len();
            let verbatim = match (info.verbatim, conn.fields.first(), conn.fields.last()) {
                (true, Some(first), Some(last)) => {
                    crate::protocol::h1::crlf_after(&head, last.1.end)
                        .map(|end| (first.0.start as u16, end as u16))
                }
                _ => None,
            };
            let n = match info.framing {
                Framing::Length(n) => n as usize,
                _ => 0,
            };
            let body = take_body(&mut conn.buf, n);
            if info.reusable && conn.buf.is_empty() {
                home.checkin(conn, since);
            }
            *response.body_mut() = Body::Raw(Box::new(RawResponse {
                head,
                spans,
                len,
                verbatim,
                has_date: info.has_date,
                body: (!body.is_empty()).then_some(body),
            }));
            return Ok(Exchange {
                response,
                upgraded: None,
            });
        }
        *response.headers_mut() = header_map(&head, &conn.fields)?;
        if info.status == StatusCode::SWITCHING_PROTOCOLS {
            let read_ahead = conn.buf.split().freeze();
            return Ok(Exchange {
                response,
                upgraded: Some(Upgraded {
                    io: conn.io,
                    read_ahead,
                }),
            });
        }
        *response.body_mut() = match info.framing {
            Framing::Length(n) if conn.buf.len() as u64 >= n => {
                let body = take_body(&mut conn.buf, n as usize);
                // Anything after the body is a protocol error: such a connection is closed.
                if info.reusable && conn.buf.is_empty() {
                    home.checkin(conn, since);
                }
                Body::bytes(body)
            }
            framing => Body::Upstream(Box::new(UpstreamBody {
                conn: Some(conn),
                state: match framing {
                    Framing::Length(n) => State::Length(n),
                    Framing::Chunked => State::ChunkSize,
                    Framing::Close => State::UntilClose,
                },
                reusable: info.reusable,
                home: home.clone(),
                since,
            })),
        };
        return Ok(Exchange {
            response,
            upgraded: None,
        });
    }
}

/// After a failed request write: whether a final response head is readable anyway (the
/// upstream answered, then closed). The read is bounded by the try's deadline, which
/// the caller holds.
async fn answered_early(conn: &mut H1Conn, head_only: bool) -> bool {
    let mut fields = Vec::new();
    loop {
        match parse_head(&conn.buf, head_only, &mut fields) {
            Ok(Some((len, info))) if info.status.is_informational() => {
                conn.buf.advance(len);
                continue;
            }
            Ok(Some(_)) => return true,
            Ok(None) if conn.buf.len() < MAX_HEAD => {}
            _ => return false,
        }
        match conn.fill().await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
}

/// The first `n` buffered bytes as a body: copied when small, so the buffer stays the
/// connection's own for the next response.
fn take_body(buf: &mut BytesMut, n: usize) -> Bytes {
    if n <= COPY_BODY {
        let b = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        b
    } else {
        buf.split_to(n).freeze()
    }
}

fn needs_length(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// Writes the request head, and the body when it is held whole, in this turn's order of
/// writes to `upstream` ([`crate::protocol::grouped`]). The streamed-body path is boxed: it is
/// rare, and inline its state (frames, chunk sizes, trailers) would make every request's
/// future several hundred bytes larger, all of it copied on each await.
async fn write_request(
    conn: &mut H1Conn,
    head: &RequestHead<'_>,
    body: Body,
    upstream: usize,
) -> Result<(), SendError> {
    let unsent = |e: io::Error| SendError::Unsent(format!("writing the request: {e}"));
    let b = match body {
        Body::Full(b) => b,
        body => return Box::pin(write_streamed(conn, head, body)).await,
    };
    let len = b.as_ref().map_or(0, |b| b.len());
    let had_length = encode_head(&mut conn.wbuf, head);
    if len > 0 || had_length || needs_length(head.method) {
        write_length(&mut conn.wbuf, len as u64);
    }
    conn.wbuf.extend_from_slice(b"\r\n");
    let rest = match b {
        Some(b) if b.len() <= INLINE_BODY => {
            conn.wbuf.extend_from_slice(&b);
            None
        }
        b => b,
    };
    crate::protocol::grouped::write_all(&mut conn.io, upstream, &mut conn.wbuf)
        .await
        .map_err(unsent)?;
    if let Some(b) = rest {
        conn.io.write_all(&b).await.map_err(unsent)?;
    }
    // A no-op on TCP; TLS holds the last record until flushed.
    conn.io.flush().await.map_err(unsent)
}

/// The request line and fields into `w` (cleared first), without the framing fields and
/// the blank line: those depend on the body. Says whether the client sent a length.
fn encode_head(w: &mut Vec<u8>, head: &RequestHead<'_>) -> bool {
    let (method, target, headers) = (head.method, head.target, head.headers);
    w.clear();
    w.extend_from_slice(method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    for (name, value) in headers {
        // The framing headers are ours to write, from the body we actually send.
        if name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    if let Some(raw) = &head.raw {
        had_length |= raw.write(w);
    }
    w.extend_from_slice(head.extra);
    had_length
}

/// A request whose body streams: its length when known, else chunked. Request trailers
/// are not passed on (nginx drops them too): HTTP/2 lets a client put any field there
/// (h2 drops pseudo-headers in a trailer section without a word), and an HTTP/1.1 server
/// that merges trailers into the header section would take a forged `host`,
/// `content-length` or identity field from it, past every check made on the head.
async fn write_streamed(
    conn: &mut H1Conn,
    head: &RequestHead<'_>,
    mut body: Body,
) -> Result<(), SendError> {
    let unsent = |e: io::Error| SendError::Unsent(format!("writing the request: {e}"));
    encode_head(&mut conn.wbuf, head);
    let w = &mut conn.wbuf;
    let exact = body.size_hint().exact();
    match exact {
        Some(n) => write_length(w, n),
        None => w.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    w.extend_from_slice(b"\r\n");
    conn.io.write_all(&conn.wbuf).await.map_err(unsent)?;
    // The head went out: from here on the upstream may act on the request.
    let io_err = |e: io::Error| SendError::Io(format!("writing the request body: {e}"));
    let sent = write_body_frames(conn, &mut body, exact).await;
    if let Err(e @ (SendError::Io(_) | SendError::Unsent(_))) = sent {
        // The upstream stopped reading (it may have answered already): the client is
        // still sending. Its body is read and dropped for a while, as nginx's lingering
        // close does, so the client gets to read the answer instead of a reset.
        tokio::spawn(linger(body));
        return Err(e);
    }
    sent?;
    if exact.is_none() {
        conn.io.write_all(b"0\r\n\r\n").await.map_err(io_err)?;
    }
    conn.io.flush().await.map_err(unsent)
}

/// Longest time the rest of an unsent request body is read and dropped.
const LINGER: std::time::Duration = std::time::Duration::from_secs(30);

async fn linger(mut body: Body) {
    let drain = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

async fn write_body_frames(
    conn: &mut H1Conn,
    body: &mut Body,
    exact: Option<u64>,
) -> Result<(), SendError> {
    let io_err = |e: io::Error| SendError::Io(format!("writing the request body: {e}"));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| SendError::RequestBody(format!("request body: {e}")))?;
        match frame.into_data() {
            Ok(data) if exact.is_some() => {
                conn.io.write_all(&data).await.map_err(io_err)?;
            }
            Ok(data) if !data.is_empty() => {
                let size = format!("{:x}\r\n", data.len());
                conn.io.write_all(size.as_bytes()).await.map_err(io_err)?;
                conn.io.write_all(&data).await.map_err(io_err)?;
                conn.io.write_all(b"\r\n").await.map_err(io_err)?;
            }
            // Empty data, or trailers (see above).
            Ok(_) | Err(_) => {}
        }
    }
    Ok(())
}

pub fn write_length(w: &mut Vec<u8>, n: u64) {
    w.extend_from_slice(b"content-length: ");
    push_decimal(w, n);
    w.extend_from_slice(b"\r\n");
}

/// A `Content-Length` value: one or more ASCII digits and nothing else (no sign, no
/// blanks), `None` beyond `u64`. Not `str::parse`, which takes a `+` and needs UTF-8
/// checked first.
pub fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Appends `n` in decimal (what `write!` does, without the formatting machinery).
pub fn push_decimal(w: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.extend_from_slice(&digits[i..]);
}

/// Writes `name: value\r\n` for every field.
pub fn write_fields(w: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
}

enum Framing {
    Length(u64),
    Chunked,
    /// Delimited by the upstream closing the connection.
    Close,
}

struct HeadInfo {
    status: StatusCode,
    framing: Framing,
    reusable: bool,
    /// The field lines can be copied to a client as they are (see `RawResponse`).
    verbatim: bool,
    has_date: bool,
}

/// (name, value) byte ranges of header fields in a head.
pub type FieldRanges = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

/// Parses a complete response head at the start of `buf`, or `None` if more is needed;
/// the field positions go to `ranges`.
fn parse_head(
    buf: &[u8],
    head_only: bool,
    ranges: &mut FieldRanges,
) -> Result<Option<(usize, HeadInfo)>, SendError> {
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(SendError::Io(format!("malformed response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| SendError::Io(format!("invalid response status {code}")))?;
    let base = buf.as_ptr() as usize;
    let mut reusable = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_coded = false;
    let mut lengths = 0;
    let mut verbatim = true;
    let mut has_date = false;
    ranges.clear();
    for f in resp.headers.iter() {
        let name_at = f.name.as_ptr() as usize - base;
        let value_at = f.value.as_ptr() as usize - base;
        ranges.push((
            name_at..name_at + f.name.len(),
            value_at..value_at + f.value.len(),
        ));
        verbatim = verbatim
            && crate::protocol::h1::crlf_after(buf, value_at + f.value.len()).is_some()
            && !crate::floor::net::is_hop_by_hop_raw(f.name.as_bytes());
        has_date |= f.name.len() == 4 && f.name.eq_ignore_ascii_case("date");
        if f.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            let n = parse_decimal(f.value.trim_ascii())
                .ok_or_else(|| SendError::Io("invalid Content-Length in the response".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(SendError::Io(
                    "conflicting Content-Length values in the response".into(),
                ));
            }
            length = Some(n);
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_coded = true;
            // Chunked must be the final coding for the body to be delimited by it.
            chunked = f
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if f.name.eq_ignore_ascii_case("connection") {
            for token in f.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                }
            }
        }
    }
    let no_body = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Length(0)
    } else if transfer_coded {
        // With both headers present, Transfer-Encoding wins and the connection is not
        // trusted for another exchange.
        if length.is_some() {
            reusable = false;
        }
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if matches!(framing, Framing::Close) {
        reusable = false;
    }
    Ok(Some((
        len,
        HeadInfo {
            status,
            framing,
            reusable,
            verbatim: verbatim && lengths == 1,
            has_date,
        },
    )))
}

/// Header fields as a map whose values share the head's bytes.
fn header_map(
    head: &Bytes,
    fields: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
) -> Result<HeaderMap, SendError> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let name = HeaderName::from_bytes(&head[name.clone()])
            .map_err(|_| SendError::Io("invalid header name in the response".into()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value.clone()))
            .map_err(|_| SendError::Io(format!("invalid value for {name} in the response")))?;
        map.append(name, value);
    }
    Ok(map)
}

enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    UntilClose,
    Done,
}

/// A response body streamed off an upstream connection.
pub struct UpstreamBody {
    conn: Option<H1Conn>,
    state: State,
    reusable: bool,
    home: Arc<Conns>,
    since: std::time::Instant,
}

impl UpstreamBody {
    pub fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.home.checkin(conn, self.since);
        }
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match decode(&mut self.state, &mut conn.buf) {
                Ok(Step::Frame(f)) => {
                    if matches!(self.state, State::Done) {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Ok(Step::End) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    self.conn = None;
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(self.state, State::UntilClose) => {
                    self.conn = None;
                    self.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.conn = None;
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(
                        "upstream closed the connection in the middle of the body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(format!("reading from upstream: {e}"))));
                }
            }
        }
    }
}

enum Step {
    Frame(Frame<Bytes>),
    End,
    /// Needs more bytes from the connection.
    More,
}

/// Advances the body decoder over buffered bytes.
fn decode(state: &mut State, buf: &mut BytesMut) -> Result<Step, String> {
    loop {
        match state {
            State::Done => return Ok(Step::End),
            State::Length(0) => {
                *state = State::Done;
                return Ok(Step::End);
            }
            State::Length(n) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = (*n).min(buf.len() as u64) as usize;
                *n -= take as u64;
                if *n == 0 {
                    *state = State::Done;
                }
                return Ok(Step::Frame(Frame::data(buf.split_to(take).freeze())));
            }
            State::UntilClose => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                return Ok(Step::Frame(Frame::data(buf.split().freeze())));
            }
            State::ChunkSize => {
                let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err("chunk-size line too long".into());
                    }
                    return Ok(Step::More);
                };
                let size = chunk_size(&buf[..eol])?;
                buf.advance(eol + 1);
                *state = if size == 0 {
                    State::Trailers
                } else {
                    State::ChunkData(size)
                };
            }
            State::ChunkData(n) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = (*n).min(buf.len() as u64) as usize;
                *n -= take as u64;
                if *n == 0 {
                    *state = State::ChunkEnd;
                }
                return Ok(Step::Frame(Frame::data(buf.split_to(take).freeze())));
            }
            State::ChunkEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
                buf.advance(2);
                *state = State::ChunkSize;
            }
            State::Trailers => {
                if buf.len() >= 2 && &buf[..2] == b"\r\n" {
                    buf.advance(2);
                    *state = State::Done;
                    return Ok(Step::End);
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((n, parsed))) => {
                        let mut trailers = HeaderMap::with_capacity(parsed.len());
                        for f in parsed {
                            if let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(f.name.as_bytes()),
                                HeaderValue::from_bytes(f.value),
                            ) {
                                trailers.append(name, value);
                            }
                        }
                        buf.advance(n);
                        *state = State::Done;
                        return Ok(Step::Frame(Frame::trailers(trailers)));
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_TRAILERS => {
                        return Ok(Step::More);
                    }
                    Ok(httparse::Status::Partial) => return Err("trailer section too large".into()),
                    Err(e) => return Err(format!("malformed trailer section: {e}")),
                }
            }
        }
    }
}

/// The size from a chunk-size line (without its LF): hex digits, then optional
/// extensions after `;`, ending in CR.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err("chunk-size line not ended by CRLF".into());
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err("invalid chunk size".into());
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err("invalid chunk size".into());
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| "invalid chunk size")?;
    u64::from_str_radix(hex, 16).map_err(|_| "invalid chunk size".into())
}

/// A whole chunked body decoded: its data and trailers, or why it is malformed
/// (`"incomplete"` when it ends early). For tests and fuzzing of the decoder.
pub fn decode_chunked(wire: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
    let mut state = State::ChunkSize;
    let mut buf = BytesMut::from(wire);
    let mut data = Vec::new();
    let mut trailers = None;
    loop {
        match decode(&mut state, &mut buf)? {
            Step::Frame(f) => match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Step::End => return Ok((data, trailers)),
            Step::More => return Err("incomplete".into()),
        }
    }
}

/// Parses a response head as the proxy does: its status, or `None` when more bytes are
/// needed; `Err` when malformed. For fuzzing.
pub fn parse_response_head(buf: &[u8], head_only: bool) -> Result<Option<u16>, String> {
    let mut ranges = Vec::new();
    match parse_head(buf, head_only, &mut ranges) {
        Ok(Some((len, info))) => {
            assert!(len <= buf.len(), "head length beyond the input");
            for (name, value) in &ranges {
                assert!(
                    name.end <= len && value.end <= len,
                    "field outside the head"
                );
            }
            Ok(Some(info.status.as_u16()))
        }
        Ok(None) => Ok(None),
        Err(SendError::Io(e) | SendError::Unsent(e) | SendError::RequestBody(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(wire: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        decode_chunked(wire)
    }

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 1234, u64::MAX] {
            let mut w = Vec::new();
            push_decimal(&mut w, n);
            assert_eq!(w, n.to_string().as_bytes());
        }
    }

    #[test]
    fn lengths_are_digits_only() {
        for n in [0, 7, 10, 1234, u64::MAX] {
            assert_eq!(parse_decimal(n.to_string().as_bytes()), Some(n));
        }
        assert_eq!(parse_decimal(b"007"), Some(7));
        for bad in [
            "",
            "+5",
            "-1",
            " 5",
            "5 ",
            "1_000",
            "0x10",
            "18446744073709551616",
        ] {
            assert_eq!(parse_decimal(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn chunked_bodies_decode() {
        let (data, trailers) = decode_all(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n").unwrap();
        assert_eq!(data, b"hello world");
        assert!(trailers.is_none());
        let (data, trailers) =
            decode_all(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: y\r\n\r\n").unwrap();
        assert_eq!(data, b"abc");
        let t = trailers.unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-t"], "y");
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n",
        ] {
            assert!(
                decode_all(wire).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let ph = |wire: &[u8], head_only| parse_head(wire, head_only, &mut Vec::new());
        let (_, h) = ph(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Length(5)) && h.reusable);
        let (_, h) = ph(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Length(0)));
        let (_, h) = ph(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(matches!(h.framing, Framing::Chunked) && h.reusable);
        let (_, h) = ph(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert!(matches!(h.framing, Framing::Close) && !h.reusable);
        let (_, h) = ph(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Length(0)) && h.reusable);
        let (_, h) = ph(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.reusable);
        assert!(
            ph(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(
            ph(b"HTTP/1.1 200 OK\r\ncontent-le", false)
                .unwrap()
                .is_none()
        );
    }
}
