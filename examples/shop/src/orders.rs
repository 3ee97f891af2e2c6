//! `orders`: checkout runs a saga through the coordinator — reserve stock (catalog) →
//! charge payment (payments) → confirm the order (here) — and the coordinator
//! compensates completed steps when a later one fails. The order's state changes and the
//! events describing them (`OrderPlaced`, `OrderCancelled`) are written in one
//! transaction through the outbox, and a relay publishes them to the event store.
//!
//! Every step is idempotent by order id and the saga is started with the idempotency key
//! `order-{id}`, so a reconciler can safely start it again for an order whose start was
//! lost (a crash between storing the order and starting the saga) and settle orders whose
//! checkout request gave up waiting.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;
use tessera::grpc::GrpcChannel;
use tessera::outbox::{OutboxEvent, enqueue_any};
use tessera::{Call, Coordinator, JwksVerifier, Run, Saga, ServiceClient, Step};
use tokio_util::sync::CancellationToken;

use crate::cart::pb;
use crate::cart::pb::cart_client::CartClient;
use crate::catalog::Item;
use crate::db::{Db, new_id, now_ms};
use crate::web::{ApiError, ApiResult, Caller, caller, parse};

pub const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    request_key TEXT UNIQUE,
    status TEXT NOT NULL,
    items TEXT NOT NULL,
    total_cents BIGINT NOT NULL,
    saga_id TEXT,
    reason TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
)"];

/// How long a checkout request waits for its saga before answering 202.
const CHECKOUT_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct St {
    db: Db,
    auth: Arc<JwksVerifier>,
    /// The cart, over gRPC.
    cart: GrpcChannel,
    catalog: ServiceClient,
    coordinator: Coordinator,
}

impl St {
    pub fn new(
        db: Db,
        auth: Arc<JwksVerifier>,
        cart: GrpcChannel,
        catalog: ServiceClient,
        coordinator: Coordinator,
    ) -> St {
        St {
            db,
            auth,
            cart,
            catalog,
            coordinator,
        }
    }
}

pub fn router(st: St) -> Router {
    Router::new()
        .route("/orders/checkout", post(checkout))
        .route("/orders", get(mine))
        .route("/orders/{id}", get(one))
        .route("/internal/orders", get(all))
        .route("/internal/orders/{id}/confirm", post(confirm))
        .with_state(st)
}

const COLUMNS: &str =
    "SELECT id, user_id, status, items, total_cents, saga_id, reason, created_ms FROM orders";

fn order_json(r: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let items: Value = serde_json::from_str(&r.try_get::<String, _>(3)?).unwrap_or(Value::Null);
    Ok(json!({
        "id": r.try_get::<String, _>(0)?,
        "user_id": r.try_get::<String, _>(1)?,
        "status": r.try_get::<String, _>(2)?,
        "items": items,
        "total_cents": r.try_get::<i64, _>(4)?,
        "saga_id": r.try_get::<Option<String>, _>(5)?,
        "reason": r.try_get::<Option<String>, _>(6)?,
        "created_ms": r.try_get::<i64, _>(7)?,
    }))
}

async fn load(db: &Db, id: &str) -> ApiResult<Option<Value>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} WHERE id = $1")))
        .bind(id)
        .fetch_optional(&db.pool)
        .await?;
    Ok(row.as_ref().map(order_json).transpose()?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    /// Items to buy; by default, the caller's cart.
    #[serde(default)]
    items: Option<Vec<Item>>,
}

async fn checkout(
    State(st): State<St>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let who = caller(&st.auth, &headers).await?;
    let key = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 128)
                .ok_or_else(|| ApiError::bad("Idempotency-Key: 1 to 128 visible characters"))?;
            Some(format!("{}:{k}", who.user))
        }
        None => None,
    };
    if let Some(k) = &key
        && let Some(existing) = by_key(&st.db, k).await?
    {
        return Ok((StatusCode::OK, axum::Json(existing)));
    }
    let body: CheckoutBody = if body.is_empty() {
        CheckoutBody::default()
    } else {
        parse(&body)?
    };
    let items = match body.items {
        Some(items) => items,
        None => cart_items(&st, &who).await?,
    };
    if items.is_empty() {
        return Err(ApiError::bad("the cart is empty"));
    }
    if items.len() > 100 || items.iter().any(|i| i.quantity <= 0 || i.quantity > 1000) {
        return Err(ApiError::bad("items: 1 to 100, each quantity 1 to 1000"));
    }
    let mut total = 0i64;
    for item in &items {
        let resp = st
            .catalog
            .get(&format!(
                "/catalog/products/{}",
                tessera::encode_segment(&item.product_id)
            ))
            .send()
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_product",
                format!("no product {}", item.product_id),
            ));
        }
        let p: Value = resp.error_for_status()?.json()?;
        total += p["price_cents"].as_i64().unwrap_or(0) * item.quantity;
    }
    let id = new_id();
    let now = now_ms();
    let mut tx = st.db.write().await?;
    let stored = sqlx::query(
        "INSERT INTO orders (id, user_id, request_key, status, items, total_cents, created_ms, updated_ms)
         VALUES ($1, $2, $3, 'pending', $4, $5, $6, $6) ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(&who.user)
    .bind(key.as_deref())
    .bind(serde_json::to_string(&items).unwrap_or_default())
    .bind(total)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if stored.rows_affected() == 0 {
        // The same Idempotency-Key raced this request and won.
        if let Some(k) = &key
            && let Some(existing) = by_key(&st.db, k).await?
        {
            return Ok((StatusCode::OK, axum::Json(existing)));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "order id collision; retry",
        ));
    }
    // If this fails the order stays pending and the reconciler starts the saga later.
    match start(&st, &id, &who.user, &items, total).await {
        Ok(run) => {
            let run = st
                .coordinator
                .wait_saga(&run.id, CHECKOUT_WAIT)
                .await
                .unwrap_or(run);
            settle(&st.db, &id, &run).await?;
            if run.status == "completed" {
                clear_cart(&st, &who, &id, &items).await;
            }
        }
        Err(e) => tracing::warn!(order = %id, error = %e, "cannot start the checkout saga yet"),
    }
    let order = load(&st.db, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no order {id}")))?;
    let status = if order["status"] == "pending" {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(order)))
}

async fn by_key(db: &Db, key: &str) -> ApiResult<Option<Value>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{COLUMNS} WHERE request_key = $1"
    )))
    .bind(key)
    .fetch_optional(&db.pool)
    .await?;
    Ok(row.as_ref().map(order_json).transpose()?)
}

async fn cart_items(st: &St, who: &Caller) -> ApiResult<Vec<Item>> {
    let req = as_caller(pb::GetCartRequest {}, who)?;
    let cart = CartClient::new(st.cart.clone())
        .get_cart(req)
        .await
        .map_err(|s| dependency("cart", &s))?
        .into_inner();
    Ok(cart
        .items
        .into_iter()
        .map(|i| Item {
            product_id: i.product_id,
            quantity: i.quantity,
        })
        .collect())
}

/// Takes a placed order's items out of the cart now, so the buyer sees it emptied when
/// checkout answers. Only a head start: the `OrderPlaced` event does it too, and the
/// cart does it once per order.
async fn clear_cart(st: &St, who: &Caller, order: &str, items: &[Item]) {
    let req = pb::ClearRequest {
        order_id: order.to_owned(),
        items: items
            .iter()
            .map(|i| pb::Item {
                product_id: i.product_id.clone(),
                quantity: i.quantity,
            })
            .collect(),
    };
    let result = match as_caller(req, who) {
        Ok(req) => CartClient::new(st.cart.clone())
            .clear(req)
            .await
            .map(drop)
            .map_err(|s| dependency("cart", &s)),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::info!(order, error = %e.message, "cart not cleared now; the OrderPlaced event will");
    }
}

/// A gRPC request made on the caller's behalf: their token in the metadata.
fn as_caller<T>(message: T, who: &Caller) -> ApiResult<tonic::Request<T>> {
    let mut req = tonic::Request::new(message);
    let token = who
        .authorization
        .parse()
        .map_err(|_| ApiError::bad("authorization: not a valid header value"))?;
    req.metadata_mut().insert("authorization", token);
    Ok(req)
}

/// A dependency's gRPC refusal as this service's answer.
fn dependency(service: &str, s: &tonic::Status) -> ApiError {
    let status = match s.code() {
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        _ => StatusCode::BAD_GATEWAY,
    };
    ApiError::new(
        status,
        "dependency",
        format!("{service}: {}: {}", s.code(), s.message()),
    )
}

/// The checkout saga for an order.
fn saga(id: &str, user: &str, items: &[Item], total: i64) -> Saga {
    Saga::new("checkout")
        .step(
            Step::new(
                "reserve",
                Call::post("catalog", "/internal/reservations")
                    .json(json!({"order_id": id, "items": items})),
            )
            .compensate(Call::post(
                "catalog",
                &format!("/internal/reservations/{id}/release"),
            ))
            .timeout(Duration::from_secs(5)),
        )
        .step(
            Step::new(
                "charge",
                Call::post("payments", "/internal/charges")
                    .json(json!({"order_id": id, "user_id": user, "amount_cents": total})),
            )
            .compensate(Call::post(
                "payments",
                &format!("/internal/charges/{id}/refund"),
            ))
            .timeout(Duration::from_secs(5)),
        )
        .step(
            Step::new(
                "confirm",
                Call::post("orders", &format!("/internal/orders/{id}/confirm")),
            )
            .timeout(Duration::from_secs(5)),
        )
}

async fn start(
    st: &St,
    id: &str,
    user: &str,
    items: &[Item],
    total: i64,
) -> Result<Run, tessera::Error> {
    let run = st
        .coordinator
        .start_saga(&saga(id, user, items, total), Some(&format!("order-{id}")))
        .await?;
    if let Ok(mut tx) = st.db.write().await {
        let _ = sqlx::query("UPDATE orders SET saga_id = $1 WHERE id = $2")
            .bind(&run.id)
            .bind(id)
            .execute(&mut *tx)
            .await;
        let _ = tx.commit().await;
    }
    Ok(run)
}

/// Brings the order in line with its saga once the saga is final.
async fn settle(db: &Db, id: &str, run: &Run) -> Result<(), sqlx::Error> {
    match run.status.as_str() {
        "completed" => transition(db, id, "confirmed", None).await.map(drop),
        "compensated" => transition(db, id, "cancelled", Some(&reason(run)))
            .await
            .map(drop),
        "stuck" => {
            // Compensation could not finish: leave the order pending, visibly.
            let mut tx = db.write().await?;
            sqlx::query("UPDATE orders SET reason = $1, updated_ms = $2 WHERE id = $3 AND status = 'pending'")
                .bind(format!("saga stuck: {}", run.error.as_deref().unwrap_or("compensation failed")))
                .bind(now_ms())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        _ => Ok(()),
    }
}

/// Why a compensated checkout failed, in the shop's words.
fn reason(run: &Run) -> String {
    // The step that failed is the one whose last action attempt did not succeed.
    let failed = run.detail["steps"].as_array().and_then(|steps| {
        steps.iter().find(|s| {
            s["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .is_some_and(|a| a["ok"] == false)
        })
    });
    let step = failed.and_then(|s| s["name"].as_str()).unwrap_or_default();
    let outcome = failed
        .and_then(|s| s["attempts"].as_array())
        .and_then(|a| a.last())
        .and_then(|a| a["outcome"].as_str())
        .unwrap_or_default();
    match (step, outcome) {
        ("reserve", "409") => "insufficient stock".into(),
        ("reserve", "422") => "unknown product".into(),
        ("charge", "402") => "insufficient funds".into(),
        _ => run
            .error
            .clone()
            .unwrap_or_else(|| format!("step {step} failed: {outcome}")),
    }
}

/// Moves a pending order to `to` and enqueues the event saying so, in one transaction;
/// `Ok(false)` if the order was not pending.
async fn transition(
    db: &Db,
    id: &str,
    to: &str,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.write().await?;
    let row = sqlx::query(
        "UPDATE orders SET status = $1, reason = $2, updated_ms = $3
         WHERE id = $4 AND status = 'pending' RETURNING user_id, items, total_cents",
    )
    .bind(to)
    .bind(reason)
    .bind(now_ms())
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let items: Value = serde_json::from_str(&row.try_get::<String, _>(1)?).unwrap_or(Value::Null);
    let (kind, suffix) = if to == "confirmed" {
        ("OrderPlaced", "placed")
    } else {
        ("OrderCancelled", "cancelled")
    };
    let event = OutboxEvent {
        stream: format!("order-{id}"),
        id: format!("{id}-{suffix}"),
        kind: kind.into(),
        data: json!({
            "order_id": id,
            "user_id": row.try_get::<String, _>(0)?,
            "items": items,
            "total_cents": row.try_get::<i64, _>(2)?,
            "reason": reason,
        }),
        metadata: None,
    };
    enqueue_any(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(true)
}

/// The saga's last step.
async fn confirm(State(st): State<St>, Path(id): Path<String>) -> ApiResult<axum::Json<Value>> {
    if transition(&st.db, &id, "confirmed", None).await? {
        return Ok(axum::Json(json!({"order_id": id, "status": "confirmed"})));
    }
    match load(&st.db, &id).await? {
        Some(o) if o["status"] == "confirmed" => Ok(axum::Json(
            json!({"order_id": id, "status": "confirmed", "repeat": true}),
        )),
        Some(o) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_pending",
            format!("order {id} is {}", o["status"].as_str().unwrap_or("?")),
        )),
        None => Err(ApiError::not_found(format!("no order {id}"))),
    }
}

async fn mine(State(st): State<St>, headers: HeaderMap) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{COLUMNS} WHERE user_id = $1 ORDER BY created_ms DESC LIMIT 100"
    )))
    .bind(&who.user)
    .fetch_all(&st.db.pool)
    .await?;
    Ok(axum::Json(Value::Array(
        rows.iter().map(order_json).collect::<Result<_, _>>()?,
    )))
}

async fn one(
    State(st): State<St>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    match load(&st.db, &id).await? {
        Some(o) if who.admin || o["user_id"] == who.user.as_str() => Ok(axum::Json(o)),
        _ => Err(ApiError::not_found(format!("no order {id}"))),
    }
}

/// Every order, for the demo's consistency check.
async fn all(State(st): State<St>) -> ApiResult<axum::Json<Value>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(COLUMNS.to_owned()))
        .fetch_all(&st.db.pool)
        .await?;
    Ok(axum::Json(Value::Array(
        rows.iter().map(order_json).collect::<Result<_, _>>()?,
    )))
}

/// Settles orders left pending (the checkout request gave up waiting, or the process
/// stopped between storing the order and starting its saga), once a second until `stop`.
pub async fn reconcile(st: St, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Err(e) = reconcile_once(&st).await {
            tracing::warn!(error = %e, "order reconciliation");
        }
    }
}

async fn reconcile_once(st: &St) -> Result<(), String> {
    let rows = sqlx::query(
        "SELECT id, user_id, items, total_cents, saga_id FROM orders
         WHERE status = 'pending' AND updated_ms < $1 ORDER BY updated_ms LIMIT 50",
    )
    .bind(now_ms() - 3000)
    .fetch_all(&st.db.pool)
    .await
    .map_err(|e| e.to_string())?;
    for r in rows {
        let get = |i| r.try_get::<String, _>(i).map_err(|e| e.to_string());
        let (id, user, items) = (get(0)?, get(1)?, get(2)?);
        let total: i64 = r.try_get(3).map_err(|e| e.to_string())?;
        let saga_id: Option<String> = r.try_get(4).map_err(|e| e.to_string())?;
        let run = match saga_id {
            Some(s) => st.coordinator.saga(&s).await,
            None => {
                let items: Vec<Item> = serde_json::from_str(&items).unwrap_or_default();
                start(st, &id, &user, &items, total).await
            }
        }
        .map_err(|e| e.to_string())?;
        settle(&st.db, &id, &run).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
