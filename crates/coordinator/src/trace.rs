//! Sagas and TCC transactions in the trace of the request that started them: the
//! transaction's own span is stored with it (so whichever server finishes it, after a
//! crash too, continues that trace), each participant call is a client span under it whose
//! `traceparent` the participant continues, and the transaction's span is sent when it
//! ends. Only a transaction started by a recorded request is traced.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tessera_trace::http::Outcome;
use tessera_trace::{Kind, Recording, SpanContext, Status, Tracer, Value};

use crate::def::CallDef;
use crate::saga::Attempt;

/// The transaction's own span and the span that started it, as `traceparent` values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TxTrace {
    pub span: String,
    pub parent: String,
}

/// A new transaction's place in the trace of the request being served, if it is recorded.
/// Read on the request's own task: a detached task has no current request.
pub(crate) fn begin() -> Option<TxTrace> {
    let (_, parent) = tessera_trace::scope::current()?;
    Some(TxTrace {
        span: parent.child().ctx.traceparent(),
        parent: parent.ctx.traceparent(),
    })
}

/// The transaction's own span as stored, begun at `start`.
fn own_span(trace: &TxTrace, start: SystemTime) -> Option<Recording> {
    let ctx = SpanContext::parse(trace.span.as_bytes())?;
    Some(Recording {
        ctx,
        parent: SpanContext::parse(trace.parent.as_bytes()).map(|p| p.span_id),
        tracestate: None,
        start,
        events: Vec::new(),
    })
}

/// A participant call's span, under the transaction's; `None` when it is not traced.
pub(crate) fn call_span(tracer: Option<&Tracer>, trace: Option<&TxTrace>) -> Option<Recording> {
    tracer?;
    own_span(trace?, SystemTime::now()).map(|s| s.child())
}

/// Ends a participant call's span: an HTTP client span named `name`, with `attrs`.
pub(crate) fn finish_call(
    tracer: Option<&Tracer>,
    span: Option<Recording>,
    name: String,
    call: &CallDef,
    attempt: u32,
    record: &Attempt,
    attrs: Vec<(&'static str, Value)>,
) {
    let (Some(tracer), Some(rec)) = (tracer, span) else {
        return;
    };
    let outcome = match record.outcome.parse::<u16>() {
        Ok(status) => Outcome::Answered(status),
        Err(_) => Outcome::Failed {
            kind: if record.outcome.starts_with("timeout") {
                "timeout"
            } else if record.outcome.starts_with("connect") {
                "connect"
            } else {
                "_OTHER"
            },
            message: record.outcome.clone(),
        },
    };
    // A service by name, or a URL's host and port.
    let target = match (&call.service, &call.url) {
        (Some(service), _) => service.as_str(),
        (None, Some(url)) => {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            rest.split('/').next().unwrap_or(rest)
        }
        (None, None) => "",
    };
    let method = http::Method::from_bytes(call.method.as_bytes()).unwrap_or(http::Method::POST);
    let mut span =
        tessera_trace::http::client(rec, &method, target, attempt.saturating_sub(1), outcome);
    span.name = name.into();
    span.attributes.extend(attrs);
    tracer.record(span);
}

/// Sends the transaction's own span once it is final: an error unless `ok`.
pub(crate) fn finish(
    tracer: Option<&Tracer>,
    trace: Option<&TxTrace>,
    created_ms: u64,
    name: String,
    ok: bool,
    error: Option<&str>,
    attrs: Vec<(&'static str, Value)>,
) {
    let (Some(tracer), Some(trace)) = (tracer, trace) else {
        return;
    };
    let start = UNIX_EPOCH + Duration::from_millis(created_ms);
    let Some(rec) = own_span(trace, start) else {
        return;
    };
    let status = match ok {
        true => Status::Unset,
        false => Status::Error(error.unwrap_or_default().to_owned()),
    };
    tracer.record(rec.finish(name, Kind::Internal, attrs, status));
}
