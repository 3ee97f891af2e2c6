//! Where sagas and TCC transactions live: one row per record (its state as JSON) in a
//! table per kind, in SQLite (the default, a file in the data dir) or PostgreSQL. Writes
//! to every table go through one writer task that commits whatever has queued up in a
//! single transaction — group commit — so a thousand transactions in flight cost one
//! fsync per batch instead of one per transition, and nothing is acknowledged before it
//! is durable.
//!
//! Every unfinished record is owned by one server at a time, through a lease with a
//! fencing token (`owner`, `lease_until`, `fence` columns), so N servers can share one
//! PostgreSQL:
//! - the server that inserts a record owns it (fence 1);
//! - an owner renews all its leases in one statement per table;
//! - a record whose lease ran out is claimed by any server with `FOR UPDATE SKIP LOCKED`,
//!   which bumps its fence in the same statement;
//! - every transition is `UPDATE … WHERE id = ? AND fence = ?`: a stale owner's write
//!   changes no row, and it stops.
//!
//! Lease times are the database's clock, so servers' clocks need not agree.

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;
/// Most records one claim takes over.
const CLAIM_BATCH: i64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored record {id} is unreadable: {source}")]
    Corrupt {
        id: String,
        source: serde_json::Error,
    },
    #[error("the store's writer has stopped")]
    Closed,
    /// The write was not committed; nothing of it was kept.
    #[error("commit failed: {0}")]
    NotKept(tessera_sql::Refused),
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

/// What a table row is made of.
pub trait Record: Serialize + DeserializeOwned + Send + 'static {
    fn id(&self) -> &str;
    fn idempotency_key(&self) -> Option<&str>;
    fn name(&self) -> &str;
    fn status(&self) -> &'static str;
    fn created_ms(&self) -> u64;
    fn updated_ms(&self) -> u64;
}

/// `Record` for a struct with the fields every coordinator record has: `id`,
/// `idempotency_key`, `name`, `status` (with `as_str`), `created_ms`, `updated_ms`.
macro_rules! record {
    ($t:ty) => {
        impl $crate::store::Record for $t {
            fn id(&self) -> &str {
                &self.id
            }
            fn idempotency_key(&self) -> Option<&str> {
                self.idempotency_key.as_deref()
            }
            fn name(&self) -> &str {
                &self.name
            }
            fn status(&self) -> &'static str {
                self.status.as_str()
            }
            fn created_ms(&self) -> u64 {
                self.created_ms
            }
            fn updated_ms(&self) -> u64 {
                self.updated_ms
            }
        }
    };
}
pub(crate) use record;

#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The columns of a row, ready to bind, and the fence its write is made under.
struct Row {
    id: String,
    idempotency_key: Option<String>,
    name: String,
    status: &'static str,
    state: String,
    created_ms: i64,
    updated_ms: i64,
    fence: i64,
}

impl Row {
    fn of<R: Record>(r: &R, fence: i64) -> Row {
        Row {
            fence,
            id: r.id().to_owned(),
            idempotency_key: r.idempotency_key().map(str::to_owned),
            name: r.name().to_owned(),
            status: r.status(),
            // Records are plain data with string keys: serializing cannot fail.
            state: serde_json::to_string(r).unwrap_or_default(),
            created_ms: r.created_ms() as i64,
            updated_ms: r.updated_ms() as i64,
        }
    }
}

/// One write, queued for the next group commit, with its table's statements.
enum Op {
    /// Inserts (owned by `Owner`) unless a row with the same idempotency key exists;
    /// answers whether it inserted.
    Insert(Arc<Sql>, Row, Arc<Owner>),
    /// Answers whether the fence still held.
    Update(Arc<Sql>, Row),
}

impl Op {
    fn table(&self) -> &Arc<Sql> {
        match self {
            Op::Insert(t, ..) | Op::Update(t, _) => t,
        }
    }

    fn row(&self) -> &Row {
        match self {
            Op::Insert(_, r, _) | Op::Update(_, r) => r,
        }
    }
}

/// Who this server is to the tables, and how long its leases last.
pub struct Owner {
    pub name: String,
    pub lease: Duration,
}

impl Owner {
    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }
}

type Reply = oneshot::Sender<Result<bool, tessera_sql::Refused>>;

/// A listing row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub id: String,
    pub name: String,
    pub status: String,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// What the writer has done, for the metrics: how well group commit groups (writes per
/// commit) and how much of its time the one writer spends committing.
#[derive(Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub writes: AtomicU64,
    /// Time each transaction took.
    pub commit: tessera_metrics::Histogram,
}

/// An open database and its writer.
#[derive(Clone)]
pub struct Database {
    db: Db,
    writes: mpsc::Sender<(Op, Reply)>,
    stats: Arc<WriterStats>,
}

impl Database {
    /// SQLite in `dir/coordinator.db`, fsynced at every commit (WAL, synchronous=FULL).
    pub async fn open_sqlite(dir: &Path) -> Result<Database, StoreError> {
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
        Ok(Self::start(Db::Sqlite(pool)))
    }

    /// PostgreSQL at `url` (`postgres://user@host/db`).
    pub async fn open_postgres(url: &str) -> Result<Database, StoreError> {
        let pool = PgPoolOptions::new().max_connections(4).connect(url).await?;
        Ok(Self::start(Db::Postgres(pool)))
    }

    fn start(db: Db) -> Database {
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(WriterStats::default());
        tokio::spawn(writer(db.clone(), rx, stats.clone()));
        Database {
            db,
            writes: tx,
            stats,
        }
    }

    /// Whether several servers may share this database (PostgreSQL), so that records
    /// owned elsewhere must wait for their lease to run out before being claimed.
    pub fn shared(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// Wakes `wake` on every NOTIFY on the coordinator's channel (another server released
    /// its leases), reconnecting as needed; nothing on SQLite. `ready` is answered once
    /// the first LISTEN is in place.
    pub async fn listen(&self, wake: Arc<tokio::sync::Notify>, ready: oneshot::Sender<()>) {
        let Db::Postgres(pool) = &self.db else {
            let _ = ready.send(());
            return;
        };
        let mut ready = Some(ready);
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
                l.listen(CHANNEL).await?;
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                loop {
                    l.recv().await?;
                    wake.notify_one();
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            if let Err(e) = listener.await {
                tracing::debug!(error = %e, "coordinator LISTEN ended; polling until it is back");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Tells the other servers that records are free to claim.
    pub async fn notify(&self) {
        if let Db::Postgres(p) = &self.db
            && let Err(e) = sqlx::query(AssertSqlSafe(format!("NOTIFY {CHANNEL}")))
                .execute(p)
                .await
        {
            tracing::debug!(error = %e, "cannot NOTIFY the other coordinators");
        }
    }

    /// The table `name` (created if missing) holding records of type `R`; `unfinished`
    /// are the statuses a crash can interrupt, whose records are leased to `owner`.
    pub async fn table<R: Record>(
        &self,
        name: &'static str,
        unfinished: &[&str],
        owner: Arc<Owner>,
    ) -> Result<Store<R>, StoreError> {
        let pg = self.shared();
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {name} (
                id TEXT PRIMARY KEY,
                idempotency_key TEXT UNIQUE,
                name TEXT NOT NULL,
                status TEXT NOT NULL,
                state TEXT NOT NULL,
                created_ms BIGINT NOT NULL,
                updated_ms BIGINT NOT NULL
            )"
        );
        let mut stmts = vec![create];
        // Tables made before ownership existed get its columns.
        for (col, ty) in [
            ("owner", "TEXT"),
            ("fence", "BIGINT NOT NULL DEFAULT 0"),
            ("lease_until", "BIGINT NOT NULL DEFAULT 0"),
        ] {
            if pg {
                stmts.push(format!(
                    "ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {col} {ty}"
                ));
            } else if !self.sqlite_has_column(name, col).await? {
                stmts.push(format!("ALTER TABLE {name} ADD COLUMN {col} {ty}"));
            }
        }
        stmts.push(format!(
            "CREATE INDEX IF NOT EXISTS {name}_by_status ON {name} (status, created_ms)"
        ));
        stmts.push(format!(
            "CREATE INDEX IF NOT EXISTS {name}_by_lease ON {name} (status, lease_until)"
        ));
        match &self.db {
            Db::Sqlite(p) => {
                for stmt in stmts {
                    sqlx::query(AssertSqlSafe(stmt)).execute(p).await?;
                }
            }
            Db::Postgres(p) => {
                // Servers starting together on a new database would race in CREATE ...
                // IF NOT EXISTS (PostgreSQL then fails one with a duplicate key in its
                // catalog): one at a time, under a transaction-scoped advisory lock.
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tessera_coordinator_schema'))")
                    .execute(&mut *tx)
                    .await?;
                for stmt in stmts {
                    sqlx::query(AssertSqlSafe(stmt)).execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
        }
        // Placeholders: `?n` for SQLite, `$n` for PostgreSQL; the database's clock in ms.
        let ph = |n: usize| -> String { if pg { format!("${n}") } else { format!("?{n}") } };
        let now = if pg {
            "(extract(epoch from clock_timestamp()) * 1000)::BIGINT"
        } else {
            "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
        };
        let statuses = unfinished
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = Sql {
            // On PostgreSQL each statement is a round trip, so the writer sends a batch's
            // inserts (and its transitions) as one statement over arrays, and learns from
            // RETURNING which rows it wrote; SQLite is in-process and takes them one by one.
            insert: if pg {
                format!(
                    "INSERT INTO {name} (id, idempotency_key, name, status, state, created_ms, updated_ms,
                                         owner, fence, lease_until)
                     SELECT id, key, name, status, state, created, updated, owner, 1, {now} + lease
                     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                                 $6::BIGINT[], $7::BIGINT[], $8::TEXT[], $9::BIGINT[])
                          AS v(id, key, name, status, state, created, updated, owner, lease)
                     ON CONFLICT DO NOTHING RETURNING id"
                )
            } else {
                format!(
                    "INSERT INTO {name} (id, idempotency_key, name, status, state, created_ms, updated_ms,
                                         owner, fence, lease_until)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, {now} + ?9) ON CONFLICT DO NOTHING"
                )
            }
            .into(),
            update: if pg {
                format!(
                    "UPDATE {name} AS t SET status = v.status, state = v.state, updated_ms = v.updated
                     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::BIGINT[])
                          AS v(status, state, updated, id, fence)
                     WHERE t.id = v.id AND t.fence = v.fence RETURNING t.id"
                )
            } else {
                format!(
                    "UPDATE {name} SET status = ?1, state = ?2, updated_ms = ?3 WHERE id = ?4 AND fence = ?5"
                )
            }
            .into(),
            claim: format!(
                "UPDATE {name} SET owner = {p1}, fence = fence + 1, lease_until = {now} + {p2}
                 WHERE id IN (SELECT id FROM {name}
                              WHERE status IN ({statuses}) AND (lease_until < {now} OR {at_start})
                              ORDER BY created_ms LIMIT {p4}{skip})
                 RETURNING id, state, fence",
                p1 = ph(1), p2 = ph(2), p4 = ph(4),
                // At start a server takes back its own records; on SQLite, the only
                // server of its file, every record.
                at_start = if pg { "owner = $3" } else { "?3 IS NOT NULL" },
                skip = if pg { " FOR UPDATE SKIP LOCKED" } else { "" },
            )
            .into(),
            renew: format!(
                "UPDATE {name} SET lease_until = {now} + {} WHERE owner = {} AND status IN ({statuses})",
                ph(1), ph(2)
            )
            .into(),
            release: format!(
                "UPDATE {name} SET lease_until = 0 WHERE owner = {} AND status IN ({statuses})",
                ph(1)
            )
            .into(),
            get: format!("SELECT id, state FROM {name} WHERE id = {}", ph(1)).into(),
            by_key: format!("SELECT id, state FROM {name} WHERE idempotency_key = {}", ph(1))
                .into(),
            list: if pg {
                format!(
                    "SELECT id, name, status, created_ms, updated_ms FROM {name}
                     WHERE ($1::TEXT IS NULL OR status = $1) ORDER BY created_ms DESC LIMIT $2"
                )
            } else {
                format!(
                    "SELECT id, name, status, created_ms, updated_ms FROM {name}
                     WHERE (?1 IS NULL OR status = ?1) ORDER BY created_ms DESC LIMIT ?2"
                )
            }
            .into(),
            counts: format!("SELECT status, COUNT(*) FROM {name} GROUP BY status").into(),
        };
        Ok(Store {
            db: self.db.clone(),
            writes: self.writes.clone(),
            sql: Arc::new(sql),
            owner,
            stats: self.stats.clone(),
            record: PhantomData,
        })
    }

    async fn sqlite_has_column(&self, table: &str, col: &str) -> Result<bool, StoreError> {
        let Db::Sqlite(p) = &self.db else {
            return Ok(true);
        };
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = '{col}'"
        )))
        .fetch_one(p)
        .await?;
        Ok(n > 0)
    }
}

/// The channel a server NOTIFYs when it lets its records go.
const CHANNEL: &str = "tessera_coordinator";

/// A table's statements, built once.
struct Sql {
    insert: Arc<str>,
    update: Arc<str>,
    get: Arc<str>,
    by_key: Arc<str>,
    list: Arc<str>,
    claim: Arc<str>,
    renew: Arc<str>,
    release: Arc<str>,
    counts: Arc<str>,
}

/// One table of records.
pub struct Store<R> {
    db: Db,
    writes: mpsc::Sender<(Op, Reply)>,
    sql: Arc<Sql>,
    owner: Arc<Owner>,
    stats: Arc<WriterStats>,
    record: PhantomData<fn() -> R>,
}

impl<R> Clone for Store<R> {
    fn clone(&self) -> Self {
        Store {
            db: self.db.clone(),
            writes: self.writes.clone(),
            sql: self.sql.clone(),
            owner: self.owner.clone(),
            stats: self.stats.clone(),
            record: PhantomData,
        }
    }
}

fn q(s: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(s.clone())
}

impl<R: Record> Store<R> {
    /// The writer's counters (shared by every table of the database).
    pub fn writer_stats(&self) -> &WriterStats {
        &self.stats
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
            .map_err(StoreError::NotKept)
    }

    /// Stores a new record, owned by this server under fence 1; `false` if one with its
    /// idempotency key already exists.
    pub async fn insert(&self, r: &R) -> Result<bool, StoreError> {
        self.write(Op::Insert(
            self.sql.clone(),
            Row::of(r, 1),
            self.owner.clone(),
        ))
        .await
    }

    /// Stores a record's new state under `fence`; returns once it is durable, `false`
    /// when another server has claimed the record since (nothing was written).
    pub async fn update(&self, r: &R, fence: i64) -> Result<bool, StoreError> {
        self.write(Op::Update(self.sql.clone(), Row::of(r, fence)))
            .await
    }

    /// Takes over records until none is left to take: at start (`at_start`) first every
    /// one this server owned before it restarted, then, a batch at a time, those whose
    /// lease ran out; `run` gets each with its new fence. Returns how many.
    pub async fn claim_all(
        &self,
        at_start: bool,
        mut run: impl FnMut(R, i64),
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut mine = at_start;
        loop {
            let batch = self.claim(mine).await?;
            let was_mine = std::mem::replace(&mut mine, false);
            if batch.is_empty() && !was_mine {
                return Ok(n);
            }
            n += batch.len();
            for (r, fence) in batch {
                run(r, fence);
            }
        }
    }

    /// Takes over unfinished records whose lease ran out (and, with `mine`, at start,
    /// those this server owned before it restarted), oldest first, at most a batch: each
    /// with its new fence.
    async fn claim(&self, mine: bool) -> Result<Vec<(R, i64)>, StoreError> {
        let sql = q(&self.sql.claim);
        let own = mine.then_some(self.owner.name.as_str());
        let (name, lease) = (self.owner.name.as_str(), self.owner.lease_ms());
        // This server's own come back all at once (they stay its own, so paging by
        // the same condition would take them again); expired ones a batch at a time.
        let limit = if mine { i64::MAX } else { CLAIM_BATCH };
        let rows: Vec<(String, String, i64)> = match &self.db {
            Db::Sqlite(p) => {
                sqlx::query_as(sql)
                    .bind(name)
                    .bind(lease)
                    .bind(own)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
            }
            Db::Postgres(p) => {
                sqlx::query_as(sql)
                    .bind(name)
                    .bind(lease)
                    .bind(own)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
            }
        };
        rows.into_iter()
            .map(|(id, state, fence)| decode(id, &state).map(|r| (r, fence)))
            .collect()
    }

    /// Extends the lease of every unfinished record this server owns.
    pub async fn renew(&self) -> Result<u64, StoreError> {
        let sql = q(&self.sql.renew);
        let (name, lease) = (self.owner.name.as_str(), self.owner.lease_ms());
        Ok(match &self.db {
            Db::Sqlite(p) => sqlx::query(sql)
                .bind(lease)
                .bind(name)
                .execute(p)
                .await?
                .rows_affected(),
            Db::Postgres(p) => sqlx::query(sql)
                .bind(lease)
                .bind(name)
                .execute(p)
                .await?
                .rows_affected(),
        })
    }

    /// Ends the lease of every unfinished record this server owns (it is stopping), so
    /// others claim them at once.
    pub async fn release(&self) -> Result<u64, StoreError> {
        let sql = q(&self.sql.release);
        let name = self.owner.name.as_str();
        Ok(match &self.db {
            Db::Sqlite(p) => sqlx::query(sql)
                .bind(name)
                .execute(p)
                .await?
                .rows_affected(),
            Db::Postgres(p) => sqlx::query(sql)
                .bind(name)
                .execute(p)
                .await?
                .rows_affected(),
        })
    }

    pub async fn get(&self, id: &str) -> Result<Option<R>, StoreError> {
        self.one(&self.sql.get, id).await
    }

    pub async fn by_idempotency_key(&self, key: &str) -> Result<Option<R>, StoreError> {
        self.one(&self.sql.by_key, key).await
    }

    async fn one(&self, sql: &Arc<str>, arg: &str) -> Result<Option<R>, StoreError> {
        let row: Option<(String, String)> = match &self.db {
            Db::Sqlite(p) => sqlx::query_as(q(sql)).bind(arg).fetch_optional(p).await?,
            Db::Postgres(p) => sqlx::query_as(q(sql)).bind(arg).fetch_optional(p).await?,
        };
        row.map(|(id, state)| decode(id, &state)).transpose()
    }

    /// Newest first, optionally only those in `status`.
    pub async fn list(&self, status: Option<&str>, limit: u32) -> Result<Vec<Summary>, StoreError> {
        type Cols = (String, String, String, i64, i64);
        let sql = q(&self.sql.list);
        let rows: Vec<Cols> = match &self.db {
            Db::Sqlite(p) => {
                sqlx::query_as(sql)
                    .bind(status)
                    .bind(i64::from(limit))
                    .fetch_all(p)
                    .await?
            }
            Db::Postgres(p) => {
                sqlx::query_as(sql)
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

    /// How many records are in each status.
    pub async fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let sql = q(&self.sql.counts);
        Ok(match &self.db {
            Db::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await?,
            Db::Postgres(p) => sqlx::query_as(sql).fetch_all(p).await?,
        })
    }
}

fn decode<R: Record>(id: String, state: &str) -> Result<R, StoreError> {
    serde_json::from_str(state).map_err(|source| StoreError::Corrupt { id, source })
}

/// The group-commit loop: takes everything queued, commits it in one transaction, then
/// answers each writer.
async fn writer(db: Db, mut rx: mpsc::Receiver<(Op, Reply)>, stats: Arc<WriterStats>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let results = commit(&db, &batch).await;
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.commit.observe(started.elapsed());
        match results {
            Ok(results) => {
                for ((_, reply), r) in batch.drain(..).zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) => {
                let refused = tessera_sql::Refused::of(&e);
                // A full disk is the operator's to fix, and every writer is told; not a bug.
                if refused.full {
                    tracing::warn!(error = %e, writes = batch.len(), "coordinator store commit refused: disk full");
                } else {
                    tracing::error!(error = %e, writes = batch.len(), "coordinator store commit failed");
                }
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(refused.clone()));
                }
            }
        }
    }
}

/// Commits a batch in one transaction; per write, whether it changed its row.
async fn commit(db: &Db, batch: &[(Op, Reply)]) -> Result<Vec<bool>, sqlx::Error> {
    match db {
        Db::Sqlite(p) => commit_sqlite(p, batch).await,
        Db::Postgres(p) => commit_postgres(p, batch).await,
    }
}

/// SQLite runs in-process: one statement per write costs no round trip.
async fn commit_sqlite(p: &SqlitePool, batch: &[(Op, Reply)]) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = p.begin().await?;
    let mut out = Vec::with_capacity(batch.len());
    for (op, _) in batch {
        let done = match op {
            Op::Insert(sql, r, owner) => sqlx::query(q(&sql.insert))
                .bind(&r.id)
                .bind(&r.idempotency_key)
                .bind(&r.name)
                .bind(r.status)
                .bind(&r.state)
                .bind(r.created_ms)
                .bind(r.updated_ms)
                .bind(&owner.name)
                .bind(owner.lease_ms())
                .execute(&mut *tx)
                .await?
                .rows_affected(),
            Op::Update(sql, r) => sqlx::query(q(&sql.update))
                .bind(r.status)
                .bind(&r.state)
                .bind(r.updated_ms)
                .bind(&r.id)
                .bind(r.fence)
                .execute(&mut *tx)
                .await?
                .rows_affected(),
        };
        out.push(done == 1);
    }
    tx.commit().await?;
    Ok(out)
}

/// PostgreSQL: the batch goes as one multi-row statement per table and kind, each
/// answering with the ids it wrote. A statement may hold each record once (an UPDATE
/// joined to two rows for one record would apply one of them), so a record written
/// twice in a batch starts a new round of statements, which keeps its writes in order.
async fn commit_postgres(p: &PgPool, batch: &[(Op, Reply)]) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = p.begin().await?;
    let mut out = vec![false; batch.len()];
    let mut start = 0;
    while start < batch.len() {
        let mut ids = std::collections::HashSet::new();
        let end = start
            + batch[start..]
                .iter()
                .take_while(|(op, _)| ids.insert(op.row().id.as_str()))
                .count();
        let round = start..end;
        let mut tables: Vec<&Arc<Sql>> = Vec::new();
        for (op, _) in &batch[round.clone()] {
            if !tables.iter().any(|t| Arc::ptr_eq(t, op.table())) {
                tables.push(op.table());
            }
        }
        for table in tables {
            let (mut inserts, mut updates) = (Vec::new(), Vec::new());
            for i in round.clone() {
                match &batch[i].0 {
                    Op::Insert(t, r, o) if Arc::ptr_eq(t, table) => inserts.push((i, r, &**o)),
                    Op::Update(t, r) if Arc::ptr_eq(t, table) => updates.push((i, r)),
                    _ => {}
                }
            }
            if !inserts.is_empty() {
                let written: Vec<String> = sqlx::query_scalar(q(&table.insert))
                    .bind(
                        inserts
                            .iter()
                            .map(|(_, r, _)| r.id.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        inserts
                            .iter()
                            .map(|(_, r, _)| r.idempotency_key.as_deref())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        inserts
                            .iter()
                            .map(|(_, r, _)| r.name.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(inserts.iter().map(|(_, r, _)| r.status).collect::<Vec<_>>())
                    .bind(
                        inserts
                            .iter()
                            .map(|(_, r, _)| r.state.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        inserts
                            .iter()
                            .map(|(_, r, _)| r.created_ms)
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        inserts
                            .iter()
                            .map(|(_, r, _)| r.updated_ms)
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        inserts
                            .iter()
                            .map(|(_, _, o)| o.name.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        inserts
                            .iter()
                            .map(|(_, _, o)| o.lease_ms())
                            .collect::<Vec<_>>(),
                    )
                    .fetch_all(&mut *tx)
                    .await?;
                mark(&mut out, inserts.iter().map(|(i, r, _)| (*i, *r)), &written);
            }
            if !updates.is_empty() {
                let written: Vec<String> = sqlx::query_scalar(q(&table.update))
                    .bind(updates.iter().map(|(_, r)| r.status).collect::<Vec<_>>())
                    .bind(
                        updates
                            .iter()
                            .map(|(_, r)| r.state.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        updates
                            .iter()
                            .map(|(_, r)| r.updated_ms)
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        updates
                            .iter()
                            .map(|(_, r)| r.id.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(updates.iter().map(|(_, r)| r.fence).collect::<Vec<_>>())
                    .fetch_all(&mut *tx)
                    .await?;
                mark(&mut out, updates.iter().map(|(i, r)| (*i, *r)), &written);
            }
        }
        start = end;
    }
    tx.commit().await?;
    Ok(out)
}

/// Marks as done each write whose record is among the ids a statement returned.
fn mark<'a>(out: &mut [bool], writes: impl Iterator<Item = (usize, &'a Row)>, written: &[String]) {
    let written: std::collections::HashSet<&str> = written.iter().map(String::as_str).collect();
    for (i, r) in writes {
        out[i] = written.contains(r.id.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Rec {
        id: String,
        idempotency_key: Option<String>,
        name: String,
        status: St,
        created_ms: u64,
        updated_ms: u64,
    }

    #[derive(serde::Serialize, serde::Deserialize, Clone, Copy)]
    enum St {
        Open,
        Done,
    }

    impl St {
        fn as_str(self) -> &'static str {
            match self {
                St::Open => "open",
                St::Done => "done",
            }
        }
    }

    record!(Rec);

    fn rec(id: &str, key: Option<&str>, name: &str, status: St) -> Rec {
        Rec {
            id: id.into(),
            idempotency_key: key.map(Into::into),
            name: name.into(),
            status,
            created_ms: 1,
            updated_ms: 2,
        }
    }

    /// One batch exactly as the writer would take it off its queue.
    async fn commit_batch(
        db: &Database,
        table: &Store<Rec>,
        ops: Vec<(bool, Rec, i64)>,
    ) -> Vec<bool> {
        let batch: Vec<(Op, Reply)> = ops
            .into_iter()
            .map(|(insert, r, fence)| {
                let op = if insert {
                    Op::Insert(table.sql.clone(), Row::of(&r, 1), table.owner.clone())
                } else {
                    Op::Update(table.sql.clone(), Row::of(&r, fence))
                };
                (op, oneshot::channel().0)
            })
            .collect();
        commit(&db.db, &batch).await.unwrap()
    }

    /// Both stores give each write of a batch its own verdict: a duplicate idempotency
    /// key and a stale fence fail alone, and a record written twice in one batch ends
    /// with the later write.
    async fn each_write_of_a_batch_keeps_its_own_verdict(db: Database) {
        let owner = Arc::new(Owner {
            name: "me".into(),
            lease: Duration::from_secs(10),
        });
        let t: Store<Rec> = db.table("recs", &["open"], owner).await.unwrap();
        let first = commit_batch(
            &db,
            &t,
            vec![
                (true, rec("a", Some("k"), "a0", St::Open), 1),
                (true, rec("b", Some("k"), "b0", St::Open), 1),
                (true, rec("c", None, "c0", St::Open), 1),
            ],
        )
        .await;
        assert_eq!(first, [true, false, true]);
        let second = commit_batch(
            &db,
            &t,
            vec![
                (false, rec("a", Some("k"), "a1", St::Open), 1),
                (false, rec("c", None, "c1", St::Done), 2),
                (true, rec("d", None, "d0", St::Open), 1),
                (false, rec("a", Some("k"), "a2", St::Done), 1),
                (false, rec("b", Some("k"), "b1", St::Done), 1),
                (false, rec("c", None, "c2", St::Done), 1),
            ],
        )
        .await;
        assert_eq!(second, [true, false, true, true, false, true]);
        let name = |r: Option<Rec>| r.map(|r| (r.name, r.status.as_str()));
        assert_eq!(name(t.get("a").await.unwrap()), Some(("a2".into(), "done")));
        assert_eq!(name(t.get("c").await.unwrap()), Some(("c2".into(), "done")));
        assert_eq!(name(t.get("d").await.unwrap()), Some(("d0".into(), "open")));
        assert!(t.get("b").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn each_write_of_a_batch_keeps_its_own_verdict_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open_sqlite(dir.path()).await.unwrap();
        each_write_of_a_batch_keeps_its_own_verdict(db).await;
    }

    #[tokio::test]
    async fn each_write_of_a_batch_keeps_its_own_verdict_on_postgres() {
        let Some(pg) = tessera_testkit::PgDatabase::create_or_skip() else {
            return;
        };
        let db = Database::open_postgres(&pg.url).await.unwrap();
        each_write_of_a_batch_keeps_its_own_verdict(db).await;
    }
}
