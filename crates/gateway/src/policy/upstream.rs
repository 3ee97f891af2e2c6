//! Upstreams: where a route's requests go. Each holds a swappable endpoint snapshot (static,
//! or fed by a registry blocking query), a balancer, a connection pool and its protection
//! (breaker, bulkhead, retry budget, per-endpoint outlier state).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tessera_balance::{Balancer, Endpoint, EndpointSet};
use tessera_discovery::Event;
use tessera_resilience::{
    BreakerConfig, BudgetConfig, Bulkhead, CircuitBreaker, Outlier, OutlierConfig, RetryBudget,
};
use tokio_util::sync::CancellationToken;

use crate::floor::config::{
    ConfigError, HashOn, Protocol, RegistryConfig, UpstreamConfig, parse_endpoint,
};
use crate::protocol::h1::pool::Conns;
use crate::protocol::transport::Connector;

/// Endpoints plus their outlier state, swapped as one.
#[derive(Debug)]
pub struct Snapshot {
    pub set: EndpointSet,
    pub outliers: Vec<Arc<Outlier>>,
    /// Each endpoint's address pre-parsed for request URIs (`None` if unparsable).
    pub authorities: Vec<Option<http::uri::Authority>>,
    /// Each endpoint's connection pool, kept across snapshots like its load.
    pub conns: Vec<Arc<Conns>>,
}

impl Snapshot {
    pub fn empty() -> Snapshot {
        Snapshot {
            set: EndpointSet::new(Vec::new()),
            outliers: Vec::new(),
            authorities: Vec::new(),
            conns: Vec::new(),
        }
    }

    /// A new snapshot that keeps load and outlier state of endpoints it shares with `old`.
    pub fn next(endpoints: Vec<Endpoint>, old: &Snapshot) -> Snapshot {
        let prev: Vec<Option<usize>> = endpoints
            .iter()
            .map(|e| old.set.endpoints.iter().position(|p| p.addr == e.addr))
            .collect();
        let outliers = prev
            .iter()
            .map(|i| i.map(|i| old.outliers[i].clone()).unwrap_or_default())
            .collect();
        let conns = prev
            .iter()
            .map(|i| i.map(|i| old.conns[i].clone()).unwrap_or_default())
            .collect();
        let authorities = endpoints
            .iter()
            .map(|e| http::uri::Authority::try_from(e.addr.as_str()).ok())
            .collect();
        Snapshot {
            set: EndpointSet::inherit(endpoints, &old.set),
            outliers,
            authorities,
            conns,
        }
    }
}

/// Discovery's view of one registry service, shared by every upstream (and every config
/// generation) that targets it.
#[derive(Debug)]
pub struct Feed {
    pub service: String,
    pub snapshot: ArcSwap<Snapshot>,
    /// Set once the registry has answered at least once.
    pub ready: AtomicBool,
    /// False while the registry is unreachable (the last endpoints keep serving).
    pub registry_ok: AtomicBool,
    pub updates: AtomicU64,
}

#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub budget_exhausted: AtomicU64,
    pub ejections: AtomicU64,
    pub breaker_rejections: AtomicU64,
    pub bulkhead_rejections: AtomicU64,
}

pub struct Upstream {
    pub name: String,
    pub feed: Arc<Feed>,
    pub balancer: Balancer,
    pub hash: Option<HashOn>,
    pub protocol: Protocol,
    pub panic_threshold: u32,
    pub breaker: Option<CircuitBreaker>,
    pub bulkhead: Bulkhead,
    pub budget: RetryBudget,
    pub outlier: Option<OutlierConfig>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub connector: Connector,
    pub metrics: UpstreamMetrics,
}

impl Upstream {
    /// Fails when the upstream's TLS files do not load.
    pub fn build(
        name: &str,
        cfg: &UpstreamConfig,
        discovery: &Discovery,
    ) -> Result<Upstream, ConfigError> {
        let connector = Connector::build(
            &format!("upstreams.{name}.tls"),
            cfg.tls.as_ref(),
            cfg.protocol,
        )?;
        let feed = match &cfg.service {
            Some(service) => discovery.feed(service),
            None => {
                let endpoints = cfg
                    .endpoints
                    .iter()
                    .filter_map(|e| parse_endpoint(e).ok())
                    .map(|(addr, w)| Endpoint::new(addr, w))
                    .collect();
                Arc::new(Feed {
                    service: String::new(),
                    snapshot: ArcSwap::from_pointee(Snapshot::next(endpoints, &Snapshot::empty())),
                    ready: AtomicBool::new(true),
                    registry_ok: AtomicBool::new(true),
                    updates: AtomicU64::new(0),
                })
            }
        };
        let b = &cfg.breaker;
        Ok(Upstream {
            name: name.to_owned(),
            feed,
            balancer: Balancer::new(cfg.policy),
            hash: cfg.hash.clone(),
            protocol: cfg.protocol,
            panic_threshold: cfg.panic_threshold,
            breaker: b.enabled.then(|| {
                CircuitBreaker::new(BreakerConfig {
                    error_rate: b.error_rate,
                    window: b.window,
                    min_calls: b.min_calls,
                    open_for: b.open_for,
                    half_open_probes: b.half_open_probes,
                })
            }),
            bulkhead: Bulkhead::new(cfg.max_in_flight),
            budget: RetryBudget::new(BudgetConfig {
                ratio: cfg.retry_budget.ratio,
                min_per_sec: cfg.retry_budget.min_per_sec,
                window: Duration::from_secs(10),
            }),
            outlier: cfg.outlier.enabled.then(|| OutlierConfig {
                consecutive_errors: cfg.outlier.consecutive_errors,
                base_ejection: cfg.outlier.base_ejection,
                max_ejection: Duration::from_secs(300),
                max_ejected_percent: cfg.outlier.max_ejected_percent,
            }),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            connector,
            metrics: UpstreamMetrics::default(),
        })
    }
}

/// Registry discovery: one blocking-query loop per service, shared across reloads.
pub struct Discovery {
    registry: RegistryConfig,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
    feeds: Mutex<HashMap<String, (Arc<Feed>, CancellationToken)>>,
}

impl Discovery {
    pub fn new(registry: RegistryConfig) -> Discovery {
        let token = std::env::var("TESSERA_REGISTRY_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| registry.token.clone());
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Discovery {
            registry,
            token,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(600))
                .build(connector),
            feeds: Mutex::new(HashMap::new()),
        }
    }

    /// The feed for `service`, starting its discovery loop on first use.
    pub fn feed(&self, service: &str) -> Arc<Feed> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((feed, _)) = feeds.get(service) {
            return feed.clone();
        }
        let feed = Arc::new(Feed {
            service: service.to_owned(),
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            ready: AtomicBool::new(false),
            registry_ok: AtomicBool::new(false),
            updates: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        tokio::spawn(watch(
            feed.clone(),
            self.client.clone(),
            self.registry.clone(),
            self.token.clone(),
            cancel.clone(),
        ));
        feeds.insert(service.to_owned(), (feed.clone(), cancel));
        feed
    }

    /// Stops discovery for services no upstream uses any more.
    pub fn retain(&self, services: &[String]) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds.retain(|name, (_, cancel)| {
            let keep = services.contains(name);
            if !keep {
                cancel.cancel();
            }
            keep
        });
    }

    pub fn stop(&self) {
        let feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        for (_, cancel) in feeds.values() {
            cancel.cancel();
        }
    }
}

/// The blocking-query loop for one service (`tessera_discovery::watch`): each answer
/// that changes the set replaces the endpoint snapshot; a failure keeps the last one.
async fn watch(
    feed: Arc<Feed>,
    client: Client<HttpConnector, Full<Bytes>>,
    registry: RegistryConfig,
    token: Option<String>,
    cancel: CancellationToken,
) {
    // Several servers sharing one catalog: the query moves to the next one when its
    // server fails, keeping its index (shared-store indexes hold across servers).
    let servers = tessera_discovery::Servers::parse(&registry.address);
    let fetch = |url: String| {
        let mut req = http::Request::get(url);
        if let Some(t) = &token {
            req = req.header("X-Consul-Token", t.as_str());
        }
        let req = req.body(Full::new(Bytes::new()));
        let client = client.clone();
        async move { fetch(&client, req.map_err(|e| e.to_string())?).await }
    };
    let on = |event| match event {
        Event::Answer { entries, .. } => {
            feed.registry_ok.store(true, Ordering::Relaxed);
            let endpoints: Vec<Endpoint> = entries
                .iter()
                .map(|e| Endpoint::new(e.authority(), e.weight()))
                .collect();
            let old = feed.snapshot.load();
            let changed = old.set.endpoints.len() != endpoints.len()
                || old
                    .set
                    .endpoints
                    .iter()
                    .zip(&endpoints)
                    .any(|(a, b)| a.addr != b.addr || a.weight != b.weight);
            if changed || !feed.ready.load(Ordering::Relaxed) {
                tracing::debug!(service = %feed.service, endpoints = endpoints.len(), "endpoints updated");
                feed.snapshot
                    .store(Arc::new(Snapshot::next(endpoints, &old)));
                feed.updates.fetch_add(1, Ordering::Relaxed);
            }
            feed.ready.store(true, Ordering::Release);
        }
        Event::Unreachable { .. } => feed.registry_ok.store(false, Ordering::Relaxed),
    };
    tessera_discovery::watch(&feed.service, &servers, registry.wait, fetch, on, cancel).await;
}

async fn fetch(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> Result<tessera_discovery::Reply, String> {
    let resp = client
        .request(req)
        .await
        .map_err(|e| tessera_core::error_chain(&e))?;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let index = header("x-consul-index");
    let retry_after = header("retry-after").map(|s| Duration::from_secs(s.min(60)));
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(tessera_discovery::Reply {
        status,
        index,
        retry_after,
        body,
    })
}
