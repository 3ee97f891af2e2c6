//! What a request received over HTTP/2 must satisfy before it may become an HTTP/1.1
//! request upstream (RFC 9113 section 8). hyper's h2 already resets the stream for
//! connection-specific fields, `te` other than `trailers`, names that are not lowercase
//! tokens, values with CR, LF or NUL, pseudo-headers that are repeated, unknown, late or
//! a response's, and a body that disagrees with `content-length`. The rest is here, so
//! that every request the proxy sees is one an HTTP/1.1 server reads the same way.

use http::header::{COOKIE, HOST};
use http::{HeaderValue, Method, Request};

/// Refuses what h2 lets through and RFC 9113 does not (400, nothing forwarded), and joins
/// `cookie` crumbs into one field, which section 8.2.3 requires before a request leaves
/// HTTP/2.
pub(crate) fn check_request<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    if req.method() == Method::CONNECT {
        return Err("CONNECT is not proxied");
    }
    // h2 builds a request without `:path` when `:authority` is absent too; its URI's
    // path is then empty (where `path_and_query` would say "/").
    let path = req.uri().path();
    if !path.starts_with('/') && path != "*" {
        return Err(":path is missing or not an absolute path");
    }
    match req.uri().authority() {
        Some(a) => {
            // `valid_host` also refuses userinfo (section 8.3.1 forbids it).
            if !crate::floor::net::valid_host(a.as_str().as_bytes()) {
                return Err("an invalid :authority");
            }
            // Section 8.3.1: a Host naming another target than `:authority` is malformed;
            // hops that read one or the other would route it differently.
            if let Some(host) = req.headers().get(HOST)
                && !host.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
            {
                return Err("Host differs from :authority");
            }
        }
        None if !req.headers().contains_key(HOST) => {
            return Err("an HTTP/2 request needs :authority or Host");
        }
        None => {}
    }
    // Section 8.2.1: no leading or trailing blanks in a value (HTTP/1.1 parsers strip
    // them, so the upstream would see another value than the one checked here).
    let blank = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    if req
        .headers()
        .values()
        .any(|v| blank(v.as_bytes().first()) || blank(v.as_bytes().last()))
    {
        return Err("a field value starts or ends with whitespace");
    }
    let h = req.headers_mut();
    let mut cookies = h.get_all(COOKIE).iter();
    if let (Some(_), Some(_)) = (cookies.next(), cookies.next()) {
        let joined = h
            .get_all(COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect::<Vec<_>>()
            .join(&b"; "[..]);
        let joined = HeaderValue::from_bytes(&joined).map_err(|_| "an invalid cookie")?;
        h.insert(COOKIE, joined);
    }
    Ok(())
}
