//! The HTTP/1.1 fast path: our own codec for the common proxy exchange on both sides,
//! with hyper kept for everything else (HTTP/2, upgrades on the client side, unusual or
//! malformed requests). See `server` and `client` for where the line is drawn. The body
//! and connection-pool types live here too, although hyper's HTTP/2 uses them as well:
//! they hold this codec's connections and response bodies, and it uses them in turn.

pub mod body;
pub mod client;
pub mod date;
pub mod fields;
pub mod pool;
pub mod server;
pub use server::{MAX_HEAD, MAX_HEADERS};

/// Where the line whose content ends at `i` in `head` ends, if it ends in CRLF (blanks
/// may come before it): just past the LF. Parsers disagree on bare LF, so the gateway
/// checks line ends itself wherever it trusts or copies a head's lines.
pub(crate) fn crlf_after(head: &[u8], mut i: usize) -> Option<usize> {
    while head.get(i).is_some_and(|b| *b == b' ' || *b == b'\t') {
        i += 1;
    }
    (head.get(i..i + 2) == Some(b"\r\n")).then_some(i + 2)
}

/// What RFC 9112 and RFC 9110 require of a received request's framing and `Host`, for
/// requests parsed by hyper (the fast path checks the same in `server::parse`): an
/// HTTP/1.1 request has exactly one valid `Host`; `Transfer-Encoding` is one `chunked`
/// and only in HTTP/1.1; `*` is only for `OPTIONS`.
pub(crate) fn check_request<B>(req: &http::Request<B>) -> Result<(), &'static str> {
    use http::header::{HOST, TRANSFER_ENCODING};
    let h = req.headers();
    let mut hosts = h.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == http::Version::HTTP_11 => {
            return Err("an HTTP/1.1 request needs a Host field");
        }
        (Some(_), Some(_)) => return Err("more than one Host field"),
        (Some(v), None) if !crate::floor::net::valid_host(v.as_bytes()) => {
            return Err("an invalid Host field value");
        }
        _ => {}
    }
    let mut codings = h.get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        if req.version() != http::Version::HTTP_11 {
            return Err("Transfer-Encoding in an HTTP/1.0 request");
        }
        if codings.next().is_some()
            || !first
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        {
            return Err("a transfer coding other than one chunked");
        }
    }
    if req.uri().path() == "*" && req.method() != http::Method::OPTIONS {
        return Err("the asterisk target is only for OPTIONS");
    }
    Ok(())
}
