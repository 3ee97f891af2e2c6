//! TLS termination: certificates chosen by SNI, ALPN, 421 for a host the connection's
//! certificate does not cover, the TLS version floor, certificate reload from disk and by
//! config reload, the handshake deadline, and config errors. Certificates come from a CA
//! made here with rcgen; clients are rustls with only that CA trusted, so a handshake that
//! succeeds for a name proves the gateway served a certificate valid for it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::RootCertStore;
use rustls::client::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tessera_gateway::{Config, Gateway};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::support::{TestGateway, Upstream, wait_for};

pub struct Ca(CertifiedIssuer<'static, KeyPair>);

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tessera test CA");
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A leaf certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.0.der().clone()).unwrap();
        roots
    }
}

impl Leaf {
    /// Writes `NAME.pem` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join(format!("{name}.key")), &self.key_pem).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), &self.cert_pem).unwrap();
    }
}

/// A TLS connection to `addr` verifying the server as `name` (no SNI for an IP address).
async fn connect(
    addr: std::net::SocketAddr,
    ca: &Ca,
    name: &str,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(ca.roots())
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
}

const ALL: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The leaf certificate the server presented.
fn served(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// One HTTP/1.1 or HTTP/2 connection over TLS.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn open(tls: TlsStream<TcpStream>) -> Conn {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Conn::H1(send)
        }
    }

    /// GET `path` for `host`; the status and the JSON body.
    async fn get(&mut self, host: &str, path: &str) -> (StatusCode, serde_json::Value) {
        let resp = match self {
            Conn::H1(s) => {
                let req = Request::get(path)
                    .header("host", host)
                    .body(Full::default())
                    .unwrap();
                s.send_request(req).await.unwrap()
            }
            Conn::H2(s) => {
                let req = Request::get(format!("https://{host}{path}"))
                    .body(Full::default())
                    .unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }
}

fn config(up: &Upstream, dir: &Path, certs: &[&str], extra: &str) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|n| {
            format!(
                "{{ cert = {:?}, key = {:?} }}",
                dir.join(format!("{n}.pem")),
                dir.join(format!("{n}.key"))
            )
        })
        .collect();
    format!(
        r#"
        {extra}
        [tls]
        certificates = [{}]

        [[routes]]
        path = {{ prefix = "/" }}
        upstream = "u"

        [upstreams.u]
        endpoints = ["{}"]
        "#,
        list.join(", "),
        up.addr
    )
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_requests_must_be_for_its_names() {
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let a = ca.issue(&["a.test", "*.a.test", "127.0.0.1"]);
    let b = ca.issue(&["b.test"]);
    a.write(dir.path(), "a");
    b.write(dir.path(), "b");
    let gw = TestGateway::start(&config(&up, dir.path(), &["a", "b"], "")).await;
    let addr = gw.tls_addr.unwrap();

    let tls = connect(addr, &ca, "a.test", &[b"http/1.1"], ALL)
        .await
        .unwrap();
    assert_eq!(served(&tls), a.der);
    let mut conn = Conn::open(tls).await;
    let (status, body) = conn.get("a.test", "/x").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");
    // The same connection for a host its certificate does not cover.
    let hits = up.hits();
    let (status, body) = conn.get("b.test", "/x").await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
    assert_eq!(body["code"], "misdirected_request");
    assert_eq!(
        up.hits(),
        hits,
        "a misdirected request reached the upstream"
    );
    // The connection stays usable for its own names.
    assert_eq!(conn.get("a.test:443", "/y").await.0, 200);

    let tls = connect(addr, &ca, "b.test", &[], ALL).await.unwrap();
    assert_eq!(served(&tls), b.der);
    let mut conn = Conn::open(tls).await;
    assert_eq!(conn.get("b.test", "/").await.0, 200);
    assert_eq!(conn.get("www.a.test", "/").await.0, 421);

    // A wildcard covers one label.
    let tls = connect(addr, &ca, "www.a.test", &[], ALL).await.unwrap();
    assert_eq!(served(&tls), a.der);
    assert_eq!(Conn::open(tls).await.get("www.a.test", "/").await.0, 200);

    // No SNI (an IP address) or an unknown name: the first certificate.
    let tls = connect(addr, &ca, "127.0.0.1", &[], ALL).await.unwrap();
    assert_eq!(served(&tls), a.der);
    assert_eq!(Conn::open(tls).await.get("127.0.0.1", "/").await.0, 200);
    let err = connect(addr, &ca, "c.test", &[], ALL).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");

    // Plain HTTP keeps working beside TLS, and says so upstream.
    let (status, _, body) = gw.http.get("/plain").await;
    assert_eq!(status, 200);
    assert_eq!(body["headers"]["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn alpn_offers_h2_and_http11() {
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.issue(&["a.test"]).write(dir.path(), "a");
    ca.issue(&["b.test"]).write(dir.path(), "b");
    let gw = TestGateway::start(&config(&up, dir.path(), &["a", "b"], "")).await;
    let addr = gw.tls_addr.unwrap();

    let tls = connect(addr, &ca, "a.test", &[b"h2", b"http/1.1"], ALL)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut conn = Conn::open(tls).await;
    assert!(matches!(conn, Conn::H2(_)));
    let (status, body) = conn.get("a.test", "/h2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/h2");
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");
    // HTTP/2 coalescing onto a connection whose certificate does not cover the host.
    let (status, body) = conn.get("b.test", "/h2").await;
    assert_eq!(status, 421, "{body}");
    assert_eq!(conn.get("a.test", "/again").await.0, 200);

    let tls = connect(addr, &ca, "b.test", &[b"http/1.1"], ALL)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(Conn::open(tls).await.get("b.test", "/").await.0, 200);
}

#[tokio::test]
async fn the_version_floor_refuses_older_clients() {
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.issue(&["a.test"]).write(dir.path(), "a");
    let tls12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

    let gw = TestGateway::start(&config(&up, dir.path(), &["a"], "")).await;
    let tls = connect(gw.tls_addr.unwrap(), &ca, "a.test", &[], tls12)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );

    let toml = config(&up, dir.path(), &["a"], "")
        .replace("[tls]\n", "[tls]\n        min_version = \"1.3\"\n");
    let gw13 = TestGateway::start(&toml).await;
    let addr = gw13.tls_addr.unwrap();
    assert!(connect(addr, &ca, "a.test", &[], tls12).await.is_err());
    let tls = connect(addr, &ca, "a.test", &[], ALL).await.unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[tokio::test]
async fn certificates_are_reloaded_from_disk_and_a_bad_file_keeps_the_old_one() {
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let first = ca.issue(&["a.test"]);
    first.write(dir.path(), "a");
    let mut gw = TestGateway::start(&config(&up, dir.path(), &["a"], "")).await;
    let addr = gw.tls_addr.unwrap();
    let served_now = || {
        let ca = &ca;
        async move {
            let tls = connect(addr, ca, "a.test", &[], ALL).await.unwrap();
            served(&tls)
        }
    };
    assert_eq!(served_now().await, first.der);

    // Rotated on disk (new key too): new handshakes get it, with no restart.
    let second = ca.issue(&["a.test"]);
    second.write(dir.path(), "a");
    wait_for("the rotated certificate to be served", || async {
        served_now().await == second.der
    })
    .await;
    let admin = gw.admin_http();
    let (status, _, tls_state) = admin.get("/admin/tls").await;
    assert_eq!(status, 200);
    assert_eq!(tls_state["certificates"][0]["names"][0], "a.test");
    assert!(tls_state["reload_error"].is_null(), "{tls_state}");

    // A broken file is reported and the last good certificate keeps being served.
    std::fs::write(dir.path().join("a.pem"), "not a certificate").unwrap();
    wait_for("the broken file to be reported", || async {
        !admin.get("/admin/tls").await.2["reload_error"].is_null()
    })
    .await;
    let (_, _, tls_state) = admin.get("/admin/tls").await;
    assert!(
        tls_state["reload_error"]
            .as_str()
            .unwrap()
            .contains("tls.certificates[0].cert"),
        "{tls_state}"
    );
    assert_eq!(served_now().await, second.der);
    let tls = connect(addr, &ca, "a.test", &[], ALL).await.unwrap();
    assert_eq!(Conn::open(tls).await.get("a.test", "/").await.0, 200);

    // A config reload may name other files; one naming a missing file is refused whole.
    ca.issue(&["c.test"]).write(dir.path(), "c");
    std::fs::write(
        &gw.config_path,
        config(&up, dir.path(), &["c", "missing"], ""),
    )
    .unwrap();
    let (status, _, body) = admin
        .send(http::Method::POST, "/admin/reload", &[], Bytes::new())
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("tls.certificates[1].cert"),
        "{body}"
    );
    assert!(connect(addr, &ca, "c.test", &[], ALL).await.is_err());
    std::fs::write(&gw.config_path, config(&up, dir.path(), &["c"], "")).unwrap();
    let (status, _, body) = admin
        .send(http::Method::POST, "/admin/reload", &[], Bytes::new())
        .await;
    assert_eq!(status, 200, "{body}");
    let tls = connect(addr, &ca, "c.test", &[], ALL).await.unwrap();
    assert_eq!(Conn::open(tls).await.get("c.test", "/").await.0, 200);
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_off_at_the_header_deadline() {
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.issue(&["a.test"]).write(dir.path(), "a");
    let gw = TestGateway::start(&config(
        &up,
        dir.path(),
        &["a"],
        r#"header_read_timeout = "3s""#,
    ))
    .await;
    let mut raw = TcpStream::connect(gw.tls_addr.unwrap()).await.unwrap();
    // Nothing sent: the gateway closes the connection on its own.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(60), raw.read(&mut buf))
        .await
        .expect("the gateway kept a silent TLS connection open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A client that completes its handshake is served.
    let tls = connect(gw.tls_addr.unwrap(), &ca, "a.test", &[], ALL)
        .await
        .unwrap();
    assert_eq!(Conn::open(tls).await.get("a.test", "/").await.0, 200);
}

#[tokio::test]
async fn certificate_errors_refuse_to_start_and_name_the_key() {
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let a = ca.issue(&["a.test"]);
    let b = ca.issue(&["b.test"]);
    a.write(dir.path(), "a");
    // b's certificate with a's key.
    std::fs::write(dir.path().join("mixed.pem"), &b.cert_pem).unwrap();
    std::fs::write(dir.path().join("mixed.key"), &a.key_pem).unwrap();
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    std::fs::write(dir.path().join("empty.key"), &a.key_pem).unwrap();
    let cases = [
        (vec!["a", "nope"], "tls.certificates[1].cert"),
        (vec!["mixed"], "tls.certificates[0]"),
        (vec!["empty"], "no CERTIFICATE"),
    ];
    for (certs, expect) in cases {
        let config = Config::parse(&config(&up, dir.path(), &certs, "")).unwrap();
        let err = Gateway::build(config, None).err().expect("built anyway");
        assert!(err.to_string().contains(expect), "{certs:?}: {err}");
    }
    let err = Config::parse(&config(&up, dir.path(), &[], "")).unwrap_err();
    assert!(err.to_string().contains("tls.certificates"), "{err}");
}

/// An HTTPS upstream answering `{"version", "client_cert", "sni"}`; with `client_ca` it
/// requires a client certificate issued by it. Counts accepted TCP connections.
async fn tls_upstream(
    leaf: &Leaf,
    client_ca: Option<&Ca>,
    fixed: Option<String>,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::server::WebPkiClientVerifier;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider)
                .build()
                .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let key = rustls_pki_types::PrivateKeyDer::try_from(
        rustls_pki_types::pem::PemObject::from_pem_slice(leaf.key_pem.as_bytes())
            .map(|k: rustls_pki_types::PrivatePkcs8KeyDer<'static>| k.secret_pkcs8_der().to_vec())
            .unwrap(),
    )
    .unwrap();
    let mut config = builder
        .with_single_cert(vec![leaf.der.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let fixed = fixed.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let conn = tls.get_ref().1;
                let client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                let sni = conn.server_name().map(str::to_owned);
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let sni = sni.clone();
                    let fixed = fixed.clone();
                    async move {
                        let body = fixed.unwrap_or_else(|| {
                            serde_json::json!({
                                "version": format!("{:?}", req.version()),
                                "client_cert": client_cert,
                                "sni": sni,
                            })
                            .to_string()
                        });
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, accepts)
}

#[tokio::test]
async fn upstream_tls_verifies_the_server_and_presents_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new();
    let client_ca = Ca::new();
    let d = dir.path();
    std::fs::write(d.join("server-ca.pem"), server_ca.pem()).unwrap();
    std::fs::write(d.join("client-ca.pem"), client_ca.pem()).unwrap();
    client_ca.issue(&["gateway.internal"]).write(d, "client");
    let (mtls_addr, mtls_accepts) =
        tls_upstream(&server_ca.issue(&["api.internal"]), Some(&client_ca), None).await;
    let (ip_addr, _) = tls_upstream(&server_ca.issue(&["127.0.0.1"]), None, None).await;

    let p = |name: &str| format!("{:?}", d.join(name));
    let upstream = |name: &str, addr: std::net::SocketAddr, tls: String, extra: &str| {
        format!(
            "[[routes]]\npath = {{ prefix = \"/{name}\" }}\nupstream = \"{name}\"\n\
             [upstreams.{name}]\nendpoints = [\"{addr}\"]\ntls = {{ {tls} }}\n{extra}\n"
        )
    };
    let full = format!(
        "ca = {}, server_name = \"api.internal\", cert = {}, key = {}",
        p("server-ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    let toml = [
        upstream("mtls", mtls_addr, full.clone(), ""),
        upstream("h2", mtls_addr, full.clone(), "protocol = \"h2\""),
        upstream(
            "nocert",
            mtls_addr,
            format!(
                "ca = {}, server_name = \"api.internal\"",
                p("server-ca.pem")
            ),
            "",
        ),
        upstream(
            "wrongca",
            mtls_addr,
            full.replace("server-ca.pem", "client-ca.pem"),
            "",
        ),
        upstream(
            "wrongname",
            mtls_addr,
            full.replace("api.internal", "other.internal"),
            "",
        ),
        upstream("byip", ip_addr, format!("ca = {}", p("server-ca.pem")), ""),
    ]
    .concat();
    let gw = TestGateway::start(&toml).await;

    for i in 0..5 {
        let (status, _, body) = gw.http.get("/mtls").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["client_cert"], true, "{i}: {body}");
        assert_eq!(body["sni"], "api.internal");
        assert_eq!(body["version"], "HTTP/1.1");
    }
    assert_eq!(
        mtls_accepts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the TLS connection is pooled and reused"
    );
    let (status, _, body) = gw.http.get("/h2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "HTTP/2.0");
    // The endpoint's own address is the name checked when none is configured.
    let (status, _, body) = gw.http.get("/byip").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["client_cert"], false);

    for (path, why) in [
        ("/nocert", "certificate"),
        ("/wrongca", "certificate"),
        ("/wrongname", "certificate"),
    ] {
        let (status, _, body) = gw.http.get(path).await;
        assert_eq!(status, 502, "{path}: {body}");
        let error = body["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(error.contains(why), "{path}: {body}");
    }
}

#[tokio::test]
async fn upstream_tls_file_errors_refuse_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.issue(&["client"]).write(dir.path(), "client");
    let base = |tls: &str| {
        format!(
            "[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\ntls = {{ {tls} }}\n"
        )
    };
    let missing = format!("ca = {:?}", dir.path().join("nope.pem"));
    let half = format!("cert = {:?}", dir.path().join("client.pem"));
    let bad_name = "server_name = \"not a name\"".to_owned();
    for (tls, expect) in [
        (missing, "upstreams.u.tls.ca"),
        (half, "upstreams.u.tls.cert"),
        (bad_name, "upstreams.u.tls.server_name"),
    ] {
        let config = Config::parse(&base(&tls)).unwrap();
        let err = Gateway::build(config, None).err().expect("built anyway");
        assert!(err.to_string().contains(expect), "{tls}: {err}");
    }
}

/// A JWKS served over HTTPS: fetched when its server's certificate checks out against
/// `jwks_ca`, and not trusted (every token refused) when it does not.
#[tokio::test]
async fn a_jwks_url_over_https_is_verified() {
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let other = Ca::new();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("other.pem"), other.pem()).unwrap();
    let signer =
        tessera_jwt::Signer::ed25519(&tessera_jwt::Signer::generate_pkcs8().unwrap()).unwrap();
    let jwks = serde_json::json!({"keys": [signer.jwk()]}).to_string();
    let (addr, _) = tls_upstream(&ca.issue(&["127.0.0.1"]), None, Some(jwks)).await;
    let config = |ca_file: &str| {
        format!(
            r#"
[jwt.idp]
jwks_url = "https://{addr}/.well-known/jwks.json"
jwks_ca = {:?}
[[routes]]
upstream = "u"
auth = {{ jwt = "idp" }}
[upstreams.u]
endpoints = ["{}"]
"#,
            dir.path().join(ca_file),
            up.addr
        )
    };
    let token = signer.sign(&serde_json::json!({"sub": "ada", "exp": 4_000_000_000u64}));
    let bearer = format!("Bearer {token}");
    let gw = TestGateway::start(&config("ca.pem")).await;
    wait_for("the JWKS to be fetched over HTTPS", || async {
        gw.http
            .send(
                http::Method::GET,
                "/",
                &[("authorization", &bearer)],
                Bytes::new(),
            )
            .await
            .0
            == StatusCode::OK
    })
    .await;
    let untrusted = TestGateway::start(&config("other.pem")).await;
    let (status, _, body) = untrusted
        .http
        .send(
            http::Method::GET,
            "/",
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}
