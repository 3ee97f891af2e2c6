//! JWT verification with keys fetched from a JWKS document (a URL, or a path on a
//! registry service), cached, refreshed on an interval and when a token names a key id
//! not seen yet (key rotation), and kept when a refresh fails (an identity-service outage
//! must not log everyone out).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use tessera_jwt::FetchState;
pub use tessera_jwt::{Alg, Claims, JwtError, KeySet, Validation};

use crate::client::ServiceClient;
use crate::http::{Error, Http, client, send};

/// Where the key set comes from.
enum Source {
    Url(Box<Http>, String),
    Service(ServiceClient, String),
}

/// Why a request's token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(#[from] JwtError),
    #[error("no signing keys available: {0}")]
    NoKeys(String),
}

/// Verifies bearer tokens against a JWKS.
///
/// ```no_run
/// # async fn demo(authorization: &str) {
/// use tessera::{Alg, JwksVerifier, Registry, ServiceClient, Validation};
/// let registry = Registry::new("127.0.0.1:8500");
/// let users = ServiceClient::new(&registry, "users");
/// let verifier = JwksVerifier::from_service(users, "/.well-known/jwks.json",
///     Validation::new(&[Alg::EdDSA]));
/// match verifier.verify_header(Some(authorization)).await {
///     Ok(claims) => println!("hello {:?}", claims.sub()),
///     Err(e) => println!("401: {e}"),
/// }
/// # }
/// ```
pub struct JwksVerifier {
    source: Source,
    validation: Validation,
    keys: RwLock<Arc<KeySet>>,
    state: Mutex<FetchState>,
    /// Serializes fetches so a burst of tokens with a new kid causes one fetch.
    fetching: tokio::sync::Mutex<()>,
    /// Fetch again after this long even if nothing asked.
    pub refresh_every: Duration,
    /// Fetches caused by unknown key ids are at least this far apart.
    pub min_refresh_gap: Duration,
}

impl JwksVerifier {
    pub fn from_url(url: &str, validation: Validation) -> JwksVerifier {
        JwksVerifier::new(Source::Url(Box::new(client()), url.to_owned()), validation)
    }

    pub fn from_service(
        service: ServiceClient,
        path: &str,
        validation: Validation,
    ) -> JwksVerifier {
        JwksVerifier::new(Source::Service(service, path.to_owned()), validation)
    }

    fn new(source: Source, validation: Validation) -> JwksVerifier {
        JwksVerifier {
            source,
            validation,
            keys: RwLock::new(Arc::new(KeySet::default())),
            state: Mutex::new(FetchState::default()),
            fetching: tokio::sync::Mutex::new(()),
            refresh_every: Duration::from_secs(300),
            min_refresh_gap: Duration::from_secs(5),
        }
    }

    fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Verifies the value of an `Authorization` header (`Bearer ...`).
    pub async fn verify_header(&self, authorization: Option<&str>) -> Result<Claims, AuthError> {
        let token = authorization
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        self.verify(token).await
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let (stale, never) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (
                st.stale(Instant::now(), self.refresh_every),
                st.never_tried(),
            )
        };
        if stale {
            // Periodic refresh: on failure the cached keys stay in use.
            self.refresh(never).await;
        }
        let keys = self.keys();
        match tessera_jwt::verify(token, &keys, &self.validation, unix_now()) {
            Err(JwtError::UnknownKid(kid)) => {
                self.refresh(false).await;
                let keys = self.keys();
                if keys.has_kid(&kid) {
                    Ok(tessera_jwt::verify(
                        token,
                        &keys,
                        &self.validation,
                        unix_now(),
                    )?)
                } else if keys.is_empty() {
                    Err(self.no_keys())
                } else {
                    Err(JwtError::UnknownKid(kid).into())
                }
            }
            Err(JwtError::NoKey(_)) if keys.is_empty() => Err(self.no_keys()),
            r => Ok(r?),
        }
    }

    /// The error for "no key set could be fetched yet": the caller's token may be fine.
    fn no_keys(&self) -> AuthError {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        AuthError::NoKeys(st.last_error().unwrap_or("empty key set").to_owned())
    }

    /// Fetches the key set unless one was fetched within `min_refresh_gap` (unless
    /// `force`); `true` if a new set was installed.
    async fn refresh(&self, force: bool) -> bool {
        let _one = self.fetching.lock().await;
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let gap = if force {
                Duration::ZERO
            } else {
                self.min_refresh_gap
            };
            if !st.begin(Instant::now(), gap) {
                return false;
            }
        }
        let fetched = self.fetch().await.and_then(|body| {
            KeySet::from_jwks(&body).map_err(|e| Error::Decode("JWKS".into(), e.to_string()))
        });
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match fetched {
            Ok(set) => {
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                st.succeeded(Instant::now());
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the last key set");
                st.failed(e.to_string());
                false
            }
        }
    }

    async fn fetch(&self) -> Result<Bytes, Error> {
        let resp = match &self.source {
            Source::Url(http, url) => {
                let req = http::Request::get(url.as_str())
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| Error::Invalid(format!("JWKS URL {url}: {e}")))?;
                send(http, url, req).await?
            }
            Source::Service(client, path) => client.get(path).send().await?,
        };
        Ok(resp.error_for_status()?.body)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
