//! Serving gRPC next to a service's HTTP API on the same port: axum serves HTTP/1.1 and
//! HTTP/2 (h2c) on one listener, and the generated tonic services are routes like any
//! other, so one registration, one health state and one drain cover both.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tessera_core::grpc::{Code, format_timeout, parse_timeout};
use tokio_stream::Stream;
use tonic::server::NamedService;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::ServiceExt;

/// How often a `Watch` on the health service asks [`Ready`] again.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Whether the instance should get traffic, answered in one place for `/health` and for
/// `grpc.health.v1.Health`, so the registry's HTTP and gRPC checks cannot disagree.
pub trait Ready: Send + Sync + 'static {
    /// `Err(why)` while the instance must not get traffic (draining, database down).
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// The gRPC side of a service: its generated services, the standard health service and
/// server reflection, as routes to merge into its HTTP router.
///
/// ```no_run
/// # struct Ok;
/// # impl tessera::grpc::Ready for Ok {
/// #     async fn ready(&self) -> Result<(), String> { Result::Ok(()) }
/// # }
/// # fn demo(http: axum::Router) -> Result<axum::Router, String> {
/// let grpc = tessera::grpc::GrpcServer::new()
///     // .add_service(CartServer::new(cart))
///     // .descriptors(DESCRIPTORS)
///     .into_router(std::sync::Arc::new(Ok))?;
/// let app = http.merge(grpc);
/// # Result::Ok(app) }
/// ```
#[derive(Default)]
pub struct GrpcServer {
    router: Router,
    names: Vec<&'static str>,
    descriptors: Vec<&'static [u8]>,
}

impl GrpcServer {
    pub fn new() -> GrpcServer {
        GrpcServer::default()
    }

    /// Adds a generated service (`FooServer::new(handler)`); the health service reports
    /// it under its full name.
    pub fn add_service<S>(mut self, svc: S) -> GrpcServer
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.router = self.router.route_service(
            &format!("/{}/{{*rest}}", S::NAME),
            svc.map_request(|req: Request| req.map(tonic::body::Body::new)),
        );
        self
    }

    /// An encoded `FileDescriptorSet` of the services' protos, for reflection to serve.
    pub fn descriptors(mut self, encoded: &'static [u8]) -> GrpcServer {
        self.descriptors.push(encoded);
        self
    }

    fn reflection(&self) -> tonic_reflection::server::Builder<'static> {
        let b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        let b = self
            .descriptors
            .iter()
            .fold(b, |b, d| b.register_encoded_file_descriptor_set(d));
        self.names.iter().fold(b, |b, n| b.with_service_name(*n))
    }

    /// The routes: the services added, `grpc.health.v1.Health` answering from `ready`,
    /// and server reflection (v1 and v1alpha, which older clients speak). Each call is
    /// cut off when the `grpc-timeout` its caller sent runs out.
    pub fn into_router<R: Ready>(self, ready: Arc<R>) -> Result<Router, String> {
        let health = HealthServer::new(HealthService {
            ready,
            names: Arc::new(self.names.clone()),
        });
        let v1 = self
            .reflection()
            .build_v1()
            .map_err(|e| format!("gRPC reflection: {e}"))?;
        let v1alpha = self
            .reflection()
            .build_v1alpha()
            .map_err(|e| format!("gRPC reflection: {e}"))?;
        let server = GrpcServer {
            router: self.router,
            names: Vec::new(),
            descriptors: Vec::new(),
        }
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha);
        Ok(server
            .router
            .layer(axum::middleware::from_fn(within_deadline)))
    }
}

/// The callee's half of deadlines: a call whose caller stops waiting after
/// `grpc-timeout` is answered DEADLINE_EXCEEDED then, and its handler dropped.
async fn within_deadline(req: Request, next: Next) -> Response {
    let Some(limit) = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| parse_timeout(v.as_bytes()))
    else {
        return next.run(req).await;
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => tessera_web::grpc_status(
            Code::DeadlineExceeded,
            &format!(
                "deadline exceeded: the caller's grpc-timeout was {}",
                format_timeout(limit)
            ),
        ),
    }
}

struct HealthService<R> {
    ready: Arc<R>,
    names: Arc<Vec<&'static str>>,
}

impl<R: Ready> HealthService<R> {
    fn known(&self, service: &str) -> bool {
        service.is_empty() || self.names.contains(&service)
    }
}

async fn status<R: Ready>(ready: &R) -> ServingStatus {
    match ready.ready().await {
        Ok(()) => ServingStatus::Serving,
        Err(_) => ServingStatus::NotServing,
    }
}

fn answer(s: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: s as i32 }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl<R: Ready> Health for HealthService<R> {
    async fn check(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let service = req.into_inner().service;
        if !self.known(&service) {
            return Err(tonic::Status::not_found(format!(
                "this server does not serve {service}"
            )));
        }
        Ok(tonic::Response::new(answer(status(&*self.ready).await)))
    }

    type WatchStream = WatchStream;

    /// The current status at once, then each change, found by asking [`Ready`] every
    /// second; an unknown service is SERVICE_UNKNOWN, and the stream stays open.
    async fn watch(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        let known = self.known(&req.into_inner().service);
        let ready = self.ready.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = if known {
                    status(&*ready).await
                } else {
                    ServingStatus::ServiceUnknown
                };
                if last != Some(now) {
                    if tx.send(Ok(answer(now))).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
