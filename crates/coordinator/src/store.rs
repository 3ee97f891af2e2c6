//! Where sagas live: one row per saga (its state as JSON), in SQLite (the default, a file
//! in the data dir) or PostgreSQL. Writes go through one writer task that commits
//! whatever has queued up in a single transaction — group commit — so a thousand sagas
//! in flight cost a few fsyncs per batch instead of one per transition, and nothing is
//! acknowledged before it is durable.

use std::path::Path;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot};

use crate::saga::{Saga, SagaStatus};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored saga {id} is unreadable: {source}")]
    Corrupt {
        id: String,
        source: serde_json::Error,
    },
    #[error("the store's writer has stopped")]
    Closed,
    #[error("commit failed: {0}")]
    Commit(String),
}

#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One write, queued for the next group commit.
enum Op {
    /// Inserts unless a saga with the same idempotency key exists; answers whether it
    /// inserted.
    Insert(Row7),
    Update(Row7),
}

/// The columns of a saga row.
struct Row7 {
    id: String,
    idempotency_key: Option<String>,
    name: String,
    status: &'static str,
    state: String,
    created_ms: i64,
    updated_ms: i64,
}

impl Row7 {
    fn of(saga: &Saga) -> Row7 {
        Row7 {
            id: saga.id.clone(),
            idempotency_key: saga.idempotency_key.clone(),
            name: saga.name.clone(),
            status: saga.status.as_str(),
            // A Saga always serializes: plain data, string keys.
            state: serde_json::to_string(saga).unwrap_or_default(),
            created_ms: saga.created_ms as i64,
            updated_ms: saga.updated_ms as i64,
        }
    }
}

type Reply = oneshot::Sender<Result<bool, String>>;

/// A listing row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub id: String,
    pub name: String,
    pub status: String,
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[derive(Clone)]
pub struct Store {
    db: Db,
    writes: mpsc::Sender<(Op, Reply)>,
}

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS sagas (
        id TEXT PRIMARY KEY,
        idempotency_key TEXT UNIQUE,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        state TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS sagas_by_status ON sagas (status, created_ms)",
];

impl Store {
    /// SQLite in `dir/coordinator.db`, fsynced at every commit (WAL, synchronous=FULL).
    pub async fn open_sqlite(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
        let opts = SqliteConnectOptions::new()
            .filename(dir.join("coordinator.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(30));
        // WAL: readers (GET, listings) do not wait for the writer's commits.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        Self::start(Db::Sqlite(pool)).await
    }

    /// PostgreSQL at `url` (`postgres://user@host/db`).
    pub async fn open_postgres(url: &str) -> Result<Store, StoreError> {
        let pool = PgPoolOptions::new().max_connections(4).connect(url).await?;
        Self::start(Db::Postgres(pool)).await
    }

    async fn start(db: Db) -> Result<Store, StoreError> {
        for stmt in SCHEMA {
            match &db {
                Db::Sqlite(p) => sqlx::query(stmt).execute(p).await?,
                Db::Postgres(p) => {
                    sqlx::query(stmt).execute(p).await?;
                    continue;
                }
            };
        }
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer(db.clone(), rx));
        Ok(Store { db, writes: tx })
    }

    async fn write(&self, op: Op) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send((op, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer
            .await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Commit)
    }

    /// Stores a new saga; `false` if one with its idempotency key already exists.
    pub async fn insert(&self, saga: &Saga) -> Result<bool, StoreError> {
        self.write(Op::Insert(Row7::of(saga))).await
    }

    /// Stores a saga's new state; returns once it is durable.
    pub async fn update(&self, saga: &Saga) -> Result<(), StoreError> {
        self.write(Op::Update(Row7::of(saga))).await.map(|_| ())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Saga>, StoreError> {
        self.one(
            "SELECT id, state FROM sagas WHERE id = ?",
            "SELECT id, state FROM sagas WHERE id = $1",
            id,
        )
        .await
    }

    pub async fn by_idempotency_key(&self, key: &str) -> Result<Option<Saga>, StoreError> {
        self.one(
            "SELECT id, state FROM sagas WHERE idempotency_key = ?",
            "SELECT id, state FROM sagas WHERE idempotency_key = $1",
            key,
        )
        .await
    }

    /// One saga by a one-parameter query, in each backend's placeholder style.
    async fn one(
        &self,
        sqlite: &'static str,
        postgres: &'static str,
        arg: &str,
    ) -> Result<Option<Saga>, StoreError> {
        let row: Option<(String, String)> = match &self.db {
            Db::Sqlite(p) => sqlx::query_as(sqlite).bind(arg).fetch_optional(p).await?,
            Db::Postgres(p) => sqlx::query_as(postgres).bind(arg).fetch_optional(p).await?,
        };
        row.map(|(id, state)| decode(id, &state)).transpose()
    }

    /// Newest first.
    pub async fn list(
        &self,
        status: Option<SagaStatus>,
        limit: u32,
    ) -> Result<Vec<Summary>, StoreError> {
        type R = (String, String, String, i64, i64);
        let status = status.map(|s| s.as_str());
        let rows: Vec<R> = match &self.db {
            Db::Sqlite(p) => {
                sqlx::query_as(
                    "SELECT id, name, status, created_ms, updated_ms FROM sagas
                     WHERE (?1 IS NULL OR status = ?1) ORDER BY created_ms DESC LIMIT ?2",
                )
                .bind(status)
                .bind(i64::from(limit))
                .fetch_all(p)
                .await?
            }
            Db::Postgres(p) => {
                sqlx::query_as(
                    "SELECT id, name, status, created_ms, updated_ms FROM sagas
                     WHERE ($1::TEXT IS NULL OR status = $1) ORDER BY created_ms DESC LIMIT $2",
                )
                .bind(status)
                .bind(i64::from(limit))
                .fetch_all(p)
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(id, name, status, c, u)| Summary {
                id,
                name,
                status,
                created_ms: c as u64,
                updated_ms: u as u64,
            })
            .collect())
    }

    /// Sagas a crash interrupted: running or compensating.
    pub async fn unfinished(&self) -> Result<Vec<Saga>, StoreError> {
        const Q: &str = "SELECT id, state FROM sagas
             WHERE status IN ('running', 'compensating') ORDER BY created_ms";
        let rows: Vec<(String, String)> = match &self.db {
            Db::Sqlite(p) => sqlx::query_as(Q).fetch_all(p).await?,
            Db::Postgres(p) => sqlx::query_as(Q).fetch_all(p).await?,
        };
        rows.into_iter()
            .map(|(id, state)| decode(id, &state))
            .collect()
    }

    /// How many sagas are in each status.
    pub async fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        const Q: &str = "SELECT status, COUNT(*) FROM sagas GROUP BY status";
        Ok(match &self.db {
            Db::Sqlite(p) => sqlx::query_as(Q).fetch_all(p).await?,
            Db::Postgres(p) => sqlx::query_as(Q).fetch_all(p).await?,
        })
    }
}

fn decode(id: String, state: &str) -> Result<Saga, StoreError> {
    serde_json::from_str(state).map_err(|source| StoreError::Corrupt { id, source })
}

/// The group-commit loop: takes everything queued, commits it in one transaction, then
/// answers each writer.
async fn writer(db: Db, mut rx: mpsc::Receiver<(Op, Reply)>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let results = match &db {
            Db::Sqlite(p) => commit_sqlite(p, &batch).await,
            Db::Postgres(p) => commit_postgres(p, &batch).await,
        };
        match results {
            Ok(results) => {
                for ((_, reply), r) in batch.drain(..).zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = batch.len(), "saga store commit failed");
                let msg = e.to_string();
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(msg.clone()));
                }
            }
        }
    }
}

async fn commit_sqlite(p: &SqlitePool, batch: &[(Op, Reply)]) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = p.begin().await?;
    let mut out = Vec::with_capacity(batch.len());
    for (op, _) in batch {
        let done = match op {
            Op::Insert(r) => sqlx::query(
                "INSERT INTO sagas (id, idempotency_key, name, status, state, created_ms, updated_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(&r.id)
            .bind(&r.idempotency_key)
            .bind(&r.name)
            .bind(r.status)
            .bind(&r.state)
            .bind(r.created_ms)
            .bind(r.updated_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            Op::Update(r) => sqlx::query(
                "UPDATE sagas SET status = ?, state = ?, updated_ms = ? WHERE id = ?",
            )
            .bind(r.status)
            .bind(&r.state)
            .bind(r.updated_ms)
            .bind(&r.id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
        };
        out.push(done == 1);
    }
    tx.commit().await?;
    Ok(out)
}

async fn commit_postgres(p: &PgPool, batch: &[(Op, Reply)]) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = p.begin().await?;
    let mut out = Vec::with_capacity(batch.len());
    for (op, _) in batch {
        let done = match op {
            Op::Insert(r) => sqlx::query(
                "INSERT INTO sagas (id, idempotency_key, name, status, state, created_ms, updated_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(&r.id)
            .bind(&r.idempotency_key)
            .bind(&r.name)
            .bind(r.status)
            .bind(&r.state)
            .bind(r.created_ms)
            .bind(r.updated_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            Op::Update(r) => sqlx::query(
                "UPDATE sagas SET status = $1, state = $2, updated_ms = $3 WHERE id = $4",
            )
            .bind(r.status)
            .bind(&r.state)
            .bind(r.updated_ms)
            .bind(&r.id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
        };
        out.push(done == 1);
    }
    tx.commit().await?;
    Ok(out)
}
