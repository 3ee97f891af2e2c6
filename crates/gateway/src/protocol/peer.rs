//! What the gateway knows about a client connection.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;

use crate::floor::net::Cidr;

/// Per-connection facts, computed once at accept instead of on every request.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client IP as a header value, for `X-Forwarded-For`.
    pub ip: HeaderValue,
    /// A trusted proxy: its `X-Forwarded-*` fields are kept (and extended).
    pub trusted: bool,
    /// The certificate a TLS connection was served with; requests must be for its names.
    /// Private: `set_tls` keeps `forwarded` in step with it.
    tls: Option<Arc<crate::protocol::tls::Cert>>,
    /// `X-Forwarded-For` and `X-Forwarded-Proto` lines as this connection's requests
    /// send them unless they carry their own: written in one piece.
    forwarded: Bytes,
}

impl Peer {
    pub fn new(addr: SocketAddr, trusted: &[Cidr]) -> Peer {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        let trusted = trusted.iter().any(|c| c.contains(addr.ip()));
        let forwarded = forwarded_lines(&ip, "http");
        Peer {
            addr,
            ip,
            trusted,
            tls: None,
            forwarded,
        }
    }

    /// Marks the connection as TLS, served with `cert`.
    pub fn set_tls(&mut self, cert: Arc<crate::protocol::tls::Cert>) {
        self.tls = Some(cert);
        self.forwarded = forwarded_lines(&self.ip, self.proto());
    }

    /// The certificate a TLS connection was served with.
    pub fn tls(&self) -> Option<&Arc<crate::protocol::tls::Cert>> {
        self.tls.as_ref()
    }

    /// This connection's `X-Forwarded-For` and `X-Forwarded-Proto` lines.
    pub fn forwarded(&self) -> &Bytes {
        &self.forwarded
    }

    /// The scheme the client used, for `X-Forwarded-Proto`.
    pub(crate) fn proto(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

fn forwarded_lines(ip: &HeaderValue, proto: &str) -> Bytes {
    let mut w = Vec::with_capacity(64);
    w.extend_from_slice(b"x-forwarded-for: ");
    w.extend_from_slice(ip.as_bytes());
    w.extend_from_slice(b"\r\nx-forwarded-proto: ");
    w.extend_from_slice(proto.as_bytes());
    w.extend_from_slice(b"\r\n");
    Bytes::from(w)
}
