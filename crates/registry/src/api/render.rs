//! Consul's JSON shapes as borrowed structs, serialized straight from the state under the
//! read lock: no intermediate `serde_json::Value` trees on the read path.

use std::collections::BTreeMap;

use serde::Serialize;
use tessera_core::{Health, format_duration};

use crate::model::{CheckRecord, KvEntry, Meta, NodeRecord, Probe, ServiceRecord, Weights};
use crate::state::State;

#[derive(Serialize, Default)]
pub struct Definition<'a> {
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    http: Option<&'a str>,
    #[serde(rename = "Method", skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(rename = "Header", skip_serializing_if = "Option::is_none")]
    header: Option<&'a BTreeMap<String, Vec<String>>>,
    #[serde(rename = "Body", skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(rename = "TLSSkipVerify", skip_serializing_if = "Option::is_none")]
    tls_skip_verify: Option<bool>,
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
    tcp: Option<&'a str>,
    #[serde(rename = "GRPC", skip_serializing_if = "Option::is_none")]
    grpc: Option<&'a str>,
    #[serde(rename = "GRPCUseTLS", skip_serializing_if = "Option::is_none")]
    grpc_use_tls: Option<bool>,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
    #[serde(rename = "Interval", skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(rename = "Timeout", skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(
        rename = "DeregisterCriticalServiceAfter",
        skip_serializing_if = "Option::is_none"
    )]
    deregister: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckOut<'a> {
    node: &'a str,
    #[serde(rename = "CheckID")]
    check_id: &'a str,
    name: &'a str,
    status: Health,
    notes: &'a str,
    output: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    #[serde(rename = "Type")]
    kind: &'static str,
    interval: String,
    timeout: String,
    exposed_port: u16,
    definition: Definition<'a>,
    create_index: u64,
    modify_index: u64,
}

pub fn check<'a>(st: &'a State, c: &'a CheckRecord) -> CheckOut<'a> {
    let tags: &[String] = st
        .services
        .get(&(c.node.clone(), c.service_id.clone()))
        .map(|s| s.tags.as_slice())
        .unwrap_or(&[]);
    let mut def = Definition::default();
    let (mut interval, mut timeout) = (String::new(), String::new());
    if let Some(spec) = &c.spec {
        match &spec.probe {
            Probe::Http {
                url,
                method,
                header,
                body,
                tls_skip_verify,
            } => {
                def.http = Some(url);
                def.method = Some(method);
                def.header = Some(header);
                def.body = Some(body);
                def.tls_skip_verify = Some(*tls_skip_verify);
            }
            Probe::Tcp { addr } => def.tcp = Some(addr),
            Probe::Grpc { target, use_tls } => {
                def.grpc = Some(target);
                def.grpc_use_tls = Some(*use_tls);
            }
            Probe::Ttl { ttl } => def.ttl = Some(format_duration(*ttl)),
        }
        if let Some(i) = spec.interval {
            interval = format_duration(i);
            def.interval = Some(interval.clone());
        }
        if let Some(t) = spec.timeout {
            timeout = format_duration(t);
            def.timeout = Some(timeout.clone());
        }
        def.deregister = spec.deregister_critical_after.map(format_duration);
    }
    CheckOut {
        node: &c.node,
        check_id: &c.check_id,
        name: &c.name,
        status: c.status,
        notes: &c.notes,
        output: &c.output,
        service_id: &c.service_id,
        service_name: &c.service_name,
        service_tags: tags,
        kind: c.type_name(),
        interval,
        timeout,
        exposed_port: 0,
        definition: def,
        create_index: c.create_index,
        modify_index: c.modify_index,
    }
}

/// A service as the health and node endpoints show it (no `Node` field).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceOut<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    service: &'a str,
    tags: &'a [String],
    address: &'a str,
    port: u16,
    meta: &'a Meta,
    weights: Weights,
    enable_tag_override: bool,
    kind: &'a str,
    tagged_addresses: &'a BTreeMap<String, serde_json::Value>,
    create_index: u64,
    modify_index: u64,
}

pub fn service(s: &ServiceRecord) -> ServiceOut<'_> {
    ServiceOut {
        id: &s.id,
        service: &s.service,
        tags: &s.tags,
        address: &s.address,
        port: s.port,
        meta: &s.meta,
        weights: s.weights,
        enable_tag_override: s.enable_tag_override,
        kind: &s.kind,
        tagged_addresses: &s.tagged_addresses,
        create_index: s.create_index,
        modify_index: s.modify_index,
    }
}

/// A service as `/v1/agent/services` shows it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentServiceOut<'a> {
    #[serde(flatten)]
    inner: ServiceOut<'a>,
    datacenter: &'a str,
}

pub fn agent_service<'a>(s: &'a ServiceRecord, dc: &'a str) -> AgentServiceOut<'a> {
    AgentServiceOut {
        inner: service(s),
        datacenter: dc,
    }
}

#[derive(Serialize)]
pub struct HealthEntry<'a> {
    #[serde(rename = "Node")]
    pub node: Option<&'a NodeRecord>,
    #[serde(rename = "Service")]
    pub service: ServiceOut<'a>,
    #[serde(rename = "Checks")]
    pub checks: Vec<CheckOut<'a>>,
}

static EMPTY_MAP: BTreeMap<String, String> = BTreeMap::new();

/// A `/v1/catalog/service/:name` entry: node and service fields flattened.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogServiceOut<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: &'a BTreeMap<String, String>,
    node_meta: &'a BTreeMap<String, String>,
    service_kind: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    service_address: &'a str,
    service_tagged_addresses: &'a BTreeMap<String, serde_json::Value>,
    service_weights: Weights,
    service_meta: &'a Meta,
    service_port: u16,
    service_enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

pub fn catalog_service<'a>(
    n: Option<&'a NodeRecord>,
    s: &'a ServiceRecord,
) -> CatalogServiceOut<'a> {
    CatalogServiceOut {
        id: n.map(|n| n.id.as_str()).unwrap_or(""),
        node: &s.node,
        address: n.map(|n| n.address.as_str()).unwrap_or(""),
        datacenter: n.map(|n| n.datacenter.as_str()).unwrap_or(""),
        tagged_addresses: n.map(|n| &n.tagged_addresses).unwrap_or(&EMPTY_MAP),
        node_meta: n.map(|n| &n.meta).unwrap_or(&EMPTY_MAP),
        service_kind: &s.kind,
        service_id: &s.id,
        service_name: &s.service,
        service_tags: &s.tags,
        service_address: &s.address,
        service_tagged_addresses: &s.tagged_addresses,
        service_weights: s.weights,
        service_meta: &s.meta,
        service_port: s.port,
        service_enable_tag_override: s.enable_tag_override,
        create_index: s.create_index,
        modify_index: s.modify_index,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KvOut<'a> {
    lock_index: u64,
    key: &'a str,
    flags: u64,
    value: Option<String>,
    create_index: u64,
    modify_index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
}

pub fn kv(e: &KvEntry) -> KvOut<'_> {
    use base64::Engine;
    KvOut {
        lock_index: e.lock_index,
        key: &e.key,
        flags: e.flags,
        value: (!e.value.is_empty())
            .then(|| base64::engine::general_purpose::STANDARD.encode(&e.value)),
        create_index: e.create_index,
        modify_index: e.modify_index,
        session: e.session.as_deref(),
    }
}

/// Serializes `v` to JSON bytes. The shapes above cannot fail to serialize (string keys,
/// no non-finite floats); should one ever fail, an empty array keeps clients parsing.
pub fn to_bytes(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot serialize response");
        b"[]".to_vec()
    })
}
