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
pub mod outbox;
pub mod store;

use std::path::Path;
use std::sync::Arc;

use tessera_core::Authorize;
use tokio_util::sync::CancellationToken;

pub use store::{Appended, Event, Expected, NewEvent, StoreError};

/// An open event store.
#[derive(Clone)]
pub struct EventStore {
    store: store::Store,
    stop: CancellationToken,
}

impl EventStore {
    /// Opens (or creates) `dir/events.db`.
    pub async fn open(dir: &Path) -> Result<EventStore, StoreError> {
        Ok(EventStore {
            store: store::Store::open(dir).await?,
            stop: CancellationToken::new(),
        })
    }

    pub fn router(&self, auth: Arc<dyn Authorize>) -> axum::Router {
        api::router(self.store.clone(), auth, self.stop.clone())
    }

    /// Ends every live subscription (so a graceful shutdown does not wait on them).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}
