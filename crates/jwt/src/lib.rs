//! JSON Web Tokens (RFC 7519) as a gateway or a service checks them, with no I/O: the
//! caller fetches key sets and passes the clock in.
//!
//! The verifier, not the token, decides which algorithms count: a token's `alg` must be in
//! [`Validation::algorithms`] *and* match the type of the key it names, which closes the
//! classic holes (`alg: none`, an RSA public key used as an HMAC secret). `exp` and `nbf`
//! must be numbers; a string there is an error, not an absent claim.
//!
//! ```
//! use tessera_jwt::{Alg, KeySet, Signer, Validation, verify};
//! let signer = Signer::ed25519(&Signer::generate_pkcs8().unwrap()).unwrap();
//! let token = signer.sign(&serde_json::json!({"sub": "ada", "exp": 2_000_000_000}));
//! let jwks = serde_json::json!({ "keys": [signer.jwk()] }).to_string();
//! let keys = KeySet::from_jwks(jwks.as_bytes()).unwrap();
//! let claims = verify(&token, &keys, &Validation::new(&[Alg::EdDSA]), 1_900_000_000).unwrap();
//! assert_eq!(claims.sub(), Some("ada"));
//! ```

mod spki;

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, KeyPair};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Longest token looked at; anything longer is refused before decoding.
pub const MAX_TOKEN: usize = 16 * 1024;

/// The signature algorithms Tessera checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    RS256,
    ES256,
    EdDSA,
    HS256,
}

impl FromStr for Alg {
    type Err = JwtError;
    fn from_str(s: &str) -> Result<Alg, JwtError> {
        match s {
            "RS256" => Ok(Alg::RS256),
            "ES256" => Ok(Alg::ES256),
            "EdDSA" => Ok(Alg::EdDSA),
            "HS256" => Ok(Alg::HS256),
            other => Err(JwtError::Algorithm(other.to_owned())),
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Alg::RS256 => "RS256",
            Alg::ES256 => "ES256",
            Alg::EdDSA => "EdDSA",
            Alg::HS256 => "HS256",
        })
    }
}

impl<'de> Deserialize<'de> for Alg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Alg, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a token or a key set was refused; the text is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not three base64url parts")]
    Malformed,
    #[error("token header: {0}")]
    Header(String),
    #[error("algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    #[error("no key for algorithm {0}")]
    NoKey(Alg),
    #[error("signature does not verify")]
    Signature,
    #[error("claims: {0}")]
    Claims(String),
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("issuer not accepted")]
    Issuer,
    #[error("audience not accepted")]
    Audience,
    #[error("key: {0}")]
    Key(String),
}

#[derive(Clone)]
enum Material {
    Ed25519(Vec<u8>),
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed P-256 point (`04 || x || y`).
    P256(Vec<u8>),
    Hmac(Vec<u8>),
}

/// One verification key and the one algorithm it may be used with.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    pub alg: Alg,
    material: Material,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material (an HMAC secret is one).
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A shared HS256 secret (static configuration only: JWKS sets never carry them here).
    pub fn hmac(kid: Option<String>, secret: &[u8]) -> Key {
        Key {
            kid,
            alg: Alg::HS256,
            material: Material::Hmac(secret.to_vec()),
        }
    }

    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.material {
            Material::Ed25519(x) => signature::UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, sig)
                .is_ok(),
            Material::P256(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            Material::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            Material::Hmac(secret) => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                ring::hmac::verify(&key, message, sig).is_ok()
            }
        }
    }

    /// Whether this key may check a token signed with `alg`.
    fn fits(&self, alg: Alg) -> bool {
        self.alg == alg
            && matches!(
                (&self.material, alg),
                (Material::Ed25519(_), Alg::EdDSA)
                    | (Material::P256(_), Alg::ES256)
                    | (Material::Rsa { .. }, Alg::RS256)
                    | (Material::Hmac(_), Alg::HS256)
            )
    }
}

/// A JSON Web Key as published in a JWKS document; fields not needed are ignored.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
}

/// The keys a verifier trusts.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    pub fn new(keys: Vec<Key>) -> KeySet {
        KeySet { keys }
    }

    /// Parses a JWKS document (`{"keys": [...]}`). Keys of a type Tessera does not check
    /// (or marked `"use": "enc"`) are skipped rather than failing the whole set, since
    /// issuers publish mixed sets; symmetric (`oct`) keys are never taken from a JWKS.
    pub fn from_jwks(json: &[u8]) -> Result<KeySet, JwtError> {
        let doc: Jwks = serde_json::from_slice(json)
            .map_err(|e| JwtError::Key(format!("JWKS is not a key set: {e}")))?;
        let mut keys = Vec::new();
        for raw in doc.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
                continue;
            };
            if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            if let Some(key) = key_from_jwk(&jwk)? {
                keys.push(key);
            }
        }
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a key with this id is in the set (a verifier refreshes its JWKS when not).
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

fn b64_field(v: &Option<String>, name: &str) -> Result<Vec<u8>, JwtError> {
    let s = v
        .as_deref()
        .ok_or_else(|| JwtError::Key(format!("JWK without {name}")))?;
    B64.decode(s)
        .map_err(|_| JwtError::Key(format!("JWK {name} is not base64url")))
}

fn key_from_jwk(jwk: &Jwk) -> Result<Option<Key>, JwtError> {
    let (alg, material) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("OKP", Some("Ed25519")) => {
            let x = b64_field(&jwk.x, "x")?;
            if x.len() != 32 {
                return Err(JwtError::Key("Ed25519 x must be 32 bytes".into()));
            }
            (Alg::EdDSA, Material::Ed25519(x))
        }
        ("EC", Some("P-256")) => {
            let (x, y) = (b64_field(&jwk.x, "x")?, b64_field(&jwk.y, "y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err(JwtError::Key("P-256 x and y must be 32 bytes".into()));
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (Alg::ES256, Material::P256(point))
        }
        ("RSA", _) => {
            let (n, e) = (b64_field(&jwk.n, "n")?, b64_field(&jwk.e, "e")?);
            (Alg::RS256, Material::Rsa { n, e })
        }
        _ => return Ok(None),
    };
    // A key that names another algorithm than the one its type implies is not used.
    if jwk.alg.as_deref().is_some_and(|a| a != alg.to_string()) {
        return Ok(None);
    }
    Ok(Some(Key {
        kid: jwk.kid.clone(),
        alg,
        material,
    }))
}

/// What a verifier requires of a token beyond its signature.
#[derive(Debug, Clone)]
pub struct Validation {
    /// Algorithms accepted; a token naming any other is refused before key lookup.
    pub algorithms: Vec<Alg>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud` (a string equal to it, or an array holding it), if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Refuse tokens without `exp` (the default).
    pub require_exp: bool,
}

impl Validation {
    pub fn new(algorithms: &[Alg]) -> Validation {
        Validation {
            algorithms: algorithms.to_vec(),
            issuer: None,
            audience: None,
            leeway_secs: 60,
            require_exp: true,
        }
    }
}

/// A verified token's claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(pub Map<String, Value>);

impl Claims {
    /// Checks `exp`, `nbf`, `iss` and `aud` again at `now`, for a caller that keeps
    /// verified tokens and must not keep honouring one past its expiry.
    pub fn check(&self, v: &Validation, now: u64) -> Result<(), JwtError> {
        check_claims(&self.0, v, now)
    }
}

impl Claims {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    pub fn sub(&self) -> Option<&str> {
        self.0.get("sub").and_then(Value::as_str)
    }

    /// The `roles` claim as strings (an array, or one space-separated string).
    pub fn roles(&self) -> Vec<&str> {
        match self.0.get("roles") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(s)) => s.split_whitespace().collect(),
            _ => Vec::new(),
        }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles().contains(&role)
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Critical extensions this verifier would have to understand; none are supported, so
    /// a token listing any is refused (RFC 7515 §4.1.11).
    #[serde(default)]
    crit: Option<Value>,
}

/// Checks `token`'s signature against `keys` and its claims against `v` at `now` (seconds
/// since the Unix epoch).
pub fn verify(token: &str, keys: &KeySet, v: &Validation, now: u64) -> Result<Claims, JwtError> {
    if token.len() > MAX_TOKEN {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = B64.decode(h).map_err(|_| JwtError::Malformed)?;
    let header: Header =
        serde_json::from_slice(&header).map_err(|e| JwtError::Header(e.to_string()))?;
    if header.crit.is_some() {
        return Err(JwtError::Header(
            "critical extensions are not supported".into(),
        ));
    }
    let alg: Alg = header.alg.parse()?;
    if !v.algorithms.contains(&alg) {
        return Err(JwtError::Algorithm(header.alg));
    }
    let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
    let message = &token.as_bytes()[..h.len() + 1 + p.len()];
    let verified = match &header.kid {
        Some(kid) => {
            let key = keys
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| JwtError::UnknownKid(kid.clone()))?;
            if !key.fits(alg) {
                return Err(JwtError::Algorithm(format!(
                    "{alg} (key {kid} is for {})",
                    key.alg
                )));
            }
            key.verify(message, &sig)
        }
        None => {
            let mut candidates = keys.keys.iter().filter(|k| k.fits(alg)).peekable();
            if candidates.peek().is_none() {
                return Err(JwtError::NoKey(alg));
            }
            candidates.any(|k| k.verify(message, &sig))
        }
    };
    if !verified {
        return Err(JwtError::Signature);
    }
    let payload = B64.decode(p).map_err(|_| JwtError::Malformed)?;
    let claims: Map<String, Value> = serde_json::from_slice(&payload)
        .map_err(|e| JwtError::Claims(format!("not a JSON object: {e}")))?;
    check_claims(&claims, v, now)?;
    Ok(Claims(claims))
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| JwtError::Claims(format!("{name} is not a number"))),
        Some(_) => Err(JwtError::Claims(format!("{name} must be a number"))),
    }
}

fn check_claims(claims: &Map<String, Value>, v: &Validation, now: u64) -> Result<(), JwtError> {
    let now = now as f64;
    let leeway = v.leeway_secs as f64;
    match numeric(claims, "exp")? {
        Some(exp) if now > exp + leeway => return Err(JwtError::Expired),
        None if v.require_exp => return Err(JwtError::Claims("exp is required".into())),
        _ => {}
    }
    if numeric(claims, "nbf")?.is_some_and(|nbf| now + leeway < nbf) {
        return Err(JwtError::NotYetValid);
    }
    if let Some(want) = &v.issuer
        && claims.get("iss").and_then(Value::as_str) != Some(want.as_str())
    {
        return Err(JwtError::Issuer);
    }
    if let Some(want) = &v.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => a == want,
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(want.as_str())),
            _ => false,
        };
        if !ok {
            return Err(JwtError::Audience);
        }
    }
    Ok(())
}

/// When a cached key set may be fetched again, for a verifier that fetches its JWKS
/// itself: on demand (a token names an unknown key id) at most once per `gap` after a
/// success — so a flood of made-up key ids cannot flood the issuer — but sooner (200 ms)
/// after a failure, when the issuer was merely not up yet; periodically once the last
/// success is `every` old. The caller keeps it under its lock and does the I/O.
#[derive(Debug, Clone, Default)]
pub struct FetchState {
    last_attempt: Option<std::time::Instant>,
    last_success: Option<std::time::Instant>,
    last_error: Option<String>,
}

impl FetchState {
    /// Shortest pause after a failed fetch.
    pub const RETRY_GAP: std::time::Duration = std::time::Duration::from_millis(200);

    /// Whether the periodic fetch is due.
    pub fn stale(&self, now: std::time::Instant, every: std::time::Duration) -> bool {
        self.last_success
            .is_none_or(|t| now.saturating_duration_since(t) >= every)
    }

    /// Whether nothing was ever fetched or tried.
    pub fn never_tried(&self) -> bool {
        self.last_attempt.is_none()
    }

    /// Whether an on-demand fetch may start now; when it may, the attempt is recorded.
    pub fn begin(&mut self, now: std::time::Instant, gap: std::time::Duration) -> bool {
        let gap = if self.last_error.is_some() {
            gap.min(Self::RETRY_GAP)
        } else {
            gap
        };
        if self
            .last_attempt
            .is_some_and(|t| now.saturating_duration_since(t) < gap)
        {
            return false;
        }
        self.last_attempt = Some(now);
        true
    }

    pub fn succeeded(&mut self, now: std::time::Instant) {
        self.last_success = Some(now);
        self.last_error = None;
    }

    pub fn failed(&mut self, why: String) {
        self.last_error = Some(why);
    }

    /// Why the last fetch failed, if it did.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// Signs tokens with an Ed25519 key (EdDSA), as an identity service does.
pub struct Signer {
    kid: String,
    pair: signature::Ed25519KeyPair,
}

impl Signer {
    /// A new private key as PKCS#8 DER, for the caller to keep.
    pub fn generate_pkcs8() -> Result<Vec<u8>, JwtError> {
        let rng = ring::rand::SystemRandom::new();
        signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| JwtError::Key("could not generate an Ed25519 key".into()))
    }

    /// A signer for a PKCS#8 Ed25519 key; its `kid` is derived from the public key, so
    /// every replica holding the same key publishes the same id.
    pub fn ed25519(pkcs8: &[u8]) -> Result<Signer, JwtError> {
        let pair = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| JwtError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        Ok(Signer {
            kid: B64.encode(&digest.as_ref()[..12]),
            pair,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A compact JWS of `claims` (which should carry `exp`).
    pub fn sign(&self, claims: &Value) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let mut token = B64.encode(header.to_string());
        token.push('.');
        token.push_str(&B64.encode(claims.to_string()));
        let sig = self.pair.sign(token.as_bytes());
        token.push('.');
        token.push_str(&B64.encode(sig.as_ref()));
        token
    }

    /// The public key as a JWK, for `/.well-known/jwks.json`.
    pub fn jwk(&self) -> Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": B64.encode(self.pair.public_key().as_ref()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn signer() -> Signer {
        Signer::ed25519(&Signer::generate_pkcs8().unwrap()).unwrap()
    }

    fn keys(s: &Signer) -> KeySet {
        KeySet::from_jwks(json!({"keys": [s.jwk()]}).to_string().as_bytes()).unwrap()
    }

    fn token(header: Value, claims: Value, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string()),
            B64.encode(sig)
        )
    }

    #[test]
    fn fetches_are_spaced_more_after_a_success_than_after_a_failure() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let gap = Duration::from_secs(5);
        let mut f = FetchState::default();
        assert!(f.never_tried() && f.stale(t0, gap));
        assert!(f.begin(t0, gap));
        f.failed("refused".into());
        assert!(!f.begin(t0 + Duration::from_millis(100), gap));
        assert!(
            f.begin(t0 + Duration::from_millis(300), gap),
            "retried soon after a failure"
        );
        f.succeeded(t0 + Duration::from_millis(300));
        assert_eq!(f.last_error(), None);
        assert!(
            !f.begin(t0 + Duration::from_secs(2), gap),
            "spaced after a success"
        );
        assert!(f.begin(t0 + Duration::from_secs(6), gap));
        assert!(!f.stale(t0 + Duration::from_secs(6), Duration::from_secs(60)));
        assert!(f.stale(t0 + Duration::from_secs(61), Duration::from_secs(60)));
    }

    #[test]
    fn a_signed_token_verifies_and_its_claims_are_read() {
        let s = signer();
        let t = s.sign(&json!({"sub": "u1", "roles": ["admin"], "exp": NOW + 60}));
        let c = verify(&t, &keys(&s), &Validation::new(&[Alg::EdDSA]), NOW).unwrap();
        assert_eq!(c.sub(), Some("u1"));
        assert!(c.has_role("admin"));
        assert!(!c.has_role("root"));
    }

    #[test]
    fn tampered_and_foreign_tokens_fail_the_signature() {
        let s = signer();
        let v = Validation::new(&[Alg::EdDSA]);
        let t = s.sign(&json!({"sub": "u1", "exp": NOW + 60}));
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(json!({"sub": "admin", "exp": NOW + 60}).to_string());
        parts[1] = &forged;
        assert_eq!(
            verify(&parts.join("."), &keys(&s), &v, NOW),
            Err(JwtError::Signature)
        );
        // Same kid derivation, other key: a different kid, so it is unknown here.
        let other = signer();
        let t2 = other.sign(&json!({"sub": "u1", "exp": NOW + 60}));
        assert!(matches!(
            verify(&t2, &keys(&s), &v, NOW),
            Err(JwtError::UnknownKid(_))
        ));
    }

    #[test]
    fn the_verifier_not_the_token_picks_the_algorithm() {
        let s = signer();
        let set = keys(&s);
        let v = Validation::new(&[Alg::EdDSA]);
        let claims = json!({"sub": "u1", "exp": NOW + 60});
        let none = token(json!({"alg": "none"}), claims.clone(), b"");
        assert_eq!(
            verify(&none, &set, &v, NOW),
            Err(JwtError::Algorithm("none".into()))
        );
        // HS256 over the public key bytes (key-type confusion): refused even when the
        // verifier accepts HS256, because the named key is an Ed25519 key.
        let x = B64.decode(s.jwk()["x"].as_str().unwrap()).unwrap();
        let hkey = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &x);
        let h = B64.encode(json!({"alg": "HS256", "kid": s.kid()}).to_string());
        let p = B64.encode(claims.to_string());
        let tag = ring::hmac::sign(&hkey, format!("{h}.{p}").as_bytes());
        let confused = format!("{h}.{p}.{}", B64.encode(tag.as_ref()));
        let both = Validation::new(&[Alg::EdDSA, Alg::HS256]);
        assert!(matches!(
            verify(&confused, &set, &both, NOW),
            Err(JwtError::Algorithm(_))
        ));
        assert!(matches!(
            verify(&confused, &set, &v, NOW),
            Err(JwtError::Algorithm(_))
        ));
        let crit = token(
            json!({"alg": "EdDSA", "kid": s.kid(), "crit": ["b64"]}),
            claims,
            b"x",
        );
        assert!(matches!(
            verify(&crit, &set, &v, NOW),
            Err(JwtError::Header(_))
        ));
        for bad in ["", "a.b", "a.b.c.d", "!!.??.##"] {
            assert!(verify(bad, &set, &v, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn time_and_audience_claims_are_enforced() {
        let s = signer();
        let set = keys(&s);
        let mut v = Validation::new(&[Alg::EdDSA]);
        v.leeway_secs = 10;
        let check = |c: Value, v: &Validation| verify(&s.sign(&c), &set, v, NOW);
        assert_eq!(check(json!({"exp": NOW - 11}), &v), Err(JwtError::Expired));
        assert!(check(json!({"exp": NOW - 9}), &v).is_ok(), "within leeway");
        assert!(matches!(
            check(json!({"exp": (NOW + 60).to_string()}), &v),
            Err(JwtError::Claims(_))
        ));
        assert!(matches!(
            check(json!({"exp": NOW + 60, "nbf": "0"}), &v),
            Err(JwtError::Claims(_))
        ));
        assert_eq!(
            check(json!({"exp": NOW + 60, "nbf": NOW + 11}), &v),
            Err(JwtError::NotYetValid)
        );
        assert!(matches!(
            check(json!({"sub": "x"}), &v),
            Err(JwtError::Claims(_))
        ));
        v.issuer = Some("users".into());
        v.audience = Some("shop".into());
        assert_eq!(
            check(json!({"exp": NOW + 60, "iss": "evil", "aud": "shop"}), &v),
            Err(JwtError::Issuer)
        );
        assert_eq!(
            check(
                json!({"exp": NOW + 60, "iss": "users", "aud": ["other"]}),
                &v
            ),
            Err(JwtError::Audience)
        );
        assert!(
            check(
                json!({"exp": NOW + 60, "iss": "users", "aud": ["other", "shop"]}),
                &v
            )
            .is_ok()
        );
    }

    #[test]
    fn es256_and_static_hmac_keys_verify() {
        let rng = ring::rand::SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let public = pair.public_key().as_ref();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "ec1",
            "x": B64.encode(&public[1..33]), "y": B64.encode(&public[33..])});
        let set = KeySet::from_jwks(
            json!({"keys": [jwk, {"kty": "oct", "k": "c2VjcmV0"}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(set.len(), 1, "oct keys are not taken from a JWKS");
        let h = B64.encode(json!({"alg": "ES256", "kid": "ec1"}).to_string());
        let p = B64.encode(json!({"sub": "e", "exp": NOW + 5}).to_string());
        let sig = pair.sign(&rng, format!("{h}.{p}").as_bytes()).unwrap();
        let t = format!("{h}.{p}.{}", B64.encode(sig.as_ref()));
        assert_eq!(
            verify(&t, &set, &Validation::new(&[Alg::ES256]), NOW)
                .unwrap()
                .sub(),
            Some("e")
        );
        assert!(matches!(
            verify(&t, &set, &Validation::new(&[Alg::EdDSA]), NOW),
            Err(JwtError::Algorithm(_))
        ));

        let hs = KeySet::new(vec![Key::hmac(None, b"s3cret")]);
        let h = B64.encode(json!({"alg": "HS256"}).to_string());
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret"),
            format!("{h}.{p}").as_bytes(),
        );
        let t = format!("{h}.{p}.{}", B64.encode(tag.as_ref()));
        assert!(verify(&t, &hs, &Validation::new(&[Alg::HS256]), NOW).is_ok());
        assert_eq!(
            verify(&t, &set, &Validation::new(&[Alg::HS256]), NOW),
            Err(JwtError::NoKey(Alg::HS256))
        );
    }
}
