//! What the saga and TCC tests share: the store a coordinator runs on (SQLite in a temp
//! dir, or a fresh PostgreSQL database) and a small JSON client for its API.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tessera_coordinator::{AllowAll, Coordinator, Resolve};

/// Where a test's coordinator keeps its state; reopened by a "restarted" coordinator.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(tessera_testkit::PgDatabase),
}

impl Backend {
    pub fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A fresh database on the machine's PostgreSQL, dropped with the backend. Outside
    /// CI a missing server skips the test (None); in CI it fails it.
    pub fn postgres() -> Option<Backend> {
        tessera_testkit::PgDatabase::create_or_skip().map(Backend::Postgres)
    }

    pub async fn open(&self, resolver: Option<Arc<dyn Resolve>>) -> Coordinator {
        match self {
            Backend::Sqlite(dir) => Coordinator::open_sqlite(dir.path(), resolver).await,
            Backend::Postgres(db) => {
                Coordinator::open_postgres(&db.url, resolver, Default::default()).await
            }
        }
        .unwrap()
    }
}

/// The coordinator's API on a loopback port.
pub struct Api {
    pub base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub async fn serve(c: &Coordinator) -> Api {
        Api::serve_router(c.router(Arc::new(AllowAll))).await
    }

    /// The API with its requests as server spans of `tracer`, as `tessera server` serves
    /// it, and sagas recorded with it.
    pub async fn serve_traced(c: &Coordinator, tracer: tessera_trace::Tracer) -> Api {
        c.trace_with(tracer.clone());
        Api::serve_router(tessera_web::with_traces(
            c.router(Arc::new(AllowAll)),
            Some(tracer),
        ))
        .await
    }

    async fn serve_router(app: axum::Router) -> Api {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Api {
            base: format!("http://{addr}"),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let key = key.map(|k| ("idempotency-key", k));
        self.send_with(method, path, body, key.as_slice()).await
    }

    pub async fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let resp = self
            .http
            .request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned()));
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None, None).await
    }

    /// Polls `GET {path}` until its status is one of `finals`.
    pub async fn until(&self, path: &str, finals: &[&str]) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (s, v) = self.get(path).await;
            assert_eq!(s, 200, "{v}");
            if finals.contains(&v["status"].as_str().unwrap()) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} did not finish: {v}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
