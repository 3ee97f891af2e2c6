//! The Tessera registry: a service catalog with health checks, blocking queries, a KV store
//! and ACLs, served over the Consul HTTP API so existing Consul clients work unchanged.
//! State lives in memory and in a fsynced log under the data dir; a write is acknowledged
//! only once it is on disk.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tessera_registry::{Config, Server};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = Server::build(Config::default(), &listener)?;
//! server.run(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod acl;
pub mod admission;
pub mod api;
mod checks;
pub mod defs;
mod error;
mod etcd_batch;
mod etcd_store;
#[doc(hidden)]
pub mod filter;
pub mod guard;
pub mod model;
mod registry;
pub mod sessions;
mod state;
pub mod store;
mod ttl_state;
pub mod txn;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use error::Error;
pub use registry::{AclConfig, Config, Registry, Stats};

/// A registry ready to serve: its state replayed from disk and its HTTP API built.
pub struct Server {
    registry: Arc<Registry>,
    /// Where every request the server answers is counted, when set.
    http_metrics: Option<Arc<tessera_web::HttpMetrics>>,
    /// Records the registry API's requests that come in a trace.
    tracer: Option<tessera_trace::Tracer>,
}

/// ACLs default to on (deny) when the listener is reachable from other hosts.
fn acl_default(config: &Config, listener: &TcpListener) -> bool {
    let loopback = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false);
    config.acl.enabled.unwrap_or(!loopback)
}

impl Server {
    /// Opens the data dir and decides the ACL mode. ACLs default to on (deny) when the
    /// listener is reachable from other hosts: secure by default.
    pub fn build(config: Config, listener: &TcpListener) -> Result<Server, Error> {
        let acl_enabled = acl_default(&config, listener);
        let registry = Registry::open(config, acl_enabled)?;
        Ok(Server {
            registry,
            http_metrics: None,
            tracer: None,
        })
    }

    /// `build`, or, when `config.store` names etcd (`etcd://host:port,...`), a server
    /// sharing its catalog with every server on the same etcd prefix.
    pub async fn open(config: Config, listener: &TcpListener) -> Result<Server, Error> {
        let (list, https) = match (
            config.store.strip_prefix("etcd://"),
            config.store.strip_prefix("etcd+https://"),
        ) {
            (Some(list), _) => (list, false),
            (_, Some(list)) => (list, true),
            _ if config.store.is_empty() => return Self::build(config, listener),
            _ => {
                return Err(Error::bad(format!(
                    "unknown store {:?}: expected etcd://host:port,host:port or etcd+https://...",
                    config.store
                )));
            }
        };
        let tls = match (https, &config.etcd_ca_file) {
            (false, _) => None,
            (true, None) => {
                return Err(Error::bad(
                    "etcd+https:// needs etcd_ca_file (--etcd-cacert): the CA of etcd's certificates",
                ));
            }
            (true, Some(ca)) => Some(tessera_etcd::TlsFiles {
                ca: ca.clone(),
                cert: config.etcd_cert_file.clone(),
                key: config.etcd_key_file.clone(),
            }),
        };
        let endpoints: Vec<String> = list
            .split(',')
            .map(|e| e.trim().trim_end_matches('/').to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(Error::bad("the etcd store names no endpoint"));
        }
        let acl_enabled = acl_default(&config, listener);
        let prefix = config.etcd_prefix.clone();
        let registry =
            Registry::open_etcd(config, acl_enabled, &endpoints, tls.as_ref(), &prefix).await?;
        Ok(Server {
            registry,
            http_metrics: None,
            tracer: None,
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Counts and times every request the server answers (its routes and `extra`'s,
    /// refusals included) in `metrics`.
    pub fn with_http_metrics(mut self, metrics: Arc<tessera_web::HttpMetrics>) -> Server {
        self.http_metrics = Some(metrics);
        self
    }

    /// Makes each registry API request that carries a `traceparent` a server span of
    /// `tracer`'s. Requests without one start no trace: clients poll the registry on their
    /// own (blocking queries, TTL heartbeats), and each would be a trace of its own.
    pub fn with_tracer(mut self, tracer: Option<tessera_trace::Tracer>) -> Server {
        self.tracer = tracer;
        self
    }

    /// Serves until `shutdown` resolves; then wakes every blocking query, stops the check
    /// runners and finishes in-flight requests.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        self.run_with(listener, axum::Router::new(), shutdown).await
    }

    /// `run`, also serving `extra` routes (the coordinator's) on the same listener.
    pub async fn run_with(
        self,
        listener: TcpListener,
        extra: axum::Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let reg = self.registry;
        reg.start_background();
        if let Some(etcd) = reg.etcd() {
            let addr = match listener.local_addr() {
                Ok(a) if a.ip().is_unspecified() => {
                    format!("{}:{}", reg.config.advertise_addr, a.port())
                }
                Ok(a) => a.to_string(),
                Err(_) => reg.config.advertise_addr.clone(),
            };
            tokio::spawn(etcd.clone().join(
                reg.config.node_name.clone(),
                addr,
                reg.shutdown.clone(),
            ));
        }
        reg.ensure_local_node().await?;
        reg.ensure_initial_management().await?;
        // Admission control covers every API the server holds (the coordinator's and
        // the event store's too): one process, one saturation point. One error shape
        // for the whole server: unknown routes, wrong methods and rejected bodies
        // answer JSON, on the registry's routes and on `extra`'s.
        let app = tessera_web::with_caller_traces(api::router(reg.clone()), self.tracer)
            .merge(extra)
            .layer(axum::middleware::from_fn_with_state(
                reg.clone(),
                api::cluster_meta,
            ))
            .layer(axum::middleware::from_fn_with_state(
                reg.clone(),
                admission::admit,
            ));
        let app = match self.http_metrics {
            Some(m) => tessera_web::with_metrics(app, m),
            None => app,
        };
        let app = tessera_web::json_errors(app);
        let stopper = reg.clone();
        let listener = admission::LimitedListener::new(listener, reg.clone());
        let broken = reg.broken.clone();
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // A broken log cannot be trusted: stop, so a supervisor restarts the
                // process and replay starts from what is on disk.
                tokio::select! {
                    () = shutdown => {}
                    () = broken.cancelled() => {}
                }
                stopper.shutdown();
            })
            .await;
        reg.shutdown();
        if let Some(e) = reg.storage_broken() {
            return Err(Error::Storage(store::StoreError::Broken(e.clone())));
        }
        result.map_err(|e| {
            Error::Storage(store::StoreError::Io {
                path: "listener".into(),
                source: e,
            })
        })
    }
}
