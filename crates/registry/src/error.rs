use crate::store::StoreError;

/// Everything a registry operation can refuse with. Mapped to an HTTP status once, in
/// `api::ApiError`; messages are written for the person who sent the request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// Consul's exact wording, which clients match on.
    #[error("Permission denied{0}")]
    PermissionDenied(String),
    #[error("ACL not found")]
    AclNotFound,
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Storage(#[from] StoreError),
    /// The shared store (etcd) did not answer or did not confirm; the write may or may
    /// not have been made.
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    pub fn bad(msg: impl Into<String>) -> Error {
        Error::BadRequest(msg.into())
    }

    pub fn denied(what: impl std::fmt::Display) -> Error {
        Error::PermissionDenied(format!(": {what}"))
    }
}

impl From<tessera_core::InvalidName> for Error {
    fn from(e: tessera_core::InvalidName) -> Self {
        Error::BadRequest(e.to_string())
    }
}
