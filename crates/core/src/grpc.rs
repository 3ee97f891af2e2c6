//! The parts of gRPC over HTTP/2 that the gateway, the SDK and the web edge all read the
//! same way (grpc/doc/PROTOCOL-HTTP2.md, grpc/doc/statuscodes.md,
//! grpc/doc/http-grpc-status-mapping.md): status codes, `grpc-timeout`, `grpc-message`.

use std::time::Duration;

/// A gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code a `grpc-status` value names; a number outside the table is UNKNOWN, as
    /// the spec asks of clients.
    pub fn parse(value: &[u8]) -> Option<Code> {
        let n: u16 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
        Some(Code::from_number(n))
    }

    /// The code numbered `n`; UNKNOWN outside the table.
    pub fn from_number(n: u16) -> Code {
        Code::ALL
            .get(usize::from(n))
            .copied()
            .unwrap_or(Code::Unknown)
    }

    /// The name in the spec's spelling (`UNAVAILABLE`), for configuration and messages.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The code named `UNAVAILABLE` (or `unavailable`), as retry policies list them.
    pub fn from_name(name: &str) -> Option<Code> {
        Code::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(name))
    }

    /// A status that says the callee failed rather than refused the call: what outlier
    /// ejection and breakers count, as they count a 5xx.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Code::Unavailable
                | Code::Internal
                | Code::Unknown
                | Code::DataLoss
                | Code::DeadlineExceeded
        )
    }

    /// The HTTP status with the same meaning (google.rpc.Code's table), so metrics can
    /// count gRPC calls in the same status classes as HTTP requests.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Ok => 200,
            Code::Cancelled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// What a gRPC client makes of an HTTP answer that is not a 200 (a proxy's error
    /// page): the spec's mapping.
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a `content-type` is gRPC's (`application/grpc`, `application/grpc+proto`,
/// and gRPC-Web's `application/grpc-web…`).
pub fn is_grpc(content_type: &[u8]) -> bool {
    content_type.starts_with(b"application/grpc")
}

/// `grpc-message` is percent-encoded: everything outside printable ASCII, and `%`.
pub fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        match b {
            b' '..=b'~' if b != b'%' => out.push(char::from(b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A `grpc-message` as the text it carries (percent-decoded UTF-8; a `%` not followed by
/// two hex digits stays as it is).
pub fn decode_message(value: &[u8]) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        match (
            value[i],
            value.get(i + 1).and_then(|&b| hex(b)),
            value.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The finest unit whose value fits the 8 digits the spec allows, rounded up so the
/// callee never sees a shorter deadline than the caller has.
pub fn format_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    for (unit, per) in [
        ("u", 1_000u128),
        ("m", 1_000_000),
        ("S", 1_000_000_000),
        ("M", 60_000_000_000),
    ] {
        let n = nanos.div_ceil(per);
        if n <= MAX {
            return format!("{n}{unit}");
        }
    }
    format!("{}H", nanos.div_ceil(3_600_000_000_000).min(MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_read_every_unit_and_refuse_malformed_values() {
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(b"7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            &b""[..],
            b"S",
            b"10",
            b"10s",
            b"123456789m",
            b"-1S",
            b"1.5S",
        ] {
            assert_eq!(
                parse_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn formatted_timeouts_fit_eight_digits_and_never_shrink() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_micros(1500),
            Duration::from_millis(250),
            Duration::from_secs(15),
            Duration::from_secs(3 * 3600),
            Duration::from_secs(200 * 86_400),
            Duration::MAX,
        ] {
            let s = format_timeout(d);
            assert!(s.len() <= 9, "{s}");
            let back = parse_timeout(s.as_bytes()).expect(&s);
            assert!(
                back >= d.min(Duration::from_secs(99_999_999 * 3600)),
                "{d:?} -> {s}"
            );
        }
        assert_eq!(format_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(format_timeout(Duration::from_secs(1000)), "1000000m");
    }

    #[test]
    fn codes_round_trip_and_map_to_http() {
        for c in Code::ALL {
            assert_eq!(Code::parse((c as u16).to_string().as_bytes()), Some(c));
            assert_eq!(Code::from_name(c.name()), Some(c));
        }
        assert_eq!(Code::parse(b"99"), Some(Code::Unknown));
        assert_eq!(Code::parse(b"x"), None);
        assert_eq!(Code::from_name("unavailable"), Some(Code::Unavailable));
        assert_eq!(Code::Unavailable.http_status(), 503);
        assert_eq!(Code::from_http_status(503), Code::Unavailable);
        assert_eq!(Code::from_http_status(404), Code::Unimplemented);
    }

    #[test]
    fn messages_are_percent_encoded_and_decoded() {
        let text = "no route: 100% é";
        assert_eq!(encode_message(text), "no route: 100%25 %C3%A9");
        assert_eq!(decode_message(encode_message(text).as_bytes()), text);
        assert_eq!(decode_message(b"50%x"), "50%x");
    }
}
