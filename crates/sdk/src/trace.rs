//! A service's part in distributed traces: each request it serves is a server span that
//! continues the caller's `traceparent`, and each try of a [`ServiceClient`] call made while
//! serving it is a client span under it, sending the callee its own `traceparent`.
//!
//! The spans go to the collector OpenTelemetry's variables name (see [`Tracer::from_env`]).
//! A framework's middleware wraps each request in [`serve`]; with axum:
//!
//! ```no_run
//! # async fn demo() -> Result<(), String> {
//! let tracer = tessera::trace::Tracer::from_env("catalog")?;
//! let app: axum::Router = axum::Router::new().layer(axum::middleware::from_fn(
//!     move |req: axum::extract::Request, next: axum::middleware::Next| {
//!         let tracer = tracer.clone();
//!         async move { tessera::trace::serve(tracer.as_ref(), req, None, |r| next.run(r)).await }
//!     },
//! ));
//! # Ok(()) }
//! ```
//!
//! [`ServiceClient`]: crate::ServiceClient

use std::future::Future;
use std::net::IpAddr;

use tessera_trace::http::{Outcome, Served, TRACEPARENT, TRACESTATE};
pub use tessera_trace::{Recording, Tracer};

tokio::task_local! {
    /// The request being served on this task, and the tracer recording it.
    static CURRENT: (Tracer, Recording);
}

/// Serves `req` with `handler` as a server span, when `tracer` records it; calls made
/// through a `ServiceClient` inside `handler` (on this task) continue the trace. `route` is
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
    let served = Served {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        scheme: "http",
        client: req.extensions().get::<ClientAddr>().map(|c| c.0),
        version: req.version(),
        route,
    };
    let resp = CURRENT
        .scope((tracer.clone(), rec.clone()), handler(req))
        .await;
    tracer.record(tessera_trace::http::server(
        rec,
        served,
        resp.status().as_u16(),
    ));
    resp
}

/// The client's address, when the server puts it in the request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

/// One try's client span, when the calling task is serving a recorded request.
pub(crate) struct Try {
    tracer: Tracer,
    rec: Recording,
}

impl Try {
    /// Begins a try's span; `None` outside a recorded request.
    pub(crate) fn begin() -> Option<Try> {
        CURRENT
            .try_with(|(tracer, parent)| Try {
                tracer: tracer.clone(),
                rec: parent.child(),
            })
            .ok()
    }

    /// The fields that make the callee a child of this try.
    pub(crate) fn fields(&self) -> Vec<(http::HeaderName, String)> {
        let mut out = vec![(TRACEPARENT, self.rec.ctx.traceparent())];
        if let Some(state) = &self.rec.tracestate {
            out.push((TRACESTATE, state.clone()));
        }
        out
    }

    pub(crate) fn finish(
        self,
        method: &http::Method,
        endpoint: &str,
        attempt: u32,
        outcome: Outcome,
    ) {
        let span = tessera_trace::http::client(self.rec, method, endpoint, attempt, outcome);
        self.tracer.record(span);
    }
}
