//! The `tessera` binary. Run with: `cargo run --release -- demo`.

mod alloc;
mod client;
mod demo;
mod gateway;
mod grpc_load;
mod health;
mod http;
mod load;
mod log;
mod server;
mod upstream;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = client::Cli::parse();
    log::init(cli.log_format);
    tokio::spawn(alloc::purge_forever());
    match cli.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A collector reading JSON lines gets the reason as one of them.
            match log::format() {
                log::LogFormat::Json => tracing::error!("{e}"),
                log::LogFormat::Text => eprintln!("error: {e}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
