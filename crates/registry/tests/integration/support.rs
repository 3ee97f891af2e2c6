//! A real `tessera` registry on an ephemeral loopback port, and a tiny HTTP client.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tessera_registry::{Config, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    #[allow(dead_code)]
    pub addr: SocketAddr,
    config: Config,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub http: Http,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Self::start_in(dir, f).await;
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on an existing data dir (for restart tests).
    ///
    /// With `TESSERA_TEST_ETCD` set (etcd endpoints, comma-separated), the server keeps
    /// its state in that etcd instead, under a prefix of its own: `scripts/test` runs
    /// the suite a second time that way, so every test also checks the etcd store.
    pub async fn start_in(dir: PathBuf, f: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            data_dir: dir.clone(),
            node_name: "test-node".into(),
            ..Config::default()
        };
        if let Some(endpoints) = std::env::var("TESSERA_TEST_ETCD")
            .ok()
            .filter(|e| !e.is_empty())
        {
            config.store = format!("etcd://{endpoints}");
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            config.etcd_prefix = format!("test-{}-{n}/", std::process::id());
        }
        f(&mut config);
        Self::start_config(config).await
    }

    /// A server sharing its catalog in etcd at `endpoints`, as node `node`.
    pub async fn start_etcd(endpoints: &[String], node: &str) -> TestServer {
        Self::start_with(|c| {
            c.node_name = node.into();
            c.store = format!("etcd://{}", endpoints.join(","));
            c.etcd_prefix = "tessera/".into();
        })
        .await
    }

    async fn start_config(config: Config) -> TestServer {
        let dir = config.data_dir.clone();
        let saved = config.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = Server::open(config, &listener).await.expect("open server");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(listener, async move {
                    let _ = stopped.await;
                })
                .await
                .expect("server run");
        });
        let http = Http::new(addr);
        // The API is served only after the local node is registered: any answer means ready.
        wait_for("server ready", || async {
            http.get("/v1/status/leader").await.0 == StatusCode::OK
        })
        .await;
        TestServer {
            addr,
            config: saved,
            data_dir: dir,
            _tmp: None,
            stop: Some(stop),
            task: Some(task),
            http,
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
    }

    /// Stops and starts again with the same config and data dir (and a new port).
    pub async fn restart(mut self) -> TestServer {
        self.stop().await;
        let tmp = self._tmp.take();
        let mut s = Self::start_config(self.config.clone()).await;
        s._tmp = tmp;
        s
    }
}

impl Drop for TestServer {
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
    pub token: Option<String>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
            token: None,
        }
    }

    pub fn with_token(&self, token: &str) -> Http {
        let mut h = self.clone();
        h.token = Some(token.to_owned());
        h
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t.as_str());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        let resp = self.client.request(req).await.expect("send request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, headers, body)
    }

    fn parse(body: &Bytes) -> Value {
        if body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, HeaderMap, Value) {
        let (s, h, b) = self.raw(Method::GET, path, Bytes::new(), &[]).await;
        (s, h, Self::parse(&b))
    }

    pub async fn put(&self, path: &str, body: impl Into<Bytes>) -> (StatusCode, Value) {
        let (s, _, b) = self.raw(Method::PUT, path, body, &[]).await;
        (s, Self::parse(&b))
    }

    pub async fn put_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.put(path, serde_json::to_vec(&body).expect("json"))
            .await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let (s, _, b) = self.raw(Method::DELETE, path, Bytes::new(), &[]).await;
        (s, Self::parse(&b))
    }

    /// Registers a service and asserts success.
    pub async fn register(&self, body: Value) {
        let (s, b) = self.put_json("/v1/agent/service/register", body).await;
        assert_eq!(s, StatusCode::OK, "register failed: {b}");
    }
}

pub fn index_of(h: &HeaderMap) -> u64 {
    h.get("x-consul-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("X-Consul-Index header")
}

/// Polls `cond` until it holds, for up to a generous deadline: a loaded machine slows a
/// test down but does not fail it.
pub async fn wait_for<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tessera_testkit::wait_until(what, std::time::Duration::from_secs(60), cond).await;
}

/// Status of one check as `/v1/agent/checks` reports it.
pub async fn check_status(http: &Http, id: &str) -> Option<String> {
    let (_, _, v) = http.get("/v1/agent/checks").await;
    v.get(id)
        .and_then(|c| c["Status"].as_str())
        .map(str::to_owned)
}
