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
//!
//! With N servers on one database, a saga is run by the server holding its lease: each
//! write carries the fence the server got with it, and a participant is called only
//! while the lease surely holds. A refused write or a lapsed lease stops the task; the
//! saga goes on wherever it is claimed next, with the same idempotency keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::call::{Caller, Outcome};
use crate::def::SagaDef;
use crate::lease::{Lease, Lost};
use crate::saga::{Attempt, Saga, SagaStatus, StepStatus, new_id, now_ms};
use crate::store::{Store, StoreError};
use crate::trace;

#[derive(Default)]
pub struct Stats {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub compensated: AtomicU64,
    pub stuck: AtomicU64,
}

pub struct Engine {
    pub(crate) store: Store<Saga>,
    pub(crate) caller: Arc<Caller>,
    pub(crate) lease: Arc<Lease>,
    /// Set when spans are exported: a saga started by a traced request is a span of that
    /// trace, with a span per step attempt and compensation.
    pub(crate) tracer: std::sync::OnceLock<tessera_trace::Tracer>,
    /// The latest state of sagas in flight, attempts included, for `GET`.
    live: Mutex<HashMap<String, Saga>>,
    pub stats: Stats,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("starting failed: {0}")]
    Task(String),
}

impl From<StartError> for tessera_sql::Refused {
    fn from(e: StartError) -> tessera_sql::Refused {
        match e {
            StartError::Store(e) => e.into(),
            StartError::Task(why) => tessera_sql::Refused::unavailable(why),
        }
    }
}

/// Runs `f` as its own task and waits for it: the work finishes even if the caller is
/// dropped (a client that disconnects mid-POST), so a transaction that was stored is
/// always also started.
pub(crate) async fn detached<T: Send + 'static>(
    f: impl Future<Output = Result<T, StartError>> + Send + 'static,
) -> Result<T, StartError> {
    tokio::spawn(f)
        .await
        .map_err(|e| StartError::Task(e.to_string()))?
}

impl Engine {
    pub(crate) fn new(store: Store<Saga>, caller: Arc<Caller>, lease: Arc<Lease>) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            caller,
            lease,
            tracer: std::sync::OnceLock::new(),
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
        let me = self.clone();
        // Taken here: the request's span is this task's, not the detached one's.
        let trace = trace::begin();
        detached(async move { me.start_now(def, idempotency_key, trace).await }).await
    }

    async fn start_now(
        self: &Arc<Self>,
        def: SagaDef,
        idempotency_key: Option<String>,
        trace: Option<trace::TxTrace>,
    ) -> Result<(Saga, bool), StartError> {
        if let Some(key) = &idempotency_key
            && let Some(existing) = self.store.by_idempotency_key(key).await?
        {
            return Ok((existing, false));
        }
        let mut saga = Saga::new(new_id(), def, idempotency_key.clone());
        saga.trace = trace;
        if !self.store.insert(&saga).await? {
            // Another request with the same key won the race.
            let key = idempotency_key.unwrap_or_default();
            if let Some(existing) = self.store.by_idempotency_key(&key).await? {
                return Ok((existing, false));
            }
        }
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        self.spawn(saga.clone(), 1);
        Ok((saga, true))
    }

    /// By id; an in-flight saga shows its latest attempts.
    pub async fn get(&self, id: &str) -> Result<Option<Saga>, StoreError> {
        if let Some(s) = self.lock_live().get(id) {
            return Ok(Some(s.clone()));
        }
        self.store.get(id).await
    }

    /// Takes over sagas whose owner's lease ran out (`at_start`: also this server's own
    /// from before a restart) and runs them; returns how many.
    pub async fn claim(self: &Arc<Self>, at_start: bool) -> Result<usize, StoreError> {
        self.store
            .claim_all(at_start, |saga, fence| {
                tracing::info!(saga = %saga.id, status = saga.status.as_str(), fence, "resuming saga");
                self.spawn(saga, fence);
            })
            .await
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Saga>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(self: &Arc<Self>, saga: Saga, fence: i64) {
        self.lock_live().insert(saga.id.clone(), saga.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let id = saga.id.clone();
            let _ = me.run(saga, fence).await;
            me.lock_live().remove(&id);
        });
    }

    /// Persists `saga` under `fence`, retrying until the store takes it: a transition
    /// that is not durable must not be acted on. `Lost` when another server has claimed
    /// the saga since.
    async fn persist(&self, saga: &mut Saga, fence: i64) -> Result<(), Lost> {
        saga.updated_ms = now_ms();
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            match self.store.update(saga, fence).await {
                Ok(true) => break,
                Ok(false) => return Err(self.lease.fenced_out("saga", &saga.id)),
                Err(e) => {
                    tracing::error!(saga = %saga.id, error = %e, "cannot persist saga; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
        let counter = match saga.status {
            SagaStatus::Completed => Some(&self.stats.completed),
            SagaStatus::Compensated => Some(&self.stats.compensated),
            SagaStatus::Stuck => Some(&self.stats.stuck),
            SagaStatus::Running | SagaStatus::Compensating => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
            trace::finish(
                self.tracer.get(),
                saga.trace.as_ref(),
                saga.created_ms,
                format!("saga {}", saga.name),
                saga.status == SagaStatus::Completed,
                saga.error.as_deref(),
                vec![
                    ("tessera.saga.id", saga.id.clone().into()),
                    ("tessera.saga.status", saga.status.as_str().into()),
                    ("tessera.saga.steps", (saga.steps.len() as i64).into()),
                ],
            );
        }
        // Shown only once durable (and counted): a reader never sees a status a crash
        // could undo.
        self.lock_live().insert(saga.id.clone(), saga.clone());
        Ok(())
    }

    fn note_attempt(&self, saga: &mut Saga, step: usize, compensation: bool, attempt: Attempt) {
        saga.steps[step].record(compensation, attempt);
        self.lock_live().insert(saga.id.clone(), saga.clone());
    }

    async fn run(&self, mut saga: Saga, fence: i64) -> Result<(), Lost> {
        let def = saga.definition.clone();
        loop {
            match saga.status {
                SagaStatus::Running => self.forward(&mut saga, &def, fence).await?,
                SagaStatus::Compensating => self.compensate(&mut saga, &def, fence).await?,
                SagaStatus::Completed | SagaStatus::Compensated => return Ok(()),
                SagaStatus::Stuck => {
                    tracing::error!(saga = %saga.id, error = ?saga.error, "saga is stuck");
                    return Ok(());
                }
            }
        }
    }

    /// Runs the step marked `running` to success (arming the next) or failure.
    async fn forward(&self, saga: &mut Saga, def: &SagaDef, fence: i64) -> Result<(), Lost> {
        let Some(i) = saga
            .steps
            .iter()
            .position(|s| s.status != StepStatus::Succeeded)
        else {
            saga.status = SagaStatus::Completed;
            return self.persist(saga, fence).await;
        };
        // A saga stored before its step was armed (not written by this version) or a
        // pending step after a success: arm it first.
        if saga.steps[i].status != StepStatus::Running {
            saga.steps[i].status = StepStatus::Running;
            self.persist(saga, fence).await?;
        }
        let step = &def.steps[i];
        let mut maybe_applied = saga.steps[i].maybe_applied;
        let mut last = String::new();
        let mut attempts = 0;
        for attempt in 1..=step.retry.max_attempts {
            attempts = attempt;
            if attempt > 1 {
                tokio::time::sleep(step.retry.delay(attempt - 1, fastrand::f64())).await;
            }
            let key = format!("{}/{}/action", saga.id, step.name);
            self.lease.held()?;
            let span = trace::call_span(self.tracer.get(), saga.trace.as_ref());
            let traceparent = span.as_ref().map(|s| s.ctx.traceparent());
            let (outcome, record) = self
                .caller
                .call(
                    &key,
                    &saga.id,
                    step.timeout,
                    &step.action,
                    traceparent.as_deref(),
                )
                .await;
            let attrs = step_attributes(saga, &step.name, false);
            let name = format!("step {}", step.name);
            trace::finish_call(
                self.tracer.get(),
                span,
                name,
                &step.action,
                attempt,
                &record,
                attrs,
            );
            last = record.outcome.clone();
            self.note_attempt(saga, i, false, record);
            match outcome {
                Outcome::Ok => {
                    saga.steps[i].status = StepStatus::Succeeded;
                    match saga.steps.get_mut(i + 1) {
                        Some(next) => next.status = StepStatus::Running,
                        None => saga.status = SagaStatus::Completed,
                    }
                    return self.persist(saga, fence).await;
                }
                // An open breaker fails the attempt fast: nothing was sent.
                Outcome::NotApplied | Outcome::Rejected(_) => {}
                // A definite "no" (402, 409, ...): asking again gets the same answer.
                Outcome::Refused => break,
                Outcome::Unknown => maybe_applied = true,
            }
        }
        saga.steps[i].status = StepStatus::Failed;
        saga.steps[i].maybe_applied = maybe_applied;
        saga.status = SagaStatus::Compensating;
        saga.error = Some(format!(
            "step {} failed after {attempts} attempt{}: {last}",
            step.name,
            if attempts == 1 { "" } else { "s" }
        ));
        self.persist(saga, fence).await
    }

    /// Undoes the last step that may have had an effect, or finishes compensating.
    async fn compensate(&self, saga: &mut Saga, def: &SagaDef, fence: i64) -> Result<(), Lost> {
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
            return self.persist(saga, fence).await;
        };
        let step = &def.steps[j];
        let Some(call) = &step.compensation else {
            saga.steps[j].status = StepStatus::NotCompensated;
            return self.persist(saga, fence).await;
        };
        let retry = &def.compensation_retry;
        let mut last = String::new();
        let mut attempt = 0;
        while attempt < retry.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(retry.delay(attempt, fastrand::f64())).await;
            }
            let key = format!("{}/{}/compensation", saga.id, step.name);
            self.lease.held()?;
            let span = trace::call_span(self.tracer.get(), saga.trace.as_ref());
            let traceparent = span.as_ref().map(|s| s.ctx.traceparent());
            let (outcome, record) = self
                .caller
                .call(&key, &saga.id, step.timeout, call, traceparent.as_deref())
                .await;
            let attrs = step_attributes(saga, &step.name, true);
            let name = format!("compensate {}", step.name);
            trace::finish_call(
                self.tracer.get(),
                span,
                name,
                call,
                attempt + 1,
                &record,
                attrs,
            );
            if let Outcome::Rejected(open_for) = outcome {
                // The participant's breaker is open: wait it out. Such a pause is not an
                // attempt, so a rest the breaker imposes never makes a saga stuck.
                tokio::time::sleep(open_for.max(std::time::Duration::from_millis(10))).await;
                continue;
            }
            attempt += 1;
            last = record.outcome.clone();
            self.note_attempt(saga, j, true, record);
            if matches!(outcome, Outcome::Ok) {
                saga.steps[j].status = StepStatus::Compensated;
                return self.persist(saga, fence).await;
            }
        }
        saga.status = SagaStatus::Stuck;
        saga.error = Some(format!(
            "{}; compensation of step {} failed {} times: {last}",
            saga.error.as_deref().unwrap_or("compensating"),
            step.name,
            retry.max_attempts
        ));
        self.persist(saga, fence).await
    }
}

/// What a step call's span says about the saga.
fn step_attributes(
    saga: &Saga,
    step: &str,
    compensation: bool,
) -> Vec<(&'static str, tessera_trace::Value)> {
    vec![
        ("tessera.saga.id", saga.id.clone().into()),
        ("tessera.saga.step", step.to_owned().into()),
        ("tessera.saga.compensation", compensation.into()),
    ]
}
