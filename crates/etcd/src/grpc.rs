//! gRPC's wire format over hyper's HTTP/2 client: each message is a 5-byte prefix (a
//! compression flag, then the length) and the protobuf bytes; the outcome is the
//! `grpc-status` trailer (or header, for an answer with no body). That is all etcd's
//! clients need, so no gRPC framework is pulled in for it.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::mpsc;

use crate::Error;

/// A request body: one message, or a stream of them that ends when its sender is
/// dropped (a watch).
pub(crate) enum Body {
    Once(Option<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Once(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Once(None))
    }
}

/// `m` as one length-prefixed, uncompressed message.
pub(crate) fn frame(m: &impl Message) -> Bytes {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer has room for the whole message.
    let _ = m.encode(&mut buf);
    buf.freeze()
}

/// A POST of `body` to the gRPC method at `path` (`/package.Service/Method`).
/// `needs_leader`: etcd refuses the call at once, instead of queueing it, when its member
/// has no leader, and ends a watch when its member loses the leader, so the caller moves
/// to a member that is part of the cluster. Everything but a member's status needs one.
pub(crate) fn request(
    url: &str,
    path: &str,
    body: Body,
    needs_leader: bool,
) -> Result<http::Request<Body>, Error> {
    let mut req = http::Request::post(format!("{url}{path}"))
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if needs_leader {
        req = req.header("hasleader", "true");
    }
    req.body(body)
        .map_err(|e| Error::Endpoint(format!("{url}: {e}")))
}

/// The error a `grpc-status` (and `grpc-message`) in `headers` reports, if any:
/// `Some(Ok(()))` for status 0.
pub(crate) fn status(headers: &HeaderMap) -> Option<Result<(), Error>> {
    let code = headers.get("grpc-status")?;
    let code: i32 = code.to_str().ok().and_then(|c| c.parse().ok()).unwrap_or(2);
    if code == 0 {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| tessera_core::grpc::decode_message(m.as_bytes()))
        .unwrap_or_default();
    Some(Err(Error::Status { code, message }))
}

/// Splits whole messages off the front of `buf`.
pub(crate) fn next_message<M: Message + Default>(buf: &mut BytesMut) -> Option<Result<M, Error>> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    if buf[0] != 0 {
        return Some(Err(Error::Decode("a compressed message".into())));
    }
    buf.advance(5);
    let body = buf.split_to(len);
    Some(M::decode(body.freeze()).map_err(|e| Error::Decode(e.to_string())))
}

/// A unary call's answer: the one message, after the status says it succeeded.
pub(crate) async fn unary_answer<M: Message + Default>(
    url: &str,
    resp: http::Response<hyper::body::Incoming>,
) -> Result<M, Error> {
    let (parts, body) = resp.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(Error::Unknown(format!(
            "{url}: HTTP {} instead of a gRPC answer",
            parts.status
        )));
    }
    // Trailers-only: an error with no body.
    if let Some(Err(e)) = status(&parts.headers) {
        return Err(e);
    }
    let all = body
        .collect()
        .await
        .map_err(|e| Error::Unknown(format!("{url}: {e}")))?;
    match all.trailers().and_then(status) {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(e),
        None => {
            return Err(Error::Unknown(format!(
                "{url}: the answer ended without a gRPC status"
            )));
        }
    }
    let mut buf = BytesMut::from(all.to_bytes());
    match next_message(&mut buf) {
        Some(m) => m,
        None => Err(Error::Decode(format!("{url}: no message in the answer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_frames() {
        let m = crate::PutRequest {
            key: b"k".to_vec(),
            value: vec![7; 300],
            ..Default::default()
        };
        let mut buf = BytesMut::from(&frame(&m)[..]);
        buf.extend_from_slice(&frame(&m)[..10]);
        let got: crate::PutRequest = next_message(&mut buf).unwrap().unwrap();
        assert_eq!(got, m);
        assert!(
            next_message::<crate::PutRequest>(&mut buf).is_none(),
            "half a frame"
        );
        assert_eq!(buf.len(), 10);
    }

    #[test]
    fn statuses_read_code_and_decoded_message() {
        let mut h = HeaderMap::new();
        assert!(status(&h).is_none());
        h.insert("grpc-status", "14".parse().unwrap());
        h.insert("grpc-message", "etcdserver:%20no%20leader".parse().unwrap());
        match status(&h) {
            Some(Err(Error::Status { code, message })) => {
                assert_eq!((code, message.as_str()), (14, "etcdserver: no leader"));
            }
            other => panic!("{other:?}"),
        }
        h.insert("grpc-status", "0".parse().unwrap());
        assert!(matches!(status(&h), Some(Ok(()))));
    }
}
