//! The Consul blocking-query watch of one service's passing instances
//! (`GET /v1/health/service/NAME?passing&index=N&wait=Ws`): the one loop the gateway's
//! discovery and the SDK's `Registry::watch` both run. Each holds its own HTTP client, so
//! the loop asks through a `fetch` function and reports to an `on` function; what it owns
//! is the protocol: the index carried from answer to answer (and reset when the registry
//! restarts), the deadline past the server's wait, backoff with jitter (at least the
//! `Retry-After` a saturated registry names), and moving to the next server of a cluster.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tessera_core::consul::HealthEntry;
use tokio_util::sync::CancellationToken;

/// First pause after a failed query; it doubles per failure up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The registry servers a client knows, and the one it uses now: requests go there, and
/// move to the next when it cannot be reached. A blocking query keeps its index when it
/// moves, which holds across servers sharing one store (their indexes are the store's).
#[derive(Debug)]
pub struct Servers {
    list: Vec<String>,
    current: AtomicUsize,
}

impl Servers {
    /// `host:port`, or several separated by commas.
    pub fn parse(addresses: &str) -> Servers {
        let list: Vec<String> = addresses
            .split(',')
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        Servers {
            list: if list.is_empty() {
                vec![addresses.to_owned()]
            } else {
                list
            },
            current: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn current(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        &self.list[i % self.list.len()]
    }

    /// Moves on from `failed`, unless another request already has.
    pub fn failed(&self, failed: &str) {
        let n = self.list.len();
        let _ = self
            .current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| {
                (self.list[i % n] == failed).then_some((i + 1) % n)
            });
        if n > 1 {
            tracing::warn!(
                registry = failed,
                next = self.current(),
                "registry unreachable; moving to the next"
            );
        }
    }
}

/// What the registry answered to one query, as the caller's HTTP client read it.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub status: u16,
    /// `X-Consul-Index`.
    pub index: Option<u64>,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// What the watch tells its owner.
#[derive(Debug)]
pub enum Event {
    /// An answer: the passing instances that have a port, at `index` (at least 1).
    Answer {
        index: u64,
        entries: Vec<HealthEntry>,
    },
    /// The query failed; the last answer stands.
    Unreachable { error: String },
}

/// Runs blocking queries for `service` until `stop` is cancelled. `fetch` sends a GET to
/// the URL it is given (adding the token, when there is one) and reads the reply; `on`
/// hears every answer and failure.
pub async fn watch<F, Fut>(
    service: &str,
    servers: &Servers,
    wait: Duration,
    mut fetch: F,
    mut on: impl FnMut(Event),
    stop: CancellationToken,
) where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Reply, String>>,
{
    let wait_secs = wait.as_secs().max(1);
    // The server holds the query up to `wait` plus up to wait/16 of jitter (Consul's
    // rule); past that and a margin, the connection is taken for dead.
    let deadline = Duration::from_secs(wait_secs) * 17 / 16 + Duration::from_secs(10);
    let path = format!(
        "/v1/health/service/{}",
        tessera_core::consul::encode_segment(service)
    );
    let mut index = 0u64;
    let mut backoff = FIRST_BACKOFF;
    let mut failing = true;
    let mut answered = false;
    loop {
        let server = servers.current().to_owned();
        let url = format!("http://{server}{path}?passing&index={index}&wait={wait_secs}s");
        let reply = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(deadline, fetch(url)) => r,
        };
        let result = match reply {
            Err(_) => Err("discovery query timed out".to_owned()),
            Ok(Err(e)) => Err(e),
            Ok(Ok(r)) if !(200..300).contains(&r.status) => {
                if let Some(wait) = r.retry_after {
                    backoff = backoff.max(wait);
                }
                let body = String::from_utf8_lossy(&r.body);
                Err(format!("registry answered {}: {}", r.status, body.trim()))
            }
            Ok(Ok(r)) => serde_json::from_slice::<Vec<HealthEntry>>(&r.body)
                .map(|entries| (r.index.unwrap_or(1).max(1), entries))
                .map_err(|e| format!("bad registry JSON: {e}")),
        };
        match result {
            Ok((new_index, mut entries)) => {
                backoff = FIRST_BACKOFF;
                if failing && answered {
                    tracing::info!(%service, "registry reachable again");
                }
                failing = false;
                answered = true;
                // An index going backwards means the registry restarted: start over.
                index = if new_index < index { 0 } else { new_index };
                entries.retain(|e| e.service.port != 0);
                on(Event::Answer {
                    index: new_index,
                    entries,
                });
            }
            Err(error) => {
                // The next query goes to the next server, with the same index.
                servers.failed(&server);
                // Logged once per outage, and on every failure before the first answer.
                if !failing || !answered {
                    tracing::warn!(%service, %error,
                        "registry unreachable; keeping the last known instances");
                }
                failing = true;
                on(Event::Unreachable { error });
                let jitter =
                    Duration::from_millis(fastrand::u64(..=backoff.as_millis() as u64 / 2 + 1));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff + jitter) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    fn answer(index: u64, ports: &[u16]) -> Result<Reply, String> {
        let entries: Vec<serde_json::Value> = ports
            .iter()
            .map(|p| {
                serde_json::json!({
                    "Node": {"Node": "n", "Address": "127.0.0.1"},
                    "Service": {"ID": format!("s-{p}"), "Service": "s", "Address": "", "Port": p},
                })
            })
            .collect();
        Ok(Reply {
            status: 200,
            index: Some(index),
            retry_after: None,
            body: serde_json::to_vec(&entries).unwrap().into(),
        })
    }

    /// Runs the loop over scripted replies (then pending, as a blocking query with no
    /// change is) and returns the URLs it asked for, what it reported and when it last
    /// reported.
    async fn run(
        addresses: &str,
        replies: Vec<Result<Reply, String>>,
    ) -> (Vec<String>, Vec<String>, Duration) {
        let script = Arc::new(Mutex::new(VecDeque::from(replies)));
        let urls = Arc::new(Mutex::new(Vec::new()));
        let mut events = Vec::new();
        let servers = Servers::parse(addresses);
        let stop = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let fetch = |url: String| {
            urls.lock().unwrap().push(url);
            let next = script.lock().unwrap().pop_front();
            async move {
                match next {
                    Some(r) => r,
                    None => std::future::pending().await,
                }
            }
        };
        let mut last_event = Duration::ZERO;
        let on = |e: Event| {
            last_event = start.elapsed();
            events.push(match e {
                Event::Answer { index, entries } => format!(
                    "answer {index} {:?}",
                    entries.iter().map(|e| e.service.port).collect::<Vec<_>>()
                ),
                Event::Unreachable { .. } => "unreachable".to_owned(),
            })
        };
        let watching = watch(
            "s",
            &servers,
            Duration::from_secs(30),
            fetch,
            on,
            stop.clone(),
        );
        // Long enough for every backoff in the scripts, and shorter than a query's
        // deadline (41.9 s for a 30 s wait); the clock is paused.
        let _ = tokio::time::timeout(Duration::from_secs(30), watching).await;
        let urls = urls.lock().unwrap().clone();
        (urls, events, last_event)
    }

    #[tokio::test(start_paused = true)]
    async fn the_index_is_carried_and_reset_when_the_registry_restarts() {
        let (urls, events, _) = run(
            "r1:8500",
            vec![answer(7, &[80, 0]), answer(9, &[80, 81]), answer(3, &[80])],
        )
        .await;
        assert_eq!(
            events,
            ["answer 7 [80]", "answer 9 [80, 81]", "answer 3 [80]"],
            "a port-0 entry is left out"
        );
        let indexes: Vec<&str> = urls
            .iter()
            .map(|u| u.split("index=").nth(1).unwrap().split('&').next().unwrap())
            .collect();
        // After 3 < 9 the registry restarted: the next query starts over at 0.
        assert_eq!(indexes, ["0", "7", "9", "0"]);
        assert!(urls[0].starts_with("http://r1:8500/v1/health/service/s?passing&index=0&wait=30s"));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_move_to_the_next_server_and_back_off() {
        let saturated = Ok(Reply {
            status: 429,
            retry_after: Some(Duration::from_secs(3)),
            ..Reply::default()
        });
        let (urls, events, elapsed) = run(
            "r1:8500, r2:8500",
            vec![
                answer(5, &[80]),
                Err("connection refused".into()),
                saturated,
                Ok(Reply {
                    status: 200,
                    body: Bytes::from_static(b"not json"),
                    ..Reply::default()
                }),
                answer(6, &[81]),
            ],
        )
        .await;
        assert_eq!(
            events,
            [
                "answer 5 [80]",
                "unreachable",
                "unreachable",
                "unreachable",
                "answer 6 [81]"
            ]
        );
        let hosts: Vec<&str> = urls.iter().map(|u| &u[7..u.find("/v1").unwrap()]).collect();
        // Each failure moves to the next server; an answer keeps the one that gave it.
        assert_eq!(
            hosts,
            [
                "r1:8500", "r1:8500", "r2:8500", "r1:8500", "r2:8500", "r2:8500"
            ]
        );
        // Each failed query keeps the index of the last answer.
        assert!(urls[1..5].iter().all(|u| u.contains("index=5&")));
        assert!(urls[5].contains("index=6&"));
        // 0.1 s, then the 3 s the 429 named (not 0.2 s), then 5 s (doubled, capped at
        // MAX_BACKOFF), each plus a jitter of up to half of it (and 1 ms), before the
        // answer: 8.1 s to 8.1 + 0.051 + 1.501 + 2.501 s.
        let backoffs = elapsed;
        assert!(
            backoffs >= Duration::from_millis(8_100) && backoffs <= Duration::from_millis(12_153),
            "{backoffs:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_past_its_deadline_is_a_failure() {
        let servers = Servers::parse("r1:8500");
        let stop = CancellationToken::new();
        let mut events = Vec::new();
        let calls = std::cell::Cell::new(0);
        let fetch = |_url: String| {
            calls.set(calls.get() + 1);
            std::future::pending::<Result<Reply, String>>()
        };
        let watching = watch(
            "s",
            &servers,
            Duration::from_secs(16),
            fetch,
            |e| events.push(format!("{e:?}")),
            stop.clone(),
        );
        // 16 s of wait + 1 s of the server's jitter + 10 s of margin = 27 s.
        let _ = tokio::time::timeout(Duration::from_secs(28), watching).await;
        assert_eq!(calls.get(), 2);
        assert_eq!(events.len(), 1);
        assert!(events[0].contains("timed out"), "{events:?}");
    }
}
