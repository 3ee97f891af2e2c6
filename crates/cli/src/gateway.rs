//! `tessera gateway`: load the TOML config (refusing to start on any error), bind, serve.

use std::net::SocketAddr;
use std::path::PathBuf;

use tessera_gateway::config::Workers;
use tessera_gateway::{Config, Gateway};

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Gateway config (TOML). Reloaded on change, on SIGHUP and on POST /admin/reload.
    #[arg(long)]
    config: PathBuf,
    /// Override `listen` from the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `admin` from the config.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Override `tls.listen` from the config.
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// Override `workers` from the config: `auto` (one per core) or a number.
    #[arg(long)]
    workers: Option<Workers>,
}

pub async fn run(args: GatewayArgs) -> Result<(), String> {
    let mut config = Config::load(&args.config).map_err(|e| e.to_string())?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(a) = args.admin {
        config.admin = a;
    }
    if let (Some(l), Some(tls)) = (args.tls_listen, config.tls.as_mut()) {
        tls.listen = l;
    }
    if let Some(w) = args.workers {
        config.workers = w;
    }
    let workers = config.workers.count();
    if workers > 1 {
        return run_workers(config, args.config, workers).await;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|e| format!("cannot listen on {} (admin): {e}", config.admin))?;
    let tls_listener = match &config.tls {
        Some(tls) => Some(
            std::net::TcpListener::bind(tls.listen)
                .map_err(|e| format!("cannot listen on {} (tls): {e}", tls.listen))?,
        ),
        None => None,
    };
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let tls_note = match &tls_listener {
        Some(l) => format!(
            " and https://{}",
            l.local_addr().map_err(|e| e.to_string())?
        ),
        None => String::new(),
    };
    println!(
        "tessera gateway listening on http://{addr}{tls_note} (admin http://{admin_addr}, config {})",
        args.config.display()
    );
    // The data path runs on one single-threaded runtime, like an nginx worker: no
    // cross-thread wake-ups between the client connection, the upstream connection and
    // the pool (they cost more than the proxying itself on a small box).
    let path = args.config.clone();
    let listener = listener.into_std().map_err(|e| e.to_string())?;
    let admin = admin.into_std().map_err(|e| e.to_string())?;
    let worker = std::thread::Builder::new()
        .name("gateway".into())
        .spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the gateway runtime: {e}"))?;
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                let admin = tokio::net::TcpListener::from_std(admin).map_err(|e| e.to_string())?;
                let tracer = tessera_trace::Tracer::from_env("tessera-gateway")?;
                let mut gateway = traced(
                    Gateway::build(config, Some(path)).map_err(|e| e.to_string())?,
                    &tracer,
                );
                if let Some(l) = tls_listener {
                    l.set_nonblocking(true).map_err(|e| e.to_string())?;
                    let l = tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string())?;
                    gateway = gateway.with_tls_listener(l).map_err(|e| e.to_string())?;
                }
                gateway
                    .run(listener, admin, crate::server::shutdown_signal())
                    .await;
                tessera_trace::Tracer::flush_at_exit(tracer.as_ref()).await;
                Ok(())
            })
        })
        .map_err(|e| format!("cannot start the gateway thread: {e}"))?;
    tokio::task::spawn_blocking(move || worker.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the gateway thread panicked".to_string())??;
    println!("tessera gateway stopped");
    Ok(())
}

/// Several workers: each its own thread, runtime and listeners (`SO_REUSEPORT`), with
/// admin, reloads and discovery on this runtime.
async fn run_workers(config: Config, path: PathBuf, workers: usize) -> Result<(), String> {
    let tls_addr = config.tls.as_ref().map(|t| t.listen);
    let listeners = tessera_gateway::bind_workers(config.listen, tls_addr, workers)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|e| format!("cannot listen on {} (admin): {e}", config.admin))?;
    let addr = listeners[0].plain.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let tls_note = match listeners[0].tls.as_ref().map(|l| l.local_addr()) {
        Some(a) => format!(" and https://{}", a.map_err(|e| e.to_string())?),
        None => String::new(),
    };
    println!(
        "tessera gateway listening on http://{addr}{tls_note} (admin http://{admin_addr}, config {}, {workers} workers)",
        path.display()
    );
    let tracer = tessera_trace::Tracer::from_env("tessera-gateway")?;
    let gateway = traced(
        Gateway::build(config, Some(path)).map_err(|e| e.to_string())?,
        &tracer,
    );
    gateway
        .run_workers(listeners, admin, crate::server::shutdown_signal())
        .await
        .map_err(|e| format!("gateway worker: {e}"))?;
    tessera_trace::Tracer::flush_at_exit(tracer.as_ref()).await;
    println!("tessera gateway stopped");
    Ok(())
}

/// Spans go to the collector OpenTelemetry's variables name, when they name one.
fn traced(gateway: Gateway, tracer: &Option<tessera_trace::Tracer>) -> Gateway {
    match tracer {
        Some(t) => gateway.with_tracer(t.clone()),
        None => gateway,
    }
}
