//! `catalog`: products with price and stock. Reads are public; writes need role `admin`.
//! The checkout saga's first step reserves stock for an order and its compensation
//! releases it; both are idempotent by order id (the saga's `Idempotency-Key` names the
//! same order), and a release that arrives before its reservation leaves a tombstone so a
//! late reservation is refused instead of leaking stock.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;
use tessera::JwksVerifier;

use crate::db::{Db, new_id, now_ms, repeated_step};
use crate::web::{ApiError, ApiResult, caller, parse};

pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS products (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        price_cents BIGINT NOT NULL,
        stock BIGINT NOT NULL,
        total_stock BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS reservations (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        items TEXT NOT NULL,
        updated_ms BIGINT NOT NULL
    )",
];

#[derive(Clone)]
struct St {
    db: Db,
    auth: Arc<JwksVerifier>,
}

pub fn router(db: Db, auth: Arc<JwksVerifier>) -> Router {
    Router::new()
        .route("/catalog/products", get(list).post(create))
        .route("/catalog/products/{id}", get(one).put(update))
        .route("/internal/reservations", post(reserve).get(reservations))
        .route("/internal/reservations/{order}/release", post(release))
        .with_state(St { db, auth })
}

#[derive(Serialize)]
struct Product {
    id: String,
    name: String,
    description: String,
    price_cents: i64,
    stock: i64,
}

fn product(row: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        description: row.try_get(2)?,
        price_cents: row.try_get(3)?,
        stock: row.try_get(4)?,
    })
}

const COLUMNS: &str = "SELECT id, name, description, price_cents, stock FROM products";

async fn list(State(st): State<St>) -> ApiResult<axum::Json<Vec<Product>>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} ORDER BY name")))
        .fetch_all(&st.db.pool)
        .await?;
    Ok(axum::Json(
        rows.iter().map(product).collect::<Result<_, _>>()?,
    ))
}

async fn one(State(st): State<St>, Path(id): Path<String>) -> ApiResult<axum::Json<Product>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} WHERE id = $1")))
        .bind(&id)
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no product {id}")))?;
    Ok(axum::Json(product(&row)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProduct {
    #[serde(default)]
    id: Option<String>,
    name: String,
    #[serde(default)]
    description: String,
    price_cents: i64,
    stock: i64,
}

fn check_id(id: &str) -> ApiResult<()> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::bad("id: 1 to 64 letters, digits, '-' or '_'"));
    }
    Ok(())
}

async fn create(
    State(st): State<St>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, axum::Json<Product>)> {
    caller(&st.auth, &headers).await?.require_admin()?;
    let p: NewProduct = parse(&body)?;
    let id = p.id.unwrap_or_else(new_id);
    check_id(&id)?;
    if p.name.trim().is_empty() || p.name.len() > 200 {
        return Err(ApiError::bad("name: 1 to 200 characters"));
    }
    if p.price_cents <= 0 || p.stock < 0 {
        return Err(ApiError::bad(
            "price_cents must be positive and stock not negative",
        ));
    }
    let mut tx = st.db.write().await?;
    let r = sqlx::query(
        "INSERT INTO products (id, name, description, price_cents, stock, total_stock, updated_ms)
         VALUES ($1, $2, $3, $4, $5, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(p.name.trim())
    .bind(&p.description)
    .bind(p.price_cents)
    .bind(p.stock)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("product {id} exists"),
        ));
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(Product {
            id,
            name: p.name.trim().to_owned(),
            description: p.description,
            price_cents: p.price_cents,
            stock: p.stock,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Update {
    #[serde(default)]
    price_cents: Option<i64>,
    /// Units to add to (or, negative, take from) the available stock.
    #[serde(default)]
    add_stock: Option<i64>,
}

async fn update(
    State(st): State<St>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<Product>> {
    caller(&st.auth, &headers).await?.require_admin()?;
    let u: Update = parse(&body)?;
    if u.price_cents.is_some_and(|p| p <= 0) {
        return Err(ApiError::bad("price_cents must be positive"));
    }
    let add = u.add_stock.unwrap_or(0);
    let mut tx = st.db.write().await?;
    let r = sqlx::query(
        "UPDATE products SET price_cents = COALESCE($1, price_cents), stock = stock + $2,
             total_stock = total_stock + $2, updated_ms = $3
         WHERE id = $4 AND stock + $2 >= 0",
    )
    .bind(u.price_cents)
    .bind(add)
    .bind(now_ms())
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::bad(format!(
            "no product {id}, or not enough stock to take {}",
            -add
        )));
    }
    one(State(st), Path(id)).await
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub product_id: String,
    pub quantity: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reserve {
    order_id: String,
    items: Vec<Item>,
}

/// Takes the items out of stock for an order, all or nothing.
async fn reserve(State(st): State<St>, body: Bytes) -> ApiResult<axum::Json<Value>> {
    let r: Reserve = parse(&body)?;
    check_id(&r.order_id)?;
    if r.items.is_empty() || r.items.iter().any(|i| i.quantity <= 0) {
        return Err(ApiError::bad(
            "items: at least one, each with a positive quantity",
        ));
    }
    let items = serde_json::to_string(&r.items).unwrap_or_default();
    let mut tx = st.db.write().await?;
    let claimed = sqlx::query(
        "INSERT INTO reservations (order_id, status, items, updated_ms)
         VALUES ($1, 'reserved', $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(&r.order_id)
    .bind(&items)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    if claimed.rows_affected() == 0 {
        return repeated_step(&mut tx, "reservations", &r.order_id, "reserved", "released").await;
    }
    for item in &r.items {
        let took = sqlx::query(
            "UPDATE products SET stock = stock - $1, updated_ms = $2 WHERE id = $3 AND stock >= $1",
        )
        .bind(item.quantity)
        .bind(now_ms())
        .bind(&item.product_id)
        .execute(&mut *tx)
        .await?;
        if took.rows_affected() == 0 {
            let exists = sqlx::query("SELECT stock FROM products WHERE id = $1")
                .bind(&item.product_id)
                .fetch_optional(&mut *tx)
                .await?;
            // Dropping the transaction rolls back the claim and what was taken so far.
            return Err(match exists {
                None => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_product",
                    format!("no product {}", item.product_id),
                ),
                Some(_) => ApiError::new(
                    StatusCode::CONFLICT,
                    "insufficient_stock",
                    format!("not enough stock of {}", item.product_id),
                ),
            });
        }
    }
    tx.commit().await?;
    Ok(axum::Json(
        json!({"order_id": r.order_id, "status": "reserved"}),
    ))
}

/// Puts an order's items back; answers 200 whatever the reservation's state.
async fn release(State(st): State<St>, Path(order): Path<String>) -> ApiResult<axum::Json<Value>> {
    check_id(&order)?;
    let mut tx = st.db.write().await?;
    // The tombstone first: if no reservation exists, none can be made after this.
    sqlx::query(
        "INSERT INTO reservations (order_id, status, items, updated_ms)
         VALUES ($1, 'released', '[]', $2) ON CONFLICT DO NOTHING",
    )
    .bind(&order)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    let row = sqlx::query(
        "UPDATE reservations SET status = 'released', updated_ms = $1
         WHERE order_id = $2 AND status = 'reserved' RETURNING items",
    )
    .bind(now_ms())
    .bind(&order)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = row {
        let items: Vec<Item> =
            serde_json::from_str(&row.try_get::<String, _>(0)?).unwrap_or_default();
        for item in items {
            sqlx::query("UPDATE products SET stock = stock + $1, updated_ms = $2 WHERE id = $3")
                .bind(item.quantity)
                .bind(now_ms())
                .bind(&item.product_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(axum::Json(json!({"order_id": order, "status": "released"})))
}

/// Every reservation and every product's stock, for the demo's consistency check.
async fn reservations(State(st): State<St>) -> ApiResult<axum::Json<Value>> {
    let rows = sqlx::query("SELECT order_id, status, items FROM reservations")
        .fetch_all(&st.db.pool)
        .await?;
    let mut list = Vec::with_capacity(rows.len());
    for r in &rows {
        let items: Value = serde_json::from_str(&r.try_get::<String, _>(2)?).unwrap_or(Value::Null);
        list.push(json!({"order_id": r.try_get::<String, _>(0)?, "status": r.try_get::<String, _>(1)?, "items": items}));
    }
    let rows = sqlx::query("SELECT id, stock, total_stock FROM products")
        .fetch_all(&st.db.pool)
        .await?;
    let mut stock = Vec::with_capacity(rows.len());
    for r in &rows {
        stock.push(
            json!({"id": r.try_get::<String, _>(0)?, "stock": r.try_get::<i64, _>(1)?,
            "total_stock": r.try_get::<i64, _>(2)?}),
        );
    }
    Ok(axum::Json(json!({"reservations": list, "products": stock})))
}
