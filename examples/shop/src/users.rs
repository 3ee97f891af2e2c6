//! `users`: accounts with argon2id password hashes; login issues an EdDSA-signed JWT
//! (`sub`, `roles`, `exp`), and the public key is served as a JWKS. The signing key is
//! created on first start and kept in the data dir, shared by the replicas.

use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;
use tessera::jwt::{KeySet, Signer};
use tessera::{Alg, Validation};

use crate::db::{Db, new_id, now_ms};
use crate::web::{ApiError, ApiResult, parse};

pub const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL,
    created_ms BIGINT NOT NULL
)"];

/// Issuer and audience of shop tokens; every verifier checks both.
pub const ISSUER: &str = "tessera-shop";
pub const AUDIENCE: &str = "shop";
const TOKEN_SECONDS: u64 = 3600;

/// How verifiers are set up for shop tokens.
pub fn validation() -> Validation {
    let mut v = Validation::new(&[Alg::EdDSA]);
    v.issuer = Some(ISSUER.into());
    v.audience = Some(AUDIENCE.into());
    v
}

#[derive(Clone)]
struct St {
    db: Db,
    signer: Arc<Signer>,
    keys: Arc<KeySet>,
}

pub async fn router(db: Db, dir: &Path, admin: Option<(String, String)>) -> Result<Router, String> {
    let signer = Arc::new(signing_key(dir)?);
    let keys = KeySet::from_jwks(json!({"keys": [signer.jwk()]}).to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let st = St {
        db,
        signer,
        keys: Arc::new(keys),
    };
    if let Some((email, password)) = admin {
        ensure_admin(&st, &email, &password).await?;
    }
    Ok(Router::new()
        .route("/users/register", post(register))
        .route("/users/login", post(login))
        .route("/users/me", get(me))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/users/.well-known/jwks.json", get(jwks))
        .with_state(st))
}

/// Loads the signing key, creating it if this is the first replica to start: the new
/// key is written to a temporary file and hard-linked into place, which fails if another
/// replica won the race — then its key is used.
fn signing_key(dir: &Path) -> Result<Signer, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("users-signing-key.der");
    if !path.exists() {
        let der = Signer::generate_pkcs8().map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(".users-signing-key.{}", new_id()));
        crate::write_secret(&tmp, &der)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        let _ = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
    }
    // A key written before keys were private is made so.
    crate::make_private(&path).map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    let der = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if der.is_empty() {
        // A key file mounted from a Secret that was never filled in.
        return Err(format!(
            "{} is empty: put an Ed25519 key (PKCS#8 DER) in it, e.g. `openssl genpkey -algorithm ed25519 -outform DER`",
            path.display()
        ));
    }
    Signer::ed25519(&der).map_err(|e| format!("{}: {e}", path.display()))
}

fn hash(password: &str) -> Result<String, ApiError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "random",
            format!("no randomness: {e}"),
        )
    })?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| ApiError::bad(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::bad(format!("cannot hash the password: {e}")))
}

fn check_password(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

async fn ensure_admin(st: &St, email: &str, password: &str) -> Result<(), String> {
    let hashed = hash(password).map_err(|e| e.message)?;
    let mut tx = st.db.write().await.map_err(|e| e.to_string())?;
    let found = sqlx::query("UPDATE users SET password_hash = $1, roles = $2 WHERE email = $3")
        .bind(&hashed)
        .bind("admin customer")
        .bind(email)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    if found.rows_affected() == 0 {
        sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, roles, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(new_id())
        .bind(email)
        .bind("Admin")
        .bind(&hashed)
        .bind("admin customer")
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    }
    tx.commit().await.map_err(|e| e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    email: String,
    password: String,
    #[serde(default)]
    name: String,
}

async fn register(State(st): State<St>, body: Bytes) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let b: RegisterBody = parse(&body)?;
    let email = b.email.trim().to_lowercase();
    if email.len() > 254 || !email.contains('@') || email.starts_with('@') || email.ends_with('@') {
        return Err(ApiError::bad("email: not an email address"));
    }
    if b.password.chars().count() < 8 || b.password.len() > 256 {
        return Err(ApiError::bad("password: 8 to 256 characters"));
    }
    if b.name.len() > 200 {
        return Err(ApiError::bad("name: at most 200 characters"));
    }
    let hashed = hash(&b.password)?;
    let id = new_id();
    let name = if b.name.trim().is_empty() {
        email.split('@').next().unwrap_or_default().to_owned()
    } else {
        b.name.trim().to_owned()
    };
    let mut tx = st.db.write().await?;
    let r = sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, roles, created_ms)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(&email)
    .bind(&name)
    .bind(&hashed)
    .bind("customer")
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "email_taken",
            format!("{email} is already registered"),
        ));
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"id": id, "email": email, "name": name, "roles": ["customer"]})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    email: String,
    password: String,
}

async fn login(State(st): State<St>, body: Bytes) -> ApiResult<axum::Json<Value>> {
    let b: LoginBody = parse(&body)?;
    let email = b.email.trim().to_lowercase();
    let row = sqlx::query("SELECT id, password_hash, roles FROM users WHERE email = $1")
        .bind(&email)
        .fetch_optional(&st.db.pool)
        .await?;
    let denied = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_credentials",
            "wrong email or password",
        )
    };
    let Some(row) = row else {
        // Same work as a real check, so timing does not tell which emails exist.
        let _ = check_password(&b.password, DUMMY_HASH);
        return Err(denied());
    };
    let (id, stored, roles): (String, String, String) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    if !check_password(&b.password, &stored) {
        return Err(denied());
    }
    let roles: Vec<&str> = roles.split_whitespace().collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let token = st.signer.sign(&json!({
        "sub": id, "email": email, "roles": roles,
        "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + TOKEN_SECONDS,
    }));
    Ok(axum::Json(json!({
        "token": token, "token_type": "Bearer", "expires_in": TOKEN_SECONDS,
        "user": {"id": id, "email": email, "roles": roles},
    })))
}

/// An argon2id hash of a random string, checked against when the email is unknown.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$3cm6SqiOdGrlY7mJ0cHXMt1sMD6IUbNeLMe8DzuCPK8";

async fn me(State(st): State<St>, headers: HeaderMap) -> ApiResult<axum::Json<Value>> {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token",
            )
        })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = tessera::jwt::verify(auth, &st.keys, &validation(), now).map_err(|e| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("invalid token: {e}"),
        )
    })?;
    let id = claims.sub().unwrap_or_default();
    let row = sqlx::query("SELECT id, email, name, roles FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("no such user"))?;
    let roles: String = row.try_get(3)?;
    Ok(axum::Json(json!({
        "id": row.try_get::<String, _>(0)?,
        "email": row.try_get::<String, _>(1)?,
        "name": row.try_get::<String, _>(2)?,
        "roles": roles.split_whitespace().collect::<Vec<_>>(),
    })))
}

async fn jwks(State(st): State<St>) -> axum::Json<Value> {
    axum::Json(json!({"keys": [st.signer.jwk()]}))
}
