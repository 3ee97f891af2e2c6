//! `payments`: account balances. An account opens with a starting credit on first use.
//! The checkout saga charges an order and its compensation refunds it; both are
//! idempotent by order id, a refund before its charge leaves a tombstone, and a charge
//! larger than the balance fails with 402 (which makes the saga compensate).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;
use tessera::JwksVerifier;

use crate::db::{Db, now_ms, repeated_step};
use crate::web::{ApiError, ApiResult, caller, parse};

pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS accounts (
        user_id TEXT PRIMARY KEY,
        balance_cents BIGINT NOT NULL,
        credited_cents BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS charges (
        order_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        amount_cents BIGINT NOT NULL,
        status TEXT NOT NULL,
        updated_ms BIGINT NOT NULL
    )",
];

#[derive(Clone)]
struct St {
    db: Db,
    auth: Arc<JwksVerifier>,
    initial: i64,
}

pub fn router(db: Db, auth: Arc<JwksVerifier>, initial_balance_cents: i64) -> Router {
    Router::new()
        .route("/payments/accounts/me", get(me))
        .route("/payments/accounts/{user}/deposit", post(deposit))
        .route("/internal/charges", post(charge).get(charges))
        .route("/internal/charges/{order}/refund", post(refund))
        .with_state(St {
            db,
            auth,
            initial: initial_balance_cents,
        })
}

async fn open_account<'c>(
    st: &St,
    tx: &mut sqlx::Transaction<'c, sqlx::Any>,
    user: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO accounts (user_id, balance_cents, credited_cents) VALUES ($1, $2, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(user)
    .bind(st.initial)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn balance(st: &St, user: &str) -> ApiResult<Value> {
    let mut tx = st.db.write().await?;
    open_account(st, &mut tx, user).await?;
    let row = sqlx::query("SELECT balance_cents FROM accounts WHERE user_id = $1")
        .bind(user)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(json!({"user_id": user, "balance_cents": row.try_get::<i64, _>(0)?}))
}

async fn me(State(st): State<St>, headers: HeaderMap) -> ApiResult<axum::Json<Value>> {
    let who = caller(&st.auth, &headers).await?;
    Ok(axum::Json(balance(&st, &who.user).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deposit {
    amount_cents: i64,
}

async fn deposit(
    State(st): State<St>,
    headers: HeaderMap,
    Path(user): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<Value>> {
    caller(&st.auth, &headers).await?.require_admin()?;
    let d: Deposit = parse(&body)?;
    if d.amount_cents <= 0 {
        return Err(ApiError::bad("amount_cents must be positive"));
    }
    let mut tx = st.db.write().await?;
    open_account(&st, &mut tx, &user).await?;
    sqlx::query(
        "UPDATE accounts SET balance_cents = balance_cents + $1, credited_cents = credited_cents + $1
         WHERE user_id = $2",
    )
    .bind(d.amount_cents)
    .bind(&user)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(axum::Json(balance(&st, &user).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Charge {
    order_id: String,
    user_id: String,
    amount_cents: i64,
}

async fn charge(State(st): State<St>, body: Bytes) -> ApiResult<axum::Json<Value>> {
    let c: Charge = parse(&body)?;
    if c.order_id.is_empty() || c.user_id.is_empty() || c.amount_cents <= 0 {
        return Err(ApiError::bad(
            "order_id, user_id and a positive amount_cents are required",
        ));
    }
    let mut tx = st.db.write().await?;
    open_account(&st, &mut tx, &c.user_id).await?;
    let claimed = sqlx::query(
        "INSERT INTO charges (order_id, user_id, amount_cents, status, updated_ms)
         VALUES ($1, $2, $3, 'charged', $4) ON CONFLICT DO NOTHING",
    )
    .bind(&c.order_id)
    .bind(&c.user_id)
    .bind(c.amount_cents)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    if claimed.rows_affected() == 0 {
        return repeated_step(&mut tx, "charges", &c.order_id, "charged", "refunded").await;
    }
    let paid = sqlx::query(
        "UPDATE accounts SET balance_cents = balance_cents - $1
         WHERE user_id = $2 AND balance_cents >= $1",
    )
    .bind(c.amount_cents)
    .bind(&c.user_id)
    .execute(&mut *tx)
    .await?;
    if paid.rows_affected() == 0 {
        // Rolled back with the claim: a later retry with more funds may succeed.
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_funds",
            format!("the balance does not cover {} cents", c.amount_cents),
        ));
    }
    tx.commit().await?;
    Ok(axum::Json(
        json!({"order_id": c.order_id, "status": "charged"}),
    ))
}

async fn refund(State(st): State<St>, Path(order): Path<String>) -> ApiResult<axum::Json<Value>> {
    if order.is_empty() || order.len() > 64 {
        return Err(ApiError::bad("order id: 1 to 64 characters"));
    }
    let mut tx = st.db.write().await?;
    sqlx::query(
        "INSERT INTO charges (order_id, user_id, amount_cents, status, updated_ms)
         VALUES ($1, '', 0, 'refunded', $2) ON CONFLICT DO NOTHING",
    )
    .bind(&order)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    let row = sqlx::query(
        "UPDATE charges SET status = 'refunded', updated_ms = $1
         WHERE order_id = $2 AND status = 'charged' RETURNING user_id, amount_cents",
    )
    .bind(now_ms())
    .bind(&order)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = row {
        sqlx::query("UPDATE accounts SET balance_cents = balance_cents + $1 WHERE user_id = $2")
            .bind(row.try_get::<i64, _>(1)?)
            .bind(row.try_get::<String, _>(0)?)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(axum::Json(json!({"order_id": order, "status": "refunded"})))
}

/// Every charge and account, for the demo's consistency check.
async fn charges(State(st): State<St>) -> ApiResult<axum::Json<Value>> {
    let rows = sqlx::query("SELECT order_id, user_id, amount_cents, status FROM charges")
        .fetch_all(&st.db.pool)
        .await?;
    let mut list = Vec::with_capacity(rows.len());
    for r in &rows {
        list.push(
            json!({"order_id": r.try_get::<String, _>(0)?, "user_id": r.try_get::<String, _>(1)?,
            "amount_cents": r.try_get::<i64, _>(2)?, "status": r.try_get::<String, _>(3)?}),
        );
    }
    let rows = sqlx::query("SELECT user_id, balance_cents, credited_cents FROM accounts")
        .fetch_all(&st.db.pool)
        .await?;
    let mut accounts = Vec::with_capacity(rows.len());
    for r in &rows {
        accounts.push(json!({"user_id": r.try_get::<String, _>(0)?,
            "balance_cents": r.try_get::<i64, _>(1)?, "credited_cents": r.try_get::<i64, _>(2)?}));
    }
    Ok(axum::Json(json!({"charges": list, "accounts": accounts})))
}
