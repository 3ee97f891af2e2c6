//! The calling side: a tower service that generated tonic clients send through, which
//! runs each call through the [`ServiceClient`]'s loop.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use tessera_core::grpc::{Code, format_timeout, parse_timeout};

use crate::client::{CallPolicy, Exchange, ServiceClient, Verdict};
use crate::http::{Error, MAX_BODY};
use crate::registry::Registry;

type H2 = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// How calls through a [`GrpcChannel`] are timed out and retried.
#[derive(Debug, Clone)]
pub struct GrpcPolicy {
    /// Attempts and timeouts, as for HTTP calls; a call's own deadline (`grpc-timeout`,
    /// tonic's `Request::set_timeout`) shortens `timeout`, never lengthens it.
    pub call: CallPolicy,
    /// Codes retried for every method. UNAVAILABLE, the default, says the callee did
    /// not act on the call (and a dropped connection counts as it, as gRPC clients see
    /// it).
    pub retryable: Vec<Code>,
    /// More codes retried for one method (`/package.Service/Method`), for methods safe
    /// to repeat.
    pub methods: BTreeMap<String, Vec<Code>>,
}

impl Default for GrpcPolicy {
    fn default() -> Self {
        GrpcPolicy {
            call: CallPolicy::default(),
            retryable: vec![Code::Unavailable],
            methods: BTreeMap::new(),
        }
    }
}

/// A gRPC channel to every passing instance of a service: hand it to a generated client.
///
/// ```no_run
/// # fn demo() {
/// let registry = tessera::Registry::new("127.0.0.1:8500");
/// let channel = tessera::grpc::GrpcChannel::new(&registry, "cart");
/// // let mut cart = CartClient::new(channel);
/// // cart.get_cart(request).await?;
/// # }
/// ```
///
/// Calls are unary as the loop sees them: the request is read whole before the first try
/// (so it can be sent again), and the answer is read whole, trailers included, before
/// it is judged.
#[derive(Clone)]
pub struct GrpcChannel {
    client: ServiceClient,
    h2: H2,
    policy: Arc<GrpcPolicy>,
}

impl GrpcChannel {
    pub fn new(registry: &Registry, service: &str) -> GrpcChannel {
        GrpcChannel::with_policy(registry, service, GrpcPolicy::default())
    }

    pub fn with_policy(registry: &Registry, service: &str, policy: GrpcPolicy) -> GrpcChannel {
        GrpcChannel {
            client: ServiceClient::with_policy(registry, service, policy.call.clone()),
            h2: crate::http::h2_client(),
            policy: Arc::new(policy),
        }
    }

    /// The discovery view this channel balances over.
    pub fn watch(&self) -> &crate::Watch {
        self.client.watch()
    }

    async fn unary(
        self,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let service = self.client.service().to_owned();
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return status(Code::Internal, &format!("reading the request: {e}"));
            }
        };
        let timeout = parts
            .headers
            .get("grpc-timeout")
            .and_then(|v| parse_timeout(v.as_bytes()))
            .map_or(self.policy.call.timeout, |t| {
                t.min(self.policy.call.timeout)
            });
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
        let retryable = self
            .policy
            .retryable
            .iter()
            .chain(
                self.policy
                    .methods
                    .get(parts.uri.path())
                    .into_iter()
                    .flatten(),
            )
            .copied()
            .collect();
        let call = Call {
            channel: &self,
            service: &service,
            path,
            headers: parts.headers,
            body,
            retryable,
        };
        match self.client.call(&call, timeout).await {
            Ok(answer) => answer.into_response(&service),
            Err(e) => status(code_of(&e), &e.to_string()),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for GrpcChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move { Ok(channel.unary(req).await) })
    }
}

/// The status a caller sees when the loop itself gave up.
fn code_of(e: &Error) -> Code {
    match e {
        Error::Timeout(..) => Code::DeadlineExceeded,
        Error::NoInstance(_) | Error::BreakerOpen(_) | Error::Transport { .. } => Code::Unavailable,
        Error::Invalid(_) => Code::Internal,
        Error::Status { .. } | Error::Decode(..) => Code::Unknown,
    }
}

/// A trailers-only answer.
fn status(code: Code, message: &str) -> http::Response<tonic::body::Body> {
    tessera_web::grpc_status(code, message)
}

struct Call<'a> {
    channel: &'a GrpcChannel,
    service: &'a str,
    /// `/package.Service/Method`.
    path: String,
    headers: HeaderMap,
    body: Bytes,
    retryable: Vec<Code>,
}

/// One try's whole answer.
struct Answer {
    code: Code,
    http: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Answer {
    fn into_response(self, service: &str) -> http::Response<tonic::body::Body> {
        if self.http != StatusCode::OK {
            return status(
                self.code,
                &format!("{service} answered HTTP {} to a gRPC call", self.http),
            );
        }
        let trailers = self.trailers;
        let body = Full::new(self.body).with_trailers(async move { trailers.map(Ok) });
        let mut resp = http::Response::new(tonic::body::Body::new(body));
        *resp.headers_mut() = self.headers;
        resp
    }
}

impl Exchange for Call<'_> {
    type Answer = Answer;

    fn method(&self) -> &Method {
        &Method::POST
    }

    async fn send(
        &self,
        authority: &str,
        span: Option<&crate::trace::Try>,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        let transport = |e: &dyn std::error::Error, connect: bool| Error::Transport {
            target: self.service.to_owned(),
            message: tessera_core::error_chain(e),
            connect,
        };
        let mut req = http::Request::builder()
            .method(Method::POST)
            .uri(format!("http://{authority}{}", self.path))
            .body(Full::new(self.body.clone()))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let h = req.headers_mut();
        for (k, v) in &self.headers {
            if k != header::HOST {
                h.append(k, v.clone());
            }
        }
        // The callee's deadline is what is left of this try's.
        if let Ok(v) = HeaderValue::from_str(&format_timeout(timeout)) {
            h.insert("grpc-timeout", v);
        }
        for (k, v) in span.map(|s| s.fields()).unwrap_or_default() {
            if let Ok(v) = HeaderValue::try_from(v) {
                h.insert(k, v);
            }
        }
        let resp = self
            .channel
            .h2
            .request(req)
            .await
            .map_err(|e| transport(&e, e.is_connect()))?;
        let (parts, body) = resp.into_parts();
        if parts.status != StatusCode::OK {
            return Ok(Answer {
                code: Code::from_http_status(parts.status.as_u16()),
                http: parts.status,
                headers: parts.headers,
                body: Bytes::new(),
                trailers: None,
            });
        }
        let grpc_status =
            |h: &HeaderMap| h.get("grpc-status").and_then(|v| Code::parse(v.as_bytes()));
        // Trailers-only: the status is in the headers and there is no body to wait for.
        if let Some(code) = grpc_status(&parts.headers) {
            return Ok(Answer {
                code,
                http: parts.status,
                headers: parts.headers,
                body: Bytes::new(),
                trailers: None,
            });
        }
        let collected = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| transport(&*e, false))?;
        let trailers = collected.trailers().cloned();
        // An answer that ends without a status was cut off.
        let code = trailers
            .as_ref()
            .and_then(grpc_status)
            .unwrap_or(Code::Unavailable);
        Ok(Answer {
            code,
            http: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    fn status(answer: &Answer) -> u16 {
        answer.code.http_status()
    }

    fn end_span(
        &self,
        span: crate::trace::Try,
        endpoint: &str,
        attempt: u32,
        result: &Result<Answer, Error>,
    ) {
        let path = self.path.split('?').next().unwrap_or_default();
        let code = match result {
            Ok(a) => Ok(a.code as u16),
            Err(e) => Err(crate::client::no_answer(e)),
        };
        span.finish_grpc(path, endpoint, attempt, code);
    }

    fn judge(&self, result: &Result<Answer, Error>) -> Verdict {
        let retryable = |c: Code| self.retryable.contains(&c);
        match result {
            Ok(a) => Verdict {
                failed: a.code.is_failure(),
                retry: retryable(a.code),
            },
            // Never reached the instance: safe to send elsewhere.
            Err(Error::Transport { connect: true, .. }) => Verdict {
                failed: true,
                retry: true,
            },
            Err(Error::Timeout(..)) => Verdict {
                failed: true,
                retry: retryable(Code::DeadlineExceeded),
            },
            Err(_) => Verdict {
                failed: true,
                retry: retryable(Code::Unavailable),
            },
        }
    }
}
