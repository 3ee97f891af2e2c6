//! An etcd v3 client over etcd's JSON gateway: the same API as its gRPC one, as JSON over
//! plain HTTP/1.1 on the client port (etcd 3.4 serves it at `/v3/...`). The gRPC client
//! crates compile etcd's `.proto` files with `protoc` at build time, which a fresh machine
//! with only Rust does not have; the gateway needs nothing but HTTP.
//!
//! Failover: a request goes to the member that last answered, and moves on to the next
//! when it cannot connect. A read (or any request marked idempotent) also moves on when a
//! member fails or answers "unavailable" (no leader, leader changed), until the request's
//! deadline. A write that was sent and got no answer is [`Error::Unknown`]: it may have
//! been applied, and only the caller can tell (as etcd's own robustness tests record it).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera_etcd::Error> {
//! let etcd = tessera_etcd::Client::new(&["127.0.0.1:2379", "127.0.0.1:22379"])?;
//! let rev = etcd.put(b"greeting", b"hello", 0).await?.header.revision;
//! let got = etcd.get(b"greeting").await?;
//! assert_eq!(got.map(|kv| kv.mod_revision), Some(rev));
//! # Ok(()) }
//! ```

mod tls;
mod wire;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use tls::TlsFiles;
pub use wire::{
    CompareResult, DeleteRangeRequest, DeleteRangeResponse, Event, EventType, Header, KeyValue, Op,
    OpResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, Status, Target, TxnRequest,
    TxnResponse, WatchCreate,
};

/// gRPC status codes etcd answers with.
const UNAVAILABLE: i32 = 14;
const OUT_OF_RANGE: i32 = 11;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No member could be reached: nothing was sent, nothing was done.
    #[error("no etcd member could be reached: {0}")]
    Unreachable(String),
    /// The request was sent and no answer came back in time: it may have been applied.
    #[error("etcd did not answer; the request may or may not have been applied: {0}")]
    Unknown(String),
    /// etcd answered with an error: nothing was done.
    #[error("etcd: {message} (code {code})")]
    Status { code: i32, message: String },
    /// A watch asked for revisions that compaction removed; the oldest left is `0`'s
    /// value. Re-list, then watch from the listing's revision.
    #[error("etcd compacted the history up to revision {0}")]
    Compacted(i64),
    #[error("an answer from etcd could not be read: {0}")]
    Decode(String),
    #[error("invalid etcd endpoint {0:?}")]
    Endpoint(String),
    #[error("etcd TLS: {0}")]
    Tls(String),
}

impl Error {
    /// etcd refused the request because the revision it named is compacted.
    pub fn is_compacted(&self) -> bool {
        matches!(self, Error::Compacted(_))
            || matches!(self, Error::Status { code, .. } if *code == OUT_OF_RANGE)
    }
}

/// One condition of a transaction: compares a key's field with a value.
pub type Compare = wire::Compare;

impl Compare {
    fn on(key: impl Into<Vec<u8>>, target: Target, result: CompareResult) -> Compare {
        Compare {
            result,
            target,
            key: key.into(),
            range_end: Vec::new(),
            version: None,
            create_revision: None,
            mod_revision: None,
            value: None,
            lease: None,
        }
    }

    /// The revision of the key's last change (0: the key does not exist).
    pub fn mod_revision(key: impl Into<Vec<u8>>, result: CompareResult, rev: i64) -> Compare {
        Compare {
            mod_revision: Some(rev),
            ..Compare::on(key, Target::Mod, result)
        }
    }

    /// The revision that created the key (0: the key does not exist).
    pub fn create_revision(key: impl Into<Vec<u8>>, result: CompareResult, rev: i64) -> Compare {
        Compare {
            create_revision: Some(rev),
            ..Compare::on(key, Target::Create, result)
        }
    }

    pub fn version(key: impl Into<Vec<u8>>, result: CompareResult, version: i64) -> Compare {
        Compare {
            version: Some(version),
            ..Compare::on(key, Target::Version, result)
        }
    }

    pub fn value(key: impl Into<Vec<u8>>, result: CompareResult, value: Vec<u8>) -> Compare {
        Compare {
            value: Some(value),
            ..Compare::on(key, Target::Value, result)
        }
    }

    /// Applies the comparison to every key in `[key, range_end)`.
    pub fn over(mut self, range_end: Vec<u8>) -> Compare {
        self.range_end = range_end;
        self
    }
}

/// The end of the range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// Whether a request may be sent again after a failure whose outcome is unknown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads, keep-alives: sending twice does no harm.
    Idempotent,
    /// Writes: only sent again when the first attempt never left.
    Once,
}

pub struct Client {
    endpoints: Vec<String>,
    /// The member that answered last; requests start there.
    preferred: AtomicUsize,
    http: HttpClient<tls::Connector, Full<Bytes>>,
    /// How long one request may take, over every member tried.
    timeout: Duration,
}

impl Client {
    /// A client for the members at `endpoints` (`host:port` or `http://host:port`).
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Client, Error> {
        Client::with_tls(endpoints, None)
    }

    /// A client for members that may serve TLS: `https://host:port` endpoints (and,
    /// with `tls`, bare `host:port` ones) are reached over TLS with `tls`'s files.
    pub fn with_tls<S: AsRef<str>>(
        endpoints: &[S],
        tls: Option<&TlsFiles>,
    ) -> Result<Client, Error> {
        let default_scheme = if tls.is_some() { "https" } else { "http" };
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let e = e.as_ref().trim().trim_end_matches('/');
                let url = if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("{default_scheme}://{e}")
                };
                match url.parse::<http::Uri>() {
                    Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => Ok(url),
                    Ok(u)
                        if u.scheme_str() == Some("https")
                            && u.authority().is_some()
                            && tls.is_some() =>
                    {
                        Ok(url)
                    }
                    _ => Err(Error::Endpoint(e.to_owned())),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = tls.map(TlsFiles::config).transpose()?;
        if endpoints.is_empty() {
            return Err(Error::Endpoint(String::new()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(tls::Connector::new(connector, tls));
        Ok(Client {
            endpoints,
            preferred: AtomicUsize::new(0),
            http,
            timeout: Duration::from_secs(5),
        })
    }

    /// How long one request may take over every member tried (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The value of `key`, read linearizably.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, Error> {
        let r = self
            .range(RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.call("kv/range", &req, Retry::Idempotent).await
    }

    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<PutResponse, Error> {
        let req = PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            prev_kv: false,
        };
        self.call("kv/put", &req, Retry::Once).await
    }

    pub async fn delete(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse, Error> {
        self.call("kv/deleterange", &req, Retry::Once).await
    }

    pub async fn txn(&self, req: &TxnRequest) -> Result<TxnResponse, Error> {
        let retry = if req
            .success
            .iter()
            .chain(&req.failure)
            .all(|op| matches!(op, Op::Range(_)))
        {
            Retry::Idempotent
        } else {
            Retry::Once
        };
        self.call("kv/txn", req, retry).await
    }

    /// Drops history up to `revision`; watches from before it then get `Compacted`.
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        #[derive(Serialize)]
        struct Req {
            #[serde(serialize_with = "wire::int_str")]
            revision: i64,
            physical: bool,
        }
        let _: serde_json::Value = self
            .call(
                "kv/compaction",
                &Req {
                    revision,
                    physical: true,
                },
                Retry::Idempotent,
            )
            .await?;
        Ok(())
    }

    /// A lease of `ttl` seconds: its id, and the TTL etcd granted.
    pub async fn lease_grant(&self, ttl: i64) -> Result<(i64, i64), Error> {
        #[derive(Serialize)]
        struct Req {
            #[serde(rename = "TTL", serialize_with = "wire::int_str")]
            ttl: i64,
        }
        let r: wire::LeaseGrantResponse =
            self.call("lease/grant", &Req { ttl }, Retry::Once).await?;
        if !r.error.is_empty() {
            return Err(Error::Status {
                code: 0,
                message: r.error,
            });
        }
        Ok((r.id, r.ttl))
    }

    /// Renews a lease; the TTL left, or `None` when the lease is gone (expired or revoked).
    pub async fn lease_keepalive(&self, id: i64) -> Result<Option<i64>, Error> {
        #[derive(Serialize)]
        struct Req {
            #[serde(rename = "ID", serialize_with = "wire::int_str")]
            id: i64,
        }
        let r: wire::LeaseKeepAliveResult = self
            .call("lease/keepalive", &Req { id }, Retry::Idempotent)
            .await?;
        Ok((r.result.ttl > 0).then_some(r.result.ttl))
    }

    /// Ends a lease and deletes every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), Error> {
        #[derive(Serialize)]
        struct Req {
            #[serde(rename = "ID", serialize_with = "wire::int_str")]
            id: i64,
        }
        let _: serde_json::Value = self.call("lease/revoke", &Req { id }, Retry::Once).await?;
        Ok(())
    }

    /// What the member at `endpoints()[i]` says of the cluster (its leader, its revision).
    pub async fn status_of(&self, i: usize) -> Result<Status, Error> {
        let url = self
            .endpoints
            .get(i)
            .ok_or_else(|| Error::Endpoint(i.to_string()))?;
        let body = Bytes::from_static(b"{}");
        match tokio::time::timeout(self.timeout, self.send(url, "maintenance/status", body)).await {
            Err(_) => Err(Error::Unknown(format!(
                "{url}: no answer in {:?}",
                self.timeout
            ))),
            Ok(Err(e)) => Err(e),
            Ok(Ok(bytes)) => decode(&bytes),
        }
    }

    /// Starts a watch: returns once etcd has made it. A watch from a compacted revision
    /// fails at its first [`Watch::next`] with [`Error::Compacted`].
    pub async fn watch(&self, create: WatchCreate) -> Result<Watch, Error> {
        #[derive(Serialize)]
        struct Req<'a> {
            create_request: &'a WatchCreate,
        }
        let body = Bytes::from(
            serde_json::to_vec(&Req {
                create_request: &create,
            })
            .map_err(|e| Error::Decode(e.to_string()))?,
        );
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let url = &self.endpoints[i];
            let req = match request(url, "watch", body.clone()) {
                Ok(r) => r,
                Err(e) => return Err(e),
            };
            let resp = match tokio::time::timeout(self.timeout, self.http.request(req)).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => {
                    last = format!("{url}: {e}");
                    continue;
                }
                Err(_) => {
                    last = format!("{url}: no answer in {:?}", self.timeout);
                    continue;
                }
            };
            if !resp.status().is_success() {
                let bytes = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(status_error(&bytes));
            }
            let mut watch = Watch {
                body: resp.into_body(),
                buf: BytesMut::new(),
                endpoint: i,
            };
            // The first message says whether the watch was made.
            match tokio::time::timeout(self.timeout, watch.message()).await {
                Ok(Ok(first)) if first.created => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(watch);
                }
                Ok(Ok(first)) if first.compact_revision > 0 => {
                    return Err(Error::Compacted(first.compact_revision));
                }
                Ok(Ok(first)) => {
                    return Err(Error::Status {
                        code: 0,
                        message: format!("watch not created: {}", first.cancel_reason),
                    });
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("{url}: no answer in {:?}", self.timeout),
            }
        }
        Err(Error::Unreachable(last))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        retry: Retry,
    ) -> Result<Resp, Error> {
        let body = Bytes::from(serde_json::to_vec(req).map_err(|e| Error::Decode(e.to_string()))?);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let n = self.endpoints.len();
        let mut i = self.preferred.load(Ordering::Relaxed) % n;
        let mut pause = Duration::from_millis(20);
        let mut tried = 0;
        loop {
            let url = &self.endpoints[i];
            let outcome =
                tokio::time::timeout_at(deadline, self.send(url, path, body.clone())).await;
            let failure = match outcome {
                Ok(Ok(bytes)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return decode(&bytes);
                }
                // Never sent: any member may have it.
                Ok(Err(e @ Error::Unreachable(_))) => e,
                Ok(Err(Error::Status { code, message }))
                    if code == UNAVAILABLE && retry == Retry::Idempotent =>
                {
                    Error::Status { code, message }
                }
                // A write etcd could not confirm (request timed out, leader changed):
                // it may still commit.
                Ok(Err(Error::Status { code, message })) if code == UNAVAILABLE => {
                    return Err(Error::Unknown(message));
                }
                Ok(Err(e @ Error::Status { .. })) => return Err(e),
                Ok(Err(e)) if retry == Retry::Idempotent => e,
                Ok(Err(e)) => return Err(Error::Unknown(e.to_string())),
                Err(_) if retry == Retry::Idempotent => {
                    return Err(Error::Unreachable(format!(
                        "no member answered {path} in {:?}",
                        self.timeout
                    )));
                }
                Err(_) => {
                    return Err(Error::Unknown(format!(
                        "{url}: no answer to {path} in {:?}",
                        self.timeout
                    )));
                }
            };
            tracing::debug!(endpoint = %url, error = %failure, "etcd request failed; trying the next member");
            i = (i + 1) % n;
            tried += 1;
            if tried % n == 0 {
                // A whole round failed (an election, most likely): wait a little.
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(match failure {
                        Error::Unreachable(_) => failure,
                        e if retry == Retry::Once => Error::Unknown(e.to_string()),
                        e => Error::Unreachable(e.to_string()),
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }

    /// One POST; `Unreachable` only when the connection could not be made.
    async fn send(&self, url: &str, path: &str, body: Bytes) -> Result<Bytes, Error> {
        let req = request(url, path, body)?;
        let resp = self.http.request(req).await.map_err(|e| {
            if e.is_connect() {
                Error::Unreachable(format!("{url}: {e}"))
            } else {
                Error::Unknown(format!("{url}: {e}"))
            }
        })?;
        let ok = resp.status().is_success();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Unknown(format!("{url}: {e}")))?
            .to_bytes();
        if ok {
            Ok(bytes)
        } else {
            Err(status_error(&bytes))
        }
    }
}

fn request(url: &str, path: &str, body: Bytes) -> Result<http::Request<Full<Bytes>>, Error> {
    http::Request::post(format!("{url}/v3/{path}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| Error::Endpoint(format!("{url}: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Decode(format!(
            "{e}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ))
    })
}

fn status_error(bytes: &[u8]) -> Error {
    match serde_json::from_slice::<wire::GatewayError>(bytes) {
        Ok(e) => Error::Status {
            code: e.code,
            message: if e.message.is_empty() {
                e.error
            } else {
                e.message
            },
        },
        Err(_) => Error::Status {
            code: 0,
            message: String::from_utf8_lossy(bytes).into_owned(),
        },
    }
}

/// Changes at one revision or more, in order, as one watch answer carries them.
#[derive(Debug, Clone, Default)]
pub struct WatchBatch {
    /// The store's revision when the answer was sent (at least the last event's).
    pub revision: i64,
    pub events: Vec<Event>,
}

/// An open watch: its answers, one batch at a time.
pub struct Watch {
    body: hyper::body::Incoming,
    buf: BytesMut,
    endpoint: usize,
}

impl Watch {
    /// The next batch of changes (or an empty one: a progress report). An error ends
    /// the watch: [`Error::Compacted`] when etcd cancelled it for compaction,
    /// [`Error::Unreachable`] when the member went away. Start a new one from the last
    /// revision seen + 1.
    pub async fn next(&mut self) -> Result<WatchBatch, Error> {
        let m = self.message().await?;
        if m.canceled {
            if m.compact_revision > 0 {
                return Err(Error::Compacted(m.compact_revision));
            }
            return Err(Error::Status {
                code: 0,
                message: format!("watch cancelled: {}", m.cancel_reason),
            });
        }
        Ok(WatchBatch {
            revision: m.header.revision,
            events: m.events,
        })
    }

    /// Which endpoint (an index into `Client::endpoints`) serves this watch.
    pub fn endpoint(&self) -> usize {
        self.endpoint
    }

    /// The next newline-delimited message of the stream.
    async fn message(&mut self) -> Result<wire::WatchResult, Error> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(end + 1);
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let m: wire::WatchMessage = decode(line)?;
                if let Some(e) = m.error {
                    return Err(Error::Status {
                        code: e.code,
                        message: e.message,
                    });
                }
                return Ok(m.result.unwrap_or_default());
            }
            match self.body.frame().await {
                None => return Err(Error::Unreachable("the watch stream ended".into())),
                Some(Err(e)) => {
                    return Err(Error::Unreachable(format!("the watch stream failed: {e}")));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn messages_decode_as_the_gateway_writes_them() {
        let r: RangeResponse = decode(br#"{"header":{"revision":"7","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"7","version":"3","value":"YmFy"}],"count":"1"}"#).unwrap();
        assert_eq!(r.header.revision, 7);
        assert_eq!(r.kvs[0].key, b"foo");
        assert_eq!(r.kvs[0].value, b"bar");
        assert_eq!((r.kvs[0].create_revision, r.kvs[0].mod_revision), (2, 7));
        let t: TxnResponse = decode(br#"{"header":{"revision":"3"},"responses":[{"response_put":{"header":{"revision":"3"}}}]}"#).unwrap();
        assert!(!t.succeeded, "left out when false");
        let c = serde_json::to_value(Compare::mod_revision("k", CompareResult::Equal, 0)).unwrap();
        assert_eq!(c["mod_revision"], "0");
        assert_eq!(c["target"], "MOD");
        assert_eq!(c["result"], "EQUAL");
    }
}
