//! The client-facing HTTP/1.1 request head parser: any bytes, no panic, fields in range,
//! rejections are 4xx.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tessera_gateway::fuzzing::parse_request_head(data);
});
