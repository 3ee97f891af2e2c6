//! The coordinator's HTTP API, mounted on `tessera server`:
//! `POST /v1/sagas`, `GET /v1/sagas/{id}`, `GET /v1/sagas?status=&limit=`, and
//! `GET /v1/tessera/coordinator/metrics` (Prometheus text).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::def::SagaDef;
use crate::engine::Engine;
use crate::saga::SagaStatus;
use crate::tcc::{TccDef, TccEngine, TccStatus};

pub use tessera_core::{AllowAll, Authorize};

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    tcc: Arc<TccEngine>,
    auth: Arc<dyn Authorize>,
}

pub fn router(engine: Arc<Engine>, tcc: Arc<TccEngine>, auth: Arc<dyn Authorize>) -> Router {
    Router::new()
        .route("/v1/sagas", get(list).post(start))
        .route("/v1/sagas/{id}", get(one))
        .route("/v1/tcc", get(tcc_list).post(tcc_start))
        .route("/v1/tcc/{id}", get(tcc_one))
        .route("/v1/tessera/coordinator/metrics", get(metrics))
        .with_state(AppState { engine, tcc, auth })
}

/// An API error: status, message and a stable code, as `{"error","code"}`.
struct ApiError(StatusCode, String, &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tessera_web::error(self.0, self.2, self.1)
    }
}

fn authorize(st: &AppState, headers: &HeaderMap, write: bool) -> Result<(), ApiError> {
    st.auth
        .check(
            tessera_core::request_token(|n| headers.get(n).and_then(|v| v.to_str().ok())),
            write,
        )
        .map_err(|e| ApiError(StatusCode::FORBIDDEN, e, "permission_denied"))
}

/// The store did not answer or did not keep the write: 507 on a full disk, else 503.
fn internal(e: impl Into<tessera_sql::Refused>) -> ApiError {
    let r = e.into();
    ApiError(r.status(), format!("saga store: {r}"), r.code())
}

/// The optional `Idempotency-Key` of a start request.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 256);
            Some(
                k.ok_or_else(|| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        "Idempotency-Key must be 1 to 256 visible ASCII characters".into(),
                        "bad_idempotency_key",
                    )
                })?
                .to_owned(),
            )
        }
    })
}

/// A JSON definition, with errors that say where (`steps[1].action.url: ...`).
fn parse_def<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let msg = if path == "." {
            format!("invalid {what} definition: {}", e.inner())
        } else {
            format!("invalid {what} definition at {path}: {}", e.inner())
        };
        ApiError(StatusCode::BAD_REQUEST, msg, "bad_definition")
    })
}

fn invalid_def(what: &str, e: crate::def::InvalidDef) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        format!("invalid {what} definition: {e}"),
        "bad_definition",
    )
}

fn started<T: serde::Serialize>(created: bool, location: String, body: T) -> Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, [(header::LOCATION, location)], axum::Json(body)).into_response()
}

async fn start(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, true)?;
    let key = idempotency_key(&headers)?;
    let def: SagaDef = parse_def(&body, "saga")?;
    def.validate().map_err(|e| invalid_def("saga", e))?;
    let (saga, created) = st.engine.start(def, key).await.map_err(internal)?;
    Ok(started(created, format!("/v1/sagas/{}", saga.id), saga))
}

async fn tcc_start(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, true)?;
    let key = idempotency_key(&headers)?;
    let def: TccDef = parse_def(&body, "TCC")?;
    def.validate().map_err(|e| invalid_def("TCC", e))?;
    let (tx, created) = st.tcc.start(def, key).await.map_err(internal)?;
    Ok(started(created, format!("/v1/tcc/{}", tx.id), tx))
}

async fn tcc_one(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, false)?;
    match st.tcc.get(&id).await.map_err(internal)? {
        Some(tx) => Ok(axum::Json(tx).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no TCC transaction {id}"),
            "not_found",
        )),
    }
}

async fn one(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, false)?;
    match st.engine.get(&id).await.map_err(internal)? {
        Some(saga) => Ok(axum::Json(saga).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no saga {id}"),
            "not_found",
        )),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
}

/// A listing's status filter (one of `statuses`) and limit, or a 400 naming the problem.
fn listing(
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    statuses: &[&'static str],
) -> Result<(Option<&'static str>, u32), ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("bad query: {}", e.body_text()),
            "bad_query",
        )
    })?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(*statuses.iter().find(|k| **k == s).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("status must be one of {}; got {s:?}", statuses.join(", ")),
                "bad_query",
            )
        })?),
    };
    Ok((status, q.limit.unwrap_or(100).clamp(1, 10_000)))
}

type ListQueryResult = Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>;

async fn list(
    State(st): State<AppState>,
    headers: HeaderMap,
    q: ListQueryResult,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, false)?;
    let (status, limit) = listing(q, &SagaStatus::ALL.map(SagaStatus::as_str))?;
    let rows = st
        .engine
        .store
        .list(status, limit)
        .await
        .map_err(internal)?;
    Ok(axum::Json(rows).into_response())
}

async fn tcc_list(
    State(st): State<AppState>,
    headers: HeaderMap,
    q: ListQueryResult,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, false)?;
    let (status, limit) = listing(q, &TccStatus::ALL.map(TccStatus::as_str))?;
    let rows = st.tcc.store.list(status, limit).await.map_err(internal)?;
    Ok(axum::Json(rows).into_response())
}

async fn metrics(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&st, &headers, false)?;
    let mut out = tessera_metrics::Text::new();
    crate::metrics::render(&st.engine, &st.tcc, &mut out)
        .await
        .map_err(internal)?;
    Ok((
        [(header::CONTENT_TYPE, tessera_metrics::CONTENT_TYPE)],
        out.finish(),
    )
        .into_response())
}
