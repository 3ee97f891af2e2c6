//! Accepting connections (plain and TLS), admission, the admin server, config reloads
//! and draining: what runs the proxy.

mod admin;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::floor::config::{self, Config, ConfigError};
use crate::floor::file_stamp;
use crate::floor::net::Cidr;
use crate::policy::routes::Table;
use crate::policy::upstream::Discovery;
use crate::protocol::peer::Peer;
use crate::protocol::{h1, tls};
use crate::proxy::Proxy;

/// What every connection and the admin server share.
pub struct Shared {
    /// The request path's state, shared with every connection.
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) discovery: Discovery,
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) reloads: AtomicU64,
    pub(crate) reload_lock: std::sync::Mutex<()>,
    /// The certificates TLS connections are served with, when `[tls]` is configured.
    pub(crate) certs: Option<Arc<tls::Certs>>,
    /// Connections accepted by each worker, set when serving starts.
    pub(crate) worker_connections: std::sync::OnceLock<Box<[AtomicU64]>>,
    /// Set on SIGTERM: `/readyz` answers 503 while the gateway serves on for its drain
    /// delay.
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Re-reads the config file and swaps the route table. An invalid file changes
    /// nothing: the old table keeps serving.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.config_path else {
            return Err(ConfigError::Parse("no config file to reload from".into()));
        };
        let cfg = Config::load(path)?;
        let table = Table::build(&cfg, &self.discovery, Some(&self.proxy.table.load()))?;
        match (&self.certs, &cfg.tls) {
            (Some(certs), Some(tls)) => certs.replace(&tls.certificates)?,
            (None, None) => {}
            _ => tracing::warn!("adding or removing [tls] takes a restart; reloading the rest"),
        }
        self.proxy.table.store(Arc::new(table));
        self.reloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(path = %path.display(), "config reloaded");
        Ok(())
    }
}

pub struct Gateway {
    shared: Arc<Shared>,
    drain_delay: Duration,
    drain_timeout: Duration,
    header_read_timeout: Duration,
    watch_config: bool,
    /// Checked once per connection (a reload does not change it: restart to).
    trusted_proxies: Vec<Cidr>,
    max_connections_per_ip: u32,
    tls: Option<tls::Terminator>,
    tls_listener: Option<TcpListener>,
}

impl Gateway {
    /// Builds the route table, loads the TLS certificates and starts discovery. Call
    /// inside a Tokio runtime. `config_path` is where reloads read from. Fails when a
    /// certificate or key file does not load.
    pub fn build(config: Config, config_path: Option<PathBuf>) -> Result<Gateway, ConfigError> {
        let tls = config
            .tls
            .as_ref()
            .map(tls::Terminator::build)
            .transpose()?;
        // Before any endpoint's pool exists: each gets a slot per worker.
        crate::protocol::h1::pool::reserve_workers(config.workers.count());
        let discovery = Discovery::new(config.registry.clone());
        let table = Table::build(&config, &discovery, None)?;
        Ok(Gateway {
            shared: Arc::new(Shared {
                proxy: Arc::new(Proxy {
                    table: ArcSwap::from_pointee(table),
                    replay_cap: config.max_replay_body_bytes,
                    max_body: config.max_request_body_bytes,
                    // `path_params` is per route, in the table.
                    path_rules: crate::floor::path::PathRules {
                        keep_encoded_slashes: config.encoded_slashes
                            == config::EncodedSlashes::Keep,
                        params: crate::floor::path::PathParams::Reject,
                    },
                    in_flight: std::sync::atomic::AtomicUsize::new(0),
                    max_in_flight: config.max_in_flight,
                    access_sample: config.access_log.sample,
                    tracer: None,
                }),
                discovery,
                config_path,
                reloads: AtomicU64::new(0),
                reload_lock: std::sync::Mutex::new(()),
                certs: tls.as_ref().map(|t| t.certs.clone()),
                worker_connections: std::sync::OnceLock::new(),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
            drain_delay: config.drain_delay,
            drain_timeout: config.drain_timeout,
            header_read_timeout: config.header_read_timeout,
            watch_config: config.watch_config,
            max_connections_per_ip: config.max_connections_per_ip,
            trusted_proxies: config
                .trusted_proxies
                .iter()
                .filter_map(|c| Cidr::parse(c).ok())
                .collect(),
            tls,
            tls_listener: None,
        })
    }

    /// Records spans with `tracer`: a server span per request and a client span per try,
    /// and passes each try's `traceparent` upstream. Called before the gateway runs.
    pub fn with_tracer(mut self, tracer: tessera_trace::Tracer) -> Gateway {
        let proxy = Arc::get_mut(&mut self.shared).and_then(|s| Arc::get_mut(&mut s.proxy));
        proxy
            .expect("nothing shares the proxy before the gateway runs")
            .tracer = Some(tracer);
        self
    }

    /// Also serves TLS on `listener` (bound to the config's `tls.listen` by the caller).
    /// Without `[tls]` in the config there is nothing to serve it with: it is refused.
    pub fn with_tls_listener(mut self, listener: TcpListener) -> Result<Gateway, ConfigError> {
        if self.tls.is_none() {
            return Err(ConfigError::Parse(
                "a TLS listener needs a [tls] section with certificates".into(),
            ));
        }
        self.tls_listener = Some(listener);
        Ok(self)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves on the calling runtime (one worker) until `shutdown` resolves, then stops
    /// accepting and drains in-flight requests for up to `drain_timeout`. Reloads on
    /// SIGHUP and when the config file changes.
    pub async fn run(
        mut self,
        listener: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let stop = CancellationToken::new();
        let tls_listener = self.tls_listener.take();
        let serving = self.start(admin, 1, &stop);
        tokio::spawn(self.drain_on(shutdown, stop.clone()));
        serve(serving, 0, listener, tls_listener, stop).await;
        self.shared.discovery.stop();
    }

    /// Serves on one thread per element of `workers`, each with its own current-thread
    /// runtime, listeners and upstream connections, so a request never crosses threads;
    /// admin, reloads and discovery run on the calling runtime. Returns once `shutdown`
    /// has resolved and every worker has drained. Fails when a worker cannot start.
    pub async fn run_workers(
        mut self,
        workers: Vec<WorkerListeners>,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if self.tls.is_some() != workers.iter().all(|w| w.tls.is_some()) {
            return Err(std::io::Error::other(
                "every worker needs a TLS listener when [tls] is configured, and none without",
            ));
        }
        self.tls_listener = None;
        let stop = CancellationToken::new();
        // Dropped unfinished (its runtime is going away): the workers stop too.
        let _stop_on_drop = stop.clone().drop_guard();
        let serving = self.start(admin, workers.len(), &stop);
        let mut threads = Vec::new();
        for (i, w) in workers.into_iter().enumerate() {
            let serving = serving.clone();
            let worker_stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("gateway-{i}"))
                .spawn(move || -> std::io::Result<()> {
                    crate::protocol::h1::pool::enter_worker(i);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let listen = |l: std::net::TcpListener| {
                            l.set_nonblocking(true)?;
                            TcpListener::from_std(l)
                        };
                        let plain = listen(w.plain)?;
                        let tls = w.tls.map(listen).transpose()?;
                        serve(serving, i, plain, tls, worker_stop).await;
                        Ok(())
                    })
                });
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        tokio::spawn(self.drain_on(shutdown, stop.clone()));
        let joined = tokio::task::spawn_blocking(move || {
            let mut result = Ok(());
            for t in threads {
                let r = t
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a gateway worker panicked")));
                if let Err(e) = r {
                    // One worker down takes the gateway down: the others stop too.
                    stop.cancel();
                    result = result.and(Err(e));
                }
            }
            result
        })
        .await
        .map_err(std::io::Error::other)?;
        self.shared.discovery.stop();
        joined
    }

    /// Starts what runs once per gateway (admin, config watch, SIGHUP, certificate
    /// reloads) on the calling runtime, and returns what every worker serves with.
    fn start(&self, admin: TcpListener, workers: usize, stop: &CancellationToken) -> Arc<Serving> {
        let _ = self
            .shared
            .worker_connections
            .set((0..workers).map(|_| AtomicU64::new(0)).collect());
        tokio::spawn(serve_admin(self.shared.clone(), admin, stop.clone()));
        if self.shared.config_path.is_some() {
            if self.watch_config {
                tokio::spawn(watch_config(self.shared.clone(), stop.clone()));
            }
            // Registered here, before the first connection is served, so a SIGHUP is never
            // met by the default action (terminate).
            #[cfg(unix)]
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(hup) => {
                    tokio::spawn(on_sighup(self.shared.clone(), hup, stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/reload");
                }
            }
        }
        if let Some(certs) = &self.shared.certs {
            tokio::spawn(tls::watch(
                certs.clone(),
                Duration::from_secs(1),
                stop.clone(),
            ));
        }
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            // The same head limits as the gateway's own parser (h1/server.rs).
            .max_buf_size(h1::MAX_HEAD)
            .max_headers(h1::MAX_HEADERS)
            .keep_alive(true)
            .writev(false);
        // HTTP/2 limits against hostile clients: 1024 streams per connection; a decoded
        // header list (HPACK, CONTINUATION frames) of at most the HTTP/1.1 head limit; a
        // client that resets streams faster than they are accepted (rapid reset,
        // CVE-2023-44487) or keeps provoking stream errors gets the connection closed.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(1024)
            .max_header_list_size(h1::MAX_HEAD as u32)
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(256))
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Arc::new(Serving {
            shared: self.shared.clone(),
            hyper: Arc::new(builder),
            per_ip: Arc::new(ConnsPerIp::default()),
            trusted_proxies: self.trusted_proxies.clone(),
            max_connections_per_ip: self.max_connections_per_ip,
            header_read_timeout: self.header_read_timeout,
            drain_timeout: self.drain_timeout,
            tls: self.tls.clone(),
        })
    }
}

/// One worker's listeners: sockets of its own on the gateway's addresses
/// (`SO_REUSEPORT`), so the kernel spreads new connections over the workers.
pub struct WorkerListeners {
    pub plain: std::net::TcpListener,
    pub tls: Option<std::net::TcpListener>,
}

/// Binds `workers` listeners on `plain` (and on `tls`), with `SO_REUSEPORT`. A port 0
/// is chosen by the first and shared by the rest. Call inside a Tokio runtime.
pub fn bind_workers(
    plain: std::net::SocketAddr,
    tls: Option<std::net::SocketAddr>,
    workers: usize,
) -> std::io::Result<Vec<WorkerListeners>> {
    let plain = bind_reuseport(plain, workers)?;
    let mut tls = match tls {
        Some(addr) => bind_reuseport(addr, workers)?
            .into_iter()
            .map(Some)
            .collect(),
        None => Vec::new(),
    };
    tls.resize_with(plain.len(), || None);
    Ok(plain
        .into_iter()
        .zip(tls)
        .map(|(plain, tls)| WorkerListeners { plain, tls })
        .collect())
}

fn bind_reuseport(
    addr: std::net::SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?.into_std()?;
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

impl Gateway {
    /// Once `shutdown` resolves: `/readyz` turns 503 and the gateway serves on for its
    /// drain delay, then `stop` (stop accepting, finish what is in flight).
    fn drain_on<F: Future<Output = ()>>(
        &self,
        shutdown: F,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + use<F> {
        let (shared, delay) = (self.shared.clone(), self.drain_delay);
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop.cancelled() => return,
            }
            shared.draining.store(true, Ordering::Release);
            if !delay.is_zero() {
                tracing::info!(
                    delay = %tessera_core::GoDuration(delay),
                    "draining: /readyz answers 503; serving on until the delay ends"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {}
                }
            }
            stop.cancel();
        }
    }
}

/// What every worker's accept loop serves with, built once.
struct Serving {
    shared: Arc<Shared>,
    hyper: Arc<auto::Builder<TokioExecutor>>,
    per_ip: Arc<ConnsPerIp>,
    /// Checked once per connection (a reload does not change it: restart to).
    trusted_proxies: Vec<Cidr>,
    max_connections_per_ip: u32,
    header_read_timeout: Duration,
    drain_timeout: Duration,
    tls: Option<tls::Terminator>,
}

/// One worker's accept loop, until `stop`; then it drains the worker's connections for
/// up to `drain_timeout`.
async fn serve(
    serving: Arc<Serving>,
    worker: usize,
    listener: TcpListener,
    tls_listener: Option<TcpListener>,
    stop: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let accepted_here = serving
        .shared
        .worker_connections
        .get()
        .and_then(|c| c.get(worker));
    loop {
        let (accepted, secure) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => (a, false),
            a = accept_tls(&tls_listener) => (a, true),
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(n) = accepted_here {
            n.fetch_add(1, Ordering::Relaxed);
        }
        let slot = match serving
            .per_ip
            .clone()
            .admit(peer.ip(), serving.max_connections_per_ip)
        {
            Some(slot) => slot,
            None => {
                // Told why, not just reset; never read from. (On the TLS port the
                // client sees a failed handshake: there is no session to answer in.)
                let _ = stream.try_write(TOO_MANY_CONNECTIONS);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = &serving.shared.proxy;
        let mut ctx = h1::server::Ctx {
            handler: proxy.clone(),
            replay_cap: proxy.replay_cap,
            max_body: proxy.max_body,
            peer: Peer::new(peer, &serving.trusted_proxies),
            stop: stop.clone(),
            header_timeout: serving.header_read_timeout,
            hyper: serving.hyper.clone(),
        };
        let watcher = graceful.watcher();
        match (&serving.tls, secure) {
            (Some(t), true) => {
                let acceptor = t.acceptor.clone();
                let certs = t.certs.clone();
                tokio::spawn(async move {
                    // The handshake is part of the head: a client that stalls in it is
                    // cut off at the same deadline.
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(ctx.header_timeout, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = stream.get_ref().1;
                    let h2 = conn.alpn_protocol() == Some(b"h2");
                    ctx.peer.set_tls(certs.pick(conn.server_name()));
                    h1::server::serve(stream, ctx, watcher, h2).await;
                    drop(slot);
                });
            }
            _ => {
                tokio::spawn(async move {
                    h1::server::serve(stream, ctx, watcher, false).await;
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    drop(tls_listener);
    if tokio::time::timeout(serving.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            worker,
            "drain timeout reached with requests still in flight; closing them"
        );
    }
}

async fn serve_admin(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(admin::handle(shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Reloads when the config file's modification time or size changes (checked every
/// second: cheap, and works on every filesystem, unlike inotify on some mounts).
async fn watch_config(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(path) = shared.config_path.clone() else {
        return;
    };
    let mut last = file_stamp(&path);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = file_stamp(&path);
        if now != last {
            last = now;
            if let Err(e) = shared.reload() {
                tracing::error!(error = %e, "config file changed but is invalid; keeping the running config");
            }
        }
    }
}

#[cfg(unix)]
async fn on_sighup(
    shared: Arc<Shared>,
    mut hup: tokio::signal::unix::Signal,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        if let Err(e) = shared.reload() {
            tracing::error!(error = %e, "SIGHUP reload refused; keeping the running config");
        }
    }
}

/// The next connection on the TLS listener; never, without one.
async fn accept_tls(
    tls: &Option<TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match tls {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 80\r\nretry-after: 1\r\nconnection: close\r\n\r\n{\"error\":\"too many connections from this address\",\"code\":\"too_many_connections\"}";

/// Open connections per client address, so one client cannot hold every socket.
#[derive(Default)]
struct ConnsPerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>);

/// One admitted connection; gives its place back when dropped.
struct ConnSlot(Arc<ConnsPerIp>, std::net::IpAddr);

impl ConnsPerIp {
    fn admit(self: Arc<Self>, ip: std::net::IpAddr, max: u32) -> Option<ConnSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        drop(m);
        Some(ConnSlot(self, ip))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut m = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}
