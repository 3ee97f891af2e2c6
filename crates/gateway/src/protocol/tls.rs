//! TLS termination. Certificates are chosen by SNI from the configured list (exact name,
//! then a one-label wildcard, then the first certificate), are re-read from disk when their
//! files change, and each request is checked against the certificate its connection was
//! served with: a client that reuses a connection for a host that certificate does not
//! cover gets 421 (what HTTP/2 connection coalescing expects of a server).
//!
//! Protocols are TLS 1.2 and 1.3 only (rustls has nothing older), with ring's default
//! suites: TLS 1.3 AES-GCM and ChaCha20-Poly1305, TLS 1.2 ECDHE with AES-GCM or
//! ChaCha20-Poly1305; no CBC, no RSA key exchange, no SHA-1 suites.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsAcceptor;

use crate::floor::config::{CertFiles, ConfigError, TlsConfig, TlsVersion};

/// One served certificate: the chain and key rustls signs with, and the DNS names SNI
/// is matched against.
#[derive(Debug)]
pub struct Cert {
    key: Arc<CertifiedKey>,
    /// Lower-case names from the subject alternative names; `*.example.com` for wildcards.
    names: Vec<String>,
    /// SHA-256 of the leaf certificate, hex: what `/admin/tls` shows to tell versions apart.
    fingerprint: String,
    /// Hosts already found covered, so the usual request (the same host again) skips
    /// parsing the certificate. Only positive answers, and only a few: a wildcard covers
    /// endless names, and a client choosing them must not grow this.
    covered: std::sync::Mutex<Vec<Box<str>>>,
}

/// Most hosts remembered per certificate.
const MAX_COVERED: usize = 16;

impl Cert {
    fn load(files: &CertFiles, index: usize) -> Result<Cert, ConfigError> {
        let key_name = format!("tls.certificates[{index}]");
        let chain =
            read_certs(&files.cert).map_err(|e| pem_error(&key_name, "cert", &files.cert, e))?;
        if chain.is_empty() {
            return Err(ConfigError::Invalid {
                key: format!("{key_name}.cert"),
                problem: format!("{}: no CERTIFICATE in the file", files.cert.display()),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| pem_error(&key_name, "key", &files.key, e))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified =
            CertifiedKey::from_der(chain, key, &provider).map_err(|e| ConfigError::Invalid {
                key: key_name.clone(),
                problem: format!("{} with {}: {e}", files.cert.display(), files.key.display()),
            })?;
        let leaf = webpki::EndEntityCert::try_from(&certified.cert[0]).map_err(|e| {
            ConfigError::Invalid {
                key: format!("{key_name}.cert"),
                problem: format!("{}: not a usable certificate: {e}", files.cert.display()),
            }
        })?;
        let names = leaf
            .valid_dns_names()
            .map(|n| n.to_ascii_lowercase())
            .collect();
        let digest = ring::digest::digest(&ring::digest::SHA256, &certified.cert[0]);
        let fingerprint = crate::floor::hex(digest.as_ref());
        Ok(Cert {
            key: Arc::new(certified),
            names,
            fingerprint,
            covered: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Whether a TLS client would accept this certificate for `host` (a `Host` value
    /// without its port): the same name rules, IP addresses included.
    pub fn covers(&self, host: &str) -> bool {
        let lock = || self.covered.lock().unwrap_or_else(|p| p.into_inner());
        if lock().iter().any(|h| **h == *host) {
            return true;
        }
        let Ok(name) = ServerName::try_from(crate::floor::net::unbracket(host)) else {
            return false;
        };
        let ok = match webpki::EndEntityCert::try_from(&self.key.cert[0]) {
            Ok(leaf) => leaf.verify_is_valid_for_subject_name(&name).is_ok(),
            Err(_) => false,
        };
        if ok {
            let mut covered = lock();
            if covered.len() < MAX_COVERED {
                covered.push(host.into());
            }
        }
        ok
    }

    fn matches_exactly(&self, sni: &str) -> bool {
        self.names.iter().any(|n| n == sni)
    }

    fn matches_wildcard(&self, sni: &str) -> bool {
        let Some((_, parent)) = sni.split_once('.') else {
            return false;
        };
        self.names
            .iter()
            .any(|n| n.strip_prefix("*.").is_some_and(|p| p == parent))
    }
}

/// Every certificate in a PEM file, in order.
pub fn read_certs(
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    CertificateDer::pem_file_iter(path)?.collect()
}

fn pem_error(key: &str, field: &str, path: &Path, e: rustls_pki_types::pem::Error) -> ConfigError {
    ConfigError::Invalid {
        key: format!("{key}.{field}"),
        problem: format!("{}: {e}", path.display()),
    }
}

/// Modification time and size of every cert and key file, to notice a rotation.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// The served certificates, swapped whole when their files change or a reload names
/// others. A failed load keeps the certificates being served.
#[derive(Debug)]
pub struct Certs {
    served: ArcSwap<Vec<Arc<Cert>>>,
    source: Mutex<Source>,
}

#[derive(Debug)]
struct Source {
    files: Vec<CertFiles>,
    stamps: Stamps,
    /// Why the files on disk are not the ones served, if they are not.
    error: Option<String>,
}

impl Certs {
    pub fn load(files: &[CertFiles]) -> Result<Certs, ConfigError> {
        let served = load_all(files)?;
        Ok(Certs {
            served: ArcSwap::from_pointee(served),
            source: Mutex::new(Source {
                files: files.to_vec(),
                stamps: stamps(files),
                error: None,
            }),
        })
    }

    /// The certificate for a client hello's server name (lower-cased by rustls).
    pub fn pick(&self, sni: Option<&str>) -> Arc<Cert> {
        let served = self.served.load();
        let found = sni.and_then(|sni| {
            let sni = sni.to_ascii_lowercase();
            served
                .iter()
                .find(|c| c.matches_exactly(&sni))
                .or_else(|| served.iter().find(|c| c.matches_wildcard(&sni)))
        });
        // `load_all` refuses an empty list, so there is always a first one.
        found.unwrap_or(&served[0]).clone()
    }

    /// Serves the certificates `files` names from now on (a config reload).
    pub fn replace(&self, files: &[CertFiles]) -> Result<(), ConfigError> {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        let served = load_all(files)?;
        self.served.store(Arc::new(served));
        *source = Source {
            files: files.to_vec(),
            stamps: stamps(files),
            error: None,
        };
        Ok(())
    }

    /// Re-reads the files if any changed since the last look. Returns whether new
    /// certificates are being served.
    pub fn refresh(&self) -> Result<bool, ConfigError> {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamps(&source.files);
        if now == source.stamps {
            return Ok(false);
        }
        // Remembered even when the load fails: a half-written pair is tried again when
        // its other file changes, not every second.
        source.stamps = now;
        match load_all(&source.files) {
            Ok(served) => {
                self.served.store(Arc::new(served));
                source.error = None;
                Ok(true)
            }
            Err(e) => {
                source.error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// What `/admin/tls` shows: each served certificate and any pending load error.
    pub fn describe(&self) -> serde_json::Value {
        let source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        let served = self.served.load();
        let certs: Vec<_> = served
            .iter()
            .zip(source.files.iter())
            .map(|(c, f)| {
                serde_json::json!({
                    "cert": f.cert.display().to_string(),
                    "key": f.key.display().to_string(),
                    "names": c.names,
                    "sha256": c.fingerprint,
                })
            })
            .collect();
        serde_json::json!({"certificates": certs, "reload_error": source.error})
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).key.clone())
    }
}

fn load_all(files: &[CertFiles]) -> Result<Vec<Arc<Cert>>, ConfigError> {
    if files.is_empty() {
        return Err(ConfigError::Invalid {
            key: "tls.certificates".into(),
            problem: "at least one certificate is needed".into(),
        });
    }
    files
        .iter()
        .enumerate()
        .map(|(i, f)| Cert::load(f, i).map(Arc::new))
        .collect()
}

fn stamps(files: &[CertFiles]) -> Stamps {
    files
        .iter()
        .flat_map(|f| {
            [
                crate::floor::file_stamp(&f.cert),
                crate::floor::file_stamp(&f.key),
            ]
        })
        .collect()
}

/// What accepting TLS connections needs: the acceptor and the certificates it serves.
#[derive(Clone)]
pub struct Terminator {
    pub acceptor: TlsAcceptor,
    pub certs: Arc<Certs>,
}

impl Terminator {
    pub fn build(cfg: &TlsConfig) -> Result<Terminator, ConfigError> {
        let certs = Arc::new(Certs::load(&cfg.certificates)?);
        let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| ConfigError::Invalid {
                key: "tls.min_version".into(),
                problem: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Resumption by ticket saves a full handshake for returning clients; the ticket
        // keys rotate every six hours and live only in this process.
        if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
            config.ticketer = ticketer;
        }
        Ok(Terminator {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certs,
        })
    }
}

/// Re-reads rotated certificate files every `every`, logging (and keeping the served
/// certificates) when the new files do not load.
pub async fn watch(certs: Arc<Certs>, every: Duration, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match certs.refresh() {
            Ok(true) => tracing::info!("TLS certificates reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate files changed but do not load; serving the previous ones")
            }
        }
    }
}
