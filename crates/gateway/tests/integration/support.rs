//! Test upstreams whose answers can be changed at run time, and a gateway started from a
//! TOML string.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_gateway::{Config, Gateway};
use tokio::task::JoinSet;

/// An upstream that answers `{"id", "path", "version", headers...}` with a settable
/// status and delay, and counts what it served.
pub struct Upstream {
    pub addr: SocketAddr,
    pub status: Arc<AtomicU16>,
    pub delay_ms: Arc<AtomicU64>,
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted.
    pub accepts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(id: &str) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(id, listener)
    }

    /// Serves on a given listener (to restart an upstream on the same port).
    pub fn serve(id: &str, listener: tokio::net::TcpListener) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let accepts = Arc::new(AtomicUsize::new(0));
        let acc = accepts.clone();
        let (st, dl, hs, name) = (
            status.clone(),
            delay_ms.clone(),
            hits.clone(),
            id.to_owned(),
        );
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let (st, dl, hs, name) = (st.clone(), dl.clone(), hs.clone(), name.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (st, dl, hs, name) = (st.clone(), dl.clone(), hs.clone(), name.clone());
                        async move {
                            hs.fetch_add(1, Ordering::SeqCst);
                            let delay = dl.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let version = format!("{:?}", req.version());
                            let path = req.uri().to_string();
                            let headers: serde_json::Map<String, serde_json::Value> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.to_string(),
                                        serde_json::Value::String(v.to_str().unwrap_or("").into()),
                                    )
                                })
                                .collect();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let out = serde_json::json!({
                                "id": name, "path": path, "version": version,
                                "headers": headers, "body": String::from_utf8_lossy(&body),
                            });
                            let mut resp =
                                http::Response::new(Full::new(Bytes::from(out.to_string())));
                            *resp.status_mut() =
                                StatusCode::from_u16(st.load(Ordering::SeqCst)).unwrap();
                            resp.headers_mut()
                                .insert("x-upstream", name.parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            status,
            delay_ms,
            hits,
            accepts,
            task,
        }
    }

    pub fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection, like a crashed process.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct TestGateway {
    pub addr: SocketAddr,
    /// The TLS listener, when the config has `[tls]`.
    pub tls_addr: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub http: Http,
}

impl TestGateway {
    pub async fn start(toml: &str) -> TestGateway {
        Self::start_with(toml, None, None).await
    }

    /// Serves on `workers` threads of their own (`Gateway::run_workers`), as the CLI
    /// does with more than one worker.
    pub async fn start_workers(toml: &str, workers: usize) -> TestGateway {
        Self::start_with(toml, Some(workers), None).await
    }

    /// Records spans with `tracer`.
    pub async fn start_traced(toml: &str, tracer: tessera_trace::Tracer) -> TestGateway {
        Self::start_with(toml, None, Some(tracer)).await
    }

    async fn start_with(
        toml: &str,
        workers: Option<usize>,
        tracer: Option<tessera_trace::Tracer>,
    ) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, toml).unwrap();
        let config = Config::load(&config_path).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let mut gw = Gateway::build(config.clone(), Some(config_path.clone()))
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        if let Some(t) = tracer {
            gw = gw.with_tracer(t);
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (addr, tls_addr, task) = match workers {
            Some(n) => {
                let tls = config.tls.as_ref().map(|_| local);
                let listeners = tessera_gateway::bind_workers(local, tls, n).unwrap();
                let addr = listeners[0].plain.local_addr().unwrap();
                let tls_addr = listeners[0].tls.as_ref().map(|l| l.local_addr().unwrap());
                let task = tokio::spawn(async move {
                    gw.run_workers(listeners, admin, stopped).await.unwrap();
                });
                (addr, tls_addr, task)
            }
            None => {
                let listener = tokio::net::TcpListener::bind(local).await.unwrap();
                let addr = listener.local_addr().unwrap();
                let mut tls_addr = None;
                if config.tls.is_some() {
                    let l = tokio::net::TcpListener::bind(local).await.unwrap();
                    tls_addr = Some(l.local_addr().unwrap());
                    gw = gw.with_tls_listener(l).unwrap();
                }
                let task = tokio::spawn(async move {
                    gw.run(listener, admin, stopped).await;
                });
                (addr, tls_addr, task)
            }
        };
        TestGateway {
            addr,
            tls_addr,
            admin: admin_addr,
            config_path,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
            http: Http::new(addr),
        }
    }

    pub fn admin_http(&self) -> Http {
        Http::new(self.admin)
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    pub async fn upstreams(&self) -> serde_json::Value {
        self.admin_http().get("/admin/upstreams").await.2
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[derive(Clone)]
pub struct Http {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// HTTP/2 with prior knowledge (h2c).
    pub fn h2c(addr: SocketAddr) -> Http {
        Http {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let h = resp.headers().clone();
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&b).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&b).into_owned())
        });
        (status, h, v)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, HeaderMap, serde_json::Value) {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }
}

/// Polls `cond` until it holds, up to a generous deadline.
pub async fn wait_for<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tessera_testkit::wait_until(what, std::time::Duration::from_secs(60), cond).await;
}
