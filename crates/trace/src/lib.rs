//! Taking part in a distributed trace: reading and passing on W3C Trace Context, deciding
//! which traces to record the way OpenTelemetry's SDKs do, and exporting spans over OTLP.

pub mod context;
pub mod export;
pub mod http;
pub mod otlp;
pub mod sampler;
pub mod scope;
pub mod span;
pub mod tracer;

pub use context::{SpanContext, SpanId, TraceId};
pub use export::{Config, Exporter, Stats};
pub use sampler::Sampler;
pub use span::{Attributes, Event, Kind, Span, Status, Value};
pub use tracer::{Recording, Tracer};
