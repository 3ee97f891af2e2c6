//! The saga state machine. One task per saga walks its steps; every transition is
//! committed to the store before the next participant call, so a crash at any point
//! resumes from a state that says what may already have happened:
//!
//! - a step is marked `running` (its compensation armed) in the same write that records
//!   the previous step's success, before its action is called; after a crash it is
//!   called again with the same `Idempotency-Key`;
//! - a step whose action failed after its retries makes the saga `compensating`; steps
//!   that succeeded, and a failed step that may have taken effect (timeout, reset, 5xx),
//!   are compensated last first, each retried until it succeeds or its retry limit makes
//!   the saga `stuck`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tessera_balance::{Balancer, Endpoint, EndpointSet, Policy};

use crate::def::{CallDef, SagaDef, StepDef};
use crate::saga::{Attempt, Saga, SagaStatus, StepStatus, new_id, now_ms};
use crate::store::{Store, StoreError};

/// Where registry services are found: their healthy instances as (`host:port`, weight).
pub trait Resolve: Send + Sync + 'static {
    fn healthy(&self, service: &str) -> Vec<(String, u32)>;
}

/// Largest participant response body read (the rest is dropped with the connection).
const MAX_RESPONSE: usize = 64 * 1024;

#[derive(Default)]
pub struct Stats {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub compensated: AtomicU64,
    pub stuck: AtomicU64,
    pub calls: AtomicU64,
    pub failed_calls: AtomicU64,
}

pub struct Engine {
    pub(crate) store: Store,
    client: Client<HttpConnector, Full<Bytes>>,
    resolver: Option<Arc<dyn Resolve>>,
    balancer: Balancer,
    /// Per service: the endpoint set calls are balanced over, rebuilt when the registry's
    /// answer changes (keeping each endpoint's load and latency).
    sets: Mutex<HashMap<String, Arc<EndpointSet>>>,
    /// The latest state of sagas in flight, attempts included, for `GET`.
    live: Mutex<HashMap<String, Saga>>,
    pub stats: Stats,
}

/// How one call ended.
enum Outcome {
    Ok,
    /// The participant answered and refused (a non-success status below 500), or the
    /// request never left: the action did not take effect.
    NotApplied,
    /// Timeout, reset or 5xx: it may have taken effect.
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Engine {
    pub fn new(store: Store, resolver: Option<Arc<dyn Resolve>>) -> Arc<Engine> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        Arc::new(Engine {
            store,
            client: Client::builder(TokioExecutor::new()).build(http),
            resolver,
            balancer: Balancer::new(Policy::P2cPeakEwma),
            sets: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        })
    }

    /// Starts a saga, or returns the one already started with the same idempotency key
    /// (`false`). The first state is durable before this returns.
    pub async fn start(
        self: &Arc<Self>,
        def: SagaDef,
        idempotency_key: Option<String>,
    ) -> Result<(Saga, bool), StartError> {
        if let Some(key) = &idempotency_key
            && let Some(existing) = self.get(None, key).await?
        {
            return Ok((existing, false));
        }
        let saga = Saga::new(new_id(), def, idempotency_key.clone());
        if !self.store.insert(&saga).await? {
            // Another request with the same key won the race.
            let key = idempotency_key.unwrap_or_default();
            if let Some(existing) = self.get(None, &key).await? {
                return Ok((existing, false));
            }
        }
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        self.spawn(saga.clone());
        Ok((saga, true))
    }

    /// By id, or (with `id` None) by idempotency key; in-flight sagas show their latest
    /// attempts.
    pub async fn get(&self, id: Option<&str>, key: &str) -> Result<Option<Saga>, StoreError> {
        match id {
            Some(id) => {
                if let Some(s) = self.lock_live().get(id) {
                    return Ok(Some(s.clone()));
                }
                self.store.get(id).await
            }
            None => self.store.by_idempotency_key(key).await,
        }
    }

    /// Resumes every saga a crash or restart interrupted.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, StoreError> {
        let sagas = self.store.unfinished().await?;
        let n = sagas.len();
        for saga in sagas {
            tracing::info!(saga = %saga.id, status = saga.status.as_str(), "resuming saga");
            self.spawn(saga);
        }
        Ok(n)
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Saga>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(self: &Arc<Self>, saga: Saga) {
        self.lock_live().insert(saga.id.clone(), saga.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let id = saga.id.clone();
            me.run(saga).await;
            me.lock_live().remove(&id);
        });
    }

    /// Persists `saga`, retrying until the store takes it: a transition that is not
    /// durable must not be acted on.
    async fn persist(&self, saga: &mut Saga) {
        saga.updated_ms = now_ms();
        self.lock_live().insert(saga.id.clone(), saga.clone());
        let mut pause = std::time::Duration::from_millis(50);
        while let Err(e) = self.store.update(saga).await {
            tracing::error!(saga = %saga.id, error = %e, "cannot persist saga; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(5));
        }
    }

    fn note_attempt(&self, saga: &mut Saga, step: usize, compensation: bool, attempt: Attempt) {
        saga.steps[step].record(compensation, attempt);
        self.lock_live().insert(saga.id.clone(), saga.clone());
    }

    async fn run(&self, mut saga: Saga) {
        let def = saga.definition.clone();
        loop {
            match saga.status {
                SagaStatus::Running => self.forward(&mut saga, &def).await,
                SagaStatus::Compensating => self.compensate(&mut saga, &def).await,
                SagaStatus::Completed => {
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                SagaStatus::Compensated => {
                    self.stats.compensated.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                SagaStatus::Stuck => {
                    self.stats.stuck.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(saga = %saga.id, error = ?saga.error, "saga is stuck");
                    return;
                }
            }
        }
    }

    /// Runs the step marked `running` to success (arming the next) or failure.
    async fn forward(&self, saga: &mut Saga, def: &SagaDef) {
        let Some(i) = saga
            .steps
            .iter()
            .position(|s| s.status != StepStatus::Succeeded)
        else {
            saga.status = SagaStatus::Completed;
            self.persist(saga).await;
            return;
        };
        // A saga stored before its step was armed (not written by this version) or a
        // pending step after a success: arm it first.
        if saga.steps[i].status != StepStatus::Running {
            saga.steps[i].status = StepStatus::Running;
            self.persist(saga).await;
        }
        let step = &def.steps[i];
        let mut maybe_applied = saga.steps[i].maybe_applied;
        let mut last = String::new();
        for attempt in 1..=step.retry.max_attempts {
            if attempt > 1 {
                tokio::time::sleep(step.retry.delay(attempt - 1, fastrand::f64())).await;
            }
            let (outcome, record) = self.call(&saga.id, step, &step.action, "action").await;
            last = record.outcome.clone();
            self.note_attempt(saga, i, false, record);
            match outcome {
                Outcome::Ok => {
                    saga.steps[i].status = StepStatus::Succeeded;
                    match saga.steps.get_mut(i + 1) {
                        Some(next) => next.status = StepStatus::Running,
                        None => saga.status = SagaStatus::Completed,
                    }
                    self.persist(saga).await;
                    return;
                }
                Outcome::NotApplied => {}
                Outcome::Unknown => maybe_applied = true,
            }
        }
        saga.steps[i].status = StepStatus::Failed;
        saga.steps[i].maybe_applied = maybe_applied;
        saga.status = SagaStatus::Compensating;
        saga.error = Some(format!(
            "step {} failed after {} attempts: {last}",
            step.name, step.retry.max_attempts
        ));
        self.persist(saga).await;
    }

    /// Undoes the last step that may have had an effect, or finishes compensating.
    async fn compensate(&self, saga: &mut Saga, def: &SagaDef) {
        let next = saga.steps.iter().rposition(|s| {
            s.status == StepStatus::Succeeded
                || (s.status == StepStatus::Failed && s.maybe_applied)
                // Armed, then the saga turned to compensation before or while it ran.
                || s.status == StepStatus::Running
        });
        let Some(j) = next else {
            for s in &mut saga.steps {
                if s.status == StepStatus::Failed {
                    s.status = StepStatus::NotCompensated;
                }
            }
            saga.status = SagaStatus::Compensated;
            self.persist(saga).await;
            return;
        };
        let step = &def.steps[j];
        let Some(call) = &step.compensation else {
            saga.steps[j].status = StepStatus::NotCompensated;
            self.persist(saga).await;
            return;
        };
        let retry = &def.compensation_retry;
        let mut last = String::new();
        for attempt in 1..=retry.max_attempts {
            if attempt > 1 {
                tokio::time::sleep(retry.delay(attempt - 1, fastrand::f64())).await;
            }
            let (outcome, record) = self.call(&saga.id, step, call, "compensation").await;
            last = record.outcome.clone();
            self.note_attempt(saga, j, true, record);
            if matches!(outcome, Outcome::Ok) {
                saga.steps[j].status = StepStatus::Compensated;
                self.persist(saga).await;
                return;
            }
        }
        saga.status = SagaStatus::Stuck;
        saga.error = Some(format!(
            "{}; compensation of step {} failed {} times: {last}",
            saga.error.as_deref().unwrap_or("compensating"),
            step.name,
            retry.max_attempts
        ));
        self.persist(saga).await;
    }

    /// One call to a participant, with the step's timeout.
    async fn call(
        &self,
        saga_id: &str,
        step: &StepDef,
        call: &CallDef,
        kind: &str,
    ) -> (Outcome, Attempt) {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let at_ms = now_ms();
        let started = Instant::now();
        let (outcome, text) = match self.target(call) {
            Err(why) => (Outcome::NotApplied, why),
            Ok((base, load)) => {
                let in_flight = load.as_ref().map(|l| l.start());
                let key = format!("{saga_id}/{}/{kind}", step.name);
                let r =
                    tokio::time::timeout(step.timeout, self.send(&base, call, &key, saga_id)).await;
                let r = match r {
                    Ok(r) => r,
                    Err(_) => (
                        Outcome::Unknown,
                        format!("timeout after {}", tessera_core::GoDuration(step.timeout)),
                    ),
                };
                match (in_flight, &r.0) {
                    (Some(f), Outcome::Ok | Outcome::NotApplied) => f.finish(),
                    (Some(f), Outcome::Unknown) => {
                        if let Some(l) = &load {
                            l.observe(std::time::Duration::from_secs(1));
                        }
                        drop(f);
                    }
                    (None, _) => {}
                }
                r
            }
        };
        let ok = matches!(outcome, Outcome::Ok);
        if !ok {
            self.stats.failed_calls.fetch_add(1, Ordering::Relaxed);
        }
        (
            outcome,
            Attempt {
                at_ms,
                duration_ms: started.elapsed().as_millis() as u64,
                outcome: text,
                ok,
            },
        )
    }

    /// The base URL for a call, and the picked endpoint's load for a registry service.
    fn target(
        &self,
        call: &CallDef,
    ) -> Result<(String, Option<Arc<tessera_balance::Load>>), String> {
        if let Some(url) = &call.url {
            return Ok((url.trim_end_matches('/').to_owned(), None));
        }
        let service = call.service.as_deref().unwrap_or_default();
        let Some(resolver) = &self.resolver else {
            return Err(format!("no registry to resolve service {service}"));
        };
        let healthy = resolver.healthy(service);
        if healthy.is_empty() {
            return Err(format!("no healthy instance of service {service}"));
        }
        let set = {
            let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
            let same = sets.get(service).is_some_and(|s| {
                s.endpoints.len() == healthy.len()
                    && s.endpoints
                        .iter()
                        .zip(&healthy)
                        .all(|(e, (a, w))| &e.addr == a && e.weight == (*w).max(1))
            });
            if !same {
                let endpoints: Vec<Endpoint> =
                    healthy.iter().map(|(a, w)| Endpoint::new(a, *w)).collect();
                let set = match sets.get(service) {
                    Some(old) => EndpointSet::inherit(endpoints, old),
                    None => EndpointSet::new(endpoints),
                };
                sets.insert(service.to_owned(), Arc::new(set));
            }
            sets.get(service).cloned()
        };
        let set = set.ok_or_else(|| format!("no healthy instance of service {service}"))?;
        let idx = self
            .balancer
            .pick(&set, &|_| true, None)
            .ok_or_else(|| format!("no healthy instance of service {service}"))?;
        let e = &set.endpoints[idx];
        Ok((format!("http://{}", e.addr), Some(e.load.clone())))
    }

    async fn send(
        &self,
        base: &str,
        call: &CallDef,
        key: &str,
        saga_id: &str,
    ) -> (Outcome, String) {
        let mut req = http::Request::builder()
            .method(call.method.as_str())
            .uri(format!("{base}{}", call.path))
            .header("idempotency-key", key)
            .header("x-tessera-saga", saga_id);
        for (k, v) in &call.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let body = match &call.body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b).unwrap_or_default())
            }
            None => Bytes::new(),
        };
        let req = match req.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return (Outcome::NotApplied, format!("bad request: {e}")),
        };
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return (
                    Outcome::NotApplied,
                    format!("connect: {}", tessera_core::error_chain(&e)),
                );
            }
            Err(e) => return (Outcome::Unknown, tessera_core::error_chain(&e)),
        };
        let status = resp.status().as_u16();
        // Read the answer so the connection can be reused; its content is not needed.
        let _ = Limited::new(resp.into_body(), MAX_RESPONSE).collect().await;
        let outcome = if call.is_success(status) {
            Outcome::Ok
        } else if status >= 500 {
            Outcome::Unknown
        } else {
            Outcome::NotApplied
        };
        (outcome, status.to_string())
    }
}
