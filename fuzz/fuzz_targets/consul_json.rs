//! Consul JSON request bodies (service and check registration, catalog writes): any bytes
//! decode and validate or are refused, never a panic.
#![no_main]
use tessera_registry::defs::{
    CatalogDeregistration, CatalogRegistration, CheckDef, ServiceDef, parse_json,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = parse_json::<ServiceDef>(data) {
        let _ = s.validate();
    }
    if let Ok(c) = parse_json::<CheckDef>(data) {
        let _ = c.initial_status();
        let _ = c.spec(false);
    }
    if let Ok(r) = parse_json::<CatalogRegistration>(data) {
        let _ = r.validate();
    }
    let _ = parse_json::<CatalogDeregistration>(data);
});
