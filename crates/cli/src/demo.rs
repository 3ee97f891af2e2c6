//! `tessera demo`: the whole platform on one machine — `tessera server`, `tessera gateway`
//! and two replicas of each shop service as child processes — seeded and explained, and
//! optionally driven with load (and chaos) and checked for consistency.
//!
//! Children get a pipe as stdin and `TESSERA_STOP_ON_STDIN_EOF=1`: closing the pipe is
//! how they are asked to stop, and if this process dies the pipe closes anyway, so no
//! child outlives the demo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tessera_shop::Service;
use tokio::process::{Child, ChildStdin, Command};

use crate::http::Http;
use crate::load::{self, LoadArgs};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the gateway listens (port 0: any free port); its admin API takes the next
    /// port. Default 127.0.0.1:8080, or a free port with --load.
    #[arg(long)]
    gateway: Option<SocketAddr>,
    /// Where `tessera server` listens (port 0: any free port). Default 127.0.0.1:8500, or
    /// a free port with --load.
    #[arg(long)]
    registry: Option<SocketAddr>,
    /// State of every process (databases, logs, configs); kept between runs, and used by
    /// one demo at a time. Default `tessera-demo`, or `tessera-demo-load` with --load.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start from empty databases.
    #[arg(long)]
    fresh: bool,
    /// Replicas of each shop service.
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Drive shop traffic through the gateway, then check consistency and stop.
    #[arg(long)]
    load: bool,
    #[command(flatten)]
    load_args: LoadArgs,
    /// With --load: kill a random replica every few seconds (and restart it).
    #[arg(long)]
    chaos: bool,
    /// Only check a running demo's orders, stock and balances against each other
    /// (`--registry` names its server), and exit 1 on any mismatch.
    #[arg(long)]
    verify: bool,
    /// Run the registry as a cluster: 3 etcd members (`etcd` from PATH) and 3 servers on
    /// them (`--registry` and the next two ports); the gateway and the shop are given all
    /// three. Sagas and events stay on each server's own store unless
    /// `TESSERA_DATABASE_URL` and `TESSERA_EVENTS` are set for all of them.
    #[arg(long)]
    cluster: bool,
    /// Also start Prometheus (`prometheus` from PATH) on this address (default
    /// 127.0.0.1:9090), finding every process through the registry's
    /// `/v1/tessera/prometheus-sd` and scraping each every 2 s.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9090")]
    prometheus: Option<SocketAddr>,
}

/// One supervised child process.
pub struct Proc {
    pub name: String,
    /// What runs: another program (etcd), or by default this `tessera` binary.
    program: Option<PathBuf>,
    /// One of several that do the same job (a cluster's servers and etcd members): the
    /// demo goes on when it dies.
    expendable: bool,
    /// Died, and reported so.
    gone: bool,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// The reserved ports it listens on, let go of as it starts.
    ports: Vec<SocketAddr>,
}

impl Proc {
    fn new(name: &str, args: Vec<String>, logs: &Path) -> Proc {
        Proc {
            name: name.to_owned(),
            program: None,
            expendable: false,
            gone: false,
            args,
            env: Vec::new(),
            log: logs.join(format!("{name}.log")),
            child: None,
            stdin: None,
            ports: Vec::new(),
        }
    }

    /// Starts the process (again, after a kill).
    pub fn spawn(&mut self) -> Result<(), String> {
        release(&self.ports);
        let exe = match &self.program {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|e| format!("cannot find tessera: {e}"))?,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let mut child = Command::new(exe)
            .args(&self.args)
            .env("TESSERA_STOP_ON_STDIN_EOF", "1")
            .env("TESSERA_LOG_FORMAT", crate::log::format().as_str())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.name))?;
        self.stdin = child.stdin.take();
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process has exited (and how), without waiting.
    fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(e.to_string()),
            None => Some("not started".into()),
            Some(Ok(None)) => None,
        }
    }

    /// SIGKILL, as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        self.stdin = None;
    }

    /// Asks the process to stop: closes its stdin. Another program (etcd, which keeps
    /// what it acknowledged across a crash) is killed.
    fn signal(&mut self) {
        self.stdin = None;
        if self.program.is_some()
            && let Some(c) = self.child.as_mut()
        {
            let _ = c.start_kill();
        }
    }

    /// Asks the process to stop and kills it if it has not after `grace`.
    async fn stop(&mut self, grace: Duration) {
        self.signal();
        if let Some(mut c) = self.child.take()
            && tokio::time::timeout(grace, c.wait()).await.is_err()
        {
            let _ = c.kill().await;
        }
    }
}

/// Every process of a running demo.
pub struct Fleet {
    pub infra: Vec<Proc>,
    pub services: Vec<Proc>,
}

impl Fleet {
    async fn stop(&mut self) {
        // Services first (they deregister), then the gateway, then the server.
        let grace = Duration::from_secs(10);
        for p in &mut self.services {
            p.signal();
        }
        for p in &mut self.services {
            p.stop(grace).await;
        }
        while let Some(mut p) = self.infra.pop() {
            p.stop(grace).await;
        }
    }
}

/// The listeners `reserve` opened, held until the child that will listen on each port is
/// about to start: a port found free and let go at once would be free for any other
/// process (a test running beside the demo, say) until then, which in a cluster demo is
/// seconds.
static HELD: std::sync::Mutex<Vec<std::net::TcpListener>> = std::sync::Mutex::new(Vec::new());

/// Lets go of the held ports in `addrs`, for the child about to listen on them.
fn release(addrs: &[SocketAddr]) {
    HELD.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|l| !l.local_addr().is_ok_and(|a| addrs.contains(&a)));
}

/// Checks that `addr` can be listened on (a free one for port 0) and returns it; the port
/// stays held until [`release`].
fn reserve(addr: SocketAddr, what: &str) -> Result<SocketAddr, String> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "{addr}, for {what}, is already in use: is a demo already running? \
                 Nothing was started; choose other ports with --registry and --gateway"
            )
        } else {
            format!("cannot listen on {addr} for {what}: {e}")
        }
    })?;
    let got = l.local_addr().map_err(|e| e.to_string())?;
    HELD.lock().unwrap_or_else(|p| p.into_inner()).push(l);
    Ok(got)
}

/// Holds the data dir for this demo while it runs: a second demo on the same dir is
/// refused before it changes a file in it.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("demo.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "the data dir {} is in use by another `tessera demo`; nothing was started \
             (choose another with --data-dir)",
            dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// `--fresh`: everything in the data dir but its lock goes.
fn clear_data_dir(dir: &Path) -> Result<(), String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_name() == "demo.lock" {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The etcd server `--cluster` runs, from PATH.
const ETCD: &str = "etcd";
/// What `--prometheus` runs, from PATH.
const PROMETHEUS: &str = "prometheus";

/// `--cluster`: where the etcd members and the three servers listen.
struct Cluster {
    /// (client, peer) port of each member.
    members: Vec<(SocketAddr, SocketAddr)>,
    servers: Vec<SocketAddr>,
}

/// Finds etcd and reserves every port `--cluster` needs: the servers at `first` and the
/// two ports after it (or any free ones for port 0), the etcd members anywhere free.
fn plan_cluster(first: SocketAddr) -> Result<Cluster, String> {
    match std::process::Command::new(ETCD).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return Err(
                "--cluster needs etcd on PATH (Debian and Ubuntu: apt-get install \
                        etcd-server); nothing was started"
                    .into(),
            );
        }
    }
    let mut servers = vec![first];
    for n in 1..3u16 {
        let port = if first.port() == 0 {
            0
        } else {
            first
                .port()
                .checked_add(n)
                .ok_or("--registry: no room for two more ports after it")?
        };
        servers.push(reserve(
            SocketAddr::new(first.ip(), port),
            "another registry server (--cluster uses the two ports after --registry)",
        )?);
    }
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push((
            reserve(any, "an etcd member")?,
            reserve(any, "an etcd member")?,
        ));
    }
    Ok(Cluster { members, servers })
}

impl Cluster {
    /// The etcd members, not started, with empty data under `dir/etcd-N`: their ports
    /// are new each run, which a member's kept data would not match. (The shop's
    /// services register again as they start.)
    fn etcd(&self, dir: &Path, logs: &Path) -> Result<Vec<Proc>, String> {
        let initial = self
            .members
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{}=http://{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        self.members
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let name = format!("e{}", i + 1);
                let data = dir.join(format!("etcd-{}", i + 1));
                if data.exists() {
                    std::fs::remove_dir_all(&data)
                        .map_err(|e| format!("cannot clear {}: {e}", data.display()))?;
                }
                let mut p = Proc::new(
                    &format!("etcd-{}", i + 1),
                    vec![
                        "--name".into(),
                        name,
                        "--data-dir".into(),
                        path(&data),
                        "--listen-client-urls".into(),
                        format!("http://{client}"),
                        "--advertise-client-urls".into(),
                        format!("http://{client}"),
                        "--listen-peer-urls".into(),
                        format!("http://{peer}"),
                        "--initial-advertise-peer-urls".into(),
                        format!("http://{peer}"),
                        "--initial-cluster".into(),
                        initial.clone(),
                        "--initial-cluster-state".into(),
                        "new".into(),
                    ],
                    logs,
                );
                p.program = Some(PathBuf::from(ETCD));
                p.ports = vec![*client, *peer];
                Ok(p)
            })
            .collect()
    }

    fn store(&self) -> String {
        let clients: Vec<String> = self.members.iter().map(|(c, _)| c.to_string()).collect();
        format!("etcd://{}", clients.join(","))
    }

    fn describe(&self) -> String {
        let servers: Vec<String> = self.servers.iter().map(|s| format!("http://{s}")).collect();
        format!(
            "Cluster: 3 servers ({}) on 3 etcd members ({}).\n\
             Stop one (kill -9 its pid from `pgrep -af 'tessera server'`): the gateway and the\n\
             shop move to the others, and its health checks move within 5 s.\n",
            servers.join(", "),
            self.store()
        )
    }
}

const PRODUCTS: &[(&str, &str, i64, i64)] = &[
    ("espresso", "Espresso beans, 1 kg", 1850, 500),
    ("filter", "Paper filters, 100", 450, 2000),
    ("mug", "Ceramic mug", 990, 1000),
    ("scale", "Coffee scale", 2900, 200),
    ("tamper", "Steel tamper", 2400, 120),
    ("kettle", "Gooseneck kettle", 4500, 150),
    ("grinder", "Burr grinder", 8900, 100),
    ("machine", "Espresso machine", 64900, 20),
];

pub const DEMO_EMAIL: &str = "demo@shop.test";
pub const DEMO_PASSWORD: &str = "demo-password-1";
const ADMIN_EMAIL: &str = "admin@shop.test";

/// Where the demo listens by default, as the README says.
const REGISTRY: &str = "127.0.0.1:8500";
const GATEWAY: &str = "127.0.0.1:8080";
/// Anywhere free: a `--load` run starts a fleet of its own beside a running demo.
const ANY: &str = "127.0.0.1:0";

fn addr(given: Option<SocketAddr>, default: &str) -> SocketAddr {
    given.unwrap_or_else(|| {
        default
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
    })
}

pub async fn run(args: DemoArgs) -> Result<(), String> {
    if args.verify {
        let report = crate::load::verify(&addr(args.registry, REGISTRY).to_string()).await?;
        println!("{report}");
        return if report.ok() {
            Ok(())
        } else {
            Err("the shop's data is inconsistent".into())
        };
    }
    if args.replicas == 0 || args.replicas > 8 {
        return Err("--replicas: 1 to 8".into());
    }
    // A `--load` run is a demo of its own, on free ports and in its own data dir, so it
    // never disturbs one that is running.
    let (registry, gateway, dir) = if args.load {
        (ANY, ANY, "tessera-demo-load")
    } else {
        (REGISTRY, GATEWAY, "tessera-demo")
    };
    let dir = &args.data_dir.clone().unwrap_or_else(|| PathBuf::from(dir));
    // Every port is checked before anything starts or any file is touched.
    let registry = reserve(addr(args.registry, registry), "the registry (--registry)")?;
    let cluster = if args.cluster {
        Some(plan_cluster(registry)?)
    } else {
        None
    };
    let asked = addr(args.gateway, gateway);
    let gateway = reserve(asked, "the gateway (--gateway)")?;
    let admin = if asked.port() == 0 {
        reserve(SocketAddr::new(gateway.ip(), 0), "the gateway's admin API")?
    } else {
        let next = gateway
            .port()
            .checked_add(1)
            .ok_or("--gateway: no port after it for the admin API")?;
        reserve(
            SocketAddr::new(gateway.ip(), next),
            "the gateway's admin API (the port after --gateway)",
        )?
    };
    let prometheus = args
        .prometheus
        .map(|a| reserve(a, "Prometheus (--prometheus)"))
        .transpose()?;
    if prometheus.is_some()
        && !std::process::Command::new(PROMETHEUS)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Err(
            "--prometheus needs prometheus on PATH (Debian and Ubuntu: apt-get install \
             prometheus); nothing was started"
                .into(),
        );
    }
    let _lock = lock_data_dir(dir)?;
    if args.fresh {
        clear_data_dir(dir)?;
    }
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let admin_password = admin_password(dir)?;

    let mut fleet = Fleet {
        infra: Vec::new(),
        services: Vec::new(),
    };
    let result = async {
        let http = Http::new();
        let servers = match &cluster {
            None => vec![registry],
            Some(c) => c.servers.clone(),
        };
        if let Some(c) = &cluster {
            for mut p in c.etcd(dir, &logs)? {
                p.expendable = true;
                p.spawn()?;
                fleet.infra.push(p);
            }
        }
        for (i, addr) in servers.iter().enumerate() {
            let mut a = vec![
                "server".into(),
                "--bind".into(),
                addr.to_string(),
                "--data-dir".into(),
                path(&dir.join(if cluster.is_some() {
                    format!("server-{}", i + 1)
                } else {
                    "server".into()
                })),
                "--node".into(),
                if cluster.is_some() {
                    format!("demo-{}", i + 1)
                } else {
                    "demo".into()
                },
            ];
            if let Some(c) = &cluster {
                a.extend(["--store".into(), c.store()]);
            }
            let name = if cluster.is_some() {
                format!("server-{}", i + 1)
            } else {
                "server".into()
            };
            let mut server = Proc::new(&name, a, &logs);
            server.ports = vec![*addr];
            server
                .env
                .push(("OTEL_SERVICE_NAME", "tessera-server".into()));
            server.expendable = cluster.is_some();
            server.spawn()?;
            fleet.infra.push(server);
        }
        for addr in &servers {
            wait(&mut fleet, &format!("the registry at {addr}"), || async {
                http.get(&format!("http://{addr}/v1/status/leader"), None)
                    .await
                    .is_ok_and(|(s, _)| s == 200)
            })
            .await?;
        }
        // What the gateway and the shop are given: every server.
        let registries = servers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");

        let config = dir.join("gateway.toml");
        std::fs::write(&config, gateway_config(gateway, admin, &registries))
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let mut gw = Proc::new(
            "gateway",
            vec!["gateway".into(), "--config".into(), path(&config)],
            &logs,
        );
        gw.env.push(("OTEL_SERVICE_NAME", "gateway".into()));
        gw.ports = vec![gateway, admin];
        gw.spawn()?;
        fleet.infra.push(gw);
        register_gateway(&http, registry, gateway, admin).await?;
        if let Some(listen) = prometheus {
            let mut p = start_prometheus(dir, &logs, listen, registry)?;
            // Watching is optional: the demo goes on without it.
            p.expendable = true;
            p.spawn()?;
            fleet.infra.push(p);
        }

        for service in Service::ALL {
            for n in 1..=args.replicas {
                let mut a = vec![
                    "shop".into(),
                    service.name().into(),
                    "--registry".into(),
                    registries.clone(),
                    "--data-dir".into(),
                    path(&dir.join(service.name())),
                ];
                if service == Service::Users {
                    a.extend(["--admin-email".into(), ADMIN_EMAIL.into()]);
                }
                let mut p = Proc::new(&format!("{}-{n}", service.name()), a, &logs);
                // With a replica to spare, losing one (kill -9 it and see) is what the shop
                // is built to survive: the demo says so and goes on.
                p.expendable = args.replicas > 1;
                // Each service's spans under its own name, whatever the demo was given.
                p.env.push(("OTEL_SERVICE_NAME", service.name().into()));
                if service == Service::Users {
                    // In the environment, not on the command line (`ps` shows those).
                    p.env.push(("SHOP_ADMIN_PASSWORD", admin_password.clone()));
                }
                p.spawn()?;
                fleet.services.push(p);
            }
        }
        for service in Service::ALL {
            let url = format!(
                "http://{registry}/v1/health/service/{}?passing",
                service.name()
            );
            let want = args.replicas as usize;
            wait(
                &mut fleet,
                &format!("{} replicas of {}", want, service.name()),
                || async {
                    http.get(&url, None)
                        .await
                        .is_ok_and(|(_, v)| v.as_array().is_some_and(|a| a.len() >= want))
                },
            )
            .await?;
        }
        let gw_url = format!("http://{gateway}");
        wait(&mut fleet, "the gateway's catalog route", || async {
            http.get(&format!("{gw_url}/api/catalog/products"), None)
                .await
                .is_ok_and(|(s, _)| s == 200)
        })
        .await?;
        let admin_token = seed(&http, &gw_url, &admin_password).await?;
        let url = format!("http://{registry}/v1/health/service/tessera-gateway?passing");
        wait(&mut fleet, "the gateway in the registry", || async {
            http.get(&url, None)
                .await
                .is_ok_and(|(_, v)| v.as_array().is_some_and(|a| !a.is_empty()))
        })
        .await?;
        let grpc = grpc_through_gateway(&http, &gw_url, registry).await?;
        walkthrough(gateway, registry, admin, dir, &admin_password);
        println!("{grpc}\n");
        if let Some(p) = prometheus {
            println!(
                "  Prometheus: http://{p}/targets (every process, found through http://{registry}/v1/tessera/prometheus-sd)\n"
            );
        }
        if let Some(c) = &cluster {
            println!("{}", c.describe());
        }

        if args.load {
            let chaos = args.chaos.then_some(&mut fleet);
            let registry = registry.to_string();
            let outcome = load::run(
                &http,
                &gw_url,
                &registry,
                &args.load_args,
                &admin_token,
                chaos,
            )
            .await?;
            if !outcome {
                return Err("the load run ended with inconsistent data".to_owned());
            }
            return Ok(());
        }
        println!("Press Ctrl-C to stop everything.");
        tokio::select! {
            _ = crate::server::shutdown_signal() => Ok(()),
            e = watch_children(&mut fleet) => Err(e),
        }
    }
    .await;
    println!("stopping the demo ...");
    fleet.stop().await;
    println!("demo stopped");
    result
}

/// Registers the gateway in the registry as service `tessera-gateway`, with its admin
/// port's health and metrics, so Prometheus's discovery finds it with the rest.
async fn register_gateway(
    http: &Http,
    registry: SocketAddr,
    gateway: SocketAddr,
    admin: SocketAddr,
) -> Result<(), String> {
    let body = json!({
        "Name": "tessera-gateway",
        "ID": format!("tessera-gateway-{}", gateway.port()),
        "Address": gateway.ip().to_string(),
        "Port": gateway.port(),
        "Meta": {"metrics_path": "/metrics", "metrics_port": admin.port().to_string()},
        "Check": {
            "HTTP": format!("http://{admin}/healthz"),
            "Interval": "2s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    });
    let url = format!("http://{registry}/v1/agent/service/register");
    match http.send("PUT", &url, None, Some(&body), None).await {
        Ok((200, _)) => Ok(()),
        Ok((s, v)) => Err(format!("registering the gateway: {s} {v}")),
        Err(e) => Err(format!("registering the gateway: {e}")),
    }
}

/// `--prometheus`: Prometheus from PATH, configured to find its targets through the
/// registry's HTTP service discovery.
fn start_prometheus(
    dir: &Path,
    logs: &Path,
    listen: SocketAddr,
    registry: SocketAddr,
) -> Result<Proc, String> {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "# Written by `tessera demo --prometheus`.
global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: tessera
    http_sd_configs:
      - url: http://{registry}/v1/tessera/prometheus-sd
        refresh_interval: 2s
"
        ),
    )
    .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let mut p = Proc::new(
        "prometheus",
        vec![
            format!("--config.file={}", path(&config)),
            format!("--storage.tsdb.path={}", path(&dir.join("prometheus"))),
            format!("--web.listen-address={listen}"),
        ],
        logs,
    );
    p.program = Some(PathBuf::from(PROMETHEUS));
    p.ports = vec![listen];
    Ok(p)
}

/// Returns when a child process exits on its own (it should not), unless it is one of
/// a cluster's (then it is reported, and the others go on).
async fn watch_children(fleet: &mut Fleet) -> String {
    loop {
        for p in fleet.infra.iter_mut().chain(fleet.services.iter_mut()) {
            if p.gone {
                continue;
            }
            if let Some(how) = p.exited() {
                if p.expendable {
                    println!("{} exited ({how}); the cluster goes on without it", p.name);
                    p.gone = true;
                    p.child = None;
                    continue;
                }
                return format!("{} exited ({how}); see {}", p.name, p.log.display());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls `cond` for up to 60 s, failing early (with the log to read) if a child died.
async fn wait<F, Fut>(fleet: &mut Fleet, what: &str, mut cond: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if cond().await {
            return Ok(());
        }
        for p in fleet.infra.iter_mut().chain(fleet.services.iter_mut()) {
            if let Some(how) = p.exited() {
                return Err(format!(
                    "{} exited ({how}) while waiting for {what}; see {}",
                    p.name,
                    p.log.display()
                ));
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The admin password for this data dir: made up on first run and kept.
fn admin_password(dir: &Path) -> Result<String, String> {
    let file = dir.join("admin-password");
    if let Ok(p) = std::fs::read_to_string(&file) {
        let p = p.trim().to_owned();
        if p.len() >= 12 {
            // A password written before secrets were private is made so.
            tessera_shop::make_private(&file)
                .map_err(|e| format!("cannot restrict {}: {e}", file.display()))?;
            return Ok(p);
        }
    }
    let p: String = (0..20).map(|_| fastrand::alphanumeric()).collect();
    tessera_shop::write_secret(&file, p.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    Ok(p)
}

/// Routes `/api/{service}` to each shop service. Tokens are checked here, at the edge,
/// except on registration, login and catalog reads; catalog writes need role `admin`.
/// The gateway fetches the users service's JWKS through its own public route.
fn gateway_config(gateway: SocketAddr, admin: SocketAddr, registry: &str) -> String {
    let issuer = tessera_shop::ISSUER;
    let audience = tessera_shop::AUDIENCE;
    let mut c = format!(
        r#"# Written by `tessera demo`.
listen = "{gateway}"
admin = "{admin}"

[registry]
address = "{registry}"
wait = "30s"

[jwt.shop]
jwks_url = "http://{gateway}/.well-known/jwks.json"
issuer = "{issuer}"
audience = "{audience}"
algorithms = ["EdDSA"]
forward = {{ "x-user-id" = "sub" }}

[[routes]]
name = "jwks"
path = {{ exact = "/.well-known/jwks.json" }}
upstream = "users"

[[routes]]
name = "register"
path = {{ prefix = "/api/users/register" }}
upstream = "users"
rewrite_prefix = "/users/register"

[[routes]]
name = "login"
path = {{ prefix = "/api/users/login" }}
upstream = "users"
rewrite_prefix = "/users/login"

[[routes]]
name = "cart-grpc"
path = {{ prefix = "/tessera.shop.cart.v1.Cart/" }}
upstream = "cart-grpc"
timeout = "20s"
auth = {{ jwt = "shop" }}
grpc_web = true

[[routes]]
name = "catalog-read"
path = {{ prefix = "/api/catalog" }}
methods = ["GET", "HEAD"]
upstream = "catalog"
rewrite_prefix = "/catalog"

[[routes]]
name = "catalog-write"
path = {{ prefix = "/api/catalog" }}
upstream = "catalog"
rewrite_prefix = "/catalog"
auth = {{ jwt = "shop", roles = ["admin"] }}

"#
    );
    for s in [
        Service::Users,
        Service::Cart,
        Service::Orders,
        Service::Payments,
    ] {
        let n = s.name();
        c.push_str(&format!(
            "[[routes]]\nname = \"{n}\"\npath = {{ prefix = \"/api/{n}\" }}\nupstream = \"{n}\"\nrewrite_prefix = \"/{n}\"\ntimeout = \"20s\"\nauth = {{ jwt = \"shop\" }}\n\n"
        ));
    }
    for s in Service::ALL {
        let n = s.name();
        c.push_str(&format!("[upstreams.{n}]\nservice = \"{n}\"\n\n"));
    }
    // The cart's gRPC API: the same instances, over HTTP/2.
    c.push_str("[upstreams.cart-grpc]\nservice = \"cart\"\nprotocol = \"h2c\"\n");
    c
}

/// Creates the products and the demo user if missing; returns an admin token.
async fn seed(http: &Http, gw: &str, admin_password: &str) -> Result<String, String> {
    let (s, v) = http
        .post(
            &format!("{gw}/api/users/login"),
            None,
            &json!({"email": ADMIN_EMAIL, "password": admin_password}),
            None,
        )
        .await?;
    if s != 200 {
        return Err(format!("admin login failed: {s} {v}"));
    }
    let token = v["token"].as_str().unwrap_or_default().to_owned();
    for (id, name, price, stock) in PRODUCTS {
        let body = json!({"id": id, "name": name, "price_cents": price, "stock": stock});
        let (s, v) = http
            .post(
                &format!("{gw}/api/catalog/products"),
                Some(&token),
                &body,
                None,
            )
            .await?;
        if s != 201 && s != 409 {
            return Err(format!("cannot create product {id}: {s} {v}"));
        }
    }
    let (s, v) = http
        .post(
            &format!("{gw}/api/users/register"),
            None,
            &json!({"email": DEMO_EMAIL, "password": DEMO_PASSWORD, "name": "Demo"}),
            None,
        )
        .await?;
    if s != 201 && s != 409 {
        return Err(format!("cannot register the demo user: {s} {v}"));
    }
    Ok(token)
}

/// One gRPC call through the gateway, as a service makes it: the demo user's cart by
/// `tessera.shop.cart.v1.Cart/GetCart`, over a channel that finds the gateway in the
/// registry.
async fn grpc_through_gateway(
    http: &Http,
    gw: &str,
    registry: SocketAddr,
) -> Result<String, String> {
    use tessera_shop::cart_proto::{GetCartRequest, cart_client::CartClient};
    let (s, v) = http
        .post(
            &format!("{gw}/api/users/login"),
            None,
            &json!({"email": DEMO_EMAIL, "password": DEMO_PASSWORD}),
            None,
        )
        .await?;
    if s != 200 {
        return Err(format!("demo user login failed: {s} {v}"));
    }
    let bearer = format!("Bearer {}", v["token"].as_str().unwrap_or_default());
    let mut req = tonic::Request::new(GetCartRequest {});
    req.metadata_mut().insert(
        "authorization",
        bearer
            .parse()
            .map_err(|_| "the login answered an unusable token".to_owned())?,
    );
    let registry = tessera::Registry::new(registry.to_string());
    let channel = tessera::grpc::GrpcChannel::new(&registry, "tessera-gateway");
    let cart = CartClient::new(channel)
        .get_cart(req)
        .await
        .map_err(|s| {
            format!(
                "gRPC GetCart through the gateway: {}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    Ok(format!(
        "gRPC through the gateway: tessera.shop.cart.v1.Cart/GetCart for {DEMO_EMAIL} answered OK, {} item(s) in the cart.",
        cart.items.len()
    ))
}

fn walkthrough(
    gateway: SocketAddr,
    registry: SocketAddr,
    admin: SocketAddr,
    dir: &Path,
    admin_password: &str,
) {
    let gw = format!("http://{gateway}");
    println!(
        r#"
Tessera demo shop is up.
  gateway:   {gw}
  registry:  http://{registry}   (Consul API, sagas at /v1/sagas, events at /v1/streams)
  admin:     http://{admin}/admin/upstreams   http://{admin}/metrics
  logs:      {logs}
  shop admin {ADMIN_EMAIL} / {admin_password}

Try it (copy and paste):
  GW={gw}
  # browse (public)
  curl -s $GW/api/catalog/products
  # log in as the demo user (or register your own at /api/users/register)
  TOKEN=$(curl -s -X POST $GW/api/users/login -H 'content-type: application/json' \
    -d '{{"email":"{DEMO_EMAIL}","password":"{DEMO_PASSWORD}"}}' | sed -E 's/.*"token":"([^"]+)".*/\1/')
  # add to the cart, check out (a saga: reserve stock -> charge -> confirm)
  curl -s -X POST $GW/api/cart/items -H "authorization: Bearer $TOKEN" \
    -H 'content-type: application/json' -d '{{"product_id":"mug","quantity":2}}'
  curl -s -X POST $GW/api/orders/checkout -H "authorization: Bearer $TOKEN" -H 'Idempotency-Key: my-first-order'
  # your orders, your balance (every account starts with $200.00)
  curl -s $GW/api/orders -H "authorization: Bearer $TOKEN"
  curl -s $GW/api/payments/accounts/me -H "authorization: Bearer $TOKEN"
  # an order that cannot be paid: stock is reserved, the charge fails, the saga
  # releases the stock and the order ends cancelled with the reason
  curl -s -X POST $GW/api/orders/checkout -H "authorization: Bearer $TOKEN" \
    -H 'content-type: application/json' -d '{{"items":[{{"product_id":"machine","quantity":1}}]}}'
  # the cart over gRPC through the gateway (grpcurl, with the proto in this repository)
  grpcurl -plaintext -import-path proto -proto tessera/shop/cart/v1/cart.proto \
    -H "authorization: Bearer $TOKEN" -d '{{"product_id":"filter","quantity":1}}' \
    {gateway} tessera.shop.cart.v1.Cart/AddItem
  # the sagas behind them, and the order events
  curl -s 'http://{registry}/v1/sagas?limit=5'
  curl -s 'http://{registry}/v1/streams/order-*'
"#,
        logs = dir.join("logs").display()
    );
}
