//! Registry integration tests, one binary: real servers on port 0 over HTTP, and
//! paused-clock tests of the time-dependent logic against the registry itself.

// Test helpers panic on the unexpected: that is the failure report.
#![allow(clippy::unwrap_used)]

mod acl;
mod admission;
mod api;
mod checks;
mod cluster;
mod durability;
mod kv;
mod linearizable;
mod sessions;
mod support;
mod timing;
