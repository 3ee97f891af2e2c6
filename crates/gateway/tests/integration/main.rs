//! Gateway integration tests, one binary: real upstream servers, the real gateway and
//! (for discovery) a real tessera registry, all on ephemeral loopback ports.

#![allow(clippy::unwrap_used)]

mod auth;
mod config;
mod discovery;
mod grpc;
mod http1;
mod layers;
mod properties;
mod proxying;
mod ratelimit;
mod resilience;
mod support;
mod tls;
mod trace;
mod workers;
