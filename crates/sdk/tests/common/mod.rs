//! What the SDK's test suites share: a real registry + coordinator + event store (the
//! same crates `tessera server` runs) and axum apps, on loopback ports the OS picks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tessera::Registry;
use tokio::sync::oneshot;

/// Polls `cond` until it holds; a loaded machine makes this slower, never failing.
pub async fn wait_for<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    tessera_testkit::wait_until(what, Duration::from_secs(60), cond).await;
}

pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    /// The registry in-process, for what the test must see without a connection.
    pub inner: Arc<tessera_registry::Registry>,
    _dir: tempfile::TempDir,
}

struct Resolver(Arc<tessera_registry::Registry>);
impl tessera_coordinator::Resolve for Resolver {
    fn healthy(&self, service: &str) -> Vec<(String, u32)> {
        self.0.healthy_instances(service)
    }
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut tessera_registry::Config)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = tessera_registry::Config {
            data_dir: dir.path().into(),
            node_name: "sdk-test".into(),
            ..Default::default()
        };
        f(&mut config);
        let server = tessera_registry::Server::open(config, &listener)
            .await
            .unwrap();
        let inner = server.registry().clone();
        let resolver = Arc::new(Resolver(server.registry().clone()));
        let coordinator = tessera_coordinator::Coordinator::open_sqlite(dir.path(), Some(resolver))
            .await
            .unwrap();
        let events = tessera_events::EventStore::open(dir.path()).await.unwrap();
        let routes = coordinator
            .router(Arc::new(tessera_coordinator::AllowAll))
            .merge(events.router(Arc::new(tessera_coordinator::AllowAll)));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server
                .run_with(listener, routes, async move {
                    let _ = stopped.await;
                    events.shutdown();
                })
                .await;
        });
        Server {
            addr,
            stop: Some(stop),
            task,
            inner,
            _dir: dir,
        }
    }

    pub fn registry(&self) -> Registry {
        Registry::new(self.addr.to_string()).with_wait(Duration::from_secs(5))
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// An axum app on a loopback port, stopped by dropping the handle.
pub struct App {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl App {
    pub async fn start(router: axum::Router) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        App {
            addr,
            stop: Some(stop),
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// `(id, status)` of every check of `service` as the registry reports them.
pub async fn checks(server: &Server, service: &str) -> Vec<(String, String)> {
    let url = format!("http://{}/v1/health/checks/{service}", server.addr);
    let body = http_get(&url).await;
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        c["ServiceID"].as_str().unwrap_or("").to_owned(),
                        c["Status"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub async fn http_get(url: &str) -> String {
    let client = hyper_util_client();
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    match client.request(req).await {
        Ok(resp) => {
            use http_body_util::BodyExt;
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&b).into_owned()
        }
        Err(_) => String::new(),
    }
}

pub fn hyper_util_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}
