//! The Tessera gateway: an L7 reverse proxy whose upstreams are registry services (found
//! through Consul blocking queries, so tessera server and real Consul both work) or static
//! endpoint lists. Each request is routed, balanced over usable endpoints and protected by
//! the `tessera-resilience` pieces; see `proxy` for the request path and `routes` for the
//! matching precedence.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tessera_gateway::{Config, Gateway};
//! let config = Config::parse(r#"
//!     [[routes]]
//!     path = { prefix = "/api" }
//!     upstream = "api"
//!     [upstreams.api]
//!     service = "api"
//! "#)?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! let admin = tokio::net::TcpListener::bind(config.admin).await?;
//! let gateway = Gateway::build(config, None)?;
//! gateway.run(listener, admin, std::future::pending()).await;
//! # Ok(()) }
//! ```

//! The modules are layers, each importing only from those below it (the
//! `layers` test holds them to it; ARCHITECTURE.md has the table):
//! `floor` (config, errors, net helpers) ← `protocol` (HTTP/1.1, HTTP/2, TLS, pools) ←
//! `policy` (routes, auth, rate limits, upstreams) ← `proxy` (the request path) ←
//! `server` (accept, admin, reload).

pub(crate) mod floor;
pub(crate) mod policy;
pub(crate) mod protocol;
mod proxy;
mod server;

pub use floor::config::{self, Config, ConfigError};
pub use floor::error::GatewayError;
pub use server::{Gateway, Shared, WorkerListeners, bind_workers};

/// The parsers, for the fuzz targets in `fuzz/` and the property tests: not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::floor::path::{PathParams, PathRules, canonical};
    pub use crate::protocol::h1::client::{decode_chunked, parse_response_head};
    pub use crate::protocol::h1::server::parse_request_head;
}
