//! `/v1/session/...`: create, destroy, renew, info, node and list, in Consul's shapes.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiResult, AppState, Blocking, Ctx, read_body, with_index};
use crate::acl::{Level, Resource};
use crate::error::Error;
use crate::model::SessionRecord;
use crate::sessions::SessionCreate;
use crate::state::Topic;

fn session_json(s: &SessionRecord) -> Value {
    let service_checks: Option<Vec<Value>> = (!s.service_checks.is_empty()).then(|| {
        s.service_checks
            .iter()
            .map(|id| json!({"ID": id, "Namespace": ""}))
            .collect()
    });
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        // Nanoseconds, as Go's time.Duration marshals.
        "LockDelay": s.lock_delay_ms.saturating_mul(1_000_000),
        "Behavior": s.behavior,
        "TTL": s.ttl_ms.map(|t| tessera_core::format_duration(std::time::Duration::from_millis(t))).unwrap_or_default(),
        "NodeChecks": s.node_checks,
        "Checks": s.node_checks,
        "ServiceChecks": service_checks,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

pub async fn create(State(reg): State<AppState>, ctx: Ctx, body: Body) -> ApiResult {
    // Clients send no body at all for a session with every default.
    let bytes = read_body(body, super::MAX_JSON_BODY).await?;
    let req: SessionCreate = if bytes.iter().all(u8::is_ascii_whitespace) {
        SessionCreate::default()
    } else {
        crate::defs::parse_json(&bytes)?
    };
    let id = reg.session_create(req, &ctx.authz).await?;
    Ok(with_index(
        reg.current_index(),
        StatusCode::OK,
        json!({"ID": id}),
    ))
}

pub async fn destroy(State(reg): State<AppState>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    reg.session_destroy(&id, &ctx.authz).await?;
    Ok(with_index(reg.current_index(), StatusCode::OK, true))
}

pub async fn renew(State(reg): State<AppState>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    match reg.session_renew(&id, &ctx.authz).await? {
        Some(s) => Ok(with_index(
            reg.current_index(),
            StatusCode::OK,
            vec![session_json(&s)],
        )),
        None => Err(Error::NotFound(format!("Session id '{id}' not found")).into()),
    }
}

pub async fn info(state: State<AppState>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    listing(state, ctx, move |s| s.id == id).await
}

pub async fn node(state: State<AppState>, ctx: Ctx, Path(node): Path<String>) -> ApiResult {
    listing(state, ctx, move |s| s.node == node).await
}

pub async fn list(state: State<AppState>, ctx: Ctx) -> ApiResult {
    listing(state, ctx, |_| true).await
}

/// Sessions matching `keep` that the token may read, as a blocking query.
async fn listing(
    State(reg): State<AppState>,
    ctx: Ctx,
    keep: impl Fn(&SessionRecord) -> bool,
) -> ApiResult {
    let b = Blocking::from(&ctx.q)?;
    let (index, out) = reg
        .blocking(Topic::Sessions, b.index, b.wait, |st| {
            let out: Vec<Value> = st
                .sessions
                .values()
                .filter(|s| keep(s))
                .filter(|s| ctx.authz.allows(Resource::Session, &s.node, Level::Read))
                .map(session_json)
                .collect();
            (st.topic_index(&Topic::Sessions).max(1), out)
        })
        .await;
    Ok(with_index(index, StatusCode::OK, out))
}
