//! JWT header and claims parsing: a raw token of any bytes is refused or verified without
//! a panic; and claims of any bytes under a valid HS256 signature reach the claims
//! checks, which refuse or accept them without a panic.
#![no_main]
use base64::Engine;
use tessera_jwt::{Alg, Key, KeySet, Validation, verify};

const SECRET: &[u8] = b"fuzzing-secret-fuzzing-secret-32";

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let keys = KeySet::new(vec![Key::hmac(None, SECRET)]);
    let v = Validation::new(&[Alg::HS256]);
    if let Ok(raw) = std::str::from_utf8(data) {
        let _ = verify(raw, &keys, &v, 1_700_000_000);
    }
    // The same bytes as claims (and, split at the first NUL, a header), signed.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (header, claims) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], data),
    };
    let signing_input = format!("{}.{}", b64.encode(header), b64.encode(claims));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let sig = ring::hmac::sign(&key, signing_input.as_bytes());
    let token = format!("{signing_input}.{}", b64.encode(sig.as_ref()));
    let _ = verify(&token, &keys, &v, 1_700_000_000);
});
