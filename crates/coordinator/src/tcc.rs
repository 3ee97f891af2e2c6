//! TCC (try / confirm / cancel), the two-phase protocol for reservations: every
//! participant is asked to *try* (reserve), and only if all succeed are they told to
//! *confirm*; otherwise all are told to *cancel*. The decision is committed to the store
//! before phase two starts, and phase two is retried until every participant has
//! answered, so a crash between the phases cannot split the outcome. A transaction
//! interrupted while trying is cancelled on recovery (presumed abort: no decision to
//! commit was ever recorded).
//!
//! Participants own two rules the coordinator relies on: a cancel for a try that never
//! arrived succeeds and records the cancellation (an empty rollback), and a try that
//! arrives after its cancel is refused. Each call carries
//! `Idempotency-Key: {transaction}/{participant}/{try|confirm|cancel}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::call::{Caller, Outcome};
use crate::def::{CallDef, InvalidDef, RetryDef};
use crate::engine::{StartError, detached};
use crate::lease::{Lease, Lost};
use crate::saga::{Attempt, new_id, now_ms};
use crate::store::{Store, StoreError};

/// Most participants in one transaction.
pub const MAX_PARTICIPANTS: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TccDef {
    #[serde(default)]
    pub name: String,
    pub participants: Vec<ParticipantDef>,
    /// Pauses between phase-two attempts; phase two has no attempt limit (it must
    /// reach every participant), only this backoff.
    #[serde(default = "phase_two_retry")]
    pub phase_two_retry: RetryDef,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParticipantDef {
    pub name: String,
    #[serde(rename = "try")]
    pub try_call: CallDef,
    pub confirm: CallDef,
    pub cancel: CallDef,
    /// Attempts and backoff for the try; a try that still fails cancels the transaction.
    #[serde(default)]
    pub retry: RetryDef,
    #[serde(default = "default_timeout", with = "crate::def::duration")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn phase_two_retry() -> RetryDef {
    RetryDef {
        max_attempts: 1000,
        backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(30),
    }
}

impl TccDef {
    pub fn validate(&self) -> Result<(), InvalidDef> {
        let bad = |field: String, problem: &str| InvalidDef {
            field,
            problem: problem.to_owned(),
        };
        if self.participants.is_empty() {
            return Err(bad("participants".into(), "at least one participant"));
        }
        if self.participants.len() > MAX_PARTICIPANTS {
            return Err(bad(
                "participants".into(),
                &format!("at most {MAX_PARTICIPANTS}"),
            ));
        }
        self.phase_two_retry.validate("phase_two_retry")?;
        for (i, p) in self.participants.iter().enumerate() {
            let at = format!("participants[{i}]");
            crate::def::validate_name(&format!("{at}.name"), &p.name)?;
            if self.participants[..i].iter().any(|q| q.name == p.name) {
                return Err(bad(format!("{at}.name"), "duplicate participant name"));
            }
            p.try_call.validate(&format!("{at}.try"))?;
            p.confirm.validate(&format!("{at}.confirm"))?;
            p.cancel.validate(&format!("{at}.cancel"))?;
            p.retry.validate(&format!("{at}.retry"))?;
            if p.timeout.is_zero() {
                return Err(bad(format!("{at}.timeout"), "must be positive"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TccStatus {
    Trying,
    /// Decided to commit (durably); confirming every participant.
    Confirming,
    Confirmed,
    /// Decided to abort (durably); cancelling every participant.
    Cancelling,
    Cancelled,
}

impl TccStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TccStatus::Trying => "trying",
            TccStatus::Confirming => "confirming",
            TccStatus::Confirmed => "confirmed",
            TccStatus::Cancelling => "cancelling",
            TccStatus::Cancelled => "cancelled",
        }
    }

    pub const ALL: [TccStatus; 5] = [
        TccStatus::Trying,
        TccStatus::Confirming,
        TccStatus::Confirmed,
        TccStatus::Cancelling,
        TccStatus::Cancelled,
    ];
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParticipantRecord {
    pub name: String,
    /// Whether its try succeeded (`None` until it answered).
    pub tried: Option<bool>,
    /// Whether it has acknowledged phase two.
    pub done: bool,
    pub try_attempts: u32,
    pub phase_two_attempts: u32,
    /// The latest attempts, try first.
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tcc {
    pub id: String,
    pub name: String,
    pub status: TccStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub participants: Vec<ParticipantRecord>,
    pub definition: TccDef,
    /// Where the transaction sits in the trace of the request that started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::TxTrace>,
}

crate::store::record!(Tcc);

const KEEP_ATTEMPTS: usize = 10;

impl ParticipantRecord {
    fn record(&mut self, phase_two: bool, a: Attempt) {
        if phase_two {
            self.phase_two_attempts += 1;
        } else {
            self.try_attempts += 1;
        }
        if self.attempts.len() == KEEP_ATTEMPTS {
            self.attempts.remove(0);
        }
        self.attempts.push(a);
    }
}

#[derive(Default)]
pub struct TccStats {
    pub started: AtomicU64,
    pub confirmed: AtomicU64,
    pub cancelled: AtomicU64,
}

pub struct TccEngine {
    pub(crate) store: Store<Tcc>,
    caller: Arc<Caller>,
    lease: Arc<Lease>,
    /// Set when spans are exported (see `crate::trace`).
    pub(crate) tracer: std::sync::OnceLock<tessera_trace::Tracer>,
    live: Mutex<HashMap<String, Tcc>>,
    pub stats: TccStats,
}

impl TccEngine {
    pub(crate) fn new(store: Store<Tcc>, caller: Arc<Caller>, lease: Arc<Lease>) -> Arc<TccEngine> {
        Arc::new(TccEngine {
            store,
            tracer: std::sync::OnceLock::new(),
            caller,
            lease,
            live: Mutex::new(HashMap::new()),
            stats: TccStats::default(),
        })
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tcc>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a transaction, or returns the one started with the same idempotency key.
    pub async fn start(
        self: &Arc<Self>,
        definition: TccDef,
        idempotency_key: Option<String>,
    ) -> Result<(Tcc, bool), StartError> {
        let me = self.clone();
        // Taken here: the request's span is this task's, not the detached one's.
        let trace = crate::trace::begin();
        detached(async move { Ok(me.start_now(definition, idempotency_key, trace).await?) }).await
    }

    async fn start_now(
        self: &Arc<Self>,
        definition: TccDef,
        idempotency_key: Option<String>,
        trace: Option<crate::trace::TxTrace>,
    ) -> Result<(Tcc, bool), StoreError> {
        if let Some(key) = &idempotency_key
            && let Some(existing) = self.store.by_idempotency_key(key).await?
        {
            return Ok((existing, false));
        }
        let now = now_ms();
        let tx = Tcc {
            id: new_id(),
            name: definition.name.clone(),
            status: TccStatus::Trying,
            idempotency_key: idempotency_key.clone(),
            created_ms: now,
            updated_ms: now,
            error: None,
            participants: definition
                .participants
                .iter()
                .map(|p| ParticipantRecord {
                    name: p.name.clone(),
                    tried: None,
                    done: false,
                    try_attempts: 0,
                    phase_two_attempts: 0,
                    attempts: Vec::new(),
                })
                .collect(),
            definition,
            trace,
        };
        if !self.store.insert(&tx).await?
            && let Some(key) = &idempotency_key
            && let Some(existing) = self.store.by_idempotency_key(key).await?
        {
            return Ok((existing, false));
        }
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        self.spawn(tx.clone(), 1, false);
        Ok((tx, true))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Tcc>, StoreError> {
        if let Some(t) = self.lock_live().get(id) {
            return Ok(Some(t.clone()));
        }
        self.store.get(id).await
    }

    /// Takes over transactions whose owner's lease ran out (`at_start`: also this
    /// server's own from before a restart) and runs them; returns how many.
    pub async fn claim(self: &Arc<Self>, at_start: bool) -> Result<usize, StoreError> {
        self.store
            .claim_all(at_start, |tx, fence| {
                tracing::info!(tcc = %tx.id, status = tx.status.as_str(), fence, "resuming TCC transaction");
                self.spawn(tx, fence, true);
            })
            .await
    }

    fn spawn(self: &Arc<Self>, tx: Tcc, fence: i64, resumed: bool) {
        self.lock_live().insert(tx.id.clone(), tx.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let id = tx.id.clone();
            let _ = me.clone().run(tx, fence, resumed).await;
            me.lock_live().remove(&id);
        });
    }

    /// Persists `tx` under `fence`, retrying until the store takes it; `Lost` when
    /// another server has claimed it since.
    async fn persist(&self, tx: &mut Tcc, fence: i64) -> Result<(), Lost> {
        tx.updated_ms = now_ms();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.store.update(tx, fence).await {
                Ok(true) => break,
                Ok(false) => return Err(self.lease.fenced_out("TCC transaction", &tx.id)),
                Err(e) => {
                    tracing::error!(tcc = %tx.id, error = %e, "cannot persist TCC transaction; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        match tx.status {
            TccStatus::Confirmed => self.stats.confirmed.fetch_add(1, Ordering::Relaxed),
            TccStatus::Cancelled => self.stats.cancelled.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if matches!(tx.status, TccStatus::Confirmed | TccStatus::Cancelled) {
            crate::trace::finish(
                self.tracer.get(),
                tx.trace.as_ref(),
                tx.created_ms,
                format!("tcc {}", tx.name),
                tx.status == TccStatus::Confirmed,
                tx.error.as_deref(),
                vec![
                    ("tessera.tcc.id", tx.id.clone().into()),
                    ("tessera.tcc.status", tx.status.as_str().into()),
                ],
            );
        }
        self.lock_live().insert(tx.id.clone(), tx.clone());
        Ok(())
    }

    async fn run(self: Arc<Self>, mut tx: Tcc, fence: i64, resumed: bool) -> Result<(), Lost> {
        loop {
            match tx.status {
                TccStatus::Trying => {
                    if resumed {
                        // Interrupted while trying: the tries' outcomes are unknown and no
                        // decision to commit was ever recorded, so it is cancelled.
                        tx.status = TccStatus::Cancelling;
                        tx.error = Some("interrupted while trying; cancelled".into());
                    } else {
                        self.try_all(&mut tx).await?;
                    }
                    // The decision, durable before phase two.
                    self.persist(&mut tx, fence).await?;
                }
                TccStatus::Confirming | TccStatus::Cancelling => {
                    self.phase_two(&mut tx).await?;
                    tx.status = if tx.status == TccStatus::Confirming {
                        TccStatus::Confirmed
                    } else {
                        TccStatus::Cancelled
                    };
                    self.persist(&mut tx, fence).await?;
                }
                TccStatus::Confirmed | TccStatus::Cancelled => return Ok(()),
            }
        }
    }

    /// Phase one: every participant's try, concurrently; decides the status.
    async fn try_all(self: &Arc<Self>, tx: &mut Tcc) -> Result<(), Lost> {
        self.lease.held()?;
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in tx.definition.participants.iter().enumerate() {
            let (me, p, id, trace) = (self.clone(), p.clone(), tx.id.clone(), tx.trace.clone());
            set.spawn(async move {
                let key = format!("{id}/{}/try", p.name);
                let mut attempts = Vec::new();
                for attempt in 1..=p.retry.max_attempts {
                    if attempt > 1 {
                        tokio::time::sleep(p.retry.delay(attempt - 1, fastrand::f64())).await;
                    }
                    let span = crate::trace::call_span(me.tracer.get(), trace.as_ref());
                    let traceparent = span.as_ref().map(|s| s.ctx.traceparent());
                    let (outcome, a) = me
                        .caller
                        .call(&key, &id, p.timeout, &p.try_call, traceparent.as_deref())
                        .await;
                    let attrs = call_attributes(&id, &p.name, "try");
                    let name = format!("try {}", p.name);
                    crate::trace::finish_call(
                        me.tracer.get(),
                        span,
                        name,
                        &p.try_call,
                        attempt,
                        &a,
                        attrs,
                    );
                    attempts.push(a);
                    match outcome {
                        Outcome::Ok => return (i, true, attempts),
                        Outcome::Refused => break,
                        _ => {}
                    }
                }
                (i, false, attempts)
            });
        }
        let mut failed = Vec::new();
        while let Some(done) = set.join_next().await {
            let Ok((i, ok, attempts)) = done else {
                continue;
            };
            let rec = &mut tx.participants[i];
            rec.tried = Some(ok);
            for a in attempts {
                rec.record(false, a);
            }
            if !ok {
                failed.push(rec.name.clone());
            }
        }
        if failed.is_empty() && tx.participants.iter().all(|p| p.tried == Some(true)) {
            tx.status = TccStatus::Confirming;
        } else {
            tx.status = TccStatus::Cancelling;
            tx.error = Some(format!("try failed for {}", failed.join(", ")));
        }
        Ok(())
    }

    /// Phase two: confirm or cancel every participant not done yet, each retried until
    /// it answers success.
    async fn phase_two(self: &Arc<Self>, tx: &mut Tcc) -> Result<(), Lost> {
        let confirm = tx.status == TccStatus::Confirming;
        let kind = if confirm { "confirm" } else { "cancel" };
        let retry = tx.definition.phase_two_retry.clone();
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in tx.definition.participants.iter().enumerate() {
            if tx.participants[i].done {
                continue;
            }
            let call = if confirm {
                p.confirm.clone()
            } else {
                p.cancel.clone()
            };
            let (me, id, name, timeout, retry, trace) = (
                self.clone(),
                tx.id.clone(),
                p.name.clone(),
                p.timeout,
                retry.clone(),
                tx.trace.clone(),
            );
            set.spawn(async move {
                let key = format!("{id}/{name}/{kind}");
                let mut attempts = Vec::new();
                let mut n = 0u32;
                loop {
                    if n > 0 {
                        tokio::time::sleep(retry.delay(n, fastrand::f64())).await;
                    }
                    n += 1;
                    // Retried until it answers: but only while this server owns it.
                    if me.lease.held().is_err() {
                        return (i, attempts, false);
                    }
                    let span = crate::trace::call_span(me.tracer.get(), trace.as_ref());
                    let traceparent = span.as_ref().map(|s| s.ctx.traceparent());
                    let (outcome, a) = me
                        .caller
                        .call(&key, &id, timeout, &call, traceparent.as_deref())
                        .await;
                    let attrs = call_attributes(&id, &name, kind);
                    let span_name = format!("{kind} {name}");
                    crate::trace::finish_call(
                        me.tracer.get(),
                        span,
                        span_name,
                        &call,
                        n,
                        &a,
                        attrs,
                    );
                    if let Outcome::Rejected(open_for) = outcome {
                        // Phase two waits out an open breaker rather than hammering.
                        tokio::time::sleep(open_for.max(Duration::from_millis(10))).await;
                        continue;
                    }
                    attempts.push(a);
                    if matches!(outcome, Outcome::Ok) {
                        return (i, attempts, true);
                    }
                    if attempts.len() > KEEP_ATTEMPTS {
                        attempts.remove(0);
                    }
                }
            });
        }
        let mut lost = false;
        while let Some(done) = set.join_next().await {
            let Ok((i, attempts, done)) = done else {
                continue;
            };
            let rec = &mut tx.participants[i];
            rec.done = done;
            lost |= !done;
            for a in attempts {
                rec.record(true, a);
            }
        }
        if lost { Err(Lost) } else { Ok(()) }
    }
}

/// What a participant call's span says about the transaction.
fn call_attributes(
    id: &str,
    participant: &str,
    phase: &'static str,
) -> Vec<(&'static str, tessera_trace::Value)> {
    vec![
        ("tessera.tcc.id", id.to_owned().into()),
        ("tessera.tcc.participant", participant.to_owned().into()),
        ("tessera.tcc.phase", phase.into()),
    ]
}
