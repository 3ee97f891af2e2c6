//! The request a task is serving, as the current span: [`serve`] makes a handler's request
//! a server span and the current one, and a call made on the same task is a [`Try`] under
//! it. One implementation for every Tessera server and every SDK service.

use std::future::Future;

use crate::http::{Outcome, Served, TRACEPARENT, TRACESTATE};
use crate::{Recording, Tracer};

tokio::task_local! {
    /// The request being served on this task, and the tracer recording it.
    static CURRENT: (Tracer, Recording);
}

/// Serves `req` with `handler` as a server span, when `tracer` records it; calls made
/// inside `handler` on this task (a [`Try`]) continue the trace. `route` is
/// the matched route's template, when the framework knows it.
pub async fn serve<B, R, Fut>(
    tracer: Option<&Tracer>,
    req: http::Request<B>,
    route: Option<String>,
    handler: impl FnOnce(http::Request<B>) -> Fut,
) -> http::Response<R>
where
    Fut: Future<Output = http::Response<R>>,
{
    let Some(tracer) = tracer else {
        return handler(req).await;
    };
    let h = req.headers();
    let field = |n| h.get(n).map(http::HeaderValue::as_bytes);
    let Some(rec) = tracer.begin(field(&TRACEPARENT), field(&TRACESTATE)) else {
        return handler(req).await;
    };
    let grpc = h
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| tessera_core::grpc::is_grpc(v.as_bytes()));
    let served = Served {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        scheme: "http",
        // The servers here are not told the peer's address (axum without connect info).
        client: None,
        version: req.version(),
        route,
    };
    let resp = CURRENT
        .scope((tracer.clone(), rec.clone()), handler(req))
        .await;
    let status = resp.status().as_u16();
    let span = match grpc {
        // A status in the head is an error's (trailers-only); OK comes in the trailers.
        true => {
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| tessera_core::grpc::Code::parse(v.as_bytes()))
                .map_or(0, |c| c as u16);
            crate::http::grpc_server(rec, served, status, code)
        }
        false => crate::http::server(rec, served, status),
    };
    tracer.record(span);
    resp
}

/// Handles a message (an event) with `handler` as a consumer span that continues the trace
/// its producer stored with it (`traceparent`), when `tracer` records it; calls made inside
/// `handler` on this task continue it too.
pub async fn consume<T>(
    tracer: Option<&Tracer>,
    traceparent: Option<&str>,
    name: String,
    attributes: crate::Attributes,
    handler: impl Future<Output = T>,
) -> T {
    let Some(tracer) = tracer else {
        return handler.await;
    };
    let Some(rec) = tracer.begin(traceparent.map(str::as_bytes), None) else {
        return handler.await;
    };
    let out = CURRENT.scope((tracer.clone(), rec.clone()), handler).await;
    tracer.record(rec.finish(
        name,
        crate::Kind::Consumer,
        attributes,
        crate::Status::Unset,
    ));
    out
}

/// The span of the request being served on this task, when it is recorded (for log lines).
pub fn current_context() -> Option<crate::SpanContext> {
    CURRENT.try_with(|(_, rec)| rec.ctx).ok()
}

/// The request being served on this task, when it is recorded: what work it hands to
/// another task (a saga run later) stores to continue the trace.
pub fn current() -> Option<(Tracer, Recording)> {
    CURRENT.try_with(Clone::clone).ok()
}

/// One try's client span, when the calling task is serving a recorded request.
pub struct Try {
    tracer: Tracer,
    rec: Recording,
}

impl Try {
    /// Begins a try's span; `None` outside a recorded request.
    pub fn begin() -> Option<Try> {
        CURRENT
            .try_with(|(tracer, parent)| Try {
                tracer: tracer.clone(),
                rec: parent.child(),
            })
            .ok()
    }

    /// The fields that make the callee a child of this try.
    pub fn fields(&self) -> Vec<(http::HeaderName, String)> {
        let mut out = vec![(TRACEPARENT, self.rec.ctx.traceparent())];
        if let Some(state) = &self.rec.tracestate {
            out.push((TRACESTATE, state.clone()));
        }
        out
    }

    pub fn finish(self, method: &http::Method, endpoint: &str, attempt: u32, outcome: Outcome) {
        let span = crate::http::client(self.rec, method, endpoint, attempt, outcome);
        self.tracer.record(span);
    }

    /// Ends a gRPC try (`path` is `/package.Service/Method`): `code` is the status it
    /// got, `Err((error.type, message))` when no answer came.
    pub fn finish_grpc(
        self,
        path: &str,
        endpoint: &str,
        attempt: u32,
        code: Result<u16, (&'static str, String)>,
    ) {
        let span = crate::http::grpc_client(self.rec, path, endpoint, attempt, code);
        self.tracer.record(span);
    }
}
