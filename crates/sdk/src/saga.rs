//! Saga and TCC definitions built in code and run by the coordinator in `tessera server`
//! (`POST /v1/sagas`, `POST /v1/tcc`): the coordinator, not the caller, then drives every
//! step to the end, across its own restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::http::Error;
use crate::registry::{Registry, encode};

/// One HTTP call the coordinator makes to a participant.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    success: Vec<u16>,
}

impl Call {
    /// A call to a registry service's healthy instances.
    pub fn service(method: &str, service: &str, path: &str) -> Call {
        Call {
            method: method.to_owned(),
            service: Some(service.to_owned()),
            url: None,
            path: path.to_owned(),
            body: None,
            headers: BTreeMap::new(),
            success: Vec::new(),
        }
    }

    /// `POST` to a registry service.
    pub fn post(service: &str, path: &str) -> Call {
        Call::service("POST", service, path)
    }

    /// A call to a fixed base URL (`http://host:port`).
    pub fn url(method: &str, base: &str, path: &str) -> Call {
        Call {
            url: Some(base.to_owned()),
            service: None,
            ..Call::service(method, "", path)
        }
    }

    pub fn json(mut self, body: Value) -> Call {
        self.body = Some(body);
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Call {
        self.headers.insert(name.to_owned(), value.to_owned());
        self
    }

    /// Statuses that count as success (default: any 2xx).
    pub fn success(mut self, statuses: &[u16]) -> Call {
        self.success = statuses.to_vec();
        self
    }
}

/// Attempts and backoff (doubling, full jitter).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Retry {
    pub max_attempts: u32,
    #[serde(serialize_with = "go")]
    pub backoff: Duration,
    #[serde(serialize_with = "go")]
    pub max_backoff: Duration,
}

fn go<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&tessera_core::format_duration(*d))
}

fn go_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => go(d, s),
        None => s.serialize_none(),
    }
}

/// One saga step: an action and what undoes it.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    name: String,
    action: Call,
    #[serde(skip_serializing_if = "Option::is_none")]
    compensation: Option<Call>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry: Option<Retry>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "go_opt")]
    timeout: Option<Duration>,
}

impl Step {
    pub fn new(name: &str, action: Call) -> Step {
        Step {
            name: name.to_owned(),
            action,
            compensation: None,
            retry: None,
            timeout: None,
        }
    }

    pub fn compensate(mut self, call: Call) -> Step {
        self.compensation = Some(call);
        self
    }

    pub fn retry(mut self, retry: Retry) -> Step {
        self.retry = Some(retry);
        self
    }

    /// Per call, action and compensation alike (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Step {
        self.timeout = Some(timeout);
        self
    }
}

/// A saga definition: what `POST /v1/sagas` takes.
///
/// ```
/// use serde_json::json;
/// use tessera::{Call, Saga, Step};
/// let saga = Saga::new("checkout")
///     .step(Step::new("reserve", Call::post("catalog", "/internal/reservations")
///             .json(json!({"order_id": "o1", "items": [{"product_id": "mug", "quantity": 1}]})))
///         .compensate(Call::post("catalog", "/internal/reservations/o1/release"))
///         .timeout(std::time::Duration::from_secs(5)))
///     .step(Step::new("charge", Call::post("payments", "/internal/charges")
///             .json(json!({"order_id": "o1", "amount_cents": 990}))));
/// let body = serde_json::to_value(&saga).unwrap();
/// assert_eq!(body["steps"][0]["compensation"]["service"], "catalog");
/// assert_eq!(body["steps"][0]["timeout"], "5s");
/// assert_eq!(body["steps"][1]["action"]["method"], "POST");
/// ```
#[derive(Debug, Clone, Serialize)]
pub struct Saga {
    name: String,
    steps: Vec<Step>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compensation_retry: Option<Retry>,
}

impl Saga {
    pub fn new(name: &str) -> Saga {
        Saga {
            name: name.to_owned(),
            steps: Vec::new(),
            compensation_retry: None,
        }
    }

    pub fn step(mut self, step: Step) -> Saga {
        self.steps.push(step);
        self
    }

    /// How compensations are retried before the saga ends `stuck`.
    pub fn compensation_retry(mut self, retry: Retry) -> Saga {
        self.compensation_retry = Some(retry);
        self
    }
}

/// One TCC participant: try, then confirm or cancel.
#[derive(Debug, Clone, Serialize)]
pub struct Participant {
    name: String,
    #[serde(rename = "try")]
    try_call: Call,
    confirm: Call,
    cancel: Call,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "go_opt")]
    timeout: Option<Duration>,
}

impl Participant {
    pub fn new(name: &str, try_call: Call, confirm: Call, cancel: Call) -> Participant {
        Participant {
            name: name.to_owned(),
            try_call,
            confirm,
            cancel,
            timeout: None,
        }
    }

    pub fn timeout(mut self, timeout: Duration) -> Participant {
        self.timeout = Some(timeout);
        self
    }
}

/// A TCC transaction definition.
#[derive(Debug, Clone, Serialize)]
pub struct Tcc {
    name: String,
    participants: Vec<Participant>,
}

impl Tcc {
    pub fn new(name: &str) -> Tcc {
        Tcc {
            name: name.to_owned(),
            participants: Vec::new(),
        }
    }

    pub fn participant(mut self, p: Participant) -> Tcc {
        self.participants.push(p);
        self
    }
}

/// What the coordinator reports about a saga or a TCC transaction.
#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    pub id: String,
    /// Sagas: `running`, `compensating`, `completed`, `compensated`, `stuck`. TCC:
    /// `trying`, `confirming`, `cancelling`, `confirmed`, `cancelled`.
    pub status: String,
    /// Why it did not complete, when it did not.
    #[serde(default)]
    pub error: Option<String>,
    /// Everything else the coordinator returned (steps, attempts, the definition).
    #[serde(flatten)]
    pub detail: serde_json::Map<String, Value>,
}

impl Run {
    /// Whether nothing more will happen.
    pub fn is_final(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "compensated" | "stuck" | "confirmed" | "cancelled"
        )
    }
}

/// The coordinator's API, on the registry's address (it runs in `tessera server`).
///
/// ```no_run
/// # async fn demo(saga: tessera::Saga) -> Result<(), tessera::Error> {
/// use tessera::{Coordinator, Registry};
/// let coordinator = Coordinator::new(&Registry::new("127.0.0.1:8500"));
/// // The same key twice starts one saga: safe to retry after a timeout.
/// let started = coordinator.start_saga(&saga, Some("order-o1")).await?;
/// let done = coordinator.wait_saga(&started.id, std::time::Duration::from_secs(30)).await?;
/// println!("{} ended {}: {:?}", done.id, done.status, done.error);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Coordinator {
    registry: Registry,
}

impl Coordinator {
    pub fn new(registry: &Registry) -> Coordinator {
        Coordinator {
            registry: registry.clone(),
        }
    }

    /// Starts a saga; with `key`, starting again with the same key returns the first
    /// saga instead of a second one.
    pub async fn start_saga(&self, saga: &Saga, key: Option<&str>) -> Result<Run, Error> {
        self.start("/v1/sagas", saga, key).await
    }

    pub async fn start_tcc(&self, tcc: &Tcc, key: Option<&str>) -> Result<Run, Error> {
        self.start("/v1/tcc", tcc, key).await
    }

    async fn start(
        &self,
        path: &str,
        def: &impl Serialize,
        key: Option<&str>,
    ) -> Result<Run, Error> {
        let body = serde_json::to_value(def).map_err(|e| Error::Invalid(e.to_string()))?;
        // Inside a recorded request, the start is a call of its trace, and so the saga.
        let span = crate::trace::Try::begin();
        let fields = span.as_ref().map(|s| s.fields()).unwrap_or_default();
        let mut headers: Vec<(&str, &str)> =
            key.map(|k| ("idempotency-key", k)).into_iter().collect();
        headers.extend(fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let answer = self
            .registry
            .call(http::Method::POST, path, Some(&body), &headers)
            .await;
        if let Some(span) = span {
            let outcome = match &answer {
                Ok(r) => tessera_trace::http::Outcome::Answered(r.status.as_u16()),
                Err(e) => tessera_trace::http::Outcome::Failed {
                    kind: "_OTHER",
                    message: e.to_string(),
                },
            };
            span.finish(&http::Method::POST, "tessera-server", 0, outcome);
        }
        answer?.error_for_status()?.json()
    }

    pub async fn saga(&self, id: &str) -> Result<Run, Error> {
        self.get(&format!("/v1/sagas/{}", encode(id))).await
    }

    pub async fn tcc(&self, id: &str) -> Result<Run, Error> {
        self.get(&format!("/v1/tcc/{}", encode(id))).await
    }

    async fn get(&self, path: &str) -> Result<Run, Error> {
        self.registry
            .call(http::Method::GET, path, None, &[])
            .await?
            .error_for_status()?
            .json()
    }

    /// Polls the saga until it is final or `timeout` passes (then returns its state as
    /// it is).
    pub async fn wait_saga(&self, id: &str, timeout: Duration) -> Result<Run, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let run = self.saga(id).await?;
            if run.is_final() || tokio::time::Instant::now() + pause > deadline {
                return Ok(run);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}
