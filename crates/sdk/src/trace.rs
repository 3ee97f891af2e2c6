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

pub(crate) use tessera_trace::scope::Try;
pub use tessera_trace::scope::{consume, serve};
pub use tessera_trace::{Recording, Tracer};
