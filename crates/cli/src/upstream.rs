//! `tessera upstream`: a tiny HTTP/1.1 + h2c server answering `hello from ID`, used as the
//! upstream in benchmarks and demos (so they need nothing but the tessera binary). With
//! `--grpc` it serves gRPC instead, through the SDK: `grpc.health.v1.Health` (always
//! SERVING) and reflection, as a Tessera service serves them.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Debug, clap::Args)]
pub struct UpstreamArgs {
    #[arg(long, default_value = "127.0.0.1:9001")]
    bind: SocketAddr,
    /// Name put in every answer.
    #[arg(long, default_value = "upstream")]
    id: String,
    /// Serve gRPC (the SDK's GrpcServer) instead of `hello`.
    #[arg(long)]
    grpc: bool,
}

struct AlwaysReady;

impl tessera::grpc::Ready for AlwaysReady {
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

pub async fn run(args: UpstreamArgs) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("tessera upstream {} listening on http://{addr}", args.id);
    if args.grpc {
        let app = tessera::grpc::GrpcServer::new().into_router(std::sync::Arc::new(AlwaysReady))?;
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        return axum::serve(listener, app)
            .with_graceful_shutdown(crate::server::shutdown_signal())
            .await
            .map_err(|e| format!("server: {e}"));
    }
    let body = Bytes::from(format!("hello from {}\n", args.id));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            _ = crate::server::shutdown_signal() => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
