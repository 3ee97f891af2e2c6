//! Small address and header-name helpers shared by every layer.

use http::header::{self, HeaderName};

/// The fields that describe one connection, not the message: never forwarded.
pub(crate) static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `k` is one of `HOP_BY_HOP`, deciding on the name's length first: most names
/// are ruled out by one comparison instead of seven.
pub(crate) fn is_hop_by_hop(k: &HeaderName) -> bool {
    matches!(k.as_str().len(), 7 | 10 | 16 | 17 | 18) && HOP_BY_HOP.contains(k)
}

/// `is_hop_by_hop` for a name as an upstream wrote it (any case), in a raw response head.
pub(crate) fn is_hop_by_hop_raw(name: &[u8]) -> bool {
    matches!(name.len(), 7 | 10 | 16 | 17 | 18)
        && HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
}

/// `[v6]` → `v6`; anything else as it is.
pub(crate) fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// `host:port` → `host`; `[v6]:port` keeps its brackets; a bare v6 address has no port.
pub(crate) fn strip_port(raw: &str) -> &str {
    match raw.rsplit_once(':') {
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && (h.ends_with(']') || !h.contains(':')) =>
        {
            h
        }
        _ => raw,
    }
}

/// An address block (`10.0.0.0/8`, `::1/128`; a bare address is a block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: u128,
    mask: u128,
    v4: bool,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR block"))?;
        let (bits, v4, max) = match ip {
            std::net::IpAddr::V4(a) => (u128::from(u32::from(a)), true, 32),
            std::net::IpAddr::V6(a) => (u128::from(a), false, 128),
        };
        let len: u32 = match len {
            Some(l) => l
                .trim()
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length 0 to {max}"))?,
            None => max,
        };
        let mask = if len == 0 {
            0
        } else {
            (!0u128 >> (128 - max)) & !((1u128 << (max - len)) - 1)
        };
        Ok(Cidr {
            net: bits & mask,
            mask,
            v4,
        })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(a) => a
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(a), std::net::IpAddr::V4),
            v4 => v4,
        };
        match ip {
            std::net::IpAddr::V4(a) if self.v4 => u128::from(u32::from(a)) & self.mask == self.net,
            std::net::IpAddr::V6(a) if !self.v4 => u128::from(a) & self.mask == self.net,
            _ => false,
        }
    }
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
