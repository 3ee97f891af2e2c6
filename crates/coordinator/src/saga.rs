//! A saga's durable state: what is stored after every transition and what
//! `GET /v1/sagas/ID` shows. The state machine itself is in `engine`.

use serde::{Deserialize, Serialize};

use crate::def::SagaDef;

/// Most attempts kept per step and kind; older ones are counted, not listed.
const KEEP_ATTEMPTS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Steps are running forward.
    Running,
    /// A step failed; completed steps are being undone, last first.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and every step that may have had an effect was undone.
    Compensated,
    /// A compensation kept failing past its retry limit: needs an operator.
    Stuck,
}

impl SagaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Stuck => "stuck",
        }
    }

    pub const ALL: [SagaStatus; 5] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Stuck,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    /// Its compensation is registered and the action is being called (after a crash:
    /// may or may not have run, so it is called again with the same key).
    Running,
    Succeeded,
    /// The action failed after its retries.
    Failed,
    Compensated,
    /// Nothing to undo: the step has no compensation, or its action was refused outright.
    NotCompensated,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: u64,
    pub duration_ms: u64,
    /// The HTTP status, or why there was none (`timeout`, `connect: ...`).
    pub outcome: String,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub status: StepStatus,
    /// Whether a failed action may have taken effect (a timeout, a reset, a 5xx): such a
    /// step is compensated too. A clean refusal (4xx) is not.
    #[serde(default)]
    pub maybe_applied: bool,
    pub action_attempts: u32,
    pub compensation_attempts: u32,
    /// The latest attempts of both kinds, action first.
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compensations: Vec<Attempt>,
}

impl StepRecord {
    pub fn record(&mut self, compensation: bool, attempt: Attempt) {
        let list = if compensation {
            self.compensation_attempts += 1;
            &mut self.compensations
        } else {
            self.action_attempts += 1;
            &mut self.attempts
        };
        if list.len() == KEEP_ATTEMPTS {
            list.remove(0);
        }
        list.push(attempt);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saga {
    pub id: String,
    pub name: String,
    pub status: SagaStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Why the saga compensated or is stuck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub steps: Vec<StepRecord>,
    pub definition: SagaDef,
    /// Where the saga sits in the trace of the request that started it (`trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::TxTrace>,
}

impl Saga {
    /// A new saga with its first step already registered as running: the first write
    /// both records the saga and arms its first compensation.
    pub fn new(id: String, definition: SagaDef, idempotency_key: Option<String>) -> Saga {
        let now = now_ms();
        let mut steps: Vec<StepRecord> = definition
            .steps
            .iter()
            .map(|s| StepRecord {
                name: s.name.clone(),
                status: StepStatus::Pending,
                maybe_applied: false,
                action_attempts: 0,
                compensation_attempts: 0,
                attempts: Vec::new(),
                compensations: Vec::new(),
            })
            .collect();
        steps[0].status = StepStatus::Running;
        Saga {
            id,
            name: definition.name.clone(),
            status: SagaStatus::Running,
            idempotency_key,
            created_ms: now,
            updated_ms: now,
            error: None,
            steps,
            definition,
            trace: None,
        }
    }
}

crate::store::record!(Saga);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random 128-bit id in the UUID text form.
pub fn new_id() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}
