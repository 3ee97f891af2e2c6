//! A finished span, as it is queued for export.

use std::borrow::Cow;
use std::time::SystemTime;

use crate::context::{SpanId, TraceId};

/// OpenTelemetry's span kinds (the OTLP numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(Cow<'static, str>),
    Int(i64),
    Bool(bool),
    F64(f64),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Value {
        Value::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(Cow::Owned(s))
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::F64(v)
    }
}

/// Attribute names are OpenTelemetry's semantic conventions, known at compile time.
pub type Attributes = Vec<(&'static str, Value)>;

/// Something that happened at a moment inside a span (a breaker opening, a refusal).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: &'static str,
    pub time: SystemTime,
    pub attributes: Attributes,
}

/// A span's outcome: unset, or an error with a message.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Status {
    #[default]
    Unset,
    Error(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub tracestate: Option<String>,
    pub name: Cow<'static, str>,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Attributes,
    pub events: Vec<Event>,
    pub status: Status,
}
