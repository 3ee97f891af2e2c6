//! Path canonicalisation: no panic; a canonical path starts with '/', has no dot
//! segments or empty segments, and canonicalising it again changes nothing.
#![no_main]
use tessera_gateway::fuzzing::{PathParams, PathRules, canonical};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let path = format!("/{s}");
    for params in [PathParams::Reject, PathParams::Strip, PathParams::Keep] {
        for keep_encoded_slashes in [false, true] {
            let rules = PathRules {
                keep_encoded_slashes,
                params,
            };
            if let Ok(c) = canonical(&path, rules) {
                let c = c.unwrap_or_else(|| path.clone());
                assert!(c.starts_with('/'), "{c}");
                assert!(!c.contains("//"), "{c}");
                assert!(!c.split('/').any(|seg| seg == "." || seg == ".."), "{c}");
                assert_eq!(
                    canonical(&c, rules),
                    Ok(None),
                    "not idempotent: {path:?} -> {c:?}"
                );
            }
        }
    }
});
