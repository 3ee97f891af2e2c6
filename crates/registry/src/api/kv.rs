//! `/v1/kv/...`: keys, prefixes, CAS and blocking reads, in Consul's shapes.

use super::render;
use super::{ApiResult, AppState, Blocking, Ctx, add_meta, json_bytes, read_body};
use crate::acl::{Level, Resource};
use crate::error::Error;
use crate::state::Topic;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

enum KvRead {
    Missing,
    Raw(Vec<u8>),
    Json(Vec<u8>),
}

pub async fn get_root(state: State<AppState>, ctx: Ctx) -> ApiResult {
    get_key(state, ctx, String::new()).await
}

/// Keys are stored without a leading `/`: `/v1/kv//a` and `/v1/kv/a` are the same key.
fn clean(key: String) -> String {
    match key.strip_prefix('/') {
        Some(rest) => rest.trim_start_matches('/').to_owned(),
        None => key,
    }
}

pub async fn get(state: State<AppState>, ctx: Ctx, Path(key): Path<String>) -> ApiResult {
    get_key(state, ctx, clean(key)).await
}

async fn get_key(State(reg): State<AppState>, ctx: Ctx, key: String) -> ApiResult {
    let b = Blocking::from(&ctx.q)?;
    let recurse = ctx.q.flag("recurse")?;
    let keys = ctx.q.get("keys").is_some();
    let raw = ctx.q.flag("raw")?;
    let separator = ctx.q.get("separator").unwrap_or_default().to_owned();
    if !recurse && !keys {
        if key.is_empty() {
            return Err(Error::bad("Missing key name").into());
        }
        if !ctx.authz.allows(Resource::Key, &key, Level::Read) {
            return Err(Error::denied(format!("token lacks key:read on {key:?}")).into());
        }
    }
    let (index, result) = reg
        .blocking(Topic::Kv, b.index, b.wait, |st| {
            let exact = !recurse && !keys;
            let index = st.kv_index(&key, exact);
            if exact {
                return match st.kv.get(&key) {
                    None => (index, KvRead::Missing),
                    Some(e) if raw => (index, KvRead::Raw(e.value.clone())),
                    Some(e) => (index, KvRead::Json(render::to_bytes(&[render::kv(e)]))),
                };
            }
            let matching = st
                .kv
                .range(key.clone()..)
                .take_while(|(k, _)| k.starts_with(&key))
                .filter(|(k, _)| ctx.authz.allows(Resource::Key, k, Level::Read));
            if keys {
                let mut out: Vec<String> = Vec::new();
                for (k, _) in matching {
                    let rest = &k[key.len()..];
                    let item = match (separator.is_empty(), rest.find(&separator)) {
                        (false, Some(pos)) => format!("{key}{}", &rest[..pos + separator.len()]),
                        _ => k.clone(),
                    };
                    if out.last() != Some(&item) {
                        out.push(item);
                    }
                }
                if out.is_empty() {
                    return (index, KvRead::Missing);
                }
                return (index, KvRead::Json(render::to_bytes(&out)));
            }
            let out: Vec<_> = matching.map(|(_, e)| render::kv(e)).collect();
            if out.is_empty() {
                (index, KvRead::Missing)
            } else {
                (index, KvRead::Json(render::to_bytes(&out)))
            }
        })
        .await;
    Ok(match result {
        KvRead::Missing => {
            let mut resp = StatusCode::NOT_FOUND.into_response();
            add_meta(resp.headers_mut(), index);
            resp
        }
        KvRead::Raw(bytes) => {
            let mut resp = Response::new(Body::from(bytes));
            resp.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            add_meta(resp.headers_mut(), index);
            resp
        }
        KvRead::Json(v) => json_bytes(index, StatusCode::OK, v),
    })
}

/// `?acquire=<session>` or `?release=<session>`, at most one.
fn lock_of(ctx: &Ctx) -> Result<Option<crate::sessions::Lock>, Error> {
    use crate::sessions::Lock;
    match (ctx.q.get("acquire"), ctx.q.get("release")) {
        (Some(_), Some(_)) => Err(Error::bad("Conflicting flags: acquire and release")),
        (Some(""), _) | (_, Some("")) => Err(Error::bad("acquire and release need a session id")),
        (Some(id), None) => Ok(Some(Lock::Acquire(id.to_owned()))),
        (None, Some(id)) => Ok(Some(Lock::Release(id.to_owned()))),
        (None, None) => Ok(None),
    }
}

pub async fn put_root(State(_reg): State<AppState>, _ctx: Ctx) -> ApiResult {
    Err(Error::bad("Missing key name").into())
}

pub async fn put(
    State(reg): State<AppState>,
    ctx: Ctx,
    Path(key): Path<String>,
    body: Body,
) -> ApiResult {
    let lock = lock_of(&ctx)?;
    let key = clean(key);
    if key.is_empty() {
        return Err(Error::bad("Missing key name").into());
    }
    let flags = ctx.q.u64("flags")?;
    let cas = ctx.q.u64("cas")?;
    tessera_core::validate_key(&key).map_err(Error::from)?;
    // Read one byte past the limit so an oversize value is told apart from a limit hit.
    let limit = reg.config.kv_max_value_bytes;
    let value = match read_body(body, limit + 1).await {
        Ok(b) => b,
        Err(Error::TooLarge(_)) => {
            return Err(Error::TooLarge(format!(
                "Value exceeds {limit} byte limit; raise kv_max_value_bytes to store larger values"
            ))
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    let ok = reg
        .kv_put(key, value.to_vec(), flags, cas, lock, &ctx.authz)
        .await?;
    Ok(super::json(StatusCode::OK, &ok))
}

pub async fn delete_root(state: State<AppState>, ctx: Ctx) -> ApiResult {
    delete_key(state, ctx, String::new()).await
}

pub async fn delete(state: State<AppState>, ctx: Ctx, Path(key): Path<String>) -> ApiResult {
    delete_key(state, ctx, clean(key)).await
}

async fn delete_key(State(reg): State<AppState>, ctx: Ctx, key: String) -> ApiResult {
    let recurse = ctx.q.flag("recurse")?;
    let cas = ctx.q.u64("cas")?;
    if !recurse && key.is_empty() {
        return Err(Error::bad("Missing key name").into());
    }
    let ok = reg.kv_delete(key, recurse, cas, &ctx.authz).await?;
    Ok(super::json(StatusCode::OK, &ok))
}

/// `PUT /v1/txn`: KV operations applied all or none (409 with the failures).
pub async fn txn(State(reg): State<AppState>, ctx: Ctx, body: Body) -> ApiResult {
    let ops: Vec<crate::txn::TxnOp> = super::read_json(body).await?;
    match reg.txn(ops, &ctx.authz).await? {
        Ok(results) => {
            let results: Vec<serde_json::Value> = results
                .iter()
                .flat_map(|r| {
                    r.entries.iter().map(|e| {
                        let mut v = serde_json::to_value(render::kv(e)).unwrap_or_default();
                        if !r.with_value {
                            v["Value"] = serde_json::Value::Null;
                        }
                        serde_json::json!({ "KV": v })
                    })
                })
                .collect();
            Ok(super::with_index(
                reg.current_index(),
                StatusCode::OK,
                serde_json::json!({"Results": results, "Errors": null}),
            ))
        }
        Err(errors) => {
            let errors: Vec<serde_json::Value> = errors
                .iter()
                .map(|e| serde_json::json!({"OpIndex": e.op_index, "What": e.what}))
                .collect();
            Ok(super::json(
                StatusCode::CONFLICT,
                &serde_json::json!({"Results": null, "Errors": errors}),
            ))
        }
    }
}
