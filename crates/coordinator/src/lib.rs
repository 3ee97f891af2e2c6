//! The Tessera coordinator: sagas (ordered steps, each an HTTP call with a compensation)
//! run at least once per step with an `Idempotency-Key`, compensated last-first on
//! failure, and durable across crashes: every transition is committed (SQLite by default,
//! PostgreSQL when scaled out) before the next call, and `resume` picks up whatever a
//! crash interrupted. Mounted on `tessera server` (`POST /v1/sagas`).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tessera_coordinator::{AllowAll, Coordinator};
//! let coordinator = Coordinator::open_sqlite(std::path::Path::new("data"), None).await?;
//! coordinator.resume().await?;
//! let app = coordinator.router(Arc::new(AllowAll));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

mod api;
mod call;
pub mod def;
mod engine;
pub mod saga;
mod store;
pub mod tcc;

use std::path::Path;
use std::sync::Arc;

pub use api::{AllowAll, Authorize};
pub use call::Resolve;
pub use def::{CallDef, RetryDef, SagaDef, StepDef};
pub use saga::{Saga, SagaStatus, StepStatus};
pub use store::StoreError;

use engine::Engine;
use store::Database;

/// A running coordinator: its store and its sagas in flight.
#[derive(Clone)]
pub struct Coordinator {
    engine: Arc<Engine>,
    tcc: Arc<tcc::TccEngine>,
}

impl Coordinator {
    /// Stores sagas in `dir/coordinator.db`.
    pub async fn open_sqlite(
        dir: &Path,
        resolver: Option<Arc<dyn Resolve>>,
    ) -> Result<Coordinator, StoreError> {
        Self::open(Database::open_sqlite(dir).await?, resolver).await
    }

    /// Stores sagas in PostgreSQL (`postgres://...`).
    pub async fn open_postgres(
        url: &str,
        resolver: Option<Arc<dyn Resolve>>,
    ) -> Result<Coordinator, StoreError> {
        Self::open(Database::open_postgres(url).await?, resolver).await
    }

    async fn open(
        db: Database,
        resolver: Option<Arc<dyn Resolve>>,
    ) -> Result<Coordinator, StoreError> {
        let sagas = db.table("sagas", &["running", "compensating"]).await?;
        let tcc = db
            .table("tcc", &["trying", "confirming", "cancelling"])
            .await?;
        let caller = call::Caller::new(resolver);
        Ok(Coordinator {
            engine: Engine::new(sagas, caller.clone()),
            tcc: tcc::TccEngine::new(tcc, caller),
        })
    }

    /// Restarts every saga and TCC transaction that was in flight when the process
    /// stopped; returns how many.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        Ok(self.engine.resume().await? + self.tcc.resume().await?)
    }

    pub fn router(&self, auth: Arc<dyn Authorize>) -> axum::Router {
        api::router(self.engine.clone(), self.tcc.clone(), auth)
    }
}
