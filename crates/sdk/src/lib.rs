//! The Tessera SDK: what a service embeds to live on a Tessera platform (or on Consul).
//!
//! - [`Registration`] registers an instance with an HTTP or TTL check, keeps the TTL
//!   alive, and [`Registered::deregister`] takes it out before the process stops serving.
//! - [`Registry::watch`] is a cached view of a service's healthy instances, kept current
//!   by blocking queries and usable from the cache while the registry is away.
//! - [`ServiceClient`] calls a service by name with the gateway's balancing and
//!   protection (P2C peak-EWMA, retries within a budget, timeouts, circuit breaker).
//! - [`Saga`], [`Tcc`] and [`Coordinator`] hand distributed transactions to the
//!   coordinator in `tessera server`.
//! - [`Events`] subscribes to the event store (catch-up then live, resuming after
//!   reconnects) and keeps consumer-group offsets; [`outbox`] writes events in the service's own transaction and relays them to the
//!   event store; its inbox makes consumers idempotent.
//! - [`grpc`] serves gRPC next to the HTTP API (health, reflection) and calls gRPC
//!   services with the same balancing and protection as [`ServiceClient`].
//! - [`JwksVerifier`] checks bearer tokens against a JWKS from a URL or a service;
//!   [`jwt`] signs them.
//!
//! Everything speaks the Consul HTTP API to the registry, nothing else.

mod client;
mod events;
pub mod grpc;
mod http;
mod jwks;
mod metrics;
mod registry;
mod saga;
pub mod trace;

pub use client::{CallPolicy, RequestBuilder, ServiceClient};
pub use events::{Event, Events, Subscription};
pub use http::{Error, MAX_BODY, Response};
pub use jwks::{Alg, AuthError, Claims, JwksVerifier, JwtError, KeySet, Validation};
pub use registry::{Check, Instance, Instances, Registered, Registration, Registry, Watch};
pub use saga::{Call, Coordinator, Participant, Retry, Run, Saga, Step, Tcc};
/// Percent-encodes one URL path segment (a product id, an order id).
pub use tessera_core::consul::encode_segment;
/// The transactional outbox and inbox (SQLite or PostgreSQL), and the relay that
/// publishes outbox rows to the event store.
pub use tessera_events::outbox;
/// Token signing and the JWT building blocks.
pub use tessera_jwt as jwt;

/// Resolves on SIGTERM or Ctrl-C: the moment to [`Registered::deregister`], then stop
/// accepting. With `TESSERA_STOP_ON_STDIN_EOF=1` in the environment it also resolves
/// when stdin reaches end of file: a supervisor (such as `tessera demo`) holds the pipe,
/// so its children stop cleanly when it closes it and cannot outlive it if it dies.
pub async fn shutdown_signal() {
    let supervised = std::env::var("TESSERA_STOP_ON_STDIN_EOF").is_ok_and(|v| v == "1");
    // Under a supervisor, Ctrl-C in the terminal reaches every process of the group at
    // once; the supervisor then stops its children in order (services before the
    // registry they deregister from), so they keep SIGINT from killing them and ignore it.
    #[cfg(unix)]
    let _swallow_sigint = supervised
        .then(|| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok())
        .flatten();
    let interrupt = async {
        if supervised {
            std::future::pending::<()>().await;
        } else {
            let _ = tokio::signal::ctrl_c().await;
        }
    };
    let eof = async {
        if supervised {
            use tokio::io::AsyncReadExt;
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = term => {}
        _ = eof => {}
        _ = interrupt => {}
    }
}
