//! The embedded event store: SQLite in the data dir. Every write (appends and consumer-group
//! acks alike) goes through one writer task that checks each append's expected version and
//! event ids and commits everything waiting in one `BEGIN IMMEDIATE` transaction (group
//! commit), so global positions are assigned in commit order and a reader never sees
//! position N+1 before N. A second writer would make SQLite refuse one of the two with
//! "database is locked" (a read transaction that must upgrade to a write cannot wait for
//! another writer), so there is none. After each commit the new head position is published,
//! which is what live subscriptions wait on.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot, watch};

/// Most appends committed in one transaction.
const MAX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the event store's writer has stopped")]
    Closed,
    /// The write was not committed; nothing of it was kept.
    #[error("commit failed: {0}")]
    NotKept(tessera_sql::Refused),
    #[error("{0}")]
    Invalid(String),
}

/// How the API answers a store error: 507 for a full disk, 503 for the rest.
impl From<StoreError> for tessera_sql::Refused {
    fn from(e: StoreError) -> tessera_sql::Refused {
        match e {
            StoreError::Db(e) => tessera_sql::Refused::of(&e),
            StoreError::NotKept(r) => r,
            other => tessera_sql::Refused::unavailable(other.to_string()),
        }
    }
}

/// An event as a client posts it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// Unique; appending an event whose id is already stored is a no-op.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

/// `metadata` with the trace context of `span` as `traceparent` (the name CloudEvents'
/// distributed-tracing extension uses), so whoever handles the event can continue the
/// trace that produced it. Metadata that already names one, or is not a JSON object, is
/// left as it is.
pub fn with_trace(
    metadata: Option<serde_json::Value>,
    span: Option<tessera_trace::SpanContext>,
) -> Option<serde_json::Value> {
    let Some(span) = span else { return metadata };
    let mut m = metadata.unwrap_or_else(|| serde_json::json!({}));
    if let Some(obj) = m.as_object_mut() {
        obj.entry("traceparent")
            .or_insert_with(|| span.traceparent().into());
    }
    Some(m)
}

/// A stored event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Global, across all streams: the order of commits.
    pub position: i64,
    pub stream: String,
    /// Within its stream, from 0.
    pub version: i64,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    pub created_ms: i64,
}

/// What the stream's current version must be for an append to go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Any,
    /// The stream has no events yet.
    NoStream,
    /// The stream has at least one event.
    Exists,
    /// The stream's last event has this version.
    Version(i64),
}

impl Expected {
    /// Whether a stream whose last version is `current` (-1: none) satisfies it.
    pub fn allows(self, current: i64) -> bool {
        match self {
            Expected::Any => true,
            Expected::NoStream => current == -1,
            Expected::Exists => current >= 0,
            Expected::Version(v) => current == v,
        }
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Any => f.write_str("any"),
            Expected::NoStream => f.write_str("no_stream"),
            Expected::Exists => f.write_str("exists"),
            Expected::Version(v) => write!(f, "{v}"),
        }
    }
}

/// How an append ended.
#[derive(Debug, Clone, Serialize)]
pub struct Appended {
    pub stream: String,
    pub first_version: i64,
    pub last_version: i64,
    pub last_position: i64,
    /// Every event id was already stored: nothing was written.
    pub duplicate: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    #[error("stream {stream} is at version {current}, expected {expected}")]
    WrongVersion {
        stream: String,
        expected: Expected,
        current: i64,
    },
    #[error("event {id} is already stored in stream {stream} at version {version}")]
    IdConflict {
        id: String,
        stream: String,
        version: i64,
    },
    #[error("{0}")]
    Store(tessera_sql::Refused),
}

struct Append {
    stream: String,
    expected: Expected,
    events: Vec<NewEvent>,
}

type Reply = oneshot::Sender<Result<Appended, AppendError>>;

/// Which events a read or subscription covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// One stream, by version.
    Stream(String),
    /// Every stream whose name starts with the prefix (`order-` for `order-*`; empty for
    /// `*`), by global position.
    Category(String),
}

impl Selection {
    /// Where reading from the beginning starts: version 0, or global position 1.
    pub fn first(&self) -> i64 {
        match self {
            Selection::Stream(_) => 0,
            Selection::Category(_) => 1,
        }
    }

    /// A read event's place in this selection: its version, or its global position.
    pub fn id_of(&self, e: &Event) -> i64 {
        match self {
            Selection::Stream(_) => e.version,
            Selection::Category(_) => e.position,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    writes: mpsc::Sender<Write>,
    head: watch::Receiver<i64>,
}

/// What the writer commits.
enum Write {
    Append(Append, Reply),
    /// Move a consumer group's offset forward; answered with the stored offset.
    Ack {
        group: String,
        sel: String,
        offset: i64,
        reply: oneshot::Sender<Result<i64, StoreError>>,
    },
}

const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS events (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        stream TEXT NOT NULL,
        version INTEGER NOT NULL,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        metadata TEXT,
        created_ms INTEGER NOT NULL,
        UNIQUE (stream, version)
    )",
    "CREATE INDEX IF NOT EXISTS events_by_stream_prefix ON events (stream, position)",
    "CREATE TABLE IF NOT EXISTS consumer_groups (
        grp TEXT NOT NULL,
        stream TEXT NOT NULL,
        acked INTEGER NOT NULL,
        PRIMARY KEY (grp, stream)
    )",
];

impl Store {
    /// SQLite in `dir/events.db`, fsynced at every commit.
    pub async fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
        let opts = SqliteConnectOptions::new()
            .filename(dir.join("events.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(position) FROM events")
            .fetch_one(&pool)
            .await?;
        let (head_tx, head) = watch::channel(last.unwrap_or(0));
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer(pool.clone(), rx, head_tx));
        Ok(Store {
            pool,
            writes: tx,
            head,
        })
    }

    /// The global position of the latest committed event (0 when empty), and changes to it.
    pub fn head(&self) -> watch::Receiver<i64> {
        self.head.clone()
    }

    pub async fn append(
        &self,
        stream: String,
        expected: Expected,
        events: Vec<NewEvent>,
    ) -> Result<Appended, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Write::Append(
                Append {
                    stream,
                    expected,
                    events,
                },
                reply,
            ))
            .await
            .map_err(|_| {
                AppendError::Store(tessera_sql::Refused::unavailable(
                    StoreError::Closed.to_string(),
                ))
            })?;
        answer.await.map_err(|_| {
            AppendError::Store(tessera_sql::Refused::unavailable(
                StoreError::Closed.to_string(),
            ))
        })?
    }

    /// Events of `sel` from `from` (a version for a stream, a position for a category),
    /// in order, at most `limit`.
    pub async fn read(
        &self,
        sel: &Selection,
        from: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        const COLS: &str = "position, stream, version, id, type, data, metadata, created_ms";
        let rows = match sel {
            Selection::Stream(name) => {
                sqlx::query_as::<_, EventRow>(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLS} FROM events WHERE stream = ? AND version >= ? ORDER BY version LIMIT ?"
                )))
                .bind(name)
                .bind(from)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            Selection::Category(prefix) if prefix.is_empty() => {
                sqlx::query_as::<_, EventRow>(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLS} FROM events WHERE position >= ? ORDER BY position LIMIT ?"
                )))
                .bind(from)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            Selection::Category(prefix) => {
                // A range on the name: every stream starting with the prefix.
                let mut upper = prefix.clone();
                upper.push(char::MAX);
                sqlx::query_as::<_, EventRow>(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLS} FROM events WHERE stream >= ? AND stream < ? AND position >= ?
                     ORDER BY position LIMIT ?"
                )))
                .bind(prefix)
                .bind(upper)
                .bind(from)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows.into_iter().map(event).collect())
    }

    /// A consumer group's acknowledged offset on a selection (`None` before its first ack).
    pub async fn acked(&self, group: &str, sel: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT acked FROM consumer_groups WHERE grp = ? AND stream = ?")
                .bind(group)
                .bind(sel)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Moves a group's offset forward (never back); returns the stored offset. Durable
    /// when it returns.
    pub async fn ack(&self, group: &str, sel: &str, offset: i64) -> Result<i64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Write::Ack {
                group: group.to_owned(),
                sel: sel.to_owned(),
                offset,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

type EventRow = (
    i64,
    String,
    i64,
    String,
    String,
    String,
    Option<String>,
    i64,
);

fn event(r: EventRow) -> Event {
    let (position, stream, version, id, kind, data, metadata, created_ms) = r;
    // Stored by `commit` from JSON values, so they parse back.
    let json = |s: &str| serde_json::from_str(s).unwrap_or(serde_json::Value::Null);
    Event {
        position,
        stream,
        version,
        id,
        kind,
        data: json(&data),
        metadata: metadata.as_deref().map(json),
        created_ms,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Most stream heads (last versions) the writer remembers; past it the cache starts over.
const MAX_HEADS: usize = 100_000;

async fn writer(pool: SqlitePool, mut rx: mpsc::Receiver<Write>, head: watch::Sender<i64>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The last version of streams written through this writer (the only writer), so an
    // append needs no query to learn it.
    let mut heads: HashMap<String, i64> = HashMap::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let mut moved = HashMap::new();
        match commit(&pool, &batch, &heads, &mut moved).await {
            Ok(results) => {
                if heads.len() > MAX_HEADS {
                    heads.clear();
                }
                heads.extend(moved);
                let top = results
                    .iter()
                    .filter_map(|r| match r {
                        Outcome::Appended(Ok(a)) => Some(a.last_position),
                        _ => None,
                    })
                    .max();
                if let Some(top) = top {
                    head.send_if_modified(|h| {
                        let moved = top > *h;
                        *h = (*h).max(top);
                        moved
                    });
                }
                for (w, r) in batch.drain(..).zip(results) {
                    match (w, r) {
                        (Write::Append(_, reply), Outcome::Appended(r)) => {
                            let _ = reply.send(r);
                        }
                        (Write::Ack { reply, .. }, Outcome::Acked(offset)) => {
                            let _ = reply.send(Ok(offset));
                        }
                        // `commit` answers each write, in order, with its own kind.
                        _ => unreachable!("an event store write answered with another kind"),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, writes = batch.len(), "event store commit failed");
                let refused = tessera_sql::Refused::of(&e);
                for w in batch.drain(..) {
                    match w {
                        Write::Append(_, reply) => {
                            let _ = reply.send(Err(AppendError::Store(refused.clone())));
                        }
                        Write::Ack { reply, .. } => {
                            let _ = reply.send(Err(StoreError::NotKept(refused.clone())));
                        }
                    }
                }
            }
        }
    }
}

/// A committed write's answer.
enum Outcome {
    Appended(Result<Appended, AppendError>),
    Acked(i64),
}

/// One transaction for the whole batch; each append's checks see the appends before it.
/// An append runs inside a savepoint: if one of its ids turns out to be stored already,
/// its inserts are undone and it is answered as a repeat or a conflict. `moved` collects
/// the new stream heads, applied to `heads` only once the commit succeeded.
async fn commit(
    pool: &SqlitePool,
    batch: &[Write],
    heads: &HashMap<String, i64>,
    moved: &mut HashMap<String, i64>,
) -> Result<Vec<Outcome>, sqlx::Error> {
    // IMMEDIATE: the write lock is taken at once, so the transaction never has to upgrade
    // a read snapshot (which SQLite refuses without waiting, as SQLITE_BUSY_SNAPSHOT).
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut out = Vec::with_capacity(batch.len());
    for w in batch {
        let a = match w {
            Write::Append(a, _) => a,
            Write::Ack {
                group, sel, offset, ..
            } => {
                let stored: i64 = sqlx::query_scalar(
                    "INSERT INTO consumer_groups (grp, stream, acked) VALUES (?, ?, ?)
                     ON CONFLICT (grp, stream) DO UPDATE SET acked = MAX(acked, excluded.acked)
                     RETURNING acked",
                )
                .bind(group)
                .bind(sel)
                .bind(offset)
                .fetch_one(&mut *tx)
                .await?;
                out.push(Outcome::Acked(stored));
                continue;
            }
        };
        let current = match moved.get(&a.stream).or_else(|| heads.get(&a.stream)) {
            Some(v) => *v,
            None => {
                let v: Option<i64> =
                    sqlx::query_scalar("SELECT MAX(version) FROM events WHERE stream = ?")
                        .bind(&a.stream)
                        .fetch_one(&mut *tx)
                        .await?;
                v.unwrap_or(-1)
            }
        };
        let ok = a.expected.allows(current);
        if ok {
            sqlx::query("SAVEPOINT append").execute(&mut *tx).await?;
            let now = now_ms();
            let mut last_position = 0;
            let mut clash = false;
            for (i, e) in a.events.iter().enumerate() {
                let r = sqlx::query(
                    "INSERT INTO events (stream, version, id, type, data, metadata, created_ms)
                     VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                )
                .bind(&a.stream)
                .bind(current + 1 + i as i64)
                .bind(&e.id)
                .bind(&e.kind)
                .bind(e.data.to_string())
                .bind(e.metadata.as_ref().map(|m| m.to_string()))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() == 0 {
                    clash = true;
                    break;
                }
                last_position = r.last_insert_rowid();
            }
            if !clash {
                sqlx::query("RELEASE append").execute(&mut *tx).await?;
                let last = current + a.events.len() as i64;
                moved.insert(a.stream.clone(), last);
                out.push(Outcome::Appended(Ok(Appended {
                    stream: a.stream.clone(),
                    first_version: current + 1,
                    last_version: last,
                    last_position,
                    duplicate: false,
                })));
                continue;
            }
            sqlx::query("ROLLBACK TO append; RELEASE append")
                .execute(&mut *tx)
                .await?;
        }
        // The version did not match, or an id is already stored: a repeat of an earlier
        // append (every id stored, in this stream) is answered as such.
        let mut seen = Vec::new();
        for e in &a.events {
            let hit: Option<(String, i64, i64)> =
                sqlx::query_as("SELECT stream, version, position FROM events WHERE id = ?")
                    .bind(&e.id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(h) = hit {
                seen.push((e.id.clone(), h));
            }
        }
        let all_here = !seen.is_empty()
            && seen.len() == a.events.len()
            && seen.iter().all(|(_, h)| h.0 == a.stream);
        out.push(Outcome::Appended(if all_here {
            Ok(Appended {
                stream: a.stream.clone(),
                first_version: seen.iter().map(|(_, h)| h.1).min().unwrap_or(0),
                last_version: seen.iter().map(|(_, h)| h.1).max().unwrap_or(0),
                last_position: seen.iter().map(|(_, h)| h.2).max().unwrap_or(0),
                duplicate: true,
            })
        } else if let Some((id, (stream, version, _))) = seen.into_iter().next() {
            Err(AppendError::IdConflict {
                id,
                stream,
                version,
            })
        } else {
            Err(AppendError::WrongVersion {
                stream: a.stream.clone(),
                expected: a.expected,
                current,
            })
        }));
    }
    tx.commit().await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_trace::{SpanContext, SpanId, TraceId};

    #[test]
    fn an_event_takes_the_trace_it_was_appended_in_unless_it_names_one() {
        let span = SpanContext {
            trace_id: TraceId([0xab; 16]),
            span_id: SpanId([0xcd; 8]),
            sampled: true,
        };
        let stamped = with_trace(None, Some(span)).unwrap();
        assert_eq!(stamped["traceparent"], span.traceparent());
        let mine = json!({"traceparent": "00-11111111111111111111111111111111-2222222222222222-01", "k": 1});
        assert_eq!(with_trace(Some(mine.clone()), Some(span)), Some(mine));
        let kept = with_trace(Some(json!({"k": 1})), Some(span)).unwrap();
        assert_eq!(
            (kept["k"].clone(), kept["traceparent"].clone()),
            (json!(1), json!(span.traceparent()))
        );
        assert_eq!(
            with_trace(Some(json!("text")), Some(span)),
            Some(json!("text"))
        );
        assert_eq!(with_trace(None, None), None);
    }
}
