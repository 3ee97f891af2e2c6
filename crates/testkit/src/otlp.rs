//! An OTLP/HTTP collector for tests: it accepts what processes export to `/v1/traces`
//! and reads the spans back out of the protobuf, so a test asserts on the trace a real
//! process sent over a real socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;

/// A span as the collector read it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeenSpan {
    /// Hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub name: String,
    /// OTLP's numbers: 2 server, 3 client.
    pub kind: u64,
    /// Every attribute's value as text.
    pub attributes: HashMap<String, String>,
    /// Names of the span's events.
    pub events: Vec<String>,
    /// 2 when the span is an error.
    pub status_code: u64,
    /// The resource's `service.name`.
    pub service: String,
}

/// One request the collector received.
#[derive(Clone, Debug)]
pub struct Post {
    pub path: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// A collector on an ephemeral loopback port.
pub struct Collector {
    /// The base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` takes it.
    pub endpoint: String,
    posts: Arc<Mutex<Vec<Post>>>,
}

impl Collector {
    /// One that answers 200 at once.
    pub async fn start() -> Collector {
        Collector::answering(Some(200)).await
    }

    /// One that answers `status` (a failing collector), or takes requests and never
    /// answers them (`None`: a hung one).
    pub async fn answering(status: Option<u16>) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let addr = listener.local_addr().expect("the collector's address");
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let seen = posts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let body = req.into_body().collect().await?.to_bytes().to_vec();
                            seen.lock().expect("posts").push(Post {
                                path,
                                content_type,
                                body,
                            });
                            let Some(status) = status else {
                                return std::future::pending().await;
                            };
                            let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(status).expect("a status code");
                            Ok::<_, hyper::Error>(resp)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        Collector {
            endpoint: format!("http://{addr}"),
            posts,
        }
    }

    /// A tracer exporting `service`'s spans here within ~20 ms of their end, sampling as
    /// `sampler` says.
    pub fn tracer(&self, service: &str, sampler: tessera_trace::Sampler) -> tessera_trace::Tracer {
        let url = format!("{}/v1/traces", self.endpoint);
        let mut config =
            tessera_trace::Config::new(url.parse().expect("the collector's URL"), service);
        config.delay = std::time::Duration::from_millis(20);
        tessera_trace::Tracer::new(sampler, tessera_trace::Exporter::start(config))
    }

    /// Every request received so far.
    pub fn posts(&self) -> Vec<Post> {
        self.posts.lock().expect("posts").clone()
    }

    /// Every span received at `/v1/traces` so far.
    pub fn spans(&self) -> Vec<SeenSpan> {
        self.posts()
            .iter()
            .filter(|p| p.path == "/v1/traces")
            .flat_map(|p| decode(&p.body))
            .collect()
    }
}

/// One protobuf field: its number and its value (varint or fixed as a number, or bytes).
enum Field<'a> {
    Num(u64),
    Bytes(&'a [u8]),
}

fn fields(mut b: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let Some(key) = varint(&mut b) else { break };
        let value = match key & 7 {
            0 => match varint(&mut b) {
                Some(v) => Field::Num(v),
                None => break,
            },
            1 if b.len() >= 8 => {
                let (v, rest) = b.split_at(8);
                b = rest;
                Field::Num(u64::from_le_bytes(v.try_into().unwrap_or_default()))
            }
            2 => {
                let Some(n) = varint(&mut b).map(|n| n as usize).filter(|n| *n <= b.len()) else {
                    break;
                };
                let (v, rest) = b.split_at(n);
                b = rest;
                Field::Bytes(v)
            }
            5 if b.len() >= 4 => {
                let (v, rest) = b.split_at(4);
                b = rest;
                Field::Num(u64::from(u32::from_le_bytes(
                    v.try_into().unwrap_or_default(),
                )))
            }
            _ => break,
        };
        out.push((key >> 3, value));
    }
    out
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

fn sub(b: &[u8], n: u64) -> Vec<&[u8]> {
    fields(b)
        .into_iter()
        .filter_map(|(k, v)| match v {
            Field::Bytes(x) if k == n => Some(x),
            _ => None,
        })
        .collect()
}

fn num(b: &[u8], n: u64) -> u64 {
    fields(b)
        .into_iter()
        .find_map(|(k, v)| match v {
            Field::Num(x) if k == n => Some(x),
            _ => None,
        })
        .unwrap_or(0)
}

fn text(b: &[u8], n: u64) -> String {
    sub(b, n)
        .first()
        .map(|x| String::from_utf8_lossy(x).into_owned())
        .unwrap_or_default()
}

fn hex(b: &[u8], n: u64) -> String {
    sub(b, n)
        .first()
        .map(|x| x.iter().map(|c| format!("{c:02x}")).collect())
        .unwrap_or_default()
}

/// KeyValue list → text values (AnyValue: string 1, bool 2, int 3, double 4).
fn attributes(kvs: Vec<&[u8]>) -> HashMap<String, String> {
    kvs.into_iter()
        .map(|kv| {
            let value = sub(kv, 2).first().map_or(String::new(), |any| {
                match fields(any).into_iter().next() {
                    Some((1, Field::Bytes(s))) => String::from_utf8_lossy(s).into_owned(),
                    Some((2, Field::Num(v))) => (v != 0).to_string(),
                    Some((3, Field::Num(v))) => (v as i64).to_string(),
                    Some((4, Field::Num(v))) => f64::from_bits(v).to_string(),
                    _ => String::new(),
                }
            });
            (text(kv, 1), value)
        })
        .collect()
}

/// The spans of one `ExportTraceServiceRequest`.
pub fn decode(body: &[u8]) -> Vec<SeenSpan> {
    let mut out = Vec::new();
    for rs in sub(body, 1) {
        let resource = sub(rs, 1)
            .first()
            .map(|r| attributes(sub(r, 1)))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in sub(rs, 2) {
            for s in sub(ss, 2) {
                out.push(SeenSpan {
                    trace_id: hex(s, 1),
                    span_id: hex(s, 2),
                    parent_id: hex(s, 4),
                    name: text(s, 5),
                    kind: num(s, 6),
                    attributes: attributes(sub(s, 9)),
                    events: sub(s, 11).into_iter().map(|e| text(e, 2)).collect(),
                    status_code: sub(s, 15).first().map_or(0, |st| num(st, 3)),
                    service: service.clone(),
                });
            }
        }
    }
    out
}
