//! `tessera gateway`: load the TOML config (refusing to start on any error), bind, serve.

use std::net::SocketAddr;
use std::path::PathBuf;

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
}

pub async fn run(args: GatewayArgs) -> Result<(), String> {
    let mut config = Config::load(&args.config).map_err(|e| e.to_string())?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(a) = args.admin {
        config.admin = a;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|e| format!("cannot listen on {} (admin): {e}", config.admin))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let gateway = Gateway::build(config, Some(args.config.clone()));
    println!(
        "tessera gateway listening on http://{addr} (admin http://{admin_addr}, config {})",
        args.config.display()
    );
    gateway
        .run(listener, admin, crate::server::shutdown_signal())
        .await;
    println!("tessera gateway stopped");
    Ok(())
}
