//! One body type for everything the gateway sends and receives: bytes it holds (a small
//! request or response read whole, a buffered request kept for retries, an error page), a
//! streamed hyper body (HTTP/2, or a large upload), or a response streamed off one of our
//! own HTTP/1.1 upstream connections. An enum rather than a boxed trait object keeps the
//! hot path free of allocations.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::h1::client::UpstreamBody;

pub enum Body {
    /// Held in memory; `None` once sent.
    Full(Option<Bytes>),
    Stream(Incoming),
    /// A response read off our own HTTP/1.1 upstream connection, which goes back to its
    /// pool when the body has been read to the end.
    Upstream(Box<UpstreamBody>),
}

/// Why a body could not be read to the end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("upstream body: {0}")]
    Upstream(String),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Full(_) => f.write_str("Body::Full"),
            Body::Stream(_) => f.write_str("Body::Stream"),
            Body::Upstream(_) => f.write_str("Body::Upstream"),
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::Stream(b) => b.is_end_stream(),
            Body::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(b) => b.size_hint(),
            Body::Upstream(b) => b.size_hint(),
        }
    }
}
