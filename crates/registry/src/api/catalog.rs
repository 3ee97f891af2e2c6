//! `/v1/catalog/...` and `/v1/health/...`: every node's services and their health.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use tessera_core::Health;

use super::render::{self, HealthEntry};
use super::{ApiResult, AppState, Blocking, Ctx, json_bytes, keep, read_json, with_index};
use crate::acl::{Authz, Level, Resource};
use crate::defs::{CatalogDeregistration, CatalogRegistration};
use crate::error::Error;
use crate::model::{CheckRecord, ServiceRecord};
use crate::registry::service_index;
use crate::state::{State as Reg, Topic};

fn has_tags(s: &ServiceRecord, want: &[String]) -> bool {
    want.iter().all(|t| s.tags.iter().any(|have| have == t))
}

fn can_read_service(authz: &Authz, name: &str) -> bool {
    authz.allows(Resource::Service, name, Level::Read)
}

pub async fn services(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    let filter = super::filter(&ctx.q)?;
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Services, b.index, b.wait, |st| {
            let mut out: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (name, keys) in &st.by_name {
                if !can_read_service(&ctx.authz, name) {
                    continue;
                }
                let instances: Vec<&ServiceRecord> = keys
                    .iter()
                    .filter_map(|k| st.services.get(k))
                    .filter(|s| {
                        filter.is_none()
                            || keep(&filter, &render::catalog_service(st.nodes.get(&s.node), s))
                    })
                    .collect();
                if instances.is_empty() {
                    continue;
                }
                let mut tags: Vec<String> = instances
                    .iter()
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
    let filter = super::filter(&ctx.q)?;
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
                        let entry = render::catalog_service(st.nodes.get(&s.node), s);
                        if keep(&filter, &entry) {
                            out.push(entry);
                        }
                    }
                }
            }
            (service_index(st, &name), render::to_bytes(&out))
        })
        .await;
    Ok(json_bytes(index, StatusCode::OK, body))
}

pub async fn nodes(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    let filter = super::filter(&ctx.q)?;
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Nodes, b.index, b.wait, |st| {
            let out: Vec<_> = st
                .nodes
                .values()
                .filter(|n| ctx.authz.allows(Resource::Node, &n.node, Level::Read))
                .filter(|n| keep(&filter, n))
                .collect();
            (st.topic_index(&Topic::Nodes), render::to_bytes(&out))
        })
        .await;
    Ok(json_bytes(index, StatusCode::OK, body))
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
            let services: BTreeMap<&str, _> = st
                .services
                .range((node.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == node)
                .filter(|(_, s)| can_read_service(&ctx.authz, &s.service))
                .map(|((_, id), s)| (id.as_str(), render::service(s)))
                .collect();
            (
                st.topic_index(&Topic::Nodes)
                    .max(st.topic_index(&Topic::Services)),
                json!({"Node": n, "Services": services}),
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
    let filter = super::filter(&ctx.q)?;
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
                    let entry = HealthEntry {
                        node: st.nodes.get(&s.node),
                        service: render::service(s),
                        checks: checks.iter().map(|c| render::check(st, c)).collect(),
                    };
                    if keep(&filter, &entry) {
                        out.push(entry);
                    }
                }
            }
            (service_index(st, &name), render::to_bytes(&out))
        })
        .await;
    Ok(json_bytes(index, StatusCode::OK, body))
}

pub async fn health_checks(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> ApiResult {
    let filter = super::filter(&ctx.q)?;
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
                                let entry = render::check(st, c);
                                if keep(&filter, &entry) {
                                    out.push(entry);
                                }
                            }
                        }
                    }
                }
            }
            (service_index(st, &name), render::to_bytes(&out))
        })
        .await;
    Ok(json_bytes(index, StatusCode::OK, body))
}

pub async fn health_node(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(node): Path<String>,
) -> ApiResult {
    let filter = super::filter(&ctx.q)?;
    let b = Blocking::from(&ctx.q)?;
    let (index, body) = reg
        .blocking(Topic::Checks, b.index, b.wait, |st| {
            let out: Vec<_> = st
                .checks
                .range((node.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == node)
                .filter(|(_, c)| check_visible(&ctx.authz, c))
                .map(|(_, c)| render::check(st, c))
                .filter(|c| keep(&filter, c))
                .collect();
            (st.topic_index(&Topic::Checks), render::to_bytes(&out))
        })
        .await;
    Ok(json_bytes(index, StatusCode::OK, body))
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
    let filter = super::filter(&ctx.q)?;
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
            let out: Vec<_> = st
                .checks
                .values()
                .filter(|c| want.is_none_or(|w| c.status == w))
                .filter(|c| check_visible(&ctx.authz, c))
                .map(|c| render::check(st, c))
                .filter(|c| keep(&filter, c))
                .collect();
            (st.topic_index(&Topic::Checks), render::to_bytes(&out))
        })
        .await;
    Ok(json_bytes(index, StatusCode::OK, body))
}
