//! The HTTP/1.1 fast path: our own codec for the common proxy exchange on both sides,
//! with hyper kept for everything else (HTTP/2, upgrades on the client side, unusual or
//! malformed requests). See `server` and `client` for where the line is drawn.

pub mod client;
pub mod date;
pub mod fields;
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

/// A `Host` field value RFC 9110 section 7.2 and RFC 3986 section 3.2.2 allow: a host
/// (a registered name, IPv4, or a bracketed IPv6 or future literal) and an optional
/// port of digits; empty for a target without an authority. No spaces, `@`, `/`, `?`,
/// `#` or `\\`: a value another hop could read as something else is refused.
pub(crate) fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(end) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = &v[1..end];
        if inside.is_empty()
            || !inside.iter().all(|&b| {
                b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'-' | b'_' | b'~' | b'%')
            })
        {
            return false;
        }
        (&v[..0], &v[end + 1..])
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &v[v.len()..]),
        }
    };
    let port_ok = port.is_empty()
        || (port[0] == b':' && port.len() <= 6 && port[1..].iter().all(u8::is_ascii_digit));
    port_ok && host.iter().all(|&b| HOST_CHARS[usize::from(b)])
}

/// The bytes of a registered name (RFC 3986: unreserved, sub-delims, `%`), one lookup
/// per byte: this runs on every request.
const HOST_CHARS: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    t
};

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
        (Some(v), None) if !valid_host(v.as_bytes()) => return Err("an invalid Host field value"),
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
