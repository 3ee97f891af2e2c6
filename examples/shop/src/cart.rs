//! `cart`: each user's cart. It consumes `OrderPlaced` events from the event store (the
//! `order-*` category, consumer group `cart`) and takes the ordered items out of the
//! cart; the inbox makes a redelivered event (or the other replica's copy) a no-op.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;
use tessera::{Events, JwksVerifier};
use tokio_util::sync::CancellationToken;

use crate::db::Db;
use crate::web::{ApiError, ApiResult, caller, parse};

pub const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS cart_items (
    user_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    PRIMARY KEY (user_id, product_id)
)"];

/// Most distinct products in one cart, and units of one product.
const MAX_LINES: i64 = 100;
const MAX_QUANTITY: i64 = 1000;

#[derive(Clone)]
struct St {
    db: Db,
    auth: Arc<JwksVerifier>,
}

pub fn router(db: Db, auth: Arc<JwksVerifier>) -> Router {
    Router::new()
        .route("/cart", get(show).delete(clear))
        .route("/cart/items", post(add))
        .route("/cart/items/{product}", delete(remove))
        .with_state(St { db, auth })
}

async fn items(db: &Db, user: &str) -> ApiResult<Value> {
    let rows = sqlx::query(
        "SELECT product_id, quantity FROM cart_items WHERE user_id = $1 ORDER BY product_id",
    )
    .bind(user)
    .fetch_all(&db.pool)
    .await?;
    let mut list = Vec::with_capacity(rows.len());
    for r in &rows {
        list.push(
            json!({"product_id": r.try_get::<String, _>(0)?, "quantity": r.try_get::<i64, _>(1)?}),
        );
    }
    Ok(json!({"user_id": user, "items": list}))
}

async fn show(State(st): State<St>, headers: HeaderMap) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    Ok(axum::Json(items(&st.db, &who.user).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    product_id: String,
    #[serde(default = "one")]
    quantity: i64,
}

fn one() -> i64 {
    1
}

async fn add(
    State(st): State<St>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    let a: Add = parse(&body)?;
    if a.product_id.is_empty() || a.product_id.len() > 64 {
        return Err(ApiError::bad("product_id: 1 to 64 characters"));
    }
    if a.quantity <= 0 || a.quantity > MAX_QUANTITY {
        return Err(ApiError::bad(format!("quantity: 1 to {MAX_QUANTITY}")));
    }
    let mut tx = st.db.write().await?;
    let lines: i64 = sqlx::query("SELECT COUNT(*) FROM cart_items WHERE user_id = $1")
        .bind(&who.user)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    let r = sqlx::query(
        "UPDATE cart_items SET quantity = quantity + $1
         WHERE user_id = $2 AND product_id = $3 AND quantity + $1 <= $4",
    )
    .bind(a.quantity)
    .bind(&who.user)
    .bind(&a.product_id)
    .bind(MAX_QUANTITY)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 0 {
        if lines >= MAX_LINES {
            return Err(ApiError::bad(format!(
                "a cart holds at most {MAX_LINES} products"
            )));
        }
        let inserted = sqlx::query(
            "INSERT INTO cart_items (user_id, product_id, quantity) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(&who.user)
        .bind(&a.product_id)
        .bind(a.quantity)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(ApiError::bad(format!(
                "at most {MAX_QUANTITY} units of one product"
            )));
        }
    }
    tx.commit().await?;
    Ok(axum::Json(items(&st.db, &who.user).await?))
}

async fn remove(
    State(st): State<St>,
    headers: HeaderMap,
    Path(product): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    let mut tx = st.db.write().await?;
    sqlx::query("DELETE FROM cart_items WHERE user_id = $1 AND product_id = $2")
        .bind(&who.user)
        .bind(&product)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(axum::Json(items(&st.db, &who.user).await?))
}

async fn clear(State(st): State<St>, headers: HeaderMap) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    let mut tx = st.db.write().await?;
    sqlx::query("DELETE FROM cart_items WHERE user_id = $1")
        .bind(&who.user)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(axum::Json(items(&st.db, &who.user).await?))
}

pub const ORDERS: &str = "order-*";
const GROUP: &str = "cart";

/// Consumes order events until `stop`: each `OrderPlaced` takes its items out of the
/// user's cart, recorded in the inbox in the same transaction.
pub async fn consume(
    db: Db,
    events: Events,
    tracer: Option<tessera::trace::Tracer>,
    stop: CancellationToken,
) {
    let mut sub = events.subscribe(ORDERS, GROUP);
    loop {
        let e = tokio::select! {
            _ = stop.cancelled() => return,
            e = sub.next() => match e { Some(e) => e, None => return },
        };
        if e.kind() == "OrderPlaced" {
            // Handled in the trace of the checkout that placed the order.
            let attrs = vec![
                ("messaging.destination.name", ORDERS.into()),
                ("messaging.message.id", e.event_id().to_owned().into()),
            ];
            let name = format!("process {}", e.kind());
            let handled = tessera::trace::consume(tracer.as_ref(), e.traceparent(), name, attrs, async {
                // A database error is retried: the event is not acknowledged until handled.
                let mut pause = Duration::from_millis(100);
                while let Err(err) = handle(&db, &e).await {
                    tracing::warn!(event = %e.event_id(), error = %err, "cannot apply OrderPlaced; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                true
            })
            .await;
            if !handled {
                return;
            }
        }
        // The inbox makes a replay after a restart harmless, so a failed
        // acknowledgement is only logged.
        if let Err(err) = events.ack(ORDERS, GROUP, e.id).await {
            tracing::debug!(error = %err, "cannot acknowledge order events");
        }
    }
}

async fn handle(db: &Db, e: &tessera::Event) -> Result<(), sqlx::Error> {
    let user = e.data()["user_id"].as_str().unwrap_or_default().to_owned();
    let items = e.data()["items"].as_array().cloned().unwrap_or_default();
    let mut tx = db.write().await?;
    if !tessera::outbox::inbox_any(&mut tx, GROUP, e.event_id()).await? {
        return Ok(()); // handled before
    }
    for item in items {
        let product = item["product_id"].as_str().unwrap_or_default();
        let quantity = item["quantity"].as_i64().unwrap_or(0);
        sqlx::query(
            "UPDATE cart_items SET quantity = quantity - $1 WHERE user_id = $2 AND product_id = $3",
        )
        .bind(quantity)
        .bind(&user)
        .bind(product)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM cart_items WHERE user_id = $1 AND quantity <= 0")
        .bind(&user)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
