//! Domain types every Tessera crate agrees on, with no I/O: health states as Consul spells
//! them, Go-style durations, and the rules for service names and KV keys. Keeping them here
//! means the registry, the gateway and the SDK reject the same bad input with the same words.
//!
//! ```
//! use tessera_core::{parse_duration, Health};
//! assert_eq!(parse_duration("1m30s").unwrap().as_secs(), 90);
//! assert_eq!("passing".parse::<Health>().unwrap(), Health::Passing);
//! ```

mod auth;
pub mod consul;
mod duration;
pub mod grpc;
mod health;
mod names;

pub use auth::{AllowAll, Authorize, request_token};
pub use duration::{GoDuration, InvalidDuration, format_duration, parse_duration, serde_opt};
pub use health::{Health, InvalidHealth};
pub use names::{InvalidName, validate_key, validate_service_name};

/// An error and its chain of sources on one line (`connect: connection refused`): what
/// a log line or a health check's output should show, since `Display` alone stops at the
/// outermost layer.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
