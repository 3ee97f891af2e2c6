//! What every shop service shares at its HTTP edge: one error type mapped to JSON
//! `{"error", "code"}`, JSON bodies parsed into 400s that name the problem, and
//! bearer-token identities.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tessera::{AuthError, Claims, JwksVerifier};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        // Each request is one transaction: either way, nothing of it was kept.
        let refused = tessera_sql::Refused::of(&e);
        if refused.full {
            tracing::warn!(error = %e, "database refused a write: the disk is full");
        } else {
            tracing::error!(error = %e, "database");
        }
        ApiError::new(refused.status(), refused.code(), refused.to_string())
    }
}

impl From<tessera::Error> for ApiError {
    fn from(e: tessera::Error) -> ApiError {
        let status = match &e {
            tessera::Error::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            tessera::Error::NoInstance(_) | tessera::Error::BreakerOpen(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, "dependency", e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::NoKeys(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                e.to_string(),
            ),
            _ => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = tessera_web::error(self.status, self.code, self.message);
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"shop\""),
            );
        }
        resp
    }
}

/// The same refusal for a gRPC caller.
impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> tonic::Status {
        let code = match e.status {
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                tonic::Code::InvalidArgument
            }
            StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
            StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::CONFLICT => tonic::Code::Aborted,
            StatusCode::INSUFFICIENT_STORAGE => tonic::Code::ResourceExhausted,
            StatusCode::SERVICE_UNAVAILABLE => tonic::Code::Unavailable,
            StatusCode::GATEWAY_TIMEOUT => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.message)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body; a 400 says what is wrong with it.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// The caller a verified token names.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub admin: bool,
    /// The `Authorization` value, to pass on to other services on the caller's behalf.
    pub authorization: String,
}

impl Caller {
    fn from_claims(c: &Claims, authorization: &str) -> ApiResult<Caller> {
        let user = c.sub().ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "token has no sub")
        })?;
        Ok(Caller {
            user: user.to_owned(),
            admin: c.has_role("admin"),
            authorization: authorization.to_owned(),
        })
    }

    pub fn require_admin(&self) -> ApiResult<()> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs role admin"))
        }
    }
}

/// Verifies the request's bearer token (401 when missing or invalid).
pub async fn caller(verifier: &JwksVerifier, headers: &HeaderMap) -> ApiResult<Caller> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let claims = verifier.verify_header(auth).await?;
    Caller::from_claims(&claims, auth.unwrap_or_default())
}
