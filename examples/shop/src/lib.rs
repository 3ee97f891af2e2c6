//! The demo shop: five services built only on the Tessera SDK. Each registers itself
//! with an HTTP health check, finds the others through the registry, keeps its data in
//! its own database (SQLite in the data dir, shared by its replicas, or PostgreSQL), and
//! exposes `/health` and Prometheus `/metrics`.
//!
//! - `users`: register, login → EdDSA JWT, JWKS;
//! - `catalog`: products, stock reservations (saga step);
//! - `cart`: carts, emptied by `OrderPlaced` events (inbox);
//! - `orders`: checkout saga, order events through the outbox;
//! - `payments`: balances, charges and refunds (saga step).

mod cart;
mod catalog;
mod db;
mod orders;
mod payments;
mod users;
mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tessera::{Check, Coordinator, Events, JwksVerifier, Registration, Registry, ServiceClient};
use tokio_util::sync::CancellationToken;

/// The cart's gRPC API (`proto/tessera/shop/cart/v1/cart.proto`): messages, client and
/// server.
pub use cart::pb as cart_proto;
pub use users::{AUDIENCE, ISSUER};

/// Writes a file only its owner can read or write (0600): signing keys, passwords.
pub fn write_secret(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only when the file is created.
    make_private(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Restricts an existing file to its owner (0600).
pub fn make_private(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Already private (a Kubernetes Secret mounted read-only with mode 0400): leave it.
    if std::fs::metadata(path)?.permissions().mode() & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Which service to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Users,
    Catalog,
    Cart,
    Orders,
    Payments,
}

impl Service {
    pub const ALL: [Service; 5] = [
        Service::Users,
        Service::Catalog,
        Service::Cart,
        Service::Orders,
        Service::Payments,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Users => "users",
            Service::Catalog => "catalog",
            Service::Cart => "cart",
            Service::Orders => "orders",
            Service::Payments => "payments",
        }
    }

    fn schema(self) -> Vec<&'static str> {
        match self {
            Service::Users => users::SCHEMA.to_vec(),
            Service::Catalog => catalog::SCHEMA.to_vec(),
            Service::Cart => cart::SCHEMA.to_vec(),
            Service::Orders => orders::SCHEMA.to_vec(),
            Service::Payments => payments::SCHEMA.to_vec(),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ShopArgs {
    /// Address to serve on; port 0 picks a free one (the registration carries the real
    /// port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The registry's HTTP API (tessera server or Consul).
    #[arg(long, default_value = "127.0.0.1:8500")]
    pub registry: String,
    /// Where the service's SQLite database (and the users' signing key) live; replicas of
    /// one service share it.
    #[arg(long, default_value = "shop-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL instead of SQLite (`postgres://user@host/db`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// users: make sure this admin account exists (with `--admin-password`).
    #[arg(long)]
    pub admin_email: Option<String>,
    #[arg(long, env = "SHOP_ADMIN_PASSWORD")]
    pub admin_password: Option<String>,
    /// payments: what a new account starts with.
    #[arg(long, default_value_t = 20_000)]
    pub initial_balance_cents: i64,
    /// After SIGTERM: out of the registry and `/health` answering 503 at once, then this
    /// long serving on (callers' discovery and Kubernetes stop sending meanwhile) before
    /// the listener closes and in-flight requests finish.
    #[arg(long, env = "TESSERA_DRAIN_DELAY", default_value = "300ms", value_parser = drain_delay)]
    pub drain_delay: Duration,
}

fn drain_delay(s: &str) -> Result<Duration, String> {
    tessera_core::parse_duration(s).map_err(|e| e.to_string())
}

/// Runs one service until SIGTERM/Ctrl-C (or `stop`): deregisters first, then stops
/// accepting and finishes in-flight requests.
pub async fn run(service: Service, args: ShopArgs, stop: CancellationToken) -> Result<(), String> {
    let name = service.name();
    let db = db::Db::open(
        args.database_url.as_deref(),
        &args.data_dir,
        name,
        &service.schema(),
        matches!(service, Service::Orders | Service::Cart),
    )
    .await?;
    let registry = Registry::new(args.registry.clone());
    // Spans go where OpenTelemetry's variables say, if anywhere.
    let tracer = tessera::trace::Tracer::from_env(name)?;
    let verifier = || {
        Arc::new(JwksVerifier::from_service(
            ServiceClient::new(&registry, "users"),
            "/.well-known/jwks.json",
            users::validation(),
        ))
    };
    let background = CancellationToken::new();
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ready = Arc::new(Readiness {
        db: db.clone(),
        draining: draining.clone(),
    });
    let mut grpc = None;
    let routes = match service {
        Service::Users => {
            let admin = args.admin_email.clone().zip(args.admin_password.clone());
            users::router(db.clone(), &args.data_dir, admin).await?
        }
        Service::Catalog => catalog::router(db.clone(), verifier()),
        Service::Payments => payments::router(db.clone(), verifier(), args.initial_balance_cents),
        Service::Cart => {
            tokio::spawn(cart::consume(
                db.clone(),
                Events::new(&registry),
                tracer.clone(),
                background.clone(),
            ));
            grpc = Some(
                tessera::grpc::GrpcServer::new()
                    .add_service(cart::grpc(db.clone(), verifier()))
                    .descriptors(cart::DESCRIPTORS),
            );
            cart::router(db.clone(), verifier())
        }
        Service::Orders => {
            let st = orders::St::new(
                db.clone(),
                verifier(),
                tessera::grpc::GrpcChannel::new(&registry, "cart"),
                ServiceClient::new(&registry, "catalog"),
                Coordinator::new(&registry),
            );
            let publisher = tessera::outbox::HttpPublisher::new(
                args.registry.clone(),
                std::env::var("TESSERA_REGISTRY_TOKEN").ok(),
            );
            let relay = tessera::outbox::Relay::new(
                tessera::outbox::OutboxDb::Any(db.pool.clone()),
                publisher,
            );
            tokio::spawn(relay.run(Duration::from_millis(100), background.clone()));
            tokio::spawn(orders::reconcile(st.clone(), background.clone()));
            orders::router(st)
        }
    };
    let http_metrics = Arc::new(tessera_web::HttpMetrics::default());
    let metrics = Metrics {
        http: http_metrics.clone(),
        registry: registry.clone(),
        tracer: tracer.clone(),
    };
    let grpc_check = grpc.as_ref().map(|_| cart::pb::cart_server::SERVICE_NAME);
    let grpc = match grpc {
        Some(g) => g.into_router(ready.clone())?,
        None => Router::new(),
    };
    let app = tessera_web::json_errors(routes)
        .merge(
            Router::new()
                .route("/health", get(health))
                .with_state(ready.clone()),
        )
        .merge(grpc)
        .merge(
            Router::new()
                .route("/metrics", get(render_metrics))
                .with_state(Arc::new(metrics)),
        );
    let app = tessera_web::with_metrics(app, http_metrics).layer(
        axum::middleware::from_fn_with_state(tracer.clone(), tessera_web::traced),
    );

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("listener address: {e}"))?;
    // Listening on every interface (in a container): register the one callers reach.
    let advertised = registry.advertised(addr).await.map_err(|e| e.to_string())?;
    let registration = Registration::new(name, advertised)
        .meta("version", env!("CARGO_PKG_VERSION"))
        // Where Prometheus finds the metrics (the registry's `/v1/tessera/prometheus-sd`).
        .meta("metrics_path", "/metrics")
        .check(Check::Http {
            path: "/health".into(),
            interval: Duration::from_secs(1),
        })
        .deregister_after(Duration::from_secs(30));
    // A service that serves gRPC is also checked the way gRPC callers see it.
    let registration = match grpc_check {
        Some(service) => registration.check(Check::Grpc {
            service: service.into(),
            interval: Duration::from_secs(1),
        }),
        None => registration,
    };
    let registered = register(registration, &registry).await?;
    println!(
        "{name} listening on http://{addr} (registered as {})",
        registered.id()
    );
    let args_drain_delay = args.drain_delay;
    let shutdown = async move {
        tokio::select! {
            _ = tessera::shutdown_signal() => {}
            _ = stop.cancelled() => {}
        }
        // Out of the registry and not ready first, so callers and Kubernetes stop
        // choosing this instance; then the drain delay for them to hear it before the
        // listener closes.
        draining.store(true, std::sync::atomic::Ordering::Release);
        if let Err(e) = registered.deregister().await {
            tracing::warn!(error = %e, "deregistration failed");
        }
        tokio::time::sleep(args_drain_delay).await;
        background.cancel();
    };
    // Small answers on multiplexed HTTP/2 (gRPC) must not wait for Nagle.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server: {e}"))?;
    db.pool.close().await;
    tessera::trace::Tracer::flush_at_exit(tracer.as_ref()).await;
    println!("{name} stopped");
    Ok(())
}

/// Registers, retrying while the registry is not up yet (services may start first).
async fn register(r: Registration, registry: &Registry) -> Result<tessera::Registered, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match r.clone().register(registry).await {
            Ok(done) => return Ok(done),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "registry not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(format!("cannot register with {}: {e}", registry.address())),
        }
    }
}

/// Ready unless draining or the database does not answer: `/health` and the gRPC
/// health service both ask it.
struct Readiness {
    db: db::Db,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl tessera::grpc::Ready for Readiness {
    async fn ready(&self) -> Result<(), String> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Err("draining".into());
        }
        sqlx::query("SELECT 1")
            .execute(&self.db.pool)
            .await
            .map(drop)
            .map_err(|_| "database unavailable".into())
    }
}

async fn health(State(ready): State<Arc<Readiness>>) -> impl IntoResponse {
    use tessera::grpc::Ready;
    match ready.ready().await {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// What a service's `/metrics` reports: the requests it served, the calls it made to
/// other services, and the spans it exported.
struct Metrics {
    http: Arc<tessera_web::HttpMetrics>,
    registry: Registry,
    tracer: Option<tessera::trace::Tracer>,
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> axum::response::Response {
    let mut out = tessera_metrics::Text::new();
    m.http.render(&mut out);
    m.registry.render_metrics(&mut out);
    if let Some(t) = &m.tracer {
        t.render_metrics(&mut out);
    }
    tessera_web::metrics_response(out)
}
