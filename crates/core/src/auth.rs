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

/// A request's token as Consul clients send it: `X-Consul-Token`, else
/// `Authorization: Bearer ...`. `header` looks a header up by lowercase name.
pub fn request_token<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
    header("x-consul-token")
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")))
}

#[cfg(test)]
mod tests {
    use super::request_token;

    #[test]
    fn tokens_come_from_the_consul_header_or_a_bearer() {
        let h = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
        };
        assert_eq!(request_token(h(&[("x-consul-token", "a")])), Some("a"));
        assert_eq!(
            request_token(h(&[("authorization", "Bearer b")])),
            Some("b")
        );
        assert_eq!(
            request_token(h(&[("x-consul-token", "a"), ("authorization", "Bearer b")])),
            Some("a")
        );
        assert_eq!(request_token(h(&[("authorization", "Basic c")])), None);
        assert_eq!(request_token(h(&[])), None);
    }
}
