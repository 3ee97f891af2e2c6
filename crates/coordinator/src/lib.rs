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
mod lease;
mod metrics;
pub mod saga;
mod store;
pub mod tcc;
pub mod trace;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use api::{AllowAll, Authorize};
pub use call::Resolve;
pub use def::{CallDef, RetryDef, SagaDef, StepDef};
pub use saga::{Saga, SagaStatus, StepStatus};
pub use store::StoreError;

use engine::Engine;
use lease::Lease;
use store::{Database, Owner};

/// How this coordinator shares its database with others.
#[derive(Debug, Clone)]
pub struct Options {
    /// This server's name in the `owner` column: unique among the servers sharing a
    /// database, and the same across its restarts (it takes its own records back at
    /// once instead of waiting out their lease).
    pub owner: String,
    /// How long a server owns what it runs without renewing; a killed server's sagas
    /// are taken over within this.
    pub lease: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            owner: "coordinator".into(),
            lease: Duration::from_secs(10),
        }
    }
}

/// A running coordinator: its store and its sagas in flight.
#[derive(Clone)]
pub struct Coordinator {
    engine: Arc<Engine>,
    tcc: Arc<tcc::TccEngine>,
    db: Database,
    lease: Arc<Lease>,
    wake: Arc<tokio::sync::Notify>,
    started: Arc<AtomicBool>,
    /// Held by each round of renewing and claiming; `true` once the server has let its
    /// work go, after which it claims nothing (its own NOTIFY would wake it too).
    released: Arc<tokio::sync::Mutex<bool>>,
}

impl Coordinator {
    /// Stores sagas in `dir/coordinator.db`.
    pub async fn open_sqlite(
        dir: &Path,
        resolver: Option<Arc<dyn Resolve>>,
    ) -> Result<Coordinator, StoreError> {
        Self::open(
            Database::open_sqlite(dir).await?,
            resolver,
            Options::default(),
        )
        .await
    }

    /// Stores sagas in PostgreSQL (`postgres://...`), shared with the other servers
    /// given the same URL.
    pub async fn open_postgres(
        url: &str,
        resolver: Option<Arc<dyn Resolve>>,
        options: Options,
    ) -> Result<Coordinator, StoreError> {
        Self::open(Database::open_postgres(url).await?, resolver, options).await
    }

    async fn open(
        db: Database,
        resolver: Option<Arc<dyn Resolve>>,
        options: Options,
    ) -> Result<Coordinator, StoreError> {
        let lease = Arc::new(Lease::new(Owner {
            name: options.owner,
            lease: options.lease,
        }));
        let owner = lease.owner.clone();
        let sagas = db
            .table("sagas", &["running", "compensating"], owner.clone())
            .await?;
        let tcc = db
            .table("tcc", &["trying", "confirming", "cancelling"], owner)
            .await?;
        let caller = call::Caller::new(resolver);
        Ok(Coordinator {
            engine: Engine::new(sagas, caller.clone(), lease.clone()),
            tcc: tcc::TccEngine::new(tcc, caller, lease.clone()),
            db,
            lease,
            wake: Arc::new(tokio::sync::Notify::new()),
            started: Arc::new(AtomicBool::new(false)),
            released: Arc::new(tokio::sync::Mutex::new(false)),
        })
    }

    /// Restarts every saga and TCC transaction this server had in flight when it
    /// stopped (on SQLite: every one), and from then on keeps its leases and takes over
    /// what other servers leave: at once when one stops (LISTEN/NOTIFY), within a lease
    /// when one dies (polling). Returns how many it restarted.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        let n = self.engine.claim(true).await? + self.tcc.claim(true).await?;
        if !self.started.swap(true, Ordering::AcqRel) {
            let (db, wake) = (self.db.clone(), self.wake.clone());
            let (ready, listening) = tokio::sync::oneshot::channel();
            tokio::spawn(async move { db.listen(wake, ready).await });
            // Serving before LISTEN is in place would miss a handover made meanwhile
            // (until the next poll); a database that cannot be listened on is polled.
            let _ = tokio::time::timeout(Duration::from_secs(10), listening).await;
            tokio::spawn(self.clone().keep());
        }
        Ok(n)
    }

    /// Renews this server's leases every third of a lease, and claims expired ones
    /// every tenth (or when woken).
    async fn keep(self) {
        let lease = self.lease.owner.lease;
        let mut next_renewal = tokio::time::Instant::now();
        loop {
            let released = self.released.lock().await;
            if *released {
                return;
            }
            let now = tokio::time::Instant::now();
            if !self.db.shared() {
                // The only server of its file: nobody can claim from it.
                self.lease.renewed(now);
            } else if now >= next_renewal {
                let sagas = self.engine.store.renew().await;
                let tccs = self.tcc.store.renew().await;
                match (sagas, tccs) {
                    (Ok(_), Ok(_)) => {
                        self.lease.renewed(now);
                        next_renewal = now + lease / 3;
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!(error = %e, "cannot renew this server's saga leases");
                        next_renewal = now + lease / 10;
                    }
                }
            }
            if self.db.shared() {
                let claimed = async {
                    Ok::<_, StoreError>(
                        self.engine.claim(false).await? + self.tcc.claim(false).await?,
                    )
                };
                match claimed.await {
                    Ok(0) => {}
                    Ok(n) => {
                        self.lease
                            .claimed
                            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(
                            n,
                            "took over sagas and TCC transactions whose lease ran out"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot claim expired sagas"),
                }
            }
            drop(released);
            tokio::select! {
                () = tokio::time::sleep(lease / 10) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Lets the other servers take over what this one has in flight, at once: call when
    /// the server stops.
    pub async fn release(&self) {
        // After any round in progress, and before letting go: nothing is claimed back.
        *self.released.lock().await = true;
        let released = async {
            Ok::<_, StoreError>(
                self.engine.store.release().await? + self.tcc.store.release().await?,
            )
        };
        match released.await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(
                    n,
                    "released unfinished sagas and TCC transactions to the other servers"
                );
                self.db.notify().await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot release this server's saga leases"),
        }
    }

    /// Records sagas and TCC transactions with `tracer`: one started by a traced request
    /// (its router wrapped in `tessera_web::with_traces`) is a span of that trace, with a
    /// span per participant call (step, compensation; try, confirm, cancel), and each
    /// participant continues its call's span. Set before `resume`.
    pub fn trace_with(&self, tracer: tessera_trace::Tracer) {
        let _ = self.engine.tracer.set(tracer.clone());
        let _ = self.tcc.tracer.set(tracer);
    }

    /// The coordinator's part of the server's `/metrics`.
    pub async fn render_metrics(&self, out: &mut tessera_metrics::Text) -> Result<(), StoreError> {
        metrics::render(&self.engine, &self.tcc, out).await
    }

    pub fn router(&self, auth: Arc<dyn Authorize>) -> axum::Router {
        api::router(self.engine.clone(), self.tcc.clone(), auth)
    }
}
