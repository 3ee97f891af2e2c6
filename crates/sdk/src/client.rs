//! Service-to-service calls by service name, protected the way the gateway protects its
//! upstreams and with the same code: P2C over peak-EWMA latency (`tessera-balance`),
//! retries drawn from a budget (20% of calls + 10/s) so an outage is not multiplied by the
//! callers, a timeout per try and overall, and an error-rate circuit breaker
//! (`tessera-resilience`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::Full;
use tessera_balance::{Balancer, Endpoint, EndpointSet, Pick, Policy};
use tessera_resilience::{
    BreakerConfig, BudgetConfig, CircuitBreaker, Outlier, OutlierConfig, RetryBudget,
};

use crate::http::{Error, Http, Response, send};
use crate::metrics::{Live, ServiceStats};
use crate::registry::{Registry, Watch};
use tessera_trace::http::Outcome;

/// Below this percentage of instances healthy, ejection is ignored (Envoy's default).
const PANIC_THRESHOLD: u32 = 50;

/// How calls through a [`ServiceClient`] are retried and timed out.
#[derive(Debug, Clone)]
pub struct CallPolicy {
    /// Attempts per call, the first included.
    pub attempts: u32,
    /// Each attempt's limit.
    pub per_try_timeout: Duration,
    /// The whole call's limit, retries included.
    pub timeout: Duration,
}

impl Default for CallPolicy {
    fn default() -> Self {
        CallPolicy {
            attempts: 3,
            per_try_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
        }
    }
}

/// Calls one service by name, balanced over its healthy instances.
///
/// ```no_run
/// # async fn demo() -> Result<(), tessera::Error> {
/// let registry = tessera::Registry::new("127.0.0.1:8500");
/// let catalog = tessera::ServiceClient::new(&registry, "catalog");
/// let products: serde_json::Value = catalog
///     .get("/catalog/products")
///     .send()
///     .await?
///     .error_for_status()?
///     .json()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ServiceClient {
    inner: Arc<Inner>,
}

struct Inner {
    service: String,
    /// Keeps the discovery loop behind `watch` running.
    _registry: Registry,
    watch: Watch,
    http: Http,
    policy: CallPolicy,
    balancer: Balancer,
    /// The endpoint set for the latest discovery answer, rebuilt when it changes
    /// (keeping each endpoint's load, latency and outlier state).
    snapshot: Mutex<Arc<Snapshot>>,
    outlier: OutlierConfig,
    budget: RetryBudget,
    breaker: CircuitBreaker,
    stats: Arc<ServiceStats>,
}

impl Live for Inner {
    fn breaker(&self) -> tessera_resilience::State {
        self.breaker.state()
    }

    fn endpoints(&self) -> (usize, usize) {
        let snap = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let ejected = snap.outliers.iter().filter(|o| o.is_ejected()).count();
        (snap.set.len(), ejected)
    }
}

impl ServiceClient {
    pub fn new(registry: &Registry, service: &str) -> ServiceClient {
        ServiceClient::with_policy(registry, service, CallPolicy::default())
    }

    pub fn with_policy(registry: &Registry, service: &str, policy: CallPolicy) -> ServiceClient {
        let stats = registry.clients().service(service);
        let inner = Arc::new(Inner {
            service: service.to_owned(),
            _registry: registry.clone(),
            watch: registry.watch(service),
            http: registry.http().clone(),
            policy,
            balancer: Balancer::new(Policy::P2cPeakEwma),
            snapshot: Mutex::new(Arc::new(Snapshot {
                index: 0,
                set: EndpointSet::new(Vec::new()),
                outliers: Vec::new(),
            })),
            outlier: OutlierConfig::default(),
            budget: RetryBudget::new(BudgetConfig::default()),
            breaker: CircuitBreaker::new(BreakerConfig::default()),
            stats: stats.clone(),
        });
        let live: Arc<dyn Live> = inner.clone();
        stats.attach(Arc::downgrade(&live));
        ServiceClient { inner }
    }

    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The discovery view this client balances over.
    pub fn watch(&self) -> &Watch {
        &self.inner.watch
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            method,
            path: path.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            idempotent: None,
            error: None,
        }
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    pub fn put(&self, path: &str) -> RequestBuilder {
        self.request(Method::PUT, path)
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        let current = self.inner.watch.current();
        let mut snap = self
            .inner
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if snap.index != current.index || snap.set.len() != current.instances.len() {
            let endpoints: Vec<Endpoint> = current
                .instances
                .iter()
                .map(|i| Endpoint::new(i.authority(), i.weight))
                .collect();
            let set = EndpointSet::inherit(endpoints, &snap.set);
            let outliers = set
                .endpoints
                .iter()
                .map(|e| {
                    snap.set
                        .endpoints
                        .iter()
                        .position(|o| o.addr == e.addr)
                        .map_or_else(Arc::default, |i| snap.outliers[i].clone())
                })
                .collect();
            *snap = Arc::new(Snapshot {
                index: current.index,
                set,
                outliers,
            });
        }
        snap.clone()
    }
}

/// One kind of call the shared loop makes (an HTTP request, a gRPC call): how a try is
/// sent and how its result is judged. Everything else (discovery, balancing, the budget,
/// the breaker, outlier ejection, spans, metrics) is the loop's, once for both.
pub(crate) trait Exchange: Sync {
    type Answer: Send;

    fn method(&self) -> &Method;

    /// One try at the instance at `authority`, which has `timeout` left.
    fn send(
        &self,
        authority: &str,
        span: Option<&crate::trace::Try>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Answer, Error>> + Send;

    /// The HTTP status an answer counts as, in metrics and spans.
    fn status(answer: &Self::Answer) -> u16;

    fn judge(&self, result: &Result<Self::Answer, Error>) -> Verdict;

    /// Ends a try's client span (an HTTP span by default).
    fn end_span(
        &self,
        span: crate::trace::Try,
        endpoint: &str,
        attempt: u32,
        result: &Result<Self::Answer, Error>,
    ) {
        let outcome = match result {
            Ok(r) => Outcome::Answered(Self::status(r)),
            Err(e) => {
                let (kind, message) = no_answer(e);
                Outcome::Failed { kind, message }
            }
        };
        span.finish(self.method(), endpoint, attempt, outcome);
    }
}

/// A try that got no answer, for its span: a low-cardinality `error.type` and the message.
pub(crate) fn no_answer(e: &Error) -> (&'static str, String) {
    let kind = match e {
        Error::Timeout(..) => "timeout",
        Error::Transport { connect: true, .. } => "connect",
        _ => "io",
    };
    (kind, e.to_string())
}

/// What one try says: `failed` counts against the instance (outlier ejection) and the
/// call (breaker); `retry` allows another try, budget permitting.
pub(crate) struct Verdict {
    pub failed: bool,
    pub retry: bool,
}

impl ServiceClient {
    /// Runs `x` within `timeout`, retries included.
    pub(crate) async fn call<X: Exchange>(
        &self,
        x: &X,
        timeout: Duration,
    ) -> Result<X::Answer, Error> {
        let inner = &self.inner;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let result = match tokio::time::timeout_at(deadline, self.tries(x, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(
                inner.service.clone(),
                tessera_core::GoDuration(timeout),
            )),
        };
        match &result {
            Ok(r) => inner.stats.calls.record(X::status(r), started.elapsed()),
            Err(_) => inner.stats.calls.record_error(started.elapsed()),
        }
        result
    }

    async fn tries<X: Exchange>(
        &self,
        x: &X,
        deadline: tokio::time::Instant,
    ) -> Result<X::Answer, Error> {
        let inner = &self.inner;
        // A client made a moment ago has no discovery answer yet: wait for the first
        // one rather than failing with "no healthy instance".
        if inner.watch.current().index == 0 {
            inner.watch.ready(inner.policy.per_try_timeout).await;
        }
        inner.budget.deposit();
        // The breaker judges calls as the caller sees them (after retries): one bad
        // instance that retries route around does not open it for the whole service.
        let permit = inner.breaker.try_acquire().map_err(|_| {
            inner
                .stats
                .breaker_rejections
                .fetch_add(1, Ordering::Relaxed);
            Error::BreakerOpen(inner.service.clone())
        })?;
        let mut tried: Vec<String> = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= inner.policy.attempts.max(1);
            let snap = self.snapshot();
            let set = &snap.set;
            let is_ejected = |i: usize| snap.outliers[i].is_ejected();
            let Pick { idx, ejected, .. } = inner
                .balancer
                .pick_try(set, is_ejected, &tried, PANIC_THRESHOLD, None)
                .ok_or_else(|| Error::NoInstance(inner.service.clone()))?;
            let endpoint = &set.endpoints[idx];
            let outlier = &snap.outliers[idx];
            // Inside a recorded request, each try is a client span and the callee's parent.
            let span = crate::trace::Try::begin();
            let per_try = inner
                .policy
                .per_try_timeout
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let started = Instant::now();
            let in_flight = endpoint.load.start();
            let result =
                match tokio::time::timeout(per_try, x.send(&endpoint.addr, span.as_ref(), per_try))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout(
                        inner.service.clone(),
                        tessera_core::GoDuration(per_try),
                    )),
                };
            if let Some(span) = span {
                x.end_span(span, &endpoint.addr, attempt - 1, &result);
            }
            tried.push(endpoint.addr.clone());
            let Verdict { failed, retry } = x.judge(&result);
            if failed {
                if outlier
                    .failure(&inner.outlier, ejected, set.len())
                    .is_some()
                {
                    inner.stats.ejections.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(service = %inner.service, endpoint = %endpoint.addr,
                        "instance ejected after consecutive failures");
                }
            } else {
                outlier.success();
            }
            if result.is_ok() {
                in_flight.finish();
            } else {
                // A failed endpoint looks slow to the balancer for a while.
                endpoint
                    .load
                    .observe(started.elapsed().max(Duration::from_secs(1)));
                drop(in_flight);
            }
            let refused = retry && !last && !inner.budget.try_withdraw();
            if refused {
                inner.stats.budget_exhausted.fetch_add(1, Ordering::Relaxed);
            }
            if !retry || last || refused {
                if failed {
                    permit.failure();
                } else {
                    permit.success();
                }
                return result;
            }
            inner.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(service = %inner.service, attempt, "retrying");
        }
    }
}

struct Snapshot {
    index: u64,
    set: EndpointSet,
    /// Passive outlier state per endpoint, aligned with `set.endpoints`.
    outliers: Vec<Arc<Outlier>>,
}

/// One request being put together; [`RequestBuilder::send`] runs it.
pub struct RequestBuilder {
    client: ServiceClient,
    method: Method,
    path: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    idempotent: Option<bool>,
    error: Option<Error>,
}

impl RequestBuilder {
    pub fn header(mut self, name: &str, value: &str) -> RequestBuilder {
        match (
            HeaderName::try_from(name),
            HeaderValue::try_from(value.to_owned()),
        ) {
            (Ok(n), Ok(v)) => self.headers.push((n, v)),
            _ => self.error = Some(Error::Invalid(format!("bad header {name}"))),
        }
        self
    }

    pub fn bearer(self, token: &str) -> RequestBuilder {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// Sets `Idempotency-Key`, which also makes the request safe to retry after a
    /// timeout or a 5xx.
    pub fn idempotency_key(mut self, key: &str) -> RequestBuilder {
        self.idempotent = Some(true);
        self.header("idempotency-key", key)
    }

    /// Overrides whether a request that may have reached the service is retried (by
    /// default: GET, HEAD, PUT, DELETE, OPTIONS and requests with an idempotency key).
    pub fn idempotent(mut self, yes: bool) -> RequestBuilder {
        self.idempotent = Some(yes);
        self
    }

    pub fn json<T: serde::Serialize>(mut self, body: &T) -> RequestBuilder {
        match serde_json::to_vec(body) {
            Ok(b) => {
                self.body = Bytes::from(b);
                self.header("content-type", "application/json")
            }
            Err(e) => {
                self.error = Some(Error::Invalid(format!("body: {e}")));
                self
            }
        }
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> RequestBuilder {
        self.body = body.into();
        self
    }

    /// Sends the request: retried on connection failures always, and on timeouts,
    /// resets and 502/503/504 when idempotent, while the retry budget allows; a different
    /// instance is preferred for each retry.
    pub async fn send(mut self) -> Result<Response, Error> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let client = self.client.clone();
        client.call(&self, client.inner.policy.timeout).await
    }

    fn is_idempotent(&self) -> bool {
        self.idempotent.unwrap_or(matches!(
            self.method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
        ))
    }

    fn build(
        &self,
        authority: &str,
        span: Option<&crate::trace::Try>,
    ) -> Result<http::Request<Full<Bytes>>, Error> {
        let mut req = http::Request::builder()
            .method(self.method.clone())
            .uri(format!("http://{authority}{}", self.path));
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        for (k, v) in span.map(|s| s.fields()).unwrap_or_default() {
            req = req.header(k, v);
        }
        req.body(Full::new(self.body.clone()))
            .map_err(|e| Error::Invalid(e.to_string()))
    }
}

impl Exchange for RequestBuilder {
    type Answer = Response;

    fn method(&self) -> &Method {
        &self.method
    }

    async fn send(
        &self,
        authority: &str,
        span: Option<&crate::trace::Try>,
        _timeout: Duration,
    ) -> Result<Response, Error> {
        let req = self.build(authority, span)?;
        send(&self.client.inner.http, &self.client.inner.service, req).await
    }

    fn status(answer: &Response) -> u16 {
        answer.status.as_u16()
    }

    fn judge(&self, result: &Result<Response, Error>) -> Verdict {
        match result {
            Ok(r) => Verdict {
                failed: r.status.is_server_error(),
                retry: self.is_idempotent()
                    && matches!(
                        r.status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ),
            },
            Err(e) => Verdict {
                failed: true,
                retry: matches!(e, Error::Transport { connect: true, .. }) || self.is_idempotent(),
            },
        }
    }
}
