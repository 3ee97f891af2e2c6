//! `tessera server`: flags and config file merged into `tessera_registry::Config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;

use tessera_coordinator::{Authorize, Coordinator, Resolve};
use tessera_registry::acl::Level;
use tessera_registry::{Config, Registry, Server};

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Address for the Consul-compatible HTTP API. A non-loopback address turns ACLs on
    /// (default deny) unless the config file says otherwise.
    #[arg(long, default_value = "127.0.0.1:8500")]
    bind: SocketAddr,
    /// Where registrations, KV and ACL state are kept (default: ./tessera-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML file with server settings (keys as in `tessera_registry::Config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Name of this node in the catalog (default: the host name).
    #[arg(long)]
    node: Option<String>,
    #[arg(long)]
    datacenter: Option<String>,
    /// The address other servers and clients reach this one at (a host name or IP), when
    /// `--bind` is a wildcard (`0.0.0.0:8500` in a container); default: the bound IP.
    #[arg(long)]
    advertise: Option<String>,
    /// Where the saga coordinator keeps its state: `postgres://user@host/db`, or by
    /// default SQLite in the data dir (`coordinator.db`).
    #[arg(long, env = "TESSERA_DATABASE_URL")]
    database_url: Option<String>,
    /// With `--database-url`: how long this server owns the sagas it runs without
    /// renewing; the others take over a dead server's sagas within this.
    #[arg(long, env = "TESSERA_SAGA_LEASE", default_value = "10s", value_parser = crate::load::parse_duration)]
    saga_lease: std::time::Duration,
    /// Keep event streams in NATS JetStream (`nats://127.0.0.1:4222`) instead of SQLite
    /// in the data dir, for several servers sharing them.
    #[arg(long, env = "TESSERA_EVENTS")]
    events: Option<String>,
    /// JetStream stream and subject prefix for `--events` (`tessera` → `TESSERA_EVENTS`).
    #[arg(long, default_value = "tessera")]
    events_namespace: String,
    /// Keep the registry in etcd (`etcd://host:port,host:port,...`), shared by every
    /// server pointed at it, instead of the log in the data dir.
    #[arg(long, env = "TESSERA_STORE")]
    store: Option<String>,
    /// With `--store etcd+https://...`: the CA of the etcd members' certificates.
    #[arg(long, env = "TESSERA_ETCD_CACERT")]
    etcd_cacert: Option<PathBuf>,
    /// This server's client certificate for etcd (with `--etcd-key`), when the members
    /// demand one (`--client-cert-auth`).
    #[arg(long, env = "TESSERA_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, env = "TESSERA_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// After SIGTERM, how long the server goes on serving while its `/readyz` answers
    /// 503, so load balancers and Kubernetes stop sending to it first.
    #[arg(long, env = "TESSERA_DRAIN_DELAY", default_value = "0s", value_parser = crate::load::parse_duration)]
    drain_delay: std::time::Duration,
}

pub async fn run(args: ServerArgs) -> Result<(), String> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
            toml::from_str::<Config>(&text)
                .map_err(|e| format!("invalid config {}: {e}", path.display()))?
        }
        None => Config {
            node_name: hostname(),
            ..Config::default()
        },
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(n) = args.node {
        config.node_name = n;
    }
    if let Some(dc) = args.datacenter {
        config.datacenter = dc;
    }
    if let Some(store) = args.store {
        config.store = store;
    }
    config.etcd_ca_file = args.etcd_cacert.or(config.etcd_ca_file);
    config.etcd_cert_file = args.etcd_cert.or(config.etcd_cert_file);
    config.etcd_key_file = args.etcd_key.or(config.etcd_key_file);
    if let Some(a) = args.advertise {
        config.advertise_addr = a;
    } else if !args.bind.ip().is_unspecified() {
        config.advertise_addr = args.bind.ip().to_string();
    }
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("listener address: {e}"))?;
    let data_dir = config.data_dir.clone();
    let node = config.node_name.clone();
    let server = Server::open(config, &listener)
        .await
        .map_err(|e| e.to_string())?;
    let registry = server.registry().clone();
    let resolver: Arc<dyn Resolve> = Arc::new(RegistryResolver(registry.clone()));
    if args.saga_lease < std::time::Duration::from_secs(1) {
        return Err("--saga-lease must be at least 1s".into());
    }
    let coordinator = match &args.database_url {
        Some(url) => {
            let options = tessera_coordinator::Options {
                owner: node.clone(),
                lease: args.saga_lease,
            };
            Coordinator::open_postgres(url, Some(resolver), options).await
        }
        None => Coordinator::open_sqlite(&data_dir, Some(resolver)).await,
    }
    .map_err(|e| format!("cannot open the saga store: {e}"))?;
    // Spans go where OpenTelemetry's variables say, if anywhere.
    let tracer = tessera_trace::Tracer::from_env("tessera-server")?;
    if let Some(t) = &tracer {
        coordinator.trace_with(t.clone());
    }
    let resumed = coordinator
        .resume()
        .await
        .map_err(|e| format!("cannot resume sagas: {e}"))?;
    if resumed > 0 {
        println!("resumed {resumed} unfinished saga(s)");
    }
    let acl = Arc::new(RegistryAcl(registry));
    let events = match &args.events {
        Some(url) => tessera_events::EventStore::open_nats(url, &args.events_namespace).await,
        None => tessera_events::EventStore::open(&data_dir).await,
    }
    .map_err(|e| format!("cannot open the event store: {e}"))?;
    // The coordinator's and the event store's requests as server spans, so a saga started
    // by a traced request continues its trace.
    let http = Arc::new(tessera_web::HttpMetrics::default());
    let metrics = Metrics {
        registry: server.registry().clone(),
        coordinator: coordinator.clone(),
        events: events.clone(),
        http: http.clone(),
        tracer: tracer.clone(),
    };
    let extra = tessera_web::with_traces(
        coordinator.router(acl.clone()).merge(events.router(acl)),
        tracer.clone(),
    )
    .merge(
        axum::Router::new()
            .route("/metrics", axum::routing::get(render_metrics))
            .with_state(Arc::new(metrics)),
    );
    let server = server.with_http_metrics(http).with_tracer(tracer.clone());
    let acl = if server.registry().acl_enabled {
        "on"
    } else {
        "off"
    };
    println!(
        "tessera server listening on http://{addr} (node {node}, data dir {}, ACLs {acl})",
        data_dir.display()
    );
    let draining = server.registry().clone();
    let drain_delay = args.drain_delay;
    let stopping = async move {
        shutdown_signal().await;
        draining.drain();
        if !drain_delay.is_zero() {
            println!(
                "draining: /readyz answers 503 for {}",
                tessera_core::GoDuration(drain_delay)
            );
            tokio::time::sleep(drain_delay).await;
        }
        // Live event subscriptions end, so the graceful shutdown does not wait on them.
        events.shutdown();
    };
    server
        .run_with(listener, extra, stopping)
        .await
        .map_err(|e| e.to_string())?;
    // What this server has in flight goes to the other servers now, not after its lease.
    coordinator.release().await;
    tessera_trace::Tracer::flush_at_exit(tracer.as_ref()).await;
    println!("tessera server stopped");
    Ok(())
}

/// Everything `GET /metrics` reports: the whole server in the one scheme.
struct Metrics {
    registry: Arc<Registry>,
    coordinator: Coordinator,
    events: tessera_events::EventStore,
    http: Arc<tessera_web::HttpMetrics>,
    tracer: Option<tessera_trace::Tracer>,
}

/// `GET /metrics`: the registry's, the coordinator's and the event store's metrics, the
/// requests the server answered, and the spans it exported. Needs `agent:read` when
/// ACLs are on, as Consul's `/v1/agent/metrics` does.
async fn render_metrics(
    axum::extract::State(m): axum::extract::State<Arc<Metrics>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::http::StatusCode;
    let token = tessera_core::request_token(|n| headers.get(n).and_then(|v| v.to_str().ok()));
    let allowed = m.registry.authorize(token).is_ok_and(|a| {
        a.allows(
            tessera_registry::acl::Resource::Agent,
            m.registry.local_node(),
            Level::Read,
        )
    });
    if !allowed {
        return tessera_web::error(
            StatusCode::FORBIDDEN,
            "permission_denied",
            "Permission denied: /metrics needs agent:read in the token's policy",
        );
    }
    let mut out = tessera_metrics::Text::new();
    m.registry.render_metrics(&mut out);
    if let Err(e) = m.coordinator.render_metrics(&mut out).await {
        return tessera_web::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the saga store did not answer: {e}"),
        );
    }
    if let Err(e) = m.events.render_metrics(&mut out).await {
        return tessera_web::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the event store did not answer: {e}"),
        );
    }
    m.http.render(&mut out);
    if let Some(t) = &m.tracer {
        t.render_metrics(&mut out);
    }
    tessera_web::metrics_response(out)
}

/// Registry services for saga steps: their passing instances, read in-process.
struct RegistryResolver(Arc<Registry>);

impl Resolve for RegistryResolver {
    fn healthy(&self, service: &str) -> Vec<(String, u32)> {
        self.0.healthy_instances(service)
    }
}

/// The registry's ACLs for the coordinator's and the event store's APIs: with ACLs on,
/// reading needs `operator` read and writing (starting a saga, appending events) needs
/// `operator` write — a saga makes the server call out on the caller's behalf.
struct RegistryAcl(Arc<Registry>);

impl Authorize for RegistryAcl {
    fn check(&self, token: Option<&str>, write: bool) -> Result<(), String> {
        let authz = self.0.authorize(token).map_err(|e| e.to_string())?;
        let need = if write { Level::Write } else { Level::Read };
        if authz.operator_level() >= need {
            Ok(())
        } else {
            Err(format!(
                "Permission denied: this needs operator:{} in the token's policy",
                if write { "write" } else { "read" }
            ))
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tessera".into())
}

/// SIGTERM, Ctrl-C, or (under `tessera demo`) the supervisor closing stdin.
pub async fn shutdown_signal() {
    tessera::shutdown_signal().await
}
