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

/// The generated gRPC types and the cart's service (`tessera.shop.cart.v1.Cart`).
pub mod pb {
    tonic::include_proto!("tessera.shop.cart.v1");
}

/// The shop's encoded protobuf descriptors, for server reflection.
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/shop_descriptors.bin"));

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

/// The same carts over gRPC.
pub fn grpc(
    db: Db,
    auth: Arc<JwksVerifier>,
) -> pb::cart_server::CartServer<impl pb::cart_server::Cart> {
    pb::cart_server::CartServer::new(St { db, auth })
}

async fn items(db: &Db, user: &str) -> ApiResult<Vec<pb::Item>> {
    let rows = sqlx::query(
        "SELECT product_id, quantity FROM cart_items WHERE user_id = $1 ORDER BY product_id",
    )
    .bind(user)
    .fetch_all(&db.pool)
    .await?;
    let mut list = Vec::with_capacity(rows.len());
    for r in &rows {
        list.push(pb::Item {
            product_id: r.try_get(0)?,
            quantity: r.try_get(1)?,
        });
    }
    Ok(list)
}

async fn view(db: &Db, user: &str) -> ApiResult<axum::Json<Value>> {
    let list: Vec<Value> = items(db, user)
        .await?
        .into_iter()
        .map(|i| json!({"product_id": i.product_id, "quantity": i.quantity}))
        .collect();
    Ok(axum::Json(json!({"user_id": user, "items": list})))
}

async fn show(State(st): State<St>, headers: HeaderMap) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    view(&st.db, &who.user).await
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
    add_item(&st.db, &who.user, &a.product_id, a.quantity).await?;
    view(&st.db, &who.user).await
}

async fn add_item(db: &Db, user: &str, product_id: &str, quantity: i64) -> ApiResult<()> {
    if product_id.is_empty() || product_id.len() > 64 {
        return Err(ApiError::bad("product_id: 1 to 64 characters"));
    }
    if quantity <= 0 || quantity > MAX_QUANTITY {
        return Err(ApiError::bad(format!("quantity: 1 to {MAX_QUANTITY}")));
    }
    let mut tx = db.write().await?;
    let lines: i64 = sqlx::query("SELECT COUNT(*) FROM cart_items WHERE user_id = $1")
        .bind(user)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    let r = sqlx::query(
        "UPDATE cart_items SET quantity = quantity + $1
         WHERE user_id = $2 AND product_id = $3 AND quantity + $1 <= $4",
    )
    .bind(quantity)
    .bind(user)
    .bind(product_id)
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
        .bind(user)
        .bind(product_id)
        .bind(quantity)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(ApiError::bad(format!(
                "at most {MAX_QUANTITY} units of one product"
            )));
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn remove(
    State(st): State<St>,
    headers: HeaderMap,
    Path(product): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    remove_item(&st.db, &who.user, &product).await?;
    view(&st.db, &who.user).await
}

async fn remove_item(db: &Db, user: &str, product: &str) -> ApiResult<()> {
    let mut tx = db.write().await?;
    sqlx::query("DELETE FROM cart_items WHERE user_id = $1 AND product_id = $2")
        .bind(user)
        .bind(product)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

async fn clear(State(st): State<St>, headers: HeaderMap) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    empty(&st.db, &who.user).await?;
    view(&st.db, &who.user).await
}

async fn empty(db: &Db, user: &str) -> ApiResult<()> {
    let mut tx = db.write().await?;
    sqlx::query("DELETE FROM cart_items WHERE user_id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The inbox key for taking an order's items out of its user's cart, shared by the
/// `Clear` call at checkout and the `OrderPlaced` event, so whichever comes second is a
/// no-op. The user is part of it: one user's calls cannot spend another's order.
fn order_key(user: &str, order_id: &str) -> String {
    format!("order:{user}:{order_id}")
}

/// Takes `items` out of `user`'s cart once per `key`.
async fn take_out(db: &Db, user: &str, key: &str, items: &[pb::Item]) -> Result<(), sqlx::Error> {
    let mut tx = db.write().await?;
    if !tessera::outbox::inbox_any(&mut tx, GROUP, key).await? {
        return Ok(()); // done before
    }
    for item in items {
        sqlx::query(
            "UPDATE cart_items SET quantity = quantity - $1 WHERE user_id = $2 AND product_id = $3",
        )
        .bind(item.quantity)
        .bind(user)
        .bind(&item.product_id)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM cart_items WHERE user_id = $1 AND quantity <= 0")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

impl St {
    async fn caller<T>(&self, req: &tonic::Request<T>) -> Result<String, tonic::Status> {
        let headers = req.metadata().clone().into_headers();
        Ok(caller(&self.auth, &headers).await?.user)
    }

    async fn answer(&self, user: String) -> Result<tonic::Response<pb::CartView>, tonic::Status> {
        let items = items(&self.db, &user).await?;
        Ok(tonic::Response::new(pb::CartView {
            user_id: user,
            items,
        }))
    }
}

#[tonic::async_trait]
impl pb::cart_server::Cart for St {
    async fn add_item(
        &self,
        req: tonic::Request<pb::AddItemRequest>,
    ) -> Result<tonic::Response<pb::CartView>, tonic::Status> {
        let user = self.caller(&req).await?;
        let a = req.into_inner();
        let quantity = if a.quantity == 0 { 1 } else { a.quantity };
        add_item(&self.db, &user, &a.product_id, quantity).await?;
        self.answer(user).await
    }

    async fn remove_item(
        &self,
        req: tonic::Request<pb::RemoveItemRequest>,
    ) -> Result<tonic::Response<pb::CartView>, tonic::Status> {
        let user = self.caller(&req).await?;
        remove_item(&self.db, &user, &req.into_inner().product_id).await?;
        self.answer(user).await
    }

    async fn get_cart(
        &self,
        req: tonic::Request<pb::GetCartRequest>,
    ) -> Result<tonic::Response<pb::CartView>, tonic::Status> {
        let user = self.caller(&req).await?;
        self.answer(user).await
    }

    async fn clear(
        &self,
        req: tonic::Request<pb::ClearRequest>,
    ) -> Result<tonic::Response<pb::CartView>, tonic::Status> {
        let user = self.caller(&req).await?;
        let c = req.into_inner();
        if c.order_id.is_empty() {
            if !c.items.is_empty() {
                return Err(tonic::Status::invalid_argument(
                    "items: only with the order_id they were ordered under",
                ));
            }
            empty(&self.db, &user).await?;
        } else {
            if c.order_id.len() > 64 {
                return Err(tonic::Status::invalid_argument(
                    "order_id: at most 64 characters",
                ));
            }
            if c.items.len() > 100
                || c.items
                    .iter()
                    .any(|i| i.quantity <= 0 || i.quantity > MAX_QUANTITY)
            {
                return Err(tonic::Status::invalid_argument(format!(
                    "items: at most 100, each quantity 1 to {MAX_QUANTITY}"
                )));
            }
            take_out(&self.db, &user, &order_key(&user, &c.order_id), &c.items)
                .await
                .map_err(ApiError::from)?;
        }
        self.answer(user).await
    }
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
    let user = e.data()["user_id"].as_str().unwrap_or_default();
    let items: Vec<pb::Item> = e.data()["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| pb::Item {
            product_id: item["product_id"].as_str().unwrap_or_default().to_owned(),
            quantity: item["quantity"].as_i64().unwrap_or(0),
        })
        .collect();
    let key = match e.data()["order_id"].as_str() {
        Some(order) => order_key(user, order),
        None => e.event_id().to_owned(),
    };
    take_out(db, user, &key, &items).await
}
