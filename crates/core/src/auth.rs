/// Decides whether a request's token may read or write through one of the server's
/// APIs (sagas, event streams). `tessera server` answers it from the registry's ACLs;
/// embedders and tests can use [`AllowAll`].
pub trait Authorize: Send + Sync + 'static {
    /// `Err` carries the reason shown to the caller (403).
    fn check(&self, token: Option<&str>, write: bool) -> Result<(), String>;
}

/// Everyone may do everything (ACLs off).
pub struct AllowAll;

impl Authorize for AllowAll {
    fn check(&self, _: Option<&str>, _: bool) -> Result<(), String> {
        Ok(())
    }
}
