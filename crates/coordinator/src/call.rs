//! Calls to participants, shared by sagas and TCC: registry services resolved to their
//! healthy instances and balanced with P2C over peak-EWMA latency (the same balancer as
//! the gateway), an error-rate circuit breaker per participant (the gateway's too), a
//! timeout per call, and each outcome classified by whether the call may have taken
//! effect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tessera_balance::{Balancer, Endpoint, EndpointSet, Policy};
use tessera_resilience::{BreakerConfig, CircuitBreaker};

use crate::def::CallDef;
use crate::saga::{Attempt, now_ms};

/// Where registry services are found: their healthy instances as (`host:port`, weight).
pub trait Resolve: Send + Sync + 'static {
    fn healthy(&self, service: &str) -> Vec<(String, u32)>;
}

/// Largest participant response body read (the rest is dropped with the connection).
const MAX_RESPONSE: usize = 64 * 1024;

/// How one call ended.
pub enum Outcome {
    Ok,
    /// The request never left, or the participant answered "not now" (408, 425, 429):
    /// the action did not take effect and trying again may work.
    NotApplied,
    /// The participant answered and refused (any other status below 500, such as 402 or
    /// 409): the action did not take effect and retrying it would be refused again.
    Refused,
    /// Timeout, reset or 5xx: it may have taken effect.
    Unknown,
    /// Not sent: the participant's breaker is open for this long yet.
    Rejected(Duration),
}

pub struct Caller {
    client: Client<HttpConnector, Full<Bytes>>,
    resolver: Option<Arc<dyn Resolve>>,
    balancer: Balancer,
    /// Per service: the endpoint set calls are balanced over, rebuilt when the registry's
    /// answer changes (keeping each endpoint's load and latency).
    sets: Mutex<HashMap<String, Arc<EndpointSet>>>,
    /// Per service (or URL): an error-rate breaker, so a participant that keeps failing
    /// is given a rest instead of every saga's retries.
    breakers: Mutex<HashMap<String, CircuitBreaker>>,
    /// Per participant (its service, or `url` for calls by URL): outcomes and latency.
    pub(crate) stats: tessera_metrics::Family<CallStats>,
}

/// How a participant's calls ended, and how long each took (the step latency).
#[derive(Default)]
pub(crate) struct CallStats {
    pub(crate) ok: AtomicU64,
    /// Answered no (a 4xx): the action did not take effect.
    pub(crate) refused: AtomicU64,
    /// Not applied, timed out, reset or 5xx.
    pub(crate) failed: AtomicU64,
    /// Not sent: the participant's breaker was open.
    pub(crate) rejected: AtomicU64,
    pub(crate) duration: tessera_metrics::Histogram,
}

impl Caller {
    pub fn new(resolver: Option<Arc<dyn Resolve>>) -> Arc<Caller> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        Arc::new(Caller {
            client: Client::builder(TokioExecutor::new()).build(http),
            resolver,
            balancer: Balancer::new(Policy::P2cPeakEwma),
            sets: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            stats: tessera_metrics::Family::new(&["participant"]),
        })
    }

    /// One call to a participant: `key` is its `Idempotency-Key`, `tx` the saga or
    /// transaction it belongs to, `traceparent` the span the participant continues.
    pub async fn call(
        &self,
        key: &str,
        tx: &str,
        timeout: Duration,
        call: &CallDef,
        traceparent: Option<&str>,
    ) -> (Outcome, Attempt) {
        let at_ms = now_ms();
        let started = Instant::now();
        let target = call
            .service
            .as_deref()
            .or(call.url.as_deref())
            .unwrap_or_default();
        let stats = self.stats.get(&[call.service.as_deref().unwrap_or("url")]);
        let breaker = self.breaker(target);
        let permit = match breaker.try_acquire() {
            Ok(p) => p,
            Err(open) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                return (
                    Outcome::Rejected(open.retry_after),
                    Attempt {
                        at_ms,
                        duration_ms: 0,
                        outcome: format!("circuit breaker open for {target}"),
                        ok: false,
                    },
                );
            }
        };
        // A refused connection means the request never left: another instance of the
        // service is tried at once (an instance killed a moment ago is still listed as
        // passing until its health check notices).
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<(Outcome, String)> = None;
        let (outcome, text) = loop {
            let (base, load) = match self.target(call, &tried) {
                Ok(t) => t,
                Err(why) => break last.unwrap_or((Outcome::NotApplied, why)),
            };
            let in_flight = load.as_ref().map(|l| l.start());
            let r =
                tokio::time::timeout(timeout, self.send(&base, call, key, tx, traceparent)).await;
            let r = match r {
                Ok(r) => r,
                Err(_) => (
                    Outcome::Unknown,
                    format!("timeout after {}", tessera_core::GoDuration(timeout)),
                ),
            };
            let refused = matches!(r.0, Outcome::NotApplied) && r.1.starts_with("connect:");
            match (in_flight, &r.0) {
                (Some(f), Outcome::Ok | Outcome::Refused) => f.finish(),
                (Some(f), Outcome::NotApplied) if !refused => f.finish(),
                (Some(f), _) => {
                    // Failed: the balancer sees this instance as slow for a while.
                    if let Some(l) = &load {
                        l.observe(Duration::from_secs(1));
                    }
                    drop(f);
                }
                (None, _) => {}
            }
            if refused && load.is_some() && tried.len() < 3 {
                tried.push(base.trim_start_matches("http://").to_owned());
                last = Some(r);
                continue;
            }
            break r;
        };
        let ok = matches!(outcome, Outcome::Ok);
        // A participant that answers (even "no", a 4xx) is healthy; timeouts, resets,
        // refused connections and 5xx count against its breaker.
        let answered = text.parse::<u16>().is_ok_and(|s| s < 500);
        if ok || answered {
            permit.success();
        } else {
            permit.failure();
        }
        let counter = match outcome {
            Outcome::Ok => &stats.ok,
            Outcome::Refused => &stats.refused,
            _ => &stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        stats.duration.observe(started.elapsed());
        (
            outcome,
            Attempt {
                at_ms,
                duration_ms: started.elapsed().as_millis() as u64,
                outcome: text,
                ok,
            },
        )
    }

    fn breaker(&self, target: &str) -> CircuitBreaker {
        let mut b = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        b.entry(target.to_owned())
            .or_insert_with(|| CircuitBreaker::new(BreakerConfig::default()))
            .clone()
    }

    /// The base URL for a call, and the picked endpoint's load for a registry service
    /// (never one of the `tried` addresses).
    fn target(
        &self,
        call: &CallDef,
        tried: &[String],
    ) -> Result<(String, Option<Arc<tessera_balance::Load>>), String> {
        if let Some(url) = &call.url {
            return Ok((url.trim_end_matches('/').to_owned(), None));
        }
        let service = call.service.as_deref().unwrap_or_default();
        let Some(resolver) = &self.resolver else {
            return Err(format!("no registry to resolve service {service}"));
        };
        let healthy = resolver.healthy(service);
        if healthy.is_empty() {
            return Err(format!("no healthy instance of service {service}"));
        }
        let set = {
            let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
            let same = sets.get(service).is_some_and(|s| {
                s.endpoints.len() == healthy.len()
                    && s.endpoints
                        .iter()
                        .zip(&healthy)
                        .all(|(e, (a, w))| &e.addr == a && e.weight == (*w).max(1))
            });
            if !same {
                let endpoints: Vec<Endpoint> =
                    healthy.iter().map(|(a, w)| Endpoint::new(a, *w)).collect();
                let set = match sets.get(service) {
                    Some(old) => EndpointSet::inherit(endpoints, old),
                    None => EndpointSet::new(endpoints),
                };
                sets.insert(service.to_owned(), Arc::new(set));
            }
            sets.get(service).cloned()
        };
        let set = set.ok_or_else(|| format!("no healthy instance of service {service}"))?;
        // Never back to a tried instance: the caller's retries are for refused connections.
        let idx = match self.balancer.pick_try(&set, |_| false, tried, 0, None) {
            Some(pick) if !pick.again => pick.idx,
            _ => return Err(format!("no other healthy instance of service {service}")),
        };
        let e = &set.endpoints[idx];
        Ok((format!("http://{}", e.addr), Some(e.load.clone())))
    }

    async fn send(
        &self,
        base: &str,
        call: &CallDef,
        key: &str,
        tx: &str,
        traceparent: Option<&str>,
    ) -> (Outcome, String) {
        let mut req = http::Request::builder()
            .method(call.method.as_str())
            .uri(format!("{base}{}", call.path))
            .header("idempotency-key", key)
            .header("x-tessera-transaction", tx);
        for (k, v) in &call.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(t) = traceparent {
            req = req.header(tessera_trace::http::TRACEPARENT, t);
        }
        let body = match &call.body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b).unwrap_or_default())
            }
            None => Bytes::new(),
        };
        let req = match req.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return (Outcome::NotApplied, format!("bad request: {e}")),
        };
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return (
                    Outcome::NotApplied,
                    format!("connect: {}", tessera_core::error_chain(&e)),
                );
            }
            Err(e) => return (Outcome::Unknown, tessera_core::error_chain(&e)),
        };
        let status = resp.status().as_u16();
        // Read the answer so the connection can be reused; its content is not needed.
        let _ = Limited::new(resp.into_body(), MAX_RESPONSE).collect().await;
        let outcome = if call.is_success(status) {
            Outcome::Ok
        } else if status >= 500 {
            Outcome::Unknown
        } else if matches!(status, 408 | 425 | 429) {
            Outcome::NotApplied
        } else {
            Outcome::Refused
        };
        (outcome, status.to_string())
    }
}
