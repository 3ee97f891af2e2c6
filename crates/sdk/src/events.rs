//! Consuming the event store in `tessera server`: a subscription (server-sent events,
//! catch-up then live) that reconnects by itself from the last event it delivered, and
//! durable consumer-group offsets.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::http::Error;
use crate::registry::{Registry, encode};

/// One event as a subscription delivers it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The SSE id: the event's version in a single stream, or its global position in a
    /// category (`order-*`) or `*` feed; what a consumer acknowledges.
    pub id: i64,
    /// The stored event: `stream`, `id`, `type`, `data`, `metadata`, ...
    pub body: Value,
}

impl Event {
    /// The event's own id (the one the producer chose; inboxes deduplicate by it).
    pub fn event_id(&self) -> &str {
        self.body["id"].as_str().unwrap_or_default()
    }

    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or_default()
    }

    pub fn stream(&self) -> &str {
        self.body["stream"].as_str().unwrap_or_default()
    }

    pub fn data(&self) -> &Value {
        &self.body["data"]
    }

    /// The trace its producer was in (`metadata.traceparent`), for a consumer span that
    /// continues it (`tessera::trace::consume`).
    pub fn traceparent(&self) -> Option<&str> {
        self.body["metadata"]["traceparent"].as_str()
    }
}

/// The event store's API, on the registry's address.
#[derive(Clone)]
pub struct Events {
    registry: Registry,
}

/// A live subscription; dropping it ends it.
pub struct Subscription {
    rx: mpsc::Receiver<Event>,
    stop: CancellationToken,
}

impl Subscription {
    /// The next event; `None` only after the subscription was closed.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Events {
    pub fn new(registry: &Registry) -> Events {
        Events {
            registry: registry.clone(),
        }
    }

    /// Subscribes to `stream` (a stream, a category `name-*`, or `*`), starting after
    /// `group`'s acknowledged offset (or from the beginning). Connection failures are
    /// retried with backoff, resuming after the last event delivered.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), tessera::Error> {
    /// let events = tessera::Events::new(&tessera::Registry::new("127.0.0.1:8500"));
    /// let mut sub = events.subscribe("order-*", "cart");
    /// while let Some(e) = sub.next().await {
    ///     println!("{} {}", e.kind(), e.data());
    ///     events.ack("order-*", "cart", e.id).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn subscribe(&self, stream: &str, group: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        tokio::spawn(pump(
            self.registry.clone(),
            stream.to_owned(),
            group.to_owned(),
            tx,
            stop.clone(),
        ));
        Subscription { rx, stop }
    }

    /// Moves `group`'s durable offset on `stream` forward to `id`.
    pub async fn ack(&self, stream: &str, group: &str, id: i64) -> Result<(), Error> {
        let path = format!("/v1/streams/{}/groups/{}", encode(stream), encode(group));
        self.registry
            .call(
                http::Method::PUT,
                &path,
                Some(&serde_json::json!({ "acked": id })),
                &[],
            )
            .await?
            .error_for_status()
            .map(drop)
    }
}

async fn pump(
    registry: Registry,
    stream: String,
    group: String,
    tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    let mut last: Option<i64> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            r = read(&registry, &stream, &group, &mut last, &tx) => r,
        };
        match outcome {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(%stream, %group, error = %e, "subscription interrupted; reconnecting");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection: reads SSE frames until the server ends the response or fails.
async fn read(
    registry: &Registry,
    stream: &str,
    group: &str,
    last: &mut Option<i64>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), String> {
    let mut req = http::Request::get(format!(
        "http://{}/v1/streams/{}/subscribe?group={}",
        registry.address(),
        encode(stream),
        encode(group)
    ));
    if let Some(id) = last {
        req = req.header("last-event-id", id.to_string());
    }
    if let Some(t) = registry.token() {
        req = req.header("x-consul-token", t);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = registry
        .http()
        .request(req)
        .await
        .map_err(|e| tessera_core::error_chain(&e))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        return Err(format!(
            "event store answered {status}: {}",
            body.map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        ));
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let (mut id, mut data): (Option<i64>, String) = (None, String::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Some(chunk) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                // End of one event.
                if let Some(n) = id.take() {
                    let body = serde_json::from_str(&data).unwrap_or(Value::Null);
                    *last = Some(n);
                    if tx.send(Event { id: n, body }).await.is_err() {
                        return Ok(());
                    }
                }
                data.clear();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
            // Comments (`:` keep-alives) and other fields are ignored.
        }
    }
    Err("the event store closed the subscription".into())
}
