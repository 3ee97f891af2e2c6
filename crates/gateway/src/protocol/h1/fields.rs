//! A request's header fields as the client wrote them, for requests that need nothing
//! from the fields but to pass them on: no header map is built, edited, written out and
//! dropped per request (13.8k → 13.1k instructions per proxied request with one field,
//! `bench/instructions.sh`; more fields save more). The fast-path parser decides which requests qualify
//! ([`Plain`]), the proxy which routes do (`Route::plain`); everything else gets a map
//! from [`RawFields::to_map`] and the general path.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::protocol::h1::client::FieldRanges;

/// What the parser found about a head's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plain {
    /// Every field goes upstream as written, in one copy of the field lines.
    Verbatim,
    /// Some fields are dropped on the way ([`dropped`]); the rest go as written.
    Filtered,
    /// A field needs the general path: forwarding fields (whose trust is decided there),
    /// `TE`, or a `Connection` that names other fields to drop.
    No,
}

impl Plain {
    /// Folds one field in: `name` as written, `value` its value.
    pub fn with(self, name: &[u8], value: &[u8]) -> Plain {
        if self == Plain::No {
            return self;
        }
        if dropped(name) {
            // `Connection: close` / `keep-alive` name no field; anything else does.
            if name.len() == 10
                && name.eq_ignore_ascii_case(b"connection")
                && value.split(|&b| b == b',').any(|t| {
                    let t = t.trim_ascii();
                    !t.is_empty()
                        && !t.eq_ignore_ascii_case(b"close")
                        && !t.eq_ignore_ascii_case(b"keep-alive")
                })
            {
                return Plain::No;
            }
            return Plain::Filtered;
        }
        let forwarding = (name.len() > 12 && name[..12].eq_ignore_ascii_case(b"x-forwarded-"))
            || (name.len() == 9 && name.eq_ignore_ascii_case(b"forwarded"))
            || (name.len() == 2 && name.eq_ignore_ascii_case(b"te"));
        if forwarding { Plain::No } else { self }
    }
}

/// Fields the raw path drops: hop-by-hop ones (the fast path never sees `Upgrade` or
/// `Transfer-Encoding`) and the length, which the writer sets from the body it sends.
pub fn dropped(name: &[u8]) -> bool {
    crate::floor::net::is_hop_by_hop_raw(name)
        || (name.len() == 14 && name.eq_ignore_ascii_case(b"content-length"))
}

/// The fields of a request head that `Plain` accepted.
#[derive(Clone, Copy)]
pub struct RawFields<'a> {
    pub head: &'a Bytes,
    pub ranges: &'a FieldRanges,
    pub verbatim: bool,
}

impl<'a> RawFields<'a> {
    /// Each field as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + use<'a> {
        let head: &'a [u8] = self.head;
        self.ranges
            .iter()
            .map(move |(n, v)| (&head[n.clone()], &head[v.clone()]))
    }

    /// The first value of the field `name` (lowercase).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The fields as a header map sharing the head's bytes. The parser accepted every
    /// name and value already, with the same rules, so none is left out in practice.
    pub fn to_map(self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.ranges.len() + 2);
        for (n, v) in self.ranges {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&self.head[n.clone()]),
                HeaderValue::from_maybe_shared(self.head.slice(v.clone())),
            ) {
                map.append(name, value);
            }
        }
        map
    }

    /// Appends the field lines that go upstream to `w`. Says whether the client sent a
    /// `Content-Length` (dropped here: the writer sets it from the body it sends).
    pub fn write(&self, w: &mut Vec<u8>) -> bool {
        let (Some(first), Some(last)) = (self.ranges.first(), self.ranges.last()) else {
            return false;
        };
        // From the first name through the CRLF after the last value (the parser checked
        // that every line ends in CRLF).
        if self.verbatim
            && let Some(end) = crate::protocol::h1::crlf_after(self.head, last.1.end)
        {
            w.extend_from_slice(&self.head[first.0.start..end]);
            return false;
        }
        let mut had_length = false;
        for (name, value) in self.iter() {
            if dropped(name) {
                had_length |= name.eq_ignore_ascii_case(b"content-length");
                continue;
            }
            w.extend_from_slice(name);
            w.extend_from_slice(b": ");
            w.extend_from_slice(value);
            w.extend_from_slice(b"\r\n");
        }
        had_length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(fields: &[(&str, &str)]) -> Plain {
        fields.iter().fold(Plain::Verbatim, |p, (n, v)| {
            p.with(n.as_bytes(), v.as_bytes())
        })
    }

    #[test]
    fn plain_requests_are_told_apart() {
        assert_eq!(plain(&[("Host", "a"), ("Accept", "*/*")]), Plain::Verbatim);
        assert_eq!(plain(&[]), Plain::Verbatim);
        assert_eq!(
            plain(&[("Host", "a"), ("Connection", "Keep-Alive")]),
            Plain::Filtered
        );
        assert_eq!(plain(&[("content-length", "5")]), Plain::Filtered);
        assert_eq!(plain(&[("Proxy-Connection", "x")]), Plain::Filtered);
        for no in [
            [("Connection", "keep-alive, x-secret")],
            [("X-Forwarded-For", "1.2.3.4")],
            [("forwarded", "for=1.2.3.4")],
            [("TE", "trailers")],
        ] {
            assert_eq!(plain(&no), Plain::No, "{no:?}");
        }
        // Once general, always general.
        assert_eq!(
            plain(&[("te", "x"), ("connection", "close"), ("host", "a")]),
            Plain::No
        );
        // Names that only start like a dropped one pass.
        assert_eq!(
            plain(&[("x-forwarded", "1"), ("connections", "2"), ("tea", "3")]),
            Plain::Verbatim
        );
    }

    fn raw_of(head: &'static [u8]) -> (Bytes, FieldRanges) {
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut fields);
        req.parse(head).unwrap();
        let base = head.as_ptr() as usize;
        let ranges = req
            .headers
            .iter()
            .map(|f| {
                let n = f.name.as_ptr() as usize - base;
                let v = f.value.as_ptr() as usize - base;
                (n..n + f.name.len(), v..v + f.value.len())
            })
            .collect();
        (Bytes::from_static(head), ranges)
    }

    #[test]
    fn fields_are_written_as_the_client_sent_them() {
        let (head, ranges) = raw_of(b"GET / HTTP/1.1\r\nHost: a:1\r\nX-Y:  z \r\n\r\n");
        let raw = RawFields {
            head: &head,
            ranges: &ranges,
            verbatim: true,
        };
        let mut w = Vec::new();
        assert!(!raw.write(&mut w));
        assert_eq!(w, b"Host: a:1\r\nX-Y:  z \r\n");
        assert_eq!(raw.get("host"), Some(&b"a:1"[..]));
        assert_eq!(raw.get("x-y"), Some(&b"z"[..]));
        assert_eq!(raw.get("accept"), None);
        let map = raw.to_map();
        assert_eq!(map["x-y"], "z");
        assert_eq!(map.len(), 2);

        let (head, ranges) = raw_of(
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 2\r\nKeep-Alive: 5\r\nA: b\r\n\r\n",
        );
        let raw = RawFields {
            head: &head,
            ranges: &ranges,
            verbatim: false,
        };
        let mut w = Vec::new();
        assert!(raw.write(&mut w), "the client sent a length");
        assert_eq!(w, b"Host: a\r\nA: b\r\n");

        let (head, ranges) = raw_of(b"GET / HTTP/1.1\r\n\r\n");
        let mut w = Vec::new();
        RawFields {
            head: &head,
            ranges: &ranges,
            verbatim: true,
        }
        .write(&mut w);
        assert!(w.is_empty());
    }
}
