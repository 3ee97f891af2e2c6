/// A service name, ID or KV key that the registry refuses to store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct InvalidName {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Longest service name or ID accepted; DNS labels cap at 63, but Consul allows longer
/// names over HTTP, so we only stop obvious abuse.
const MAX_NAME: usize = 512;
/// Longest KV key, in bytes.
const MAX_KEY: usize = 2048;

/// Service names and IDs: non-empty, no control characters, no `/` (it would make
/// `/v1/catalog/service/:name` ambiguous).
pub fn validate_service_name(what: &'static str, value: &str) -> Result<(), InvalidName> {
    let err = |reason| {
        Err(InvalidName {
            what,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return err("must not be empty");
    }
    if value.len() > MAX_NAME {
        return err("longer than 512 bytes");
    }
    if value.chars().any(|c| c.is_control()) {
        return err("contains a control character");
    }
    if value.contains('/') {
        return err("contains '/'");
    }
    Ok(())
}

/// KV keys: UTF-8 (guaranteed by `&str`), non-empty after the leading `/` is dropped, no
/// NUL or other control characters, bounded length.
pub fn validate_key(value: &str) -> Result<(), InvalidName> {
    let err = |reason| {
        Err(InvalidName {
            what: "key",
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return err("must not be empty");
    }
    if value.len() > MAX_KEY {
        return err("longer than 2048 bytes");
    }
    if value.chars().any(|c| c.is_control()) {
        return err("contains a control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys() {
        assert!(validate_service_name("service name", "web").is_ok());
        assert!(validate_service_name("service name", "").is_err());
        assert!(validate_service_name("service name", "a/b").is_err());
        assert!(validate_key("app/config/db").is_ok());
        assert!(validate_key("a\0b").is_err());
        assert!(validate_key(&"k".repeat(4000)).is_err());
    }
}
