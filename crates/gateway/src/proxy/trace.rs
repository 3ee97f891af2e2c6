//! A traced request's spans: one server span for the request and one client span per try,
//! so a retry shows as a second call under the same request. Only a request the sampler
//! records gets here; any other pays a field lookup.

use http::header::HeaderName;
use http::{Method, Request, StatusCode};
use std::time::SystemTime;
use tessera_core::grpc::Code;
use tessera_trace::http::{Outcome, Served, TRACEPARENT, TRACESTATE};

use tessera_trace::{Event, Recording, Tracer};

use super::{Failure, Proxy, Recorded};
use crate::floor::error::GatewayError;
use crate::policy::routes::Route;
use crate::protocol::h1::body::Body;
use crate::protocol::h1::client::Exchange;
use crate::protocol::h1::fields::RawFields;
use crate::protocol::peer::Peer;

/// The server span, with what its attributes need: the request is taken apart by then.
pub(super) struct ServerSpan {
    pub rec: Recording,
    served: Served,
}

/// Starts the request's server span when the tracer records it, continuing the caller's
/// `traceparent` from whichever form the fields are in.
/// Boxed: the request's future holds only a pointer for it, traced or not.
pub(super) fn begin(
    tracer: &Tracer,
    req: &Request<Body>,
    raw: Option<RawFields<'_>>,
    peer: &Peer,
) -> Option<Box<ServerSpan>> {
    let (parent, state) = match raw {
        Some(r) => {
            let find = |name: &HeaderName| {
                r.iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str().as_bytes()))
                    .map(|(_, v)| v)
            };
            (find(&TRACEPARENT), find(&TRACESTATE))
        }
        None => {
            let h = req.headers();
            let get = |name| h.get(name).map(|v: &http::HeaderValue| v.as_bytes());
            (get(&TRACEPARENT), get(&TRACESTATE))
        }
    };
    let rec = tracer.begin(parent, state)?;
    Some(Box::new(ServerSpan {
        rec,
        served: Served {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            scheme: if peer.tls().is_some() {
                "https"
            } else {
                "http"
            },
            client: Some(peer.addr.ip()),
            version: req.version(),
            route: None,
        },
    }))
}

/// Ends the server span with the answer the client got; `grpc`, for a gRPC caller, is
/// the status it was told in the head (0: still to come in the trailers), and makes the
/// span an RPC span.
pub(super) fn finish(
    gw: &Proxy,
    span: Box<ServerSpan>,
    route: Option<&Route>,
    status: StatusCode,
    grpc: Option<u16>,
) {
    let Some(tracer) = &gw.tracer else { return };
    let ServerSpan { rec, mut served } = *span;
    served.route = route.map(|r| r.name.clone());
    tracer.record(match grpc {
        Some(code) => tessera_trace::http::grpc_server(rec, served, status.as_u16(), code),
        None => tessera_trace::http::server(rec, served, status.as_u16()),
    });
}

/// A try's client span once its outcome is known, gathering what it led to.
pub(super) struct TrySpan {
    rec: Recording,
    outcome: Outcome,
    /// A gRPC try's status as the gateway saw it.
    grpc: Option<Code>,
}

impl TrySpan {
    /// The try's outcome, and what it did to the endpoint and its breaker as events.
    pub(super) fn after(
        rec: Recording,
        result: &Result<Exchange, Failure>,
        recorded: Recorded,
        grpc: Option<Code>,
    ) -> Box<TrySpan> {
        let outcome = match result {
            Ok(exchange) => Outcome::Answered(exchange.response.status().as_u16()),
            Err(f) => Outcome::Failed {
                kind: error_type(&f.error),
                message: f.error.to_string(),
            },
        };
        let mut span = Box::new(TrySpan { rec, outcome, grpc });
        if recorded.ejected {
            span.note("endpoint ejected");
        }
        if recorded.opened_breaker {
            span.note("circuit breaker opened");
        }
        span
    }

    pub(super) fn note(&mut self, name: &'static str) {
        self.rec.events.push(Event {
            name,
            time: SystemTime::now(),
            attributes: Vec::new(),
        });
    }
}

/// Ends one try's client span (an RPC span for a gRPC call to `path`).
pub(super) fn end_try(
    gw: &Proxy,
    span: TrySpan,
    (method, path): (&Method, &str),
    endpoint: &str,
    attempt: u32,
) {
    let Some(tracer) = &gw.tracer else { return };
    let TrySpan { rec, outcome, grpc } = span;
    tracer.record(match (grpc, outcome) {
        (Some(_), Outcome::Failed { kind, message }) => {
            tessera_trace::http::grpc_client(rec, path, endpoint, attempt, Err((kind, message)))
        }
        (Some(code), Outcome::Answered(_)) => {
            tessera_trace::http::grpc_client(rec, path, endpoint, attempt, Ok(code as u16))
        }
        (None, outcome) => tessera_trace::http::client(rec, method, endpoint, attempt, outcome),
    });
}

/// Notes on the server span why the gateway refused the request itself.
pub(super) fn refused(span: &mut ServerSpan, e: &GatewayError) {
    let name = match e {
        GatewayError::RateLimited { .. } => "rate limit exceeded",
        GatewayError::BreakerOpen { .. } => "circuit breaker open",
        GatewayError::BulkheadFull { .. } => "bulkhead full",
        _ => return,
    };
    span.rec.events.push(Event {
        name,
        time: SystemTime::now(),
        attributes: Vec::new(),
    });
}

/// A low-cardinality name for why a try failed, as `error.type` asks.
fn error_type(e: &GatewayError) -> &'static str {
    match e {
        GatewayError::Connect { .. } => "connect",
        GatewayError::Timeout { .. } => "timeout",
        GatewayError::Io { .. } => "io",
        _ => "_OTHER",
    }
}
