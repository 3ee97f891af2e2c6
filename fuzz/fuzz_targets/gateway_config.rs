//! The gateway's TOML config: any text parses or is refused, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = tessera_gateway::Config::parse(s);
    }
});
