//! The HTTP/1.1 fast path: our own codec for the common proxy exchange on both sides,
//! with hyper kept for everything else (HTTP/2, upgrades on the client side, unusual or
//! malformed requests). See `server` and `client` for where the line is drawn.

pub mod client;
pub mod date;
pub mod fields;
pub mod server;
pub use server::{MAX_HEAD, MAX_HEADERS};
