//! The same protection as tower layers, for services that call each other directly (the
//! SDK's client) rather than through the gateway. Errors are boxed; callers find out why
//! a call was refused with `err.downcast_ref::<BreakerOpen>()` / `::<BulkheadFull>()`.
//!
//! ```
//! use tessera_resilience::{BreakerConfig, BreakerLayer, BulkheadLayer, CircuitBreaker};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! # async fn demo() -> Result<(), tower::BoxError> {
//! let svc = ServiceBuilder::new()
//!     .layer(BulkheadLayer::new(64))
//!     .layer(BreakerLayer::new(CircuitBreaker::new(BreakerConfig::default())))
//!     .service(service_fn(|x: u32| async move { Ok::<_, tower::BoxError>(x * 2) }));
//! assert_eq!(svc.oneshot(21).await?, 42);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{BoxError, Layer, Service};

use crate::{BreakerOpen, Bulkhead, BulkheadFull, CircuitBreaker, RetryBudget};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Decides whether a call's outcome counts as a success for the breaker.
pub type Classify<R> = fn(&Result<R, BoxError>) -> bool;

/// Wraps a service in a [`CircuitBreaker`]. By default an `Err` is a failure and any
/// `Ok` a success; `with_classifier` lets e.g. HTTP 5xx answers count as failures.
pub struct BreakerLayer<R> {
    breaker: CircuitBreaker,
    classify: Option<Classify<R>>,
}

// By hand: a derive would demand `R: Clone`, and responses often are not.
impl<R> Clone for BreakerLayer<R> {
    fn clone(&self) -> Self {
        BreakerLayer {
            breaker: self.breaker.clone(),
            classify: self.classify,
        }
    }
}

impl<R> BreakerLayer<R> {
    /// `R` is the wrapped service's response type (inferred).
    pub fn new(breaker: CircuitBreaker) -> BreakerLayer<R> {
        BreakerLayer {
            breaker,
            classify: None,
        }
    }

    pub fn with_classifier(breaker: CircuitBreaker, classify: Classify<R>) -> BreakerLayer<R> {
        BreakerLayer {
            breaker,
            classify: Some(classify),
        }
    }
}

impl<S, R> Layer<S> for BreakerLayer<R> {
    type Service = Breaker<S, R>;
    fn layer(&self, inner: S) -> Breaker<S, R> {
        Breaker {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify,
        }
    }
}

pub struct Breaker<S, R> {
    inner: S,
    breaker: CircuitBreaker,
    classify: Option<Classify<R>>,
}

impl<S: Clone, R> Clone for Breaker<S, R> {
    fn clone(&self) -> Self {
        Breaker {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classify: self.classify,
        }
    }
}

impl<S, Req> Service<Req> for Breaker<S, S::Response>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = match self.breaker.try_acquire() {
            Ok(p) => p,
            Err(open) => return Box::pin(async move { Err::<_, BoxError>(Box::new(open)) }),
        };
        let fut = self.inner.call(req);
        let classify = self.classify;
        Box::pin(async move {
            let out = fut.await.map_err(Into::into);
            let ok = match classify {
                Some(f) => f(&out),
                None => out.is_ok(),
            };
            if ok {
                permit.success()
            } else {
                permit.failure()
            }
            out
        })
    }
}

/// Refuses calls beyond `max` in flight with [`BulkheadFull`] (no queueing).
#[derive(Clone)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    pub fn new(max: usize) -> BulkheadLayer {
        BulkheadLayer {
            bulkhead: Bulkhead::new(max),
        }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;
    fn layer(&self, inner: S) -> BulkheadService<S> {
        BulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

impl<S, Req> Service<Req> for BulkheadService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = match self.bulkhead.try_acquire() {
            Ok(p) => p,
            Err(full) => return Box::pin(async move { Err::<_, BoxError>(Box::new(full)) }),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let out = fut.await.map_err(Into::into);
            drop(permit);
            out
        })
    }
}

/// A `tower::retry::Policy` that retries failed calls up to `attempts` times while the
/// shared [`RetryBudget`] allows. Requests must be `Clone` to be replayed.
#[derive(Clone)]
pub struct BudgetedRetry {
    budget: Arc<RetryBudget>,
    attempts: usize,
}

impl BudgetedRetry {
    pub fn new(budget: Arc<RetryBudget>, attempts: usize) -> BudgetedRetry {
        BudgetedRetry { budget, attempts }
    }
}

impl<Req: Clone, Res> tower::retry::Policy<Req, Res, BoxError> for BudgetedRetry {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Req,
        result: &mut Result<Res, BoxError>,
    ) -> Option<Self::Future> {
        match result {
            Ok(_) => None,
            // Protection refused the call: retrying would only add load.
            Err(e) if e.is::<BreakerOpen>() || e.is::<BulkheadFull>() => None,
            Err(_) if self.attempts > 0 && self.budget.try_withdraw() => {
                self.attempts -= 1;
                Some(std::future::ready(()))
            }
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        // Every call passes here once before it is first sent: the budget's deposit.
        Some(req.clone())
    }
}

impl BudgetedRetry {
    /// Records an original request in the budget (call once per logical call).
    pub fn deposit(&self) {
        self.budget.deposit();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::{BreakerConfig, BudgetConfig, State};

    #[tokio::test(start_paused = true)]
    async fn breaker_layer_opens_and_rejects() {
        let breaker = CircuitBreaker::new(BreakerConfig {
            min_calls: 3,
            ..BreakerConfig::default()
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let svc = ServiceBuilder::new()
            .layer(BreakerLayer::new(breaker.clone()))
            .service(service_fn(move |_: ()| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), BoxError>("down".into()) }
            }));
        for _ in 0..3 {
            assert!(svc.clone().oneshot(()).await.is_err());
        }
        assert_eq!(breaker.state(), State::Open);
        let err = svc.clone().oneshot(()).await.unwrap_err();
        assert!(err.is::<BreakerOpen>(), "{err}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "open: the inner service is not called"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn classifier_counts_answers_as_failures() {
        let breaker = CircuitBreaker::new(BreakerConfig {
            min_calls: 2,
            ..BreakerConfig::default()
        });
        let svc = ServiceBuilder::new()
            .layer(BreakerLayer::with_classifier(
                breaker.clone(),
                |r: &Result<u16, BoxError>| matches!(r, Ok(s) if *s < 500),
            ))
            .service(service_fn(|_: ()| async { Ok::<u16, BoxError>(503) }));
        for _ in 0..2 {
            assert_eq!(svc.clone().oneshot(()).await.unwrap(), 503);
        }
        assert_eq!(breaker.state(), State::Open);
    }

    #[tokio::test]
    async fn bulkhead_layer_refuses_beyond_max() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
        let svc = ServiceBuilder::new()
            .layer(BulkheadLayer::new(1))
            .service(service_fn(move |_: ()| {
                let rx = rx.clone();
                async move {
                    if let Some(rx) = rx.lock().await.take() {
                        let _ = rx.await;
                    }
                    Ok::<_, BoxError>(())
                }
            }));
        let first = tokio::spawn(svc.clone().oneshot(()));
        tokio::task::yield_now().await;
        let err = svc.clone().oneshot(()).await.unwrap_err();
        assert!(err.is::<BulkheadFull>(), "{err}");
        tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert!(svc.oneshot(()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_when_the_budget_is_spent() {
        let budget = Arc::new(RetryBudget::new(BudgetConfig {
            ratio: 0.0,
            min_per_sec: 1,
            window: std::time::Duration::from_secs(10),
        }));
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let inner = service_fn(move |_: u8| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), BoxError>("flaky".into()) }
        });
        let policy = BudgetedRetry::new(budget, 3);
        for _ in 0..5 {
            policy.deposit();
            let svc = tower::retry::Retry::new(policy.clone(), inner.clone());
            assert!(svc.oneshot(1).await.is_err());
        }
        // Budget: 1/s × 10 s = 10 retries in all; 5 calls wanted 15.
        assert_eq!(calls.load(Ordering::SeqCst), 5 + 10);
    }
}
