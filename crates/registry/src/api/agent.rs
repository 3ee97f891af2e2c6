//! `/v1/agent/...`: the services and checks of this server's own node.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tessera_core::Health;

use super::render;
use super::{ApiResult, AppState, Blocking, Ctx, json_bytes, keep, read_json, with_index};
use crate::acl::{Level, Resource};
use crate::defs::{CheckDef, CheckUpdate, ServiceDef};
use crate::state::Topic;

pub async fn agent_self(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    if !ctx
        .authz
        .allows(Resource::Agent, reg.local_node(), Level::Read)
    {
        return Err(crate::error::Error::denied("token lacks agent:read").into());
    }
    let protection = reg.mass_expiry_protection();
    let body = json!({
        "Config": {
            "Datacenter": reg.config.datacenter,
            "PrimaryDatacenter": reg.config.datacenter,
            "NodeName": reg.config.node_name,
            "NodeID": reg.node_id,
            "Server": true,
            "Revision": "tessera",
            "Version": "1.20.0",
            "TesseraVersion": env!("CARGO_PKG_VERSION"),
        },
        "DebugConfig": {},
        "Coord": null,
        "Member": {
            "Name": reg.config.node_name,
            "Addr": reg.config.advertise_addr,
            "Port": 8301,
            "Tags": {"dc": reg.config.datacenter, "role": "consul", "id": reg.node_id},
            "Status": 1,
        },
        "Stats": {},
        "Meta": {},
        "xDS": null,
        // Tessera's own: whether TTL expiry is held because too many expired at once.
        "MassExpiryProtection": {
            "Active": protection.active,
            "HeldChecks": protection.held,
            "Threshold": protection.threshold,
        },
    });
    Ok(with_index(reg.current_index(), StatusCode::OK, body))
}

pub async fn services(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    let filter = super::filter(&ctx.q)?;
    let b = Blocking::from(&ctx.q)?;
    let local = reg.local_node().to_owned();
    let dc = reg.config.datacenter.clone();
    let (index, body) = reg
        .blocking(Topic::Services, b.index, b.wait, |st| {
            let mut out = BTreeMap::new();
            for ((node, id), s) in st
                .services
                .range((local.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == local)
            {
                let _ = node;
                let entry = render::agent_service(s, &dc);
                if ctx.authz.allows(Resource::Service, &s.service, Level::Read)
                    && keep(&filter, &entry)
                {
                    out.insert(id.as_str(), entry);
                }
            }
            (st.topic_index(&Topic::Services), render::to_bytes(&out))
        })
        .await;
    Ok(json_bytes(index, StatusCode::OK, body))
}

pub async fn service(State(reg): State<AppState>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let local = reg.local_node().to_owned();
    let dc = reg.config.datacenter.clone();
    let found = reg.read(|st| {
        st.services.get(&(local.clone(), id.clone())).map(|s| {
            let body = render::to_bytes(&render::agent_service(s, &dc));
            (s.service.clone(), body, st.index)
        })
    });
    match found {
        None => Err(crate::error::Error::NotFound(format!("unknown service ID: {id}")).into()),
        Some((name, _, _)) if !ctx.authz.allows(Resource::Service, &name, Level::Read) => {
            Err(crate::error::Error::denied(format!("token lacks service:read on {name:?}")).into())
        }
        Some((_, body, index)) => Ok(json_bytes(index, StatusCode::OK, body)),
    }
}

pub async fn checks(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    let filter = super::filter(&ctx.q)?;
    let b = Blocking::from(&ctx.q)?;
    let local = reg.local_node().to_owned();
    let (index, body) = reg
        .blocking(Topic::Checks, b.index, b.wait, |st| {
            let mut out = BTreeMap::new();
            for ((_, id), c) in st
                .checks
                .range((local.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == local)
            {
                let allowed = if c.service_name.is_empty() {
                    ctx.authz.allows(Resource::Node, &local, Level::Read)
                } else {
                    ctx.authz
                        .allows(Resource::Service, &c.service_name, Level::Read)
                };
                let entry = render::check(st, c);
                if allowed && keep(&filter, &entry) {
                    out.insert(id.as_str(), entry);
                }
            }
            (st.topic_index(&Topic::Checks), render::to_bytes(&out))
        })
        .await;
    Ok(json_bytes(index, StatusCode::OK, body))
}

pub async fn register(State(reg): State<AppState>, ctx: Ctx, body: Body) -> ApiResult {
    let def: ServiceDef = read_json(body).await?;
    let replace = ctx.q.flag("replace-existing-checks")?;
    reg.register_service(def, replace, &ctx.authz).await?;
    Ok(StatusCode::OK.into_response())
}

pub async fn deregister(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    reg.deregister_service(&id, &ctx.authz).await?;
    Ok(StatusCode::OK.into_response())
}

pub async fn maintenance(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    let enable = match ctx.q.get("enable") {
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(crate::error::Error::bad(format!(
                "Invalid value for ?enable: {other:?} (expected true or false)"
            ))
            .into());
        }
        None => return Err(crate::error::Error::bad("Missing value for enable").into()),
    };
    let reason = ctx.q.get("reason").map(str::to_owned);
    reg.maintenance(&id, enable, reason, &ctx.authz).await?;
    Ok(StatusCode::OK.into_response())
}

pub async fn check_register(State(reg): State<AppState>, ctx: Ctx, body: Body) -> ApiResult {
    let def: CheckDef = read_json(body).await?;
    reg.register_check(def, &ctx.authz).await?;
    Ok(StatusCode::OK.into_response())
}

pub async fn check_deregister(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    reg.deregister_check(&id, &ctx.authz).await?;
    Ok(StatusCode::OK.into_response())
}

async fn ttl_update(
    reg: &AppState,
    ctx: &Ctx,
    id: &str,
    status: Health,
) -> Result<Response, super::ApiError> {
    let note = ctx.q.get("note").unwrap_or_default().to_owned();
    reg.heartbeat(id, status, note, &ctx.authz).await?;
    Ok(StatusCode::OK.into_response())
}

pub async fn check_pass(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    ttl_update(&reg, &ctx, &id, Health::Passing).await
}

pub async fn check_warn(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    ttl_update(&reg, &ctx, &id, Health::Warning).await
}

pub async fn check_fail(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    ttl_update(&reg, &ctx, &id, Health::Critical).await
}

pub async fn check_update(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let upd: CheckUpdate = read_json(body).await?;
    let status: Health = upd
        .status
        .parse()
        .map_err(|e| crate::error::Error::bad(format!("Status: {e}")))?;
    reg.heartbeat(&id, status, upd.output, &ctx.authz).await?;
    Ok(StatusCode::OK.into_response())
}

/// `GET /v1/agent/metrics`: Consul's JSON shape, or Prometheus text with
/// `?format=prometheus` (as Consul's agent answers it).
pub async fn metrics(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    if !ctx
        .authz
        .allows(Resource::Agent, reg.local_node(), Level::Read)
    {
        return Err(crate::error::Error::denied("token lacks agent:read").into());
    }
    let s = reg.stats();
    let protection = reg.mass_expiry_protection();
    let gauges: [(&str, &str, f64); 10] = [
        (
            "tessera.http.refused",
            "Requests and connections answered 429 since start (admission control)",
            s.refused as f64,
        ),
        (
            "tessera.health.mass_expiry_protection",
            "1 while TTL expiry is held because too many checks expired at once",
            f64::from(u8::from(protection.active)),
        ),
        (
            "tessera.health.held_checks",
            "TTL checks whose expiry mass-expiry protection holds",
            protection.held as f64,
        ),
        ("tessera.raft.index", "Latest write index", s.index as f64),
        ("tessera.catalog.nodes", "Registered nodes", s.nodes as f64),
        (
            "tessera.catalog.services",
            "Registered service instances",
            s.services as f64,
        ),
        (
            "tessera.catalog.checks",
            "Registered checks",
            s.checks as f64,
        ),
        (
            "tessera.catalog.checks_critical",
            "Checks in state critical",
            s.checks_critical as f64,
        ),
        ("tessera.kv.entries", "KV entries", s.kv_entries as f64),
        (
            "tessera.http.blocking_queries",
            "Blocking queries parked now",
            s.blocking_queries as f64,
        ),
    ];
    if ctx.q.get("format") == Some("prometheus") {
        // Prometheus text: the registry's part of the one metrics scheme (the server's
        // `/metrics` has it too, with the coordinator's and the event store's).
        let mut out = tessera_metrics::Text::new();
        reg.render_metrics(&mut out);
        return Ok(tessera_web::metrics_response(out));
    }
    let body = json!({
        "Timestamp": "",
        "Gauges": gauges.iter().map(|(n, _, v)| json!({"Name": n, "Value": v, "Labels": {}})).collect::<Vec<_>>(),
        "Points": [],
        "Counters": [],
        "Samples": [],
    });
    Ok(with_index(s.index, StatusCode::OK, body))
}
