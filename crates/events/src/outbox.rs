//! The transactional outbox and inbox, for services on SQLite or PostgreSQL (sqlx).
//!
//! *Outbox*: a service writes its state change and the event describing it in the same
//! database transaction ([`enqueue_sqlite`] / [`enqueue_postgres`]), so one never exists
//! without the other. A [`Relay`] then publishes unpublished rows in `seq` order (at least
//! once: it marks rows only after the publisher accepted them) and stops at the first
//! failure so later events never overtake an earlier one.
//!
//! The relay selects rows by a per-row `published_ms IS NULL`, never by "`seq` greater
//! than the last one published": on PostgreSQL a transaction that took `seq` 10 may commit
//! after one that took 11, and a high-water mark would skip 10 forever.
//!
//! *Inbox*: a consumer records each event id it handles in the same transaction as the
//! handling ([`inbox_sqlite`] / [`inbox_postgres`] return `false` for an id already
//! handled), so a redelivered event has no second effect.

use std::time::Duration;

use serde::Serialize;
use sqlx::{AnyConnection, AnyPool, PgConnection, PgPool, SqliteConnection, SqlitePool};
use tokio_util::sync::CancellationToken;

/// An event to publish once the surrounding transaction commits.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxEvent {
    pub stream: String,
    /// Unique; the event store and inboxes deduplicate by it.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

/// A stored outbox row, as the relay hands it to a publisher.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub seq: i64,
    pub event: OutboxEvent,
}

/// The tables, for `seq_type` (SQLite `INTEGER PRIMARY KEY AUTOINCREMENT`, PostgreSQL
/// `BIGSERIAL PRIMARY KEY`). Statements use `$n` placeholders, which both databases read.
fn schema(seq_type: &str) -> [String; 3] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS tessera_outbox (
                seq {seq_type},
                stream TEXT NOT NULL,
                id TEXT NOT NULL UNIQUE,
                type TEXT NOT NULL,
                data TEXT NOT NULL,
                metadata TEXT,
                created_ms BIGINT NOT NULL,
                published_ms BIGINT
            )"
        ),
        "CREATE INDEX IF NOT EXISTS tessera_outbox_unpublished ON tessera_outbox (seq)
            WHERE published_ms IS NULL"
            .into(),
        "CREATE TABLE IF NOT EXISTS tessera_inbox (
            consumer TEXT NOT NULL,
            event_id TEXT NOT NULL,
            processed_ms BIGINT NOT NULL,
            PRIMARY KEY (consumer, event_id)
        )"
        .into(),
    ]
}

const ENQUEUE: &str = "INSERT INTO tessera_outbox (stream, id, type, data, metadata, created_ms)
     VALUES ($1, $2, $3, $4, $5, $6)";
const INBOX: &str = "INSERT INTO tessera_inbox (consumer, event_id, processed_ms)
     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
const UNPUBLISHED: &str = "SELECT seq, stream, id, type, data, metadata FROM tessera_outbox
     WHERE published_ms IS NULL ORDER BY seq LIMIT $1";
const MARK: &str = "UPDATE tessera_outbox SET published_ms = $1 WHERE seq = $2";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Defines the same function for SQLite, PostgreSQL and sqlx's `Any` driver (either of
/// the two, chosen by URL at run time): `$conn` is the caller's connection in each, and
/// the body is written once.
macro_rules! per_backend {
    ($(#[$doc:meta])* $sqlite:ident, $pg:ident, $any:ident, $conn:ident,
     ($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub async fn $sqlite($conn: &mut SqliteConnection, $($arg: $ty),*) -> $ret $body
        $(#[$doc])*
        pub async fn $pg($conn: &mut PgConnection, $($arg: $ty),*) -> $ret $body
        $(#[$doc])*
        pub async fn $any($conn: &mut AnyConnection, $($arg: $ty),*) -> $ret $body
    };
}

/// Creates the outbox and inbox tables if missing.
pub async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    for stmt in schema("INTEGER PRIMARY KEY AUTOINCREMENT") {
        sqlx::query(sqlx::AssertSqlSafe(stmt)).execute(pool).await?;
    }
    Ok(())
}

/// Creates the outbox and inbox tables if missing, in whichever database `pool` is.
pub async fn migrate_any(pool: &AnyPool) -> Result<(), sqlx::Error> {
    let seq = if pool
        .connect_options()
        .database_url
        .scheme()
        .starts_with("postgres")
    {
        "BIGSERIAL PRIMARY KEY"
    } else {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    };
    for stmt in schema(seq) {
        sqlx::query(sqlx::AssertSqlSafe(stmt)).execute(pool).await?;
    }
    Ok(())
}

/// Creates the outbox and inbox tables if missing.
pub async fn migrate_postgres(pool: &PgPool) -> Result<(), sqlx::Error> {
    for stmt in schema("BIGSERIAL PRIMARY KEY") {
        sqlx::query(sqlx::AssertSqlSafe(stmt)).execute(pool).await?;
    }
    Ok(())
}

per_backend! {
    /// Adds `e` to the outbox inside the caller's transaction; while a traced request is
    /// served, the row carries its trace context (`metadata.traceparent`) to the event.
    enqueue_sqlite, enqueue_postgres, enqueue_any, tx, (e: &OutboxEvent) -> Result<(), sqlx::Error> {
        let span = tessera_trace::scope::current_context();
        let metadata = crate::store::with_trace(e.metadata.clone(), span);
        sqlx::query(ENQUEUE)
            .bind(&e.stream)
            .bind(&e.id)
            .bind(&e.kind)
            .bind(e.data.to_string())
            .bind(metadata.map(|m| m.to_string()))
            .bind(now_ms())
            .execute(tx)
            .await?;
        Ok(())
    }
}

per_backend! {
    /// Records that `consumer` handles `event_id`, inside the caller's transaction;
    /// `false` if it already did (skip the effect).
    inbox_sqlite, inbox_postgres, inbox_any, tx, (consumer: &str, event_id: &str) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(INBOX)
            .bind(consumer)
            .bind(event_id)
            .bind(now_ms())
            .execute(tx)
            .await?;
        Ok(r.rows_affected() == 1)
    }
}

/// Where a relay sends events.
pub trait Publish: Send + Sync {
    /// Publishes one event; `Ok` only once it is durably accepted. Called again for the
    /// same event after a failure or a crash, so it must be idempotent by event id.
    fn publish(&self, row: &OutboxRow) -> impl Future<Output = Result<(), String>> + Send;
}

/// The outbox's database.
#[derive(Clone)]
pub enum OutboxDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    Any(AnyPool),
}

type RawRow = (i64, String, String, String, String, Option<String>);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("publishing event {id}: {reason}")]
    Publish { id: String, reason: String },
}

/// Publishes outbox rows, oldest first.
pub struct Relay<P> {
    db: OutboxDb,
    publisher: P,
    batch: u32,
}

impl<P: Publish> Relay<P> {
    pub fn new(db: OutboxDb, publisher: P) -> Relay<P> {
        Relay {
            db,
            publisher,
            batch: 256,
        }
    }

    /// Publishes what is unpublished now; returns how many. Stops at the first failure
    /// (reported after marking what went out before it).
    pub async fn run_once(&self) -> Result<usize, RelayError> {
        let batch = i64::from(self.batch);
        let rows: Vec<RawRow> = match &self.db {
            OutboxDb::Sqlite(p) => sqlx::query_as(UNPUBLISHED).bind(batch).fetch_all(p).await?,
            OutboxDb::Postgres(p) => sqlx::query_as(UNPUBLISHED).bind(batch).fetch_all(p).await?,
            OutboxDb::Any(p) => sqlx::query_as(UNPUBLISHED).bind(batch).fetch_all(p).await?,
        };
        let mut done = Vec::new();
        let mut failure = None;
        for (seq, stream, id, kind, data, metadata) in rows {
            let json = |s: &str| serde_json::from_str(s).unwrap_or(serde_json::Value::Null);
            let row = OutboxRow {
                seq,
                event: OutboxEvent {
                    stream,
                    id,
                    kind,
                    data: json(&data),
                    metadata: metadata.as_deref().map(json),
                },
            };
            if let Err(reason) = self.publisher.publish(&row).await {
                failure = Some(RelayError::Publish {
                    id: row.event.id,
                    reason,
                });
                break;
            }
            done.push(seq);
        }
        self.mark(&done).await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(done.len()),
        }
    }

    async fn mark(&self, seqs: &[i64]) -> Result<(), sqlx::Error> {
        let now = now_ms();
        for seq in seqs {
            match &self.db {
                OutboxDb::Sqlite(p) => {
                    sqlx::query(MARK).bind(now).bind(seq).execute(p).await?;
                }
                OutboxDb::Postgres(p) => {
                    sqlx::query(MARK).bind(now).bind(seq).execute(p).await?;
                }
                OutboxDb::Any(p) => {
                    sqlx::query(MARK).bind(now).bind(seq).execute(p).await?;
                }
            }
        }
        Ok(())
    }

    /// Runs until `stop`: publishes, and when the outbox is empty (or publishing fails)
    /// waits `idle` before looking again.
    pub async fn run(self, idle: Duration, stop: CancellationToken) {
        loop {
            let wait = match self.run_once().await {
                Ok(n) if n > 0 => Duration::ZERO,
                Ok(_) => idle,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay");
                    idle
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Publishes to a Tessera event store over HTTP (`POST /v1/streams/{stream}`); a repeat
/// of an already stored event id is accepted as success, so republishing is harmless.
#[derive(Clone)]
pub struct HttpPublisher {
    bases: std::sync::Arc<[String]>,
    /// The server tried first: the next one after a server could not be reached.
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: Option<String>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

impl HttpPublisher {
    /// `servers` is the server's URL (`http://127.0.0.1:8500`, or `127.0.0.1:8500`), or
    /// several, comma-separated, of servers sharing one event store: a publish that
    /// cannot reach one fails, and the relay's next try goes to the next. `token` is an
    /// ACL token with `operator` write when ACLs are on.
    pub fn new(servers: impl Into<String>, token: Option<String>) -> HttpPublisher {
        let bases: Vec<String> = servers
            .into()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let s = s.trim_end_matches('/');
                if s.contains("://") {
                    s.to_owned()
                } else {
                    format!("http://{s}")
                }
            })
            .collect();
        HttpPublisher {
            bases: bases.into(),
            current: Default::default(),
            token,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }
}

impl Publish for HttpPublisher {
    async fn publish(&self, row: &OutboxRow) -> Result<(), String> {
        use http_body_util::BodyExt;
        let e = &row.event;
        let body = serde_json::json!({"expected_version": "any", "events": [{
            "id": e.id, "type": e.kind, "data": e.data, "metadata": e.metadata,
        }]});
        let n = self.bases.len().max(1);
        let at = self.current.load(std::sync::atomic::Ordering::Relaxed) % n;
        let base = self
            .bases
            .get(at)
            .map_or("http://127.0.0.1:8500", String::as_str);
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("{base}/v1/streams/{}", row.event.stream))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header("x-consul-token", t);
        }
        // The append joins the trace the event was written in, rather than starting one.
        if let Some(t) = e.metadata.as_ref().and_then(|m| m["traceparent"].as_str()) {
            req = req.header(tessera_trace::http::TRACEPARENT, t);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| "the event store did not answer within 10s".to_owned())?
            .map_err(|e| {
                if e.is_connect() {
                    // Nothing was sent: the next try goes to the next server.
                    let _ = self.current.compare_exchange(
                        at,
                        (at + 1) % n,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                tessera_core::error_chain(&e)
            })?;
        let status = resp.status();
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("event store answered {status}: {text}"))
        }
    }
}

/// Publishes straight into the event store's NATS JetStream streams (the same subjects
/// and headers `tessera server --events nats://...` uses), for services that relay
/// without going through a server. Repeats are dropped by JetStream's duplicate window.
#[derive(Clone)]
pub struct NatsPublisher {
    store: crate::nats::NatsStore,
}

impl NatsPublisher {
    pub async fn connect(url: &str, namespace: &str) -> Result<NatsPublisher, crate::StoreError> {
        Ok(NatsPublisher {
            store: crate::nats::NatsStore::connect(url, namespace).await?,
        })
    }
}

impl Publish for NatsPublisher {
    async fn publish(&self, row: &OutboxRow) -> Result<(), String> {
        let e = &row.event;
        let event = crate::NewEvent {
            id: e.id.clone(),
            kind: e.kind.clone(),
            data: e.data.clone(),
            metadata: e.metadata.clone(),
        };
        self.store
            .append(e.stream.clone(), crate::Expected::Any, vec![event])
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
