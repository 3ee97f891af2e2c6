//! gRPC between services, with what Tessera gives HTTP calls.
//!
//! - Serving: [`GrpcServer`] puts generated tonic services, `grpc.health.v1.Health` and
//!   server reflection on the service's own port, next to its HTTP API; register
//!   [`Check::Grpc`](crate::Check::Grpc) and the registry asks the health service.
//! - Calling: [`GrpcChannel`] is what a generated client sends through
//!   (`FooClient::new(channel)`): the service's instances come from the registry, and
//!   each call gets the [`ServiceClient`](crate::ServiceClient)'s balancing, retries
//!   within a budget, outlier ejection and breaker, from the same code, with its
//!   deadline sent as `grpc-timeout` and its trace in the metadata.
//!
//! Protos compile without `protoc`: a build script hands `protox`'s descriptors to
//! `tonic-prost-build` (see the shop's `build.rs`).

mod channel;
mod serve;

pub use channel::{GrpcChannel, GrpcPolicy};
pub use serve::{GrpcServer, Ready};
pub use tessera_core::grpc::Code;
