//! `/v1/acl/...`: bootstrap, policies and tokens, in Consul's shapes.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiResult, AppState, Ctx, read_json, with_index};
use crate::acl::{Policy, PolicyLink, Token};
use crate::error::Error;

fn token_json(t: &Token, with_secret: bool) -> Value {
    json!({
        "AccessorID": t.accessor_id,
        "SecretID": if with_secret { t.secret_id.as_str() } else { "<hidden>" },
        "Description": t.description,
        "Policies": t.policies,
        "Local": t.local,
        "CreateIndex": t.create_index,
        "ModifyIndex": t.modify_index,
    })
}

pub async fn bootstrap(State(reg): State<AppState>) -> ApiResult {
    let token = reg.acl_bootstrap().await?;
    Ok(with_index(
        reg.current_index(),
        StatusCode::OK,
        token_json(&token, true),
    ))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct PolicyBody {
    #[serde(rename = "ID")]
    id: Option<String>,
    name: String,
    description: String,
    rules: String,
}

pub async fn policy_create(State(reg): State<AppState>, ctx: Ctx, body: Body) -> ApiResult {
    let b: PolicyBody = read_json(body).await?;
    if b.id.as_deref().is_some_and(|i| !i.is_empty()) {
        return Err(Error::bad(
            "Cannot specify an ID when creating a policy; use PUT /v1/acl/policy/:id to update",
        )
        .into());
    }
    let p = reg
        .acl_put_policy(None, b.name, b.description, b.rules, &ctx.authz)
        .await?;
    Ok(with_index(p.modify_index, StatusCode::OK, &p))
}

pub async fn policy_update(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let b: PolicyBody = read_json(body).await?;
    let p = reg
        .acl_put_policy(Some(id), b.name, b.description, b.rules, &ctx.authz)
        .await?;
    Ok(with_index(p.modify_index, StatusCode::OK, &p))
}

pub async fn policy_read(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    reg.acl_read_check(&ctx.authz)?;
    let p: Option<Policy> = reg.read(|st| st.acl.policies.get(&id).cloned());
    match p {
        Some(p) => Ok(with_index(p.modify_index, StatusCode::OK, &p)),
        None => Err(Error::NotFound(format!("ACL policy not found: {id}")).into()),
    }
}

pub async fn policy_delete(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    reg.acl_delete_policy(&id, &ctx.authz).await?;
    Ok(super::json(StatusCode::OK, &true))
}

pub async fn policy_list(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    reg.acl_read_check(&ctx.authz)?;
    let (index, list) = reg.read(|st| {
        let list: Vec<Value> = st
            .acl
            .policies
            .values()
            .map(|p| json!({"ID": p.id, "Name": p.name, "Description": p.description, "CreateIndex": p.create_index, "ModifyIndex": p.modify_index}))
            .collect();
        (st.index, list)
    });
    Ok(with_index(index, StatusCode::OK, list))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct TokenBody {
    #[serde(rename = "AccessorID")]
    accessor_id: Option<String>,
    #[serde(rename = "SecretID")]
    secret_id: Option<String>,
    description: String,
    policies: Vec<LinkBody>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct LinkBody {
    #[serde(rename = "ID")]
    id: String,
    name: String,
}

fn links(b: &TokenBody) -> Vec<PolicyLink> {
    b.policies
        .iter()
        .map(|l| PolicyLink {
            id: l.id.clone(),
            name: l.name.clone(),
        })
        .collect()
}

pub async fn token_create(State(reg): State<AppState>, ctx: Ctx, body: Body) -> ApiResult {
    let b: TokenBody = read_json(body).await?;
    let secret = b.secret_id.clone().filter(|s| !s.is_empty());
    let accessor = b.accessor_id.clone().filter(|s| !s.is_empty());
    if accessor
        .as_ref()
        .is_some_and(|a| reg.read(|st| st.acl.tokens.contains_key(a)))
    {
        return Err(Error::bad("Invalid Token: AccessorID is already in use").into());
    }
    save_token(&reg, &ctx, accessor, secret, &b).await
}

async fn save_token(
    reg: &AppState,
    ctx: &Ctx,
    accessor: Option<String>,
    secret: Option<String>,
    b: &TokenBody,
) -> ApiResult {
    let t = reg
        .acl_put_token(
            accessor,
            secret,
            b.description.clone(),
            links(b),
            &ctx.authz,
        )
        .await?;
    Ok(with_index(
        t.modify_index,
        StatusCode::OK,
        token_json(&t, true),
    ))
}

pub async fn token_update(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let b: TokenBody = read_json(body).await?;
    if !reg.read(|st| st.acl.tokens.contains_key(&id)) {
        return Err(Error::NotFound(format!("ACL token not found: {id}")).into());
    }
    let secret = b.secret_id.clone().filter(|s| !s.is_empty());
    save_token(&reg, &ctx, Some(id), secret, &b).await
}

pub async fn token_read(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    reg.acl_read_check(&ctx.authz)?;
    let t = reg.read(|st| st.acl.tokens.get(&id).cloned());
    match t {
        Some(t) => Ok(with_index(
            t.modify_index,
            StatusCode::OK,
            token_json(&t, true),
        )),
        None => Err(Error::NotFound(format!("ACL token not found: {id}")).into()),
    }
}

pub async fn token_self(
    State(reg): State<AppState>,
    headers: axum::http::HeaderMap,
    ctx: Ctx,
) -> ApiResult {
    if !reg.acl_enabled {
        return Err(Error::bad("ACL support disabled").into());
    }
    let secret = super::token_from(&headers, &ctx.q)
        .filter(|s| !s.is_empty())
        .ok_or(Error::AclNotFound)?;
    let t = reg
        .read(|st| st.acl.token_by_secret(&secret).cloned())
        .ok_or(Error::AclNotFound)?;
    Ok(with_index(
        t.modify_index,
        StatusCode::OK,
        token_json(&t, true),
    ))
}

pub async fn token_delete(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult {
    reg.acl_delete_token(&id, &ctx.authz).await?;
    Ok(super::json(StatusCode::OK, &true))
}

pub async fn token_list(State(reg): State<AppState>, ctx: Ctx) -> ApiResult {
    reg.acl_read_check(&ctx.authz)?;
    let (index, list) = reg.read(|st| {
        let list: Vec<Value> = st
            .acl
            .tokens
            .values()
            .map(|t| token_json(t, false))
            .collect();
        (st.index, list)
    });
    Ok(with_index(index, StatusCode::OK, list))
}
