//! The one HTTP client of the `tessera` binary: the CLI's commands (`Api` in
//! client.rs), the demo supervisor and its load generator all send through it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A pooled HTTP/1.1 client with a 30 s limit per exchange.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new() -> Http {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        c.set_connect_timeout(Some(Duration::from_secs(2)));
        Http {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(c),
        }
    }

    /// One exchange: the status and the whole body. Errors name the URL and the cause.
    pub async fn raw(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, Bytes), String> {
        self.raw_request(method, url, headers, body)
            .await
            .map_err(|(_, e)| e)
    }

    /// `raw`, telling apart a failure to connect (`true`: nothing was sent, another server
    /// may take the request) from the rest.
    pub async fn raw_request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, Bytes), (bool, String)> {
        let mut req = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| (false, format!("bad request to {url}: {e}")))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| (false, format!("{url}: no answer within 30s")))?
            .map_err(|e| {
                (
                    e.is_connect(),
                    format!("{url}: {}", tessera_core::error_chain(&e)),
                )
            })?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| (false, format!("reading the answer from {url}: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// A JSON exchange with an optional bearer token and idempotency key; a body that is
    /// not JSON comes back as a JSON string.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(b) = &bearer {
            headers.push(("authorization", b));
        }
        if let Some(k) = key {
            headers.push(("idempotency-key", k));
        }
        let body = match body {
            Some(b) => {
                headers.push(("content-type", "application/json"));
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let (status, bytes) = self.raw(method, url, &headers, body).await?;
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, v))
    }

    pub async fn get(&self, url: &str, token: Option<&str>) -> Result<(u16, Value), String> {
        self.send("GET", url, token, None, None).await
    }

    pub async fn post(
        &self,
        url: &str,
        token: Option<&str>,
        body: &Value,
        key: Option<&str>,
    ) -> Result<(u16, Value), String> {
        self.send("POST", url, token, Some(body), key).await
    }
}
