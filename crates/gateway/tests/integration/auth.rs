//! JWT per route: keys from a JWKS served over HTTP (rotated and taken away during the
//! test), roles, identity headers only from verified tokens, and nothing forwarded for
//! refused requests.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tessera_jwt::Signer;

use crate::support::{TestGateway, Upstream};

/// Serves `{"keys": [...]}` from a shared list; dropping it stops the server.
struct Jwks {
    addr: std::net::SocketAddr,
    keys: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Jwks {
    async fn start(keys: Vec<serde_json::Value>) -> Jwks {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let keys = Arc::new(Mutex::new(keys));
        let shared = keys.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                        let body = json!({"keys": *shared.lock().unwrap()}).to_string();
                        async move {
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Jwks { addr, keys, task }
    }
}

impl Drop for Jwks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn signer() -> Signer {
    Signer::ed25519(&Signer::generate_pkcs8().unwrap()).unwrap()
}

fn token(s: &Signer, sub: &str, roles: &[&str]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    s.sign(&json!({"sub": sub, "roles": roles, "iss": "shop", "aud": "api", "exp": now + 300}))
}

/// `GET /x` with the token as a bearer credential: the status.
async fn get_with_token(gw: &TestGateway, token: String) -> StatusCode {
    gw.http
        .send(
            Method::GET,
            "/x",
            &[("authorization", &format!("Bearer {token}"))],
            Bytes::new(),
        )
        .await
        .0
}

fn config(up: &Upstream, jwks: &Jwks) -> String {
    format!(
        r#"
[jwt.shop]
jwks_url = "http://{jwks}/jwks.json"
issuer = "shop"
audience = "api"
algorithms = ["EdDSA"]
forward = {{ "x-user-id" = "sub", "x-user-roles" = "roles" }}

[[routes]]
name = "public"
path = {{ prefix = "/public" }}
upstream = "app"

[[routes]]
name = "limited"
path = {{ prefix = "/limited" }}
upstream = "app"
auth = {{ jwt = "shop" }}
rate_limit = {{ rate = 0.001, burst = 2, key = "jwt_sub" }}

[[routes]]
name = "scoped"
path = {{ prefix = "/scoped" }}
upstream = "app"
auth = {{ jwt = "shop", claims = {{ scope = "orders:write", tenant = "acme" }} }}

[[routes]]
name = "admin"
path = {{ prefix = "/admin" }}
upstream = "app"
auth = {{ jwt = "shop", roles = ["admin"] }}

[[routes]]
name = "private"
path = {{ prefix = "/" }}
upstream = "app"
auth = {{ jwt = "shop" }}

[upstreams.app]
endpoints = ["{up}"]
"#,
        jwks = jwks.addr,
        up = up.addr
    )
}

#[tokio::test]
async fn routes_need_a_valid_token_and_the_right_role() {
    let up = Upstream::start("app").await;
    let key = signer();
    let jwks = Jwks::start(vec![key.jwk()]).await;
    let gw = TestGateway::start(&config(&up, &jwks)).await;
    let bearer = |t: &str| format!("Bearer {t}");

    // No token, a garbage token, a token from another key: 401, nothing forwarded.
    let (s, h, body) = gw.http.get("/orders").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        h["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(body["code"], "unauthorized");
    let (s, _, _) = gw
        .http
        .send(
            Method::GET,
            "/orders",
            &[("authorization", "Bearer x.y.z")],
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let stranger = token(&signer(), "eve", &["admin"]);
    let (s, _, _) = gw
        .http
        .send(
            Method::GET,
            "/orders",
            &[("authorization", &bearer(&stranger))],
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(up.hits(), 0, "refused requests never reach the upstream");

    // A valid token: forwarded, with the identity from the token, not from the client.
    let ada = token(&key, "ada", &["customer"]);
    let (s, _, body) = gw
        .http
        .send(
            Method::GET,
            "/orders",
            &[("authorization", &bearer(&ada)), ("x-user-id", "root")],
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["headers"]["x-user-id"], "ada");
    assert_eq!(body["headers"]["x-user-roles"], "customer");
    // Hop-by-hop nomination cannot remove what the gateway vouches for.
    let (s, _, body) = gw
        .http
        .send(
            Method::GET,
            "/orders",
            &[
                ("authorization", &bearer(&ada)),
                (
                    "connection",
                    "x-user-id, x-user-roles, x-forwarded-for, host, x-extra",
                ),
                ("x-extra", "gone"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let h = &body["headers"];
    assert_eq!(h["x-user-id"], "ada", "{h}");
    assert_eq!(h["x-user-roles"], "customer", "{h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
    assert!(h.get("host").is_some(), "{h}");
    assert!(
        h.get("x-extra").is_none(),
        "an ordinary nominated header is removed: {h}"
    );

    // Public routes pass without a token, but a client-supplied identity is still removed.
    let (s, _, body) = gw
        .http
        .send(
            Method::GET,
            "/public/x",
            &[("x-user-id", "root")],
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body["headers"].get("x-user-id").is_none(), "{body}");

    // Roles: 403 for a valid token without the role, 200 with it.
    let (s, _, body) = gw
        .http
        .send(
            Method::POST,
            "/admin/products",
            &[("authorization", &bearer(&ada))],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    // Claims: every listed one must hold (scope as a space-separated list).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let with = |claims: serde_json::Value| {
        let mut c = json!({"sub": "svc", "iss": "shop", "aud": "api", "exp": now + 300});
        for (k, v) in claims.as_object().unwrap() {
            c[k] = v.clone();
        }
        key.sign(&c)
    };
    for (claims, want) in [
        (
            json!({"scope": "orders:read orders:write", "tenant": "acme"}),
            StatusCode::OK,
        ),
        (
            json!({"scope": "orders:read", "tenant": "acme"}),
            StatusCode::FORBIDDEN,
        ),
        (
            json!({"scope": "orders:write", "tenant": "other"}),
            StatusCode::FORBIDDEN,
        ),
        (json!({"scope": "orders:write"}), StatusCode::FORBIDDEN),
    ] {
        let t = with(claims.clone());
        let (s, _, _) = gw
            .http
            .send(
                Method::GET,
                "/scoped",
                &[("authorization", &bearer(&t))],
                Bytes::new(),
            )
            .await;
        assert_eq!(s, want, "{claims}");
    }
    // A limit keyed by the token's subject: each user has their own budget.
    let bob = token(&key, "bob", &[]);
    let mut passed = (0, 0);
    for _ in 0..4 {
        for (t, n) in [(&ada, &mut passed.0), (&bob, &mut passed.1)] {
            let (s, _, _) = gw
                .http
                .send(
                    Method::GET,
                    "/limited",
                    &[("authorization", &bearer(t))],
                    Bytes::new(),
                )
                .await;
            if s == StatusCode::OK {
                *n += 1;
            }
        }
    }
    assert_eq!(passed, (2, 2));
    let boss = token(&key, "boss", &["admin"]);
    let (s, _, _) = gw
        .http
        .send(
            Method::POST,
            "/admin/products",
            &[("authorization", &bearer(&boss))],
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn rotated_keys_are_fetched_and_an_outage_keeps_the_last_set() {
    let up = Upstream::start("app").await;
    let first = signer();
    let jwks = Jwks::start(vec![first.jwk()]).await;
    let gw = TestGateway::start(&config(&up, &jwks)).await;
    let get = |t: String| get_with_token(&gw, t);
    assert_eq!(get(token(&first, "a", &[])).await, StatusCode::OK);

    // The issuer adds a key and signs with it: the unknown kid makes the gateway fetch.
    let second = signer();
    jwks.keys.lock().unwrap().push(second.jwk());
    // Fetches are at least a second apart: polled for, not slept.
    crate::support::wait_for("the new key to be fetched", || async {
        get(token(&second, "b", &[])).await == StatusCode::OK
    })
    .await;

    // The JWKS server goes away: known keys still verify, also once a refetch has failed.
    drop(jwks);
    crate::support::wait_for("an unknown kid to be refused", || async {
        get(token(&signer(), "c", &[])).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(get(token(&first, "a", &[])).await, StatusCode::OK);
    assert_eq!(get(token(&second, "b", &[])).await, StatusCode::OK);
    assert_eq!(
        get(token(&signer(), "c", &[])).await,
        StatusCode::UNAUTHORIZED
    );
}

/// A token whose signature was checked once is remembered, but not past its `exp` and
/// not once its key leaves the issuer's key set.
#[tokio::test]
async fn a_remembered_token_still_expires_and_lapses_with_its_key() {
    let up = Upstream::start("app").await;
    let first = signer();
    let jwks = Jwks::start(vec![first.jwk()]).await;
    let toml = config(&up, &jwks).replace(
        "algorithms = [\"EdDSA\"]",
        "algorithms = [\"EdDSA\"]\nrefresh = \"1s\"\nclock_skew = \"0s\"",
    );
    let gw = TestGateway::start(&toml).await;
    let get = |t: String| get_with_token(&gw, t);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let long = token(&first, "l", &[]);
    for _ in 0..3 {
        assert_eq!(get(long.clone()).await, StatusCode::OK);
    }
    // A token good for 3 s, accepted (and so remembered) while it is good: on a machine
    // too slow for that, a new one is made, so a slow machine only repeats this step.
    let mut attempts = 0;
    let short = loop {
        let exp = now() + 3;
        let t = first.sign(&json!({"sub": "s", "iss": "shop", "aud": "api", "exp": exp}));
        if get(t.clone()).await == StatusCode::OK {
            break t;
        }
        assert!(now() >= exp, "a token within its exp was refused");
        attempts += 1;
        assert!(attempts < 20, "never accepted a fresh token in time");
    };
    crate::support::wait_for("the short token to expire", || async {
        get(short.clone()).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(get(long.clone()).await, StatusCode::OK);

    // The issuer rotates the key out: the remembered token goes with it.
    *jwks.keys.lock().unwrap() = vec![signer().jwk()];
    crate::support::wait_for("the rotated-out key's token to be refused", || async {
        get(long.clone()).await == StatusCode::UNAUTHORIZED
    })
    .await;
}

#[test]
fn auth_config_errors_name_the_key() {
    let base = |extra: &str| {
        format!(
            "{extra}\n[[routes]]\npath = {{ prefix = \"/\" }}\nupstream = \"a\"\nauth = {{ jwt = \"shop\" }}\n[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n"
        )
    };
    let err = |t: String| tessera_gateway::Config::parse(&t).unwrap_err().to_string();
    assert!(err(base("")).contains("routes[0].auth.jwt: no [jwt.shop] section"));
    assert!(err(base("[jwt.shop]\n")).contains("jwt.shop: set one of jwks_url, jwks_file"));
    assert!(
        err(base(
            "[jwt.shop]\njwks_url = \"http://x/j\"\nalgorithms = [\"none\"]\n"
        ))
        .contains("jwt.shop.algorithms")
    );
    assert!(
        err(base(
            "[jwt.shop]\njwks_url = \"http://x/j\"\nalgorithms = [\"HS256\"]\n"
        ))
        .contains("HS256")
    );
    assert!(err(base("[jwt.shop]\njwks_url = \"http://x/j\"\nbogus = 1\n")).contains("bogus"));
    assert!(
        err(base(
            "[jwt.shop]\nhs256_secret_env = \"X\"\njwks_file = \"j.json\"\nalgorithms = [\"HS256\"]\n"
        ))
        .contains("jwt.shop: set one of")
    );
    assert!(
        err(base("[jwt.shop]\nhs256_secret_env = \"X\"\n"))
            .contains("jwt.shop.algorithms: a shared secret checks HS256 only")
    );

    // Static keys are read when the gateway is built; a problem names the key.
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "too short\n").unwrap();
    let pem = dir.path().join("ed.pem");
    std::fs::write(
        &pem,
        "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let build_err = |extra: String| {
        let cfg = tessera_gateway::Config::parse(&base(&extra)).unwrap();
        tessera_gateway::Gateway::build(cfg, None)
            .err()
            .expect("built anyway")
            .to_string()
    };
    assert!(
        build_err(format!(
            "[jwt.shop]\nhs256_secret_file = {short:?}\nalgorithms = [\"HS256\"]\n"
        ))
        .contains("jwt.shop.hs256_secret_file: the secret is 9 bytes; HS256 needs at least 32")
    );
    assert!(
        build_err(
            "[jwt.shop]\nhs256_secret_env = \"TESSERA_TEST_UNSET_SECRET\"\nalgorithms = [\"HS256\"]\n"
                .into()
        )
        .contains("TESSERA_TEST_UNSET_SECRET is not set")
    );
    assert!(
        build_err(format!(
            "[jwt.shop]\npublic_key_file = {pem:?}\nalgorithms = [\"RS256\"]\n"
        ))
        .contains("holds a key for EdDSA, which algorithms does not list")
    );
    assert!(
        build_err(format!("[jwt.shop]\npublic_key_file = {short:?}\n"))
            .contains("jwt.shop.public_key_file")
    );
}

/// Spelling `/admin` another way must not skip its rule: every variant is routed (and
/// refused) as `/admin`, or refused outright, and the upstream gets the canonical path.
#[tokio::test]
async fn path_tricks_do_not_bypass_an_admin_route() {
    let up = Upstream::start("app").await;
    let key = signer();
    let jwks = Jwks::start(vec![key.jwk()]).await;
    let gw = TestGateway::start(&config(&up, &jwks)).await;
    for (path, want) in [
        ("/admin/x", StatusCode::UNAUTHORIZED),
        ("//admin/x", StatusCode::UNAUTHORIZED),
        ("/public/../admin/x", StatusCode::UNAUTHORIZED),
        ("/public/%2e%2e/admin/x", StatusCode::UNAUTHORIZED),
        ("/public/%2E%2E//admin", StatusCode::UNAUTHORIZED),
        ("/./admin", StatusCode::UNAUTHORIZED),
        ("/%61dmin/x", StatusCode::UNAUTHORIZED),
        ("/public%2f..%2fadmin/x", StatusCode::BAD_REQUEST),
        ("/public/..%2Fadmin/x", StatusCode::BAD_REQUEST),
        ("/public/..%5cadmin/x", StatusCode::BAD_REQUEST),
        ("/public/../../admin/x", StatusCode::BAD_REQUEST),
        ("/public/%00/x", StatusCode::BAD_REQUEST),
        // How backends read paths: Tomcat/Jetty/Spring drop `;` parameters, IIS takes
        // `\` for `/`, some frameworks decode twice.
        ("/public/..;/admin/x", StatusCode::BAD_REQUEST),
        ("/admin;jsessionid=1/x", StatusCode::BAD_REQUEST),
        ("/public;/../admin", StatusCode::BAD_REQUEST),
        ("/public\\..\\admin\\x", StatusCode::BAD_REQUEST),
        ("/public/%252e%252e/admin/x", StatusCode::BAD_REQUEST),
        ("/public/%25%32%65%25%32%65/admin", StatusCode::BAD_REQUEST),
    ] {
        let (s, _, body) = gw.http.get(path).await;
        assert_eq!(s, want, "{path}: {body}");
    }
    assert_eq!(up.hits(), 0, "no spelling of /admin got through");
    // A path that leaves /admin for /public is public, and the upstream sees it canonical.
    let (s, _, body) = gw.http.get("/admin/..//public/./a%2Db?q=%2e").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/public/a-b?q=%2e");

    // `path_params = "strip"`: parameters go for matching and forwarding alike.
    let stripping = format!("path_params = \"strip\"\n{}", config(&up, &jwks));
    let gw = TestGateway::start(&stripping).await;
    let (s, _, _) = gw.http.get("/public/..;/admin/x").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "routed as /admin/x");
    let (s, _, body) = gw.http.get("/public;v=1/a").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/public/a");

    // Per route: only /public takes parameters, and passes them on as received. Routes
    // are still found by the path without them, so they open nothing behind /admin.
    let keeping = config(&up, &jwks).replacen(
        "path = { prefix = \"/public\" }",
        "path = { prefix = \"/public\" }\npath_params = \"keep\"",
        1,
    );
    assert!(keeping.contains("path_params = \"keep\""));
    let gw = TestGateway::start(&keeping).await;
    let (s, _, body) = gw.http.get("/public;v=1/a;b=2").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/public;v=1/a;b=2", "forwarded as received");
    let hits = up.hits();
    for (path, want) in [
        // Matched as /admin, whose rule (the default) refuses parameters.
        ("/public/..;/admin/x", StatusCode::BAD_REQUEST),
        ("/public;/../admin", StatusCode::BAD_REQUEST),
        ("/admin;jsessionid=1/x", StatusCode::BAD_REQUEST),
        ("/public/../admin;x", StatusCode::BAD_REQUEST),
    ] {
        let (s, _, body) = gw.http.get(path).await;
        assert_eq!(s, want, "{path}: {body}");
    }
    assert_eq!(up.hits(), hits, "nothing behind /admin was reached");
}

/// API keys for machine clients: only the SHA-256 is configured; the key's name goes
/// upstream, the key does not; roles apply; a JWT still works on a route taking both.
#[tokio::test]
async fn api_keys_authenticate_machine_clients() {
    let up = Upstream::start("app").await;
    let key = signer();
    let jwks = Jwks::start(vec![key.jwk()]).await;
    let sha = |k: &str| {
        ring::digest::digest(&ring::digest::SHA256, k.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let gw = TestGateway::start(&format!(
        r#"
[jwt.shop]
jwks_url = "http://{jwks}/jwks.json"
algorithms = ["EdDSA"]

[api_keys.billing]
sha256 = "{billing}"
roles = ["machine"]

[api_keys.reporting]
sha256 = "{reporting}"

[[routes]]
name = "machines"
path = {{ prefix = "/m" }}
upstream = "app"
auth = {{ api_keys = true, roles = ["machine"] }}

[[routes]]
name = "either"
path = {{ prefix = "/" }}
upstream = "app"
auth = {{ jwt = "shop", api_keys = true }}

[upstreams.app]
endpoints = ["{up}"]
"#,
        jwks = jwks.addr,
        billing = sha("k-billing-123"),
        reporting = sha("k-reporting-456"),
        up = up.addr
    ))
    .await;
    let get = |path: &'static str, headers: Vec<(&'static str, String)>| {
        let http = gw.http.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http.send(Method::GET, path, &h, Bytes::new()).await
        }
    };
    let (s, _, body) = get(
        "/m/x",
        vec![
            ("x-api-key", "k-billing-123".into()),
            ("x-api-key-name", "root".into()),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["headers"]["x-api-key-name"], "billing");
    assert!(
        body["headers"].get("x-api-key").is_none(),
        "the key is not passed on"
    );
    let (s, _, _) = get("/m/x", vec![("x-api-key", "k-reporting-456".into())]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "reporting lacks role machine");
    let (s, _, body) = get("/m/x", vec![("x-api-key", "guess".into())]).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid API key"))
    );
    let (s, _, _) = get("/m/x", vec![]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A route taking both: an API key or a token.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t = key.sign(&json!({"sub": "ada", "exp": now + 60}));
    assert_eq!(
        get("/x", vec![("authorization", format!("Bearer {t}"))])
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        get("/x", vec![("x-api-key", "k-reporting-456".into())])
            .await
            .0,
        StatusCode::OK
    );
    let err =
        tessera_gateway::Config::parse("[api_keys.a]\nsha256 = \"plain-text-key\"\n").unwrap_err();
    assert!(err.to_string().contains("api_keys.a.sha256"), "{err}");
}
