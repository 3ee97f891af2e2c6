//! The upstream response head parser: any bytes, no panic, head and fields in range.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let head_only = data.first().is_some_and(|b| b & 1 == 1);
    let _ = tessera_gateway::fuzzing::parse_response_head(data, head_only);
});
