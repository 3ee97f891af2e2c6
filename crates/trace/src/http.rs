//! HTTP spans with OpenTelemetry's semantic-convention attribute names, one shape for every
//! Tessera process: the gateway, the SDK's services and clients, the servers' APIs.

use std::net::IpAddr;

use http::{Method, Version};

use crate::span::{Kind, Span, Status, Value};
use crate::tracer::Recording;

/// The `traceparent` and `tracestate` field names.
pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// What an incoming request's server span records besides its answer.
#[derive(Clone, Debug)]
pub struct Served {
    pub method: Method,
    pub path: String,
    pub scheme: &'static str,
    pub client: Option<IpAddr>,
    pub version: Version,
    /// The route (or handler) that answered, when one did: it names the span.
    pub route: Option<String>,
}

/// The request's server span, ended now with `status`.
pub fn server(rec: Recording, served: Served, status: u16) -> Span {
    let mut attrs = vec![
        (
            "http.request.method",
            Value::from(served.method.as_str().to_owned()),
        ),
        ("url.path", served.path.into()),
        ("url.scheme", served.scheme.into()),
        (
            "network.protocol.version",
            protocol_version(served.version).into(),
        ),
        ("http.response.status_code", i64::from(status).into()),
    ];
    if let Some(ip) = served.client {
        attrs.push(("client.address", ip.to_string().into()));
    }
    let name = match served.route {
        Some(r) => {
            let name = format!("{} {r}", served.method);
            attrs.push(("http.route", r.into()));
            name
        }
        None => served.method.to_string(),
    };
    // A server span is an error only for a 5xx: a 4xx is the caller's.
    let outcome = if status >= 500 {
        Status::Error(format!("HTTP {status}"))
    } else {
        Status::Unset
    };
    rec.finish(name, Kind::Server, attrs, outcome)
}

/// How one try of a call ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// An answer with this status.
    Answered(u16),
    /// No answer: `kind` is a low-cardinality `error.type` (`connect`, `timeout`, `io`).
    Failed { kind: &'static str, message: String },
}

/// One try's client span to `endpoint` (`host:port`), ended now. `attempt` counts from 0,
/// so a retry carries `http.request.resend_count`.
pub fn client(
    rec: Recording,
    method: &Method,
    endpoint: &str,
    attempt: u32,
    outcome: Outcome,
) -> Span {
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']), p.parse::<i64>().ok()),
        None => (endpoint, None),
    };
    let mut attrs = vec![
        (
            "http.request.method",
            Value::from(method.as_str().to_owned()),
        ),
        ("server.address", host.to_owned().into()),
        ("network.peer.address", endpoint.to_owned().into()),
    ];
    if let Some(p) = port {
        attrs.push(("server.port", p.into()));
    }
    if attempt > 0 {
        attrs.push(("http.request.resend_count", i64::from(attempt).into()));
    }
    // A client span is an error for a 5xx or no answer.
    let status = match outcome {
        Outcome::Answered(code) => {
            attrs.push(("http.response.status_code", i64::from(code).into()));
            if code >= 500 {
                attrs.push(("error.type", code.to_string().into()));
                Status::Error(format!("HTTP {code}"))
            } else {
                Status::Unset
            }
        }
        Outcome::Failed { kind, message } => {
            attrs.push(("error.type", kind.into()));
            Status::Error(message)
        }
    };
    rec.finish(method.to_string(), Kind::Client, attrs, status)
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}
