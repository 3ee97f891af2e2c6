//! Spans as OTLP's `ExportTraceServiceRequest` protobuf (opentelemetry-proto,
//! `collector/trace/v1`), written directly: a few message types do not justify a protobuf
//! compiler in the build.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::span::{Attributes, Event, Span, Status, Value};

/// What the spans come from: `service.name` and the other resource attributes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resource {
    pub attributes: Vec<(String, String)>,
}

/// The request body for `POST /v1/traces` (`application/x-protobuf`).
pub fn encode(resource: &Resource, spans: &[Span]) -> Vec<u8> {
    let mut resource_spans = Vec::new();
    message(&mut resource_spans, 1, |m| {
        for (k, v) in &resource.attributes {
            message(m, 1, |kv| key_value(kv, k, &Value::Str(v.clone().into())));
        }
    });
    message(&mut resource_spans, 2, |scope_spans| {
        message(scope_spans, 1, |scope| {
            string(scope, 1, "tessera");
            string(scope, 2, env!("CARGO_PKG_VERSION"));
        });
        for s in spans {
            message(scope_spans, 2, |m| span(m, s));
        }
    });
    let mut out = Vec::with_capacity(resource_spans.len() + 8);
    bytes(&mut out, 1, &resource_spans);
    out
}

fn span(m: &mut Vec<u8>, s: &Span) {
    bytes(m, 1, &s.trace_id.0);
    bytes(m, 2, &s.span_id.0);
    if let Some(ts) = &s.tracestate {
        string(m, 3, ts);
    }
    if let Some(p) = s.parent {
        bytes(m, 4, &p.0);
    }
    string(m, 5, &s.name);
    varint_field(m, 6, s.kind as u64);
    fixed64(m, 7, nanos(s.start));
    fixed64(m, 8, nanos(s.end));
    attributes(m, 9, &s.attributes);
    for e in &s.events {
        message(m, 11, |em| event(em, e));
    }
    if let Status::Error(msg) = &s.status {
        message(m, 15, |st| {
            string(st, 2, msg);
            varint_field(st, 3, 2);
        });
    }
}

fn event(m: &mut Vec<u8>, e: &Event) {
    fixed64(m, 1, nanos(e.time));
    string(m, 2, e.name);
    attributes(m, 3, &e.attributes);
}

fn attributes(m: &mut Vec<u8>, field: u32, attrs: &Attributes) {
    for (k, v) in attrs {
        message(m, field, |kv| key_value(kv, k, v));
    }
}

fn key_value(m: &mut Vec<u8>, name: &str, value: &Value) {
    string(m, 1, name);
    message(m, 2, |any| match value {
        Value::Str(s) => string(any, 1, s),
        Value::Bool(b) => varint_field(any, 2, u64::from(*b)),
        Value::Int(i) => varint_field(any, 3, *i as u64),
        Value::F64(f) => {
            key(any, 4, 1);
            any.extend_from_slice(&f.to_le_bytes());
        }
    });
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn key(m: &mut Vec<u8>, field: u32, wire: u8) {
    varint(m, (u64::from(field) << 3) | u64::from(wire));
}

fn varint(m: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        m.push((v as u8) | 0x80);
        v >>= 7;
    }
    m.push(v as u8);
}

fn varint_field(m: &mut Vec<u8>, field: u32, v: u64) {
    key(m, field, 0);
    varint(m, v);
}

fn fixed64(m: &mut Vec<u8>, field: u32, v: u64) {
    key(m, field, 1);
    m.extend_from_slice(&v.to_le_bytes());
}

fn bytes(m: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(m, field, 2);
    varint(m, b.len() as u64);
    m.extend_from_slice(b);
}

fn string(m: &mut Vec<u8>, field: u32, s: &str) {
    bytes(m, field, s.as_bytes());
}

/// A nested message: written to its own buffer first, as its length comes before it.
fn message(m: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    body(&mut inner);
    bytes(m, field, &inner);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{SpanId, TraceId};
    use crate::span::Kind;
    use std::time::Duration;

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        let enc = |v| {
            let mut m = Vec::new();
            varint(&mut m, v);
            m
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(1), [1]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(u64::MAX).len(), 10);
        // A negative int64 is ten bytes, as protobuf writes it.
        let mut m = Vec::new();
        key_value(&mut m, "k", &Value::Int(-1));
        assert_eq!(m.len(), 3 + 2 + 1 + 10);
    }

    #[test]
    fn a_span_is_laid_out_field_by_field() {
        let t0 = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_001);
        let s = Span {
            trace_id: TraceId([0xab; 16]),
            span_id: SpanId([0xcd; 8]),
            parent: None,
            tracestate: None,
            name: "GET".into(),
            kind: Kind::Client,
            start: t0,
            end: t0 + Duration::from_nanos(5),
            attributes: vec![],
            events: vec![],
            status: Status::Unset,
        };
        let mut m = Vec::new();
        span(&mut m, &s);
        let mut want = vec![0x0a, 16];
        want.extend([0xab; 16]);
        want.extend([0x12, 8]);
        want.extend([0xcd; 8]);
        want.extend([0x2a, 3, b'G', b'E', b'T', 0x30, 3, 0x39]);
        want.extend(1_700_000_000_000_000_001u64.to_le_bytes());
        want.push(0x41);
        want.extend(1_700_000_000_000_000_006u64.to_le_bytes());
        assert_eq!(m, want);
    }
}
