//! OTLP/HTTP export: spans queue in a bounded channel and a background task posts them in
//! batches. A request never waits on the collector: when the queue is full the span is
//! dropped and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::otlp::{Resource, encode};
use crate::span::Span;

/// Where spans go and how they are batched, from OpenTelemetry's variables.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The full URL spans are posted to (`…/v1/traces`).
    pub endpoint: http::Uri,
    pub resource: Resource,
    /// `OTEL_BSP_SCHEDULE_DELAY`: the longest a span waits for its batch (default 5 s).
    pub delay: Duration,
    /// `OTEL_BSP_MAX_QUEUE_SIZE` (2048).
    pub queue: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512).
    pub batch: usize,
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT` (10 s).
    pub timeout: Duration,
}

impl Config {
    /// Spans of `service` to `endpoint` (the full URL, `…/v1/traces`), batched with the
    /// specification's defaults.
    pub fn new(endpoint: http::Uri, service: &str) -> Config {
        Config {
            endpoint,
            resource: Resource {
                attributes: vec![("service.name".into(), service.into())],
            },
            delay: Duration::from_secs(5),
            queue: 2048,
            batch: 512,
            timeout: Duration::from_secs(10),
        }
    }

    /// `None` when no endpoint is set (nothing is recorded then) or the SDK is disabled.
    /// `service` names the process when `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
    /// do not.
    pub fn from_env(service: &str) -> Result<Option<Config>, String> {
        Config::from_vars(|k| std::env::var(k).ok(), service)
    }

    pub fn from_vars(
        get: impl Fn(&str) -> Option<String>,
        service: &str,
    ) -> Result<Option<Config>, String> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let url = match (
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(traces), _) => traces.trim().to_owned(),
            // The general endpoint is a base: the signal's path is added to it.
            (None, Some(base)) => format!("{}/v1/traces", base.trim().trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        if let Some(p) =
            get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"))
            && p.trim() != "http/protobuf"
        {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={p:?}: spans are exported as http/protobuf only"
            ));
        }
        let endpoint: http::Uri = url
            .parse()
            .map_err(|e| format!("the OTLP endpoint {url:?} is not a URL: {e}"))?;
        match endpoint.scheme_str() {
            Some("http") => {}
            _ => {
                return Err(format!(
                    "the OTLP endpoint {url:?} must be an http:// URL (https is not supported yet)"
                ));
            }
        }
        let mut attributes = resource_attributes(get("OTEL_RESOURCE_ATTRIBUTES").as_deref())?;
        let name = get("OTEL_SERVICE_NAME")
            .map(|n| n.trim().to_owned())
            .or_else(|| {
                let i = attributes.iter().position(|(k, _)| k == "service.name")?;
                Some(attributes.remove(i).1)
            })
            .unwrap_or_else(|| service.to_owned());
        attributes.retain(|(k, _)| k != "service.name");
        attributes.insert(0, ("service.name".into(), name));
        attributes.push(("telemetry.sdk.name".into(), "tessera".into()));
        attributes.push(("telemetry.sdk.language".into(), "rust".into()));
        let millis = |k: &str, default: u64| -> Result<Duration, String> {
            match get(k) {
                None => Ok(Duration::from_millis(default)),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("{k}={v:?} is not a number of milliseconds")),
            }
        };
        let count = |k: &str, default: usize| -> Result<usize, String> {
            match get(k) {
                None => Ok(default),
                Some(v) => match v.trim().parse() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{k}={v:?} is not a positive number")),
                },
            }
        };
        let timeout = match get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
            Some(_) => millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 10_000)?,
            None => millis("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)?,
        };
        let queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?;
        Ok(Some(Config {
            endpoint,
            resource: Resource { attributes },
            delay: millis("OTEL_BSP_SCHEDULE_DELAY", 5_000)?,
            queue,
            batch: count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.min(queue),
            timeout,
        }))
    }
}

/// `key=value,key=value`, values percent-encoded (W3C Baggage's format, as the
/// specification says).
fn resource_attributes(v: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(v) = v else { return Ok(Vec::new()) };
    v.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, val) = pair
                .split_once('=')
                .ok_or_else(|| format!("OTEL_RESOURCE_ATTRIBUTES: {pair:?} is not key=value"))?;
            let val = percent_decode(val.trim()).ok_or_else(|| {
                format!("OTEL_RESOURCE_ATTRIBUTES: {val:?} is not percent-encoded UTF-8")
            })?;
            Ok((k.trim().to_owned(), val))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Spans exported and dropped (queue full, or the collector failed), for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
}

/// The queue's sending end; clones share the queue.
#[derive(Clone, Debug)]
pub struct Exporter {
    tx: mpsc::Sender<Span>,
    /// Asks the batch task to post what it holds now; it answers when done.
    flush: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    stats: Arc<Stats>,
}

impl Exporter {
    /// Starts the batch task on the current Tokio runtime; it ends when every clone is
    /// dropped, after posting what is queued.
    pub fn start(config: Config) -> Exporter {
        let (tx, rx) = mpsc::channel(config.queue);
        let (flush, flushes) = mpsc::channel(8);
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(config, rx, flushes, stats.clone()));
        Exporter { tx, flush, stats }
    }

    /// Posts every span queued so far, waiting at most `limit`: a process that stops calls
    /// it last, so the spans of its final requests are not lost with it.
    pub async fn flush(&self, limit: std::time::Duration) {
        let (done, answer) = tokio::sync::oneshot::channel();
        let asked = async {
            if self.flush.send(done).await.is_ok() {
                let _ = answer.await;
            }
        };
        let _ = tokio::time::timeout(limit, asked).await;
    }

    /// Queues a finished span; never waits.
    pub fn record(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

async fn run(
    config: Config,
    mut rx: mpsc::Receiver<Span>,
    mut flushes: mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    stats: Arc<Stats>,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut failing = false;
    let mut batch = Vec::with_capacity(config.batch);
    let mut asked: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    loop {
        // Wait for a span, or for a flush (answered at once when nothing is queued).
        let first = tokio::select! {
            s = rx.recv() => s,
            Some(done) = flushes.recv() => {
                match rx.try_recv() {
                    Ok(s) => {
                        asked.push(done);
                        Some(s)
                    }
                    Err(_) => {
                        let _ = done.send(());
                        continue;
                    }
                }
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        let flush_at = tokio::time::Instant::now() + config.delay;
        while batch.len() < config.batch {
            // A flush takes what is queued now and posts it without waiting out the delay.
            if !asked.is_empty() {
                match rx.try_recv() {
                    Ok(s) => {
                        batch.push(s);
                        continue;
                    }
                    Err(_) => break,
                }
            }
            tokio::select! {
                next = rx.recv() => match next {
                    Some(s) => batch.push(s),
                    None => break,
                },
                Some(done) = flushes.recv() => asked.push(done),
                _ = tokio::time::sleep_until(flush_at) => break,
            }
        }
        let n = batch.len() as u64;
        let body = encode(&config.resource, &batch);
        batch.clear();
        match post(&client, &config, body).await {
            Ok(()) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                if std::mem::take(&mut failing) {
                    tracing::info!(endpoint = %config.endpoint, "exporting spans again");
                }
            }
            Err(e) => {
                stats.dropped.fetch_add(n, Ordering::Relaxed);
                // Once per outage, not once per batch.
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(endpoint = %config.endpoint, "cannot export spans: {e}");
                }
            }
        }
        // A flush is answered once what was queued when it came is posted.
        if !asked.is_empty() && rx.is_empty() {
            for done in asked.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    config: &Config,
    body: Vec<u8>,
) -> Result<(), String> {
    let req = http::Request::post(config.endpoint.clone())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read to the end, so the connection goes back to the pool.
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    };
    tokio::time::timeout(config.timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", config.timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn endpoints_and_names_the_way_opentelemetry_reads_them() {
        assert_eq!(Config::from_vars(vars(&[]), "gw").unwrap(), None);
        let c = Config::from_vars(
            vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://col:4318/")]),
            "gw",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://col:4318/v1/traces");
        assert_eq!(
            c.resource.attributes[0],
            ("service.name".into(), "gw".into())
        );
        assert_eq!(
            (c.delay, c.queue, c.batch),
            (Duration::from_secs(5), 2048, 512)
        );
        let c = Config::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://col:4318/custom",
                ),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "service.name=shop,deployment.environment=a%20b",
                ),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ]),
            "gw",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://col:4318/custom");
        assert_eq!(
            c.resource.attributes[0],
            ("service.name".into(), "shop".into())
        );
        assert!(
            c.resource
                .attributes
                .contains(&("deployment.environment".into(), "a b".into()))
        );
        assert_eq!(c.delay, Duration::from_millis(100));
        let c = Config::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://col:4318"),
                ("OTEL_SERVICE_NAME", "cart"),
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=shop"),
            ]),
            "gw",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            c.resource.attributes[0],
            ("service.name".into(), "cart".into())
        );
        assert_eq!(
            c.resource
                .attributes
                .iter()
                .filter(|(k, _)| k == "service.name")
                .count(),
            1
        );
        let off = vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:1"),
            ("OTEL_SDK_DISABLED", "true"),
        ]);
        assert_eq!(Config::from_vars(off, "gw").unwrap(), None);
    }

    #[test]
    fn bad_settings_are_named() {
        let err = |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs), "gw").unwrap_err();
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert!(err(&[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).contains("grpc"));
        assert!(err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]).contains("https"));
        assert!(err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")]).contains("not a url"));
        assert!(err(&[base, ("OTEL_RESOURCE_ATTRIBUTES", "novalue")]).contains("novalue"));
        assert!(err(&[base, ("OTEL_RESOURCE_ATTRIBUTES", "k=%zz")]).contains("%zz"));
        assert!(err(&[base, ("OTEL_BSP_SCHEDULE_DELAY", "soon")]).contains("soon"));
        assert!(err(&[base, ("OTEL_BSP_MAX_QUEUE_SIZE", "0")]).contains("QUEUE"));
    }
}
