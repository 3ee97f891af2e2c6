//! One body type for everything the gateway sends and receives: bytes it holds (a small
//! request or response read whole, a buffered request kept for retries, an error page), a
//! streamed hyper body (HTTP/2, or a large upload), or a response streamed off one of our
//! own HTTP/1.1 upstream connections. An enum rather than a boxed trait object keeps the
//! hot path free of allocations.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::protocol::h1::client::UpstreamBody;

pub enum Body {
    /// Held in memory; `None` once sent.
    Full(Option<Bytes>),
    Stream(Incoming),
    /// A response read off our own HTTP/1.1 upstream connection, which goes back to its
    /// pool when the body has been read to the end.
    Upstream(Box<UpstreamBody>),
    /// A whole upstream response whose header fields are still the upstream's raw lines
    /// (the response's `HeaderMap` is empty): our HTTP/1.1 server writes them through,
    /// filtered, without building a map. Anything else that needs the fields calls
    /// [`materialize`] first.
    Raw(Box<RawResponse>),
    /// A client's request body too large to hold for retries, streamed to the upstream.
    Upload(Box<Upload>),
    /// A body re-encoded on its way (gRPC-Web's base64, its trailers as a frame).
    Mapped(http_body_util::combinators::BoxBody<Bytes, BodyError>),
}

/// What went wrong with a client's streamed body: answered as the client's fault (400,
/// 413), never counted against the upstream it was being sent to.
#[derive(Debug, Clone)]
pub enum ClientFault {
    TooLarge(u64),
    Broken(String),
}

/// A streamed request body: what was read ahead first, then the rest off the client
/// connection, counted against the size limit.
pub struct Upload {
    pub ahead: Option<Bytes>,
    pub rest: Incoming,
    pub seen: u64,
    pub max: u64,
    /// Set when the body fails; the proxy reads it after a failed exchange.
    pub fault: Arc<OnceLock<ClientFault>>,
    /// A copy of what went through, kept while it fits, so a body that ended before
    /// its first try failed can be sent again (a unary gRPC call over HTTP/2, streamed
    /// because its length was not known up front).
    pub copy: Option<Arc<std::sync::Mutex<Copy>>>,
}

/// What an [`Upload`] has passed on so far.
#[derive(Default)]
pub struct Copy {
    pub data: bytes::BytesMut,
    pub cap: usize,
    /// The body ended, and every byte of it is in `data`.
    pub whole: bool,
    /// More than `cap`, or trailers: it cannot be sent again.
    pub spoilt: bool,
}

impl Copy {
    fn keep(&mut self, frame: Option<&Frame<Bytes>>) {
        if self.spoilt {
            return;
        }
        match frame.map(Frame::data_ref) {
            None => self.whole = true,
            Some(Some(d)) if self.data.len() + d.len() <= self.cap => {
                self.data.extend_from_slice(d)
            }
            Some(_) => {
                self.spoilt = true;
                self.data = bytes::BytesMut::new();
            }
        }
    }

    /// The whole body, when it can be sent again.
    pub fn replay(&self) -> Option<Bytes> {
        (self.whole && !self.spoilt).then(|| Bytes::copy_from_slice(&self.data))
    }
}

impl Upload {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(b) = self.ahead.take() {
            let frame = Frame::data(b);
            self.keep(Some(&frame));
            return Poll::Ready(Some(Ok(frame)));
        }
        let fault = match std::task::ready!(Pin::new(&mut self.rest).poll_frame(cx)) {
            None => {
                self.keep(None);
                return Poll::Ready(None);
            }
            Some(Err(e)) => ClientFault::Broken(e.to_string()),
            Some(Ok(frame)) => {
                self.seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if self.seen <= self.max {
                    self.keep(Some(&frame));
                    // HTTP/2 senders stop at `is_end_stream` without polling for the end.
                    if self.rest.is_end_stream() {
                        self.keep(None);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                ClientFault::TooLarge(self.max)
            }
        };
        let _ = self.fault.set(fault.clone());
        Poll::Ready(Some(Err(BodyError::Client(fault))))
    }

    fn keep(&self, frame: Option<&Frame<Bytes>>) {
        if let Some(copy) = &self.copy {
            copy.lock().unwrap_or_else(|p| p.into_inner()).keep(frame);
        }
    }
}

/// Most fields a raw response carries; a head with more gets a header map.
pub const RAW_FIELDS: usize = 32;

/// The upstream's response head and where httparse found each field in it, and the body.
pub struct RawResponse {
    pub head: Bytes,
    /// (name start, name end, value start, value end) per field.
    pub spans: [(u16, u16, u16, u16); RAW_FIELDS],
    pub len: usize,
    /// Where the field lines start and end in `head` (CRLFs included) when they can go to
    /// an HTTP/1.1 client as they are: CRLF line ends, no hop-by-hop field, one
    /// `Content-Length` (which then is the held body's length).
    pub verbatim: Option<(u16, u16)>,
    /// The upstream sent a `Date`.
    pub has_date: bool,
    pub body: Option<Bytes>,
}

impl RawResponse {
    /// Each field as (name, value) slices of the head.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans[..self.len].iter().map(|&(ns, ne, vs, ve)| {
            (
                &self.head[ns as usize..ne as usize],
                &self.head[vs as usize..ve as usize],
            )
        })
    }
}

/// Turns a raw response's field lines into its `HeaderMap` (for route edits, hyper's
/// server, HTTP/2 clients). Lines that do not form a valid field are dropped.
pub fn materialize(resp: &mut http::Response<Body>) {
    let Body::Raw(raw) = resp.body_mut() else {
        return;
    };
    let body = raw.body.take();
    let mut map = http::HeaderMap::with_capacity(raw.len + 2);
    for (name, value) in raw.lines() {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_maybe_shared(raw.head.slice_ref(value)),
        ) {
            map.append(n, v);
        }
    }
    *resp.headers_mut() = map;
    *resp.body_mut() = Body::Full(body);
}

/// Why a body could not be read to the end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("upstream body: {0}")]
    Upstream(String),
    #[error("client body: {0:?}")]
    Client(ClientFault),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Full(_) => f.write_str("Body::Full"),
            Body::Stream(_) => f.write_str("Body::Stream"),
            Body::Upstream(_) => f.write_str("Body::Upstream"),
            Body::Raw(_) => f.write_str("Body::Raw"),
            Body::Upload(_) => f.write_str("Body::Upload"),
            Body::Mapped(_) => f.write_str("Body::Mapped"),
        }
    }
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }

    pub fn bytes(b: impl Into<Bytes>) -> Body {
        let b = b.into();
        Body::Full((!b.is_empty()).then_some(b))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::from))),
            Body::Upstream(b) => b
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::Upstream))),
            Body::Raw(r) => Poll::Ready(r.body.take().map(|b| Ok(Frame::data(b)))),
            Body::Upload(u) => u.poll_frame(cx),
            Body::Mapped(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::Stream(b) => b.is_end_stream(),
            Body::Upstream(b) => b.is_end_stream(),
            Body::Raw(r) => r.body.is_none(),
            Body::Upload(u) => u.ahead.is_none() && u.rest.is_end_stream(),
            Body::Mapped(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(b) => b.size_hint(),
            Body::Upstream(b) => b.size_hint(),
            Body::Raw(r) => SizeHint::with_exact(r.body.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upload(u) => {
                let ahead = u.ahead.as_ref().map_or(0, |b| b.len() as u64);
                let rest = u.rest.size_hint();
                match rest.exact() {
                    Some(n) => SizeHint::with_exact(ahead + n),
                    None => {
                        let mut h = SizeHint::new();
                        h.set_lower(ahead + rest.lower());
                        h
                    }
                }
            }
            Body::Mapped(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_fields_become_a_header_map_on_demand() {
        let head = Bytes::from_static(b"X-A: 1\nx-b:two\nSet-Cookie: a=1\nSet-Cookie: b=2\n");
        let mut spans = [(0, 0, 0, 0); RAW_FIELDS];
        spans[..4].copy_from_slice(&[
            (0, 3, 5, 6),
            (7, 10, 11, 14),
            (15, 25, 27, 30),
            (31, 41, 43, 46),
        ]);
        let raw = RawResponse {
            head,
            spans,
            len: 4,
            verbatim: None,
            has_date: false,
            body: Some(Bytes::from_static(b"body")),
        };
        let lines: Vec<_> = raw.lines().collect();
        assert_eq!(lines[0], (&b"X-A"[..], &b"1"[..]));
        assert_eq!(lines[1], (&b"x-b"[..], &b"two"[..]));
        let mut resp = http::Response::new(Body::Raw(Box::new(raw)));
        materialize(&mut resp);
        let h = resp.headers();
        assert_eq!(h["x-a"], "1");
        assert_eq!(h["x-b"], "two");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        assert!(matches!(resp.body(), Body::Full(Some(b)) if b == "body"));
    }
}
