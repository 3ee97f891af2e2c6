//! The registry's records. They are stored in the durable log and rendered on the wire with
//! Consul's field names, so one set of structs serves both (PascalCase throughout).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_core::Health;

pub type Meta = BTreeMap<String, String>;

/// A node: the host that services run on. The local node is this server itself; catalog
/// registrations may add external nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeRecord {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub meta: Meta,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// One registered service instance on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRecord {
    /// Stored in the log; not part of Consul's service object (see `api::catalog`).
    pub node: String,
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub address: String,
    pub port: u16,
    pub meta: Meta,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub kind: String,
    pub tagged_addresses: BTreeMap<String, serde_json::Value>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// How a check is probed. `Ttl` is pushed by the service; the others are run by the
/// server. Stored with the check so checks resume after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Probe {
    Http {
        url: String,
        method: String,
        header: BTreeMap<String, Vec<String>>,
        body: String,
        tls_skip_verify: bool,
    },
    Tcp {
        addr: String,
    },
    Grpc {
        target: String,
        use_tls: bool,
    },
    Ttl {
        ttl: Duration,
    },
}

impl Probe {
    pub fn type_name(&self) -> &'static str {
        match self {
            Probe::Http { .. } => "http",
            Probe::Tcp { .. } => "tcp",
            Probe::Grpc { .. } => "grpc",
            Probe::Ttl { .. } => "ttl",
        }
    }
}

/// What the server needs to run a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub probe: Probe,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub deregister_critical_after: Option<Duration>,
    pub success_before_passing: u32,
    pub failures_before_critical: u32,
    pub failures_before_warning: u32,
    /// The definition's `Status`, where a check starts (also after a restart).
    #[serde(default)]
    pub initial: Option<Health>,
}

/// A health check bound to a node and optionally to one service instance on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub node: String,
    pub check_id: String,
    pub name: String,
    pub status: Health,
    pub notes: String,
    pub output: String,
    pub service_id: String,
    pub service_name: String,
    /// `None` for checks the server does not run: catalog checks, maintenance marks.
    pub spec: Option<CheckSpec>,
    /// Distinguishes maintenance marks, which Consul reports with type `maintenance`.
    #[serde(default)]
    pub maintenance: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

impl CheckRecord {
    pub fn type_name(&self) -> &'static str {
        if self.maintenance {
            return "maintenance";
        }
        match &self.spec {
            Some(spec) => spec.probe.type_name(),
            None => "",
        }
    }
}

/// A KV entry. `value` is kept as raw bytes and base64-encoded on the wire, as Consul does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    pub flags: u64,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
    /// The session holding the key's lock, if any (`?acquire=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// What happens to the keys a session holds when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    /// The locks are released and the keys kept.
    #[default]
    Release,
    /// The keys are deleted.
    Delete,
}

/// A session (`/v1/session/...`): a lease on KV locks, ended by `destroy`, by its TTL
/// running out without a renewal, or by one of its checks going critical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub name: String,
    pub node: String,
    /// After the session ends, its released keys cannot be acquired for this long.
    pub lock_delay_ms: u64,
    pub behavior: Behavior,
    /// Renewals must come within this (Consul's contract: the server may wait up to
    /// twice as long before ending it).
    pub ttl_ms: Option<u64>,
    /// Checks on `node` whose going critical ends the session.
    pub node_checks: Vec<String>,
    /// Service checks (on `node`) whose going critical ends the session.
    pub service_checks: Vec<String>,
    pub create_index: u64,
    pub modify_index: u64,
}

pub(crate) mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
