//! The pieces that keep one bad upstream from taking its callers down, as plain state
//! machines driven by the caller (the gateway's proxy loop, the SDK's `ServiceClient`, the
//! coordinator's participant calls):
//!
//! - [`CircuitBreaker`]: an error-rate breaker. `Closed` lets traffic flow and counts
//!   errors over a sliding window; when the error rate reaches the threshold with enough
//!   calls it goes `Open` and rejects at once; after the open period it goes `HalfOpen` and
//!   lets a few probes through: all succeed → `Closed`, any fails → `Open` again.
//! - [`RetryBudget`]: retries may add at most a ratio of recent requests plus a small floor
//!   per second, so a failing upstream sees ~1.2× its load, never 3×.
//! - [`Outlier`]: passive outlier ejection: consecutive gateway errors eject an endpoint for
//!   a growing time (base × times ejected), never more than a share of the set at once.
//! - [`Bulkhead`]: a cap on requests in flight per upstream.
//! - [`Backoff`]: the jittered, growing pause between retries.
//! - [`RateLimiter`]: a keyed GCRA limiter (burst, then a steady rate) whose memory stays
//!   bounded under millions of keys.
//!
//! Time comes from `tokio::time::Instant`, so tests run on a paused clock.
//!
//! ```
//! use std::time::Duration;
//! use tessera_resilience::{BreakerConfig, CircuitBreaker, State};
//! let b = CircuitBreaker::new(BreakerConfig { min_calls: 2, ..BreakerConfig::default() });
//! for _ in 0..2 {
//!     b.try_acquire().unwrap().failure();
//! }
//! assert_eq!(b.state(), State::Open);
//! assert!(b.try_acquire().is_err());
//! ```

mod backoff;
mod breaker;
mod budget;
mod bulkhead;
mod outlier;
mod ratelimit;
mod window;

pub use backoff::Backoff;
pub use breaker::{BreakerConfig, BreakerOpen, CircuitBreaker, Permit, State};
pub use budget::{BudgetConfig, RetryBudget};
pub use bulkhead::{Bulkhead, BulkheadFull, BulkheadPermit};
pub use outlier::{Outlier, OutlierConfig};
pub use ratelimit::{Decision, RateLimitConfig, RateLimiter};
