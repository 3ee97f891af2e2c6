//! The `tessera` binary. Run with: `cargo run --release -- demo`.

mod alloc;
mod client;
mod demo;
mod gateway;
mod http;
mod load;
mod server;
mod upstream;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = client::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tokio::spawn(alloc::purge_forever());
    match cli.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
