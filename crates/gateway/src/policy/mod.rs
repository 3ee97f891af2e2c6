//! What a request may do and where it goes: route matching, authentication and
//! authorization, rate limits, and upstreams (discovery and balancing). Each answers with
//! data or a `GatewayError`; none builds a response.

pub(crate) mod auth;
pub(crate) mod ratelimit;
pub(crate) mod routes;
pub(crate) mod upstream;
