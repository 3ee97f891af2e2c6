//! One canonical request path, decided before routing and auth and sent upstream as is,
//! so a route's rules cannot be stepped around by spelling the same path another way
//! (`/public/../admin`, `//admin`, `/%61dmin`).
//!
//! Canonical means: percent-encoded unreserved characters decoded (RFC 3986 §2.3), other
//! escapes upper-cased, runs of `/` merged, `.` and `..` segments removed (§5.2.4; a `..`
//! above the root is refused). Encoded `/` and `\` are refused by default, or kept opaque
//! (`encoded_slashes = "keep"`): never decoded into a separator. A raw `\`, an escaped
//! NUL and a malformed escape are refused.
//!
//! Backends read some paths differently from their plain form, so a route protecting a
//! prefix could be stepped around through them; each is refused or made the same for
//! matching and forwarding:
//! - `;` path parameters, which Tomcat, Jetty and Spring drop from each segment
//!   (`/admin;x`, `/public/..;/admin`): refused by default. When a route allows them
//!   (`path_params`, per route or for all), routes are matched on the path without them,
//!   and the route found forwards it stripped (`"strip"`) or as received (`"keep"`);
//! - `\`, which IIS takes for `/`: refused;
//! - an encoded `%` before two hex digits (`%252e`), which a backend that decodes twice
//!   turns into another character: refused.

/// Why a path was refused (the 400's message).
pub type PathError = &'static str;

/// What to do with `;` path parameters (`path_params` in the config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathParams {
    #[default]
    Reject,
    Strip,
    Keep,
}

/// The path settings of a gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathRules {
    pub keep_encoded_slashes: bool,
    pub params: PathParams,
}

/// The canonical form of `path`, or `None` when it already is canonical (the common
/// case, decided by one scan without allocating).
pub fn canonical(path: &str, rules: PathRules) -> Result<Option<String>, PathError> {
    let keep_encoded_slashes = rules.keep_encoded_slashes;
    let b = path.as_bytes();
    let mut suspect = false;
    let mut prev = 0u8;
    for &c in b {
        match c {
            b'%' | b'\\' => suspect = true,
            b';' if rules.params != PathParams::Keep => suspect = true,
            b'/' if prev == b'/' => suspect = true,
            b'.' if prev == b'/' => suspect = true,
            _ => {}
        }
        prev = c;
    }
    if !suspect {
        return Ok(None);
    }
    // Decode what may be decoded; keep the rest escaped (upper-case hex).
    // Bytes, not chars: a raw non-ASCII character is several bytes and must stay them.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => return Err("a backslash in the path"),
            b';' if rules.params == PathParams::Reject => {
                return Err("a ';' path parameter in the path (see path_params)");
            }
            b';' if rules.params == PathParams::Strip => {
                // Up to the segment's end, as Tomcat drops it.
                while i < b.len() && b[i] != b'/' {
                    i += 1;
                }
            }
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err("a malformed percent-escape in the path");
                };
                let v = (h * 16 + l) as u8;
                match v {
                    0 => return Err("an escaped NUL in the path"),
                    b'/' | b'\\' if !keep_encoded_slashes => {
                        return Err("an encoded '/' or '\\' in the path");
                    }
                    c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => decoded.push(c),
                    _ => decoded.extend_from_slice(format!("%{v:02X}").as_bytes()),
                }
                i += 3;
            }
            c => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    // Checked on the decoded form: `%25%32%65` decodes to `%252e` here, which a second
    // decoding would turn into `.`.
    let d = decoded.as_slice();
    if d.windows(5)
        .any(|w| w.starts_with(b"%25") && w[3].is_ascii_hexdigit() && w[4].is_ascii_hexdigit())
    {
        return Err("an encoded '%' before two hex digits (double encoding)");
    }
    // Segments, with empty ones (merged slashes) and dots resolved.
    let mut out: Vec<&str> = Vec::new();
    // Only ASCII was decoded and the input was UTF-8, so this holds.
    let decoded = String::from_utf8(decoded).map_err(|_| "a path that is not UTF-8")?;
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" | "." => trailing_slash = n == last,
            ".." => {
                if out.pop().is_none() {
                    return Err("the path climbs above the root");
                }
                trailing_slash = n == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut canon = String::with_capacity(decoded.len());
    for s in &out {
        canon.push('/');
        canon.push_str(s);
    }
    if trailing_slash || canon.is_empty() {
        canon.push('/');
    }
    Ok(if canon == path { None } else { Some(canon) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> Result<String, PathError> {
        canonical(p, PathRules::default()).map(|o| o.unwrap_or_else(|| p.to_owned()))
    }

    fn with(params: PathParams, p: &str) -> Result<String, PathError> {
        let rules = PathRules {
            keep_encoded_slashes: false,
            params,
        };
        canonical(p, rules).map(|o| o.unwrap_or_else(|| p.to_owned()))
    }

    /// What Tomcat, IIS and double-decoding backends would act on is refused, or made
    /// one path for the gateway and the backend alike.
    #[test]
    fn backend_readings_cannot_step_around_a_route() {
        for raw in [
            "/admin;jsessionid=1",
            "/public/..;/admin",
            "/admin;/x",
            "/public\\..\\admin",
            "/%252e%252e/admin",
            "/public/%252E%252E/admin",
            "/a%25%32%65",
        ] {
            assert!(c(raw).is_err(), "{raw}");
        }
        // A literal percent sign is fine.
        assert_eq!(c("/100%25"), Ok("/100%25".to_owned()));
        assert_eq!(c("/100%25x"), Ok("/100%25x".to_owned()));
        for (raw, want) in [
            ("/admin;jsessionid=1", "/admin"),
            ("/public/..;/admin", "/admin"),
            ("/admin;x/secret", "/admin/secret"),
            ("/a;b;c/d", "/a/d"),
        ] {
            assert_eq!(with(PathParams::Strip, raw), Ok(want.to_owned()), "{raw}");
        }
        assert_eq!(
            with(PathParams::Keep, "/admin;x"),
            Ok("/admin;x".to_owned())
        );
    }

    #[test]
    fn canonical_paths_are_left_alone() {
        for p in ["/", "/a", "/a/b/", "/a.b/c..d/.e", "/x%20y", "/a-b_c~d"] {
            assert_eq!(canonical(p, PathRules::default()), Ok(None), "{p}");
        }
    }

    #[test]
    fn the_same_path_spelled_otherwise_becomes_one() {
        for (raw, want) in [
            ("//admin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E./admin/", "/admin/"),
            ("/./admin/./x", "/admin/x"),
            ("/%61dmin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/x%2a%3f", "/x%2A%3F"),
            ("/a/b/../../", "/"),
        ] {
            assert_eq!(c(raw), Ok(want.to_owned()), "{raw}");
        }
    }

    /// Found by the `path` fuzz target: raw non-ASCII characters were re-encoded byte by
    /// byte (mojibake), so the upstream got another path.
    #[test]
    fn non_ascii_characters_stay_as_they_are() {
        assert_eq!(c("//caf\u{e9}/./x"), Ok("/caf\u{e9}/x".to_owned()));
        assert_eq!(
            c("/\u{65e5}\u{672c}/%7e"),
            Ok("/\u{65e5}\u{672c}/~".to_owned())
        );
    }

    #[test]
    fn tricks_are_refused() {
        for raw in [
            "/..", "/a/../..", "/a%2fb", "/a%5Cb", "/a\\b", "/a%00", "/a%zz", "/a%4",
        ] {
            assert!(c(raw).is_err(), "{raw}");
        }
        let keep = PathRules {
            keep_encoded_slashes: true,
            params: PathParams::Reject,
        };
        assert_eq!(canonical("/a%2fb/../c", keep), Ok(Some("/c".into())));
        assert_eq!(canonical("/a%2Fb", keep), Ok(None), "kept opaque");
    }
}
