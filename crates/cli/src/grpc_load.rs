//! `tessera grpc-load`: a unary gRPC load client for `bench/grpc.sh`. It calls
//! `grpc.health.v1.Health/Check` (the request is five fixed bytes, so the client spends
//! nothing on protobuf) over a few HTTP/2 connections with a fixed number of calls in
//! flight, and prints one JSON line: calls, errors, calls per second, p50 and p99.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Debug, clap::Args)]
pub struct GrpcLoadArgs {
    /// Where to call (h2c): a gRPC server, or a gateway in front of one.
    #[arg(long)]
    target: String,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the calls share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = duration)]
    duration: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    tessera_core::parse_duration(s).map_err(|e| e.to_string())
}

/// An empty `HealthCheckRequest` in gRPC's framing: not compressed, length 0.
const CHECK: &[u8] = &[0, 0, 0, 0, 0];

pub async fn run(args: GrpcLoadArgs) -> Result<(), String> {
    if args.concurrency == 0 || args.connections == 0 {
        return Err("--concurrency and --connections must be at least 1".into());
    }
    let mut senders = Vec::new();
    for _ in 0..args.connections {
        let tcp = tokio::net::TcpStream::connect(&args.target)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.target))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP/2 handshake with {}: {e}", args.target))?;
        tokio::spawn(conn);
        senders.push(send);
    }
    let uri: http::Uri = format!("http://{}/grpc.health.v1.Health/Check", args.target)
        .parse()
        .map_err(|e| format!("--target: {e}"))?;
    let started = Instant::now();
    let end = started + args.duration;
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..args.concurrency {
        let mut send = senders[i % senders.len()].clone();
        let uri = uri.clone();
        workers.spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < end {
                let req = http::Request::post(uri.clone())
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(Bytes::from_static(CHECK)));
                let Ok(req) = req else { break };
                let t = Instant::now();
                if call(&mut send, req).await {
                    latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        });
    }
    let (mut all, mut errors) = (Vec::new(), 0u64);
    while let Some(done) = workers.join_next().await {
        let (l, e) = done.map_err(|e| e.to_string())?;
        all.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |us| f64::from(*us) / 1000.0)
    };
    println!(
        "{}",
        serde_json::json!({
            "calls": all.len(),
            "errors": errors,
            "seconds": secs,
            "rps": all.len() as f64 / secs,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
        })
    );
    Ok(())
}

/// One call; `true` when it ended with grpc-status 0.
async fn call(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> bool {
    let Ok(resp) = send.send_request(req).await else {
        return false;
    };
    if resp.status() != http::StatusCode::OK {
        return false;
    }
    let head_ok = resp.headers().get("grpc-status").map(|v| v == "0");
    let Ok(body) = resp.into_body().collect().await else {
        return false;
    };
    match head_ok {
        Some(ok) => ok,
        None => body
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .is_some_and(|v| v == "0"),
    }
}
