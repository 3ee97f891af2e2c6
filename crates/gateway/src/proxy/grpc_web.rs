//! gRPC-Web (grpc/doc/PROTOCOL-WEB.md), translated the way Envoy's grpc_web filter does:
//! a browser's call (`application/grpc-web`, or base64 text `application/grpc-web-text`)
//! goes upstream as gRPC over HTTP/2, and the answer comes back with its trailers as the
//! body's last frame (flag 0x80), which a browser can read where it cannot read
//! trailers; base64 again for text.

use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame};

use crate::protocol::h1::body::{Body, BodyError, ClientFault, materialize};

/// A translated call, and in which encoding its caller wants the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Web {
    /// `application/grpc-web-text`: bodies are base64.
    pub text: bool,
}

impl Web {
    /// The call's kind, when its `content-type` is gRPC-Web's.
    pub fn of(headers: &HeaderMap) -> Option<Web> {
        let ct = headers.get(header::CONTENT_TYPE)?.as_bytes();
        let rest = ct.strip_prefix(b"application/grpc-web")?;
        Some(Web {
            text: rest.starts_with(b"-text"),
        })
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(if self.text {
            "application/grpc-web-text+proto"
        } else {
            "application/grpc-web+proto"
        })
    }

    /// Makes `req` a gRPC call. A text body held whole is decoded at once (a malformed
    /// one is the caller's 400); a streamed one as it comes.
    pub fn to_grpc(self, req: &mut Request<Body>) -> Result<(), String> {
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.remove(header::CONTENT_LENGTH);
        if self.text {
            let body = std::mem::replace(req.body_mut(), Body::empty());
            *req.body_mut() = match body {
                Body::Full(b) => {
                    let mut d = Decoder::default();
                    let mut out = d.push(&b.unwrap_or_default())?;
                    d.finish()?;
                    Body::bytes(std::mem::take(&mut out))
                }
                other => Body::Mapped(
                    DecodeText {
                        inner: other,
                        decoder: Decoder::default(),
                    }
                    .boxed(),
                ),
            };
        }
        Ok(())
    }

    /// Makes the upstream's gRPC answer (or the gateway's own trailers-only status) a
    /// gRPC-Web one.
    pub fn answer(self, mut resp: Response<Body>) -> Response<Body> {
        materialize(&mut resp);
        let h = resp.headers_mut();
        let grpc = h
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| tessera_core::grpc::is_grpc(v.as_bytes()));
        if !grpc {
            // Not a gRPC answer (an HTTP error page): the client maps its status.
            return resp;
        }
        h.insert(header::CONTENT_TYPE, self.content_type());
        h.remove(header::CONTENT_LENGTH);
        // Trailers-only: the status is in the head already, and there is no body.
        if h.contains_key("grpc-status") {
            return resp;
        }
        let body = std::mem::replace(resp.body_mut(), Body::empty());
        *resp.body_mut() = Body::Mapped(
            TrailersInBody {
                inner: body,
                text: self.text,
                rest: BytesMut::new(),
                done: false,
            }
            .boxed(),
        );
        resp
    }
}

/// Base64 text to bytes, four characters at a time; a group may end in padding
/// mid-stream (each message encoded on its own).
#[derive(Default)]
struct Decoder {
    pending: BytesMut,
}

impl Decoder {
    fn push(&mut self, text: &[u8]) -> Result<BytesMut, String> {
        self.pending
            .extend(text.iter().copied().filter(|b| !b.is_ascii_whitespace()));
        let whole = self.pending.len() / 4 * 4;
        let groups = self.pending.split_to(whole);
        let mut out = BytesMut::with_capacity(whole / 4 * 3);
        for group in groups.chunks(4) {
            let mut buf = [0u8; 3];
            let n = STANDARD
                .decode_slice(group, &mut buf)
                .map_err(|e| format!("a grpc-web-text body that is not base64: {e}"))?;
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }

    fn finish(&self) -> Result<(), String> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err("a grpc-web-text body cut short (its base64 does not end a group)".into())
        }
    }
}

struct DecodeText {
    inner: Body,
    decoder: Decoder,
}

impl HttpBody for DecodeText {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let bad = |why: String| BodyError::Client(ClientFault::Broken(why));
        loop {
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(text) => {
                        let out = this.decoder.push(&text).map_err(bad)?;
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                        }
                    }
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.decoder.finish().map_err(bad)?;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The upstream's messages as they come, then its trailers as a frame of their own
/// (flag 0x80, `name: value\r\n` lines). For text, everything in base64, carried over in
/// groups of three bytes so no padding falls mid-stream.
struct TrailersInBody {
    inner: Body,
    text: bool,
    /// Bytes not yet encoded (text only): fewer than three.
    rest: BytesMut,
    done: bool,
}

impl TrailersInBody {
    fn encode(&mut self, data: &[u8], last: bool) -> Bytes {
        if !self.text {
            return Bytes::copy_from_slice(data);
        }
        self.rest.extend_from_slice(data);
        let n = if last {
            self.rest.len()
        } else {
            self.rest.len() / 3 * 3
        };
        let chunk = self.rest.split_to(n);
        Bytes::from(STANDARD.encode(&chunk))
    }
}

/// gRPC-Web's trailer frame.
fn trailer_frame(trailers: &HeaderMap) -> Vec<u8> {
    let mut block = Vec::new();
    for (k, v) in trailers {
        block.extend_from_slice(k.as_str().as_bytes());
        block.extend_from_slice(b": ");
        block.extend_from_slice(v.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut frame = Vec::with_capacity(block.len() + 5);
    frame.push(0x80);
    frame.extend_from_slice(&(block.len() as u32).to_be_bytes());
    frame.extend_from_slice(&block);
    frame
}

impl HttpBody for TrailersInBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let out = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.encode(&data, false),
                    Err(frame) => {
                        this.done = true;
                        let trailers = frame.into_trailers().unwrap_or_default();
                        this.encode(&trailer_frame(&trailers), true)
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                // Ended without a status: what was held goes out, and the client finds
                // the status missing.
                None => {
                    this.done = true;
                    this.encode(&[], true)
                }
            };
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(body: Body) -> Bytes {
        body.collect().await.unwrap().to_bytes()
    }

    /// An upstream's gRPC answer: `messages`, then `grpc-status` in the trailers.
    fn upstream(messages: &[&[u8]], status: &'static str) -> Response<Body> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static(status));
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = messages
            .iter()
            .map(|m| Ok(Frame::data(Bytes::copy_from_slice(m))))
            .chain([Ok(Frame::trailers(trailers))])
            .collect();
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        let mut resp = Response::new(Body::Mapped(body.boxed()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        resp
    }

    const TRAILER: &[u8] = b"\x80\0\0\0\x10grpc-status: 0\r\n";

    #[tokio::test]
    async fn trailers_become_the_last_frame() {
        let resp = Web { text: false }.answer(upstream(&[b"\0\0\0\0\x01a", b"\0\0\0\0\x01b"], "0"));
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/grpc-web+proto"
        );
        let body = read(resp.into_body()).await;
        let mut want = b"\0\0\0\0\x01a\0\0\0\0\x01b".to_vec();
        want.extend_from_slice(TRAILER);
        assert_eq!(&body[..], &want[..]);
    }

    #[tokio::test]
    async fn text_answers_are_base64_with_padding_only_at_the_end() {
        // Chunks of 1, 2 and 4 bytes: no boundary falls on a multiple of three.
        let resp = Web { text: true }.answer(upstream(&[b"\0", b"\0\0", b"\0\x01z"], "0"));
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/grpc-web-text+proto"
        );
        let body = read(resp.into_body()).await;
        assert!(!body[..body.len() - 2].contains(&b'='), "{body:?}");
        let plain = STANDARD.decode(&body).unwrap();
        let mut want = b"\0\0\0\0\x01z".to_vec();
        want.extend_from_slice(TRAILER);
        assert_eq!(plain, want);
    }

    #[tokio::test]
    async fn a_trailers_only_answer_keeps_its_status_in_the_head() {
        let mut resp = Response::new(Body::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static("14"));
        let resp = Web { text: true }.answer(resp);
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert!(read(resp.into_body()).await.is_empty());
    }

    #[tokio::test]
    async fn text_requests_decode_whole_or_streamed_and_refuse_bad_base64() {
        let frame = b"\0\0\0\0\x02hi";
        let text = STANDARD.encode(frame);
        let web = Web { text: true };
        let mut req = Request::new(Body::bytes(text.clone()));
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web-text"),
        );
        assert_eq!(Web::of(req.headers()), Some(web));
        web.to_grpc(&mut req).unwrap();
        assert_eq!(req.headers()[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(req.headers()[header::TE], "trailers");
        assert_eq!(
            &read(std::mem::replace(req.body_mut(), Body::empty())).await[..],
            frame
        );

        // Streamed in pieces that split base64 groups, two messages each padded.
        let two = format!(
            "{}{}",
            STANDARD.encode(b"\0\0\0\0\x01a"),
            STANDARD.encode(b"\0\0\0\0\x01b")
        );
        let pieces: Vec<Result<Frame<Bytes>, BodyError>> = two
            .as_bytes()
            .chunks(5)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let mut req = Request::new(Body::Mapped(
            http_body_util::StreamBody::new(tokio_stream::iter(pieces)).boxed(),
        ));
        web.to_grpc(&mut req).unwrap();
        let body = read(std::mem::replace(req.body_mut(), Body::empty())).await;
        assert_eq!(&body[..], b"\0\0\0\0\x01a\0\0\0\0\x01b");

        let mut req = Request::new(Body::bytes("not base64!"));
        assert!(web.to_grpc(&mut req).is_err());
    }
}
