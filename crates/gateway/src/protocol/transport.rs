//! How the gateway reaches an upstream endpoint: plain TCP, or TLS verified against the
//! upstream's CA (the system roots unless one is configured) with an optional client
//! certificate (mTLS). A TLS failure is a connect failure: the request was not sent, so it
//! may go to another endpoint.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::floor::config::{ConfigError, Protocol, UpstreamTls};

/// Why a connection could not be had; the request was not sent, so any request may be
/// retried elsewhere.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(pub String);

/// An open connection to an upstream endpoint.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    /// Whether a pooled connection can carry another request: it must not have been
    /// closed (or have sent anything) while idle. Asks the runtime's readiness state
    /// first, so the usual answer costs no system call.
    pub fn is_reusable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let tcp = match self {
            Io::Plain(s) => &*s,
            Io::Tls(s) => s.get_ref().0,
        };
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => return true,
            Poll::Ready(Err(_)) => return false,
            Poll::Ready(Ok(())) => {}
        }
        match self {
            Io::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // Bytes while idle may be TLS records with no data in them (TLS 1.3 session
            // tickets): only application data or a close makes the connection unusable.
            Io::Tls(s) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                matches!(
                    Pin::new(s.as_mut()).poll_read(&mut cx, &mut buf),
                    Poll::Pending
                )
            }
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens connections for one upstream.
pub struct Connector {
    tls: Option<ClientTls>,
    /// Different for every connector built: pooled connections opened by another
    /// (an earlier config, or another upstream sharing the service) are not reused.
    id: u64,
}

struct ClientTls {
    connector: TlsConnector,
    /// The name certificates are checked against; else each endpoint's host.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Connector {
    /// `key` names the upstream's `tls` table in errors.
    pub fn build(
        key: &str,
        tls: Option<&UpstreamTls>,
        protocol: Protocol,
    ) -> Result<Connector, ConfigError> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let Some(cfg) = tls else {
            return Ok(Connector { tls: None, id });
        };
        let invalid = |field: &str, problem: String| ConfigError::Invalid {
            key: format!("{key}.{field}"),
            problem,
        };
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.ca {
            Some(path) => {
                let certs = crate::protocol::tls::read_certs(path)
                    .map_err(|e| invalid("ca", format!("{}: {e}", path.display())))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(invalid(
                        "ca",
                        format!("{}: no usable CA certificate", path.display()),
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(invalid(
                        "ca",
                        "no CA file given and no system CA certificates found".into(),
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("ca", e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) => {
                let chain = crate::protocol::tls::read_certs(cert)
                    .map_err(|e| invalid("cert", format!("{}: {e}", cert.display())))?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| invalid("key", format!("{}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| invalid("cert", format!("{}: {e}", cert.display())))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(invalid(
                    "cert",
                    "a client certificate needs both cert and key".into(),
                ));
            }
        };
        config.alpn_protocols = match protocol {
            Protocol::Http1 => vec![b"http/1.1".to_vec()],
            Protocol::H2c => vec![b"h2".to_vec()],
        };
        let server_name = cfg
            .server_name
            .as_deref()
            .map(|n| {
                ServerName::try_from(n.to_owned())
                    .map_err(|e| invalid("server_name", format!("{n:?}: {e}")))
            })
            .transpose()?;
        Ok(Connector {
            tls: Some(ClientTls {
                connector: TlsConnector::from(Arc::new(config)),
                server_name,
            }),
            id,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects (and shakes hands) within `timeout`.
    pub async fn connect(&self, addr: &str, timeout: Duration) -> Result<Io, ConnectError> {
        let work = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| ConnectError(format!("connect: {e}")))?;
            let _ = stream.set_nodelay(true);
            let Some(tls) = &self.tls else {
                return Ok(Io::Plain(stream));
            };
            let name = match &tls.server_name {
                Some(n) => n.clone(),
                None => ServerName::try_from(
                    crate::floor::net::unbracket(crate::floor::net::strip_port(addr)).to_owned(),
                )
                .map_err(|e| ConnectError(format!("no TLS server name: {e}")))?,
            };
            let stream = tls
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| ConnectError(format!("TLS handshake: {e}")))?;
            Ok(Io::Tls(Box::new(stream)))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ConnectError("connect timed out".to_owned()))?
    }
}
