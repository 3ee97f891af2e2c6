//! One body type for everything the gateway sends and receives: a streamed hyper body, or
//! bytes it holds (a buffered request kept for retries, an error page). An enum rather
//! than a boxed trait object keeps the hot path free of allocations.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

#[derive(Debug)]
pub enum Body {
    Stream(Incoming),
    Full(Full<Bytes>),
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(Full::new(Bytes::new()))
    }

    pub fn bytes(b: impl Into<Bytes>) -> Body {
        Body::Full(Full::new(b.into()))
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
            Body::Stream(b) => b.is_end_stream(),
            Body::Full(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream(b) => b.size_hint(),
            Body::Full(b) => b.size_hint(),
        }
    }
}
