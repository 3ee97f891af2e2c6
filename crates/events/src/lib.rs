//! The Tessera event store, embedded in `tessera server`: streams with optimistic
//! concurrency (`expected_version`, 409 on mismatch) and idempotent appends (an event id is
//! stored once), forward reads, catch-up-then-live subscriptions over server-sent events
//! with resume by `Last-Event-ID`, category feeds (`order-*`) in global commit order, and
//! durable consumer-group offsets. Stored in SQLite in the data dir, every append fsynced
//! before it is acknowledged.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let events = tessera_events::EventStore::open(std::path::Path::new("data")).await?;
//! let app = events.router(Arc::new(tessera_core::AllowAll));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

mod api;
mod metrics;
mod nats;
pub mod outbox;
pub mod store;

use std::path::Path;
use std::sync::Arc;

use tessera_core::Authorize;
use tokio_util::sync::CancellationToken;

pub use store::{Appended, Event, Expected, NewEvent, StoreError};

/// Where events are kept.
#[derive(Clone)]
pub(crate) enum Backend {
    Sqlite(store::Store),
    Nats(Box<nats::NatsStore>),
}

impl Backend {
    pub(crate) async fn append(
        &self,
        stream: String,
        expected: Expected,
        events: Vec<NewEvent>,
    ) -> Result<Appended, store::AppendError> {
        match self {
            Backend::Sqlite(s) => s.append(stream, expected, events).await,
            Backend::Nats(s) => s.append(stream, expected, events).await,
        }
    }

    pub(crate) async fn read(
        &self,
        sel: &store::Selection,
        from: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        match self {
            Backend::Sqlite(s) => s.read(sel, from, limit).await,
            Backend::Nats(s) => s.read(sel, from, limit).await,
        }
    }

    pub(crate) fn head(&self) -> tokio::sync::watch::Receiver<i64> {
        match self {
            Backend::Sqlite(s) => s.head(),
            Backend::Nats(s) => s.head(),
        }
    }

    pub(crate) async fn acked(&self, group: &str, sel: &str) -> Result<Option<i64>, StoreError> {
        match self {
            Backend::Sqlite(s) => s.acked(group, sel).await,
            Backend::Nats(s) => s.acked(group, sel).await,
        }
    }

    pub(crate) async fn ack(&self, group: &str, sel: &str, offset: i64) -> Result<i64, StoreError> {
        match self {
            Backend::Sqlite(s) => s.ack(group, sel, offset).await,
            Backend::Nats(s) => s.ack(group, sel, offset).await,
        }
    }
}

/// An open event store.
#[derive(Clone)]
pub struct EventStore {
    store: Backend,
    stop: CancellationToken,
    metrics: Arc<metrics::Metrics>,
}

impl EventStore {
    /// Opens (or creates) `dir/events.db`.
    pub async fn open(dir: &Path) -> Result<EventStore, StoreError> {
        Ok(EventStore {
            store: Backend::Sqlite(store::Store::open(dir).await?),
            stop: CancellationToken::new(),
            metrics: Arc::default(),
        })
    }

    /// Keeps events in NATS JetStream at `url` (`nats://127.0.0.1:4222`), in streams
    /// named after `namespace` (`tessera` → `TESSERA_EVENTS`, subjects `tessera.ev.>`).
    pub async fn open_nats(url: &str, namespace: &str) -> Result<EventStore, StoreError> {
        Ok(EventStore {
            store: Backend::Nats(Box::new(nats::NatsStore::connect(url, namespace).await?)),
            stop: CancellationToken::new(),
            metrics: Arc::default(),
        })
    }

    pub fn router(&self, auth: Arc<dyn Authorize>) -> axum::Router {
        api::router(
            self.store.clone(),
            auth,
            self.stop.clone(),
            self.metrics.clone(),
        )
    }

    /// The event store's part of the server's `/metrics`; counting a consumer group's
    /// lag reads the events it has not acknowledged (up to 10,000).
    pub async fn render_metrics(&self, out: &mut tessera_metrics::Text) -> Result<(), StoreError> {
        self.metrics.render(&self.store, out).await
    }

    /// Ends every live subscription (so a graceful shutdown does not wait on them).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}
