//! What a client posts to start a saga, and the checks that turn a bad definition into a
//! 400 naming the field instead of a saga that fails later.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most steps in one saga.
pub const MAX_STEPS: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaDef {
    /// A label for listings and metrics (`checkout`); not unique.
    #[serde(default)]
    pub name: String,
    pub steps: Vec<StepDef>,
    /// How compensations are retried; after `max_attempts` failures of one compensation
    /// the saga ends `stuck`.
    #[serde(default = "RetryDef::compensation")]
    pub compensation_retry: RetryDef,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// Unique within the saga; part of the `Idempotency-Key` of its calls.
    pub name: String,
    pub action: CallDef,
    /// What undoes the action. A step without one (a read, a notification) has nothing to
    /// undo.
    #[serde(default)]
    pub compensation: Option<CallDef>,
    #[serde(default)]
    pub retry: RetryDef,
    /// Per call, action and compensation alike.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
}

/// One HTTP call to a participant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallDef {
    #[serde(default = "default_method")]
    pub method: String,
    /// A service in the registry; its healthy instances are balanced over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Or a fixed base URL (`http://host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Statuses that mean success; empty means any 2xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub success: Vec<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryDef {
    pub max_attempts: u32,
    /// First pause between attempts; doubles each time up to `max_backoff`, with full
    /// jitter so participants recovering from an outage are not hit in lockstep.
    #[serde(with = "duration")]
    pub backoff: Duration,
    #[serde(with = "duration")]
    pub max_backoff: Duration,
}

impl Default for RetryDef {
    fn default() -> Self {
        RetryDef {
            max_attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryDef {
    fn compensation() -> RetryDef {
        RetryDef {
            max_attempts: 20,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// The pause before attempt `attempt + 1` (after `attempt` failures, `attempt ≥ 1`):
    /// uniform in [0, min(max_backoff, backoff × 2^(attempt-1))].
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        tessera_resilience::Backoff {
            base: self.backoff,
            max: self.max_backoff,
        }
        .delay(attempt, random)
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_method() -> String {
    "POST".into()
}
fn default_path() -> String {
    "/".into()
}

/// Go-style duration strings (`"250ms"`), as everywhere else in Tessera.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&tessera_core::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        tessera_core::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// A definition that cannot run, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidDef {
    pub field: String,
    pub problem: String,
}

/// Step and participant names: part of idempotency keys, so kept to a safe alphabet.
pub(crate) fn validate_name(field: &str, name: &str) -> Result<(), InvalidDef> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(invalid(field, "1 to 64 characters from A-Z a-z 0-9 - _ ."));
    }
    Ok(())
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> InvalidDef {
    InvalidDef {
        field: field.into(),
        problem: problem.into(),
    }
}

impl SagaDef {
    pub fn validate(&self) -> Result<(), InvalidDef> {
        if self.steps.is_empty() {
            return Err(invalid("steps", "a saga needs at least one step"));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(invalid("steps", format!("at most {MAX_STEPS} steps")));
        }
        if self.name.len() > 128 {
            return Err(invalid("name", "at most 128 characters"));
        }
        self.compensation_retry.validate("compensation_retry")?;
        for (i, step) in self.steps.iter().enumerate() {
            let at = format!("steps[{i}]");
            validate_name(&format!("{at}.name"), &step.name)?;
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("duplicate step name {:?}", step.name),
                ));
            }
            step.action.validate(&format!("{at}.action"))?;
            if let Some(c) = &step.compensation {
                c.validate(&format!("{at}.compensation"))?;
            }
            step.retry.validate(&format!("{at}.retry"))?;
            if step.timeout.is_zero() {
                return Err(invalid(format!("{at}.timeout"), "must be positive"));
            }
        }
        Ok(())
    }
}

impl RetryDef {
    pub(crate) fn validate(&self, at: &str) -> Result<(), InvalidDef> {
        if !(1..=1000).contains(&self.max_attempts) {
            return Err(invalid(format!("{at}.max_attempts"), "between 1 and 1000"));
        }
        if self.max_backoff < self.backoff {
            return Err(invalid(
                format!("{at}.max_backoff"),
                "must not be shorter than backoff",
            ));
        }
        Ok(())
    }
}

impl CallDef {
    pub(crate) fn validate(&self, at: &str) -> Result<(), InvalidDef> {
        if http::Method::from_bytes(self.method.as_bytes()).is_err() {
            return Err(invalid(
                format!("{at}.method"),
                format!("{:?} is not an HTTP method", self.method),
            ));
        }
        match (&self.service, &self.url) {
            (Some(s), None) => tessera_core::validate_service_name("service", s)
                .map_err(|e| invalid(format!("{at}.service"), e.to_string()))?,
            (None, Some(u)) => {
                let uri: http::Uri = u
                    .parse()
                    .map_err(|e| invalid(format!("{at}.url"), format!("{e}")))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(invalid(
                        format!("{at}.url"),
                        "must be http://host:port (TLS to participants is not supported yet)",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    at.to_owned(),
                    "exactly one of `service` and `url` is required",
                ));
            }
        }
        if !self.path.starts_with('/') || self.path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(invalid(
                format!("{at}.path"),
                "must be an absolute path such as /reserve",
            ));
        }
        for (k, v) in &self.headers {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                || http::HeaderValue::from_str(v).is_err()
            {
                return Err(invalid(
                    format!("{at}.headers"),
                    format!("invalid header {k:?}"),
                ));
            }
        }
        if let Some(bad) = self.success.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(invalid(
                format!("{at}.success"),
                format!("{bad} is not an HTTP status"),
            ));
        }
        Ok(())
    }

    pub fn is_success(&self, status: u16) -> bool {
        if self.success.is_empty() {
            (200..300).contains(&status)
        } else {
            self.success.contains(&status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<SagaDef, String> {
        let def: SagaDef = serde_json::from_value(json).map_err(|e| e.to_string())?;
        def.validate().map_err(|e| e.to_string())?;
        Ok(def)
    }

    #[test]
    fn a_minimal_definition_gets_defaults() {
        let def = parse(serde_json::json!({
            "steps": [{"name": "reserve", "action": {"url": "http://127.0.0.1:1", "path": "/r"}}]
        }))
        .unwrap();
        let s = &def.steps[0];
        assert_eq!(s.action.method, "POST");
        assert_eq!(s.retry.max_attempts, 3);
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert!(s.compensation.is_none());
        assert!(s.action.is_success(204) && !s.action.is_success(409));
        assert_eq!(def.compensation_retry.max_attempts, 20);
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let cases = [
            (serde_json::json!({"steps": []}), "steps"),
            (
                serde_json::json!({"steps": [{"name": "a b", "action": {"url": "http://h:1"}}]}),
                "steps[0].name",
            ),
            (
                serde_json::json!({"steps": [{"name": "a", "action": {"path": "/x"}}]}),
                "steps[0].action",
            ),
            (
                serde_json::json!({"steps": [{"name": "a", "action": {"url": "ftp://h"}}]}),
                "steps[0].action.url",
            ),
            (
                serde_json::json!({"steps": [
                    {"name": "a", "action": {"url": "http://h:1"}},
                    {"name": "a", "action": {"url": "http://h:1"}}]}),
                "steps[1].name",
            ),
            (
                serde_json::json!({"steps": [{"name": "a", "action": {"url": "http://h:1"},
                    "retry": {"max_attempts": 0, "backoff": "1s", "max_backoff": "2s"}}]}),
                "steps[0].retry.max_attempts",
            ),
            (
                serde_json::json!({"steps": [{"name": "a", "action": {"url": "http://h:1", "success": [700]}}]}),
                "steps[0].action.success",
            ),
            (
                serde_json::json!({"steps": [{"name": "a", "action": {"url": "http://h:1", "path": "x"}}]}),
                "steps[0].action.path",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json.clone()).unwrap_err();
            assert!(err.starts_with(field), "{json} → {err}");
        }
        let err = parse(serde_json::json!({"steps": [], "typo": 1})).unwrap_err();
        assert!(err.contains("typo"), "{err}");
    }
}
