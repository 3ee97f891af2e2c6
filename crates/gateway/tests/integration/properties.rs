//! Properties of the parsers, over generated input (the fuzz targets in `fuzz/` explore
//! further): what is serialized parses back to the same thing, and no input panics.

use proptest::prelude::*;
use tessera_gateway::fuzzing::{
    PathParams, PathRules, canonical, decode_chunked, parse_request_head, parse_response_head,
};

fn chunked(chunks: &[Vec<u8>], trailer: Option<(&str, &str)>) -> Vec<u8> {
    let mut w = Vec::new();
    for c in chunks.iter().filter(|c| !c.is_empty()) {
        w.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        w.extend_from_slice(c);
        w.extend_from_slice(b"\r\n");
    }
    w.extend_from_slice(b"0\r\n");
    if let Some((k, v)) = trailer {
        w.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    w.extend_from_slice(b"\r\n");
    w
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn chunked_bodies_decode_to_what_was_encoded(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
        trailer in proptest::option::of(("x-[a-z]{1,8}", "[a-zA-Z0-9]{0,16}")),
    ) {
        let wire = chunked(&chunks, trailer.as_ref().map(|(k, v)| (k.as_str(), v.as_str())));
        let (body, trailers) = decode_chunked(&wire).unwrap();
        prop_assert_eq!(body, chunks.concat());
        if let Some((k, v)) = &trailer {
            let t = trailers.unwrap();
            prop_assert_eq!(t.get(k.as_str()).unwrap().to_str().unwrap(), v.as_str());
        }
        // Cut anywhere before the end, it is incomplete, never wrong data.
        for cut in [0, wire.len() / 2, wire.len() - 1] {
            prop_assert!(decode_chunked(&wire[..cut]).is_err());
        }
    }

    #[test]
    fn any_bytes_are_a_request_head_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_request_head(&bytes);
        let _ = parse_response_head(&bytes, false);
        let _ = decode_chunked(&bytes);
    }

    #[test]
    fn a_written_request_head_parses(
        method in "(GET|POST|PUT|DELETE)",
        path in "/[a-z0-9/._-]{0,40}",
        fields in proptest::collection::vec(("x-[a-z]{1,10}", "[ -~&&[^ ]][ -~]{0,30}[ -~&&[^ ]]"), 0..10),
    ) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: example\r\n");
        for (k, v) in &fields {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = if method == "POST" || method == "PUT" { "content-length: 0\r\n" } else { "" };
        head.push_str(body);
        head.push_str("\r\n");
        let outcome = parse_request_head(head.as_bytes());
        prop_assert!(outcome == "fast" || outcome == "other", "{}: {}", outcome, head);
        // Cut short, it waits for more.
        prop_assert_eq!(parse_request_head(&head.as_bytes()[..head.len() - 1]), "partial");
    }

    #[test]
    fn a_written_response_head_parses_to_its_status(status in 200u16..600, n in 0u64..100_000) {
        let head = format!("HTTP/1.1 {status} X\r\ncontent-length: {n}\r\n\r\n");
        prop_assert_eq!(parse_response_head(head.as_bytes(), false), Ok(Some(status)));
    }

    #[test]
    fn canonical_paths_are_canonical(path in "/[a-zA-Z0-9/.%;_~\u{e9}-]{0,40}") {
        for params in [PathParams::Reject, PathParams::Strip, PathParams::Keep] {
            let rules = PathRules { keep_encoded_slashes: false, params };
            if let Ok(c) = canonical(&path, rules) {
                let c = c.unwrap_or_else(|| path.clone());
                prop_assert!(!c.contains("//"), "{}", c);
                prop_assert_eq!(canonical(&c, rules), Ok(None), "{} -> {}", path, c);
            }
        }
    }
}
