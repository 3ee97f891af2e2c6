//! One body type for everything the gateway sends and receives: a streamed hyper body, or
//! bytes it holds (a buffered request kept for retries, an error page). An enum rather
//! than a boxed trait object keeps the hot path free of allocations.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::pool::Conns;

pub enum Body {
    Stream(Incoming),
    Full(Full<Bytes>),
    /// An upstream response whose HTTP/1.1 connection goes back to its pool when the body
    /// has been read to the end.
    Pooled(Incoming, Option<(SendRequest<Body>, Arc<Conns>)>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Stream(_) => f.write_str("Body::Stream"),
            Body::Full(_) => f.write_str("Body::Full"),
            Body::Pooled(..) => f.write_str("Body::Pooled"),
        }
    }
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(Full::new(Bytes::new()))
    }

    pub fn bytes(b: impl Into<Bytes>) -> Body {
        Body::Full(Full::new(b.into()))
    }

    /// Wraps an upstream body; an already finished one returns its connection at once.
    pub fn pooled(body: Incoming, sender: SendRequest<Body>, home: Arc<Conns>) -> Body {
        if body.is_end_stream() {
            home.checkin(sender);
            return Body::Stream(body);
        }
        Body::Pooled(body, Some((sender, home)))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Stream(b) => Pin::new(b).poll_frame(cx),
            Body::Pooled(b, home) => {
                let r = Pin::new(&mut *b).poll_frame(cx);
                // Done: at the end of the stream, or after the last frame of a body whose
                // length was known (the server may never poll again for the end).
                let done = match &r {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => b.is_end_stream(),
                    _ => false,
                };
                if done && let Some((sender, conns)) = home.take() {
                    conns.checkin(sender);
                }
                r
            }
            Body::Full(b) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Stream(b) | Body::Pooled(b, _) => b.is_end_stream(),
            Body::Full(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream(b) | Body::Pooled(b, _) => b.size_hint(),
            Body::Full(b) => b.size_hint(),
        }
    }
}
