//! Each service's own database: a SQLite file in the data dir (shared by the replicas of
//! one service, in WAL mode) or PostgreSQL when `DATABASE_URL` is set. Statements are
//! written once, with `$n` placeholders both databases read, through sqlx's `Any` driver.

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub postgres: bool,
}

impl Db {
    /// Opens `url`, or `dir/{name}.db` without one, and creates `schema`'s tables (and
    /// the outbox/inbox tables with `outbox`).
    pub async fn open(
        url: Option<&str>,
        dir: &Path,
        name: &str,
        schema: &[&str],
        outbox: bool,
    ) -> Result<Db, String> {
        install_default_drivers();
        let (url, postgres) = match url {
            Some(u) => (u.to_owned(), true),
            None => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let file = dir.join(format!("{name}.db"));
                (format!("sqlite://{}?mode=rwc", file.display()), false)
            }
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if postgres { 8 } else { 4 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if !postgres {
                        // Two replicas write the same file: wait for the lock, never fail
                        // at once; WAL lets readers go on while one writes.
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| format!("cannot open the {name} database: {e}"))?;
        let db = Db { pool, postgres };
        db.migrate(schema, outbox)
            .await
            .map_err(|e| format!("cannot create the {name} tables: {e}"))?;
        Ok(db)
    }

    /// Creates the tables. Replicas start together, and PostgreSQL's `CREATE TABLE IF
    /// NOT EXISTS` is not safe against a concurrent twin (it can fail on the catalog's
    /// unique index), so on PostgreSQL this runs under an advisory lock.
    async fn migrate(&self, schema: &[&str], outbox: bool) -> Result<(), sqlx::Error> {
        const LOCK: i64 = 0x7e55_e2a5;
        let mut lock = self.pool.acquire().await?;
        if self.postgres {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(LOCK)
                .execute(&mut *lock)
                .await?;
        }
        let mut result = Ok(());
        for stmt in schema {
            result = sqlx::query(sqlx::AssertSqlSafe(*stmt))
                .execute(&mut *lock)
                .await
                .map(drop);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() && outbox {
            result = tessera::outbox::migrate_any(&self.pool).await;
        }
        if self.postgres {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(LOCK)
                .execute(&mut *lock)
                .await?;
        }
        result
    }

    /// A write transaction. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`), so two replicas never deadlock upgrading a read lock.
    pub async fn write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        if self.postgres {
            self.pool.begin().await
        } else {
            self.pool.begin_with("BEGIN IMMEDIATE").await
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A random id: 16 hex characters.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        b = fastrand::u64(..).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The answer to a saga step whose row for `order` already existed (in `table`, keyed
/// by `order_id`): a repeat of the step itself (its `done` status) succeeds again; a step
/// whose compensation came first (status `undone`) is refused with 409, so it can never
/// take effect after its undo.
pub async fn repeated_step(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    table: &str,
    order: &str,
    done: &str,
    undone: &'static str,
) -> Result<axum::Json<serde_json::Value>, crate::web::ApiError> {
    use sqlx::Row;
    let status: String = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT status FROM {table} WHERE order_id = $1"
    )))
    .bind(order)
    .fetch_one(&mut **tx)
    .await?
    .try_get(0)?;
    if status == done {
        Ok(axum::Json(
            serde_json::json!({"order_id": order, "status": done, "repeat": true}),
        ))
    } else {
        Err(crate::web::ApiError::new(
            http::StatusCode::CONFLICT,
            undone,
            format!("order {order} was already {status}; the step cannot run after its undo"),
        ))
    }
}
