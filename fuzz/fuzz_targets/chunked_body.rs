//! The chunked body decoder: any bytes, no panic; a decoded body is never longer than
//! its wire form.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok((body, _)) = tessera_gateway::fuzzing::decode_chunked(data) {
        assert!(body.len() <= data.len());
    }
});
