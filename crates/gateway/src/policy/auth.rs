//! JWT authentication and role checks per route, before anything reaches an upstream.
//!
//! Each `[jwt.NAME]` issuer keeps its key set in memory. The set is fetched at start and
//! every `refresh`, and again (at most once a second, sooner after a failed fetch:
//! `tessera_jwt::FetchState`, shared with the SDK) when a token names a key id it does
//! not hold yet, which is how key rotation reaches the gateway without a restart; a failed
//! fetch keeps the last good set. The verified identity goes upstream in the configured
//! headers, and any copy of those headers a client sent is removed on every route, so a
//! client can never name itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tessera_jwt::{Alg, Claims, FetchState, JwtError, Key, KeySet, Validation};

use crate::floor::config::{
    ApiKeyConfig, ConfigError, JwtConfig, Protocol, RouteAuth, UpstreamTls,
};
use crate::floor::error::GatewayError;
use crate::protocol::transport::Connector;

/// Largest JWKS document read.
const MAX_JWKS: usize = 1024 * 1024;

/// Where a JWKS is fetched from.
enum Source {
    Url(String),
    File(String),
}

pub struct Issuer {
    name: String,
    /// `None`: a static key (public key or HS256 secret), read once at load.
    source: Option<Source>,
    validation: Validation,
    refresh: Duration,
    keys: ArcSwap<KeySet>,
    /// Bumped whenever `keys` is replaced: cached verifications of older sets lapse.
    generation: AtomicU64,
    verified: Mutex<Verified>,
    schedule: Mutex<FetchState>,
    fetching: tokio::sync::Mutex<()>,
    pub forward: Vec<(HeaderName, String)>,
    /// How `Source::Url` is reached (TLS for `https://`).
    connector: Connector,
}

/// Every issuer and API key of one config.
#[derive(Default)]
pub struct Issuers {
    by_name: HashMap<String, Arc<Issuer>>,
    /// (name, SHA-256 of the key, roles).
    api_keys: Vec<(String, Vec<u8>, Vec<String>)>,
    /// Headers the gateway sets from claims or API keys: stripped from every client
    /// request.
    pub identity_headers: Vec<HeaderName>,
}

/// Who a request turned out to be.
pub struct Identity {
    /// Headers to add for the upstream.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The token's `sub`, or the API key's name.
    pub subject: Option<String>,
    /// A credential header not to pass on.
    pub remove: Option<HeaderName>,
}

impl Identity {
    /// Puts the identity on the request's fields for the upstream (and takes the
    /// credential off when it must not pass); returns the subject, for limits keyed on it.
    pub fn apply(self, headers: &mut HeaderMap) -> Option<String> {
        if let Some(secret) = &self.remove {
            headers.remove(secret);
        }
        for (k, v) in self.headers {
            headers.insert(k, v);
        }
        self.subject
    }
}

/// Verified tokens remembered per issuer.
const MAX_VERIFIED: usize = 10_000;

/// Token → (key-set generation it was checked against, its claims).
type Verified = HashMap<Box<str>, (u64, Arc<Claims>)>;

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static X_API_KEY_NAME: HeaderName = HeaderName::from_static("x-api-key-name");

impl Issuers {
    /// Builds the issuers and starts their refresh tasks (which end when the issuers are
    /// dropped, i.e. when a reload replaces them). Fails when a static key or secret
    /// cannot be read.
    pub fn build(
        cfg: &std::collections::BTreeMap<String, JwtConfig>,
        keys: &std::collections::BTreeMap<String, ApiKeyConfig>,
    ) -> Result<Issuers, ConfigError> {
        let mut out = Issuers::default();
        for (name, k) in keys {
            let digest: Vec<u8> = (0..k.sha256.len() / 2)
                .filter_map(|i| u8::from_str_radix(&k.sha256[2 * i..2 * i + 2], 16).ok())
                .collect();
            out.api_keys.push((name.clone(), digest, k.roles.clone()));
        }
        if !out.api_keys.is_empty() {
            out.identity_headers.push(X_API_KEY_NAME.clone());
        }
        for (name, j) in cfg {
            let mut v = Validation::new(
                &j.algorithms
                    .iter()
                    .filter_map(|a| a.parse::<Alg>().ok())
                    .collect::<Vec<_>>(),
            );
            v.issuer = j.issuer.clone();
            v.audience = j.audience.clone();
            v.leeway_secs = j.clock_skew.as_secs();
            let forward: Vec<(HeaderName, String)> = j
                .forward
                .iter()
                .filter_map(|(h, claim)| {
                    HeaderName::from_bytes(h.as_bytes())
                        .ok()
                        .map(|h| (h, claim.clone()))
                })
                .collect();
            out.identity_headers
                .extend(forward.iter().map(|(h, _)| h.clone()));
            let fixed = static_key(name, j)?;
            let tls = j
                .jwks_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
                .then(|| UpstreamTls {
                    ca: j.jwks_ca.clone(),
                    ..Default::default()
                });
            let connector = Connector::build(
                &format!("jwt.{name}.jwks_ca"),
                tls.as_ref(),
                Protocol::Http1,
            )?;
            let issuer = Arc::new(Issuer {
                name: name.clone(),
                source: match (&j.jwks_url, &j.jwks_file) {
                    (Some(u), _) => Some(Source::Url(u.clone())),
                    (None, Some(f)) => Some(Source::File(f.clone())),
                    (None, None) => None,
                },
                validation: v,
                refresh: j.refresh,
                keys: ArcSwap::from_pointee(KeySet::new(fixed.into_iter().collect())),
                generation: AtomicU64::new(0),
                verified: Mutex::new(HashMap::new()),
                schedule: Mutex::new(FetchState::default()),
                fetching: tokio::sync::Mutex::new(()),
                forward,
                connector,
            });
            if issuer.source.is_some()
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                rt.spawn(refresh_loop(Arc::downgrade(&issuer)));
            }
            out.by_name.insert(name.clone(), issuer);
        }
        Ok(out)
    }

    /// Checks `headers` against the route's rule: an API key (when the route takes
    /// them and the request carries one), else a bearer token.
    pub async fn check(
        &self,
        rule: &RouteAuth,
        headers: &HeaderMap,
    ) -> Result<Identity, GatewayError> {
        if rule.api_keys
            && let Some(key) = headers.get(&X_API_KEY)
        {
            return self.check_api_key(rule, key.as_bytes());
        }
        let Some(jwt) = &rule.jwt else {
            return Err(GatewayError::Unauthorized(
                "missing API key (X-Api-Key)".into(),
            ));
        };
        let Some(issuer) = self.by_name.get(jwt) else {
            return Err(GatewayError::Unauthorized(format!(
                "issuer {jwt} is not configured"
            )));
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| GatewayError::Unauthorized("missing bearer token".into()))?;
        let claims = issuer.verify(token).await?;
        if !rule.roles.is_empty() && !rule.roles.iter().any(|r| claims.has_role(r)) {
            return Err(GatewayError::Forbidden(format!(
                "this route needs one of the roles {}",
                rule.roles.join(", ")
            )));
        }
        for (name, want) in &rule.claims {
            if !claim_holds(claims.get(name), want) {
                return Err(GatewayError::Forbidden(format!(
                    "this route needs claim {name} to hold {want:?}"
                )));
            }
        }
        let mut out = Vec::with_capacity(issuer.forward.len());
        for (h, claim) in &issuer.forward {
            let value = match claims.get(claim) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                Some(serde_json::Value::Null) | None => continue,
                Some(other) => other.to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                out.push((h.clone(), v));
            }
        }
        Ok(Identity {
            headers: out,
            subject: claims.sub().map(str::to_owned),
            remove: None,
        })
    }

    fn check_api_key(&self, rule: &RouteAuth, key: &[u8]) -> Result<Identity, GatewayError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, key);
        // Every configured key is compared, in constant time, whatever matches first.
        let mut found = None;
        for (name, want, roles) in &self.api_keys {
            let d = digest.as_ref();
            let differ = d.iter().zip(want).fold(0u8, |acc, (x, y)| acc | (x ^ y));
            if d.len() == want.len() && differ == 0 {
                found = Some((name, roles));
            }
        }
        let Some((name, roles)) = found else {
            return Err(GatewayError::Unauthorized("invalid API key".into()));
        };
        if !rule.roles.is_empty() && !rule.roles.iter().any(|r| roles.contains(r)) {
            return Err(GatewayError::Forbidden(format!(
                "this route needs one of the roles {}",
                rule.roles.join(", ")
            )));
        }
        if !rule.claims.is_empty() {
            return Err(GatewayError::Forbidden(
                "this route needs a token with claims, not an API key".into(),
            ));
        }
        let headers = HeaderValue::from_str(name)
            .map(|v| vec![(X_API_KEY_NAME.clone(), v)])
            .unwrap_or_default();
        Ok(Identity {
            headers,
            subject: Some(name.clone()),
            remove: Some(X_API_KEY.clone()),
        })
    }
}

impl Issuer {
    /// A token's claims once its signature and claims check out. Signatures already
    /// checked against the current key set are remembered (an RS256 check costs about
    /// as much as proxying the request), so a client sending the same token on every
    /// request pays for it once; the claims are checked again every time, since `exp`
    /// and `nbf` move with the clock.
    async fn verify(&self, token: &str) -> Result<Arc<Claims>, GatewayError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let generation = self.generation.load(Ordering::Acquire);
        let cached = {
            let map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            map.get(token)
                .filter(|(g, _)| *g == generation)
                .map(|(_, c)| c.clone())
        };
        if let Some(claims) = cached {
            claims
                .check(&self.validation, now)
                .map_err(|e| GatewayError::Unauthorized(format!("invalid token: {e}")))?;
            return Ok(claims);
        }
        let claims = Arc::new(self.verify_uncached(token, now).await?);
        let mut map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_VERIFIED {
            // Expired tokens go first; if that frees nothing, start over (bounded memory
            // matters more than the hit rate under a flood of distinct tokens).
            map.retain(|_, (g, c)| *g == generation && c.check(&self.validation, now).is_ok());
            if map.len() >= MAX_VERIFIED {
                map.clear();
            }
        }
        // Tagged with the generation from before the check: if the key set changed
        // meanwhile, the entry is already stale rather than vouched for by new keys.
        map.insert(token.into(), (generation, claims.clone()));
        Ok(claims)
    }

    async fn verify_uncached(&self, token: &str, now: u64) -> Result<Claims, GatewayError> {
        let keys = self.keys.load_full();
        let result = match tessera_jwt::verify(token, &keys, &self.validation, now) {
            // A new key id (rotation) or no keys yet: fetch once more, then decide.
            Err(JwtError::UnknownKid(_) | JwtError::NoKey(_))
                if self.fetch_now(&keys, Duration::from_secs(1)).await =>
            {
                tessera_jwt::verify(token, &self.keys.load(), &self.validation, now)
            }
            r => r,
        };
        result.map_err(|e| GatewayError::Unauthorized(format!("invalid token: {e}")))
    }

    /// Fetches unless the schedule says it is too soon (`gap` after the last attempt;
    /// zero for the periodic refresh); `true` if the key set is not `seen` any more (this
    /// fetch or one that finished while waiting replaced it).
    async fn fetch_now(&self, seen: &Arc<KeySet>, gap: Duration) -> bool {
        let Some(source) = &self.source else {
            return false;
        };
        let _one = self.fetching.lock().await;
        if !Arc::ptr_eq(&self.keys.load_full(), seen) {
            return true;
        }
        let lock = || self.schedule.lock().unwrap_or_else(|p| p.into_inner());
        if !lock().begin(Instant::now(), gap) {
            return false;
        }
        match self.fetch(source).await {
            Ok(set) => {
                self.keys.store(Arc::new(set));
                self.generation.fetch_add(1, Ordering::Release);
                lock().succeeded(Instant::now());
                true
            }
            Err(e) => {
                tracing::warn!(issuer = %self.name, error = %e, "JWKS fetch failed; keeping the last key set");
                lock().failed(e);
                false
            }
        }
    }

    async fn fetch(&self, source: &Source) -> Result<KeySet, String> {
        let body = match source {
            Source::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read {path}: {e}"))?,
            Source::Url(url) => tokio::time::timeout(Duration::from_secs(5), self.get(url))
                .await
                .map_err(|_| format!("{url}: no answer within 5s"))?
                .map_err(|e| format!("{url}: {e}"))?,
        };
        KeySet::from_jwks(&body).map_err(|e| e.to_string())
    }
}

impl Issuer {
    /// One GET on a fresh connection (a JWKS is fetched every few minutes at most).
    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        let authority = uri.authority().ok_or("no host")?.clone();
        let default_port = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let addr = format!(
            "{}:{}",
            authority.host(),
            uri.port_u16().unwrap_or(default_port)
        );
        let io = self
            .connector
            .connect(&addr, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| tessera_core::error_chain(&e))?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(header::HOST, authority.as_str())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| tessera_core::error_chain(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_JWKS)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        Ok(body.to_vec())
    }
}

async fn refresh_loop(issuer: Weak<Issuer>) {
    loop {
        let Some(i) = issuer.upgrade() else {
            return;
        };
        let every = i.refresh;
        i.fetch_now(&i.keys.load_full(), Duration::ZERO).await;
        drop(i);
        tokio::time::sleep(every).await;
    }
}

/// Whether a claim equals `want` (a string), contains it (an array of strings), or holds
/// it as one of its space-separated words (`scope`).
fn claim_holds(claim: Option<&serde_json::Value>, want: &str) -> bool {
    match claim {
        Some(serde_json::Value::String(s)) => s == want || s.split(' ').any(|w| w == want),
        Some(serde_json::Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(want)),
        Some(serde_json::Value::Bool(b)) => b.to_string() == want,
        Some(serde_json::Value::Number(n)) => n.to_string() == want,
        _ => false,
    }
}

/// The issuer's static key (`public_key_file`, `hs256_secret_env`, `hs256_secret_file`),
/// if it has one.
fn static_key(name: &str, j: &JwtConfig) -> Result<Option<Key>, ConfigError> {
    let invalid = |field: &str, problem: String| ConfigError::Invalid {
        key: format!("jwt.{name}.{field}"),
        problem,
    };
    if let Some(path) = &j.public_key_file {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| invalid("public_key_file", format!("{path}: {e}")))?;
        let key = Key::from_public_pem(None, &pem)
            .map_err(|e| invalid("public_key_file", format!("{path}: {e}")))?;
        if !j
            .algorithms
            .iter()
            .any(|a| a.parse::<Alg>().ok() == Some(key.alg))
        {
            return Err(invalid(
                "public_key_file",
                format!(
                    "{path} holds a key for {:?}, which algorithms does not list",
                    key.alg
                ),
            ));
        }
        return Ok(Some(key));
    }
    let secret = match (&j.hs256_secret_env, &j.hs256_secret_file) {
        (Some(var), _) => std::env::var(var)
            .map_err(|_| invalid("hs256_secret_env", format!("{var} is not set")))?
            .into_bytes(),
        (None, Some(path)) => {
            let mut b = std::fs::read(path)
                .map_err(|e| invalid("hs256_secret_file", format!("{path}: {e}")))?;
            while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                b.pop();
            }
            b
        }
        (None, None) => return Ok(None),
    };
    // RFC 7518 §3.2: the key must be at least as long as the hash output.
    if secret.len() < 32 {
        let field = if j.hs256_secret_env.is_some() {
            "hs256_secret_env"
        } else {
            "hs256_secret_file"
        };
        return Err(invalid(
            field,
            format!(
                "the secret is {} bytes; HS256 needs at least 32",
                secret.len()
            ),
        ));
    }
    Ok(Some(Key::hmac(None, &secret)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::claim_holds;

    #[test]
    fn claims_hold_by_equality_or_membership() {
        let yes = [
            (json!("acme"), "acme"),
            (json!("orders:read orders:write"), "orders:write"),
            (json!(["a", "b"]), "b"),
            (json!(true), "true"),
            (json!(3), "3"),
        ];
        for (claim, want) in yes {
            assert!(claim_holds(Some(&claim), want), "{claim} {want}");
        }
        let no = [
            (json!("acme-corp"), "acme"),
            (json!("orders:readwrite"), "orders:write"),
            (json!(["ab"]), "a"),
            (json!({"a": 1}), "a"),
        ];
        for (claim, want) in no {
            assert!(!claim_holds(Some(&claim), want), "{claim} {want}");
        }
        assert!(!claim_holds(None, "x"));
    }
}
