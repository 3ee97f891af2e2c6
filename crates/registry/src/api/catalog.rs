//! `/v1/catalog/...` and `/v1/health/...`: every node's services and their health.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use tessera_core::{Health, format_duration};

use super::{ApiResult, AppState, Blocking, Ctx, read_json, with_index};
use crate::acl::{Authz, Level, Resource};
use crate::defs::{CatalogDeregistration, CatalogRegistration};
use crate::error::Error;
use crate::model::{CheckRecord, NodeRecord, Probe, ServiceRecord};
use crate::registry::service_index;
use crate::state::{State as Reg, Topic};

pub fn check_json(st: &Reg, c: &CheckRecord) -> Value {
    let tags = st
        .services
        .get(&(c.node.clone(), c.service_id.clone()))
        .map(|s| s.tags.clone())
        .unwrap_or_default();
    let mut def = serde_json::Map::new();
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
                def.insert("HTTP".into(), json!(url));
                def.insert("Method".into(), json!(method));
                def.insert("Header".into(), json!(header));
                def.insert("Body".into(), json!(body));
                def.insert("TLSSkipVerify".into(), json!(tls_skip_verify));
            }
            Probe::Tcp { addr } => {
                def.insert("TCP".into(), json!(addr));
            }
            Probe::Grpc { target, use_tls } => {
                def.insert("GRPC".into(), json!(target));
                def.insert("GRPCUseTLS".into(), json!(use_tls));
            }
            Probe::Ttl { ttl } => {
                def.insert("TTL".into(), json!(format_duration(*ttl)));
            }
        }
        if let Some(i) = spec.interval {
            interval = format_duration(i);
            def.insert("Interval".into(), json!(interval));
        }
        if let Some(t) = spec.timeout {
            timeout = format_duration(t);
            def.insert("Timeout".into(), json!(timeout));
        }
        if let Some(d) = spec.deregister_critical_after {
            def.insert(
                "DeregisterCriticalServiceAfter".into(),
                json!(format_duration(d)),
            );
        }
    }
    json!({
        "Node": c.node,
        "CheckID": c.check_id,
        "Name": c.name,
        "Status": c.status,
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": c.service_name,
        "ServiceTags": tags,
        "Type": c.type_name(),
        "Interval": interval,
        "Timeout": timeout,
        "ExposedPort": 0,
        "Definition": def,
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    })
}

fn node_json(n: &NodeRecord) -> Value {
    json!({
        "ID": n.id,
        "Node": n.node,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": n.tagged_addresses,
        "Meta": n.meta,
        "CreateIndex": n.create_index,
        "ModifyIndex": n.modify_index,
    })
}

fn catalog_service_json(n: Option<&NodeRecord>, s: &ServiceRecord) -> Value {
    json!({
        "ID": n.map(|n| n.id.as_str()).unwrap_or(""),
        "Node": s.node,
        "Address": n.map(|n| n.address.as_str()).unwrap_or(""),
        "Datacenter": n.map(|n| n.datacenter.as_str()).unwrap_or(""),
        "TaggedAddresses": n.map(|n| json!(n.tagged_addresses)).unwrap_or(json!({})),
        "NodeMeta": n.map(|n| json!(n.meta)).unwrap_or(json!({})),
        "ServiceKind": s.kind,
        "ServiceID": s.id,
        "ServiceName": s.service,
        "ServiceTags": s.tags,
        "ServiceAddress": s.address,
        "ServiceTaggedAddresses": s.tagged_addresses,
        "ServiceWeights": s.weights,
        "ServiceMeta": s.meta,
        "ServicePort": s.port,
        "ServiceEnableTagOverride": s.enable_tag_override,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// A service as Consul's health and node endpoints show it (no `Node` field).
fn service_json(s: &ServiceRecord) -> Value {
    json!({
        "ID": s.id,
        "Service": s.service,
        "Tags": s.tags,
        "Address": s.address,
        "Port": s.port,
        "Meta": s.meta,
        "Weights": s.weights,
        "EnableTagOverride": s.enable_tag_override,
        "Kind": s.kind,
        "TaggedAddresses": s.tagged_addresses,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

fn has_tags(s: &ServiceRecord, want: &[String]) -> bool {
    want.iter().all(|t| s.tags.iter().any(|have| have == t))
}

fn reject_filter(ctx: &Ctx) -> Result<(), Error> {
    if ctx.q.get("filter").is_some_and(|f| !f.is_empty()) {
        return Err(Error::bad(
            "?filter expressions are not supported yet; use ?tag= and ?passing",
        ));
    }
    Ok(())
}

fn can_read_service(authz: &Authz, name: &str) -> bool {
    authz.allows(Resource::Service, name, Level::Read)
}

pub async fn services(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    reject_filter(&ctx)?;
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Services, b.index, b.wait, |st| {
            let mut out: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (name, keys) in &st.by_name {
                if !can_read_service(&ctx.authz, name) {
                    continue;
                }
                let mut tags: Vec<String> = keys
                    .iter()
                    .filter_map(|k| st.services.get(k))
                    .flat_map(|s| s.tags.iter().cloned())
                    .collect();
                tags.sort();
                tags.dedup();
                out.insert(name, tags);
            }
            (st.topic_index(&Topic::Services), json!(out))
        })
        .await;
    Ok(with_index(index, StatusCode::OK, body))
}

pub async fn service(State(reg): State<AppState>, ctx: Ctx, Path(name): Path<String>) -> ApiResult {
    reject_filter(&ctx)?;
    let b = Blocking::from(&ctx.q)?;
    let tags: Vec<String> = ctx.q.all("tag").map(str::to_owned).collect();
    let (index, body) = reg
        .blocking(Topic::Service(name.clone()), b.index, b.wait, |st| {
            let mut out = Vec::new();
            if can_read_service(&ctx.authz, &name)
                && let Some(keys) = st.by_name.get(&name)
            {
                for k in keys {
                    if let Some(s) = st.services.get(k)
                        && has_tags(s, &tags)
                    {
                        out.push(catalog_service_json(st.nodes.get(&s.node), s));
                    }
                }
            }
            (service_index(st, &name), out)
        })
        .await;
    Ok(with_index(index, StatusCode::OK, body))
}

pub async fn nodes(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    reject_filter(&ctx)?;
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Nodes, b.index, b.wait, |st| {
            let out: Vec<Value> = st
                .nodes
                .values()
                .filter(|n| ctx.authz.allows(Resource::Node, &n.node, Level::Read))
                .map(node_json)
                .collect();
            (st.topic_index(&Topic::Nodes), out)
        })
        .await;
    Ok(with_index(index, StatusCode::OK, body))
}

pub async fn node(State(reg): State<AppState>, ctx: Ctx, Path(node): Path<String>) -> ApiResult {
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Nodes, b.index, b.wait, |st| {
            let Some(n) = st.nodes.get(&node) else {
                return (st.topic_index(&Topic::Nodes), Value::Null);
            };
            if !ctx.authz.allows(Resource::Node, &node, Level::Read) {
                return (st.topic_index(&Topic::Nodes), Value::Null);
            }
            let services: BTreeMap<&str, Value> = st
                .services
                .range((node.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == node)
                .filter(|(_, s)| can_read_service(&ctx.authz, &s.service))
                .map(|((_, id), s)| (id.as_str(), service_json(s)))
                .collect();
            (
                st.topic_index(&Topic::Nodes)
                    .max(st.topic_index(&Topic::Services)),
                json!({"Node": node_json(n), "Services": services}),
            )
        })
        .await;
    if body.is_null() {
        return Ok(with_index(index, StatusCode::NOT_FOUND, Value::Null));
    }
    Ok(with_index(index, StatusCode::OK, body))
}

pub async fn datacenters(State(reg): State<AppState>) -> ApiResult {
    Ok(super::json(StatusCode::OK, &[&reg.config.datacenter]))
}

pub async fn register(State(reg): State<AppState>, ctx: Ctx, body: Body) -> ApiResult {
    let r: CatalogRegistration = read_json(body).await?;
    reg.catalog_register(r, &ctx.authz).await?;
    Ok(super::json(StatusCode::OK, &true))
}

pub async fn deregister(State(reg): State<AppState>, ctx: Ctx, body: Body) -> ApiResult {
    let d: CatalogDeregistration = read_json(body).await?;
    reg.catalog_deregister(d, &ctx.authz).await?;
    Ok(super::json(StatusCode::OK, &true))
}

pub async fn health_service(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> ApiResult {
    reject_filter(&ctx)?;
    let b = Blocking::from(&ctx.q)?;
    let passing = ctx.q.flag("passing")?;
    let tags: Vec<String> = ctx.q.all("tag").map(str::to_owned).collect();
    let (index, body) = reg
        .blocking(Topic::Service(name.clone()), b.index, b.wait, |st| {
            let mut out = Vec::new();
            if can_read_service(&ctx.authz, &name)
                && let Some(keys) = st.by_name.get(&name)
            {
                for k in keys {
                    let Some(s) = st.services.get(k) else {
                        continue;
                    };
                    if !has_tags(s, &tags) {
                        continue;
                    }
                    let checks = st.instance_checks(&s.node, &s.id);
                    if passing && Reg::aggregate(&checks) != Health::Passing {
                        continue;
                    }
                    let node = st.nodes.get(&s.node).map(node_json).unwrap_or(Value::Null);
                    out.push(json!({
                        "Node": node,
                        "Service": service_json(s),
                        "Checks": checks.iter().map(|c| check_json(st, c)).collect::<Vec<_>>(),
                    }));
                }
            }
            (service_index(st, &name), out)
        })
        .await;
    Ok(with_index(index, StatusCode::OK, body))
}

pub async fn health_checks(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> ApiResult {
    reject_filter(&ctx)?;
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Service(name.clone()), b.index, b.wait, |st| {
            let mut out = Vec::new();
            if can_read_service(&ctx.authz, &name)
                && let Some(keys) = st.by_name.get(&name)
            {
                for (node, id) in keys {
                    if let Some(ids) = st.checks_by_owner.get(&(node.clone(), id.clone())) {
                        for cid in ids {
                            if let Some(c) = st.checks.get(&(node.clone(), cid.clone())) {
                                out.push(check_json(st, c));
                            }
                        }
                    }
                }
            }
            (service_index(st, &name), out)
        })
        .await;
    Ok(with_index(index, StatusCode::OK, body))
}

pub async fn health_node(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(node): Path<String>,
) -> ApiResult {
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Checks, b.index, b.wait, |st| {
            let out: Vec<Value> = st
                .checks
                .range((node.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == node)
                .filter(|(_, c)| check_visible(&ctx.authz, c))
                .map(|(_, c)| check_json(st, c))
                .collect();
            (st.topic_index(&Topic::Checks), out)
        })
        .await;
    Ok(with_index(index, StatusCode::OK, body))
}

fn check_visible(authz: &Authz, c: &CheckRecord) -> bool {
    if c.service_name.is_empty() {
        authz.allows(Resource::Node, &c.node, Level::Read)
    } else {
        authz.allows(Resource::Service, &c.service_name, Level::Read)
    }
}

pub async fn health_state(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(state): Path<String>,
) -> ApiResult {
    reject_filter(&ctx)?;
    let want: Option<Health> = match state.as_str() {
        "any" => None,
        s => Some(s.parse().map_err(|_| {
            Error::bad(format!(
                "Invalid check state {s:?}: expected any, passing, warning or critical"
            ))
        })?),
    };
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Checks, b.index, b.wait, |st| {
            let out: Vec<Value> = st
                .checks
                .values()
                .filter(|c| want.is_none_or(|w| c.status == w))
                .filter(|c| check_visible(&ctx.authz, c))
                .map(|c| check_json(st, c))
                .collect();
            (st.topic_index(&Topic::Checks), out)
        })
        .await;
    Ok(with_index(index, StatusCode::OK, body))
}
