//! The registry as a service sees it, over the Consul HTTP API only (so the same code runs
//! against `tessera server` or a real Consul agent): register with a health check, keep a
//! TTL check alive, deregister before going away, and watch other services' healthy
//! instances through blocking queries into a cache that outlives registry outages.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use tessera_discovery::{Event, Servers};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::http::{Error, Http, Response, client, jittered, send};

/// A connection to the registry (tessera server or Consul), cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), tessera::Error> {
/// let registry = tessera::Registry::new("127.0.0.1:8500");
/// let catalog = registry.watch("catalog");
/// catalog.ready(std::time::Duration::from_secs(5)).await;
/// for i in &catalog.current().instances {
///     println!("{} at {}", i.id, i.authority());
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    servers: Arc<Servers>,
    token: Option<String>,
    http: Http,
    /// How long a blocking query waits for a change.
    wait: Duration,
    watches: Mutex<HashMap<String, Watch>>,
    /// The process's service clients' figures, shared by every clone.
    clients: Arc<crate::metrics::ClientMetrics>,
    /// Stops every watch loop when the last `Registry` clone is dropped.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Registry {
    /// `address` is `host:port` of the registry's HTTP API, or several, comma-separated,
    /// of servers sharing one catalog: requests move to the next when one cannot be
    /// reached. The ACL token, if any, comes from `TESSERA_REGISTRY_TOKEN` (or
    /// `CONSUL_HTTP_TOKEN`); see [`Registry::with_token`].
    pub fn new(address: impl Into<String>) -> Registry {
        let token = ["TESSERA_REGISTRY_TOKEN", "CONSUL_HTTP_TOKEN"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|t| !t.is_empty()));
        let servers = Arc::new(Servers::parse(&address.into()));
        Registry::build(servers, token, Duration::from_secs(300), Arc::default())
    }

    fn build(
        servers: Arc<Servers>,
        token: Option<String>,
        wait: Duration,
        clients: Arc<crate::metrics::ClientMetrics>,
    ) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                servers,
                token,
                http: client(),
                wait,
                watches: Mutex::new(HashMap::new()),
                clients,
                stop: CancellationToken::new(),
            }),
        }
    }

    /// The same registry with this ACL token on every request.
    pub fn with_token(&self, token: impl Into<String>) -> Registry {
        Registry::build(
            self.inner.servers.clone(),
            Some(token.into()),
            self.inner.wait,
            self.inner.clients.clone(),
        )
    }

    /// The same registry with blocking queries that wait at most `wait` (default 5 min).
    pub fn with_wait(&self, wait: Duration) -> Registry {
        Registry::build(
            self.inner.servers.clone(),
            self.inner.token.clone(),
            wait.max(Duration::from_secs(1)),
            self.inner.clients.clone(),
        )
    }

    /// The server requests go to now.
    pub fn address(&self) -> &str {
        self.inner.servers.current()
    }

    /// The address to register for a service listening on `listen`: `listen` itself, or,
    /// when it is a wildcard (`0.0.0.0:9000` in a container), this host's address on the
    /// route to the registry, which is where callers on that network reach it too.
    pub async fn advertised(&self, listen: SocketAddr) -> Result<SocketAddr, Error> {
        if !listen.ip().is_unspecified() {
            return Ok(listen);
        }
        let server = self.address();
        let unknown = |e: String| {
            Error::Invalid(format!(
                "cannot tell which address of this host to register for {listen} (registry {server}): {e}"
            ))
        };
        let to = tokio::net::lookup_host(server)
            .await
            .map_err(|e| unknown(e.to_string()))?
            .next()
            .ok_or_else(|| unknown("the registry's name has no address".into()))?;
        let any: SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        // A connected UDP socket sends nothing; the kernel picks its source address.
        let probe = tokio::net::UdpSocket::bind(any)
            .await
            .map_err(|e| unknown(e.to_string()))?;
        probe
            .connect(to)
            .await
            .map_err(|e| unknown(e.to_string()))?;
        let ip = probe.local_addr().map_err(|e| unknown(e.to_string()))?.ip();
        Ok(SocketAddr::new(ip, listen.port()))
    }

    pub(crate) fn token(&self) -> Option<&str> {
        self.inner.token.as_deref()
    }

    pub(crate) fn http(&self) -> &Http {
        &self.inner.http
    }

    pub(crate) fn clients(&self) -> &crate::metrics::ClientMetrics {
        &self.inner.clients
    }

    /// The calls this process's [`ServiceClient`](crate::ServiceClient)s made, per called
    /// service, for the service's `/metrics` (`tessera_client_*`; see `tessera_metrics`).
    pub fn render_metrics(&self, out: &mut tessera_metrics::Text) {
        self.inner.clients.render(out);
    }

    /// A request to the registry's API (`path` starts with `/v1/`). A registry that is
    /// saturated answers 429: the call waits the `Retry-After` it names, with jitter, and
    /// tries again, up to `SATURATED_RETRIES` times.
    pub(crate) async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Result<Response, Error> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let mut attempt = 0;
        let mut moved = 0;
        loop {
            let server = self.inner.servers.current().to_owned();
            let mut req = http::Request::builder()
                .method(method.clone())
                .uri(format!("http://{server}{path}"));
            if let Some(t) = &self.inner.token {
                req = req.header("x-consul-token", t.as_str());
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if body.is_some() {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(body.clone().unwrap_or_default()))
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let resp = match send(&self.inner.http, "registry", req).await {
                // Nothing was sent: another server can take it.
                Err(Error::Transport { connect: true, .. })
                    if moved + 1 < self.inner.servers.len() =>
                {
                    self.inner.servers.failed(&server);
                    moved += 1;
                    continue;
                }
                Err(e) => {
                    if matches!(e, Error::Transport { .. }) {
                        self.inner.servers.failed(&server);
                    }
                    return Err(e);
                }
                Ok(r) => r,
            };
            if resp.status != http::StatusCode::TOO_MANY_REQUESTS || attempt == SATURATED_RETRIES {
                return Ok(resp);
            }
            attempt += 1;
            let wait = jittered(resp.retry_after().unwrap_or(Duration::from_secs(1)));
            tracing::debug!(%path, wait = ?wait, "registry saturated (429); waiting before trying again");
            tokio::time::sleep(wait).await;
        }
    }

    /// The cached, watched set of `service`'s healthy instances; the first call starts a
    /// blocking-query loop that keeps it current for as long as this registry lives.
    pub fn watch(&self, service: &str) -> Watch {
        let mut watches = self.inner.watches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = watches.get(service) {
            return w.clone();
        }
        let (tx, rx) = watch::channel(Arc::new(Instances::default()));
        let w = Watch {
            service: service.to_owned(),
            rx,
        };
        tokio::spawn(watch_loop(
            service.to_owned(),
            self.inner.http.clone(),
            self.inner.servers.clone(),
            self.inner.token.clone(),
            self.inner.wait,
            tx,
            self.inner.stop.clone(),
        ));
        watches.insert(service.to_owned(), w.clone());
        w
    }

    /// One instance's registration: `PUT /v1/agent/service/register`.
    async fn register(&self, def: &serde_json::Value) -> Result<(), Error> {
        self.call(
            http::Method::PUT,
            "/v1/agent/service/register",
            Some(def),
            &[],
        )
        .await?
        .error_for_status()
        .map(drop)
    }
}

/// A service instance as discovery reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    /// The service's address, or its node's when the service has none.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// `Weights.Passing`.
    pub weight: u32,
}

impl Instance {
    /// `host:port` (IPv6 hosts bracketed), as an HTTP authority.
    pub fn authority(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

/// One answer of discovery.
#[derive(Debug, Clone, Default)]
pub struct Instances {
    pub instances: Vec<Instance>,
    /// The registry's index for this answer (0 before the first one).
    pub index: u64,
    /// Whether the registry answered the last query; when it did not, `instances` is the
    /// last known set, kept so callers go on working through a registry outage.
    pub registry_ok: bool,
}

/// A watched service: [`Watch::current`] is always the latest answer, without I/O. It
/// is kept current while the [`Registry`] it came from (or a clone of it) is alive.
#[derive(Clone)]
pub struct Watch {
    service: String,
    rx: watch::Receiver<Arc<Instances>>,
}

impl Watch {
    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn current(&self) -> Arc<Instances> {
        self.rx.borrow().clone()
    }

    /// Waits for the next answer that differs from the one last seen through this handle.
    pub async fn changed(&mut self) -> Arc<Instances> {
        // The sender lives as long as the registry; if it is gone, the cache is final.
        let _ = self.rx.changed().await;
        self.rx.borrow_and_update().clone()
    }

    /// Waits up to `timeout` for the first answer from the registry; `false` if none came.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut rx = self.rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|i| i.index > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Blocking queries for one service (`tessera_discovery::watch`), for as long as the
/// registry lives: each answer that changes the set is published; a failure keeps the
/// last set, marked `registry_ok: false`.
async fn watch_loop(
    service: String,
    http: Http,
    servers: Arc<Servers>,
    token: Option<String>,
    wait: Duration,
    tx: watch::Sender<Arc<Instances>>,
    stop: CancellationToken,
) {
    let fetch = |url: String| {
        let http = http.clone();
        let token = token.clone();
        async move {
            let mut req = http::Request::get(url);
            if let Some(t) = &token {
                req = req.header("x-consul-token", t.as_str());
            }
            let req = req
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            let r = send(&http, "registry", req)
                .await
                .map_err(|e| e.to_string())?;
            Ok(tessera_discovery::Reply {
                status: r.status.as_u16(),
                index: r
                    .headers
                    .get("x-consul-index")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
                retry_after: r.retry_after(),
                body: r.body,
            })
        }
    };
    let on = |event| match event {
        Event::Answer { index, entries } => {
            let instances: Vec<Instance> = entries
                .into_iter()
                .map(|e| Instance {
                    address: e.address().to_owned(),
                    weight: e.weight(),
                    id: e.service.id,
                    port: e.service.port,
                    tags: e.service.tags.unwrap_or_default(),
                    meta: e.service.meta.unwrap_or_default(),
                })
                .collect();
            tx.send_if_modified(|cur| {
                let changed = cur.instances != instances || !cur.registry_ok;
                if changed || cur.index == 0 {
                    *cur = Arc::new(Instances {
                        instances,
                        index,
                        registry_ok: true,
                    });
                    return true;
                }
                false
            });
        }
        Event::Unreachable { .. } => {
            tx.send_if_modified(|cur| {
                if !cur.registry_ok {
                    return false;
                }
                let mut next = (**cur).clone();
                next.registry_ok = false;
                *cur = Arc::new(next);
                // Readers waiting for a first answer are not woken by a failure.
                cur.index > 0
            });
        }
    };
    tessera_discovery::watch(&service, &servers, wait, fetch, on, stop).await;
}

pub(crate) use tessera_core::consul::encode_segment as encode;

/// Times a registry call is retried after a 429 before the 429 is returned.
const SATURATED_RETRIES: u32 = 5;

/// How the registry decides whether an instance gets traffic.
#[derive(Debug, Clone)]
pub enum Check {
    /// The service reports in itself: [`Registered`] passes the check every third of the
    /// TTL from a background task; a process that hangs or dies goes critical after `ttl`.
    Ttl(Duration),
    /// The registry polls `http://address:port{path}` every `interval`.
    Http { path: String, interval: Duration },
    /// The registry calls `grpc.health.v1.Health/Check` on the instance (h2c) every
    /// `interval`, for `service` (empty: the server as a whole).
    Grpc { service: String, interval: Duration },
}

/// What a service instance registers as: ID `{name}-{ip}-{port}` by default, a 10 s TTL
/// check kept passing by [`Registered`], and 60 s before a critical instance is removed.
///
/// ```
/// use std::time::Duration;
/// use tessera::{Check, Registration};
/// let r = Registration::new("catalog", "10.0.0.5:8080".parse().unwrap())
///     .weight(2)
///     .check(Check::Http { path: "/health".into(), interval: Duration::from_secs(1) });
/// assert!(format!("{r:?}").contains("catalog-10.0.0.5-8080"));
/// ```
///
/// ```no_run
/// # async fn demo(listener: std::net::TcpListener) -> Result<(), tessera::Error> {
/// use std::time::Duration;
/// use tessera::{Check, Registration, Registry};
/// let registry = Registry::new("127.0.0.1:8500");
/// let me = Registration::new("catalog", listener.local_addr().unwrap())
///     .tag("v1")
///     .meta("version", "1.0.0")
///     .check(Check::Ttl(Duration::from_secs(5)))
///     .register(&registry)
///     .await?;
/// // ... serve; on SIGTERM, first:
/// me.deregister().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Registration {
    name: String,
    id: String,
    addr: SocketAddr,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    weight: u32,
    /// Empty: one 10 s TTL check.
    checks: Vec<Check>,
    deregister_after: Duration,
}

impl Registration {
    /// `addr` is where other services reach this instance. The id defaults to
    /// `{name}-{ip}-{port}`; the checks to one 10 s TTL.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Registration {
        let name = name.into();
        Registration {
            id: format!("{name}-{}-{}", addr.ip(), addr.port()),
            name,
            addr,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight: 1,
            checks: Vec::new(),
            deregister_after: Duration::from_secs(60),
        }
    }

    pub fn id(mut self, id: impl Into<String>) -> Registration {
        self.id = id.into();
        self
    }

    pub fn tag(mut self, tag: impl Into<String>) -> Registration {
        self.tags.push(tag.into());
        self
    }

    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Registration {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// The share of traffic relative to other instances (`Weights.Passing`).
    pub fn weight(mut self, weight: u32) -> Registration {
        self.weight = weight.max(1);
        self
    }

    /// Adds a check; the instance is passing only while all of them pass (an HTTP
    /// check and a gRPC health check, say, for a service that serves both).
    pub fn check(mut self, check: Check) -> Registration {
        self.checks.push(check);
        self
    }

    fn checks(&self) -> Vec<Check> {
        if self.checks.is_empty() {
            vec![Check::Ttl(Duration::from_secs(10))]
        } else {
            self.checks.clone()
        }
    }

    /// How long the check may stay critical before the registry removes the instance.
    pub fn deregister_after(mut self, after: Duration) -> Registration {
        self.deregister_after = after;
        self
    }

    fn definition(&self) -> serde_json::Value {
        let go = |d: Duration| tessera_core::format_duration(d);
        let timeout = |interval: Duration| {
            go(interval.clamp(Duration::from_millis(500), Duration::from_secs(5)))
        };
        let checks = self.checks();
        let checks: Vec<serde_json::Value> = checks
            .iter()
            .enumerate()
            .map(|(i, check)| {
                let mut def = match check {
                    Check::Ttl(ttl) => json!({
                        "TTL": go(*ttl),
                        // Healthy from the start: the process registers once it is serving.
                        "Status": "passing",
                    }),
                    Check::Http { path, interval } => json!({
                        "HTTP": format!("http://{}{path}", self.authority()),
                        "Interval": go(*interval),
                        "Timeout": timeout(*interval),
                    }),
                    Check::Grpc { service, interval } => json!({
                        "GRPC": if service.is_empty() {
                            self.authority()
                        } else {
                            format!("{}/{service}", self.authority())
                        },
                        "GRPCUseTLS": false,
                        "Interval": go(*interval),
                        "Timeout": timeout(*interval),
                    }),
                };
                def["CheckID"] = json!(self.check_id(i, checks.len()));
                def["DeregisterCriticalServiceAfter"] = json!(go(self.deregister_after));
                def
            })
            .collect();
        json!({
            "ID": self.id,
            "Name": self.name,
            "Address": self.addr.ip().to_string(),
            "Port": self.addr.port(),
            "Tags": self.tags,
            "Meta": self.meta,
            "Weights": {"Passing": self.weight, "Warning": 1},
            "Checks": checks,
        })
    }

    /// Consul's naming: `service:{id}` for a lone check, `service:{id}:{n}` from 1 when
    /// there are several.
    fn check_id(&self, index: usize, of: usize) -> String {
        if of == 1 {
            format!("service:{}", self.id)
        } else {
            format!("service:{}:{}", self.id, index + 1)
        }
    }

    fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// Registers the instance and, for a TTL check, starts the task that keeps it
    /// passing (and registers again if the registry forgot the instance).
    pub async fn register(self, registry: &Registry) -> Result<Registered, Error> {
        let def = self.definition();
        registry.register(&def).await?;
        let stop = CancellationToken::new();
        let checks = self.checks();
        for (i, check) in checks.iter().enumerate() {
            if let Check::Ttl(ttl) = check {
                tokio::spawn(heartbeat(
                    registry.clone(),
                    self.check_id(i, checks.len()),
                    def.clone(),
                    *ttl,
                    stop.clone(),
                ));
            }
        }
        Ok(Registered {
            id: self.id,
            registry: registry.clone(),
            stop,
        })
    }
}

async fn heartbeat(
    registry: Registry,
    check_id: String,
    def: serde_json::Value,
    ttl: Duration,
    stop: CancellationToken,
) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    let path = format!("/v1/agent/check/pass/{}", encode(&check_id));
    loop {
        // Between two and three ninths of the TTL: instances started together drift
        // apart instead of heartbeating in lockstep.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(jittered(every * 2 / 3)) => {}
        }
        match registry.call(http::Method::PUT, &path, None, &[]).await {
            Ok(r) if r.status.is_success() => {}
            // The registry no longer knows the check (deregistered after a long pause,
            // or a registry without persistence restarted): register again.
            Ok(r) if r.status == http::StatusCode::NOT_FOUND => {
                // Every instance finds out at about the same time (a registry that lost
                // its state restarted): spread the re-registrations out.
                let spread = every.min(Duration::from_secs(5));
                let delay = Duration::from_millis(fastrand::u64(..=spread.as_millis() as u64));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                if let Err(e) = registry.register(&def).await {
                    tracing::warn!(check = %check_id, error = %e, "re-registration failed");
                }
            }
            Ok(r) => {
                tracing::warn!(check = %check_id, status = %r.status, "TTL pass refused")
            }
            Err(e) => tracing::warn!(check = %check_id, error = %e, "TTL pass failed"),
        }
    }
}

/// A registered instance. Call [`Registered::deregister`] when shutting down, *before*
/// the server stops accepting, so callers stop picking this instance first.
pub struct Registered {
    id: String,
    registry: Registry,
    stop: CancellationToken,
}

impl Registered {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops the TTL heartbeat and removes the instance from the registry.
    pub async fn deregister(self) -> Result<(), Error> {
        self.stop.cancel();
        let path = format!("/v1/agent/service/deregister/{}", encode(&self.id));
        self.registry
            .call(http::Method::PUT, &path, None, &[])
            .await?
            .error_for_status()
            .map(drop)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Without an explicit deregister the TTL lapses and the registry marks the
        // instance critical, which is what a crashed process looks like too.
        self.stop.cancel();
    }
}
