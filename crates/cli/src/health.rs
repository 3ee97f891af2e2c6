//! `tessera health`: exits 0 when a Tessera process says it is ready, non-zero with the
//! reason otherwise. Images carry no curl: this is their `HEALTHCHECK` and the helper a
//! probe or a script runs (`tessera health --url http://127.0.0.1:8081/readyz`).

use std::time::Duration;

use bytes::Bytes;

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// What to ask: a gateway's admin `/readyz` (the default), a server's
    /// `/v1/status/leader`, a service's `/health`. Plain `http://` only.
    #[arg(long, default_value = "http://127.0.0.1:8081/readyz")]
    url: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = crate::load::parse_duration)]
    timeout: Duration,
}

pub async fn run(args: HealthArgs) -> Result<(), String> {
    if !args.url.starts_with("http://") {
        return Err(format!(
            "--url {:?}: give a plain http:// URL (health endpoints are on local plain ports)",
            args.url
        ));
    }
    let http = crate::http::Http::new();
    let answer = tokio::time::timeout(args.timeout, http.raw("GET", &args.url, &[], Bytes::new()))
        .await
        .map_err(|_| {
            format!(
                "{}: no answer within {}",
                args.url,
                tessera_core::GoDuration(args.timeout)
            )
        })??;
    let (status, body) = answer;
    // Tessera's error bodies are `{"error": ...}`; anything else, its first line.
    let text = String::from_utf8_lossy(&body);
    let said = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if v["error"].is_string() => v["error"].as_str().unwrap_or_default().to_owned(),
        _ => text.lines().next().unwrap_or_default().trim().to_owned(),
    };
    if (200..300).contains(&status) {
        println!("ready: {status} {said}");
        Ok(())
    } else {
        Err(format!("{}: not ready: {status} {said}", args.url))
    }
}
