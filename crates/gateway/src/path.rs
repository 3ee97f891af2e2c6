//! One canonical request path, decided before routing and auth and sent upstream as is,
//! so a route's rules cannot be stepped around by spelling the same path another way
//! (`/public/../admin`, `//admin`, `/%61dmin`).
//!
//! Canonical means: percent-encoded unreserved characters decoded (RFC 3986 §2.3), other
//! escapes upper-cased, runs of `/` merged, `.` and `..` segments removed (§5.2.4; a `..`
//! above the root is refused). Encoded `/` and `\` are refused by default, or kept opaque
//! (`encoded_slashes = "keep"`): never decoded into a separator. A raw `\`, an escaped
//! NUL and a malformed escape are refused.

/// Why a path was refused (the 400's message).
pub type PathError = &'static str;

/// The canonical form of `path`, or `None` when it already is canonical (the common
/// case, decided by one scan without allocating).
pub fn canonical(path: &str, keep_encoded_slashes: bool) -> Result<Option<String>, PathError> {
    let b = path.as_bytes();
    let mut suspect = false;
    let mut prev = 0u8;
    for &c in b {
        match c {
            b'%' | b'\\' => suspect = true,
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
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => return Err("a backslash in the path"),
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
                    c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => {
                        decoded.push(c as char)
                    }
                    _ => decoded.push_str(&format!("%{v:02X}")),
                }
                i += 3;
            }
            c => {
                decoded.push(c as char);
                i += 1;
            }
        }
    }
    // Segments, with empty ones (merged slashes) and dots resolved.
    let mut out: Vec<&str> = Vec::new();
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
        canonical(p, false).map(|o| o.unwrap_or_else(|| p.to_owned()))
    }

    #[test]
    fn canonical_paths_are_left_alone() {
        for p in ["/", "/a", "/a/b/", "/a.b/c..d/.e", "/x%20y", "/a-b_c~d"] {
            assert_eq!(canonical(p, false), Ok(None), "{p}");
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

    #[test]
    fn tricks_are_refused() {
        for raw in [
            "/..", "/a/../..", "/a%2fb", "/a%5Cb", "/a\\b", "/a%00", "/a%zz", "/a%4",
        ] {
            assert!(c(raw).is_err(), "{raw}");
        }
        assert_eq!(canonical("/a%2fb/../c", true), Ok(Some("/c".into())));
        assert_eq!(canonical("/a%2Fb", true), Ok(None), "kept opaque");
    }
}
