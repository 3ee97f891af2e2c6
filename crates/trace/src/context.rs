//! W3C Trace Context (`traceparent`, `tracestate`): what one process hands the next so
//! that both record spans of the same trace.

use std::fmt;

/// A trace's id: 16 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A span's id: 8 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A random id (never all zero).
    pub fn random() -> TraceId {
        loop {
            let id = fastrand::u128(..).to_be_bytes();
            if id != [0; 16] {
                return TraceId(id);
            }
        }
    }
}

impl SpanId {
    /// A random id (never all zero).
    pub fn random() -> SpanId {
        SpanId(fastrand::u64(1..).to_be_bytes())
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// A position in a trace: the trace, the span that is the parent of what comes next, and
/// whether the trace is being recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// `tracestate` is passed on as received, up to this size; a longer one is dropped, as
/// the specification allows, rather than cut in the middle of a member.
const MAX_TRACESTATE: usize = 512;

impl SpanContext {
    /// Reads a `traceparent` value. `None` when it is not one: the request then starts a
    /// trace of its own. A version above `00` is read as `00` when its first fields have
    /// that shape, as the specification asks of a parser that knows only `00`.
    pub fn parse(value: &[u8]) -> Option<SpanContext> {
        if value.len() < 55 {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        match version {
            0xff => return None,
            0 if value.len() != 55 => return None,
            0 => {}
            _ if value.len() > 55 && value[55] != b'-' => return None,
            _ => {}
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace = [0u8; 16];
        for (i, b) in trace.iter_mut().enumerate() {
            *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span = [0u8; 8];
        for (i, b) in span.iter_mut().enumerate() {
            *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace == [0; 16] || span == [0; 8] {
            return None;
        }
        Some(SpanContext {
            trace_id: TraceId(trace),
            span_id: SpanId(span),
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` value that makes this span the parent of the next.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "01" } else { "00" }
        )
    }
}

/// A `tracestate` value worth passing on: ASCII, not empty, not too long.
pub fn tracestate(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?.trim();
    (!s.is_empty() && s.len() <= MAX_TRACESTATE && s.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .then(|| s.to_owned())
}

/// Two lowercase hex digits (the specification forbids uppercase).
fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_and_writes_a_traceparent() {
        let ctx = SpanContext::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(ctx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id.to_string(), "00f067aa0ba902b7");
        assert!(ctx.sampled);
        assert_eq!(ctx.traceparent(), GOOD);
        let unsampled = SpanContext::parse(GOOD.replace("-01", "-00").as_bytes()).unwrap();
        assert!(!unsampled.sampled);
        // Flags other than `sampled` are read, and `sampled` is the low bit.
        assert!(
            SpanContext::parse(GOOD.replace("-01", "-03").as_bytes())
                .unwrap()
                .sampled
        );
        assert!(
            !SpanContext::parse(GOOD.replace("-01", "-02").as_bytes())
                .unwrap()
                .sampled
        );
    }

    #[test]
    fn refuses_what_is_not_a_traceparent() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // Uppercase hex, all-zero ids, version ff, a bad separator, trailing bytes on 00.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // A later version must still separate what it adds with '-'.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for b in bad {
            assert_eq!(SpanContext::parse(b.as_bytes()), None, "{b:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_as_00() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds";
        let ctx = SpanContext::parse(v.as_bytes()).unwrap();
        assert_eq!(ctx.traceparent(), GOOD);
        assert!(SpanContext::parse(&v.as_bytes()[..55]).is_some());
    }

    #[test]
    fn tracestate_passes_when_it_is_sane() {
        assert_eq!(
            tracestate(b" congo=t61rcWkgMzE "),
            Some("congo=t61rcWkgMzE".into())
        );
        assert_eq!(tracestate(b""), None);
        assert_eq!(tracestate(&[b'a'; 513]), None);
        assert_eq!(tracestate("k=\u{e9}".as_bytes()), None);
    }

    #[test]
    fn random_ids_are_never_zero_and_print_as_hex() {
        for _ in 0..1000 {
            let (t, s) = (TraceId::random(), SpanId::random());
            assert_ne!(t.0, [0; 16]);
            assert_ne!(s.0, [0; 8]);
            assert_eq!(t.to_string().len(), 32);
            assert_eq!(s.to_string().len(), 16);
        }
    }
}
