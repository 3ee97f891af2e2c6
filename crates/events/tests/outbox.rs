//! The outbox and inbox on real databases (a service's SQLite file; a schema of its own
//! on the machine's PostgreSQL), relayed over HTTP into a real event store: events
//! committed with a state change are published after a crash, never without their
//! change, in order, once; a redelivered event has one effect; and on PostgreSQL a
//! transaction that commits late is not skipped.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tessera_events::EventStore;
use tessera_events::outbox::{self, HttpPublisher, OutboxDb, OutboxEvent, Relay};

/// An event store on a loopback port; returns its base URL.
async fn event_store(dir: &std::path::Path) -> (String, EventStore, tokio::task::JoinHandle<()>) {
    let store = EventStore::open(dir).await.unwrap();
    let app = store.router(Arc::new(tessera_core::AllowAll));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), store, task)
}

async fn all_events(base: &str) -> Vec<Value> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::builder()
        .uri(format!("{base}/v1/streams/*?limit=1000"))
        .body(Default::default())
        .unwrap();
    use http_body_util::BodyExt;
    let body = client
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    serde_json::from_slice::<Value>(&body.to_bytes())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A service's own SQLite database file, with the outbox and inbox tables.
async fn sqlite(path: std::path::PathBuf) -> sqlx::SqlitePool {
    let pool = SqlitePoolOptions::new()
        .connect_with(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true),
        )
        .await
        .unwrap();
    outbox::migrate_sqlite(&pool).await.unwrap();
    pool
}

fn event(id: &str, stream: &str) -> OutboxEvent {
    OutboxEvent {
        stream: stream.into(),
        id: id.into(),
        kind: "OrderPlaced".into(),
        data: json!({"order": id}),
        metadata: None,
    }
}

#[tokio::test]
async fn committed_events_are_published_after_a_crash_and_take_effect_once() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _store, _task) = event_store(&dir.path().join("es")).await;
    let db = sqlite(dir.path().join("orders.db")).await;
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT)")
        .execute(&db)
        .await
        .unwrap();

    // The state change and its event commit together...
    let mut tx = db.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o1', 'placed')")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox::enqueue_sqlite(&mut tx, &event("evt-o1", "order-o1"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // ...or not at all.
    let mut tx = db.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o2', 'placed')")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox::enqueue_sqlite(&mut tx, &event("evt-o2", "order-o2"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // The service crashed before publishing: nothing is out yet. A relay started after
    // the restart publishes what was committed.
    assert!(all_events(&base).await.is_empty());
    let relay = Relay::new(
        OutboxDb::Sqlite(db.clone()),
        HttpPublisher::new(&base, None),
    );
    assert_eq!(relay.run_once().await.unwrap(), 1);
    assert_eq!(
        relay.run_once().await.unwrap(),
        0,
        "published rows are marked"
    );
    // A crash after publishing but before marking: published again, stored once.
    sqlx::query("UPDATE tessera_outbox SET published_ms = NULL")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(relay.run_once().await.unwrap(), 1);
    let events = all_events(&base).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], "evt-o1");

    // The consumer sees the event twice (redelivery); the inbox lets one effect through.
    let consumer = sqlite(dir.path().join("cart.db")).await;
    sqlx::query("CREATE TABLE effects (n INTEGER)")
        .execute(&consumer)
        .await
        .unwrap();
    for _ in 0..2 {
        let mut tx = consumer.begin().await.unwrap();
        if outbox::inbox_sqlite(&mut tx, "cart", events[0]["id"].as_str().unwrap())
            .await
            .unwrap()
        {
            sqlx::query("INSERT INTO effects VALUES (1)")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
        .fetch_one(&consumer)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn the_relay_keeps_order_waits_out_an_unreachable_store_and_moves_to_another() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path().join("svc.db")).await;
    for i in 0..5 {
        let mut tx = db.begin().await.unwrap();
        outbox::enqueue_sqlite(&mut tx, &event(&format!("e{i}"), "order-7"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    // No event store listening: the relay fails on the first event and marks nothing.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let relay = Relay::new(
        OutboxDb::Sqlite(db.clone()),
        HttpPublisher::new(format!("http://{dead}"), None),
    );
    let err = relay.run_once().await.unwrap_err();
    assert!(err.to_string().contains("e0"), "{err}");
    let (base, _store, _task) = event_store(&dir.path().join("es")).await;
    // Given the dead server and a live one (without a scheme, as `--registry` lists
    // them): the try that finds the first dead moves on, and the next publishes.
    let relay = Relay::new(
        OutboxDb::Sqlite(db.clone()),
        HttpPublisher::new(
            format!("{dead},{}", base.trim_start_matches("http://")),
            None,
        ),
    );
    assert!(relay.run_once().await.is_err());
    assert_eq!(relay.run_once().await.unwrap(), 5);
    let ids: Vec<String> = all_events(&base)
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4"]);
}

/// A schema of its own on the machine's PostgreSQL (required in CI).
async fn pg_schema() -> Option<(PgConnectOptions, String)> {
    let url = std::env::var("TESSERA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into());
    let mut admin = match sqlx::PgConnection::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var("CI").is_err(),
                "PostgreSQL at {url} is required in CI: {e}"
            );
            eprintln!("skipping: no PostgreSQL at {url} ({e})");
            return None;
        }
    };
    let schema = format!("outbox_{}", std::process::id());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let opts: PgConnectOptions = url.parse().unwrap();
    Some((opts.options([("search_path", schema.as_str())]), schema))
}

#[tokio::test]
async fn on_postgres_a_transaction_that_commits_late_is_not_skipped() {
    let Some((opts, schema)) = pg_schema().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (base, _store, _task) = event_store(dir.path()).await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .unwrap();
    outbox::migrate_postgres(&pool).await.unwrap();
    // T1 takes the lower seq but commits after T2.
    let mut t1 = pool.begin().await.unwrap();
    outbox::enqueue_postgres(&mut t1, &event("late", "order-1"))
        .await
        .unwrap();
    let mut t2 = pool.begin().await.unwrap();
    outbox::enqueue_postgres(&mut t2, &event("early", "order-2"))
        .await
        .unwrap();
    t2.commit().await.unwrap();
    let relay = Relay::new(
        OutboxDb::Postgres(pool.clone()),
        HttpPublisher::new(&base, None),
    );
    assert_eq!(relay.run_once().await.unwrap(), 1);
    t1.commit().await.unwrap();
    assert_eq!(
        relay.run_once().await.unwrap(),
        1,
        "the late commit is published too"
    );
    let mut ids: Vec<String> = all_events(&base)
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["early", "late"]);
    // The inbox on PostgreSQL: a second delivery is recognised.
    let mut tx = pool.begin().await.unwrap();
    assert!(
        outbox::inbox_postgres(&mut tx, "billing", "late")
            .await
            .unwrap()
    );
    assert!(
        !outbox::inbox_postgres(&mut tx, "billing", "late")
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_relay_publishes_straight_to_nats_jetstream() {
    const URL: &str = "nats://127.0.0.1:4222";
    if let Err(e) = async_nats::connect(URL).await {
        assert!(
            std::env::var("CI").is_err(),
            "NATS at {URL} is required in CI: {e}"
        );
        eprintln!("skipping: no NATS at {URL} ({e})");
        return;
    }
    let ns = format!("relay{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path().join("svc.db")).await;
    for i in 0..3 {
        let mut tx = db.begin().await.unwrap();
        outbox::enqueue_sqlite(&mut tx, &event(&format!("n{i}"), "order-3"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let publisher = outbox::NatsPublisher::connect(URL, &ns).await.unwrap();
    let relay = Relay::new(OutboxDb::Sqlite(db.clone()), publisher);
    assert_eq!(relay.run_once().await.unwrap(), 3);
    // A redelivery after a crash before marking is dropped as a repeat.
    sqlx::query("UPDATE tessera_outbox SET published_ms = NULL")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(relay.run_once().await.unwrap(), 3);
    // A server on the same namespace sees each event once, in order.
    let store = EventStore::open_nats(URL, &ns).await.unwrap();
    let app = store.router(Arc::new(tessera_core::AllowAll));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let ids: Vec<String> = all_events(&base)
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["n0", "n1", "n2"]);
    let js = async_nats::jetstream::new(async_nats::connect(URL).await.unwrap());
    let upper = ns.to_ascii_uppercase();
    let _ = js.delete_stream(format!("{upper}_EVENTS")).await;
    let _ = js.delete_stream(format!("{upper}_OFFSETS")).await;
}
