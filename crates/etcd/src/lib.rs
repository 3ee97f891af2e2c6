//! An etcd v3 client speaking etcd's gRPC API over HTTP/2, with the messages declared by
//! hand (`wire.rs`) instead of compiled from `.proto` files, so a fresh machine with only
//! Rust builds it. etcd 3.4 also serves a JSON gateway on the client port, which the first
//! version of this client used; through it etcd spent 2.5x the CPU on each of Tessera's
//! writes and watch events (bench/README.md).
//!
//! Failover: a request goes to the member that last answered, and moves on to the next
//! when it cannot connect. A read (or any request marked idempotent) also moves on when a
//! member fails, answers "unavailable" (no leader, leader changed) or takes longer than
//! one attempt's time, until the request's deadline. A write that was sent and got no
//! answer is [`Error::Unknown`]: it may have been applied, and only the caller can tell
//! (as etcd's own robustness tests record it). A write is not left waiting out the whole
//! deadline on a member whose leader died under it: such a member drops the write it
//! forwarded, and never answers it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera_etcd::Error> {
//! let etcd = tessera_etcd::Client::new(&["127.0.0.1:2379", "127.0.0.1:22379"])?;
//! let rev = etcd.put(b"greeting", b"hello", 0).await?.revision();
//! let got = etcd.get(b"greeting").await?;
//! assert_eq!(got.map(|kv| kv.mod_revision), Some(rev));
//! # Ok(()) }
//! ```

mod grpc;
mod tls;
mod wire;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prost::Message;

use grpc::Body;
pub use tls::TlsFiles;
use wire::Answer;
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
    fn on(key: impl Into<Vec<u8>>, result: CompareResult, against: wire::Against) -> Compare {
        let target = match against {
            wire::Against::Version(_) => Target::Version,
            wire::Against::CreateRevision(_) => Target::Create,
            wire::Against::ModRevision(_) => Target::Mod,
            wire::Against::Value(_) => Target::Value,
            wire::Against::Lease(_) => Target::Lease,
        };
        Compare {
            result: result as i32,
            target: target as i32,
            key: key.into(),
            against: Some(against),
            range_end: Vec::new(),
        }
    }

    /// The revision of the key's last change (0: the key does not exist).
    pub fn mod_revision(key: impl Into<Vec<u8>>, result: CompareResult, rev: i64) -> Compare {
        Compare::on(key, result, wire::Against::ModRevision(rev))
    }

    /// The revision that created the key (0: the key does not exist).
    pub fn create_revision(key: impl Into<Vec<u8>>, result: CompareResult, rev: i64) -> Compare {
        Compare::on(key, result, wire::Against::CreateRevision(rev))
    }

    pub fn version(key: impl Into<Vec<u8>>, result: CompareResult, version: i64) -> Compare {
        Compare::on(key, result, wire::Against::Version(version))
    }

    pub fn value(key: impl Into<Vec<u8>>, result: CompareResult, value: Vec<u8>) -> Compare {
        Compare::on(key, result, wire::Against::Value(value))
    }

    /// Applies the comparison to every key in `[key, range_end)`.
    pub fn over(mut self, range_end: Vec<u8>) -> Compare {
        self.range_end = range_end;
        self
    }

    /// The key compared (the start of the range, for one made with [`Compare::over`]).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Whether it compares a range of keys rather than one.
    pub fn is_range(&self) -> bool {
        !self.range_end.is_empty()
    }
}

impl Op {
    /// The key operated on (the start of the range, for a ranged one).
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Range(r) => &r.key,
            Op::Put(p) => &p.key,
            Op::Delete(d) => &d.key,
        }
    }

    /// Whether it covers a range of keys rather than one.
    pub fn is_range(&self) -> bool {
        match self {
            Op::Range(r) => !r.range_end.is_empty(),
            Op::Put(_) => false,
            Op::Delete(d) => !d.range_end.is_empty(),
        }
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
    /// Writes: only sent again when the first attempt surely never reached raft.
    Once,
}

/// How long one member has to answer a read before the client moves on to the next.
const ATTEMPT: Duration = Duration::from_secs(1);

/// How often a write that has waited twice this long asks its member whether an election
/// has happened since: a follower drops the write it forwarded to a leader that died,
/// and never answers it, so the write is then reported unknown rather than held until
/// the deadline. A slow write on a healthy cluster only costs a status call per period.
const WRITE_CHECK: Duration = Duration::from_millis(250);

/// etcd's answer when a request carrying `hasleader` reaches a member with no leader:
/// it refused the request before proposing anything.
const NO_LEADER: &str = "etcdserver: no leader";

pub struct Client {
    endpoints: Vec<String>,
    /// The member that answered last; requests start there.
    preferred: AtomicUsize,
    http: HttpClient<tls::Connector, Body>,
    /// How long one request may take, over every member tried.
    timeout: Duration,
    /// The highest raft term in any answer so far: a member reporting a higher one has
    /// held an election since (0: none seen yet).
    term: AtomicU64,
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
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            // A member that stops answering (SIGSTOP, a cut link) is noticed even by a
            // watch that expects nothing. Pings only while a call is open: etcd turns
            // away clients that ping an idle connection more often than every 5 s.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .http2_keep_alive_while_idle(false)
            .build(tls::Connector::new(connector, tls));
        Ok(Client {
            endpoints,
            preferred: AtomicUsize::new(0),
            http,
            timeout: Duration::from_secs(5),
            term: AtomicU64::new(0),
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
        self.call("/etcdserverpb.KV/Range", &req, Retry::Idempotent)
            .await
    }

    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<PutResponse, Error> {
        let req = PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            prev_kv: false,
        };
        self.call("/etcdserverpb.KV/Put", &req, Retry::Once).await
    }

    pub async fn delete(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse, Error> {
        self.call("/etcdserverpb.KV/DeleteRange", &req, Retry::Once)
            .await
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
        let r: wire::TxnResponsePb = self
            .call(
                "/etcdserverpb.KV/Txn",
                &wire::TxnRequestPb::from(req),
                retry,
            )
            .await?;
        Ok(r.into())
    }

    /// Drops history up to `revision`; watches from before it then get `Compacted`.
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        let req = wire::CompactionRequest {
            revision,
            physical: true,
        };
        let _: wire::Empty = self
            .call("/etcdserverpb.KV/Compact", &req, Retry::Idempotent)
            .await?;
        Ok(())
    }

    /// A lease of `ttl` seconds: its id, and the TTL etcd granted.
    pub async fn lease_grant(&self, ttl: i64) -> Result<(i64, i64), Error> {
        let req = wire::LeaseGrantRequest { ttl, id: 0 };
        let r: wire::LeaseGrantResponse = self
            .call("/etcdserverpb.Lease/LeaseGrant", &req, Retry::Once)
            .await?;
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
        // One request on the keep-alive stream, which then ends: etcd answers it and
        // closes the call.
        let r: wire::LeaseKeepAliveResponse = self
            .call(
                "/etcdserverpb.Lease/LeaseKeepAlive",
                &wire::LeaseId { id },
                Retry::Idempotent,
            )
            .await?;
        Ok((r.ttl > 0).then_some(r.ttl))
    }

    /// Ends a lease and deletes every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), Error> {
        let _: wire::Empty = self
            .call(
                "/etcdserverpb.Lease/LeaseRevoke",
                &wire::LeaseId { id },
                Retry::Once,
            )
            .await?;
        Ok(())
    }

    /// What the member at `endpoints()[i]` says of the cluster (its leader, its revision),
    /// answered even while it has no leader.
    pub async fn status_of(&self, i: usize) -> Result<Status, Error> {
        let url = self
            .endpoints
            .get(i)
            .ok_or_else(|| Error::Endpoint(i.to_string()))?;
        let body = grpc::frame(&wire::Empty {});
        let call = self.unary(url, "/etcdserverpb.Maintenance/Status", body, false);
        match tokio::time::timeout(self.timeout.min(ATTEMPT), call).await {
            Err(_) => Err(Error::Unknown(format!("{url}: no answer in {ATTEMPT:?}"))),
            Ok(r) => r,
        }
    }

    /// Starts a watch: returns once etcd has made it. A watch from a compacted revision
    /// fails at its first [`Watch::next`] with [`Error::Compacted`].
    pub async fn watch(&self, create: WatchCreate) -> Result<Watch, Error> {
        let msg = grpc::frame(&wire::WatchRequest {
            create_request: Some(create),
        });
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let url = &self.endpoints[i];
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            // Cannot fail: the receiver is right here.
            let _ = tx.send(msg.clone());
            let req = grpc::request(url, "/etcdserverpb.Watch/Watch", Body::Stream(rx), true)?;
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
            let (parts, body) = resp.into_parts();
            if let Some(Err(e)) = grpc::status(&parts.headers) {
                // Refused at once (this member has no leader): try another.
                last = format!("{url}: {e}");
                continue;
            }
            let mut watch = Watch {
                body,
                buf: BytesMut::new(),
                endpoint: i,
                _requests: tx,
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

    async fn call<Req: Message, Resp: Answer>(
        &self,
        path: &str,
        req: &Req,
        retry: Retry,
    ) -> Result<Resp, Error> {
        let body = grpc::frame(req);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let n = self.endpoints.len();
        let mut i = self.preferred.load(Ordering::Relaxed) % n;
        let mut pause = Duration::from_millis(20);
        let mut tried = 0;
        loop {
            let url = &self.endpoints[i];
            let outcome = tokio::time::timeout_at(
                deadline,
                self.attempt::<Resp>(i, path, body.clone(), retry),
            )
            .await;
            let failure = match outcome {
                Ok(Some(Ok(resp))) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    if let Some(h) = resp.header() {
                        self.term.fetch_max(h.raft_term, Ordering::Relaxed);
                    }
                    return Ok(resp);
                }
                // Never sent, or refused before raft saw it: any member may take it.
                Ok(Some(Err(e @ Error::Unreachable(_)))) => e,
                Ok(Some(Err(Error::Status { code, message })))
                    if code == UNAVAILABLE
                        && (retry == Retry::Idempotent || message == NO_LEADER) =>
                {
                    Error::Status { code, message }
                }
                // A write etcd could not confirm (request timed out, leader changed):
                // it may still commit.
                Ok(Some(Err(Error::Status { code, message }))) if code == UNAVAILABLE => {
                    return Err(Error::Unknown(message));
                }
                Ok(Some(Err(e @ Error::Status { .. }))) => return Err(e),
                Ok(Some(Err(e))) if retry == Retry::Idempotent => e,
                Ok(Some(Err(e))) => return Err(Error::Unknown(e.to_string())),
                // A read that took one attempt's time: another member may be quicker.
                Ok(None) if retry == Retry::Idempotent => {
                    Error::Unreachable(format!("{url}: no answer in {ATTEMPT:?}"))
                }
                Ok(None) => {
                    return Err(Error::Unknown(format!(
                        "{url}: the member held an election or stopped answering while {path} was in flight"
                    )));
                }
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

    /// One call to the member at `endpoints[i]`; `None` when the caller should stop
    /// waiting for it (see [`ATTEMPT`] and [`WRITE_CHECK`]).
    async fn attempt<Resp: Answer>(
        &self,
        i: usize,
        path: &str,
        body: Bytes,
        retry: Retry,
    ) -> Option<Result<Resp, Error>> {
        let call = self.unary(&self.endpoints[i], path, body, true);
        tokio::pin!(call);
        if retry == Retry::Idempotent {
            return tokio::time::timeout(ATTEMPT, &mut call).await.ok();
        }
        let mut wait = WRITE_CHECK * 2;
        loop {
            match tokio::time::timeout(wait, &mut call).await {
                Ok(r) => return Some(r),
                Err(_) if self.held_election(i).await => return None,
                Err(_) => wait = WRITE_CHECK,
            }
        }
    }

    /// One unary call to the member at `url`, however long it takes.
    async fn unary<Resp: Answer>(
        &self,
        url: &str,
        path: &str,
        body: Bytes,
        needs_leader: bool,
    ) -> Result<Resp, Error> {
        let req = grpc::request(url, path, Body::Once(Some(body)), needs_leader)?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| sent_error(url, &e))?;
        grpc::unary_answer(url, resp).await
    }

    /// Whether the member at `endpoints[i]` has no leader, has elected one since this
    /// client's last answer, or does not answer at all.
    async fn held_election(&self, i: usize) -> bool {
        match self.status_of(i).await {
            Ok(s) => {
                let seen = self.term.load(Ordering::Relaxed);
                s.leader == 0 || (seen > 0 && s.raft_term > seen)
            }
            Err(_) => true,
        }
    }
}

/// A failed call: `Unreachable` only when the connection could not be made.
fn sent_error(url: &str, e: &hyper_util::client::legacy::Error) -> Error {
    if e.is_connect() {
        Error::Unreachable(format!("{url}: {e}"))
    } else {
        Error::Unknown(format!("{url}: {e}"))
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
    /// The call's request stream, open while the watch lives: dropping it ends the call.
    _requests: tokio::sync::mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    /// The next batch of changes (or an empty one: a progress report). An error ends
    /// the watch: [`Error::Compacted`] when etcd cancelled it for compaction,
    /// [`Error::Unreachable`] when the member went away, a status when etcd ended it
    /// (its member lost the leader). Start a new one from the last revision seen + 1.
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
            revision: m.header.as_ref().map_or(0, |h| h.revision),
            events: m.events.into_iter().map(Event::from).collect(),
        })
    }

    /// Which endpoint (an index into `Client::endpoints`) serves this watch.
    pub fn endpoint(&self) -> usize {
        self.endpoint
    }

    /// The next message of the stream.
    async fn message(&mut self) -> Result<wire::WatchResponse, Error> {
        use http_body_util::BodyExt;
        loop {
            if let Some(m) = grpc::next_message(&mut self.buf) {
                return m;
            }
            match self.body.frame().await {
                None => return Err(Error::Unreachable("the watch stream ended".into())),
                Some(Err(e)) => {
                    return Err(Error::Unreachable(format!("the watch stream failed: {e}")));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buf.extend_from_slice(&data),
                    Err(frame) => {
                        if let Some(Err(e)) = frame.trailers_ref().and_then(grpc::status) {
                            return Err(e);
                        }
                        return Err(Error::Unreachable("the watch stream ended".into()));
                    }
                },
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
    fn compares_send_a_zero_they_compare_with() {
        // proto3 leaves zero fields out, but a oneof member is always written: a compare
        // on "the key does not exist" (mod revision 0) must reach etcd as such.
        let c = Compare::mod_revision("k", CompareResult::Equal, 0);
        let bytes = c.encode_to_vec();
        let back = Compare::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.against, Some(wire::Against::ModRevision(0)));
        assert_eq!(back.target, Target::Mod as i32);
        assert!(
            bytes.ends_with(&[6 << 3, 0]),
            "field 6, varint 0: {bytes:?}"
        );
    }
}
