//! A traced request's spans: one server span for the request and one client span per try,
//! so a retry shows as a second call under the same request. Only a request the sampler
//! records gets here; any other pays a field lookup.

use http::header::HeaderName;
use http::{Method, Request, StatusCode};
use tessera_trace::http::{Outcome, Served, TRACEPARENT, TRACESTATE};
use tessera_trace::{Recording, Tracer};

use super::{Failure, Proxy};
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

/// Ends the server span with the answer the client got.
pub(super) fn finish(gw: &Proxy, span: Box<ServerSpan>, route: Option<&Route>, status: StatusCode) {
    let Some(tracer) = &gw.tracer else { return };
    let ServerSpan { rec, mut served } = *span;
    served.route = route.map(|r| r.name.clone());
    tracer.record(tessera_trace::http::server(rec, served, status.as_u16()));
}

/// Ends one try's client span.
pub(super) fn finish_try(
    tracer: &Tracer,
    rec: Recording,
    method: &Method,
    endpoint: &str,
    attempt: u32,
    result: &Result<Exchange, Failure>,
) {
    let outcome = match result {
        Ok(exchange) => Outcome::Answered(exchange.response.status().as_u16()),
        Err(f) => Outcome::Failed {
            kind: error_type(&f.error),
            message: f.error.to_string(),
        },
    };
    tracer.record(tessera_trace::http::client(
        rec, method, endpoint, attempt, outcome,
    ));
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
