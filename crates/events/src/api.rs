//! The event store's HTTP API, mounted on `tessera server`:
//!
//! - `POST /v1/streams/{stream}` appends `{"expected_version": "any" | "no_stream" |
//!   "exists" | N, "events": [{"id", "type", "data", "metadata"}]}` → 201, or 200 for a
//!   repeat of already stored event ids, 409 on a version or id conflict;
//! - `GET /v1/streams/{stream}?from=&limit=` reads forward (`{stream}` may be a category,
//!   `order-*`, or `*` for all streams; those read by global position);
//! - `GET /v1/streams/{stream}/subscribe?from=` or `?group=` streams catch-up then live
//!   events as server-sent events (`id:` is the version or position; a reconnecting
//!   client's `Last-Event-ID` resumes after it);
//! - `PUT /v1/streams/{stream}/groups/{group}` `{"acked": N}` and `GET` on the same path
//!   keep a consumer group's durable offset.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Deserialize;
use tessera_core::Authorize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Backend as Store;
use crate::metrics::{AppendResult, Metrics};
use crate::store::{AppendError, Expected, NewEvent, Selection};

/// Most events in one append, and per read page.
const MAX_EVENTS: usize = 1000;

#[derive(Clone)]
struct AppState {
    store: Store,
    auth: Arc<dyn Authorize>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

pub(crate) fn router(
    store: Store,
    auth: Arc<dyn Authorize>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) -> Router {
    Router::new()
        .route("/v1/streams/{stream}", get(read).post(append))
        .route("/v1/streams/{stream}/subscribe", get(subscribe))
        .route(
            "/v1/streams/{stream}/groups/{group}",
            put(ack).get(group_offset),
        )
        .with_state(AppState {
            store,
            auth,
            stop,
            metrics,
        })
}

struct ApiError(StatusCode, String, &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tessera_web::error(self.0, self.2, self.1)
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into(), "bad_request")
}

/// The store did not answer or did not keep the write: 507 on a full disk, else 503.
fn unavailable(e: impl Into<tessera_sql::Refused>) -> ApiError {
    let r = e.into();
    ApiError(r.status(), format!("event store: {r}"), r.code())
}

fn authorize(st: &AppState, headers: &HeaderMap, write: bool) -> Result<(), ApiError> {
    let token = tessera_core::request_token(|n| headers.get(n).and_then(|v| v.to_str().ok()));
    st.auth
        .check(token, write)
        .map_err(|e| ApiError(StatusCode::FORBIDDEN, e, "permission_denied"))
}

/// A stream name, or a category pattern (`prefix*`, `*`) where reads allow one.
fn selection(name: &str, allow_category: bool) -> Result<Selection, ApiError> {
    let (base, category) = match name.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (name, false),
    };
    if category && !allow_category {
        return Err(bad(format!(
            "{name:?} is a category; events are appended to one stream"
        )));
    }
    if (!category && base.is_empty())
        || base.len() > 200
        || !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'))
    {
        return Err(bad(format!(
            "invalid stream name {name:?}: 1 to 200 characters from A-Z a-z 0-9 - _ . : @ (and a trailing * for a category)"
        )));
    }
    Ok(if category {
        Selection::Category(base.to_owned())
    } else {
        Selection::Stream(base.to_owned())
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendBody {
    #[serde(default = "any")]
    expected_version: serde_json::Value,
    events: Vec<NewEvent>,
}

fn any() -> serde_json::Value {
    serde_json::Value::String("any".into())
}

fn expected(v: &serde_json::Value) -> Result<Expected, ApiError> {
    match v {
        serde_json::Value::String(s) if s == "any" => Ok(Expected::Any),
        serde_json::Value::String(s) if s == "no_stream" => Ok(Expected::NoStream),
        serde_json::Value::String(s) if s == "exists" => Ok(Expected::Exists),
        serde_json::Value::Number(n) if n.as_i64().is_some_and(|n| n >= -1) => {
            Ok(match n.as_i64().unwrap_or(-1) {
                -1 => Expected::NoStream,
                n => Expected::Version(n),
            })
        }
        other => Err(bad(format!(
            "expected_version must be \"any\", \"no_stream\", \"exists\" or a version number; got {other}"
        ))),
    }
}

async fn append(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(stream): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, true)?;
    let Selection::Stream(stream) = selection(&stream, false)? else {
        return Err(bad("events are appended to one stream"));
    };
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let body: AppendBody = serde_path_to_error::deserialize(de)
        .map_err(|e| bad(format!("invalid append at {}: {}", e.path(), e.inner())))?;
    let exp = expected(&body.expected_version)?;
    if body.events.is_empty() || body.events.len() > MAX_EVENTS {
        return Err(bad(format!("events: 1 to {MAX_EVENTS} per append")));
    }
    for (i, e) in body.events.iter().enumerate() {
        if e.id.is_empty() || e.id.len() > 128 {
            return Err(bad(format!("events[{i}].id: 1 to 128 characters")));
        }
        if e.kind.is_empty() || e.kind.len() > 128 {
            return Err(bad(format!("events[{i}].type: 1 to 128 characters")));
        }
        if body.events[..i].iter().any(|o| o.id == e.id) {
            return Err(bad(format!("events[{i}].id: {:?} appears twice", e.id)));
        }
    }
    // Each event remembers the trace of the request that appended it.
    let span = tessera_trace::scope::current_context();
    let events = body
        .events
        .into_iter()
        .map(|mut e| {
            e.metadata = crate::store::with_trace(e.metadata.take(), span);
            e
        })
        .collect::<Vec<_>>();
    // Detached: an append whose client hangs up still completes (or fails) as one.
    let store = st.store.clone();
    let count = events.len();
    let started = std::time::Instant::now();
    let result = tokio::spawn(async move { store.append(stream, exp, events).await })
        .await
        .map_err(|e| unavailable(tessera_sql::Refused::unavailable(e.to_string())))?;
    let counted = match &result {
        Ok(a) if a.duplicate => AppendResult::Ok { events: 0 },
        Ok(_) => AppendResult::Ok { events: count },
        Err(AppendError::Store(_)) => AppendResult::Failed,
        Err(_) => AppendResult::Conflict,
    };
    st.metrics.appended(counted, started.elapsed());
    match result {
        Ok(a) => {
            let status = if a.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, axum::Json(a)).into_response())
        }
        Err(e @ AppendError::WrongVersion { .. }) => Err(ApiError(
            StatusCode::CONFLICT,
            e.to_string(),
            "wrong_expected_version",
        )),
        Err(e @ AppendError::IdConflict { .. }) => Err(ApiError(
            StatusCode::CONFLICT,
            e.to_string(),
            "duplicate_event_id",
        )),
        Err(AppendError::Store(e)) => Err(unavailable(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    from: Option<i64>,
    limit: Option<u32>,
    group: Option<String>,
}

fn query(
    q: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ReadQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| bad(format!("bad query: {}", e.body_text())))
}

async fn read(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(stream): Path<String>,
    q: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, false)?;
    let sel = selection(&stream, true)?;
    let q = query(q)?;
    if q.group.is_some() {
        return Err(bad("group applies to /subscribe"));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_EVENTS as u32);
    let from = q.from.unwrap_or(sel.first());
    let events = st
        .store
        .read(&sel, from, limit)
        .await
        .map_err(unavailable)?;
    Ok(axum::Json(events).into_response())
}

/// The stream of a subscription: events pushed by its reader task.
struct Feed(mpsc::Receiver<SseEvent>);

impl futures_core::Stream for Feed {
    type Item = Result<SseEvent, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|e| e.map(Ok))
    }
}

async fn subscribe(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(stream): Path<String>,
    q: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, false)?;
    let sel = selection(&stream, true)?;
    let q = query(q)?;
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or_else(|| bad("Last-Event-ID must be the id of an event"))
        })
        .transpose()?;
    let first = sel.first();
    let from = match (last_event_id, &q.group, q.from) {
        (Some(id), _, _) => id + 1,
        (None, Some(group), _) => {
            if group.is_empty() || group.len() > 128 {
                return Err(bad("group: 1 to 128 characters"));
            }
            st.metrics.group_seen(group, &stream, &sel);
            match st.store.acked(group, &stream).await.map_err(unavailable)? {
                Some(acked) => acked + 1,
                None => first,
            }
        }
        (None, None, Some(from)) => from,
        (None, None, None) => first,
    };
    let (tx, rx) = mpsc::channel(256);
    let live = st.metrics.subscribed();
    tokio::spawn(async move {
        pump(st.store.clone(), sel, from, tx, st.stop.clone()).await;
        drop(live);
    });
    Ok(Sse::new(Feed(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Reads pages from the store and pushes them to the subscriber; when caught up, waits
/// for the head position to move. Ends when the subscriber goes away or the server stops.
async fn pump(
    store: Store,
    sel: Selection,
    mut next: i64,
    tx: mpsc::Sender<SseEvent>,
    stop: CancellationToken,
) {
    let mut head = store.head();
    loop {
        head.borrow_and_update();
        let page = match store.read(&sel, next, 256).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "subscription read failed");
                return;
            }
        };
        if page.is_empty() {
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                // A wake-up can precede the event's visibility (NATS: the notification
                // races the stream's write), so look again now and then regardless.
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            continue;
        }
        for e in page {
            let id = sel.id_of(&e);
            next = id + 1;
            let data = serde_json::to_string(&e).unwrap_or_default();
            let ev = SseEvent::default().id(id.to_string()).data(data);
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    acked: i64,
}

async fn ack(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((stream, group)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, true)?;
    let sel = selection(&stream, true)?;
    if group.is_empty() || group.len() > 128 {
        return Err(bad("group: 1 to 128 characters"));
    }
    let body: AckBody = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("body must be {{\"acked\": N}}: {e}")))?;
    if body.acked < 0 {
        return Err(bad("acked must not be negative"));
    }
    let acked = st
        .store
        .ack(&group, &stream, body.acked)
        .await
        .map_err(unavailable)?;
    st.metrics.group_seen(&group, &stream, &sel);
    Ok(
        axum::Json(serde_json::json!({"group": group, "stream": stream, "acked": acked}))
            .into_response(),
    )
}

async fn group_offset(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((stream, group)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers, false)?;
    selection(&stream, true)?;
    match st.store.acked(&group, &stream).await.map_err(unavailable)? {
        Some(acked) => Ok(axum::Json(
            serde_json::json!({"group": group, "stream": stream, "acked": acked}),
        )
        .into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("group {group} has not acknowledged anything on {stream}"),
            "not_found",
        )),
    }
}
