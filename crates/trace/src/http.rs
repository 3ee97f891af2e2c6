//! HTTP spans with OpenTelemetry's semantic-convention attribute names, one shape for every
//! Tessera process: the gateway, the SDK's services and clients, the servers' APIs. A
//! gRPC call's span is an HTTP span renamed and described by the RPC conventions
//! (`package.Service/Method`, `rpc.system`, `rpc.service`, `rpc.method`,
//! `rpc.grpc.status_code`).

use std::net::IpAddr;

use http::{Method, Version};
use tessera_core::grpc::Code;

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

/// A gRPC call's name (`package.Service/Method`, from its path) and `rpc.*` attributes.
fn rpc(attrs: &mut Vec<(&'static str, Value)>, path: &str, code: u16) -> String {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    attrs.push(("rpc.system", "grpc".into()));
    attrs.push(("rpc.service", service.to_owned().into()));
    attrs.push(("rpc.method", method.to_owned().into()));
    attrs.push(("rpc.grpc.status_code", i64::from(code).into()));
    name.to_owned()
}

/// A gRPC call's server span, ended now: `status` is the HTTP answer's, `code` the gRPC
/// status (0 when it is still to come in the trailers). An error for the statuses that
/// say the server failed (OpenTelemetry's list), not for the caller's mistakes.
pub fn grpc_server(rec: Recording, served: Served, status: u16, code: u16) -> Span {
    let mut attrs = vec![
        ("url.path", Value::from(served.path.clone())),
        (
            "network.protocol.version",
            protocol_version(served.version).into(),
        ),
        ("http.response.status_code", i64::from(status).into()),
    ];
    let name = rpc(&mut attrs, &served.path, code);
    let c = Code::from_number(code);
    let failed = c.is_failure() || c == Code::Unimplemented || status >= 500;
    let outcome = if failed {
        Status::Error(format!("gRPC status {code}"))
    } else {
        Status::Unset
    };
    rec.finish(name, Kind::Server, attrs, outcome)
}

/// One try of a gRPC call, as a client span to `endpoint`: `code` is the status it got,
/// `Err` when no answer came. Any status but OK is an error, as gRPC clients see it.
pub fn grpc_client(
    rec: Recording,
    path: &str,
    endpoint: &str,
    attempt: u32,
    code: Result<u16, (&'static str, String)>,
) -> Span {
    let mut attrs = vec![("network.peer.address", Value::from(endpoint.to_owned()))];
    if let Some((host, port)) = endpoint.rsplit_once(':') {
        attrs.push((
            "server.address",
            host.trim_matches(['[', ']']).to_owned().into(),
        ));
        if let Ok(p) = port.parse::<i64>() {
            attrs.push(("server.port", p.into()));
        }
    }
    if attempt > 0 {
        attrs.push(("http.request.resend_count", i64::from(attempt).into()));
    }
    let (code, outcome) = match code {
        Ok(0) => (0, Status::Unset),
        Ok(c) => (c, Status::Error(format!("gRPC status {c}"))),
        Err((kind, message)) => {
            attrs.push(("error.type", kind.into()));
            // No answer: UNAVAILABLE (or DEADLINE_EXCEEDED), as the caller is told.
            (
                if kind == "timeout" { 4 } else { 14 },
                Status::Error(message),
            )
        }
    };
    let name = rpc(&mut attrs, path, code);
    rec.finish(name, Kind::Client, attrs, outcome)
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
