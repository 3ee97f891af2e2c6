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
                }),
                discovery,
                config_path,
                reloads: AtomicU64::new(0),
                reload_lock: std::sync::Mutex::new(()),
                certs: tls.as_ref().map(|t| t.certs.clone()),
            }),
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

    /// Serves until `shutdown` resolves, then stops accepting and drains in-flight
    /// requests for up to `drain_timeout`. Reloads on SIGHUP and when the config file
    /// changes.
    pub async fn run(
        self,
        listener: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let stop = tokio_util::sync::CancellationToken::new();
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
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
        let builder = Arc::new(builder);
        let per_ip = Arc::new(ConnsPerIp::default());
        let tls = self.tls.map(|t| (t, self.tls_listener));
        if let Some(certs) = &self.shared.certs {
            tokio::spawn(tls::watch(
                certs.clone(),
                Duration::from_secs(1),
                stop.clone(),
            ));
        }
        tokio::pin!(shutdown);
        loop {
            let (accepted, secure) = tokio::select! {
                _ = &mut shutdown => break,
                a = listener.accept() => (a, false),
                a = accept_tls(&tls) => (a, true),
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
            let slot = match per_ip.clone().admit(peer.ip(), self.max_connections_per_ip) {
                Some(slot) => slot,
                None => {
                    // Told why, not just reset; never read from. (On the TLS port the
                    // client sees a failed handshake: there is no session to answer in.)
                    let _ = stream.try_write(TOO_MANY_CONNECTIONS);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let proxy = &self.shared.proxy;
            let mut ctx = h1::server::Ctx {
                handler: proxy.clone(),
                replay_cap: proxy.replay_cap,
                max_body: proxy.max_body,
                peer: Peer::new(peer, &self.trusted_proxies),
                stop: stop.clone(),
                header_timeout: self.header_read_timeout,
                hyper: builder.clone(),
            };
            let watcher = graceful.watcher();
            match (&tls, secure) {
                (Some((t, _)), true) => {
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
        stop.cancel();
        self.shared.discovery.stop();
        if tokio::time::timeout(self.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout reached with requests still in flight; closing them");
        }
    }
}

async fn serve_admin(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: tokio_util::sync::CancellationToken,
) {
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
async fn watch_config(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
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
    stop: tokio_util::sync::CancellationToken,
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
    tls: &Option<(tls::Terminator, Option<TcpListener>)>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match tls {
        Some((_, Some(l))) => l.accept().await,
        _ => std::future::pending().await,
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
