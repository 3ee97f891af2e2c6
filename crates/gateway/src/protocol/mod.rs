//! HTTP/1.1 (our own codec), HTTP/2 (hyper), TLS, transports and upstream connection
//! pools: how bytes become requests and go out again. Knows nothing of routes or policy.

pub(crate) mod grouped;
pub(crate) mod h1;
pub(crate) mod h2;
pub(crate) mod peer;
pub(crate) mod redis;
pub(crate) mod timer;
pub(crate) mod tls;
pub(crate) mod transport;
